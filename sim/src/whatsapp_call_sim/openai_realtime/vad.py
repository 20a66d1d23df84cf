"""An energy-based stand-in for OpenAI's server VAD, on the session's own audio clock.

The real server runs a neural voice-activity model; the simulator maps each 10 ms frame's
loudness to a "speech probability" (-60 dBFS -> 0, -20 dBFS -> 1), so the session's
`threshold` keeps its meaning (0.5 = -40 dBFS; raise it for noisy lines). Times are in ms of
appended audio since the session began, as in `audio_start_ms` / `audio_end_ms`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 24_000
FRAME_MS = 10
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000
MIN_SPEECH_MS = 40  # voiced audio needed before a start is declared (ignores clicks)


def speech_probability(frame: np.ndarray) -> float:
    """Loudness of one frame mapped to 0..1, the scale of the session's `threshold`."""
    rms = float(np.sqrt(np.mean(frame.astype(np.float64) ** 2))) + 1e-9
    dbfs = 20 * np.log10(rms / 32768)
    return float(np.clip((dbfs + 60) / 40, 0.0, 1.0))


@dataclass
class VadEvent:
    kind: str  # "started" | "stopped"
    audio_ms: int  # audio_start_ms (with prefix padding) or audio_end_ms (with the silence window)
    speech_ms: int = 0  # for "stopped": length of the speech itself, first to last voiced frame


class EnergyVad:
    """Feed PCM16 24 kHz chunks of any size; get speech start/stop events in audio time."""

    def __init__(
        self, threshold: float = 0.5, prefix_padding_ms: int = 300, silence_duration_ms: int = 500
    ):
        self.threshold = threshold
        self.prefix_padding_ms = prefix_padding_ms
        self.silence_duration_ms = silence_duration_ms
        self._rest = b""
        self._clock_ms = 0  # end of the last analysed frame
        self._in_speech = False
        self._onset_ms: int | None = None  # first voiced frame of the current (candidate) speech
        self._voiced_ms = 0
        self._last_voiced_end = 0

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    def feed(self, pcm: bytes) -> list[VadEvent]:
        data = self._rest + pcm
        usable = len(data) - len(data) % (FRAME_SAMPLES * 2)
        self._rest = data[usable:]
        samples = np.frombuffer(data[:usable], dtype="<i2")
        events: list[VadEvent] = []
        for start in range(0, len(samples), FRAME_SAMPLES):
            voiced = speech_probability(samples[start : start + FRAME_SAMPLES]) >= self.threshold
            frame_start = self._clock_ms
            self._clock_ms += FRAME_MS
            event = self._step(voiced, frame_start)
            if event is not None:
                events.append(event)
        return events

    def _step(self, voiced: bool, frame_start: int) -> VadEvent | None:
        if voiced:
            if self._onset_ms is None:
                self._onset_ms, self._voiced_ms = frame_start, 0
            self._voiced_ms += FRAME_MS
            self._last_voiced_end = self._clock_ms
            if not self._in_speech and self._voiced_ms >= MIN_SPEECH_MS:
                self._in_speech = True
                return VadEvent("started", max(0, self._onset_ms - self.prefix_padding_ms))
            return None
        silent_for = self._clock_ms - self._last_voiced_end
        if self._in_speech and silent_for >= self.silence_duration_ms:
            self._in_speech = False
            speech_ms = self._last_voiced_end - (self._onset_ms or 0)
            self._onset_ms = None
            return VadEvent("stopped", self._last_voiced_end + self.silence_duration_ms, speech_ms)
        if not self._in_speech and self._onset_ms is not None and silent_for > MIN_SPEECH_MS:
            self._onset_ms = None  # a click, not speech
        return None


def speech_duration_ms(pcm: bytes, threshold: float = 0.5) -> int | None:
    """Length of the speech in a clip, measured the way the VAD measures a turn."""
    vad = EnergyVad(threshold=threshold, prefix_padding_ms=0, silence_duration_ms=1000)
    events = vad.feed(pcm + bytes(SAMPLE_RATE * 3))  # trailing silence ends the turn
    stops = [e for e in events if e.kind == "stopped"]
    if len(stops) != 1:
        return None
    return stops[0].speech_ms
