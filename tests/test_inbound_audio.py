"""The inbound audio path without a network: real Opus RTP packets -> LowLatencyAudioBuffer
(decodes to mono) -> FrameToPcm (PCM16 mono 24 kHz), as the bridge hands it to a session."""

from __future__ import annotations

import asyncio

import av
import numpy as np
import pytest
from aiortc.rtp import RtpPacket
from whatsapp_call.bridge.resample import FrameToPcm
from whatsapp_call.media.jitter import LowLatencyAudioBuffer
from whatsapp_call.media.opus import OpusEncoder

RATE = 48000


def sine(freq: float, seconds: float, amp: int = 8000, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


def amplitude_at(samples: np.ndarray, freq: float, rate: int) -> float:
    """Amplitude of one sine component (Hann-windowed spectrum peak near `freq`)."""
    window = np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * window))
    k = round(freq * len(samples) / rate)
    return float(spectrum[k - 3 : k + 4].max() * 2 / window.sum())


def opus_packets(channels: list[np.ndarray], bit_rate: int = 64000) -> list[RtpPacket]:
    """RTP packets of 20 ms Opus frames coded with one channel per array (mono or stereo)."""
    layout = "mono" if len(channels) == 1 else "stereo"
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = RATE, layout, "s16"
    encoder.bit_rate = bit_rate
    interleaved = np.stack(channels, axis=1).reshape(1, -1)
    n = len(channels)
    payloads: list[bytes] = []
    for i in range(len(channels[0]) // 960):
        chunk = interleaved[:, i * 960 * n : (i + 1) * 960 * n].copy()
        frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout=layout)
        frame.sample_rate, frame.pts = RATE, i * 960
        payloads += [bytes(p) for p in encoder.encode(frame)]
    packets = []
    for i, payload in enumerate(payloads):
        packet = RtpPacket(payload_type=111, sequence_number=(65000 + i) & 0xFFFF)
        packet.timestamp = (4294960000 + i * 960) & 0xFFFFFFFF
        packet.payload = packet._data = payload
        packets.append(packet)
    return packets


class Path:
    """LowLatencyAudioBuffer -> FrameToPcm, recording both the frames and the PCM."""

    def __init__(self, decode_rate: int = RATE) -> None:
        self.frames: list[av.AudioFrame] = []
        self.pcm = bytearray()
        self.to_pcm = FrameToPcm(24000)
        self.buffer = LowLatencyAudioBuffer(self._deliver, max_wait=0.03, rate=decode_rate)

    def _deliver(self, frame: av.AudioFrame) -> None:
        self.frames.append(frame)
        self.pcm += self.to_pcm.convert(frame)

    def samples(self) -> np.ndarray:
        return np.frombuffer(bytes(self.pcm), dtype=np.int16)


def test_a_tone_comes_out_as_24khz_mono_at_its_frequency_and_level():
    path = Path()
    for packet in opus_packets([sine(440, 1.0)]):
        path.buffer.add(packet)
    assert {(f.format.name, f.layout.name, f.sample_rate) for f in path.frames} == {
        ("s16", "mono", 48000)
    }
    pts = [f.pts for f in path.frames]
    assert pts[0] == 0 and np.all(np.diff(pts) == 960)  # across the RTP timestamp wrap
    pcm = path.samples()
    assert len(pcm) == pytest.approx(len(path.frames) * 480, abs=32)  # no backlog builds up
    steady = pcm[4800:]
    assert peak_hz(steady, 24000) == pytest.approx(440, abs=3)
    assert amplitude_at(steady, 440, 24000) == pytest.approx(8000, rel=0.1)
    assert path.buffer.stats.frames == len(path.frames) and path.buffer.stats.lost == 0


