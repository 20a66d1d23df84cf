"""The simulated OpenAI Realtime server against the spec (openai-realtime-and-twilio-turn.md
sections 1-3, 6): handshake and auth, session validation, the voice-turn event order, VAD,
truncation, barge-in, function calls and every fault switch. Every event the simulator sent
and every event a test sent is validated against the openai SDK's own models at teardown."""

import asyncio
import base64
import copy
import json
import time

import numpy as np
import pytest
import soxr
from openai import AsyncOpenAI
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from whatsapp_call_sim.audio import load_utterance
from whatsapp_call_sim.openai_realtime import (
    RealtimeSimulator,
    Reply,
    SchemaError,
    speech_for,
    validate_client_event,
    validate_server_event,
)

KEY = "sk-sim-test-key"
INVALID = "evt_invalid_"  # events a test sends on purpose although the API refuses them
AUTH = {"Authorization": f"Bearer {KEY}"}
VAD_SESSION = {
    "type": "realtime",
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "transcription": {"model": "gpt-4o-mini-transcribe"},
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
        },
        "output": {"voice": "marin"},
    },
}


def vad_session(turn_detection: dict | None) -> dict:
    session = copy.deepcopy(VAD_SESSION)
    session["audio"]["input"]["turn_detection"] = turn_detection
    return session


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
            if not str(event.get("event_id", "")).startswith(INVALID):
                validate_client_event(event)


class Client:
    """A bare WebSocket client that sends and records events (validated at teardown)."""

    def __init__(self, ws):
        self.ws = ws
        self.events: list[dict] = []

    async def send(self, event: dict) -> None:
        validate_client_event(event)
        await self.ws.send(json.dumps(event))

    async def send_invalid(self, event: dict) -> None:
        """Send an event the API refuses (some the SDK models refuse too), as a broken
        client would; teardown does not hold it to the SDK models."""
        await self.ws.send(json.dumps({**event, "event_id": INVALID + str(len(self.events))}))

    async def append(self, pcm: bytes, chunk_ms: int = 20) -> None:
        for i in range(0, len(pcm), chunk_ms * 48):
            await self.send(
                {
                    "type": "input_audio_buffer.append",
                    "audio": base64.b64encode(pcm[i : i + chunk_ms * 48]).decode(),
                }
            )

    async def until(self, kind: str, timeout: float = 5.0, **match) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                event = json.loads(await self.ws.recv())
                self.events.append(event)
                if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
                    return event

    async def seen_or_until(self, kind: str, timeout: float = 5.0) -> dict:
        """An event already received, or the next one of that type."""
        for event in self.events:
            if event["type"] == kind:
                return event
        return await self.until(kind, timeout)

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]


async def open_client(sim, model="gpt-realtime-2", headers=AUTH):
    ws = await connect(f"{sim.url}?model={model}", additional_headers=headers, max_size=None)
    return Client(ws)


async def configured(sim, session=VAD_SESSION) -> Client:
    client = await open_client(sim)
    await client.until("session.created")
    await client.send({"type": "session.update", "session": session})
    await client.until("session.updated")
    return client


def is_subsequence(wanted: list[str], seen: list[str]) -> bool:
    it = iter(seen)
    return all(kind in it for kind in wanted)


# ---- handshake -----------------------------------------------------------------------------


async def test_bad_or_missing_key_gets_http_401(sim):
    for headers in ({"Authorization": "Bearer sk-wrong"}, {}):
        with pytest.raises(InvalidStatus) as info:
            await open_client(sim, headers=headers)
        assert info.value.response.status_code == 401
        body = json.loads(info.value.response.body)
        assert body["error"]["type"] == "invalid_request_error"
        assert "sk-wrong" not in info.value.response.body.decode()
    assert body["error"]["code"] is None  # missing key
    assert not sim.sessions


async def test_bad_key_as_error_event_then_close(sim):
    sim.faults.key_error_as_event = True
    client = await open_client(sim, headers={"Authorization": "Bearer sk-wrong"})
    error = await client.until("error")
    assert error["error"]["code"] == "invalid_api_key"
    with pytest.raises(ConnectionClosed) as info:
        await client.until("session.created")
    assert info.value.rcvd.code == 1008


