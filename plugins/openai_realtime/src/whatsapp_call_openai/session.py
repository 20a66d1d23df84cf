"""A `VoiceSession` on the OpenAI Realtime API (GA interface, WebSocket, PCM16 24 kHz).

One WebSocket per session. When the socket drops or the server ends the session
(`session_expired`, the 60-minute limit), a new one is opened with the same configuration
and a short summary of the call so far: the caller hears a moment of silence, not a hang-up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from whatsapp_call.errors import VoiceBackendError
from whatsapp_call.models import Call, VoiceTool
from whatsapp_call.redact import remember_secret, scrub
from whatsapp_call.voice import VoiceEvent, VoiceEventType, VoiceSession

from .settings import OpenAISettings

log = logging.getLogger("whatsapp_call_openai")
_tls: ssl.SSLContext | None = None

KEY_HINT = (
    "Check openaiApiKey: it must be a valid OpenAI API key (sk-...) of a project with "
    "access to the Realtime API."
)
BENIGN_ERRORS = {
    "response_cancel_not_active",
    "conversation_already_has_active_response",
    "input_audio_buffer_commit_empty",
}
FATAL_ERRORS = {
    "invalid_api_key",
    "insufficient_quota",
    "beta_api_shape_disabled",
    "model_not_found",
}
BACKLOG_BYTES = 2 * 48_000  # caller audio kept while reconnecting: 2 s of PCM16 24 kHz
SUMMARY_LINES = 12
LANGUAGES = {
    "ar": "Arabic",
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "fr": "French",
    "hi": "Hindi",
    "id": "Indonesian",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "nl": "Dutch",
    "pl": "Polish",
    "pt": "Portuguese",
    "ru": "Russian",
    "sw": "Swahili",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "zh": "Chinese",
}
DEFAULT_INSTRUCTIONS = (
    "You are a friendly, helpful voice assistant speaking with someone on a WhatsApp call."
)
CALL_RULES = (
    "This is a live phone call: keep your answers short and natural, one or two sentences. "
    "When the conversation is over, or the person asks to end it, say a short goodbye and then "
    "call the end_call function."
)
END_CALL_TOOL = {
    "type": "function",
    "name": "end_call",
    "description": "Hang up the phone call. Call it after you have said goodbye, when the "
    "conversation is over or the person wants to end it.",
    "parameters": {
        "type": "object",
        "properties": {"reason": {"type": "string", "description": "Why the call ends."}},
        "required": [],
    },
}


class _ScrubSecrets(logging.Filter):
    """websockets logs request headers at debug level: keep the Bearer key out of logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = ()
        return True


_ws_log = logging.getLogger("whatsapp_call_openai.websocket")
_ws_log.addFilter(_ScrubSecrets())


def language_name(code: str) -> str:
    name = LANGUAGES.get(code.split("-")[0].lower())
    return f"{name} ({code})" if name else code


def realtime_url(base: str, model: str) -> str:
    return f"{base}{'&' if '?' in base else '?'}model={quote(model)}"


def build_instructions(instructions: str | None, language: str | None) -> str:
    parts = [instructions or DEFAULT_INSTRUCTIONS]
    if language:
        parts.append(
            f"Always speak {language_name(language)}, whatever language the caller uses, "
            "unless they ask you to switch."
        )
    parts.append(CALL_RULES)
    return "\n\n".join(parts)


def greeting_instructions(text: str, language: str | None) -> str:
    """Makes the model say the greeting verbatim (the quoted passage is the text)."""
    lang = f", in {language_name(language)}" if language else ""
    clean = text.replace('"', "'")
    return (
        f'Greet the caller by saying exactly this, word for word{lang}, and nothing else: "{clean}"'
    )


def _reason(arguments: str | None) -> str:
    try:
        reason = json.loads(arguments or "{}").get("reason")
    except (ValueError, AttributeError):
        reason = None
    return str(reason or "the assistant ended the call")


