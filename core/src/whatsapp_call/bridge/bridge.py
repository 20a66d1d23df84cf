"""The audio bridge: one call's WebRTC audio <-> one `VoiceSession`, both ways, with metrics.

Inbound: each decoded frame from `media.recv()` is brought to PCM16 mono at the session's
rate (`CallMedia` decodes straight to it when Opus can; otherwise down-mixed and resampled) and sent at once (20 ms chunks: batching more would only add latency).
Outbound: the session's events drive the `PlayoutTrack` that aiortc's sender pulls from.
`run()` returns why the call's audio ended: "media_ended", "end_call", "voice_error: ..."
or "stopped".
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import av

from ..errors import MediaError, WhatsAppCallError
from ..voice import VoiceEvent, VoiceEventType, VoiceSession
from .metrics import LatencyStats
from .playout import PlayoutTrack
from .resample import FrameToPcm

log = logging.getLogger(__name__)


class AudioSource(Protocol):
    async def recv(self) -> av.AudioFrame: ...


class AudioBridge:
    """Pumps one call's audio both ways until the media or the session ends.

    media: anything with `async recv() -> av.AudioFrame` (CallMedia, an aiortc remote track).
    on_transcript(role, text, at) and on_event(name, data) may be plain or async callables.
    inbound_batch_ms: send caller audio to the session in chunks of at least this many ms.
    goodbye_timeout: after END_CALL, the longest wait for the goodbye audio to finish playing.
    goodbye_settle: after END_CALL, how long no new audio must arrive before the goodbye is
    considered complete (the backend may announce END_CALL before its last audio delta).
    """

    def __init__(
        self,
        media: AudioSource,
        playout: PlayoutTrack,
        session: VoiceSession,
        *,
        on_transcript: Callable[[str, str, datetime], Any] | None = None,
        on_event: Callable[[str, dict], Any] | None = None,
        inbound_batch_ms: int = 20,
        goodbye_timeout: float = 15.0,
        goodbye_settle: float = 0.3,
    ):
        rate = getattr(session, "sample_rate", 24000)
        if playout.sample_rate != rate:
            raise MediaError(
                f"The voice session speaks {rate} Hz audio but the playout track expects "
                f"{playout.sample_rate} Hz.",
                "Create the track with PlayoutTrack(sample_rate=session.sample_rate).",
            )
        self._media = media
        self._playout = playout
        self._session = session
        self._on_transcript = on_transcript
        self._on_event = on_event
        self._batch_bytes = max(1, rate * inbound_batch_ms // 1000) * 2
        self._goodbye_timeout = goodbye_timeout
        self._goodbye_settle = goodbye_settle
        self._to_pcm = FrameToPcm(rate)
        self._tasks: list[asyncio.Task] = []
        self._done: asyncio.Future[str] | None = None
        self._stopped = False
        self._running = False
        self._end_call: asyncio.Task | None = None
        self._response_done = True
        self._interrupted: deque[str] = deque(maxlen=16)
        # metrics
        self._created = time.monotonic()
        self._started_at: float | None = None
        self._first_in: float | None = None
        self._greet_at: float | None = None
        self._greet_latency_ms: float | None = None
        self._speech_stopped_at: float | None = None
        self._turns: list[dict] = []
        self._barge_ins: list[dict] = []
        self._in_frames = 0
        self._in_bytes = 0
        self._out_bytes = 0
        self._in_us = LatencyStats()
        self._send_us = LatencyStats()
        self._end_reason: str | None = None
        playout.on_audio_start = self._audio_started

    # ---- public --------------------------------------------------------------------------

    async def run(self) -> str:
        """Bridge until the media ends, the AI ends the call, the session fails, or stop()."""
        if self._running:
            raise MediaError(
                "AudioBridge.run() is already running.",
                "Run each bridge once; create a new AudioBridge for another call.",
            )
        self._running = True
        if self._stopped:
            return "stopped"
        self._done = asyncio.get_running_loop().create_future()
        self._started_at = time.monotonic()
        self._spawn(self._pump_inbound(), "bridge-inbound")
        self._spawn(self._pump_events(), "bridge-events")
        try:
            reason = await self._done
        finally:
            await self._cancel_all()
        self._end_reason = reason
        self._emit("bridge_ended", {"reason": reason})
        return reason

    async def greet(self, text: str) -> None:
        """Have the backend speak `text` now (call once the caller is listening)."""
        self._greet_at = time.monotonic()
        await self._session.greet(text)

    async def stop(self) -> None:
        """Cancel the pumps (idempotent); run() returns "stopped". The media and the session
        stay open: their owner closes them."""
        self._stopped = True
        self._finish("stopped")
        await self._cancel_all()

    @property
    def metrics(self) -> dict:
        """JSON-able: first audio each way, per-turn response latency, bridge processing
        time, playout pacing (late/dropped frames, underruns, playout delay), barge-ins."""
        p = self._playout
        started = self._started_at or self._created

        def rel(t: float | None) -> float | None:
            return None if t is None else round((t - started) * 1e3, 1)

        latencies = [t["response_latency_ms"] for t in self._turns]
        return {
            "end_reason": self._end_reason,
            "first_inbound_audio_ms": rel(self._first_in),
            "first_outbound_audio_ms": rel(p.first_audio_at),
            "first_outbound_frame_ms": rel(p.first_frame_at),
            "greeting_latency_ms": self._greet_latency_ms,
            "inbound": {
                "frames": self._in_frames,
                "audio_ms": self._in_bytes * 1000 // (2 * self._to_pcm.rate),
                "processing_us": self._in_us.summary(),
                "send_audio_us": self._send_us.summary(),
            },
            "outbound": {
                "audio_ms_received": self._out_bytes * 1000 // (2 * p.sample_rate),
                **p.stats(),
            },
            "turns": list(self._turns),
            "response_latency_ms": {
                "count": len(latencies),
                "mean": round(sum(latencies) / len(latencies), 1) if latencies else None,
                "max": max(latencies) if latencies else None,
            },
            "barge_ins": list(self._barge_ins),
        }

    # ---- pumps ---------------------------------------------------------------------------

    async def _pump_inbound(self) -> str:
        recv = self._media.recv
        convert = self._to_pcm.convert
        send = self._session.send_audio
        batch = bytearray()
        batch_bytes = self._batch_bytes
        while True:
            try:
                frame = await recv()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # MediaError, aiortc MediaStreamError, closed transport
                log.info("inbound media ended: %s", type(err).__name__)
                return "media_ended"
            t0 = time.perf_counter()
            if self._first_in is None:
                self._first_in = time.monotonic()
            pcm = convert(frame)
            self._in_frames += 1
            self._in_bytes += len(pcm)
            if batch or len(pcm) < batch_bytes:
                batch += pcm
                if len(batch) < batch_bytes:
                    continue
                pcm = bytes(batch)
                batch.clear()
            t1 = time.perf_counter()
            self._in_us.add((t1 - t0) * 1e6)
            try:
                await send(pcm)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                return self._voice_error(err)
            self._send_us.add((time.perf_counter() - t1) * 1e6)

    async def _pump_events(self) -> str | None:
        try:
            async for event in self._session.events():
                reason = await self._handle(event)
                if reason is not None:
                    return reason
        except asyncio.CancelledError:
            raise
        except Exception as err:
            return self._voice_error(err)
        if self._end_call is not None:
            return None  # the session closed after END_CALL: let the goodbye finish
        return "voice_error: the voice session closed"

    async def _handle(self, ev: VoiceEvent) -> str | None:
        kind = ev.type
        if kind is VoiceEventType.AUDIO:
            if ev.item_id is not None and ev.item_id in self._interrupted:
                return None  # late deltas of a reply the caller interrupted
            self._response_done = False
            self._out_bytes += len(ev.audio)
            self._playout.write(ev.audio, ev.item_id)
        elif kind is VoiceEventType.SPEECH_STARTED:
            await self._barge_in()
        elif kind is VoiceEventType.SPEECH_STOPPED:
            self._speech_stopped_at = time.monotonic()
            self._emit("speech_stopped", {})
        elif kind is VoiceEventType.RESPONSE_DONE:
            self._response_done = True
            self._playout.flush()
        elif kind is VoiceEventType.TRANSCRIPT:
            if ev.final and ev.text:
                await self._call(self._on_transcript, ev.role or "assistant", ev.text, _now())
        elif kind is VoiceEventType.END_CALL:
            if self._end_call is None:
                self._playout.flush()
                self._emit("end_call", {"reason": ev.text})
                self._end_call = self._spawn(self._finish_goodbye(), "bridge-goodbye")
        elif kind is VoiceEventType.RECONNECTED:
            self._emit("voice_reconnected", {"reason": ev.text})
        elif kind is VoiceEventType.ERROR:
            self._emit("voice_error", {"message": ev.text, "fatal": ev.fatal})
            if ev.fatal:
                return f"voice_error: {ev.text or 'the voice backend failed'}"
        return None

    async def _barge_in(self) -> None:
        t0 = time.perf_counter()
        cut = self._playout.queued_ms
        item, played = self._playout.clear()
        flush_us = (time.perf_counter() - t0) * 1e6
        if item is not None:
            self._interrupted.append(item)
        # Truncate only what the caller really heard part of: skip when nothing of the item
        # played, and when it had finished playing and the backend was done with it
        # (a pointless truncate makes the model repeat itself).
        truncate = item is not None and played > 0 and (cut > 0 or not self._response_done)
        self._barge_ins.append(
            {
                "at_ms": round((time.monotonic() - (self._started_at or self._created)) * 1e3, 1),
                "item_id": item,
                "played_ms": played,
                "dropped_ms": cut,
                "truncated": truncate,
                "flush_us": round(flush_us, 1),
            }
        )
        self._emit("barge_in", {"item_id": item, "played_ms": played, "dropped_ms": cut})
        if truncate:
            assert item is not None
            await self._session.playback_interrupted(item, played)

    async def _finish_goodbye(self) -> str:
        """END_CALL: wait (bounded) until the goodbye has been handed to the sender, then a
        little longer so its last packets reach the caller before the call is torn down."""
        p = self._playout
        requested = time.monotonic()
        deadline = requested + self._goodbye_timeout
        while time.monotonic() < deadline:
            last = p.last_write_at or 0.0
            if p.queued_ms == 0 and time.monotonic() - max(last, requested) >= self._goodbye_settle:
                break
            await asyncio.sleep(0.02)
        else:
            log.info(
                "goodbye audio still queued after %.0f s; ending anyway", self._goodbye_timeout
            )
        await asyncio.sleep(0.1)
        return "end_call"

    # ---- helpers -------------------------------------------------------------------------

    def _audio_started(self, at: float, item_id: str | None) -> None:
        if self._greet_at is not None and self._greet_latency_ms is None and at >= self._greet_at:
            self._greet_latency_ms = round((at - self._greet_at) * 1e3, 1)
        if self._speech_stopped_at is not None:
            latency = round((at - self._speech_stopped_at) * 1e3, 1)
            self._speech_stopped_at = None
            self._turns.append({"item_id": item_id, "response_latency_ms": latency})
            self._emit("turn", {"item_id": item_id, "response_latency_ms": latency})

    def _spawn(self, coro: Any, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        err = task.exception()
        if err is not None:
            log.error("audio bridge task %s failed", task.get_name(), exc_info=err)
            self._finish(f"bridge_error: {type(err).__name__}: {err}")
        elif task.result() is not None:
            self._finish(task.result())

    def _finish(self, reason: str) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(reason)

    def _voice_error(self, err: Exception) -> str:
        message = err.message if isinstance(err, WhatsAppCallError) else str(err)
        log.warning("voice session failed: %s", message or type(err).__name__)
        return f"voice_error: {message or type(err).__name__}"

    def _emit(self, name: str, data: dict) -> None:
        if self._on_event is None:
            return
        try:
            result = self._on_event(name, data)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                task.add_done_callback(_log_failure)
        except Exception:
            log.exception("on_event(%s) failed", name)

    @staticmethod
    async def _call(fn: Callable | None, *args: Any) -> None:
        if fn is None:
            return
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("bridge callback failed")

    async def _cancel_all(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current and not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _now() -> datetime:
    return datetime.now(UTC)


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("on_event callback failed", exc_info=task.exception())
