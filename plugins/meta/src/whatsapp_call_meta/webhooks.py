"""Meta webhooks: the GET subscription handshake, the X-Hub-Signature-256 check, and the
`calls` / `messages` payloads turned into provider-neutral `CallEvent`s (spec §1.6, §1.9, §1.10).

Pure functions, no I/O: this runs inside the HTTP request handler. Anything that is not a
well-formed Meta payload raises `WebhookRejected` naming what is wrong; nothing else escapes.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from whatsapp_call.config import Settings
from whatsapp_call.errors import WebhookRejected
from whatsapp_call.models import (
    CallEvent,
    CallEventType,
    ProviderErrorDetail,
    WebhookRequest,
    WebhookResult,
)
from whatsapp_call.providers.webhooks import (
    SIGNATURE_HEADER,
    get_header,
    hub_signature,
    json_object,
)

PROVIDER = "meta"
LABEL = "Meta"
STATUS_EVENTS = {
    "RINGING": CallEventType.RINGING,
    "ACCEPTED": CallEventType.ACCEPTED,
    "REJECTED": CallEventType.REJECTED,
}

log = logging.getLogger(__name__)


def parse(request: WebhookRequest, settings: Settings) -> WebhookResult:
    method = request.method.upper()
    if method == "GET":
        return verify_subscription(request.query, settings)
    if method != "POST":
        raise WebhookRejected(
            f"Meta webhooks are GET (verification) or POST, not {method}.", status_code=405
        )
    verify_signature(request.body, get_header(request.headers, SIGNATURE_HEADER), settings)
    payload = json_object(request.body, LABEL)
    return WebhookResult(events=list(events(payload)))


# ---------------------------------------------------------------------------- verification


def verify_subscription(query: Mapping[str, str], settings: Settings) -> WebhookResult:
    """Meta's GET handshake: echo `hub.challenge` when the verify token matches."""
    expected = settings.secret("meta_verify_token")
    if not expected:
        raise WebhookRejected(
            "Meta webhook verification refused: metaVerifyToken is not configured.",
            status_code=403,
            hint="Set metaVerifyToken to the Verify token you entered in the Meta app's "
            "webhook settings.",
        )
    if query.get("hub.mode") != "subscribe":
        raise WebhookRejected(
            f"Meta webhook verification refused: hub.mode is {query.get('hub.mode')!r}, "
            "not 'subscribe'.",
            status_code=403,
        )
    given = query.get("hub.verify_token") or ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise WebhookRejected(
            "Meta webhook verification refused: hub.verify_token does not match metaVerifyToken.",
            status_code=403,
            hint="Enter the same Verify token in the Meta app's webhook settings and in "
            "metaVerifyToken.",
        )
    challenge = query.get("hub.challenge")
    if not challenge:
        raise WebhookRejected("Meta webhook verification: hub.challenge is missing.", 400)
    return WebhookResult(body=challenge, content_type="text/plain")


def verify_signature(body: bytes, header: str | None, settings: Settings) -> None:
    """HMAC-SHA256 of the raw body with the app secret, compared in constant time."""
    secret = settings.secret("meta_app_secret")
    if not secret:
        raise WebhookRejected(
            "Meta webhook refused: metaAppSecret is not configured, so its signature cannot "
            "be verified (unsigned webhooks are never accepted).",
            status_code=403,
            hint="Set metaAppSecret to your Meta app's App secret (App settings > Basic).",
        )
    if not header:
        raise WebhookRejected(
            "Meta webhook refused: the X-Hub-Signature-256 header is missing.",
            status_code=403,
        )
    expected = hub_signature(body, secret).encode()
    if not hmac.compare_digest(header.strip().lower().encode(), expected):
        raise WebhookRejected(
            "Meta webhook refused: X-Hub-Signature-256 does not match the body.",
            status_code=403,
            hint="Check that metaAppSecret is the App secret of the app that sends the "
            "webhooks, and that no proxy rewrites the body.",
        )


# ---------------------------------------------------------------------------- payloads