def _http_error(status: int, body: bytes) -> VoiceBackendError:
    try:
        error = json.loads(body or b"{}").get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    code = error.get("code") if isinstance(error, dict) else None
    if status == 401:
        return VoiceBackendError(
            f"OpenAI Realtime refused the API key (HTTP 401{' ' + code if code else ''}).",
            KEY_HINT,
            code=code or "invalid_api_key",
        )
    if status == 403:
        return VoiceBackendError(
            "OpenAI Realtime refused access (HTTP 403): this key or project may not use the "
            "Realtime API, or not from this region.",
            "Check openaiApiKey and the project's model access in the OpenAI dashboard.",
            code=code,
        )
    if status == 404:
        return VoiceBackendError(
            "OpenAI Realtime URL not found (HTTP 404).",
            "Check openaiRealtimeUrl (default wss://api.openai.com/v1/realtime).",
            code=code,
        )
    if status == 429:
        return VoiceBackendError(
            "OpenAI Realtime is rate limiting this key (HTTP 429).",
            "Wait and retry, or raise the project's rate limits / check its billing.",
            fatal=False,
            code=code,
        )
    return VoiceBackendError(
        f"OpenAI Realtime answered HTTP {status} instead of opening the WebSocket.",
        "Retry later; check status.openai.com if it persists.",
        fatal=status < 500,
        code=code,
    )


def _event_error(error: dict[str, Any]) -> VoiceBackendError:
    code = error.get("code")
    message = scrub(str(error.get("message") or "unknown error"))
    hint = "See the OpenAI Realtime error above; check the openai* options."
    if code == "invalid_api_key":
        hint = KEY_HINT
    elif code == "model_not_found":
        hint = "Check openaiModel (e.g. gpt-realtime-2) and that your project can use it."
    elif code == "insufficient_quota":
        hint = "Add credit or raise the quota of the OpenAI project."
    elif code == "beta_api_shape_disabled":
        hint = "Use the GA interface: no OpenAI-Beta header."
    elif (error.get("param") or "").startswith("session.audio.output.voice"):
        hint = "Check the voice option (marin, cedar, alloy, ash, ballad, coral, echo, sage, shimmer, verse)."
    elif (error.get("param") or "").startswith("session"):
        hint = f"OpenAI refused {error.get('param')}; check the matching option."
    return VoiceBackendError(f"OpenAI Realtime error: {message}", hint, fatal=True, code=code)


async def _tls_context() -> ssl.SSLContext:
    """One TLS context for every wss:// connection of this process, built in a thread. Left
    to websockets, each connection builds its own (`ssl.create_default_context()` loads the CA
    store: ~50 ms holding the event loop that carries the other calls' audio, at every call
    set-up and reconnect). The same defaults: certificate and host name verified."""
    global _tls
    if _tls is None:
        _tls = await asyncio.to_thread(ssl.create_default_context)
    return _tls