async def test_beta_header_is_refused_with_close_4000(sim):
    client = await open_client(sim, headers={**AUTH, "OpenAI-Beta": "realtime=v1"})
    error = await client.until("error")
    assert error["error"]["code"] == "beta_api_shape_disabled"
    with pytest.raises(ConnectionClosed) as info:
        await client.until("session.created")
    assert info.value.rcvd.code == 4000
    assert info.value.rcvd.reason == "invalid_request_error.beta_api_shape_disabled"


async def test_unknown_model_and_wrong_path(sim):
    client = await open_client(sim, model="gpt-nonexistent")
    assert (await client.until("error"))["error"]["code"] == "model_not_found"
    with pytest.raises(InvalidStatus) as info:
        await connect(sim.url.replace("/v1/realtime", "/v1/other"), additional_headers=AUTH)
    assert info.value.response.status_code == 404


# ---- session ---------------------------------------------------------------------------------


async def test_session_created_first_then_update_is_validated_and_merged(sim):
    client = await open_client(sim)
    created = await client.until("session.created")
    assert client.types() == ["session.created"]
    assert created["session"]["id"].startswith("sess_")
    assert created["session"]["model"] == "gpt-realtime-2"
    assert created["event_id"].startswith("event_")
    bad = [
        ({"instructions": "x"}, "missing_required_parameter", "session.type"),
        ({"type": "realtime", "temperature": 0.8}, "unknown_parameter", "session.temperature"),
        (
            {"type": "realtime", "audio": {"output": {"voice": "nova"}}},
            "invalid_value",
            "session.audio.output.voice",
        ),
        (
            {
                "type": "realtime",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
            },
            "invalid_value",
            "session.audio.input.format.rate",
        ),
        (
            {
                "type": "realtime",
                "audio": {"input": {"turn_detection": {"type": "semantic_vad", "threshold": 0.5}}},
            },
            "unknown_parameter",
            "session.audio.input.turn_detection.threshold",
        ),
    ]
    for session, code, param in bad:
        await client.send_invalid({"type": "session.update", "session": session})
        error = await client.until("error")
        assert (error["error"]["code"], error["error"]["param"]) == (code, param)
    await client.send(
        {
            "type": "session.update",
            "event_id": "evt_1",
            "session": {
                "type": "realtime",
                "instructions": "Be brief.",
                "audio": {"output": {"voice": "cedar"}},
            },
        }
    )
    updated = (await client.until("session.updated"))["session"]
    assert updated["instructions"] == "Be brief."
    assert updated["audio"]["output"]["voice"] == "cedar"
    assert updated["audio"]["input"]["turn_detection"]["type"] == "server_vad"  # kept
    assert sim.sessions[0].errors[0]["event_id"].startswith(INVALID)  # echoed back


# ---- a voice turn ------------------------------------------------------------------------------


async def test_voice_turn_follows_the_spec_order_with_correct_audio_times(sim):
    client = await configured(sim)
    await client.append(silence(1000) + utterance("yes") + silence(1000))
    done = await client.until("response.done")
    await client.seen_or_until("conversation.item.input_audio_transcription.completed", timeout=2)
    assert is_subsequence(
        [
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            "conversation.item.added",
            "conversation.item.done",
            "response.created",
            "rate_limits.updated",
            "response.output_item.added",
            "conversation.item.added",
            "response.content_part.added",
            "response.output_audio.delta",
            "response.output_audio.done",
            "response.output_audio_transcript.done",
            "response.content_part.done",
            "response.output_item.done",
            "conversation.item.done",
            "response.done",
        ],
        client.types(),
    )
    started = next(e for e in client.events if e["type"].endswith("speech_started"))
    stopped = next(e for e in client.events if e["type"].endswith("speech_stopped"))
    assert abs(started["audio_start_ms"] - (1000 - 300)) <= 30  # prefix padding included
    assert abs(stopped["audio_end_ms"] - (1000 + 1670 + 500)) <= 40  # silence window included
    assert started["item_id"] == stopped["item_id"]
    transcript = next(
        e for e in client.events if e["type"].endswith("input_audio_transcription.completed")
    )
    assert transcript["transcript"] == "Yes, that works for me."
    assert done["response"]["status"] == "completed"
    audio = b"".join(
        base64.b64decode(e["delta"])
        for e in client.events
        if e["type"] == "response.output_audio.delta"
    )
    assert audio == speech_for("Great, I have noted that.")
    deltas = [e for e in client.events if e["type"] == "response.output_audio.delta"]
    sizes = {len(base64.b64decode(e["delta"])) for e in deltas[:-1]}
    assert len(sizes) > 1 and all(40 * 48 <= s <= 200 * 48 for s in sizes)  # irregular chunks
    said = "".join(
        e["delta"] for e in client.events if e["type"] == "response.output_audio_transcript.delta"
    )
    assert said == "Great, I have noted that."
    assert sim.sessions[0].audio_in_ms == pytest.approx(2000 + len(utterance("yes")) / 48)


