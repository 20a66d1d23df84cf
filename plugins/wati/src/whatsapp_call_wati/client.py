"""The WATI Calling API calls this plugin makes (spec whatsapp-calling-api.md §3.1-3.2).

Base `{watiBaseUrl}/{watiTenantId}/api/v1/openapi/whatsapp/calls`, Bearer token, optional
`channelPhoneNumber` query. Every answer is an envelope `{code, message, result}`: a `code`
other than 200 is a failure even when the HTTP status is 200.

WATI's outbound-call body is only `{"Sdp": offer}`: unlike Meta's
`biz_opaque_callback_data` it cannot carry our own call id, so WATI webhooks are correlated
by WATI's `callId` (returned here by `send_offer`) alone.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import httpx
from whatsapp_call.config import Settings
from whatsapp_call.errors import CallPermissionError, ConfigError, ProviderError
from whatsapp_call.models import (
    Call,
    PermissionRequestOutcome,
    PermissionRequestResult,
    PermissionState,
)
from whatsapp_call.providers.http import (
    ClientPool,
    HttpPolicy,
    json_object,
    send,
    unexpected_answer,
)
from whatsapp_call.providers.permissions import permission_state, refused_request_result
from whatsapp_call.redact import scrub

from .settings import http_policy

PROVIDER = "wati"
LABEL = "WATI"
API_PATH = "api/v1/openapi/whatsapp/calls"

pool = ClientPool()

# WATI passes Meta's calling errors through in `message`; these are the ones users hit.
HINTS: dict[int, str] = {
    100: "Meta rejected a parameter (for the SDP offer see the message): one Opus audio "
    "m-line, a=fingerprint:sha-256, a=setup:actpass, CRLF line endings.",
    138000: "Calling is not enabled on this WhatsApp number: ask WATI support to enable "
    "the Calling API (beta) for your channel.",
    138001: "The user cannot receive WhatsApp calls (not on WhatsApp, an old app, or only "
    "WhatsApp Web/Desktop).",
    138003: "A call with this user is still in progress: hang it up (or wait for it to end) "
    "before calling again.",
    138006: "The user has not allowed calls: run 'whatsapp-call permission request +NUMBER' "
    "and wait for them to accept.",
    138009: "The permission-request limit for this user is reached (1 per 24 h, 2 per 7 "
    "days): wait, or call once they grant permission.",
    138012: "The daily limit of connected calls to this user is reached: try again later.",
    138013: "Business-initiated calling is not available for this business number's country.",
    138015: "Calling needs a messaging limit of at least 2,000 business-initiated "
    "conversations per 24 h.",
    138017: "The user already allows calls permanently: no request is needed, just call.",
}
_META_CODE = re.compile(r"#(\d{3,6})\b|\bcode\D{0,3}(\d{3,6})\b|\b(13\d{4})\b", re.I)


# ---------------------------------------------------------------------------- plumbing


def token(settings: Settings) -> str:
    """The API token without a leading "Bearer " (users paste it either way)."""
    raw = (settings.secret("wati_api_token") or "").strip()
    if raw.lower().startswith("bearer "):
        raw = raw[7:].strip()
    if not raw:
        raise ConfigError(
            "watiApiToken is not set.",
            "Copy the access token from WATI (Connectors > API Docs) into watiApiToken "
            "(or WHATSAPP_CALL_WATI_API_TOKEN).",
        )
    return raw


def base_url(settings: Settings) -> str:
    if not settings.wati_tenant_id:
        raise ConfigError(
            "watiTenantId is not set.",
            "Set it to the number after the host in your WATI API URL "
            "(https://live-mt-server.wati.io/<tenant id>/...).",
        )
    return f"{settings.wati_base_url}/{quote(settings.wati_tenant_id, safe='')}/{API_PATH}"


def _params(settings: Settings) -> dict[str, str] | None:
    number = settings.wati_channel_phone_number
    if not number:
        return None
    return {"channelPhoneNumber": "".join(ch for ch in number if ch.isdigit())}


def _meta_code(text: str | None) -> int | None:
    """Meta's code inside a WATI message: "(#138006) ...", "code: 138006", or a bare 1380xx."""
    for match in _META_CODE.finditer(text or ""):
        code = int(next(group for group in match.groups() if group))
        if code in (100, 190, 613) or 130000 <= code < 140000:
            return code
    return None