class RealtimeSession(VoiceSession):
    """See the module docstring. Create with `open_voice_session`, then `start()`."""

    sample_rate = 24000

    def __init__(
        self,
        call: Call,
        *,
        api_key: str,
        url: str,
        model: str,
        voice: str,
        speed: float,
        language: str | None,
        instructions: str | None,
        options: OpenAISettings,
        tools: list[VoiceTool] | None = None,
    ):
        remember_secret(api_key)
        self._api_key = api_key
        self.call = call
        self.model = model
        self.url = realtime_url(url, model)
        self.voice = voice
        self.speed = speed
        self.language = language
        self.instructions = build_instructions(instructions, language)
        self.options = options
        self.tools = {t.name: t for t in tools or []}
        self._events: asyncio.Queue[VoiceEvent | None] = asyncio.Queue()
        self._ws: ClientConnection | None = None
        self._runner: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._closed = False
        self._expired = False
        self._transcript: list[tuple[str, str]] = []
        self._item_bytes: dict[str, int] = {}  # assistant audio received, per item (this socket)
        self._items_done: set[str] = set()
        self._response_active = False
        self._response_audio: dict[str, int] = {}
        self._current_response: str | None = None
        self._last_request: dict[str, Any] | None = None  # params of our last response.create
        self._inflight_request: dict[str, Any] | None = None  # ours, if the active one is ours
        self._pending: dict[str, Any] | None = None  # response.create waiting for response.done
        self._end_reason: str | None = None
        self._end_response: str | None = None
        self._end_after_next = False
        self._backlog: deque[bytes] = deque()
        self._backlog_size = 0
        self.sessions_opened = 0
        self.last_rate_limits: list[dict[str, Any]] = []

    def __repr__(self) -> str:
        return f"RealtimeSession(call={self.call.id!r}, model={self.model!r}, url={urlsplit(self.url).netloc!r})"

    # ---- configuration ------------------------------------------------------------------------

    def session_config(self) -> dict[str, Any]:
        o = self.options
        if o.openai_vad == "semantic_vad":
            turn = {
                "type": "semantic_vad",
                "eagerness": o.openai_vad_eagerness,
                "create_response": True,
                "interrupt_response": True,
            }
        else:
            turn = {
                "type": "server_vad",
                "threshold": o.openai_vad_threshold,
                "prefix_padding_ms": o.openai_vad_prefix_padding_ms,
                "silence_duration_ms": o.openai_vad_silence_ms,
                "create_response": True,
                "interrupt_response": True,
            }
        audio_in: dict[str, Any] = {
            "format": {"type": "audio/pcm", "rate": 24000},
            "turn_detection": turn,
            "noise_reduction": None
            if o.openai_noise_reduction == "off"
            else {"type": o.openai_noise_reduction},
        }
        if o.openai_transcription_model:
            transcription: dict[str, Any] = {"model": o.openai_transcription_model}
            if self.language:
                transcription["language"] = self.language.split("-")[0].lower()
            audio_in["transcription"] = transcription
        tools = [END_CALL_TOOL] + [
            {
                "type": "function",
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
            }
            for t in self.tools.values()
            if t.name != "end_call"
        ]
        return {
            "type": "realtime",
            "output_modalities": ["audio"],
            "instructions": self.instructions,
            "audio": {
                "input": audio_in,
                "output": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "voice": self.voice,
                    "speed": self.speed,
                },
            },
            "tools": tools,
            "tool_choice": "auto",
        }

    # ---- connection -----------------------------------------------------------------------------

    async def _open(self) -> ClientConnection:
        """Connect, wait for session.created, configure, wait for session.updated."""
        timeout = self.options.openai_connect_timeout_seconds
        tls = {"ssl": await _tls_context()} if urlsplit(self.url).scheme == "wss" else {}
        try:
            ws = await connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {self._api_key}"},
                max_size=None,
                compression=None,
                open_timeout=timeout,
                logger=_ws_log,
                **tls,
            )
        except InvalidStatus as exc:
            raise _http_error(exc.response.status_code, exc.response.body or b"") from None
        except InvalidURI:
            raise VoiceBackendError(
                f"openaiRealtimeUrl is not a WebSocket URL: {urlsplit(self.url).netloc!r}.",
                "Use wss://api.openai.com/v1/realtime (or your proxy's ws:// or wss:// URL).",
            ) from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise VoiceBackendError(
                f"Cannot reach OpenAI Realtime at {urlsplit(self.url).netloc}: {scrub(str(exc)) or type(exc).__name__}.",
                "Check openaiRealtimeUrl and that this host can open outbound WebSockets (wss, port 443).",
                fatal=False,
            ) from None
        try:
            async with asyncio.timeout(timeout):
                await self._expect(ws, "session.created")
                await ws.send(
                    json.dumps({"type": "session.update", "session": self.session_config()})
                )
                await self._expect(ws, "session.updated")
        except TimeoutError:
            await ws.close()
            raise VoiceBackendError(
                f"OpenAI Realtime did not confirm the session within {timeout:g} s.",
                "Retry; raise openaiConnectTimeoutSeconds on slow networks.",
                fatal=False,
            ) from None
        except BaseException:
            await ws.close()
            raise
        self.sessions_opened += 1
        self._item_bytes.clear()
        self._items_done.clear()
        return ws

    async def _expect(self, ws: ClientConnection, wanted: str) -> dict[str, Any]:
        while True:
            try:
                event = json.loads(await ws.recv())
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else 1006
                reason = exc.rcvd.reason if exc.rcvd else ""
                raise VoiceBackendError(
                    f"OpenAI Realtime closed the connection while setting up (code {code}{': ' + reason if reason else ''}).",
                    "Check openaiModel and openaiApiKey; retry later if it persists.",
                    fatal=code in (1008, 4000),
                ) from None
            if event.get("type") == "error":
                raise _event_error(event.get("error") or {})
            if event.get("type") == wanted:
                return event

    async def start(self) -> None:
        if not self._api_key:
            raise VoiceBackendError("openaiApiKey is not set.", KEY_HINT, code="missing_api_key")
        try:
            self._ws = await self._open()
        except VoiceBackendError as exc:
            raise VoiceBackendError(exc.message, exc.hint, fatal=True, code=exc.code) from None
        self._runner = asyncio.get_running_loop().create_task(self._run())

    async def _reconnect(self) -> ClientConnection:
        attempts = max(1, self.options.openai_reconnect_attempts)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=0.5, min=0.25, max=8),
            retry=retry_if_exception(lambda e: isinstance(e, VoiceBackendError) and not e.fatal),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                n = attempt.retry_state.attempt_number
                log.info(
                    "call %s: reconnecting to OpenAI Realtime (attempt %d/%d)",
                    self.call.id,
                    n,
                    attempts,
                )
                return await self._open()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _run(self) -> None:
        """Read events; on a lost socket, reconnect and carry on."""
        try:
            while not self._closing:
                ws = self._ws
                assert ws is not None
                try:
                    async for raw in ws:
                        await self._handle(json.loads(raw))
                except ConnectionClosed:
                    pass
                if self._closing:
                    break
                why = (
                    "session expired"
                    if self._expired
                    else f"connection lost (code {ws.close_code})"
                )
                log.warning("call %s: OpenAI Realtime %s; opening a new session", self.call.id, why)
                resume = self._on_disconnect()
                self._ws = None
                try:
                    ws = await self._reconnect()
                except VoiceBackendError as exc:
                    if not self._closing:
                        await self._emit(
                            VoiceEvent(VoiceEventType.ERROR, text=str(exc), fatal=True)
                        )
                    return
                if self._closing:
                    await ws.close()
                    return
                self._ws = ws
                self._expired = False
                await self._restore(resume)
                await self._emit(VoiceEvent(VoiceEventType.RECONNECTED, text=why))
        except Exception as exc:  # never die silently: the bridge must learn the session ended
            log.exception("call %s: OpenAI session reader failed", self.call.id)
            await self._emit(
                VoiceEvent(VoiceEventType.ERROR, text=f"OpenAI session failed: {exc}", fatal=True)
            )
        finally:
            self._events.put_nowait(None)

    def _on_disconnect(self) -> dict[str, Any] | None:
        """What to resume on the new session: the cut-off reply, if one was in flight."""
        resume = None
        if self._response_active:
            resume = self._inflight_request or {}
            self._response_active = False
            self._events.put_nowait(VoiceEvent(VoiceEventType.RESPONSE_DONE, item_id=None))
        elif self._pending is not None:
            resume = self._pending
        self._pending = None
        self._current_response = None
        return resume

    async def _restore(self, resume: dict[str, Any] | None) -> None:
        summary = self.summary()
        if summary:
            await self._send(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "system",
                        "content": [{"type": "input_text", "text": summary}],
                    },
                }
            )
        while self._backlog:
            chunk = self._backlog.popleft()
            await self._send(
                {"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()}
            )
        self._backlog_size = 0
        if resume is None:
            resume, self._pending = self._pending, None  # e.g. a greeting asked for meanwhile
        if resume is not None:
            await self._request_response(resume or None)

    def summary(self) -> str:
        """A short context for a new session: the last lines of the conversation."""
        if not self._transcript:
            return ""
        lines = [
            f"{'Caller' if role == 'user' else 'You'}: {text[:300]}"
            for role, text in self._transcript[-SUMMARY_LINES:]
        ]
        return (
            "The phone call continues after a technical reconnection; the caller is still on the "
            "line. Do not greet again. The conversation so far:\n" + "\n".join(lines)
        )

    async def _send(self, event: dict[str, Any]) -> bool:
        ws = self._ws
        if ws is None:
            return False
        try:
            await ws.send(json.dumps(event))
            return True
        except ConnectionClosed:
            return False

    async def _emit(self, event: VoiceEvent) -> None:
        await self._events.put(event)

    # ---- VoiceSession -----------------------------------------------------------------------------

    async def send_audio(self, pcm: bytes) -> None:
        if not pcm or self._closed:
            return
        if self._ws is not None and await self._send(
            {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}
        ):
            return
        self._backlog.append(pcm)  # reconnecting: keep the last 2 s for the new session
        self._backlog_size += len(pcm)
        while self._backlog_size > BACKLOG_BYTES and self._backlog:
            self._backlog_size -= len(self._backlog.popleft())

    async def greet(self, text: str) -> None:
        await self._request_response(
            {
                "instructions": greeting_instructions(text, self.language),
                "output_modalities": ["audio"],
                "metadata": {"purpose": "greeting"},
            }
        )

    async def events(self) -> AsyncIterator[VoiceEvent]:
        while True:
            event = await self._events.get()
            if event is None:
                self._events.put_nowait(None)  # a second reader ends too
                return
            yield event

    async def playback_interrupted(self, item_id: str, played_ms: int) -> None:
        received = self._item_bytes.get(item_id)
        if played_ms <= 0 or received is None:
            return  # nothing heard, or an item of a previous socket: nothing to correct
        received_ms = received // 48
        if item_id in self._items_done and played_ms >= received_ms:
            return  # the caller heard it all; truncating would make the model repeat itself
        await self._send(
            {
                "type": "conversation.item.truncate",
                "item_id": item_id,
                "content_index": 0,
                "audio_end_ms": min(played_ms, received_ms),
            }
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        for task in list(self._tasks):
            task.cancel()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._events.put_nowait(None)

    # ---- responses and tools ------------------------------------------------------------------------

    async def _request_response(self, params: dict[str, Any] | None = None) -> None:
        """response.create now, or after the active response (only one at a time)."""
        if self._response_active or self._ws is None:
            self._pending = params or {}
            return
        self._response_active = True
        self._last_request = params or {}
        self._inflight_request = self._last_request
        event: dict[str, Any] = {"type": "response.create"}
        if params:
            event["response"] = params
        if not await self._send(event):
            self._pending = params or {}

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tool_call(self, name: str, call_id: str, raw_args: str, response_id: str) -> None:
        try:
            arguments = json.loads(raw_args or "{}")
        except ValueError:
            arguments = {}
        tool = self.tools.get(name)
        if name == "end_call":
            output = json.dumps({"status": "ending the call"})
            if tool is not None:
                output = await self._run_tool(tool, arguments) or output
            await self._send_output(call_id, output)
            return
        if tool is None:
            await self._send_output(call_id, json.dumps({"error": f"unknown function {name!r}"}))
        else:
            await self._send_output(call_id, await self._run_tool(tool, arguments))
        await self._request_response()

    async def _run_tool(self, tool: VoiceTool, arguments: dict[str, Any]) -> str:
        try:
            async with asyncio.timeout(self.options.openai_tool_timeout_seconds):
                result = await tool.handler(arguments)
        except TimeoutError:
            return json.dumps({"error": f"{tool.name} timed out"})
        except Exception as exc:
            log.warning("call %s: tool %s failed: %s", self.call.id, tool.name, scrub(str(exc)))
            return json.dumps({"error": scrub(str(exc))})
        return result if isinstance(result, str) else json.dumps(result)

    async def _send_output(self, call_id: str, output: str) -> None:
        await self._send(
            {
                "type": "conversation.item.create",
                "item": {"type": "function_call_output", "call_id": call_id, "output": output},
            }
        )

    # ---- server events ---------------------------------------------------------------------------

    async def _handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "response.output_audio.delta":
            audio = base64.b64decode(event.get("delta") or "")
            item_id = event.get("item_id")
            if item_id:
                self._item_bytes[item_id] = self._item_bytes.get(item_id, 0) + len(audio)
            rid = event.get("response_id") or ""
            self._response_audio[rid] = self._response_audio.get(rid, 0) + len(audio)
            await self._emit(VoiceEvent(VoiceEventType.AUDIO, audio=audio, item_id=item_id))
        elif kind == "response.output_audio.done":
            if event.get("item_id"):
                self._items_done.add(event["item_id"])
        elif kind == "response.output_audio_transcript.delta":
            await self._emit(self._transcript_event("assistant", event, "delta", final=False))
        elif kind == "response.output_audio_transcript.done":
            await self._emit(self._transcript_event("assistant", event, "transcript", final=True))
        elif kind == "conversation.item.input_audio_transcription.delta":
            await self._emit(self._transcript_event("user", event, "delta", final=False))
        elif kind == "conversation.item.input_audio_transcription.completed":
            await self._emit(self._transcript_event("user", event, "transcript", final=True))
        elif kind == "conversation.item.input_audio_transcription.failed":
            log.warning(
                "call %s: caller transcription failed: %s",
                self.call.id,
                (event.get("error") or {}).get("message"),
            )
        elif kind == "input_audio_buffer.speech_started":
            await self._emit(
                VoiceEvent(VoiceEventType.SPEECH_STARTED, item_id=event.get("item_id"))
            )
        elif kind == "input_audio_buffer.speech_stopped":
            await self._emit(
                VoiceEvent(VoiceEventType.SPEECH_STOPPED, item_id=event.get("item_id"))
            )
        elif kind == "response.created":
            self._response_active = True
            self._current_response = (event.get("response") or {}).get("id")
        elif kind == "response.function_call_arguments.done":
            if event.get("name") == "end_call":  # decided now: response.done may follow at once
                self._end_response = event.get("response_id") or ""
                self._end_reason = _reason(event.get("arguments"))
            self._spawn(
                self._tool_call(
                    event.get("name") or "",
                    event.get("call_id") or "",
                    event.get("arguments") or "",
                    event.get("response_id") or "",
                )
            )
        elif kind == "response.done":
            await self._response_done(event.get("response") or {})
        elif kind == "rate_limits.updated":
            self.last_rate_limits = event.get("rate_limits") or []
        elif kind == "error":
            await self._error(event.get("error") or {})

    def _transcript_event(
        self, role: str, event: dict[str, Any], field: str, *, final: bool
    ) -> VoiceEvent:
        text = event.get(field) or ""
        if final and text:
            self._transcript.append((role, text))
        return VoiceEvent(
            VoiceEventType.TRANSCRIPT,
            role=role,
            text=text,
            final=final,
            item_id=event.get("item_id"),
        )

    async def _response_done(self, response: dict[str, Any]) -> None:
        rid = response.get("id") or ""
        self._response_active = False
        self._current_response = None
        self._inflight_request = None
        status = response.get("status")
        await self._emit(VoiceEvent(VoiceEventType.RESPONSE_DONE, text=str(status or "")))
        if status == "failed":
            error = (response.get("status_details") or {}).get("error") or {}
            code = error.get("code")
            await self._emit(
                VoiceEvent(
                    VoiceEventType.ERROR,
                    text=f"OpenAI reply failed: {scrub(str(error.get('message') or code or 'unknown'))}",
                    fatal=code in FATAL_ERRORS,
                )
            )
        spoke = self._response_audio.pop(rid, 0) > 0
        if self._end_after_next and status != "cancelled":
            self._end_after_next = False
            await self._emit(VoiceEvent(VoiceEventType.END_CALL, text=self._end_reason or ""))
            return
        if self._end_response == rid and rid:
            self._end_response = None
            if spoke:
                await self._emit(VoiceEvent(VoiceEventType.END_CALL, text=self._end_reason or ""))
                return
            self._end_after_next = True  # the model hung up without a goodbye: ask for one
            await self._request_response(
                {
                    "instructions": "Say a short, polite goodbye to the caller now.",
                    "output_modalities": ["audio"],
                }
            )
            return
        if self._pending is not None:
            params, self._pending = self._pending, None
            await self._request_response(params or None)

    async def _error(self, error: dict[str, Any]) -> None:
        code = error.get("code")
        message = scrub(str(error.get("message") or ""))
        if code == "conversation_already_has_active_response":
            if self._last_request is not None and self._pending is None:
                self._pending = self._last_request  # retried after that response is done
            return
        if code in BENIGN_ERRORS:
            log.debug("call %s: OpenAI (benign) %s: %s", self.call.id, code, message)
            return
        if code == "session_expired":
            self._expired = True  # the server closes next; _run opens a new session
            log.info("call %s: OpenAI session expired; rolling over", self.call.id)
            return
        err = _event_error(error)
        log.warning("call %s: OpenAI Realtime error %s: %s", self.call.id, code, message)
        await self._emit(
            VoiceEvent(VoiceEventType.ERROR, text=str(err), fatal=code in FATAL_ERRORS)
        )