def test_decoding_at_the_backend_rate_leaves_nothing_to_resample():
    """The production path: libopus decodes straight to 24 kHz and FrameToPcm passes the
    frames through byte for byte; the tone arrives as at 48 kHz + resampling."""
    path, reference = Path(decode_rate=24000), Path()
    packets = opus_packets([sine(440, 1.0)])
    for packet in packets:
        path.buffer.add(packet)
        reference.buffer.add(packet)
    assert {(f.format.name, f.layout.name, f.sample_rate) for f in path.frames} == {
        ("s16", "mono", 24000)
    }
    assert [f.pts for f in path.frames] == [f.pts for f in reference.frames]  # RTP clock
    direct = b"".join(bytes(f.planes[0])[: f.samples * 2] for f in path.frames)
    assert bytes(path.pcm) == direct  # passed through, no filter in between
    pcm = path.samples()
    assert len(pcm) == len(packets) * 480  # no resampler delay either
    assert peak_hz(pcm[4800:], 24000) == pytest.approx(440, abs=3)
    assert amplitude_at(pcm[4800:], 440, 24000) == pytest.approx(
        amplitude_at(reference.samples()[4800:], 440, 24000), rel=0.05
    )


def test_a_rate_opus_cannot_decode_to_falls_back_to_48khz():
    path = Path(decode_rate=44100)
    for packet in opus_packets([sine(440, 0.2)]):
        path.buffer.add(packet)
    assert path.buffer.rate == 48000 and path.frames[0].sample_rate == 48000


def test_a_corrupt_packet_is_counted_lost_and_the_stream_goes_on():
    path = Path(decode_rate=24000)
    packets = opus_packets([sine(440, 0.2)])
    packets[3].payload = packets[3]._data = b"\xff\xff\xff"  # a code-3 packet cut short
    for packet in packets:
        path.buffer.add(packet)
    assert path.buffer.stats.lost == 1
    assert path.buffer.stats.frames == len(packets) - 1


def test_stereo_coded_packets_are_mixed_down_to_mono():
    """A peer may send stereo Opus: libopus decodes it to (L + R) / 2."""
    path = Path()
    for packet in opus_packets([sine(440, 1.0), sine(1000, 1.0)], bit_rate=96000):
        path.buffer.add(packet)
    assert {f.layout.name for f in path.frames} == {"mono"}
    steady = path.samples()[4800:]
    assert amplitude_at(steady, 440, 24000) == pytest.approx(4000, rel=0.1)
    assert amplitude_at(steady, 1000, 24000) == pytest.approx(4000, rel=0.1)


async def test_a_lost_packet_is_concealed_on_the_pcm_timeline():
    path = Path()
    packets = opus_packets([sine(440, 0.4)])
    for packet in packets[:10]:
        path.buffer.add(packet)
    for packet in packets[11:13]:  # packet 10 never comes
        path.buffer.add(packet)
    await asyncio.sleep(0.08)  # past the buffer's wait: 10 is given up and concealed
    for packet in packets[13:]:
        path.buffer.add(packet)
    stats = path.buffer.stats
    assert stats.lost == 1 and stats.concealed == 1
    assert [f.pts for f in path.frames] == [i * 960 for i in range(len(packets))]
    concealed = path.frames[10]
    assert concealed.layout.name == "mono" and concealed.samples == 960
    # libopus's concealment continues the voice (same pitch, about the same level)
    samples = concealed.to_ndarray()[0]
    assert peak_hz(samples, RATE) == pytest.approx(440, abs=30)
    gain = np.abs(samples).max() / np.abs(path.frames[9].to_ndarray()).max()
    assert 0.5 < gain < 1.1
    assert np.abs(path.frames[9].to_ndarray()).max() > 6000  # and that frame left intact
    assert len(path.samples()) == pytest.approx(len(packets) * 480, abs=32)
    path.buffer.close()


