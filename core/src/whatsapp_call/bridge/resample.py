"""Sample-rate conversion between WebRTC (48 kHz) and a voice backend (PCM16 mono, 24 kHz).

Both directions use libswresample through PyAV's filter graphs: one C call per chunk does
the down-mix, the format change and a windowed-sinc rate conversion, streaming, with a
constant delay of 16 output samples (0.7 ms). Inbound it costs ~11 µs per 20 ms mono frame,
and is skipped altogether when libopus already decoded at the backend's rate (`media.opus`),
which is the case for every backend rate Opus supports (8/12/16/24/48 kHz).

soxr (1.1.0) was measured for the inbound direction too and is not used. Its streaming mode
holds output back: at HQ/MQ/VHQ it releases ~35 ms blocks (every other 20 ms frame gets
nothing; 21 ms behind on average, 39 ms at worst), at LQ 11 ms on average and 20 ms at
worst, and with `vr=True` a steady 5 ms, where it also costs as much as libswresample
(~38 µs). Only QQ keeps pace, and it has no anti-alias filter (a 15 kHz tone comes out as a
full-level 9 kHz alias).
"""

from __future__ import annotations

import av
import numpy as np

#: what decoded WebRTC audio looks like: our receive buffer's frames, aiortc's decoder's
DECODED_SETUPS = (("s16", "mono", 48000), ("s16", "stereo", 48000))


class FrameToPcm:
    """Inbound: decoded WebRTC frames (any format/layout/rate; our receive buffer gives s16
    mono at the backend's rate, which passes through untouched, or at 48 kHz when Opus
    cannot decode to that rate; aiortc's own decoder s16 stereo 48 kHz) -> PCM16 mono
    little-endian bytes at `rate`.

    A converter is bound to one input setup (format, layout, rate). Building one costs
    0.2-5 ms, so one per `expect` setup is built before the call's first frame, not on it;
    any other setup gets a fresh converter when its first frame comes.
    """

    def __init__(
        self,
        rate: int = 24000,
        expect: tuple[str, str, int] | tuple[tuple[str, str, int], ...] = DECODED_SETUPS,
    ):
        self.rate = rate
        self._native = ("s16", "mono", rate)  # passed through as it is
        setups = [expect] if isinstance(expect[0], str) else expect
        self._spares = {setup: _Converter(setup, rate) for setup in setups}
        self._setup = setups[0]
        self._converter = self._spares.pop(self._setup)  # spares are used once: no stale history

    def convert(self, frame: av.AudioFrame) -> bytes:
        setup = (frame.format.name, frame.layout.name, frame.sample_rate)
        if setup == self._native:  # our receive buffer decodes to the backend's rate
            return memoryview(frame.planes[0])[: frame.samples * 2].tobytes()
        if setup != self._setup:  # the first frame of a setup, or a peer that switches
            self._setup = setup
            self._converter = self._spares.pop(setup, None) or _Converter(setup, self.rate)
        return self._converter.convert(frame)


