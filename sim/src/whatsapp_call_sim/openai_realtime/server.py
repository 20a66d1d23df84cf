"""A local, wire-faithful OpenAI Realtime server (GA interface, WebSocket).

It follows docs/specs "openai-realtime-and-twilio-turn" sections 1-3 and 6: Bearer auth,
the beta header refused with close 4000, `session.created` first, `session.update`
validated and deep-merged, input audio counted on a session-wide clock, an energy VAD that
honours the session's threshold / prefix padding / silence window, scripted transcripts and
replies spoken with real PCM audio at real-time pace, barge-in, truncation, function calls,
and fault switches for the failure modes a client must survive.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import random
import string
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from whatsapp_call.redact import scrub

from . import g711
from .speech import GREETING, UNINTELLIGIBLE, recognise, speech_for
from .vad import SAMPLE_RATE, EnergyVad, speech_duration_ms

log = logging.getLogger("whatsapp_call_sim.openai_realtime")


class _HideKeys(logging.Filter):
    """websockets logs request headers at debug level: no Bearer key in the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = ()
        return True


log.addFilter(_HideKeys())

VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
MODELS = (
    "gpt-realtime",
    "gpt-realtime-1.5",
    "gpt-realtime-2",
    "gpt-realtime-2.1",
    "gpt-realtime-2.1-mini",
    "gpt-realtime-2025-08-28",
    "gpt-realtime-mini",
    "gpt-realtime-mini-2025-10-06",
    "gpt-realtime-mini-2025-12-15",
    "gpt-4o-realtime-preview",
    "gpt-4o-realtime-preview-2024-10-01",
    "gpt-4o-realtime-preview-2024-12-17",
    "gpt-4o-realtime-preview-2025-06-03",
    "gpt-4o-mini-realtime-preview",
    "gpt-4o-mini-realtime-preview-2024-12-17",
    "gpt-audio-1.5",
    "gpt-audio-mini",
    "gpt-audio-mini-2025-10-06",
    "gpt-audio-mini-2025-12-15",
)
TRANSCRIPTION_MODELS = (
    "whisper-1",
    "gpt-transcribe",
    "gpt-live-transcribe",
    "gpt-4o-mini-transcribe",
    "gpt-4o-mini-transcribe-2025-12-15",
    "gpt-4o-transcribe",
    "gpt-4o-transcribe-diarize",
    "gpt-realtime-whisper",
)
SESSION_KEYS = {
    "type",
    "model",
    "output_modalities",
    "instructions",
    "audio",
    "include",
    "max_output_tokens",
    "prompt",
    "reasoning",
    "tool_choice",
    "tools",
    "tracing",
    "truncation",
    "parallel_tool_calls",
}
AUDIO_INPUT_KEYS = {"format", "noise_reduction", "transcription", "turn_detection"}
AUDIO_OUTPUT_KEYS = {"format", "voice", "speed"}
SERVER_VAD_KEYS = {
    "type",
    "threshold",
    "prefix_padding_ms",
    "silence_duration_ms",
    "idle_timeout_ms",
    "create_response",
    "interrupt_response",
}
SEMANTIC_VAD_KEYS = {"type", "eagerness", "create_response", "interrupt_response"}
#: silence window the simulator uses for semantic_vad, by eagerness (it has no semantics)
SEMANTIC_SILENCE_MS = {"low": 900, "medium": 600, "auto": 600, "high": 350}
BYTES_PER_MS = {"audio/pcm": 48, "audio/pcmu": 8, "audio/pcma": 8}
_ID_CHARS = string.ascii_letters + string.digits
_ids = random.Random()


def new_id(prefix: str) -> str:
    """Ids shaped like the real ones: `event_`, `sess_`, `resp_`, `item_`, `call_`, `conv_`."""
    return prefix + "_" + "".join(_ids.choice(_ID_CHARS) for _ in range(21))


