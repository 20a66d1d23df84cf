"""The simulated WhatsApp user: refuses offers WhatsApp refuses, answers like WhatsApp,
enforces WhatsApp's media timers, runs its script and records what it hears."""

import asyncio
import time

import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from whatsapp_call.media.peer import CallMedia
from whatsapp_call.media.sdp import parse_sdp
from whatsapp_call_sim.audio import frame_to_mono, level_dbfs, tone
from whatsapp_call_sim.user import (
    AudioPlayerTrack,
    HangUp,
    Pause,
    Say,
    SdpRejected,
    SimulatedUser,
    UserScript,
    WaitForSpeech,
)

LOOPBACK = ["127.0.0.1"]


class StallingTrack(AudioPlayerTrack):
    """Sends audio for `seconds`, then never produces another frame (a stuck media path)."""

    def __init__(self, seconds: float):
        super().__init__()
        self._stall_at = time.monotonic() + seconds

    async def recv(self):
        if time.monotonic() >= self._stall_at:
            await asyncio.Event().wait()  # forever; cancelled when the connection closes
        return await super().recv()


class NoTrack(MediaStreamTrack):
    kind = "audio"

    async def recv(self):
        await asyncio.Event().wait()
        raise MediaStreamError


async def _offer(**kwargs):
    media = CallMedia(host_addresses=LOOPBACK, **kwargs)
    return media, await media.create_offer()


async def _call(user, **media_kwargs):
    media, offer = await _offer(**media_kwargs)
    await media.accept_answer(await user.answer(offer))
    await media.wait_connected(5)
    return media


async def test_answer_looks_like_whatsapps():
    user = SimulatedUser("15551001", UserScript.silent())
    media = None
    try:
        async with asyncio.timeout(10):
            media, offer = await _offer()
            answer = await user.answer(offer)
        info = parse_sdp(answer)
        assert info.setup == "active"
        assert [alg for alg, _ in info.fingerprints] == ["sha-256"]
        assert [c.name for c in info.audio[0].codecs] == ["opus"]
        assert info.ice_lite
        assert {c.address for c in info.candidates} == {"127.0.0.1"}
        assert answer.endswith("\r\n") and "\n" not in answer.replace("\r\n", "")
        with pytest.raises(RuntimeError, match="already answered"):
            await user.answer(offer)
    finally:
        if media:
            await media.close()
        await user.close()


def _mutate(offer: str, old: str, new: str) -> str:
    assert old in offer
    return offer.replace(old, new)


@pytest.mark.parametrize(
    ("mutation", "reason"),
    [
        (lambda o: o.replace("\r\n", "\n"), "CRLF"),
        (lambda o: _mutate(o, "a=setup:actpass", "a=setup:active"), "actpass"),
        (
            lambda o: _mutate(o, "a=fingerprint:sha-256", "a=fingerprint:sha-384"),
            "other than sha-256",
        ),
        (
            lambda o: "".join(
                x for x in o.splitlines(keepends=True) if not x.startswith("a=fingerprint")
            ),
            "no a=fingerprint",
        ),
        (lambda o: _mutate(o, "opus/48000/2", "PCMU/8000"), "opus/48000/2"),
        (lambda o: o.replace("a=ice-ufrag:", "a=x-ufrag:"), "ice-ufrag"),
        (lambda o: _mutate(o, "m=audio", "m=video"), "exactly one m=audio"),
    ],
)
async def test_offers_whatsapp_would_refuse_are_rejected(mutation, reason):
    media, offer = await _offer()
    user = SimulatedUser("15551002", UserScript.silent())
    try:
        with pytest.raises(SdpRejected, match=reason):
            await user.answer(mutation(offer))
        assert not user.ended.is_set()
    finally:
        await media.close()
        await user.close()


async def test_no_media_at_call_start_ends_the_call():
    user = SimulatedUser("15551003", UserScript.silent(), start_media_timeout=0.8)
    media = None
    try:
        async with asyncio.timeout(10):
            media = await _call(user, outbound_track=NoTrack())
            await user.ended.wait()
        assert user.end_reason == "no_media"
        assert 0.7 <= user.timings["ended"] - user.timings["answered"] <= 2.5
        async with asyncio.timeout(5):  # the phone closed the call: our side sees it
            await media.ended.wait()
    finally:
        if media:
            await media.close()
        await user.close()


