"""The callee's phone: a real aiortc WebRTC peer that answers like WhatsApp does.

It refuses offers WhatsApp would refuse (`SdpRejected`), answers with `a=setup:active`
(WhatsApp is the DTLS client), a sha-256 fingerprint only, Opus only, host candidates on
`host_addresses`, and (by default) `a=ice-lite` like Meta. It then talks: a `UserScript`
of explicit steps plays the shipped WAV utterances at scripted moments, and everything it
hears is recorded (48 kHz mono int16 with arrival times) so tests can assert on speech
segments and timings. It enforces WhatsApp's media timers: the call ends with
`end_reason="no_media"` after `start_media_timeout` s without inbound media at the start and
`media_timeout` s of silence on the wire mid-call.

`light_media=True` (opt-in, for load generation in benchmarks) makes a user much cheaper: it
plays its utterances as Opus packets encoded once per process (no per-frame encoding, level
computation or thread hand-off) and hears by the RFC 6464 audio level of each received packet
instead of decoding it. Its scripts behave the same; `heard_audio()` is then silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from whatsapp_call.bridge.playout import SILENCE_DBOV, audio_level_dbov
from whatsapp_call.media import ice
from whatsapp_call.media.opus import OpusEncoder
from whatsapp_call.media.peer import opus_only
from whatsapp_call.media.sdp import offer_problems, whatsapp_answer

from .audio import SAMPLE_RATE, frame_to_mono, level_dbfs, load_utterance

log = logging.getLogger(__name__)

FRAME_SAMPLES = SAMPLE_RATE // 50  # 20 ms
DEFAULT_SPEECH_DBFS = -45.0  # louder than this counts as audible (Opus silence is ~-90 dBFS)


class SdpRejected(ValueError):
    """The offer is one WhatsApp would refuse; the message says why."""


# -- the script -----------------------------------------------------------------------------
@dataclass(frozen=True)
class WaitForSpeech:
    """Wait until the other side has spoken (at least `min_speech_ms` of audible audio since
    this step began) and then been quiet for `silence_ms`. After `timeout` s the step gives
    up and the script goes on, as a person who hears nothing would."""

    silence_ms: int = 700
    min_speech_ms: int = 200
    timeout: float = 20.0


@dataclass(frozen=True)
class Say:
    """Play a shipped utterance ("hello", "yes", "goodbye") or a WAV path; returns when the
    last sample has been sent."""

    utterance: str


@dataclass(frozen=True)
class Pause:
    seconds: float


@dataclass(frozen=True)
class HangUp:
    pass


Step = WaitForSpeech | Say | Pause | HangUp


@dataclass(frozen=True)
class UserScript:
    """What the user does once the call is connected, step by step."""

    steps: tuple[Step, ...] = ()

    @classmethod
    def default(cls) -> UserScript:
        """Hear the AI's greeting, say hello, hear the reply, say goodbye, hear the AI's
        goodbye (it may hang up first), hang up."""
        return cls(
            (
                WaitForSpeech(),
                Say("hello"),
                WaitForSpeech(),
                Say("goodbye"),
                WaitForSpeech(timeout=8.0),
                HangUp(),
            )
        )

    @classmethod
    def silent(cls) -> UserScript:
        """Pick up and listen; never speak or hang up (the other side ends the call)."""
        return cls(())


@dataclass(frozen=True)
class SpeechSegment:
    """Audible audio heard between `start` and `end` (time.monotonic())."""

    start: float
    end: float

    @property
    def duration_ms(self) -> float:
        return (self.end - self.start) * 1000


@dataclass
class Spoken:
    """An utterance the user said: when it started and (once done) finished being sent."""

    utterance: str
    start: float
    end: float | None = None


# -- outbound audio ---------------------------------------------------------------------------
class AudioPlayerTrack(MediaStreamTrack):
    """An audio track paced by the clock: 20 ms 48 kHz mono frames of whatever was queued
    with `play()`, silence otherwise (a phone keeps sending media while nobody talks)."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[tuple[np.ndarray, asyncio.Future[float]]] = deque()
        self._pos = 0
        self._start: float | None = None
        self._timestamp = 0

    def play(self, samples: np.ndarray) -> asyncio.Future[float]:
        """Queue 48 kHz mono int16 `samples`; the future resolves (with the monotonic time)
        once the last of them has been handed to the encoder."""
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._queue.append((np.asarray(samples, dtype=np.int16), done))
        return done

    def clear(self) -> None:
        """Stop playing: drop everything queued."""
        while self._queue:
            _, done = self._queue.popleft()
            if not done.done():
                done.set_result(time.monotonic())
        self._pos = 0

    @property
    def playing(self) -> bool:
        return bool(self._queue)

    async def _next_slot(self) -> None:
        """Wait until the next 20 ms frame is due on this track's media clock."""
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._timestamp += FRAME_SAMPLES
            wait = self._start + self._timestamp / SAMPLE_RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        await self._next_slot()
        out = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        filled = 0
        while filled < FRAME_SAMPLES and self._queue:
            samples, done = self._queue[0]
            take = min(FRAME_SAMPLES - filled, len(samples) - self._pos)
            out[filled : filled + take] = samples[self._pos : self._pos + take]
            filled += take
            self._pos += take
            if self._pos >= len(samples):
                self._queue.popleft()
                self._pos = 0
                if not done.done():
                    done.set_result(time.monotonic())
        frame = av.AudioFrame.from_ndarray(out.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._timestamp
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        return frame


# -- light media: pre-encoded outbound, level-only inbound (opt-in) --------------------------------
OPUS_SILENCE = b"\xf8\xff\xfe"  # one 20 ms CELT frame of silence
_OPUS_BITRATE = 32000
_encoded: dict[bytes, list[tuple[bytes, int]]] = {}  # samples -> (Opus packet, dBov) per frame


def opus_packets(samples: np.ndarray) -> list[tuple[bytes, int]]:
    """48 kHz mono int16 `samples` as 20 ms Opus packets with each frame's level, encoded
    once per process and cached (the shipped utterances are replayed over and over)."""
    key = np.asarray(samples, dtype=np.int16).tobytes()
    cached = _encoded.get(key)
    if cached is not None:
        return cached
    encoder = OpusEncoder(SAMPLE_RATE, bitrate=_OPUS_BITRATE)
    padded = np.zeros(-(-len(samples) // FRAME_SAMPLES) * FRAME_SAMPLES, dtype=np.int16)
    padded[: len(samples)] = samples
    levels, data = [], []
    for i in range(0, len(padded), FRAME_SAMPLES):
        chunk = padded[i : i + FRAME_SAMPLES]
        levels.append(audio_level_dbov(chunk))
        data.append(encoder.encode(chunk))
    out = list(zip(data, levels, strict=True))
    _encoded[key] = out
    return out


class EncodedPlayerTrack(AudioPlayerTrack):
    """`AudioPlayerTrack` that hands aiortc ready Opus packets (`opus_packets`) and says each
    one's level in `audio_level`, for `whatsapp_call.media.sender.carry_audio_level`."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_level: int | None = SILENCE_DBOV

    def play(self, samples: np.ndarray) -> asyncio.Future[float]:
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._queue.append((opus_packets(samples), done))  # type: ignore[arg-type]
        return done

    async def recv(self) -> av.Packet:  # type: ignore[override]
        if self.readyState != "live":
            raise MediaStreamError
        await self._next_slot()
        data, self.audio_level = OPUS_SILENCE, SILENCE_DBOV
        if self._queue:
            packets, done = self._queue[0]
            data, self.audio_level = packets[self._pos]  # type: ignore[index]
            self._pos += 1
            if self._pos >= len(packets):
                self._queue.popleft()
                self._pos = 0
                if not done.done():
                    done.set_result(time.monotonic())
        packet = av.Packet(data)
        packet.pts = self._timestamp
        packet.time_base = fractions.Fraction(1, SAMPLE_RATE)
        return packet


class LevelOnlyReceiver:
    """Stands in for an aiortc receiver's jitter buffer: notes each RTP packet's RFC 6464
    level and hands nothing on to decode."""

    capacity = 16

    def __init__(self, on_level: Any) -> None:
        self.on_level = on_level

    def add(self, packet: Any) -> tuple[bool, None]:
        level = packet.extensions.audio_level  # (voice activity, -dBov) or None
        self.on_level(-float(level[1]) if level is not None else float(SILENCE_DBOV))
        return False, None


_SILENT_FRAME = np.zeros(FRAME_SAMPLES, dtype=np.int16)
_SILENT_FRAME.setflags(write=False)


# -- what the user hears ------------------------------------------------------------------------
@dataclass
class _Heard:
    chunks: list[np.ndarray] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # arrival of each chunk (end of it)
    levels: list[float] = field(default_factory=list)  # dBFS of each chunk
    loud_total: float = 0.0  # ms of audible audio so far
    last_loud_at: float | None = None


class SimulatedUser:
    """The callee's phone: answers one offer, talks per `script`, records what it hears.

    `ice_lite` adds `a=ice-lite` like Meta's answer (our side must stay controlling);
    `dtls_setup` is "active" like WhatsApp, or "passive" to test the other DTLS role.
    """

    def __init__(
        self,
        wa_id: str,
        script: UserScript | None = None,
        host_addresses: Sequence[str] = ("127.0.0.1",),
        *,
        ice_lite: bool = True,
        dtls_setup: str = "active",
        start_media_timeout: float = 20.0,
        media_timeout: float = 30.0,
        speech_dbfs: float = DEFAULT_SPEECH_DBFS,
        light_media: bool = False,
    ) -> None:
        if dtls_setup not in ("active", "passive"):
            raise ValueError("dtls_setup must be 'active' or 'passive'")
        self.wa_id = wa_id
        self.script = script if script is not None else UserScript.default()
        self.host_addresses = tuple(host_addresses)
        self.ice_lite = ice_lite
        self.dtls_setup = dtls_setup
        self.start_media_timeout = start_media_timeout
        self.media_timeout = media_timeout
        self.speech_dbfs = speech_dbfs
        self.ended = asyncio.Event()
        self.end_reason: str | None = None
        self.timings: dict[str, float] = {}
        self.said: list[Spoken] = []
        self.log: list[tuple[float, str]] = []  # (monotonic time, what happened)
        self.light_media = light_media
        self.player = EncodedPlayerTrack() if light_media else AudioPlayerTrack()
        self._heard = _Heard()
        self._pc: RTCPeerConnection | None = None
        self._connected = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._shutdown_task: asyncio.Future[None] | None = None
        self._vanished = False

    def __repr__(self) -> str:
        return f"SimulatedUser(wa_id={self.wa_id!r}, end_reason={self.end_reason!r})"

    # -- signalling -------------------------------------------------------------------------
    async def answer(self, offer_sdp: str) -> str:
        """Answer `offer_sdp` the way WhatsApp does; raises `SdpRejected` with the reasons
        when WhatsApp would refuse the offer."""
        if self._pc is not None:
            raise RuntimeError(f"{self!r} already answered a call")
        problems = offer_problems(offer_sdp)
        if problems:
            raise SdpRejected("; ".join(problems))
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._pc = pc

        @pc.on("track")
        def _on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._tasks.append(asyncio.ensure_future(self._listen(track)))

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:  # aiortc raises ValueError and friends for bad SDP
            await pc.close()
            raise SdpRejected(f"the offer could not be applied: {exc}") from None
        pc.addTrack(self.player)
        transceiver = pc.getTransceivers()[0]
        opus_only(transceiver)
        if self.light_media:
            self._use_light_media(transceiver)
        dtls = transceiver.sender.transport
        if self.dtls_setup == "passive":
            # aiortc answers setup:active unless the transport's role is preset (private API;
            # only this simulator needs the passive case, to test our DTLS client role).
            dtls._set_role("server")

        @dtls.on("statechange")
        def _dtls_state() -> None:
            if dtls.state == "connected":
                self.timings.setdefault("connected", time.monotonic())
                self._connected.set()
            elif dtls.state == "failed":
                self._end("dtls_failed")

        @pc.on("connectionstatechange")
        def _conn_state() -> None:
            if pc.connectionState == "failed":
                self._end("ice_failed")

        answer = await pc.createAnswer()
        with ice.host_addresses(self.host_addresses):
            await pc.setLocalDescription(answer)
        sdp = whatsapp_answer(pc.localDescription.sdp, ice_lite=self.ice_lite)
        self.timings["answered"] = time.monotonic()
        self._note("answered")
        self._tasks.append(asyncio.ensure_future(self._media_timers()))
        self._tasks.append(asyncio.ensure_future(self._run_script()))
        return sdp

    async def wait_connected(self, timeout: float) -> None:
        """Return once DTLS is up; raise TimeoutError, or RuntimeError if the call ended."""
        async with asyncio.timeout(timeout):
            ended = asyncio.ensure_future(self.ended.wait())
            connected = asyncio.ensure_future(self._connected.wait())
            try:
                await asyncio.wait({ended, connected}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
                connected.cancel()
        if not self._connected.is_set():
            raise RuntimeError(f"call ended before connecting: {self.end_reason}")

    async def hangup(self) -> None:
        """The user ends the call (RTCP BYE and DTLS close go out)."""
        self._end("hangup")
        await self._shutdown()

    async def close(self) -> None:
        """Tear down (e.g. the business terminated the call). Idempotent."""
        self._end("closed")
        await self._shutdown()

    async def vanish(self) -> None:
        """The phone drops off the network mid-call: no goodbye, no BYE, nothing more is
        sent or received. The other side must notice by itself."""
        self._vanished = True
        self.player.stop()
        if self._pc is not None:
            for transceiver in self._pc.getTransceivers():
                connection = transceiver.sender.transport.transport._connection
                for protocol in connection._protocols:  # black-hole the UDP sockets
                    protocol.datagram_received = lambda data, addr: None

                    async def _drop(data: bytes, addr: Any) -> None:
                        return None

                    protocol.send_data = _drop
                    protocol.send_stun = lambda message, addr: None
        self._end("vanished")

    # -- what was heard ------------------------------------------------------------------------
    def heard_audio(self) -> np.ndarray:
        """Everything heard so far, 48 kHz mono int16."""
        if not self._heard.chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(self._heard.chunks)

    def heard_frames(self) -> list[tuple[float, np.ndarray]]:
        """(arrival time, samples) per received frame."""
        return list(zip(self._heard.times, self._heard.chunks, strict=True))

    def speech_segments(
        self, threshold_dbfs: float | None = None, min_ms: float = 100, max_gap_ms: float = 300
    ) -> list[SpeechSegment]:
        """Stretches of audible audio (frames louder than `threshold_dbfs`), joined across
        pauses up to `max_gap_ms`, at least `min_ms` long. Times are time.monotonic()."""
        threshold = self.speech_dbfs if threshold_dbfs is None else threshold_dbfs
        segments: list[list[float]] = []
        for t, level, chunk in zip(
            self._heard.times, self._heard.levels, self._heard.chunks, strict=True
        ):
            if level <= threshold:
                continue
            start = t - len(chunk) / SAMPLE_RATE
            if segments and start - segments[-1][1] <= max_gap_ms / 1000:
                segments[-1][1] = t
            else:
                segments.append([start, t])
        return [SpeechSegment(s, e) for s, e in segments if (e - s) * 1000 >= min_ms]

    def first_audible_at(self, threshold_dbfs: float | None = None) -> float | None:
        """time.monotonic() when audible audio first arrived (None: nothing audible yet)."""
        threshold = self.speech_dbfs if threshold_dbfs is None else threshold_dbfs
        for t, level, chunk in zip(
            self._heard.times, self._heard.levels, self._heard.chunks, strict=True
        ):
            if level > threshold:
                return t - len(chunk) / SAMPLE_RATE
        return None

    def audible_ms(self, threshold_dbfs: float | None = None) -> float:
        """Total ms of audible audio heard."""
        threshold = self.speech_dbfs if threshold_dbfs is None else threshold_dbfs
        return sum(
            len(c) * 1000 / SAMPLE_RATE
            for c, level in zip(self._heard.chunks, self._heard.levels, strict=True)
            if level > threshold
        )

    # -- internals ------------------------------------------------------------------------------
    def _note(self, what: str) -> None:
        self.log.append((time.monotonic(), what))

    def _end(self, reason: str) -> None:
        if self.ended.is_set():
            return
        self.end_reason = reason
        self.timings["ended"] = time.monotonic()
        self._note(f"ended: {reason}")
        log.info("simulated user %s: call ended (%s)", self.wa_id, reason)
        self.ended.set()
        if self._shutdown_task is None and reason != "vanished":
            self._shutdown_task = asyncio.ensure_future(self._close_pc())

    async def _shutdown(self) -> None:
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.ensure_future(self._close_pc())
        await asyncio.shield(self._shutdown_task)

    async def _close_pc(self) -> None:
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for task in self._tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self.player.clear()
        if self._pc is not None:
            with contextlib.suppress(Exception):
                await self._pc.close()

    async def _listen(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                samples = frame_to_mono(await track.recv())
                self._note_heard(samples, level_dbfs(samples))
        except MediaStreamError:
            if not self._vanished:
                self._end("peer_closed")

    def _use_light_media(self, transceiver: Any) -> None:
        """Light media on this transceiver: the sender stamps the pre-encoded packets with
        their level; the receiver notes levels and decodes nothing."""
        from whatsapp_call.media.jitter import install_receive_buffer
        from whatsapp_call.media.sender import carry_audio_level

        carry_audio_level(transceiver.sender)
        install_receive_buffer(transceiver.receiver, LevelOnlyReceiver(self._hear_level))

    def _hear_level(self, level: float) -> None:
        """Light media: one received packet of `level` (dBov ~ dBFS), instead of a decoded
        frame; the chunk kept is a shared silent frame, so only its length counts."""
        self._note_heard(_SILENT_FRAME, level)

    def _note_heard(self, samples: np.ndarray, level: float) -> None:
        """Record one received chunk of audio (48 kHz mono) and its level."""
        heard = self._heard
        now = time.monotonic()
        heard.chunks.append(samples)
        heard.times.append(now)
        heard.levels.append(level)
        self.timings.setdefault("first_media_in", now)
        self.timings["last_media_in"] = now
        if level > self.speech_dbfs:
            heard.loud_total += len(samples) * 1000 / SAMPLE_RATE
            heard.last_loud_at = now

    async def _media_timers(self) -> None:
        """WhatsApp's rules: no media `start_media_timeout` s into the call, or none for
        `media_timeout` s mid-call, and the call is dropped."""
        poll = min(0.05, self.start_media_timeout / 20, self.media_timeout / 20)
        while not self.ended.is_set():
            await asyncio.sleep(poll)
            now = time.monotonic()
            last = self.timings.get("last_media_in")
            if last is None:
                if now - self.timings["answered"] > self.start_media_timeout:
                    self._end("no_media")
            elif now - last > self.media_timeout:
                self._end("no_media")

    async def _run_script(self) -> None:
        try:
            await self.wait_connected(self.start_media_timeout)
        except (TimeoutError, RuntimeError):
            return  # the media timers end the call
        for step in self.script.steps:
            if self.ended.is_set():
                return
            if isinstance(step, WaitForSpeech):
                await self._wait_for_speech(step)
            elif isinstance(step, Say):
                samples = load_utterance(step.utterance)
                spoken = Spoken(step.utterance, time.monotonic())
                self.said.append(spoken)
                self._note(f"saying {step.utterance}")
                spoken.end = await self.player.play(samples)
            elif isinstance(step, Pause):
                await asyncio.sleep(step.seconds)
            elif isinstance(step, HangUp):
                self._note("hanging up")
                self._end("hangup")
                return

    async def _wait_for_speech(self, step: WaitForSpeech) -> None:
        heard = self._heard
        began = time.monotonic()
        loud_before = heard.loud_total
        while not self.ended.is_set():
            now = time.monotonic()
            spoke = heard.loud_total - loud_before >= step.min_speech_ms
            if (
                spoke
                and heard.last_loud_at is not None
                and now - heard.last_loud_at >= step.silence_ms / 1000
            ):
                self._note("heard speech")
                return
            if now - began > step.timeout:
                self._note("gave up waiting for speech")
                return
            await asyncio.sleep(0.02)


__all__ = [
    "AudioPlayerTrack",
    "EncodedPlayerTrack",
    "HangUp",
    "Pause",
    "Say",
    "SdpRejected",
    "SimulatedUser",
    "SpeechSegment",
    "Spoken",
    "Step",
    "UserScript",
    "WaitForSpeech",
]
