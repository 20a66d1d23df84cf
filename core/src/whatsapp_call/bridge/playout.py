"""What the caller hears: voice-backend audio re-framed into 20 ms WebRTC frames on the media clock.

The backend (OpenAI Realtime) sends replies in irregular chunks, faster than real time. The
track queues them and aiortc's sender pulls one 20 ms frame per `recv()`; `recv()` sleeps
until that frame is due on an absolute clock (like aiortc's `AudioStreamTrack`), so a backlog
plays at real time and idle time is filled with silence: WhatsApp drops a call after 20-30 s
without media, so silence flows from the first `recv()` (the moment DTLS is up).

Latency: audio written into an empty queue leaves with the next frame, at most 20 ms later.
If the pacing loop falls behind (a stalled event loop), it does not send a burst of overdue
frames forever: more than `max_lag` behind, it skips the overdue frame slots (the receiver
sees a gap in RTP timestamps and conceals it) and drops the same span of queued audio.

Barge-in: `clear()` empties the queue at once (the next frame is silence) and says how many ms
of the current reply item were really handed to the sender, for `playback_interrupted`.

Encoding (the default whenever the backend's rate is one Opus takes): the track encodes Opus
itself with libopus (`media.opus`: mono, straight from the backend's 24 kHz, no resampling, no
thread hop, one C call, a cached packet for steady silence) and hands aiortc ready `av.Packet`s, which the sender only packetises. That
skips aiortc's hand-off of every frame to a thread pool, its stereo encoder and its pure-Python
audio-level loop: 25-40% less CPU per call (`bench.bridge_bench`, modes frames vs opus). The
level of each frame (RFC 6464, dBov) is computed here with numpy instead and put on the RTP
packet by `media.sender.carry_audio_level`. `encoded=False` hands aiortc 48 kHz frames instead
(a backend at a rate Opus cannot take, e.g. 44.1 kHz, gets this automatically).
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from ..errors import MediaError
from ..media.opus import RATES as OPUS_RATES
from ..media.opus import OpusEncoder
from .metrics import LatencyStats
from .resample import PcmResampler

log = logging.getLogger(__name__)

PTIME = 0.020  # seconds per frame
RTP_RATE = 48000  # Opus RTP clock, whatever the encoder's input rate
RTP_FRAME = 960
RTP_TIME_BASE = fractions.Fraction(1, RTP_RATE)
OPUS_INPUT_RATES = OPUS_RATES
_SILENCE_SETTLE_FRAMES = 8  # silent frames before the encoder's output is steady enough to cache
_ITEMS_REMEMBERED = 32
_MAX_HOLD_FRAMES = 2  # how long a partial frame may wait for the rest of its reply


class _Segment:
    __slots__ = ("item_id", "samples", "pos")

    def __init__(self, item_id: str | None, samples: np.ndarray):
        self.item_id = item_id
        self.samples = samples
        self.pos = 0


class PlayoutTrack(MediaStreamTrack):
    """An aiortc audio track fed by `write()`: 20 ms frames, paced, silence on underrun.

    sample_rate: the rate of the PCM16 mono audio given to `write()` (the voice session's).
    encoded: emit Opus packets encoded here instead of raw frames (see the module docstring);
        None (the default) encodes whenever `sample_rate` is one Opus takes.
    opus_bitrate: bits/s of that encoder (mono voice; WhatsApp offers cap around 20-32 kbit/s).
    max_lag: how far behind the media clock the pacing may fall before it skips frames.
    """

    kind = "audio"

    def __init__(
        self,
        *,
        sample_rate: int = 24000,
        encoded: bool | None = None,
        opus_bitrate: int = 32000,
        max_lag: float = 0.060,
    ):
        super().__init__()
        if encoded is None:
            encoded = sample_rate in OPUS_INPUT_RATES
        if encoded and sample_rate not in OPUS_INPUT_RATES:
            raise MediaError(
                f"PlayoutTrack(encoded=True) cannot encode Opus from {sample_rate} Hz audio.",
                f"Use a voice session rate in {OPUS_INPUT_RATES}, or encoded=False.",
            )
        self.sample_rate = sample_rate
        self.encoded = encoded
        self.max_lag = max_lag
        # queued samples are at the encoder's input rate (encoded) or at 48 kHz (frames)
        self._rate = sample_rate if encoded else RTP_RATE
        self._frame_samples = self._rate // 50
        self._resampler = None if encoded else PcmResampler(sample_rate, RTP_RATE)
        self._carry = b""  # odd trailing byte (encoded mode; the resampler keeps its own)
        self._writing_item: str | None = None
        self._writing_open = False  # the item being written may still grow (not flushed)
        self._held = 0  # consecutive frames a partial frame was held back
        self._queue: deque[_Segment] = deque()
        self._queued = 0  # samples in the queue
        self._buf = np.zeros(self._frame_samples, dtype=np.int16)
        # per item: samples consumed (played, or dropped by catch-up) and samples received
        self._played: OrderedDict[str | None, int] = OrderedDict()
        self._received: OrderedDict[str | None, int] = OrderedDict()
        self._last_item: str | None = None
        self._last_was_audio = False
        self._starved_item: str | None = None
        self._start: float | None = None
        self._index = 0
        self._pending_write_at: float | None = None  # write into an empty queue, not yet played
        self.last_write_at: float | None = None
        self.audio_level: int | None = None
        """RFC 6464 level of the frame last returned by `recv()` in dBov (-127 silence .. 0),
        encoded mode only (aiortc computes its own for frames)."""
        self.on_audio_start: Callable[[float, str | None], None] | None = None
        """Called (monotonic time, item_id) when a frame of audio leaves after silence or a
        new item starts: turn latency and first-audio metrics hang off this."""

        # counters (read through `stats()`)
        self.frames = 0
        self.audio_frames = 0
        self.late_frames = 0
        self.dropped_frames = 0
        self.underruns = 0
        self.clears = 0
        self.first_frame_at: float | None = None
        self.first_audio_at: float | None = None
        self.write_us = LatencyStats()
        self.frame_us = LatencyStats()
        self.playout_delay_ms = LatencyStats()

        if encoded:
            self._encoder = OpusEncoder(sample_rate, bitrate=opus_bitrate)
            self._silent_run = 0
            self._silence_packet: bytes | None = None

    # ---- feeding -------------------------------------------------------------------------

    def write(self, pcm16_24k: bytes, item_id: str | None = None) -> None:
        """Queue backend audio (PCM16 mono at `sample_rate`) for reply `item_id`."""
        if not pcm16_24k:
            return
        t0 = time.perf_counter()
        if item_id != self._writing_item:
            self.flush()  # the previous item's tail belongs to it, not to this one
            self._writing_item = item_id
        if self._resampler is not None:
            samples = self._resampler.resample(pcm16_24k)
        else:
            pcm = self._carry + pcm16_24k if self._carry else pcm16_24k
            self._carry = pcm[-1:] if len(pcm) % 2 else b""
            samples = np.frombuffer(pcm, dtype=np.int16, count=len(pcm) // 2).copy()
        n_in = len(pcm16_24k) // 2
        self._remember(self._received, item_id, self._received.get(item_id, 0) + n_in)
        self.last_write_at = time.monotonic()
        self._writing_open = True
        self._enqueue(item_id, samples)
        self.write_us.add((time.perf_counter() - t0) * 1e6)

    def flush(self) -> None:
        """The current item is complete (its response is done): queue the resampler's last
        fraction of a millisecond now instead of with the next item."""
        if self._resampler is not None:
            tail = self._resampler.flush()
            if self._queued:  # else the item has finished playing: its tail is stale
                self._enqueue(self._writing_item, tail)
        self._carry = b""
        self._writing_open = False

    def _enqueue(self, item_id: str | None, samples: np.ndarray) -> None:
        if not len(samples):
            return
        if self._queued == 0:
            # added latency is measured once the media clock runs (before, the call is
            # still connecting and nothing could play)
            self._pending_write_at = time.monotonic() if self._start is not None else None
            if self._starved_item is not None and item_id == self._starved_item:
                self.underruns += 1  # the item ran dry mid-way and now continues
            self._starved_item = None
        self._queue.append(_Segment(item_id, samples))
        self._queued += len(samples)

    def clear(self) -> tuple[str | None, int]:
        """Barge-in: drop all queued audio now. Returns the item being played (or the last
        one played, when nothing is queued) and how many ms of it were handed to the sender."""
        item = self._queue[0].item_id if self._queue else self._last_item
        played = self.played_ms(item)
        self._queue.clear()
        self._queued = 0
        self._pending_write_at = None
        self._starved_item = None
        self._carry = b""
        self._writing_open = False
        self._held = 0
        if self._resampler is not None:
            self._resampler.reset()
        self.clears += 1
        return item, played

    def played_ms(self, item_id: str | None) -> int:
        """ms of `item_id` consumed so far, never more than was received for it."""
        played = self._played.get(item_id, 0) * 1000 // self._rate
        received = self._received.get(item_id, 0) * 1000 // self.sample_rate
        return min(played, received)

    @property
    def queued_ms(self) -> int:
        return self._queued * 1000 // self._rate

    # ---- aiortc side ---------------------------------------------------------------------

    async def recv(self) -> av.AudioFrame | av.Packet:
        """aiortc's track interface: the next paced frame (an Opus `av.Packet` in encoded
        mode, a 48 kHz `av.AudioFrame` otherwise)."""
        await self._pace()
        out = self._timed_next()
        if self.encoded:
            return self._packet(out, self._index * RTP_FRAME)  # type: ignore[arg-type]
        return out  # type: ignore[return-value]

    async def recv_opus(self) -> tuple[bytes, int]:
        """Encoded mode: the next paced Opus packet and its RTP timestamp (48 kHz clock),
        with `audio_level` set, and no `av.Packet` around it (`media.rtp_fast` sends it
        as it is; aiortc would only unwrap it again)."""
        if not self.encoded:
            raise MediaError(
                "recv_opus() needs a PlayoutTrack in encoded mode.", "Use recv() for frames."
            )
        await self._pace()
        return self._timed_next(), self._index * RTP_FRAME  # type: ignore[return-value]

    async def _pace(self) -> None:
        """Wait until the next frame is due on the media clock; skip frames when too late."""
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
            self.first_frame_at = now
            return
        self._index += 1
        behind = now - (self._start + self._index * PTIME)
        if behind < 0:
            await asyncio.sleep(-behind)
            if self.readyState != "live":
                raise MediaStreamError
        elif behind > PTIME / 2:
            self.late_frames += 1
            if behind >= self.max_lag:
                skip = int(behind / PTIME)
                self._index += skip
                self.dropped_frames += skip
                self._consume(skip * self._frame_samples, None)
                log.debug("playout fell %.0f ms behind: skipped %d frames", behind * 1e3, skip)

    def _timed_next(self) -> av.AudioFrame | bytes:
        t0 = time.perf_counter()
        out = self._next_frame()
        self.frame_us.add((time.perf_counter() - t0) * 1e6)
        return out

    def _next_frame(self) -> av.AudioFrame | bytes:
        buf = self._buf
        item = None
        has_audio = self._queued > 0
        if has_audio and self._queued < self._frame_samples and self._writing_open:
            # Less than a frame of a reply that is still arriving (a backend streaming at
            # real time): wait a frame or two for the rest rather than click on a padded
            # frame; the delay it adds becomes a cushion against the next late chunk.
            if self._held < _MAX_HOLD_FRAMES:
                if self._held == 0:
                    self.underruns += 1
                self._held += 1
                has_audio = False
        was_held, self._held = self._held, (self._held if not has_audio else 0)
        if has_audio:
            item = self._queue[0].item_id
            got = self._consume(self._frame_samples, buf)
            if got < self._frame_samples:
                buf[got:] = 0
                if not was_held:  # else already counted when it was held
                    self._starved_item = self._last_item  # ran dry inside this frame
            now = time.monotonic()
            if self._pending_write_at is not None:
                self.playout_delay_ms.add((now - self._pending_write_at) * 1e3)
                self._pending_write_at = None
            self.audio_frames += 1
            if self.first_audio_at is None:
                self.first_audio_at = now
            if (not self._last_was_audio or item != self._last_item) and self.on_audio_start:
                try:
                    self.on_audio_start(now, item)
                except Exception:  # a metrics hook must never break the media path
                    log.exception("on_audio_start hook failed")
        elif self._last_was_audio and not self._held:
            self._starved_item = self._last_item
        self._last_was_audio = has_audio
        self.frames += 1
        pts = self._index * RTP_FRAME
        if self.encoded:
            return self._encode(buf, has_audio)
        if not has_audio:
            buf[:] = 0
        frame = av.AudioFrame(format="s16", layout="mono", samples=RTP_FRAME)
        frame.planes[0].update(buf)
        frame.pts = pts
        frame.sample_rate = RTP_RATE
        frame.time_base = RTP_TIME_BASE
        return frame

    def _consume(self, n: int, into: np.ndarray | None) -> int:
        """Take up to `n` samples off the queue (copied into `into` unless None), crediting
        each item; returns how many were taken."""
        got = 0
        queue = self._queue
        while got < n and queue:
            seg = queue[0]
            take = min(n - got, len(seg.samples) - seg.pos)
            if into is not None:
                into[got : got + take] = seg.samples[seg.pos : seg.pos + take]
            seg.pos += take
            got += take
            item = seg.item_id
            self._remember(self._played, item, self._played.get(item, 0) + take)
            self._last_item = item
            if seg.pos >= len(seg.samples):
                queue.popleft()
        self._queued -= got
        return got

    def _encode(self, buf: np.ndarray, has_audio: bool) -> bytes:
        if not has_audio:
            self._silent_run += 1
            self.audio_level = SILENCE_DBOV
            if self._silence_packet is not None and self._silent_run > _SILENCE_SETTLE_FRAMES:
                return self._silence_packet
            buf[:] = 0
        else:
            self._silent_run = 0
            self.audio_level = audio_level_dbov(buf)
        data = self._encoder.encode(buf)
        if self._silent_run == _SILENCE_SETTLE_FRAMES:
            self._silence_packet = data  # the encoder's own steady-state silence
        return data

    @staticmethod
    def _packet(data: bytes, pts: int) -> av.Packet:
        packet = av.Packet(data)
        packet.pts = pts
        packet.time_base = RTP_TIME_BASE
        return packet

    @staticmethod
    def _remember(table: OrderedDict, item: str | None, value: int) -> None:
        table[item] = value
        table.move_to_end(item)
        if len(table) > _ITEMS_REMEMBERED:
            table.popitem(last=False)

    def stats(self) -> dict:
        """JSON-able playout counters and timings (µs for processing, ms for delays)."""
        return {
            "mode": "opus" if self.encoded else "frames",
            "frames": self.frames,
            "audio_frames": self.audio_frames,
            "silence_frames": self.frames - self.audio_frames,
            "late_frames": self.late_frames,
            "dropped_frames": self.dropped_frames,
            "underruns": self.underruns,
            "clears": self.clears,
            "queued_ms": self.queued_ms,
            "write_us": self.write_us.summary(),
            "frame_us": self.frame_us.summary(),
            "playout_delay_ms": self.playout_delay_ms.summary(),
        }


SILENCE_DBOV = -127
_FULL_SCALE_POWER = 32767.0 * 32767.0


def audio_level_dbov(samples: np.ndarray) -> int:
    """RFC 6464 / 6465 Appendix A audio level of PCM16 samples: rounded dBov in [-127, 0]
    (the same formula as aiortc's `compute_audio_level_dbov`, in one numpy call)."""
    x = samples.astype(np.float64)
    power = float(np.dot(x, x)) / (len(x) * _FULL_SCALE_POWER) if len(x) else 0.0
    if power <= 0.0:
        return SILENCE_DBOV
    return round(min(0.0, max(float(SILENCE_DBOV), 10.0 * math.log10(power))))
