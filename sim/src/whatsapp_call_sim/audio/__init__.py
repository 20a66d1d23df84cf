"""Short spoken utterances for the simulated WhatsApp user, and WAV helpers.

The WAVs were generated once with espeak-ng and converted with sox to 48 kHz mono 16-bit
(the rate WebRTC's Opus runs at), so nothing at run time needs a speech synthesiser.
"""

from __future__ import annotations

import wave
from functools import lru_cache
from pathlib import Path

import numpy as np

SAMPLE_RATE = 48_000
AUDIO_DIR = Path(__file__).parent

#: name -> the words spoken in that file (for assertions on transcripts in later tests)
UTTERANCE_TEXT = {
    "hello": "Hello? Who is this?",
    "yes": "Yes, that works for me.",
    "goodbye": "Thank you, goodbye.",
}


def utterance_names() -> list[str]:
    return sorted(UTTERANCE_TEXT)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono int16 samples and the sample rate of a 16-bit PCM WAV (stereo is averaged)."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is supported")
        rate = wav.getframerate()
        channels = wav.getnchannels()
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1).astype(np.int16)
    return data, rate


def write_wav(path: str | Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """Write mono int16 samples as a 16-bit PCM WAV (for debugging what a peer heard)."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(np.asarray(samples, dtype=np.int16).tobytes())


@lru_cache(maxsize=16)
def load_utterance(name_or_path: str) -> np.ndarray:
    """48 kHz mono int16 samples of a shipped utterance (by name) or of any WAV file (by path)."""
    path = AUDIO_DIR / f"{name_or_path}.wav"
    if not path.exists():
        path = Path(name_or_path)
    samples, rate = read_wav(path)
    if rate != SAMPLE_RATE:
        import soxr

        samples = soxr.resample(samples, rate, SAMPLE_RATE).astype(np.int16)
    samples.setflags(write=False)
    return samples


def tone(seconds: float, freq: float = 440.0, amplitude: int = 8000) -> np.ndarray:
    """A sine tone, 48 kHz mono int16: an easy, unmistakable signal for tests."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def frame_to_mono(frame) -> np.ndarray:
    """Mono int16 samples of an s16 `av.AudioFrame` (packed or planar; channels averaged)."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        mono = data.mean(axis=0) if channels > 1 else data[0]
    else:
        mono = data.reshape(-1, channels).mean(axis=1) if channels > 1 else data.reshape(-1)
    return np.asarray(mono).astype(np.int16)


def level_dbfs(samples: np.ndarray) -> float:
    """RMS level in dBFS (full scale = 32768); -120 for digital silence."""
    if len(samples) == 0:
        return -120.0
    rms = float(np.sqrt(np.mean(np.square(samples.astype(np.float64)))))
    return 20 * np.log10(rms / 32768) if rms > 0 else -120.0