@pytest.mark.parametrize("fec", [True, False])
async def test_a_lost_packet_is_rebuilt_from_the_next_packets_fec(fec):
    """A caller that sends in-band FEC (our offer asks for it): the lost frame comes back
    from the packet after it; without FEC in that packet, libopus conceals it."""
    encoder = OpusEncoder(48000, fec_loss_percent=10 if fec else 0)
    tone = sine(440, 0.4)
    packets = []
    for i in range(len(tone) // 960):
        packet = RtpPacket(payload_type=111, sequence_number=100 + i, timestamp=i * 960)
        packet.payload = packet._data = encoder.encode(tone[i * 960 : (i + 1) * 960])
        packets.append(packet)
    path = Path(decode_rate=24000)
    for packet in packets[:10]:
        path.buffer.add(packet)
    for packet in packets[11:13]:  # packet 10 never comes
        path.buffer.add(packet)
    await asyncio.sleep(0.06)  # past the buffer's wait
    for packet in packets[13:]:
        path.buffer.add(packet)
    path.buffer.close()
    stats = path.buffer.stats
    assert stats.lost == 1 and stats.concealed == 1 and stats.fec_recovered == int(fec)
    rebuilt = path.frames[10].to_ndarray()[0]
    assert rebuilt.shape == (480,) and peak_hz(rebuilt, 24000) == pytest.approx(440, abs=60)
    assert [f.pts for f in path.frames] == [i * 960 for i in range(len(packets))]


@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_frame_to_pcm_matches_pyav_audio_resampler(layout):
    """Same filter graph as av.AudioResampler, driven by hand: the same bytes come out."""
    src = sine(1000, 0.5)
    data = src if layout == "mono" else np.repeat(src, 2)
    n = 1 if layout == "mono" else 2
    ours = FrameToPcm(24000, expect=("s16", layout, RATE))
    reference = av.AudioResampler(format="s16", layout="mono", rate=24000)
    warm = av.AudioFrame(format="s16", layout=layout, samples=480)
    for plane in warm.planes:
        plane.update(bytes(plane.buffer_size))
    warm.sample_rate = RATE
    reference.resample(warm)  # FrameToPcm warms its graph the same way
    got, want = bytearray(), bytearray()
    for i in range(len(src) // 960):
        chunk = data[i * 960 * n : (i + 1) * 960 * n].reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout=layout)
        frame.sample_rate = RATE
        got += ours.convert(frame)
        for out in reference.resample(frame):
            want += bytes(out.planes[0])[: out.samples * 2]
    assert bytes(got) == bytes(want)


@pytest.mark.parametrize("frame_ms", [2.5, 10, 20, 60])
def test_frame_to_pcm_delay_is_under_a_millisecond_for_any_frame_size(frame_ms):
    """The resampler must add next to no latency: a click comes out < 1 ms late, and the
    output keeps pace with the input (nothing is held back frame after frame)."""
    to_pcm = FrameToPcm(24000)
    size = int(RATE * frame_ms / 1000)
    signal = np.zeros(RATE // 2, dtype=np.int16)
    signal[9600] = 30000  # at 200 ms
    out = bytearray()
    for i in range(len(signal) // size):
        frame = av.AudioFrame.from_ndarray(
            signal[i * size : (i + 1) * size].reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = RATE
        out += to_pcm.convert(frame)
        assert len(out) // 2 >= (i + 1) * size // 2 - 24  # < 1 ms behind after every frame
    pcm = np.frombuffer(bytes(out), dtype=np.int16)
    delay_ms = (int(np.argmax(np.abs(pcm))) - 4800) / 24
    assert 0 <= delay_ms < 1


def test_frame_to_pcm_follows_a_change_of_layout_and_rate():
    to_pcm = FrameToPcm(24000)
    for layout, rate in (("mono", 48000), ("stereo", 48000), ("mono", 16000)):
        n = 1 if layout == "mono" else 2
        tone = np.repeat(sine(500, 0.2, rate=rate), n).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(tone, format="s16", layout=layout)
        frame.sample_rate = rate
        pcm = np.frombuffer(to_pcm.convert(frame), dtype=np.int16)
        assert len(pcm) == pytest.approx(4800, abs=32)
        assert peak_hz(pcm[1000:], 24000) == pytest.approx(500, abs=10)