async def test_media_stopping_mid_call_ends_the_call():
    user = SimulatedUser("15551004", UserScript.silent(), media_timeout=0.6)
    media = None
    try:
        async with asyncio.timeout(10):
            media = await _call(user, outbound_track=StallingTrack(0.5))
            await user.ended.wait()
        assert user.end_reason == "no_media"
        assert "first_media_in" in user.timings
        assert user.timings["ended"] - user.timings["last_media_in"] >= 0.6
    finally:
        if media:
            await media.close()
        await user.close()


async def test_script_speaks_after_hearing_speech_then_hangs_up():
    player = AudioPlayerTrack()
    script = UserScript(
        (WaitForSpeech(silence_ms=250, min_speech_ms=100), Say("yes"), Pause(0.1), HangUp())
    )
    user = SimulatedUser("15551005", script)
    media = None
    try:
        async with asyncio.timeout(15):
            media = await _call(user, outbound_track=player)
            await asyncio.sleep(0.5)  # the user must not speak first
            assert user.said == []
            greeting_done = await player.play(tone(0.4, freq=300))
            loud = 0
            with pytest.raises(Exception) as ended:
                while True:
                    frame = await media.recv()
                    loud += level_dbfs(frame_to_mono(frame)) > -40
            await user.ended.wait()
        assert "ended" in str(ended.value)
        assert [s.utterance for s in user.said] == ["yes"]
        assert user.said[0].start >= greeting_done + 0.23
        assert user.said[0].end is not None and user.said[0].end - user.said[0].start > 1.5
        assert loud * 20 >= 1000  # we received most of the 1.67 s utterance
        assert user.end_reason == "hangup"
        assert media.end_reason == "closed"
        assert [what for _, what in user.log][:3] == ["answered", "heard speech", "saying yes"]
    finally:
        if media:
            await media.close()
        await user.close()


async def test_recording_helpers_find_each_burst_of_speech():
    player = AudioPlayerTrack()
    user = SimulatedUser("15551006", UserScript.silent())
    media = None
    try:
        async with asyncio.timeout(10):
            media = await _call(user, outbound_track=player)
            await asyncio.sleep(0.3)
            first_start = time.monotonic()
            await player.play(tone(0.3))
            await asyncio.sleep(0.5)
            await player.play(tone(0.4, freq=660))
            await asyncio.sleep(0.4)
        segments = user.speech_segments()
        assert len(segments) == 2
        assert 200 <= segments[0].duration_ms <= 500 and 300 <= segments[1].duration_ms <= 600
        assert segments[1].start - segments[0].end > 0.4
        assert first_start < user.first_audible_at() < first_start + 0.5
        assert 600 <= user.audible_ms() <= 800
        heard = user.heard_audio()
        assert heard.dtype.name == "int16" and len(heard) > 48000
        assert all(len(chunk) == 960 for _, chunk in user.heard_frames())
        # Joining across the gap turns them into one.
        assert len(user.speech_segments(max_gap_ms=800)) == 1
    finally:
        if media:
            await media.close()
        await user.close()


@pytest.mark.slow
async def test_default_script_is_the_demo_conversation():
    player = AudioPlayerTrack()
    user = SimulatedUser("15551007")  # default script
    media = None
    try:
        async with asyncio.timeout(20):
            media = await _call(user, outbound_track=player)
            await player.play(tone(0.6, freq=350))  # the AI's greeting
            while len(user.said) < 1 or user.said[0].end is None:
                await media.recv()
            await player.play(tone(0.5, freq=500))  # the AI's reply
            await user.ended.wait()
        assert [s.utterance for s in user.said] == ["hello", "goodbye"]
        assert user.end_reason == "hangup"
        assert len(user.speech_segments()) == 2
    finally:
        if media:
            await media.close()
        await user.close()
