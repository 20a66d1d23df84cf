"""The OpenAI Realtime voice-backend plugin against the simulated Realtime server: hooks,
session configuration, greeting pace, a user turn, barge-in truncation, function calls,
reconnect after a drop, session_expired rollover, bad keys and secrecy. Every event either
side sent is validated against the openai SDK's models at teardown."""

import asyncio
import json
import logging
import time

import numpy as np
import pytest
import soxr
import whatsapp_call_openai
from whatsapp_call import hookimpl
from whatsapp_call import plugins as plugin_mod
from whatsapp_call.errors import VoiceBackendError
from whatsapp_call.models import Call, CheckStatus, VoiceTool
from whatsapp_call.phone import parse_phone
from whatsapp_call.voice import VoiceEventType
from whatsapp_call_sim.audio import load_utterance
from whatsapp_call_sim.openai_realtime import (
    RealtimeSimulator,
    Reply,
    speech_for,
    validate_client_event,
    validate_server_event,
)

KEY = "sk-sim-plugin-key-123"
E = VoiceEventType


def utterance(name: str) -> bytes:
    return soxr.resample(load_utterance(name), 48000, 24000).astype(np.int16).tobytes()


def silence(ms: int) -> bytes:
    return bytes(ms * 48)


@pytest.fixture
async def sim():
    simulator = RealtimeSimulator(
        KEY, first_delta_delay=0.02, audio_pace=10.0, transcription_delay=0.02
    )
    await simulator.start()
    yield simulator
    await simulator.stop()
    for session in simulator.sessions + simulator.refused:
        for event in session.sent:
            validate_server_event(event)
        for event in session.received:
            validate_client_event(event)  # every event our client sent


@pytest.fixture
def settings_for(sim, register_plugin, make_settings):
    register_plugin(whatsapp_call_openai, name="openai")

    def make(**options):
        base = {
            "openaiApiKey": KEY,
            "openaiRealtimeUrl": sim.url,
            "voiceLanguage": "en",
            "openaiReconnectAttempts": 3,
        }
        return make_settings(**{**base, **options})

    return make


def new_call(**fields) -> Call:
    return Call(to=parse_phone("+14085551234"), **fields)


async def open_session(settings, call=None):
    session = await plugin_mod.call_first(
        "open_voice_session", call=call or new_call(), settings=settings
    )
    await session.start()
    return session


class Collector:
    """Reads a session's events in the background, for bounded waits on them."""

    def __init__(self, session):
        self.events = []
        self.times = []
        self._new = asyncio.Event()
        self.task = asyncio.create_task(self._read(session))

    async def _read(self, session):
        async for event in session.events():
            self.events.append(event)
            self.times.append(time.monotonic())
            self._new.set()
        self._new.set()

    async def wait(self, predicate, timeout=5.0):
        async with asyncio.timeout(timeout):
            while True:
                for i, event in enumerate(self.events):
                    if predicate(event):
                        return i
                if self.task.done():
                    raise AssertionError(f"events ended: {self.events[-3:]}")
                self._new.clear()
                await self._new.wait()

    def of(self, kind, **fields):
        return [
            e
            for e in self.events
            if e.type == kind and all(getattr(e, k) == v for k, v in fields.items())
        ]


