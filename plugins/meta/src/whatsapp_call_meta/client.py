"""The Meta Graph API calls this plugin makes (spec whatsapp-calling-api.md §1).

Every function takes the validated core `Settings`; the access token goes only into the
`Authorization` header (never the URL), so no error or log line can carry it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
    RateLimiter,
    json_object,
    send,
    unexpected_answer,
)
from whatsapp_call.providers.permissions import permission_state, refused_request_result
from whatsapp_call.redact import scrub

from .settings import http_policy

PROVIDER = "meta"
LABEL = "Meta"
PERMISSION_CHECKS_PER_SECOND = 5  # Meta: 5 call_permissions requests / 1 s, else error 613

pool = ClientPool()
_limiters: dict[str, RateLimiter] = {}

# One line on what to do about the codes users actually hit (spec §1.11, §5).
HINTS: dict[int, str] = {
    10: "The access token lacks a permission: give the system user whatsapp_business_messaging "
    "(and whatsapp_business_management for settings) on this WhatsApp account.",
    100: "Meta rejected a parameter (for the SDP offer see the details): one Opus audio "
    "m-line, a=fingerprint:sha-256, a=setup:actpass, CRLF line endings.",
    190: "The access token is invalid or expired: create a new system-user token and set "
    "metaAccessToken.",
    613: "Too many permission checks (limit 5 per second per number): slow down and retry.",
    131009: "Interactive call-permission requests are not supported for this business "
    "number's country.",
    131030: "This test number may only message its allowed recipients: add the callee in the "
    "Meta app dashboard (WhatsApp > API Setup > To).",
    131047: "More than 24 h passed since the user last wrote, so a free-form permission "
    "request cannot be sent: set metaPermissionTemplate to an approved template with a "
    "call_permission_request component.",
    131055: "SIP is enabled on this number, which disables Graph API calling: turn SIP off "
    "in the calling settings.",
    138000: "Calling is not enabled on this number: enable it in WhatsApp Manager (Phone "
    'numbers > Call settings) or POST /{phone-number-id}/settings {"calling": '
    '{"status": "ENABLED"}}.',
    138001: "The user cannot receive WhatsApp calls (not on WhatsApp, an old app, or only "
    "WhatsApp Web/Desktop).",
    138002: "The number has 1000 calls in progress: wait for some to end.",
    138003: "A call with this user is still in progress: hang it up (or wait for it to end) "
    "before calling again.",
    138004: "Meta had a connection error: try again shortly.",
    138005: "Too many calls from this number in a short time: slow down and retry later.",
    138006: "The user has not allowed calls: run 'whatsapp-call permission request +NUMBER' "
    "and wait for them to accept.",
    138007: "The call was not connected in time: the answer SDP must be applied and ICE/DTLS "
    "completed quickly; check that webhooks reach this service.",
    138009: "The permission-request limit for this user is reached (1 per 24 h, 2 per 7 "
    "days): wait, or call once they grant permission.",
    138012: "The daily limit of connected calls to this user is reached: try after the time "
    "in the details.",
    138013: "Business-initiated calling is not available for this business number's country "
    "(USA, Canada, Turkey, Egypt, Vietnam, Nigeria): use a number from another country.",
    138014: "Calling is temporarily disabled for this number because of low call quality or "
    "user feedback: see WhatsApp Manager.",
    138015: "Calling needs a messaging limit of at least 2,000 business-initiated "
    "conversations per 24 h: raise the limit (test numbers are exempt).",
    138017: "The user already allows calls permanently: no request is needed, just call.",
    138018: "Subscribe your app to the 'calls' webhook field (and make sure SIP is off), "
    "then enable calling again.",
}
RETRYABLE_CODES = {613, 138002, 138004, 138005}
ERROR_CODES_URL = "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes"


# ---------------------------------------------------------------------------- plumbing


def _phone_number_id(settings: Settings) -> str:
    if not settings.meta_phone_number_id:
        raise ConfigError(
            "metaPhoneNumberId is not set.",
            "Set it to the Graph id of your business number (WhatsApp Manager > API Setup), "
            "not the phone number itself.",
        )
    return settings.meta_phone_number_id


def _headers(settings: Settings) -> dict[str, str]:
    token = settings.secret("meta_access_token")
    if not token:
        raise ConfigError(
            "metaAccessToken is not set.",
            "Create a system-user access token with whatsapp_business_messaging and set "
            "metaAccessToken (or WHATSAPP_CALL_META_ACCESS_TOKEN).",
        )
    return {"Authorization": f"Bearer {token}", "Accept": "application/json"}


def graph_url(settings: Settings, path: str = "") -> str:
    """`{metaGraphBaseUrl}/{metaGraphVersion}/{metaPhoneNumberId}{path}`."""
    return (
        f"{settings.meta_graph_base_url}/{settings.meta_graph_version}/"
        f"{_phone_number_id(settings)}{path}"
    )


def graph_error(response: httpx.Response, what: str) -> ProviderError:
    """A Graph error envelope (or any failed response) as a ProviderError with a hint."""
    body: Any = None
    try:
        body = response.json()
    except ValueError:
        pass
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        text = scrub(response.text.strip().replace("\n", " "))[:200]
        hint = (
            "Check metaAccessToken." if response.status_code in (401, 403) else None
        ) or "Check metaGraphBaseUrl and try again later."
        return ProviderError(
            f"Meta: could not {what}: HTTP {response.status_code}"
            + (f" ({text})" if text else "")
            + ".",
            hint,
            provider=PROVIDER,
            http_status=response.status_code,
            retryable=response.status_code == 429 or response.status_code >= 500,
        )
    raw_code = error.get("code")
    code: int | str | None = raw_code
    if isinstance(raw_code, str) and raw_code.isdigit():
        code = int(raw_code)
    message = scrub(str(error.get("message") or "no message"))
    error_data = error.get("error_data")
    details = error_data.get("details") if isinstance(error_data, dict) else None
    details = scrub(str(details)) if details else None
    text = f"Meta: could not {what}: {message}"
    if code is not None and f"#{code}" not in message:
        text += f" (code {code})"
    if details and details not in message:
        text += f"; details: {details}"
    hint = HINTS.get(code) if isinstance(code, int) else None
    if hint is None:
        hint = f"See Meta's error code {code} at {ERROR_CODES_URL}."
    cls = CallPermissionError if code == 138006 else ProviderError
    return cls(
        text + ".",
        hint,
        provider=PROVIDER,
        code=code,
        http_status=response.status_code,
        details=details,
        retryable=code in RETRYABLE_CODES
        or response.status_code == 429
        or response.status_code >= 500,
    )


async def _graph(
    settings: Settings,
    method: str,
    url: str,
    what: str,
    *,
    json_body: Any = None,
    params: Mapping[str, str] | None = None,
    idempotent: bool = False,
    policy: HttpPolicy | None = None,
) -> dict[str, Any]:
    response = await send(
        pool,
        method,
        url,
        provider=PROVIDER,
        label=LABEL,
        what=what,
        policy=policy or http_policy(settings),
        error_from_response=lambda r: graph_error(r, what),
        headers=_headers(settings),
        params=params,
        json=json_body,
        idempotent=idempotent,
    )
    return json_object(
        response,
        provider=PROVIDER,
        label=LABEL,
        what=what,
        hint="Check metaGraphBaseUrl: it must point at the Graph API (https://graph.facebook.com).",
    )


def _unexpected(what: str, data: Any, missing: str) -> ProviderError:
    return unexpected_answer(
        data,
        missing,
        provider=PROVIDER,
        label=LABEL,
        what=what,
        hint="Check metaGraphBaseUrl and metaGraphVersion; this may be an API change.",
    )


async def check_permission(call: Call, settings: Settings) -> PermissionState:
    url = graph_url(settings, "/call_permissions")
    limiter = _limiters.setdefault(
        _phone_number_id(settings), RateLimiter(PERMISSION_CHECKS_PER_SECOND, 1.0)
    )
    await limiter.acquire()
    data = await _graph(
        settings,
        "GET",
        url,
        "check call permission",
        params={"user_wa_id": call.to.wa_id},
        idempotent=True,
    )
    return permission_state(data, PROVIDER, label=LABEL)


async def request_permission(call: Call, settings: Settings) -> PermissionRequestResult:
    what = "send the call-permission request"
    message: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": call.to.wa_id,
    }
    if settings.meta_permission_template:
        message["type"] = "template"
        message["template"] = {
            "name": settings.meta_permission_template,
            "language": {"code": settings.meta_permission_template_language},
        }
    else:
        message["type"] = "interactive"
        message["interactive"] = {
            "type": "call_permission_request",
            "action": {"name": "call_permission_request"},
            "body": {"text": settings.meta_permission_request_text},
        }
    try:
        data = await _graph(
            settings, "POST", graph_url(settings, "/messages"), what, json_body=message
        )
    except ProviderError as exc:  # 138017 / 138009 are outcomes; anything else is raised
        return await refused_request_result(
            exc,
            lambda: check_permission(call, settings),
            limit_note=" (1 per 24 h, 2 per 7 days)",
        )
    messages = data.get("messages")
    if not (isinstance(messages, list) and messages and isinstance(messages[0], dict)):
        raise _unexpected(what, data, "messages[0].id")
    message_id = messages[0].get("id")
    return PermissionRequestResult(
        PermissionRequestOutcome.SENT,
        message_id=str(message_id) if message_id else None,
        detail="Permission request sent"
        + (
            " (template " + settings.meta_permission_template + ")"
            if settings.meta_permission_template
            else ""
        )
        + "; the user's answer arrives by webhook.",
    )


# ---------------------------------------------------------------------------- calls


async def send_offer(call: Call, sdp: str, settings: Settings) -> str:
    what = "place the call"
    body = {
        "messaging_product": "whatsapp",
        "to": call.to.wa_id,
        "action": "connect",
        "session": {"sdp_type": "offer", "sdp": sdp},
        "biz_opaque_callback_data": call.id,
    }
    data = await _graph(settings, "POST", graph_url(settings, "/calls"), what, json_body=body)
    calls = data.get("calls")
    if not (
        isinstance(calls, list) and calls and isinstance(calls[0], dict) and calls[0].get("id")
    ):
        raise _unexpected(what, data, "calls[0].id")
    return str(calls[0]["id"])


async def terminate_call(call: Call, settings: Settings) -> bool:
    if not call.provider_call_id:
        return False  # never reached Meta: nothing to hang up
    body = {
        "messaging_product": "whatsapp",
        "call_id": call.provider_call_id,
        "action": "terminate",
    }
    data = await _graph(
        settings,
        "POST",
        graph_url(settings, "/calls"),
        "hang up the call",
        json_body=body,
        idempotent=True,  # terminating twice is harmless
    )
    return data.get("success") is True


async def get_phone_number(settings: Settings, policy: HttpPolicy) -> dict[str, Any]:
    return await _graph(
        settings,
        "GET",
        graph_url(settings),
        "read the business phone number",
        params={"fields": "id,display_phone_number,verified_name,quality_rating"},
        idempotent=True,
        policy=policy,
    )


async def get_calling_settings(settings: Settings, policy: HttpPolicy) -> dict[str, Any]:
    return await _graph(
        settings,
        "GET",
        graph_url(settings, "/settings"),
        "read the calling settings",
        idempotent=True,
        policy=policy,
    )