class _Converter:
    """One input setup -> PCM16 mono bytes at `rate`: the filter graph `av.AudioResampler`
    builds (abuffer -> aformat, libswresample auto-inserted), driven directly with one push
    and one pull per frame. AudioResampler pulls until FFmpeg answers EAGAIN, and raising
    that error costs as much as the conversion (~10 instead of ~20 µs per 20 ms frame).
    libswresample returns each frame's output at once (it lags a constant ~16 samples), so
    a second pull is made only if the output ever falls further behind than that."""

    def __init__(self, setup: tuple[str, str, int], rate: int):
        fmt, layout, in_rate = setup
        graph = av.filter.Graph()
        src = graph.add(
            "abuffer",
            sample_rate=str(in_rate),
            sample_fmt=fmt,
            channel_layout=layout,
            time_base=f"1/{in_rate}",
        )
        to = graph.add("aformat", sample_rates=str(rate), sample_fmts="s16", channel_layouts="mono")
        sink = graph.add("abuffersink")
        src.link_to(to)
        to.link_to(sink)
        graph.configure()
        self._graph = graph  # the filter contexts do not keep their graph alive
        self._push, self._pull = src.push, sink.pull
        self._ratio = (rate, in_rate)
        self._slack = max(64, rate // 250)  # output samples the filter may hold back (~4 ms)
        self._in_samples = self._out_samples = 0
        warm = av.AudioFrame(format=fmt, layout=layout, samples=in_rate // 100)
        for plane in warm.planes:
            plane.update(bytes(plane.buffer_size))
        warm.sample_rate = in_rate
        self.convert(warm)  # the first conversion sets up libswresample

    def convert(self, frame: av.AudioFrame) -> bytes:
        self._push(frame)
        self._in_samples += frame.samples
        out_rate, in_rate = self._ratio
        out = []
        while True:
            try:
                o = self._pull()
            except BlockingIOError:  # FFmpeg's EAGAIN: nothing (more) to take
                break
            self._out_samples += o.samples
            # planes are padded for alignment: only samples * 2 bytes are audio
            out.append(memoryview(o.planes[0])[: o.samples * 2])
            if self._in_samples * out_rate // in_rate - self._out_samples <= self._slack:
                break
        if len(out) == 1:
            return out[0].tobytes()
        return b"".join(out)


class PcmResampler:
    """Outbound: PCM16 mono bytes at `in_rate` -> int16 numpy samples at `out_rate`, streaming
    (state carries across chunks of any length, including odd byte counts).

    The filter graph is built once (it is slow to build, see FrameToPcm). Flushing and
    resetting push 2 ms of zeros through it instead of rebuilding it: that pushes out the
    ~0.7 ms it holds back (flush returns just those samples) and leaves only silence in
    its history.
    """

    def __init__(self, in_rate: int = 24000, out_rate: int = 48000):
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._carry = b""
        self._resampler: av.AudioResampler | None = None
        self._in_total = 0  # samples, to know how many the filter holds back
        self._out_total = 0
        self._skip = 0  # leading output samples that are padding, not audio
        if in_rate != out_rate:
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=out_rate)
            self._pad = bytes(in_rate // 500 * 2)  # 2 ms: more than the filter's reach
            self._push_pad()

    def _held(self) -> int:
        return max(0, self._in_total * self.out_rate // self.in_rate - self._out_total)

    def _push_pad(self) -> np.ndarray:
        """Push silence through; returns the real samples it pushed out."""
        held = self._held() - self._skip
        out = self._run(self._pad)[: max(0, held)]
        self._skip = self._held()  # what the filter holds back now is padding
        return out

    def flush(self) -> np.ndarray:
        """The samples still inside the filter: the end of a reply must not wait for the
        next reply to push it out."""
        self._carry = b""
        if self._resampler is None:
            return np.zeros(0, dtype=np.int16)
        return self._push_pad()

    def reset(self) -> None:
        """Forget buffered input (after a barge-in nothing stale may leak into the next reply)."""
        self.flush()

    def resample(self, pcm: bytes) -> np.ndarray:
        if self._carry:
            pcm = self._carry + pcm
            self._carry = b""
        if len(pcm) % 2:
            self._carry = pcm[-1:]
            pcm = pcm[:-1]
        if not pcm:
            return np.zeros(0, dtype=np.int16)
        if self._resampler is None:
            return np.frombuffer(pcm, dtype=np.int16).copy()
        samples = self._run(pcm)
        if self._skip:
            cut = min(self._skip, len(samples))
            self._skip -= cut
            samples = samples[cut:]
        return samples

    def _run(self, pcm: bytes) -> np.ndarray:
        frame = av.AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2)
        frame.planes[0].update(pcm)
        frame.sample_rate = self.in_rate
        assert self._resampler is not None
        out = self._resampler.resample(frame)
        self._in_total += len(pcm) // 2
        if not out:
            return np.zeros(0, dtype=np.int16)
        if len(out) == 1:
            o = out[0]
            samples = np.frombuffer(o.planes[0], dtype=np.int16, count=o.samples).copy()
        else:
            samples = np.concatenate(
                [np.frombuffer(o.planes[0], dtype=np.int16, count=o.samples) for o in out]
            )
        self._out_total += len(samples)
        return samples