def _reject(problem: str) -> WebhookRejected:
    return WebhookRejected(f"{LABEL} webhook: {problem}.", status_code=400)


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _reject(f"{where} must be an object, not {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _reject(f"{where} must be a list, not {type(value).__name__}")
    return value


def _text(value: Any, where: str, *, required: bool = False) -> str | None:
    if value is None or value == "":
        if required:
            raise _reject(f"{where} is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _reject(f"{where} must be a string, not {type(value).__name__}")
    return str(value)


def _timestamp(value: Any, where: str) -> datetime | None:
    """Unix seconds as a string (usual) or a number (also seen)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _reject(f"{where} must be unix seconds, not {type(value).__name__}")
    try:
        seconds = float(value)
        if not 0 <= seconds < 1e11:
            raise ValueError("out of range")
        return datetime.fromtimestamp(seconds, UTC)
    except (ValueError, OverflowError, OSError):
        raise _reject(f"{where} is not unix seconds: {str(value)[:40]!r}") from None


def _int(value: Any, where: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _reject(f"{where} must be a number, not bool")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _reject(f"{where} must be a whole number, not {str(value)[:40]!r}")


def events(payload: dict[str, Any]) -> Iterator[CallEvent]:
    obj = payload.get("object")
    if obj is not None and obj != "whatsapp_business_account":
        log.info("ignoring a Meta webhook for object %r", obj)
        return
    if "entry" not in payload:
        raise _reject("the body has no 'entry' list")
    entries = _list(payload.get("entry"), "entry")
    for i, entry in enumerate(entries):
        entry = _obj(entry, f"entry[{i}]")
        for j, change in enumerate(_list(entry.get("changes"), f"entry[{i}].changes")):
            where = f"entry[{i}].changes[{j}]"
            change = _obj(change, where)
            field = change.get("field")
            value = _obj(change.get("value"), f"{where}.value")
            if field == "calls":
                yield from _call_events(value, f"{where}.value")
            elif field == "messages":
                yield from _message_events(value, f"{where}.value")


def _business_number(value: dict[str, Any]) -> str | None:
    metadata = value.get("metadata")
    if isinstance(metadata, dict):
        number = metadata.get("display_phone_number")
        if isinstance(number, str | int) and not isinstance(number, bool):
            return "".join(ch for ch in str(number) if ch.isdigit()) or None
    return None


def _user_wa_id(call: dict[str, Any], business: str | None, where: str) -> str | None:
    """The callee: the side that is not the business number; else by `direction`.

    One of Meta's samples has `from`/`to` swapped, so the fields alone are not trusted.
    """
    sender = _text(call.get("from"), f"{where}.from")
    receiver = _text(call.get("to"), f"{where}.to")
    if business:
        if sender == business and receiver:
            return receiver
        if receiver == business and sender:
            return sender
    direction = str(call.get("direction") or "BUSINESS_INITIATED").upper()
    return sender if direction == "USER_INITIATED" else receiver


def _errors(items: list[Any], where: str) -> tuple[ProviderErrorDetail, ...]:
    out = []
    for k, item in enumerate(items):
        item = _obj(item, f"{where}[{k}]")
        code = item.get("code")
        if isinstance(code, bool) or not isinstance(code, int | str | type(None)):
            raise _reject(f"{where}[{k}].code must be a number or string")
        data = item.get("error_data")
        details = data.get("details") if isinstance(data, dict) else None
        out.append(
            ProviderErrorDetail(
                code=code,
                message=str(item.get("message") or item.get("title") or ""),
                details=str(details) if details is not None else None,
            )
        )
    return tuple(out)


def _answer_sdp(call: dict[str, Any], where: str) -> tuple[str | None, str | None]:
    """(sdp_type, sdp) from `session`; the legacy `connection.webrtc.sdp` (a JSON string of
    {sdp, type}) only when `session` is absent."""
    session = call.get("session")
    if session is not None:
        session = _obj(session, f"{where}.session")
        sdp_type = _text(session.get("sdp_type"), f"{where}.session.sdp_type")
        return (sdp_type or "").lower() or None, _text(session.get("sdp"), f"{where}.session.sdp")
    connection = call.get("connection")
    webrtc = connection.get("webrtc") if isinstance(connection, dict) else None
    legacy = webrtc.get("sdp") if isinstance(webrtc, dict) else None
    if isinstance(legacy, str):
        try:
            inner = json.loads(legacy)
        except (ValueError, RecursionError):
            inner = None
        if isinstance(inner, dict) and isinstance(inner.get("sdp"), str):
            return str(inner.get("type") or "").lower() or None, inner["sdp"]
        if legacy.startswith("v=0"):
            return None, legacy
    return None, None


def _call_events(value: dict[str, Any], where: str) -> Iterator[CallEvent]:
    business = _business_number(value)
    errors = _errors(_list(value.get("errors"), f"{where}.errors"), f"{where}.errors")
    for k, call in enumerate(_list(value.get("calls"), f"{where}.calls")):
        here = f"{where}.calls[{k}]"
        call = _obj(call, here)
        wacid = _text(call.get("id"), f"{here}.id", required=True)
        event = (_text(call.get("event"), f"{here}.event") or "").lower()
        direction = (_text(call.get("direction"), f"{here}.direction") or "").upper()
        common = {
            "provider": PROVIDER,
            "provider_call_id": wacid,
            "call_id": _text(
                call.get("biz_opaque_callback_data"), f"{here}.biz_opaque_callback_data"
            ),
            "wa_id": _user_wa_id(call, business, here),
            "timestamp": _timestamp(call.get("timestamp"), f"{here}.timestamp"),
        }
        if event == "connect":
            sdp_type, sdp = _answer_sdp(call, here)
            if direction == "USER_INITIATED" or sdp_type == "offer":
                log.info(
                    "ignoring a user-initiated call %s (only outbound calls are placed)", wacid
                )
                continue
            if not sdp:
                raise _reject(f"{here} is a connect event without session.sdp")
            yield CallEvent(
                CallEventType.ANSWER, dedupe_key=f"meta:{wacid}:connect", sdp=sdp, **common
            )
        elif event == "terminate":
            status = _text(call.get("status"), f"{here}.status")
            call_errors = _errors(_list(call.get("errors"), f"{here}.errors"), f"{here}.errors")
            yield CallEvent(
                CallEventType.TERMINATED,
                dedupe_key=f"meta:{wacid}:terminate",
                status=status.upper() if status else None,
                duration_seconds=_int(call.get("duration"), f"{here}.duration"),
                errors=call_errors + errors,
                **common,
            )
        else:
            log.info("ignoring Meta call event %r for %s", event, wacid)
    for k, status in enumerate(_list(value.get("statuses"), f"{where}.statuses")):
        here = f"{where}.statuses[{k}]"
        status = _obj(status, here)
        if str(status.get("type") or "").lower() != "call":
            continue
        wacid = _text(status.get("id"), f"{here}.id", required=True)
        name = (_text(status.get("status"), f"{here}.status", required=True) or "").upper()
        kind = STATUS_EVENTS.get(name)
        if kind is None:
            log.info("ignoring Meta call status %r for %s", name, wacid)
            continue
        yield CallEvent(
            kind,
            PROVIDER,
            dedupe_key=f"meta:{wacid}:status:{name}",
            provider_call_id=wacid,
            call_id=_text(
                status.get("biz_opaque_callback_data"), f"{here}.biz_opaque_callback_data"
            ),
            wa_id=_text(status.get("recipient_id"), f"{here}.recipient_id"),
            status=name,
            timestamp=_timestamp(status.get("timestamp"), f"{here}.timestamp"),
        )


def _flag(value: Any, where: str) -> bool | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _reject(f"{where} must be true or false")


def _message_events(value: dict[str, Any], where: str) -> Iterator[CallEvent]:
    for k, message in enumerate(_list(value.get("messages"), f"{where}.messages")):
        here = f"{where}.messages[{k}]"
        message = _obj(message, here)
        if message.get("type") != "interactive":
            continue
        interactive = _obj(message.get("interactive"), f"{here}.interactive")
        if interactive.get("type") != "call_permission_reply":
            continue
        reply = _obj(
            interactive.get("call_permission_reply"), f"{here}.interactive.call_permission_reply"
        )
        rwhere = f"{here}.interactive.call_permission_reply"
        response = (_text(reply.get("response"), f"{rwhere}.response", required=True) or "").lower()
        if response not in ("accept", "reject"):
            raise _reject(f"{rwhere}.response is {response!r}, not accept or reject")
        granted = response == "accept"
        permanent = _flag(reply.get("is_permanent"), f"{rwhere}.is_permanent")
        wa_id = _text(message.get("from"), f"{here}.from", required=True)
        timestamp = _timestamp(message.get("timestamp"), f"{here}.timestamp")
        message_id = _text(message.get("id"), f"{here}.id")
        key = message_id or f"{wa_id}:{int(timestamp.timestamp()) if timestamp else ''}"
        yield CallEvent(
            CallEventType.PERMISSION_REPLY,
            PROVIDER,
            dedupe_key=f"meta:{key}:permission_reply",
            wa_id=wa_id,
            permission_granted=granted,
            permission_permanent=bool(permanent) if granted else False,
            permission_expires_at=(
                _timestamp(reply.get("expiration_timestamp"), f"{rwhere}.expiration_timestamp")
                if granted and not permanent
                else None
            ),
            timestamp=timestamp,
        )