async def eventually(predicate, timeout: float = 3.0) -> None:
    """Poll the simulator's records (bounded): they have no event a test could await."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def feed(session, pcm: bytes, chunk_ms: int = 20) -> None:
    for i in range(0, len(pcm), chunk_ms * 48):
        await session.send_audio(pcm[i : i + chunk_ms * 48])


# ---- hooks ----------------------------------------------------------------------------------


async def test_hooks_answer_only_for_the_openai_backend(settings_for):
    assert plugin_mod.call_all_sync("voice_backend_names") == [("openai", ["openai"])]
    models = [m for _, m in plugin_mod.call_all_sync("settings_model")]
    assert whatsapp_call_openai.OpenAISettings in models
    other = settings_for(voiceBackend="echo")
    assert (
        await plugin_mod.call_first("open_voice_session", call=new_call(), settings=other) is None
    )
    session = await plugin_mod.call_first(
        "open_voice_session", call=new_call(), settings=settings_for()
    )
    assert isinstance(session, whatsapp_call_openai.RealtimeSession)
    assert KEY not in repr(session)


async def test_session_update_carries_the_configuration(sim, settings_for, register_plugin):
    class Tools:
        @hookimpl
        def voice_tools(self, call, settings):
            async def lookup(arguments):
                return "{}"

            return [VoiceTool("lookup_booking", "Look up a booking.", {"type": "object"}, lookup)]

    register_plugin(Tools(), name="t-tools")
    settings = settings_for(
        voiceInstructions="You are Ana from Acme Dental.",
        voiceLanguage="pt-BR",
        voice="cedar",
        voiceSpeed=1.2,
        openaiVadThreshold=0.65,
        openaiVadSilenceMs=700,
    )
    session = await open_session(settings, new_call(voice="marin"))
    try:
        config = sim.sessions[0].config
        assert any(e["type"] == "session.updated" for e in sim.sessions[0].sent)
        assert config["instructions"].startswith("You are Ana from Acme Dental.")
        assert "Always speak Portuguese (pt-BR)" in config["instructions"]
        out = config["audio"]["output"]
        assert (out["voice"], out["speed"], out["format"]) == (
            "marin",
            1.2,
            {"type": "audio/pcm", "rate": 24000},
        )
        inp = config["audio"]["input"]
        assert inp["format"] == {"type": "audio/pcm", "rate": 24000}
        assert inp["turn_detection"] == {
            "type": "server_vad",
            "threshold": 0.65,
            "prefix_padding_ms": 300,
            "silence_duration_ms": 700,
            "create_response": True,
            "interrupt_response": True,
        }
        assert inp["transcription"] == {"model": "gpt-4o-mini-transcribe", "language": "pt"}
        assert [t["name"] for t in config["tools"]] == ["end_call", "lookup_booking"]
        assert "OpenAI-Beta" not in sim.sessions[0].headers
    finally:
        await session.close()

    semantic = await open_session(settings_for(openaiVad="semantic_vad", openaiVadEagerness="low"))
    await semantic.close()
    await semantic.close()  # idempotent
    td = sim.sessions[1].config["audio"]["input"]["turn_detection"]
    assert td == {
        "type": "semantic_vad",
        "eagerness": "low",
        "create_response": True,
        "interrupt_response": True,
    }


# ---- conversation ----------------------------------------------------------------------------


async def test_greeting_audio_arrives_at_real_time_pace(sim, settings_for):
    sim.audio_pace, sim.audio_lead_ms, sim.first_delta_delay = 1.0, 100.0, 0.1
    session = await open_session(settings_for())
    events = Collector(session)
    try:
        greeting = "Hello! This is your assistant calling."
        await session.greet(greeting)
        await events.wait(lambda e: e.type == E.RESPONSE_DONE)
        audio = [
            (e, t) for e, t in zip(events.events, events.times, strict=True) if e.type == E.AUDIO
        ]
        pcm = b"".join(e.audio for e, _ in audio)
        assert pcm == speech_for(greeting)
        spread = audio[-1][1] - audio[0][1]
        duration = len(pcm) / 48000
        assert duration - 0.6 <= spread <= duration + 0.3  # real time, not a burst
        final = events.of(E.TRANSCRIPT, role="assistant", final=True)
        assert [e.text for e in final] == [greeting]
        request = next(e for e in sim.sessions[0].received if e["type"] == "response.create")
        assert greeting in request["response"]["instructions"]
        assert "English (en)" in request["response"]["instructions"]
    finally:
        await session.close()


async def test_user_turn_produces_speech_events_transcript_and_reply(sim, settings_for):
    session = await open_session(settings_for())
    events = Collector(session)
    try:
        await feed(session, silence(500) + utterance("yes") + silence(800))
        await events.wait(lambda e: e.type == E.RESPONSE_DONE)
        await events.wait(lambda e: e.type == E.TRANSCRIPT and e.role == "user" and e.final)
        kinds = [e.type for e in events.events]
        assert kinds.index(E.SPEECH_STARTED) < kinds.index(E.SPEECH_STOPPED) < kinds.index(E.AUDIO)
        assert events.of(E.TRANSCRIPT, role="user", final=True)[0].text == "Yes, that works for me."
        reply = events.of(E.TRANSCRIPT, role="assistant", final=True)[0]
        assert reply.text == "Great, I have noted that."
        assert b"".join(e.audio for e in events.of(E.AUDIO)) == speech_for(reply.text)
        assert all(e.item_id for e in events.of(E.AUDIO))
        assert sim.sessions[0].audio_in_ms == pytest.approx(1300 + len(utterance("yes")) / 48)
    finally:
        await session.close()


async def test_barge_in_truncates_to_what_was_heard(sim, settings_for):
    sim.audio_pace = 1.0
    session = await open_session(settings_for())
    events = Collector(session)
    try:
        await session.greet("Hello! This is your assistant calling.")
        await events.wait(lambda e: e.type == E.AUDIO)
        item_id = events.of(E.AUDIO)[0].item_id
        await feed(session, utterance("hello"))
        await events.wait(lambda e: e.type == E.SPEECH_STARTED)
        await events.wait(lambda e: e.type == E.RESPONSE_DONE)
        assert sim.sessions[0].responses[0]["status"] == "cancelled"
        await session.playback_interrupted(item_id, 0)  # nothing heard: nothing to send
        await session.playback_interrupted(item_id, 250)
        await eventually(lambda: item_id in sim.sessions[0].truncated, 2)
        assert sim.sessions[0].truncated[item_id] == 250
        received_ms = sum(len(e.audio) for e in events.of(E.AUDIO, item_id=item_id)) // 48
        # Heard everything the server generated for it: a truncate would change nothing.
        await session.playback_interrupted(item_id, received_ms + 5000)
        await session.greet("Thank you. Goodbye!")  # a marker after the (skipped) truncate
        await events.wait(lambda e: e.type == E.RESPONSE_DONE and e.text == "completed")
        assert not sim.sessions[0].errors
        truncates = [
            e for e in sim.sessions[0].received if e["type"] == "conversation.item.truncate"
        ]
        assert len(truncates) == 1
    finally:
        await session.close()


async def test_goodbye_ends_the_call_after_the_models_goodbye(sim, settings_for):
    session = await open_session(settings_for())
    events = Collector(session)
    try:
        await feed(session, utterance("goodbye") + silence(800))
        index = await events.wait(lambda e: e.type == E.END_CALL)
        kinds = [e.type for e in events.events[:index]]
        assert E.AUDIO in kinds and kinds[-1] == E.RESPONSE_DONE  # goodbye heard first
        assert events.events[index].text == "the caller said goodbye"
        await eventually(
            lambda: any(e["type"] == "conversation.item.create" for e in sim.sessions[0].received),
            2,
        )
        output = next(
            e for e in sim.sessions[0].received if e["type"] == "conversation.item.create"
        )
        assert output["item"]["type"] == "function_call_output"
    finally:
        await session.close()


async def test_voice_tools_run_and_their_result_goes_back(sim, settings_for, register_plugin):
    calls = []

    class Tools:
        @hookimpl
        def voice_tools(self, call, settings):
            async def lookup(arguments):
                calls.append(arguments)
                return json.dumps({"status": "confirmed"})

            return [VoiceTool("lookup_booking", "Look up a booking.", {"type": "object"}, lookup)]

    register_plugin(Tools(), name="t-tools2")
    sim.replies.append(Reply("One moment.", "lookup_booking", {"reference": "AB12"}))
    session = await open_session(settings_for())
    events = Collector(session)
    try:
        await feed(session, utterance("yes") + silence(800))
        await events.wait(
            lambda e: (
                e.type == E.TRANSCRIPT
                and e.role == "assistant"
                and e.final
                and e.text == "All right, done."
            )
        )
        assert calls == [{"reference": "AB12"}]
        received = sim.sessions[0].received
        output = next(e for e in received if e["type"] == "conversation.item.create")
        assert output["item"]["output"] == '{"status": "confirmed"}'
        assert received.index(output) < len(received) - 1
        assert [e["type"] for e in received if e["type"] == "response.create"] == [
            "response.create"
        ]
    finally:
        await session.close()


# ---- resilience ---------------------------------------------------------------------------------


async def test_socket_drop_mid_reply_reconnects_with_context(sim, settings_for, caplog):
    caplog.set_level(logging.DEBUG)
    session = await open_session(settings_for())
    events = Collector(session)
    try:
        await feed(session, utterance("hello") + silence(800))
        await events.wait(lambda e: e.type == E.RESPONSE_DONE)
        await events.wait(lambda e: e.type == E.TRANSCRIPT and e.role == "user" and e.final)
        sim.faults.drop_mid_response_after_ms = 300
        await feed(session, utterance("yes") + silence(800))
        second = await sim.wait_for_sessions(2, timeout=5)
        await feed(session, silence(100))  # the caller keeps talking: no error, no hang-up
        await eventually(lambda: second.responses, 5)
        assert session.sessions_opened == 2
        kinds = [e["type"] for e in second.received]
        assert kinds[:2] == ["session.update", "conversation.item.create"]
        summary = second.received[1]["item"]["content"][0]["text"]
        assert (
            "Caller: Hello? Who is this?" in summary
            and "You: Hi! I am calling for the team." in summary
        )
        assert "response.create" in kinds  # the cut-off reply is resumed
        assert not events.of(E.ERROR)
        assert KEY not in caplog.text
    finally:
        await session.close()


async def test_session_expired_rolls_over_to_a_new_session(sim, settings_for):
    session = await open_session(settings_for())
    events = Collector(session)
    try:
        await session.greet("Hello! This is your assistant calling.")
        await events.wait(lambda e: e.type == E.RESPONSE_DONE)
        await sim.expire_sessions()
        second = await sim.wait_for_sessions(2, timeout=5)
        await eventually(
            lambda: any(e["type"] == "conversation.item.create" for e in second.received), 3
        )
        assert sim.sessions[0].close_code == 1001
        assert second.config["instructions"] == sim.sessions[0].config["instructions"]
        await feed(session, utterance("yes") + silence(800))
        await events.wait(lambda e: e.type == E.TRANSCRIPT and e.role == "user" and e.final)
        assert not events.of(E.ERROR)
    finally:
        await session.close()


async def test_benign_errors_are_tolerated_and_others_reported(sim, settings_for):
    session = await open_session(settings_for())
    events = Collector(session)
    try:
        await sim.send_error(
            "response_cancel_not_active", "Cancellation failed: no active response found"
        )
        await sim.send_error(
            "conversation_already_has_active_response",
            "Conversation already has an active response",
        )
        await sim.send_error(
            "server_error",
            "The server had an error while processing your request.",
            type="server_error",
        )
        index = await events.wait(lambda e: e.type == E.ERROR)
        assert "server had an error" in events.events[index].text
        assert not events.events[index].fatal
        assert len(events.of(E.ERROR)) == 1
    finally:
        await session.close()


async def test_reconnect_gives_up_with_a_fatal_error(sim, settings_for):
    session = await open_session(settings_for(openaiReconnectAttempts=2))
    events = Collector(session)
    sim.faults.reject_connections = 5
    sim.drop_connections()
    index = await events.wait(lambda e: e.type == E.ERROR, timeout=10)
    assert events.events[index].fatal
    assert "HTTP 503" in events.events[index].text
    async with asyncio.timeout(2):
        await events.task  # events() ended
    await session.close()


async def test_bad_key_fails_start_with_a_fix_and_no_secret(sim, settings_for, caplog):
    caplog.set_level(logging.DEBUG)
    bad = "sk-wrong-secret-value-999"
    with pytest.raises(VoiceBackendError) as info:
        await open_session(settings_for(openaiApiKey=bad))
    assert "401" in info.value.message and "openaiApiKey" in info.value.hint
    assert info.value.fatal and info.value.code == "invalid_api_key"
    sim.faults.key_error_as_event = True
    with pytest.raises(VoiceBackendError) as info2:
        await open_session(settings_for(openaiApiKey=bad))
    assert info2.value.code == "invalid_api_key" and "openaiApiKey" in info2.value.hint
    for text in (str(info.value), str(info2.value), caplog.text):
        assert bad not in text and KEY not in text
    with pytest.raises(VoiceBackendError, match="openaiApiKey is not set"):
        await open_session(settings_for(openaiApiKey=None))


# ---- doctor -------------------------------------------------------------------------------------


async def test_doctor_checks(sim, settings_for):
    results = dict(await plugin_mod.call_all("doctor_checks", settings=settings_for()))["openai"]
    assert [(c.name, c.status) for c in results] == [
        ("openai key", CheckStatus.OK),
        ("openai realtime", CheckStatus.OK),
    ]
    assert "gpt-realtime-2" in results[1].message
    bad = dict(
        await plugin_mod.call_all(
            "doctor_checks", settings=settings_for(openaiApiKey="sk-bad-key-000")
        )
    )["openai"]
    assert bad[1].status == CheckStatus.FAIL and "openaiApiKey" in bad[1].hint
    assert "sk-bad-key-000" not in bad[1].message
    missing = dict(
        await plugin_mod.call_all("doctor_checks", settings=settings_for(openaiApiKey=None))
    )["openai"]
    assert [(c.name, c.status) for c in missing] == [("openai key", CheckStatus.FAIL)]
    model = dict(
        await plugin_mod.call_all("doctor_checks", settings=settings_for(openaiModel="gpt-nope"))
    )["openai"]
    assert model[1].status == CheckStatus.FAIL and "openaiModel" in model[1].hint
    other = await plugin_mod.call_all("doctor_checks", settings=settings_for(voiceBackend="echo"))
    assert "openai" not in dict(other)