async def test_vad_honours_threshold_and_silence_window(sim):
    quiet_tone = (10 ** (-45 / 20) * 32768 * np.sqrt(2) * np.sin(np.arange(24000) / 4)).astype(
        np.int16
    )
    deaf = {
        **VAD_SESSION,
        "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 0.5}}},
    }
    client = await configured(sim, deaf)
    await client.append(silence(200) + quiet_tone.tobytes() + silence(800))
    await client.send({"type": "response.cancel"})  # a marker: answered right away
    await client.until("error")
    assert "input_audio_buffer.speech_started" not in client.types()
    await client.send(
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {
                    "input": {
                        "turn_detection": {
                            "type": "server_vad",
                            "threshold": 0.3,
                            "create_response": False,
                        }
                    }
                },
            },
        }
    )
    await client.until("session.updated")
    await client.append(quiet_tone.tobytes() + silence(800))
    assert (await client.until("input_audio_buffer.speech_stopped"))["audio_end_ms"] > 0

    # A short silence window splits "Hello? ... Who is this?" at its pause; 500 ms does not.
    for window, turns in ((150, 2), (500, 1)):
        c = await configured(
            sim,
            {
                **VAD_SESSION,
                "audio": {
                    "input": {
                        "turn_detection": {
                            "type": "server_vad",
                            "silence_duration_ms": window,
                            "create_response": False,
                        }
                    }
                },
            },
        )
        await c.append(utterance("hello") + silence(1200))
        await c.send({"type": "input_audio_buffer.clear"})
        await c.until("input_audio_buffer.cleared")
        assert c.types().count("input_audio_buffer.speech_stopped") == turns
        await c.ws.close()


async def test_manual_turns_commit_and_empty_commit(sim):
    client = await configured(sim, vad_session(None))
    await client.append(silence(50))
    await client.send({"type": "input_audio_buffer.commit"})
    assert (await client.until("error"))["error"]["code"] == "input_audio_buffer_commit_empty"
    await client.append(utterance("hello"))
    await client.send({"type": "input_audio_buffer.commit"})
    await client.until("input_audio_buffer.committed")
    completed = await client.until("conversation.item.input_audio_transcription.completed")
    assert completed["transcript"] == "Hello? Who is this?"
    assert "input_audio_buffer.speech_started" not in client.types()


# ---- responses, barge-in, truncation -------------------------------------------------------------


async def test_greeting_says_the_quoted_text_and_concurrent_response_is_refused(sim):
    client = await configured(sim)
    await client.send(
        {
            "type": "response.create",
            "response": {
                "instructions": 'Say exactly: "Hello Maria, this is Acme."',
                "metadata": {"purpose": "greeting"},
            },
        }
    )
    await client.send({"type": "response.create"})
    error = await client.until("error")
    assert error["error"]["code"] == "conversation_already_has_active_response"
    done = await client.until("response.done")
    assert done["response"]["metadata"] == {"purpose": "greeting"}
    assert done["response"]["output"][0]["content"][0]["transcript"] == "Hello Maria, this is Acme."
    await client.send({"type": "response.cancel"})
    assert (await client.until("error"))["error"]["code"] == "response_cancel_not_active"


