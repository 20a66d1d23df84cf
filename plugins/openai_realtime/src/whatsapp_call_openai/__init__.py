"""OpenAI Realtime (GA, WebSocket) voice backend for whatsapp-call.

Registered through the `whatsapp_call` entry point as `openai`; answers when
`voiceBackend: openai` (the default).
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from whatsapp_call import hookimpl
from whatsapp_call import plugins as plugin_mod
from whatsapp_call.config import Settings
from whatsapp_call.errors import VoiceBackendError
from whatsapp_call.models import Call, CheckStatus, DoctorCheck, VoiceTool

from .session import KEY_HINT, RealtimeSession, _event_error, _http_error, _ws_log, realtime_url
from .settings import OpenAISettings

__all__ = ["OpenAISettings", "RealtimeSession", "probe"]

BACKEND = "openai"


@hookimpl
def voice_backend_names() -> list[str]:
    return [BACKEND]


@hookimpl
def settings_model() -> type[OpenAISettings]:
    return OpenAISettings


@hookimpl
def open_voice_session(call: Call, settings: Settings) -> RealtimeSession | None:
    if settings.voice_backend != BACKEND:
        return None
    tools: list[VoiceTool] = [
        tool
        for _, batch in plugin_mod.call_all_sync("voice_tools", call=call, settings=settings)
        for tool in batch
    ]
    return RealtimeSession(
        call,
        api_key=settings.secret("openai_api_key") or "",
        url=settings.openai_realtime_url,
        model=settings.openai_model,
        voice=call.voice or settings.voice,
        speed=call.voice_speed if call.voice_speed is not None else settings.voice_speed,
        language=call.language or settings.voice_language,
        instructions=call.instructions or settings.voice_instructions,
        options=settings.plugin_settings(OpenAISettings),  # type: ignore[arg-type]
        tools=tools,
    )


async def probe(settings: Settings, timeout: float = 10.0) -> str:
    """Connect, wait for `session.created`, close. Returns the session's model; raises
    `VoiceBackendError` (with a fix) when OpenAI refuses or cannot be reached."""
    url = realtime_url(settings.openai_realtime_url, settings.openai_model)
    host = urlsplit(url).netloc
    try:
        async with asyncio.timeout(timeout):
            async with connect(
                url,
                additional_headers={"Authorization": f"Bearer {settings.secret('openai_api_key')}"},
                max_size=None,
                compression=None,
                logger=_ws_log,
            ) as ws:
                while True:
                    event = json.loads(await ws.recv())
                    if event.get("type") == "error":
                        raise _event_error(event.get("error") or {})
                    if event.get("type") == "session.created":
                        return str(
                            (event.get("session") or {}).get("model") or settings.openai_model
                        )
    except InvalidStatus as exc:
        raise _http_error(exc.response.status_code, exc.response.body or b"") from None
    except TimeoutError:
        raise VoiceBackendError(
            f"OpenAI Realtime at {host} did not answer within {timeout:g} s.",
            "Check openaiRealtimeUrl and outbound WebSocket access (wss, port 443).",
        ) from None
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd else 1006
        raise VoiceBackendError(
            f"OpenAI Realtime at {host} closed the connection (code {code}).",
            "Check openaiModel and openaiApiKey.",
        ) from None
    except (OSError, InvalidHandshake, InvalidURI) as exc:
        raise VoiceBackendError(
            f"Cannot reach OpenAI Realtime at {host}: {type(exc).__name__}.",
            "Check openaiRealtimeUrl and that this host can open outbound WebSockets (wss, port 443).",
        ) from None


@hookimpl
async def doctor_checks(settings: Settings) -> list[DoctorCheck] | None:
    if settings.voice_backend != BACKEND or settings.remote:
        return None
    if settings.openai_api_key is None:
        return [DoctorCheck("openai key", CheckStatus.FAIL, "openaiApiKey is not set", KEY_HINT)]
    checks = [DoctorCheck("openai key", CheckStatus.OK, "openaiApiKey is set")]
    try:
        settings.plugin_settings(OpenAISettings)
        model = await probe(settings)
    except VoiceBackendError as exc:
        checks.append(DoctorCheck("openai realtime", CheckStatus.FAIL, exc.message, exc.hint))
    except Exception as exc:  # a doctor never crashes; it reports
        checks.append(
            DoctorCheck("openai realtime", CheckStatus.FAIL, f"check failed: {type(exc).__name__}")
        )
    else:
        host = urlsplit(settings.openai_realtime_url).netloc
        checks.append(
            DoctorCheck(
                "openai realtime", CheckStatus.OK, f"{host} opened a session (model {model})"
            )
        )
    return checks
