"""libopus through ctypes (`whatsapp_call.media.opus`): what the media path encodes and
decodes with, checked against PyAV's own libopus codec."""

from __future__ import annotations

import av
import numpy as np
import pytest
from whatsapp_call.errors import MediaError
from whatsapp_call.media import opus
from whatsapp_call_sim.audio import load_utterance


def tone(freq: float, rate: int, seconds: float = 1.0, amp: int = 8000) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


def test_the_library_loads_and_says_its_version():
    assert opus.version().startswith("libopus ")
    assert "opus" in opus.loaded_from()


@pytest.mark.parametrize("rate", opus.RATES)
def test_a_tone_round_trips_at_every_opus_rate(rate):
    encoder, decoder = opus.OpusEncoder(rate), opus.OpusDecoder(rate)
    frame = rate // 50
    pcm = tone(440, rate)
    out = []
    for i in range(0, len(pcm), frame):
        packet = encoder.encode(pcm[i : i + frame])
        assert 0 < len(packet) < 200  # 32 kbit/s: ~80 bytes per 20 ms
        decoded = decoder.decode(packet)
        assert (decoded.format.name, decoded.layout.name) == ("s16", "mono")
        assert decoded.sample_rate == rate and decoded.samples == frame
        out.append(decoded.to_ndarray()[0])
    steady = np.concatenate(out)[rate // 5 :]
    assert peak_hz(steady, rate) == pytest.approx(440, abs=5)
    assert np.abs(steady).max() == pytest.approx(8000, rel=0.15)


def test_pyav_decodes_our_packets_and_we_decode_pyavs():
    """Both sides of a call use libopus; ours must interoperate with aiortc's (PyAV)."""
    ours = opus.OpusEncoder(48000)
    theirs = av.CodecContext.create("libopus", "r")
    pcm = tone(1000, 48000, 0.5)
    got = []
    for i in range(0, len(pcm), 960):
        for frame in theirs.decode(av.Packet(ours.encode(pcm[i : i + 960]))):
            got.append(frame.to_ndarray().reshape(-1)[:: len(frame.layout.channels)])
    assert peak_hz(np.concatenate(got)[4800:], 48000) == pytest.approx(1000, abs=5)

    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = 48000, "stereo", "s16"
    encoder.bit_rate = 64000
    decoder = opus.OpusDecoder(24000)  # a stereo-coded 48 kHz stream, to mono 24 kHz
    stereo = np.repeat(pcm, 2).reshape(1, -1)
    mono = []
    for i in range(len(pcm) // 960):
        frame = av.AudioFrame.from_ndarray(
            stereo[:, i * 1920 : (i + 1) * 1920].copy(), format="s16", layout="stereo"
        )
        frame.sample_rate, frame.pts = 48000, i * 960
        mono += [decoder.decode(bytes(p)).to_ndarray()[0] for p in encoder.encode(frame)]
    assert peak_hz(np.concatenate(mono)[2400:], 24000) == pytest.approx(1000, abs=5)


def test_concealment_continues_the_voice_then_fades():
    encoder, decoder = opus.OpusEncoder(24000), opus.OpusDecoder(24000)
    pcm = tone(300, 24000, 0.4)
    for i in range(0, len(pcm), 480):
        last = decoder.decode(encoder.encode(pcm[i : i + 480])).to_ndarray()[0]
    levels = [np.abs(decoder.decode(None, 480).to_ndarray()[0]).max() for _ in range(12)]
    assert levels[0] > 0.5 * np.abs(last).max()  # the first lost frame sounds like the voice
    assert levels[-1] < 0.5 * levels[0]  # and a long gap fades out


def test_bitrate_sets_the_packet_size():
    pcm = tone(440, 24000, 0.5) + np.random.default_rng(1).integers(-2000, 2000, 12000).astype(
        np.int16
    )
    sizes = {}
    for bitrate in (16000, 64000):
        encoder = opus.OpusEncoder(24000, bitrate=bitrate)
        sizes[bitrate] = sum(len(encoder.encode(pcm[i : i + 480])) for i in range(0, len(pcm), 480))
    assert sizes[64000] > 2 * sizes[16000]


def test_a_corrupt_packet_is_a_clear_error():
    decoder = opus.OpusDecoder(24000)
    with pytest.raises(opus.OpusError, match="corrupted stream"):
        decoder.decode(b"\xff\xff\xff")
    assert decoder.decode(opus.OpusEncoder(24000).encode(np.zeros(480, np.int16))).samples == 480


def test_a_rate_opus_does_not_take_names_the_rates_it_does():
    with pytest.raises(MediaError, match="44100 Hz") as err:
        opus.OpusEncoder(44100)
    assert "24000" in err.value.hint
    with pytest.raises(MediaError, match="decode at 22050"):
        opus.OpusDecoder(22050)


def test_no_libopus_anywhere_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(opus, "_candidates", lambda: ["/nonexistent/libopus.so.0"])
    opus.libopus.cache_clear()
    try:
        with pytest.raises(MediaError, match="libopus was not found") as err:
            opus.libopus()
        assert "libopus0" in err.value.hint
    finally:
        monkeypatch.undo()
        opus.libopus.cache_clear()
    assert opus.version()  # loads again for the rest of the suite


def test_in_band_fec_rebuilds_a_lost_frame_far_better_than_concealment():
    """The caller's encoder sends FEC when our offer says useinbandfec=1: the packet after a
    loss carries a coarse copy of the lost frame."""
    pcm = load_utterance("hello")[::2].astype(np.int16)  # speech, 24 kHz
    pcm = pcm[: len(pcm) // 480 * 480]
    encoder = opus.OpusEncoder(24000, fec_loss_percent=10)
    packets = [encoder.encode(pcm[i : i + 480]) for i in range(0, len(pcm), 480)]
    assert opus.OpusDecoder(24000).has_fec(packets[20]) in (True, None)
    lost = set(range(10, len(packets) - 2, 7))

    def decode(rebuild: bool) -> np.ndarray:
        decoder, out = opus.OpusDecoder(24000), []
        for i, packet in enumerate(packets):
            if i in lost:
                frame = decoder.decode(packets[i + 1] if rebuild else None, 480, fec=rebuild)
            else:
                frame = decoder.decode(packet)
            out.append(frame.to_ndarray()[0].astype(np.float64))
        return np.concatenate(out)

    clean_decoder = opus.OpusDecoder(24000)
    reference = np.concatenate(
        [clean_decoder.decode(p).to_ndarray()[0].astype(np.float64) for p in packets]
    )

    def snr_db(signal: np.ndarray) -> float:
        idx = np.concatenate([np.arange(i * 480, (i + 1) * 480) for i in sorted(lost)])
        err = signal[idx] - reference[idx]
        return float(10 * np.log10((reference[idx] ** 2).sum() / ((err**2).sum() + 1e-9)))

    assert snr_db(decode(True)) > snr_db(decode(False)) + 6