async def test_barge_in_cancels_the_response_and_truncate_is_validated(sim):
    sim.audio_pace = 1.0
    client = await configured(sim)
    await client.send({"type": "response.create"})
    first = await client.until("response.output_audio.delta")
    item_id = first["item_id"]
    await client.append(utterance("hello"))
    done = await client.until("response.done")
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    assert done["response"]["output"][0]["status"] == "incomplete"
    types = client.types()
    assert types.index("input_audio_buffer.speech_started") < types.index("response.done")
    generated = int(sim.sessions[0].generated_ms[item_id])
    assert 0 < generated < len(speech_for("Hello! This is your assistant calling.")) / 48

    await client.send(
        {
            "type": "conversation.item.truncate",
            "item_id": item_id,
            "content_index": 0,
            "audio_end_ms": generated + 500,
        }
    )
    error = await client.until("error")
    assert (
        error["error"]["message"]
        == f"Audio content of {generated}ms is already shorter than {generated + 500}ms"
    )
    assert error["error"]["event_id"] is None
    await client.send(
        {
            "type": "conversation.item.truncate",
            "item_id": item_id,
            "content_index": 0,
            "audio_end_ms": 100,
        }
    )
    truncated = await client.until("conversation.item.truncated")
    assert truncated["audio_end_ms"] == 100
    assert sim.sessions[0].items[item_id]["content"][0]["transcript"] == ""
    await client.append(silence(700))
    stopped = await client.until("input_audio_buffer.speech_stopped")
    await client.send(
        {
            "type": "conversation.item.truncate",
            "item_id": stopped["item_id"],
            "content_index": 0,
            "audio_end_ms": 10,
        }
    )
    assert (await client.until("error"))["error"]["code"] == "unsupported_content_type"


async def test_response_cancel_by_client(sim):
    sim.audio_pace = 1.0
    client = await configured(sim)
    await client.send({"type": "response.create"})
    await client.until("response.output_audio.delta")
    await client.send({"type": "response.cancel"})
    done = await client.until("response.done")
    assert done["response"]["status_details"]["reason"] == "client_cancelled"


async def test_function_call_and_its_output(sim):
    sim.replies.append(Reply("One moment.", "lookup_booking", {"reference": "AB12"}))
    tools = [
        {
            "type": "function",
            "name": "lookup_booking",
            "description": "Look up.",
            "parameters": {"type": "object", "properties": {"reference": {"type": "string"}}},
        },
        {
            "type": "function",
            "name": "end_call",
            "description": "Hang up.",
            "parameters": {"type": "object", "properties": {}},
        },
    ]
    client = await configured(sim, {**VAD_SESSION, "tools": tools})
    await client.append(utterance("yes") + silence(700))
    args = await client.until("response.function_call_arguments.done")
    assert (args["name"], json.loads(args["arguments"])) == (
        "lookup_booking",
        {"reference": "AB12"},
    )
    assert args["call_id"].startswith("call_")
    await client.until("response.done")
    await client.send(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "function_call_output",
                "call_id": args["call_id"],
                "output": '{"status":"confirmed"}',
            },
        }
    )
    added = await client.until("conversation.item.added")
    assert added["item"]["type"] == "function_call_output"
    await client.until("conversation.item.done")
    await client.send({"type": "response.create"})
    done = await client.until("response.done")
    assert done["response"]["output"][0]["content"][0]["transcript"] == "All right, done."

    # The default script: the caller says goodbye, the model says goodbye and calls end_call.
    await client.append(utterance("goodbye") + silence(700))
    done = await client.until("response.done")
    kinds = [item["type"] for item in done["response"]["output"]]
    assert kinds == ["message", "function_call"]
    assert done["response"]["output"][1]["name"] == "end_call"
    await client.send(
        {
            "type": "conversation.item.create",
            "item": {"type": "function_call_output", "call_id": "call_unknown", "output": "{}"},
        }
    )
    assert (await client.until("error"))["error"]["param"] == "item.call_id"


async def test_pcmu_session_counts_8khz_and_speaks_ulaw(sim):
    session = {
        "type": "realtime",
        "audio": {
            "input": {"format": {"type": "audio/pcmu"}},
            "output": {"format": {"type": "audio/pcmu"}},
        },
    }
    client = await configured(sim, session)
    await client.send(
        {
            "type": "input_audio_buffer.append",
            "audio": base64.b64encode(bytes([0xFF]) * 800).decode(),
        }
    )
    await client.send(
        {"type": "response.create", "response": {"instructions": 'Say "Thank you. Goodbye!"'}}
    )
    await client.until("response.done")
    assert sim.sessions[0].audio_in_ms == 100
    ulaw = b"".join(
        base64.b64decode(e["delta"])
        for e in client.events
        if e["type"] == "response.output_audio.delta"
    )
    assert abs(len(ulaw) / 8 - len(speech_for("Thank you. Goodbye!")) / 48) < 2


# ---- faults ---------------------------------------------------------------------------------------


