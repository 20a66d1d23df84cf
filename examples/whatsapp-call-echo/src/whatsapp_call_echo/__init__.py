"""An echo voice backend for whatsapp-call: the caller hears their own voice played back.

A test call that checks the whole media path (WhatsApp, WebRTC, the audio bridge) with no AI,
no API key and no cost:  whatsapp-call call +14085551234 --voice-backend echo
Written against the public plugin API only (docs/plugins.md), as a template for real backends.
"""

from __future__ import annotations

import asyncio
import functools
import math
import sys
from array import array

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from whatsapp_call import hookimpl
from whatsapp_call.voice import VoiceEvent, VoiceSession
from whatsapp_call.voice import VoiceEventType as Ev

RATE = 24_000  # the VoiceSession default: PCM16 mono, little-endian
MIN_SPEECH_MS = 80  # louder-than-threshold audio needed before it counts as speech


class EchoSettings(BaseModel):
    """Our keys in the `channels.whatsappcall` block: echoDelayMs, echoSilenceMs, ..."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)
    echo_delay_ms: int = Field(300, ge=0, le=10_000, description="Pause before the echo plays.")
    echo_silence_ms: int = Field(600, ge=100, le=5_000, description="Quiet that ends a turn.")
    echo_threshold_dbfs: float = Field(-40.0, le=0, description="Louder than this is speech.")
    echo_max_seconds: float = Field(30.0, gt=0, le=120, description="Longest turn echoed.")


def _pcm(samples: array) -> bytes:
    if sys.byteorder == "big":
        samples.byteswap()
    return samples.tobytes()


def level_dbfs(pcm: bytes) -> float:
    """RMS level of PCM16 audio: the whole voice-activity detector is a threshold on it."""
    samples = array("h", pcm[: len(pcm) // 2 * 2])
    if sys.byteorder == "big":
        samples.byteswap()
    rms = math.sqrt(sum(s * s for s in samples) / len(samples)) if samples else 0.0
    return 20 * math.log10(max(rms, 0.1) / 32768)


@functools.cache
def chime() -> bytes:
    """Two rising notes: the "greeting" of a backend that cannot speak."""
    out = array("h")
    for freq, ms in ((660, 180), (0, 60), (880, 260)):
        n = RATE * ms // 1000
        for i in range(n):
            fade = min(1.0, i / 240, (n - i) / 240)  # 10 ms ramps: no clicks
            out.append(int(9000 * fade * math.sin(2 * math.pi * freq * i / RATE)))
    return _pcm(out)


class EchoSession(VoiceSession):
    """Energy VAD on the caller's audio; when a turn ends, plays it back after a delay."""

    sample_rate = RATE

    def __init__(self, options: EchoSettings):
        self.options = options
        self._events: asyncio.Queue[VoiceEvent | None] = asyncio.Queue()
        self._turn = bytearray()  # audio since the first loud chunk of the current turn
        self._voiced_end = 0  # end of the last loud chunk in _turn (trailing quiet is cut)
        self._voiced_ms = self._quiet_ms = 0.0
        self._talking = False  # SPEECH_STARTED was sent for this turn
        self._replies = 0
        self._pending: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        """Nothing to connect to: an echo needs no server and no key."""

    async def greet(self, text: str) -> None:
        self._reply(f"(echo backend, no text-to-speech: a chime instead of {text!r})", chime())

    async def send_audio(self, pcm: bytes) -> None:
        loud = level_dbfs(pcm) > self.options.echo_threshold_dbfs
        if self._closed or not (loud or self._turn):
            return
        ms = len(pcm) * 1000 / (2 * RATE)
        if len(self._turn) < self.options.echo_max_seconds * RATE * 2:
            self._turn += pcm
            if loud:
                self._voiced_end = len(self._turn)
        self._voiced_ms += ms if loud else 0
        self._quiet_ms = 0 if loud else self._quiet_ms + ms
        if not self._talking and self._voiced_ms >= MIN_SPEECH_MS:
            self._talking = True  # barge-in: the bridge silences what is playing
            if self._pending is not None:
                self._pending.cancel()  # and an echo not yet started is dropped
            self._events.put_nowait(VoiceEvent(Ev.SPEECH_STARTED))
        if self._quiet_ms >= self.options.echo_silence_ms:
            if self._talking:  # a turn ended (a short click is no turn: dropped)
                turn = bytes(self._turn[: self._voiced_end])
                seconds = len(turn) / (2 * RATE)
                self._events.put_nowait(VoiceEvent(Ev.SPEECH_STOPPED))
                self._events.put_nowait(
                    VoiceEvent(Ev.TRANSCRIPT, role="user", text=f"({seconds:.1f} s of speech)")
                )
                self._pending = asyncio.create_task(self._echo(turn, seconds))
            self._turn.clear()
            self._voiced_ms = self._quiet_ms = 0.0
            self._talking = False

    async def _echo(self, turn: bytes, seconds: float) -> None:
        await asyncio.sleep(self.options.echo_delay_ms / 1000)
        self._reply(f"(echo of {seconds:.1f} s of audio)", turn)

    def _reply(self, text: str, audio: bytes) -> None:
        self._replies += 1
        item = f"echo_{self._replies}"
        self._events.put_nowait(VoiceEvent(Ev.AUDIO, audio=audio, item_id=item))
        self._events.put_nowait(VoiceEvent(Ev.TRANSCRIPT, role="assistant", text=text))
        self._events.put_nowait(VoiceEvent(Ev.RESPONSE_DONE, item_id=item))

    async def events(self):
        while (event := await self._events.get()) is not None:
            yield event

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._pending is not None:
                self._pending.cancel()
            self._events.put_nowait(None)


@hookimpl
def voice_backend_names() -> list[str]:
    return ["echo"]


@hookimpl
def settings_model() -> type[BaseModel]:
    return EchoSettings


@hookimpl
def open_voice_session(call, settings) -> VoiceSession | None:
    if settings.voice_backend != "echo":
        return None  # firstresult: let the plugin of the configured backend answer
    return EchoSession(settings.plugin_settings(EchoSettings))