def wati_error(
    what: str, *, http_status: int, code: Any = None, message: str | None = None
) -> ProviderError:
    """A failed answer (HTTP error, or an envelope whose `code` is not 200) with a hint."""
    message = scrub(message or "")[:300]
    meta_code = _meta_code(message)
    text = f"WATI: could not {what}: " + (message or f"HTTP {http_status}")
    if code not in (None, http_status) or (code is not None and not message):
        text += f" (code {code})"
    elif http_status >= 400 and message:
        text += f" (HTTP {http_status})"
    if meta_code in HINTS:  # WhatsApp's own refusal, passed through by WATI
        hint = HINTS[meta_code]
    elif http_status in (401, 403) or code in (401, 403, "401", "403"):
        hint = (
            "WATI rejected the API token: copy it again from WATI (Connectors > API Docs) into "
            "watiApiToken; it changes when the account password changes."
        )
    elif http_status == 404 and meta_code is None:
        hint = "Check watiBaseUrl and watiTenantId (both are in your WATI API URL)."
    else:
        hint = "Check the WATI message above; WATI support can explain its error codes."
    cls = CallPermissionError if meta_code == 138006 else ProviderError
    return cls(
        text.rstrip(".") + ".",
        hint,
        provider=PROVIDER,
        code=meta_code if meta_code is not None else code,
        http_status=http_status,
        details=message or None,
        retryable=http_status == 429 or http_status >= 500,
    )


def _response_error(response: httpx.Response, what: str) -> ProviderError:
    code = message = None
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        code = data.get("code")
        message = data.get("message") or data.get("error") or data.get("title")
        message = str(message) if message is not None else None
    if message is None:
        message = response.text.strip().replace("\n", " ")[:200] or None
    return wati_error(what, http_status=response.status_code, code=code, message=message)


async def _wati(
    settings: Settings,
    method: str,
    path: str,
    what: str,
    *,
    json_body: Any = None,
    idempotent: bool = False,
    policy: HttpPolicy | None = None,
) -> Any:
    """One WATI call; returns the envelope's `result` (None when absent)."""
    response = await send(
        pool,
        method,
        f"{base_url(settings)}/{path}",
        provider=PROVIDER,
        label=LABEL,
        what=what,
        policy=policy or http_policy(settings),
        error_from_response=lambda r: _response_error(r, what),
        headers={"Authorization": f"Bearer {token(settings)}", "Accept": "application/json"},
        params=_params(settings),
        json=json_body,
        idempotent=idempotent,
    )
    data = json_object(
        response,
        provider=PROVIDER,
        label=LABEL,
        what=what,
        hint="Check watiBaseUrl: it must be the WATI API host (e.g. https://live-mt-server.wati.io).",
    )
    code = data.get("code")
    if code is not None and str(code).strip() != "200":
        message = data.get("message")
        raise wati_error(
            what,
            http_status=response.status_code,
            code=int(code) if isinstance(code, str) and code.strip().isdigit() else code,
            message=str(message) if message is not None else None,
        )
    return data.get("result")


def _unexpected(what: str, data: Any, missing: str) -> ProviderError:
    return unexpected_answer(
        data,
        missing,
        provider=PROVIDER,
        label=LABEL,
        what=what,
        hint="Check watiBaseUrl; this may be a WATI API change.",
    )


# ---------------------------------------------------------------------------- operations


async def check_permission(call: Call, settings: Settings) -> PermissionState:
    what = "check call permission"
    result = await _wati(settings, "GET", f"permissions/{call.to.wa_id}", what, idempotent=True)
    if not isinstance(result, dict):
        raise _unexpected(what, result, "result object")
    return permission_state(result, PROVIDER, what, label=LABEL)


async def request_permission(call: Call, settings: Settings) -> PermissionRequestResult:
    what = "send the call-permission request"
    try:
        result = await _wati(settings, "POST", f"call-permission-request/{call.to.wa_id}", what)
    except ProviderError as exc:  # 138017 / 138009 are outcomes; anything else is raised
        return await refused_request_result(exc, lambda: check_permission(call, settings))
    message_id = None
    if isinstance(result, dict):
        for key in ("messageId", "id", "wamid"):
            if result.get(key):
                message_id = str(result[key])
                break
    return PermissionRequestResult(
        PermissionRequestOutcome.SENT,
        message_id=message_id,
        detail="Permission request sent; the user's answer arrives by webhook.",
    )


async def send_offer(call: Call, sdp: str, settings: Settings) -> str:
    what = "place the call"
    result = await _wati(
        settings, "POST", f"outbound-call/{call.to.wa_id}", what, json_body={"Sdp": sdp}
    )
    call_id = result.get("callId") if isinstance(result, dict) else None
    if not call_id:
        raise _unexpected(what, result, "result.callId")
    return str(call_id)


async def terminate_call(call: Call, settings: Settings) -> bool:
    if not call.provider_call_id:
        return False  # never reached WATI: nothing to hang up
    await _wati(
        settings,
        "POST",
        f"{quote(call.provider_call_id, safe='')}/terminate",
        "hang up the call",
        idempotent=True,  # terminating twice is harmless
    )
    return True


async def probe(settings: Settings, policy: HttpPolicy) -> httpx.Response:
    """A permission lookup used only by doctor: its HTTP status tells token and tenant apart."""
    client = await pool.get()
    number = "".join(ch for ch in (settings.wati_channel_phone_number or "") if ch.isdigit())
    return await client.get(
        f"{base_url(settings)}/permissions/{number or '10000000000'}",
        headers={"Authorization": f"Bearer {token(settings)}", "Accept": "application/json"},
        params=_params(settings),
        timeout=policy.timeout,
    )
