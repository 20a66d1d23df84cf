"""What the simulated model says and hears.

The simulator can neither synthesise arbitrary speech nor recognise it. Instead:

* **Speaking.** Replies whose text is one of `ASSISTANT_CLIPS` use that recorded clip
  (espeak-ng, 24 kHz mono, shipped in `whatsapp_call_sim/audio/`). Any other text (e.g. a
  greeting from your config) gets speech-like audio cut from those recordings, about as long as
  the text would take to say. It sounds like talking, not like the words.
* **Hearing.** A user turn is "recognised" by the length of its speech: the simulated
  WhatsApp user's shipped utterances (`hello`, `yes`, `goodbye`) each have a distinct length,
  so a turn within `TOLERANCE_MS` of one of them gets that utterance's text. Anything else is
  `UNINTELLIGIBLE`. A test can instead give the simulator a fixed list of transcripts.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from ..audio import AUDIO_DIR, UTTERANCE_TEXT, load_utterance, read_wav
from .vad import SAMPLE_RATE, speech_duration_ms

UNINTELLIGIBLE = "(unintelligible)"
TOLERANCE_MS = 150
MS_PER_CHAR = 62  # espeak-ng at 170 wpm, measured on the shipped clips

#: clip name -> the words spoken in it
ASSISTANT_CLIPS = {
    "assistant_greeting": "Hello! This is your assistant calling.",
    "assistant_hello": "Hi! I am calling for the team.",
    "assistant_yes": "Great, I have noted that.",
    "assistant_goodbye": "Thank you. Goodbye!",
    "assistant_unclear": "Sorry, could you say that again?",
    "assistant_done": "All right, done.",
}
GREETING = ASSISTANT_CLIPS["assistant_greeting"]


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


@lru_cache(maxsize=16)
def _clip(name: str) -> np.ndarray:
    samples, rate = read_wav(AUDIO_DIR / f"{name}.wav")
    if rate != SAMPLE_RATE:
        raise ValueError(f"{name}.wav must be {SAMPLE_RATE} Hz, not {rate}")
    samples.setflags(write=False)
    return samples


@lru_cache(maxsize=64)
def speech_for(text: str) -> bytes:
    """PCM16 24 kHz mono audio for the model saying `text`."""
    for name, words in ASSISTANT_CLIPS.items():
        if _norm(words) == _norm(text):
            return _clip(name).tobytes()
    material = np.concatenate(
        [np.concatenate([_clip(n), np.zeros(SAMPLE_RATE // 10, np.int16)]) for n in ASSISTANT_CLIPS]
    )
    length = max(SAMPLE_RATE // 2, len(text) * MS_PER_CHAR * SAMPLE_RATE // 1000)
    reps = -(-length // len(material))
    out = np.tile(material, reps)[:length].astype(np.float64)
    fade = min(len(out) // 2, SAMPLE_RATE // 100)  # 10 ms fades: no clicks at the cut
    ramp = np.linspace(0.0, 1.0, fade)
    out[:fade] *= ramp
    out[-fade:] *= ramp[::-1]
    return out.astype(np.int16).tobytes()


@lru_cache(maxsize=8)
def _reference_lengths(threshold: float) -> tuple[tuple[str, int], ...]:
    import soxr

    out = []
    for name, text in UTTERANCE_TEXT.items():
        samples = soxr.resample(load_utterance(name), 48_000, SAMPLE_RATE).astype(np.int16)
        ms = speech_duration_ms(samples.tobytes(), threshold)
        if ms is not None:
            out.append((text, ms))
    return tuple(out)


def recognise(speech_ms: int, threshold: float = 0.5) -> str:
    """The transcript of a user turn whose speech lasted `speech_ms` (see module doc)."""
    best = min(
        _reference_lengths(round(threshold, 3)),
        key=lambda ref: abs(ref[1] - speech_ms),
        default=None,
    )
    if best is None or abs(best[1] - speech_ms) > TOLERANCE_MS:
        return UNINTELLIGIBLE
    return best[0]