async def test_fault_drop_mid_response_is_an_abrupt_close(sim):
    sim.faults.drop_mid_response_after_ms = 300
    client = await configured(sim)
    await client.send({"type": "response.create"})
    with pytest.raises(ConnectionClosed) as info:
        await client.until("response.done")
    assert info.value.rcvd is None  # no close frame: 1006 on the client
    assert sim.faults.drop_mid_response_after_ms is None  # one-shot


async def test_fault_session_expired_then_close_1001(sim):
    client = await configured(sim)
    await sim.expire_sessions()
    error = await client.until("error")
    assert error["error"]["code"] == "session_expired"
    with pytest.raises(ConnectionClosed) as info:
        await client.until("session.updated")
    assert info.value.rcvd.code == 1001
    sim.session_max_seconds = 0.2
    client = await configured(sim)
    assert (await client.until("error", timeout=2))["error"]["code"] == "session_expired"


async def test_fault_failed_response_rate_limits_errors_and_overload(sim):
    client = await configured(sim)
    sim.faults.fail_next_response = ("rate_limit_exceeded", "Rate limit reached for requests.")
    await client.send({"type": "response.create"})
    limits = await client.until("rate_limits.updated")
    assert limits["rate_limits"][0]["remaining"] == 0
    done = await client.until("response.done")
    assert done["response"]["status"] == "failed"
    assert done["response"]["status_details"]["error"]["code"] == "rate_limit_exceeded"
    await sim.send_error("server_error", "The server had an error.", type="server_error")
    assert (await client.until("error"))["error"]["type"] == "server_error"
    await sim.send_event(
        {
            "type": "rate_limits.updated",
            "rate_limits": [{"name": "tokens", "limit": 10, "remaining": 1, "reset_seconds": 1.0}],
        }
    )
    assert (await client.until("rate_limits.updated"))["rate_limits"][0]["remaining"] == 1
    await client.send({"type": "response.create"})  # the socket survived all of that
    assert (await client.until("response.done"))["response"]["status"] == "completed"
    sim.faults.reject_connections = 1
    with pytest.raises(InvalidStatus) as info:
        await open_client(sim)
    assert info.value.response.status_code == 503


async def test_fault_slow_model_delays_the_first_delta(sim):
    sim.first_delta_delay = 0.6
    client = await configured(sim)
    await client.send({"type": "response.create"})
    await client.until("response.created")
    t0 = time.monotonic()
    await client.until("response.output_audio.delta")
    assert time.monotonic() - t0 >= 0.55


# ---- schema guard and the SDK's own client ---------------------------------------------------------


def test_schema_validation_is_strict():
    with pytest.raises(SchemaError, match="does not exist"):
        validate_server_event({"type": "response.audio.delta", "event_id": "event_1"})  # beta name
    with pytest.raises(SchemaError, match="does not know"):
        validate_server_event(
            {"type": "input_audio_buffer.cleared", "event_id": "event_1", "surprise": 1}
        )
    with pytest.raises(SchemaError):
        validate_client_event({"type": "conversation.item.truncate", "item_id": "x"})


async def test_openai_sdk_client_holds_a_conversation(sim):
    client = AsyncOpenAI(api_key=KEY, websocket_base_url=sim.url.removesuffix("/realtime"))
    seen: list[str] = []
    async with client.realtime.connect(model="gpt-realtime-2") as conn:
        await conn.session.update(session=VAD_SESSION)
        await conn.response.create(
            response={"instructions": 'Say exactly: "Hello from the SDK test."'}
        )
        pcm = utterance("goodbye") + silence(800)
        transcripts = []
        async with asyncio.timeout(10):
            async for event in conn:
                seen.append(event.type)
                if event.type == "response.done" and len(transcripts) == 0:
                    transcripts.append(event.response.output[0].content[0].transcript)
                    for i in range(0, len(pcm), 960):
                        await conn.input_audio_buffer.append(
                            audio=base64.b64encode(pcm[i : i + 960]).decode()
                        )
                elif event.type == "conversation.item.input_audio_transcription.completed":
                    transcripts.append(event.transcript)
                elif event.type == "response.done":
                    transcripts.append(event.response.output[0].content[0].transcript)
                if len(transcripts) == 3:
                    break
    assert seen[:2] == ["session.created", "session.updated"]
    assert transcripts == ["Hello from the SDK test.", "Thank you, goodbye.", "Thank you. Goodbye!"]
    assert "OpenAI-Beta" not in sim.sessions[0].headers