class RequestError(Exception):
    """A client event the real server would answer with an `error` event."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


@dataclass
class Reply:
    """What the simulated model does in one response: say `text`, then maybe call a tool."""

    text: str = ""
    function_call: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class ResponseRequest:
    """What a responder sees when deciding a reply."""

    trigger: str  # "response.create" | "turn" (server VAD) | "function_call_output"
    instructions: str | None  # the response's own instructions (response.create)
    user_text: str | None  # the latest user transcript, if any
    tools: list[str]  # names of the functions offered in the session
    function_name: str | None = None  # for "function_call_output": which tool answered
    function_output: str | None = None


def quoted(text: str) -> str | None:
    """The first double-quoted passage of `text` (straight or curly quotes)."""
    for open_q, close_q in (('"', '"'), ("\u201c", "\u201d")):
        start = text.find(open_q)
        end = text.find(close_q, start + 1) if start >= 0 else -1
        if start >= 0 and end > start + 1:
            return text[start + 1 : end]
    return None


def default_responder(req: ResponseRequest) -> Reply:
    """The stand-in for the model: says a quoted text it is told to say (a greeting), and
    otherwise answers the shipped user utterances; says goodbye and calls `end_call` (when
    offered) after the user says goodbye."""
    if req.instructions and (text := quoted(req.instructions)):
        return Reply(text)
    if req.trigger == "function_call_output":
        return Reply(
            "Thank you. Goodbye!" if req.function_name == "end_call" else "All right, done."
        )
    if req.user_text is None:
        return Reply(GREETING)
    said = req.user_text.lower()
    if "bye" in said:
        call = "end_call" if "end_call" in req.tools else None
        return Reply(
            "Thank you. Goodbye!", call, {"reason": "the caller said goodbye"} if call else {}
        )
    if said == UNINTELLIGIBLE:
        return Reply("Sorry, could you say that again?")
    if "hello" in said or "who is" in said:
        return Reply("Hi! I am calling for the team.")
    return Reply("Great, I have noted that.")


@dataclass
class Faults:
    """Failure switches. One-shot switches reset themselves once they fired."""

    drop_mid_response_after_ms: int | None = None  # one-shot: abort the socket (1006) mid-reply
    expire_mid_response_after_ms: int | None = None  # one-shot: session_expired mid-reply
    fail_next_response: tuple[str, str] | None = None  # one-shot (code, message): response fails
    reject_connections: int = 0  # answer the next N handshakes with HTTP 503
    key_error_as_event: bool = False  # bad key: accept, send error invalid_api_key, close 1008


def default_session(session_id: str, model: str) -> dict[str, Any]:
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": ["audio"],
        "instructions": "You are a helpful, witty, and friendly AI. Keep your answers short.",
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "expires_at": 0,
        "include": None,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": {
                    "type": "server_vad",
                    "threshold": 0.5,
                    "prefix_padding_ms": 300,
                    "silence_duration_ms": 200,
                    "idle_timeout_ms": None,
                    "create_response": True,
                    "interrupt_response": True,
                },
            },
            "output": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "voice": "alloy",
                "speed": 1.0,
            },
        },
    }


class _Closed(Exception):
    """The socket is gone; the sending task stops quietly."""


@dataclass
class _Response:
    id: str
    trigger: ResponseRequest
    conversation: bool
    metadata: dict[str, str] | None
    modalities: list[str]
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_reason: str | None = None
    task: asyncio.Task | None = None
    output: list[dict[str, Any]] = field(default_factory=list)
    audio_ms: float = 0.0


class SimSession:
    """One connection. Everything it sent and received is kept for tests to inspect."""

    def __init__(self, sim: RealtimeSimulator, ws: ServerConnection, model: str):
        self.sim = sim
        self.ws = ws
        self.id = new_id("sess")
        self.conversation_id = new_id("conv")
        self.model = model
        self.config = default_session(self.id, model)
        self.headers = {
            k: v for k, v in ws.request.headers.raw_items() if k.lower() != "authorization"
        }
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.audio_in_ms = 0.0  # session-wide input audio clock
        self.input_audio = bytearray()  # PCM16 24 kHz of what was appended (capped)
        self.items: dict[str, dict[str, Any]] = {}  # conversation items by id, in order
        self.generated_ms: dict[str, float] = {}  # assistant audio item id -> ms generated
        self.truncated: dict[str, int] = {}
        self.responses: list[dict[str, Any]] = []  # each response.done's response
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self.active: _Response | None = None
        self._lock = asyncio.Lock()
        self._vad: EnergyVad | None = None
        self._vad_key: tuple | None = None
        self._manual_buffer = bytearray()
        self._buffer_ms = 0.0
        self._user_item: str | None = None
        self._last_user_text: str | None = None
        self._voice_used = False
        self._tasks: set[asyncio.Task] = set()

    # ---- plumbing -------------------------------------------------------------------------

    async def emit(self, event: dict[str, Any]) -> None:
        event = {
            "type": event["type"],
            "event_id": new_id("event"),
            **{k: v for k, v in event.items() if k != "type"},
        }
        async with self._lock:
            if self.closed.is_set():
                raise _Closed
            self.sent.append(event)
            try:
                await self.ws.send(json.dumps(event))
            except ConnectionClosed:
                raise _Closed from None

    async def error(
        self,
        message: str,
        code: str | None = None,
        param: str | None = None,
        client_event_id: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        err = {
            "type": type_,
            "code": code,
            "message": message,
            "param": param,
            "event_id": client_event_id,
        }
        self.errors.append(err)
        await self.emit({"type": "error", "error": err})

    def spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def input_format(self) -> str:
        return self.config["audio"]["input"]["format"]["type"]

    @property
    def output_format(self) -> dict[str, Any]:
        return self.config["audio"]["output"]["format"]

    @property
    def turn_detection(self) -> dict[str, Any] | None:
        return self.config["audio"]["input"]["turn_detection"]

    @property
    def tool_names(self) -> list[str]:
        return [
            t.get("name", "") for t in self.config.get("tools") or [] if t.get("type") == "function"
        ]

    async def run(self) -> None:
        await self.emit({"type": "session.created", "session": copy.deepcopy(self.config)})
        self.spawn(self._expire_after(self.sim.session_max_seconds))
        async for raw in self.ws:
            try:
                event = json.loads(raw)
                if not isinstance(event, dict):
                    raise ValueError("not an object")
            except ValueError:
                await self.error(
                    "The server could not parse the event: invalid JSON.", "invalid_json"
                )
                continue
            self.received.append(event)
            try:
                await self.dispatch(event)
            except RequestError as exc:
                await self.error(exc.message, exc.code, exc.param, event.get("event_id"))

    async def shutdown(self) -> None:
        self.closed.set()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def expire(self) -> None:
        """What the real server does at the session time limit: an error, then a close."""
        try:
            await self.error(
                "Your session hit the maximum duration of 60 minutes.", "session_expired"
            )
        except _Closed:
            return
        await self.ws.close(1001, "session_expired")

    async def _expire_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self.expire()

    def drop(self) -> None:
        """Abort the TCP connection without a close frame (the client sees 1006)."""
        self.ws.transport.abort()

    # ---- client events ----------------------------------------------------------------------

    async def dispatch(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        handler = {
            "session.update": self.on_session_update,
            "input_audio_buffer.append": self.on_append,
            "input_audio_buffer.commit": self.on_commit,
            "input_audio_buffer.clear": self.on_clear,
            "response.create": self.on_response_create,
            "response.cancel": self.on_response_cancel,
            "conversation.item.create": self.on_item_create,
            "conversation.item.truncate": self.on_truncate,
            "conversation.item.delete": self.on_item_delete,
            "conversation.item.retrieve": self.on_item_retrieve,
            "output_audio_buffer.clear": self.on_output_clear,
        }.get(kind)  # type: ignore[arg-type]
        if handler is None:
            raise RequestError(
                f"Invalid value: '{kind}'. Supported values are the client event types.",
                "invalid_value",
                "type",
            )
        await handler(event)

    async def on_session_update(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise RequestError(
                "Missing required parameter: 'session'.", "missing_required_parameter", "session"
            )
        if "type" not in session:
            raise RequestError(
                "Missing required parameter: 'session.type'.",
                "missing_required_parameter",
                "session.type",
            )
        if session["type"] != "realtime":
            raise RequestError(
                f"Invalid value: '{session['type']}'. Supported values are: 'realtime'.",
                "invalid_value",
                "session.type",
            )
        merged = copy.deepcopy(self.config)
        for key, value in session.items():
            if key not in SESSION_KEYS:
                raise RequestError(
                    f"Unknown parameter: 'session.{key}'.", "unknown_parameter", f"session.{key}"
                )
            if key == "audio":
                self._merge_audio(merged, value)
            else:
                merged[key] = value
        self._validate_session(merged, session)
        self.config = merged
        self._vad = None  # rebuilt from the new settings on the next append
        await self.emit({"type": "session.updated", "session": copy.deepcopy(self.config)})

    def _merge_audio(self, merged: dict[str, Any], audio: Any) -> None:
        if not isinstance(audio, dict):
            raise RequestError(
                "Invalid type for 'session.audio': expected an object.",
                "invalid_type",
                "session.audio",
            )
        for side, allowed in (("input", AUDIO_INPUT_KEYS), ("output", AUDIO_OUTPUT_KEYS)):
            part = audio.get(side)
            if part is None:
                continue
            for key, value in part.items():
                if key not in allowed:
                    raise RequestError(
                        f"Unknown parameter: 'session.audio.{side}.{key}'.",
                        "unknown_parameter",
                        f"session.audio.{side}.{key}",
                    )
                merged["audio"][side][key] = value
        for key in set(audio) - {"input", "output"}:
            raise RequestError(
                f"Unknown parameter: 'session.audio.{key}'.",
                "unknown_parameter",
                f"session.audio.{key}",
            )

    def _validate_session(self, merged: dict[str, Any], update: dict[str, Any]) -> None:
        if "model" in update and update["model"] != self.model:
            raise RequestError(
                "The model cannot be changed on an open session; open a new connection.",
                "invalid_value",
                "session.model",
            )
        if merged["output_modalities"] not in (["audio"], ["text"]):
            raise RequestError(
                "Invalid 'session.output_modalities': use ['audio'] or ['text'].",
                "invalid_value",
                "session.output_modalities",
            )
        for side in ("input", "output"):
            fmt = merged["audio"][side]["format"]
            param = f"session.audio.{side}.format"
            if not isinstance(fmt, dict) or fmt.get("type") not in BYTES_PER_MS:
                raise RequestError(
                    f"Invalid value for '{param}.type'. Supported values are: 'audio/pcm', 'audio/pcmu', 'audio/pcma'.",
                    "invalid_value",
                    f"{param}.type",
                )
            if fmt["type"] == "audio/pcm" and fmt.get("rate", 24000) != 24000:
                raise RequestError(
                    f"Invalid value: {fmt.get('rate')}. Supported values are: 24000.",
                    "invalid_value",
                    f"{param}.rate",
                )
        out = merged["audio"]["output"]
        voice = out.get("voice")
        if isinstance(voice, dict):
            if not str(voice.get("id", "")).startswith("voice_"):
                raise RequestError(
                    "Invalid custom voice id.", "invalid_value", "session.audio.output.voice.id"
                )
        elif voice not in VOICES:
            supported = ", ".join(f"'{v}'" for v in VOICES)
            raise RequestError(
                f"Invalid value: '{voice}'. Supported values are: {supported}.",
                "invalid_value",
                "session.audio.output.voice",
            )
        if self._voice_used and voice != self.config["audio"]["output"]["voice"]:
            raise RequestError(
                "Cannot update a conversation's voice if assistant audio is present.",
                "cannot_update_voice",
                "session.audio.output.voice",
            )
        speed = out.get("speed", 1.0)
        if not isinstance(speed, int | float) or not 0.25 <= speed <= 1.5:
            raise RequestError(
                f"Invalid 'session.audio.output.speed': {speed}. Expected a value from 0.25 to 1.5.",
                "invalid_value",
                "session.audio.output.speed",
            )
        inp = merged["audio"]["input"]
        td = inp.get("turn_detection")
        if td is not None:
            kind = td.get("type") if isinstance(td, dict) else None
            allowed = {"server_vad": SERVER_VAD_KEYS, "semantic_vad": SEMANTIC_VAD_KEYS}.get(kind)  # type: ignore[arg-type]
            if allowed is None:
                raise RequestError(
                    "Invalid value for 'session.audio.input.turn_detection.type'. Supported values are: 'server_vad', 'semantic_vad'.",
                    "invalid_value",
                    "session.audio.input.turn_detection.type",
                )
            for key in td:
                if key not in allowed:
                    raise RequestError(
                        f"Unknown parameter: 'session.audio.input.turn_detection.{key}'.",
                        "unknown_parameter",
                        f"session.audio.input.turn_detection.{key}",
                    )
            if not 0.0 <= float(td.get("threshold", 0.5)) <= 1.0:
                raise RequestError(
                    "Invalid 'session.audio.input.turn_detection.threshold': expected 0.0 to 1.0.",
                    "invalid_value",
                    "session.audio.input.turn_detection.threshold",
                )
        tr = inp.get("transcription")
        if tr is not None and (
            not isinstance(tr, dict) or tr.get("model") not in TRANSCRIPTION_MODELS
        ):
            raise RequestError(
                f"Invalid value: '{(tr or {}).get('model')}'. Supported values are: {', '.join(TRANSCRIPTION_MODELS)}.",
                "invalid_value",
                "session.audio.input.transcription.model",
            )
        nr = inp.get("noise_reduction")
        if nr is not None and (
            not isinstance(nr, dict) or nr.get("type") not in ("near_field", "far_field")
        ):
            raise RequestError(
                "Invalid value for 'session.audio.input.noise_reduction.type'. Supported values are: 'near_field', 'far_field'.",
                "invalid_value",
                "session.audio.input.noise_reduction.type",
            )
        for i, tool in enumerate(merged.get("tools") or []):
            if not isinstance(tool, dict) or tool.get("type") != "function" or not tool.get("name"):
                raise RequestError(
                    "Each tool needs type 'function' and a name.",
                    "invalid_value",
                    f"session.tools[{i}]",
                )

    # ---- input audio ------------------------------------------------------------------------

    def _decode_input(self, raw: bytes) -> bytes:
        fmt = self.input_format
        if fmt == "audio/pcm":
            return raw[: len(raw) - len(raw) % 2]
        samples = g711.ulaw_decode(raw) if fmt == "audio/pcmu" else g711.alaw_decode(raw)
        return np.repeat(samples, 3).tobytes()  # 8 -> 24 kHz; good enough for an energy VAD

    def _vad_for(self, td: dict[str, Any]) -> EnergyVad:
        if td["type"] == "semantic_vad":
            key = (0.5, 300, SEMANTIC_SILENCE_MS[td.get("eagerness", "auto")])
        else:
            key = (
                td.get("threshold", 0.5),
                td.get("prefix_padding_ms", 300),
                td.get("silence_duration_ms", 500),
            )
        if self._vad is None or self._vad_key != key:
            self._vad, self._vad_key = EnergyVad(*key), key
            self._vad._clock_ms = int(self.audio_in_ms)  # keep the session-wide clock
        return self._vad

    async def on_append(self, event: dict[str, Any]) -> None:
        try:
            raw = base64.b64decode(event.get("audio") or "", validate=True)
        except ValueError:
            raise RequestError(
                "Invalid 'audio': not valid base64.", "invalid_value", "audio"
            ) from None
        if len(raw) > 15 * 1024 * 1024:
            raise RequestError("Audio chunk exceeds the 15 MiB limit.", "invalid_value", "audio")
        self.audio_in_ms += len(raw) / BYTES_PER_MS[self.input_format]
        self._buffer_ms += len(raw) / BYTES_PER_MS[self.input_format]
        pcm = self._decode_input(raw)
        if len(self.input_audio) < self.sim.record_audio_ms * 48:
            self.input_audio += pcm
        td = self.turn_detection
        if td is None:
            self._manual_buffer += pcm
            return
        for vad_event in self._vad_for(td).feed(pcm):
            if vad_event.kind == "started":
                await self._speech_started(vad_event.audio_ms, td)
            else:
                await self._speech_stopped(vad_event.audio_ms, vad_event.speech_ms, td)

    async def _speech_started(self, audio_start_ms: int, td: dict[str, Any]) -> None:
        self._user_item = new_id("item")
        await self.emit(
            {
                "type": "input_audio_buffer.speech_started",
                "audio_start_ms": audio_start_ms,
                "item_id": self._user_item,
            }
        )
        if self.active is not None and td.get("interrupt_response", True):
            await self.cancel_response(self.active, "turn_detected")

    async def _speech_stopped(self, audio_end_ms: int, speech_ms: int, td: dict[str, Any]) -> None:
        item_id = self._user_item or new_id("item")
        self._user_item = None
        await self.emit(
            {
                "type": "input_audio_buffer.speech_stopped",
                "audio_end_ms": audio_end_ms,
                "item_id": item_id,
            }
        )
        threshold = td.get("threshold", 0.5) if td["type"] == "server_vad" else 0.5
        await self._commit(item_id, speech_ms, threshold)
        if td.get("create_response", True) and self.active is None:
            self.start_response(
                ResponseRequest("turn", None, self._last_user_text, self.tool_names)
            )

    async def _commit(self, item_id: str, speech_ms: int | None, threshold: float) -> None:
        previous = next(reversed(self.items), None)
        await self.emit(
            {
                "type": "input_audio_buffer.committed",
                "item_id": item_id,
                "previous_item_id": previous,
            }
        )
        self._buffer_ms = 0.0
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        self.items[item_id] = item
        await self.emit(
            {"type": "conversation.item.added", "previous_item_id": previous, "item": item}
        )
        await self.emit(
            {"type": "conversation.item.done", "previous_item_id": previous, "item": item}
        )
        text = self.sim.next_transcript(speech_ms, threshold)
        self._last_user_text = text
        if self.config["audio"]["input"]["transcription"] is not None:
            self.spawn(self._transcribe(item, text, speech_ms or 0))

    async def _transcribe(self, item: dict[str, Any], text: str, speech_ms: int) -> None:
        """Input transcription runs on a separate model: it lands a little later."""
        try:
            await asyncio.sleep(self.sim.transcription_delay)
            words = text.split(" ")
            half = max(1, len(words) // 2)
            deltas = [" ".join(words[:half]), " ".join(words[half:])]
            for i, delta in enumerate(d for d in deltas if d):
                await self.emit(
                    {
                        "type": "conversation.item.input_audio_transcription.delta",
                        "item_id": item["id"],
                        "content_index": 0,
                        "delta": delta if i == 0 else " " + delta,
                    }
                )
            item["content"][0]["transcript"] = text
            audio_tokens = max(1, speech_ms // 100)
            await self.emit(
                {
                    "type": "conversation.item.input_audio_transcription.completed",
                    "item_id": item["id"],
                    "content_index": 0,
                    "transcript": text,
                    "usage": {
                        "type": "tokens",
                        "input_tokens": audio_tokens,
                        "output_tokens": len(words),
                        "total_tokens": audio_tokens + len(words),
                        "input_token_details": {"audio_tokens": audio_tokens, "text_tokens": 0},
                    },
                }
            )
        except _Closed:
            return

    async def on_commit(self, event: dict[str, Any]) -> None:
        if self._buffer_ms < 100:
            raise RequestError(
                f"Error committing input audio buffer: buffer too small. Expected at least 100ms of audio, but buffer only has {self._buffer_ms:.2f}ms of audio.",
                "input_audio_buffer_commit_empty",
            )
        speech_ms = speech_duration_ms(bytes(self._manual_buffer)) if self._manual_buffer else None
        self._manual_buffer.clear()
        td = self.turn_detection
        threshold = td.get("threshold", 0.5) if td and td["type"] == "server_vad" else 0.5
        await self._commit(self._user_item or new_id("item"), speech_ms, threshold)
        self._user_item = None

    async def on_clear(self, event: dict[str, Any]) -> None:
        self._manual_buffer.clear()
        self._buffer_ms = 0.0
        await self.emit({"type": "input_audio_buffer.cleared"})

    # ---- conversation items -------------------------------------------------------------------

    async def on_item_create(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        if not isinstance(item, dict) or item.get("type") not in (
            "message",
            "function_call",
            "function_call_output",
        ):
            raise RequestError(
                "Invalid 'item': expected a message, function_call or function_call_output.",
                "invalid_value",
                "item",
            )
        if item["type"] == "message":
            role = item.get("role")
            if role not in ("user", "system", "assistant"):
                raise RequestError("Invalid 'item.role'.", "invalid_value", "item.role")
            for part in item.get("content") or []:
                if part.get("type") in ("output_audio", "input_audio") and role == "assistant":
                    raise RequestError(
                        "Assistant audio items cannot be created.", "invalid_value", "item.content"
                    )
        if item["type"] == "function_call_output":
            if not isinstance(item.get("output"), str):
                raise RequestError(
                    "Invalid type for 'item.output': expected a string.",
                    "invalid_type",
                    "item.output",
                )
            calls = {
                i.get("call_id"): i for i in self.items.values() if i["type"] == "function_call"
            }
            if item.get("call_id") not in calls:
                raise RequestError(
                    f"Tool call ID '{item.get('call_id')}' not found in conversation.",
                    "invalid_value",
                    "item.call_id",
                )
        previous = event.get("previous_item_id")
        if previous is not None and previous != "root" and previous not in self.items:
            raise RequestError(
                f"Previous item with id '{previous}' not found.",
                "invalid_value",
                "previous_item_id",
            )
        stored = {"object": "realtime.item", "status": "completed", **copy.deepcopy(item)}
        stored["id"] = item.get("id") or new_id("item")
        if previous is None:
            previous = next(reversed(self.items), None)
        self.items[stored["id"]] = stored
        await self.emit(
            {"type": "conversation.item.added", "previous_item_id": previous, "item": stored}
        )
        await self.emit(
            {"type": "conversation.item.done", "previous_item_id": previous, "item": stored}
        )

    async def on_item_delete(self, event: dict[str, Any]) -> None:
        item_id = event.get("item_id")
        if item_id not in self.items:
            raise RequestError(
                f"Error deleting item: the item with id '{item_id}' does not exist.",
                "item_delete_invalid_item_id",
                "item_id",
            )
        del self.items[item_id]
        await self.emit({"type": "conversation.item.deleted", "item_id": item_id})

    async def on_item_retrieve(self, event: dict[str, Any]) -> None:
        item_id = event.get("item_id")
        if item_id not in self.items:
            raise RequestError(
                f"Error retrieving item: the item with id '{item_id}' does not exist.",
                "item_retrieve_invalid_item_id",
                "item_id",
            )
        await self.emit({"type": "conversation.item.retrieved", "item": self.items[item_id]})

    async def on_truncate(self, event: dict[str, Any]) -> None:
        item_id = event.get("item_id")
        audio_end_ms = event.get("audio_end_ms")
        if not isinstance(audio_end_ms, int) or audio_end_ms < 0:
            raise RequestError(
                "Invalid 'audio_end_ms': expected a non-negative integer.",
                "invalid_value",
                "audio_end_ms",
            )
        item = self.items.get(item_id)  # type: ignore[arg-type]
        if item is None:
            raise RequestError(
                f"Conversation item with id '{item_id}' not found.", "invalid_value", "item_id"
            )
        generated = self.generated_ms.get(item_id)  # type: ignore[arg-type]
        if item.get("role") != "assistant" or generated is None or generated <= 0:
            raise RequestError(
                "Only model output audio messages can be truncated", "unsupported_content_type"
            )
        if audio_end_ms > generated:
            raise RequestError(
                f"Audio content of {int(generated)}ms is already shorter than {audio_end_ms}ms"
            )
        content = item["content"][0] if item["content"] else None
        if content is not None:
            content["transcript"] = ""  # the server forgets text the caller never heard
        self.truncated[item_id] = audio_end_ms  # type: ignore[index]
        await self.emit(
            {
                "type": "conversation.item.truncated",
                "item_id": item_id,
                "content_index": event.get("content_index", 0),
                "audio_end_ms": audio_end_ms,
            }
        )

    async def on_output_clear(self, event: dict[str, Any]) -> None:
        raise RequestError(
            "output_audio_buffer.clear is only supported for WebRTC and SIP connections.",
            "invalid_value",
            "type",
        )

    # ---- responses ------------------------------------------------------------------------------

    async def on_response_create(self, event: dict[str, Any]) -> None:
        params = event.get("response") or {}
        if self.active is not None:
            raise RequestError(
                f"Conversation already has an active response in progress: {self.active.id}. Wait until the response is finished before creating a new one.",
                "conversation_already_has_active_response",
            )
        last = next(reversed(self.items.values()), None)
        trigger, fn_name, fn_output = "response.create", None, None
        if last is not None and last["type"] == "function_call_output":
            calls = {
                i.get("call_id"): i for i in self.items.values() if i["type"] == "function_call"
            }
            trigger, fn_output = "function_call_output", last["output"]
            fn_name = calls.get(last["call_id"], {}).get("name")
        req = ResponseRequest(
            trigger,
            params.get("instructions"),
            self._last_user_text,
            self.tool_names,
            fn_name,
            fn_output,
        )
        self.start_response(
            req,
            conversation=params.get("conversation", "auto") != "none",
            metadata=params.get("metadata"),
            modalities=params.get("output_modalities") or self.config["output_modalities"],
        )

    async def on_response_cancel(self, event: dict[str, Any]) -> None:
        wanted = event.get("response_id")
        if self.active is None or (wanted and wanted != self.active.id):
            raise RequestError(
                "Cancellation failed: no active response found", "response_cancel_not_active"
            )
        await self.cancel_response(self.active, "client_cancelled")

    def start_response(
        self,
        req: ResponseRequest,
        *,
        conversation: bool = True,
        metadata: dict[str, str] | None = None,
        modalities: list[str] | None = None,
    ) -> None:
        resp = _Response(
            new_id("resp"),
            req,
            conversation,
            metadata,
            modalities or self.config["output_modalities"],
        )
        self.active = resp
        resp.task = self.spawn(self._run_response(resp))

    async def cancel_response(self, resp: _Response, reason: str) -> None:
        """Stop a response and wait until its done events went out (so they precede ours)."""
        if resp.cancel_reason is None:
            resp.cancel_reason = reason
            resp.cancel.set()
        if resp.task is not None and resp.task is not asyncio.current_task():
            await asyncio.gather(resp.task, return_exceptions=True)

    def _response_object(
        self, resp: _Response, status: str, details: dict | None, usage: dict | None
    ) -> dict:
        return {
            "id": resp.id,
            "object": "realtime.response",
            "status": status,
            "status_details": details,
            "output": copy.deepcopy(resp.output),
            "conversation_id": self.conversation_id if resp.conversation else None,
            "output_modalities": resp.modalities,
            "max_output_tokens": self.config["max_output_tokens"],
            "audio": {
                "output": {
                    "format": self.output_format,
                    "voice": self.config["audio"]["output"]["voice"],
                }
            },
            "usage": usage,
            "metadata": resp.metadata,
        }

    async def _run_response(self, resp: _Response) -> None:
        try:
            await self.emit(
                {
                    "type": "response.created",
                    "response": self._response_object(resp, "in_progress", None, None),
                }
            )
            failure = self.sim.faults.fail_next_response
            self.sim.faults.fail_next_response = None
            await self.emit(
                {"type": "rate_limits.updated", "rate_limits": self.sim.rate_limits(failure)}
            )
            if failure is not None:
                code, message = failure
                details = {
                    "type": "failed",
                    "error": {"type": "invalid_request_error", "code": code, "message": message},
                }
                await self._done(resp, "failed", details)
                return
            reply = self.sim.responder(resp.trigger)
            index = 0
            if reply.text:
                await self._message(resp, reply.text, index)
                index += 1
            if reply.function_call and resp.cancel_reason is None:
                await self._function_call(resp, reply, index)
            if resp.cancel_reason is not None:
                await self._done(
                    resp, "cancelled", {"type": "cancelled", "reason": resp.cancel_reason}
                )
            else:
                await self._done(resp, "completed", None)
        except _Closed:
            return
        finally:
            if self.active is resp:
                self.active = None

    async def _done(self, resp: _Response, status: str, details: dict | None) -> None:
        out_audio = int(resp.audio_ms / 50)  # ~20 audio tokens per second
        text_tokens = sum(
            len((c.get("transcript") or "").split())
            for i in resp.output
            for c in i.get("content", [])
        )
        usage = {
            "total_tokens": 300 + out_audio + text_tokens,
            "input_tokens": 300,
            "output_tokens": out_audio + text_tokens,
            "input_token_details": {
                "text_tokens": 250,
                "audio_tokens": 50,
                "image_tokens": 0,
                "cached_tokens": 192,
                "cached_tokens_details": {"text_tokens": 192, "audio_tokens": 0, "image_tokens": 0},
            },
            "output_token_details": {"text_tokens": text_tokens, "audio_tokens": out_audio},
        }
        response = self._response_object(resp, status, details, usage)
        self.responses.append(response)
        self.active = None if self.active is resp else self.active
        await self.emit({"type": "response.done", "response": response})

    async def _wait(self, resp: _Response, seconds: float) -> bool:
        """Sleep, unless the response gets cancelled first. True when cancelled."""
        if seconds > 0:
            try:
                await asyncio.wait_for(resp.cancel.wait(), seconds)
            except TimeoutError:
                pass
        return resp.cancel.is_set()

    def _encode_output(self, pcm24: bytes) -> bytes:
        fmt = self.output_format["type"]
        if fmt == "audio/pcm":
            return pcm24
        import soxr

        samples = soxr.resample(np.frombuffer(pcm24, dtype="<i2"), SAMPLE_RATE, 8000).astype(
            np.int16
        )
        return g711.ulaw_encode(samples) if fmt == "audio/pcmu" else g711.alaw_encode(samples)

    async def _message(self, resp: _Response, text: str, index: int) -> None:
        item_id = new_id("item")
        audio_out = "audio" in resp.modalities
        item: dict[str, Any] = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        previous = next(reversed(self.items), None)
        base = {
            "response_id": resp.id,
            "item_id": item_id,
            "output_index": index,
            "content_index": 0,
        }
        await self.emit(
            {
                "type": "response.output_item.added",
                "response_id": resp.id,
                "output_index": index,
                "item": item,
            }
        )
        if resp.conversation:
            self.items[item_id] = item
            await self.emit(
                {
                    "type": "conversation.item.added",
                    "previous_item_id": previous,
                    "item": copy.deepcopy(item),
                }
            )
        part_type = "audio" if audio_out else "text"
        empty_part = (
            {"type": "audio", "transcript": ""} if audio_out else {"type": "text", "text": ""}
        )
        await self.emit({"type": "response.content_part.added", **base, "part": empty_part})
        words = text.split(" ")
        said: list[str] = []
        if audio_out:
            self.generated_ms[item_id] = 0.0
            self._voice_used = True
            said = await self._stream_audio(resp, item_id, base, text, words)
        elif not await self._wait(resp, self.sim.first_delta_delay):
            for i, word in enumerate(words):
                await self.emit(
                    {
                        "type": "response.output_text.delta",
                        **base,
                        "delta": word if i == 0 else " " + word,
                    }
                )
                said.append(word)
        spoken = " ".join(said)
        if audio_out:
            await self.emit({"type": "response.output_audio.done", **base})
            await self.emit(
                {"type": "response.output_audio_transcript.done", **base, "transcript": spoken}
            )
            part = {"type": "audio", "transcript": spoken}
            content = {"type": "output_audio", "transcript": spoken}
        else:
            await self.emit({"type": "response.output_text.done", **base, "text": spoken})
            part = {"type": part_type, "text": spoken}
            content = {"type": "output_text", "text": spoken}
        await self.emit({"type": "response.content_part.done", **base, "part": part})
        item["status"] = "completed" if resp.cancel_reason is None else "incomplete"
        item["content"] = [content]
        resp.output.append(copy.deepcopy(item))
        await self.emit(
            {
                "type": "response.output_item.done",
                "response_id": resp.id,
                "output_index": index,
                "item": copy.deepcopy(item),
            }
        )
        if resp.conversation:
            await self.emit(
                {
                    "type": "conversation.item.done",
                    "previous_item_id": previous,
                    "item": copy.deepcopy(item),
                }
            )

    async def _stream_audio(
        self, resp: _Response, item_id: str, base: dict[str, Any], text: str, words: list[str]
    ) -> list[str]:
        """Irregular 40-200 ms deltas at `audio_pace` x real time, `audio_lead_ms` ahead,
        with the transcript deltas interleaved in step with the audio."""
        pcm = speech_for(text)
        total_ms = len(pcm) / 48
        said: list[str] = []
        if await self._wait(resp, self.sim.first_delta_delay):
            return said
        loop = asyncio.get_running_loop()
        started = loop.time()
        offset = 0
        sent_ms = 0.0
        faults = self.sim.faults
        while offset < len(pcm):
            due = started + max(0.0, sent_ms - self.sim.audio_lead_ms) / 1000 / self.sim.audio_pace
            if await self._wait(resp, due - loop.time()):
                break
            chunk_ms = self.sim.rng.randint(40, 200)
            chunk = pcm[offset : offset + chunk_ms * 48]
            offset += len(chunk)
            target_words = round(len(words) * offset / len(pcm))
            while len(said) < target_words:
                word = words[len(said)]
                await self.emit(
                    {
                        "type": "response.output_audio_transcript.delta",
                        **base,
                        "delta": word if not said else " " + word,
                    }
                )
                said.append(word)
            await self.emit(
                {
                    "type": "response.output_audio.delta",
                    **base,
                    "delta": base64.b64encode(self._encode_output(chunk)).decode(),
                }
            )
            sent_ms += len(chunk) / 48
            resp.audio_ms += len(chunk) / 48
            self.generated_ms[item_id] = sent_ms
            if (
                faults.drop_mid_response_after_ms is not None
                and sent_ms >= faults.drop_mid_response_after_ms
            ):
                faults.drop_mid_response_after_ms = None
                self.drop()
                raise _Closed
            if (
                faults.expire_mid_response_after_ms is not None
                and sent_ms >= faults.expire_mid_response_after_ms
            ):
                faults.expire_mid_response_after_ms = None
                await self.expire()
                raise _Closed
        log.debug("response %s: %.0f of %.0f ms of audio sent", resp.id, sent_ms, total_ms)
        return said

    async def _function_call(self, resp: _Response, reply: Reply, index: int) -> None:
        item_id, call_id = new_id("item"), new_id("call")
        arguments = json.dumps(reply.arguments)
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "function_call",
            "status": "in_progress",
            "name": reply.function_call,
            "call_id": call_id,
            "arguments": "",
        }
        previous = next(reversed(self.items), None)
        await self.emit(
            {
                "type": "response.output_item.added",
                "response_id": resp.id,
                "output_index": index,
                "item": dict(item),
            }
        )
        if resp.conversation:
            self.items[item_id] = item
            await self.emit(
                {
                    "type": "conversation.item.added",
                    "previous_item_id": previous,
                    "item": dict(item),
                }
            )
        base = {
            "response_id": resp.id,
            "item_id": item_id,
            "output_index": index,
            "call_id": call_id,
        }
        cut = len(arguments) // 2
        for delta in (arguments[:cut], arguments[cut:]):
            if delta:
                await self.emit(
                    {"type": "response.function_call_arguments.delta", **base, "delta": delta}
                )
        await self.emit(
            {
                "type": "response.function_call_arguments.done",
                **base,
                "name": reply.function_call,
                "arguments": arguments,
            }
        )
        item.update(status="completed", arguments=arguments)
        resp.output.append(dict(item))
        await self.emit(
            {
                "type": "response.output_item.done",
                "response_id": resp.id,
                "output_index": index,
                "item": dict(item),
            }
        )
        if resp.conversation:
            await self.emit(
                {"type": "conversation.item.done", "previous_item_id": previous, "item": dict(item)}
            )


class RealtimeSimulator:
    """The simulated OpenAI Realtime endpoint. `start()` returns the URL to use as
    `openaiRealtimeUrl` (`ws://127.0.0.1:PORT/v1/realtime`); pass `?model=` as the real one needs.

    Tunables are plain attributes a test may change while it runs: `first_delta_delay`
    (model latency before the first audio delta, s), `audio_pace` (1.0 = real time; larger
    sends audio faster; the default 3.0 follows the spec: the real server generates audio
    faster than real time, so clients must pace playback and truncate on barge-in themselves),
    `audio_lead_ms` (how far audio runs ahead of real time),
    `transcription_delay`, `session_max_seconds`, and `faults`.
    """

    def __init__(
        self,
        api_key: str = "sk-sim-openai",
        *,
        transcripts: Sequence[str] | None = None,
        replies: Sequence[Reply] | None = None,
        responder: Callable[[ResponseRequest], Reply] | None = None,
        first_delta_delay: float = 0.25,
        audio_pace: float = 3.0,
        audio_lead_ms: float = 200.0,
        transcription_delay: float = 0.15,
        session_max_seconds: float = 3600.0,
        record_audio_ms: int = 300_000,
        seed: int = 0,
    ):
        self._api_key = api_key
        self.transcripts: deque[str] = deque(transcripts or ())
        self.replies: deque[Reply] = deque(replies or ())
        self._responder = responder or default_responder
        self.first_delta_delay = first_delta_delay
        self.audio_pace = audio_pace
        self.audio_lead_ms = audio_lead_ms
        self.transcription_delay = transcription_delay
        self.session_max_seconds = session_max_seconds
        self.record_audio_ms = record_audio_ms
        self.rng = random.Random(seed)
        self.faults = Faults()
        self.sessions: list[SimSession] = []
        self.refused: list[SimSession] = []  # upgraded, then refused (bad key, beta, model)
        self.handshakes: list[dict[str, Any]] = []  # every upgrade request: path, status, headers
        self._server: Server | None = None
        self._requests_left = 1000
        self._new_session = asyncio.Condition()
        self.url: str | None = None

    def __repr__(self) -> str:
        return f"RealtimeSimulator(url={self.url!r}, sessions={len(self.sessions)})"

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._server = await serve(
            self._handle,
            host,
            port,
            process_request=self._process_request,
            max_size=None,
            compression=None,
            logger=log,
        )
        bound = self._server.sockets[0].getsockname()
        self.url = f"ws://{bound[0]}:{bound[1]}/v1/realtime"
        return self.url

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None

    # ---- scripting ----------------------------------------------------------------------------

    def responder(self, req: ResponseRequest) -> Reply:
        if req.trigger == "turn" and self.replies:
            return self.replies.popleft()
        if req.trigger == "response.create" and not req.instructions and self.replies:
            return self.replies.popleft()
        return self._responder(req)

    def next_transcript(self, speech_ms: int | None, threshold: float) -> str:
        if self.transcripts:
            return self.transcripts.popleft()
        return recognise(speech_ms, threshold) if speech_ms else UNINTELLIGIBLE

    def rate_limits(self, failure: tuple[str, str] | None = None) -> list[dict[str, Any]]:
        self._requests_left = max(0, self._requests_left - 1)
        limited = failure is not None and failure[0] == "rate_limit_exceeded"
        return [
            {
                "name": "requests",
                "limit": 1000,
                "remaining": 0 if limited else self._requests_left,
                "reset_seconds": 0.06,
            },
            {
                "name": "tokens",
                "limit": 40000,
                "remaining": 0 if limited else 37360,
                "reset_seconds": 3.96,
            },
        ]

    # ---- fault switches -----------------------------------------------------------------------

    @property
    def live_sessions(self) -> list[SimSession]:
        return [s for s in self.sessions if not s.closed.is_set()]

    def drop_connections(self) -> None:
        """Abort every live socket now, with no close frame (the client sees 1006)."""
        for session in self.live_sessions:
            session.drop()

    async def expire_sessions(self) -> None:
        """Every live session hits its time limit now: `session_expired`, then close 1001."""
        await asyncio.gather(*(s.expire() for s in self.live_sessions))

    async def send_event(self, event: dict[str, Any]) -> None:
        """Send any server event (e.g. a `rate_limits.updated`) to every live session."""
        for session in self.live_sessions:
            try:
                await session.emit(event)
            except _Closed:
                pass

    async def send_error(
        self,
        code: str | None,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
    ) -> None:
        """Send an `error` event to every live session (the socket stays open)."""
        for session in self.live_sessions:
            try:
                await session.error(message, code, param, type_=type)
            except _Closed:
                pass

    async def wait_for_sessions(self, count: int, timeout: float = 5.0) -> SimSession:
        """Wait until `count` sessions were opened in all; returns the newest."""
        async with asyncio.timeout(timeout), self._new_session:
            await self._new_session.wait_for(lambda: len(self.sessions) >= count)
        return self.sessions[-1]

    # ---- connection handling ------------------------------------------------------------------

    def _json_response(
        self, conn: ServerConnection, status: HTTPStatus, error: dict[str, Any]
    ) -> Response:
        body = json.dumps({"error": error}).encode()
        headers = Headers(
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return Response(status.value, status.phrase, headers, body)

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        record = {"path": url.path, "query": parse_qs(url.query), "status": 101}
        self.handshakes.append(record)
        if url.path.rstrip("/") != "/v1/realtime":
            record["status"] = 404
            return self._json_response(
                conn,
                HTTPStatus.NOT_FOUND,
                {
                    "message": f"Invalid URL (GET {url.path})",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                },
            )
        if self.faults.reject_connections > 0:
            self.faults.reject_connections -= 1
            record["status"] = 503
            return self._json_response(
                conn,
                HTTPStatus.SERVICE_UNAVAILABLE,
                {
                    "message": "The server is overloaded. Please try again later.",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                },
            )
        auth = request.headers.get("Authorization", "")
        if not auth:
            record["status"] = 401
            return self._json_response(
                conn,
                HTTPStatus.UNAUTHORIZED,
                {
                    "message": "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                },
            )
        if auth != f"Bearer {self._api_key}" and not self.faults.key_error_as_event:
            record["status"] = 401
            return self._json_response(
                conn,
                HTTPStatus.UNAUTHORIZED,
                {
                    "message": "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                },
            )
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path).query)
        model = (query.get("model") or [""])[0]
        probe = SimSession(self, ws, model or "gpt-realtime-2")
        refused = True
        try:
            if ws.request.headers.get("Authorization") != f"Bearer {self._api_key}":
                await probe.error(
                    "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
                    "invalid_api_key",
                )
                await ws.close(1008, "invalid_api_key")
                return
            if ws.request.headers.get("OpenAI-Beta", "").startswith("realtime="):
                await probe.error(
                    "The beta Realtime API shape is no longer supported. Remove the 'OpenAI-Beta: realtime=v1' header and use the GA interface.",
                    "beta_api_shape_disabled",
                )
                await ws.close(4000, "invalid_request_error.beta_api_shape_disabled")
                return
            if not model:
                await probe.error(
                    "Missing required parameter: 'model'.", "missing_required_parameter", "model"
                )
                await ws.close(1008, "missing_required_parameter")
                return
            if model not in MODELS:
                await probe.error(
                    f"The model `{model}` does not exist or you do not have access to it.",
                    "model_not_found",
                    "model",
                )
                await ws.close(1008, "model_not_found")
                return
            refused = False
        except _Closed:
            return
        finally:
            if refused:
                probe.close_code = ws.close_code
                self.refused.append(probe)
        session = probe
        async with self._new_session:
            self.sessions.append(session)
            self._new_session.notify_all()
        try:
            await session.run()
        except (_Closed, ConnectionClosed):
            pass
        finally:
            session.close_code = ws.close_code
            await session.shutdown()
