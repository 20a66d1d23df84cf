"""The voice-session interface: the seam between a call's audio and an AI voice backend.

A backend plugin (OpenAI Realtime, an echo backend, a local model, Gemini Live...) returns a
`VoiceSession` from the `open_voice_session` hook. The audio bridge drives it:

* audio both ways is 16-bit little-endian mono PCM at `sample_rate` (default 24 kHz);
  the bridge resamples to and from WebRTC's 48 kHz, in chunks of any length;
* the backend reports what happens as `VoiceEvent`s from `events()`;
* on barge-in (a `SPEECH_STARTED` event) the bridge drops the audio still queued for the
  caller at once and calls `playback_interrupted` with how much of the item was really heard,
  so the backend can forget what the caller never heard.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass


class VoiceEventType(enum.StrEnum):
    AUDIO = "audio"  # `audio` holds PCM16 for the caller; `item_id` names the reply it belongs to
    SPEECH_STARTED = "speech_started"  # the caller started talking: barge-in
    SPEECH_STOPPED = "speech_stopped"  # the caller stopped talking (end of turn)
    TRANSCRIPT = "transcript"  # `role` ("user"/"assistant") said `text`; `final` when complete
    RESPONSE_DONE = "response_done"  # the backend finished producing a reply
    END_CALL = "end_call"  # the AI decided to hang up (`text` = reason)
    ERROR = "error"  # `text` = message; `fatal` ends the call
    RECONNECTED = "reconnected"  # the backend lost its connection and resumed (`text` = why)


@dataclass
class VoiceEvent:
    type: VoiceEventType
    audio: bytes = b""
    item_id: str | None = None
    role: str | None = None
    text: str = ""
    final: bool = True
    fatal: bool = False


class VoiceSession(abc.ABC):
    """One conversation with a voice backend, for one call."""

    sample_rate: int = 24000

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and configure (instructions, voice, language, speed). Raise
        `VoiceBackendError` with a fix when the backend refuses (bad key, no quota)."""

    @abc.abstractmethod
    async def send_audio(self, pcm: bytes) -> None:
        """Feed the caller's audio (PCM16 mono at `sample_rate`)."""

    @abc.abstractmethod
    async def greet(self, text: str) -> None:
        """Speak `text` to the caller now (the greeting, once the caller is listening)."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[VoiceEvent]:
        """What the backend says and hears, in order, until the session closes."""

    async def playback_interrupted(self, item_id: str, played_ms: int) -> None:  # noqa: B027
        """Barge-in: the caller heard only `played_ms` of reply `item_id`. Optional."""

    @abc.abstractmethod
    async def close(self) -> None:
        """End the session and release its connection. Idempotent."""
