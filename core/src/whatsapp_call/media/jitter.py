"""A low-latency receive path for inbound call audio.

aiortc's audio `RTCRtpReceiver` uses `JitterBuffer(capacity=16, prefetch=4)`: a packet is
released only once four later frames are buffered, so everything the caller says reaches
us at least 80 ms late. Worse, audio has no retransmission, so after a lost packet the
buffer stalls until 16 packets have piled up, drops frames to catch up and keeps that
extra ~300 ms of delay for the rest of the call.

Our consumer is a voice backend, not a loudspeaker: it does not need an evenly paced
playout, it needs each frame as early as possible and in order. `LowLatencyAudioBuffer`
therefore releases a packet the moment it is next in sequence. When one is missing it
holds the packets behind the gap only as long as gaps on this network have recently taken
to fill (its reordering depth, learnt from the last 10 s; 20 ms until a first gap was
seen; at most 100 ms), then skips the missing packet and fills its place so the audio
timeline stays whole: from the next packet's in-band FEC when the caller's encoder sends it
(our offer says `useinbandfec=1`; the frame comes back at ~10 dB SNR instead of ~1), else
with libopus's packet-loss concealment (it continues the voice and fades out).

It decodes Opus itself (`media.opus`), to mono and straight to the voice backend's rate
when Opus can decode to it (24 kHz for OpenAI Realtime): a voice backend hears one
channel, libopus mixes a stereo-coded stream down to it ((L+R)/2) as it decodes, and the
bridge then has no resampling left to do.

It is installed per receiver (`install_receive_buffer`), replacing that one receiver's
buffer object, so other aiortc peers in the same process keep aiortc's behaviour.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import av
from aiortc.rtp import RtpPacket

from .opus import RATES as OPUS_RATES
from .opus import OpusDecoder, OpusError

log = logging.getLogger(__name__)

SAMPLE_RATE = 48_000  # the Opus RTP clock, whatever rate we decode to
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
# aiortc stores the buffer under this (name-mangled) attribute of RTCRtpReceiver.
_RECEIVER_ATTR = "_RTCRtpReceiver__jitter_buffer"
_RESYNC_PACKETS = 1000  # a jump this large is a new stream (sender restart), not loss


@dataclass
class InboundAudioStats:
    """Counters of the receive path; `delays_ms` is RTP arrival -> decoded frame handed on."""

    packets: int = 0
    frames: int = 0  # decoded frames delivered
    concealed: int = 0  # frames synthesised for lost packets
    fec_recovered: int = 0  # of those, rebuilt from the next packet's in-band FEC
    lost: int = 0  # packets skipped because they had not arrived by their deadline
    late: int = 0  # packets that arrived after they were skipped (dropped)
    duplicates: int = 0
    resyncs: int = 0
    delays_ms: deque[float] = field(default_factory=lambda: deque(maxlen=5000))

    COUNTS = (
        "packets",
        "frames",
        "concealed",
        "fec_recovered",
        "lost",
        "late",
        "duplicates",
        "resyncs",
    )

    def counts(self) -> dict[str, int]:
        """The counters alone (cheap: no percentiles)."""
        return {k: getattr(self, k) for k in self.COUNTS}

    def summary(self) -> dict[str, Any]:
        """A flat dict for metrics: counts and p50/p95/p99 of the stack delay in ms."""
        out: dict[str, Any] = self.counts()
        delays = sorted(self.delays_ms)
        for q in (50, 95, 99):
            out[f"delay_p{q}_ms"] = _percentile(delays, q / 100) if delays else None
        return out


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1) + 0.5))]


def _unwrap(value: int, reference: int | None, bits: int) -> int:
    """Extend a wrapping `bits`-bit counter to the value nearest `reference`."""
    if reference is None:
        return value
    span = 1 << bits
    candidate = (reference & ~(span - 1)) | value
    if candidate - reference > span // 2:
        candidate -= span
    elif reference - candidate > span // 2:
        candidate += span
    return candidate


class LowLatencyAudioBuffer:
    """Drop-in for aiortc's audio `JitterBuffer` (same `add(packet)` signature) that decodes
    and hands frames to `deliver` itself, as early as ordering allows.

    How long packets wait behind a gap: the slowest gap fill of the last `memory` seconds
    plus `margin` (packets that came after we gave up count too, so the wait grows until
    it covers them), `initial_wait` before any gap was seen, never more than `max_wait`.
    Event-loop stalls do not inflate it: they delay packets but do not reorder them.
    `max_conceal_frames`: longer gaps are not filled (the timeline then jumps).
    `rate`: the sample rate of the frames handed on (s16 mono; 48 kHz when Opus cannot
    decode to the rate asked for); frame `pts` count in the 48 kHz RTP clock either way.
    """

    def __init__(
        self,
        deliver: Callable[[av.AudioFrame], None],
        *,
        rate: int = SAMPLE_RATE,
        initial_wait: float = 0.02,
        margin: float = 0.004,
        max_wait: float = 0.1,
        memory: float = 10.0,
        max_conceal_frames: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._deliver = deliver
        self._initial_wait = initial_wait
        self._margin = margin
        self._max_wait = max_wait
        self._memory = memory
        self._max_conceal = max_conceal_frames
        self._clock = clock
        self.rate = rate if rate in OPUS_RATES else SAMPLE_RATE
        self._decoder = OpusDecoder(self.rate)
        self._fill_delays: deque[tuple[float, float]] = deque(maxlen=64)  # (when, seconds)
        self._pending: dict[int, tuple[RtpPacket, int, float]] = {}
        self._skipped: dict[int, float] = {}  # seq -> when its gap was first seen
        self._next_seq: int | None = None
        self._max_seq: int | None = None
        self._last_ts: int | None = None  # unwrapped RTP ts of the last frame handed on
        self._last_seq: int | None = None
        self._origin_ts: int | None = None
        self._frame_samples = 960  # RTP clock ticks per packet, as last seen
        self._decoded = False  # concealment needs a decoded frame to continue from
        self._conceal_run = 0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.stats = InboundAudioStats()
        self.first_arrival: float | None = None
        self.last_arrival: float | None = None

    # -- aiortc JitterBuffer interface -------------------------------------------------
    capacity = 16  # for code that inspects aiortc's buffer; unused here

    def add(self, packet: RtpPacket) -> tuple[bool, None]:
        """Called by aiortc's receiver for every depayloaded RTP packet. Returns
        (pli_flag, frame) like `JitterBuffer.add`; frames go to `deliver` instead."""
        if self._closed:
            return False, None
        now = self._clock()
        self.stats.packets += 1
        if self.first_arrival is None:
            self.first_arrival = now
        self.last_arrival = now
        seq = _unwrap(packet.sequence_number, self._max_seq, 16)
        ts = _unwrap(packet.timestamp, self._last_ts, 32)
        if self._next_seq is not None and abs(seq - self._next_seq) > _RESYNC_PACKETS:
            self._resync()
            seq, ts = packet.sequence_number, packet.timestamp
        if self._next_seq is None:
            self._next_seq = seq
            self._origin_ts = ts
        self._max_seq = seq if self._max_seq is None else max(self._max_seq, seq)
        if seq < self._next_seq:
            gap_seen = self._skipped.pop(seq, None)
            if gap_seen is not None:  # we gave up too early: wait longer next time
                self.stats.late += 1
                self._fill_delays.append((now, now - gap_seen))
            else:
                self.stats.duplicates += 1
            return False, None
        if seq in self._pending:
            self.stats.duplicates += 1
            return False, None
        if seq == self._next_seq and self._pending:  # fills a gap: how long did it take?
            self._fill_delays.append((now, now - self._gap_since()))
        self._pending[seq] = (packet, ts, now)
        self._drain()
        return False, None

    def close(self) -> None:
        self._closed = True
        self._cancel_timer()
        self._pending.clear()

    # -- internals ---------------------------------------------------------------------
    def _resync(self) -> None:
        self.stats.resyncs += 1
        self._cancel_timer()
        self._pending.clear()
        self._skipped.clear()
        self._next_seq = self._max_seq = self._last_ts = self._last_seq = None
        self._origin_ts = None

    def _gap_since(self) -> float:
        """When the current gap was noticed: the arrival of the oldest packet behind it."""
        return min(arrival for _, _, arrival in self._pending.values())

    def _wait(self) -> float:
        """How long to hold packets behind a gap: the slowest recent gap fill (reordering
        depth of this network) plus a margin; `initial_wait` until one was seen."""
        now = self._clock()
        recent = [delay for when, delay in self._fill_delays if now - when <= self._memory]
        wait = max(recent) + self._margin if recent else self._initial_wait
        return min(wait, self._max_wait)

    def _drain(self) -> None:
        while not self._closed:
            item = self._pending.pop(self._next_seq, None)  # type: ignore[arg-type]
            if item is not None:
                self._release(self._next_seq, *item)  # type: ignore[arg-type]
                self._next_seq += 1  # type: ignore[operator]
                continue
            if not self._pending:
                self._cancel_timer()
                return
            remaining = self._gap_since() + self._wait() - self._clock()
            if remaining <= 0:
                self._skip_missing()
                continue
            self._cancel_timer()
            self._timer = asyncio.get_running_loop().call_later(remaining, self._on_timer)
            return

    def _on_timer(self) -> None:
        self._timer = None
        self._drain()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None

    def _skip_missing(self) -> None:
        seq: int = self._next_seq  # type: ignore[assignment]
        self.stats.lost += 1
        self._skipped[seq] = self._gap_since()
        if len(self._skipped) > 256:
            for old in [s for s in self._skipped if s < seq - 256]:
                del self._skipped[old]
        if self._last_ts is not None and self._last_seq is not None:
            following = self._pending.get(seq + 1)  # its in-band FEC may hold this frame
            self._conceal(
                self._last_ts + (seq - self._last_seq) * self._frame_samples,
                None if following is None else getattr(following[0], "_data", following[0].payload),
            )
        self._next_seq = seq + 1

    def _conceal(self, ts: int, following: bytes | None = None) -> None:
        """Fill a lost frame: from the in-band FEC of the `following` packet when it is here
        and carries some (the caller's encoder sends it when our offer says useinbandfec=1),
        else libopus's packet-loss concealment."""
        self._conceal_run += 1
        if not self._decoded or self._conceal_run > self._max_conceal:
            return
        samples = self._frame_samples * self.rate // SAMPLE_RATE
        try:
            has_fec = None if following is None else self._decoder.has_fec(following)
            if following is not None and has_fec is not False:  # None: libopus cannot tell
                frame = self._decoder.decode(following, samples, fec=True)
                self.stats.fec_recovered += bool(has_fec)
            else:
                frame = self._decoder.decode(None, samples)
        except OpusError as exc:
            log.warning("inbound Opus concealment failed: %s", exc)
            return
        self._stamp(frame, ts)
        self.stats.concealed += 1
        self._deliver(frame)

    def _release(self, seq: int, packet: RtpPacket, ts: int, arrival: float) -> None:
        if self._last_ts is not None and self._last_seq is not None and seq > self._last_seq:
            step = (ts - self._last_ts) // (seq - self._last_seq)
            if 0 < step <= SAMPLE_RATE // 10 and seq - self._last_seq == 1:
                self._frame_samples = step
        self._last_ts, self._last_seq = ts, seq
        data = getattr(packet, "_data", packet.payload)
        try:
            frame = self._decoder.decode(data)
        except OpusError as exc:
            log.warning("inbound Opus frame failed to decode: %s", exc)
            self.stats.lost += 1
            return
        self._conceal_run = 0
        self._decoded = True
        self._stamp(frame, ts)
        self.stats.frames += 1
        self.stats.delays_ms.append((self._clock() - arrival) * 1000)
        self._deliver(frame)

    def _stamp(self, frame: av.AudioFrame, ts: int) -> None:
        frame.pts = ts - (self._origin_ts or 0)
        frame.time_base = TIME_BASE


class ArrivalTap:
    """Wraps aiortc's own JitterBuffer to note RTP arrival times (dead-peer detection)
    without changing what it does."""

    def __init__(self, inner: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self._inner = inner
        self._clock = clock
        self.first_arrival: float | None = None
        self.last_arrival: float | None = None

    @property
    def capacity(self) -> int:
        return self._inner.capacity

    def add(self, packet: RtpPacket) -> Any:
        now = self._clock()
        if self.first_arrival is None:
            self.first_arrival = now
        self.last_arrival = now
        return self._inner.add(packet)


def install_receive_buffer(receiver: Any, buffer: Any) -> Any:
    """Replace the jitter buffer of this one aiortc `RTCRtpReceiver` and return the old one.

    Raises `RuntimeError` when this aiortc version keeps its buffer elsewhere (callers fall
    back to aiortc's default path rather than failing the call)."""
    old = getattr(receiver, _RECEIVER_ATTR, None)
    if old is None or not callable(getattr(old, "add", None)):
        raise RuntimeError(
            "aiortc's RTCRtpReceiver has no jitter buffer attribute to replace "
            f"(looked for {_RECEIVER_ATTR}); the aiortc version changed"
        )
    setattr(receiver, _RECEIVER_ATTR, buffer)
    return old


def delay_summary(delays_ms: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 and mean of a list of delays in ms (None when empty)."""
    ordered = sorted(delays_ms)
    if not ordered:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    return {
        "p50": _percentile(ordered, 0.50),
        "p95": _percentile(ordered, 0.95),
        "p99": _percentile(ordered, 0.99),
        "mean": statistics.fmean(ordered),
    }
