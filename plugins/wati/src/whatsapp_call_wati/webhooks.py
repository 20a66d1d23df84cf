"""WATI webhooks (spec §3.3) turned into provider-neutral `CallEvent`s.

WATI calls whatever URLs are configured in its dashboard, in one of two shapes, both accepted:

* one URL per event (as WATI's own voice service routes them): the sub-path below our
  `/webhooks/wati` root names the event: `/permission`, `/sdp-answer`, `/call-status`,
  `/terminate` (an `/outbound/` prefix is allowed);
* one URL for everything, with an `event` field: `call.start`, `call.end`, `permission`
  (plus the names above).

Without either, the fields decide (`hasPermission` → permission, `sdp` → answer, `status`
→ call status, a bare `callId` → terminate).

WATI cannot echo our own call id, so call events carry only `provider_call_id` (WATI's
`callId`, returned by `send_offer`). When `watiWebhookSecret` is set every webhook must carry
a valid `X-Hub-Signature-256` (HMAC-SHA256 of the raw body), checked before parsing.
Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from whatsapp_call.config import Settings
from whatsapp_call.errors import WebhookRejected
from whatsapp_call.models import CallEvent, CallEventType, WebhookRequest, WebhookResult
from whatsapp_call.providers.webhooks import (
    SIGNATURE_HEADER,
    get_header,
    hub_signature,
    json_object,
)

PROVIDER = "wati"
LABEL = "WATI"

# Sub-path segments and `event` values, normalised to what we do with them.
KINDS = {
    "permission": "permission",
    "call-permission": "permission",
    "call_permission": "permission",
    "call.permission": "permission",
    "permission-result": "permission",
    "sdp-answer": "answer",
    "sdp_answer": "answer",
    "answer": "answer",
    "call.answer": "answer",
    "call-status": "status",
    "call_status": "status",
    "status": "status",
    "call.status": "status",
    "call.start": "start",
    "terminate": "end",
    "call.end": "end",
    "call.terminate": "end",
    "call.terminated": "end",
    "new-call": "inbound",
    "inbound": "inbound",
    "inbound-call": "inbound",
    "call.incoming": "inbound",
}
STATUS_EVENTS = {
    "RINGING": CallEventType.RINGING,
    "ACCEPTED": CallEventType.ACCEPTED,
    "REJECTED": CallEventType.REJECTED,
}
END_STATUSES = {"ENDED", "COMPLETED", "FAILED", "TERMINATED", "END", "NO_ANSWER", "MISSED"}
GRANTED_WORDS = {"granted", "accepted", "accept", "allowed", "approved", "true"}
DENIED_WORDS = {"denied", "rejected", "reject", "declined", "refused", "false"}

log = logging.getLogger(__name__)


def verify_signature(body: bytes, header: str | None, secret: str) -> None:
    if not header:
        raise WebhookRejected(
            "WATI webhook refused: watiWebhookSecret is set but the X-Hub-Signature-256 "
            "header is missing.",
            status_code=403,
            hint="Configure the same secret in WATI's webhook settings, or unset "
            "watiWebhookSecret if your WATI account does not sign webhooks.",
        )
    expected = hub_signature(body, secret).encode()
    if not hmac.compare_digest(header.strip().lower().encode(), expected):
        raise WebhookRejected(
            "WATI webhook refused: X-Hub-Signature-256 does not match the body.",
            status_code=403,
            hint="Check that watiWebhookSecret equals the secret configured in WATI.",
        )


def parse(request: WebhookRequest, settings: Settings) -> WebhookResult:
    if request.method.upper() != "POST":
        raise WebhookRejected(
            f"WATI webhooks are POST requests, not {request.method.upper()}.", status_code=405
        )
    secret = settings.secret("wati_webhook_secret")
    if secret:
        verify_signature(request.body, get_header(request.headers, SIGNATURE_HEADER), secret)
    payload = json_object(request.body, LABEL)
    return WebhookResult(events=list(events(request.path, payload, request.body)))


def _reject(problem: str) -> WebhookRejected:
    return WebhookRejected(f"{LABEL} webhook: {problem}.", status_code=400)


def _text(payload: Mapping[str, Any], *names: str, required: bool = False) -> str | None:
    for name in names:
        value = payload.get(name)
        if value is None or value == "":
            continue
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise _reject(f"{name} must be a string, not {type(value).__name__}")
        return str(value)
    if required:
        raise _reject(f"{names[0]} is missing")
    return None


def _timestamp(value: Any) -> datetime | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    if isinstance(value, str) and not value.strip().lstrip("-").replace(".", "", 1).isdigit():
        try:
            when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise _reject(
                f"timestamp {value[:40]!r} is neither unix seconds nor ISO 8601"
            ) from None
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    if not isinstance(value, str | int | float):
        raise _reject(f"timestamp must be unix seconds, not {type(value).__name__}")
    try:
        seconds = float(value)
        if seconds > 1e11:  # milliseconds
            seconds /= 1000
        if not 0 <= seconds < 1e11:
            raise ValueError
        return datetime.fromtimestamp(seconds, UTC)
    except (ValueError, OverflowError, OSError):
        raise _reject(f"timestamp {str(value)[:40]!r} is out of range") from None


def _int(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _reject(f"{name} must be a whole number, not {str(value)[:40]!r}")


def _kind_from_path(path: str) -> str | None:
    segments = [s for s in (path or "").lower().split("/") if s]
    return KINDS.get(segments[-1]) if segments else None


def _kind(path: str, payload: dict[str, Any]) -> tuple[str | None, str]:
    """What the webhook is, and where that came from (for messages)."""
    kind = _kind_from_path(path)
    if kind:
        return kind, f"path {path!r}"
    event = payload.get("event")
    if event is not None:
        if not isinstance(event, str):
            raise _reject(f"event must be a string, not {type(event).__name__}")
        return KINDS.get(event.strip().lower()), f"event {event!r}"
    if "hasPermission" in payload:
        return "permission", "fields"
    if payload.get("sdp") is not None:
        return "answer", "fields"
    if payload.get("status") is not None:
        return "status", "fields"
    if payload.get("callId") is not None:
        return "end", "fields"
    raise _reject(
        "cannot tell which event this is: no event sub-path, no 'event' field, and none of "
        "hasPermission, sdp, status or callId"
    )


def _wa_id(payload: dict[str, Any]) -> str | None:
    contact = payload.get("contact")
    number = None
    if isinstance(contact, dict):
        number = _text(contact, "ContactNumber", "contactNumber", "phone")
    number = number or _text(payload, "waid", "waId", "wa_id", "contactNumber", "to")
    if number is None:
        return None
    return "".join(ch for ch in number if ch.isdigit()) or None


def _sdp(value: Any) -> tuple[str | None, str | None]:
    """(sdp, type) from a plain string, a JSON-quoted string, or {"type", "sdp"}."""
    if value is None:
        return None, None
    if isinstance(value, dict):
        sdp, kind = value.get("sdp"), value.get("type")
        if not isinstance(sdp, str):
            raise _reject("sdp.sdp must be a string")
        return sdp, kind.lower() if isinstance(kind, str) else None
    if not isinstance(value, str):
        raise _reject(f"sdp must be a string, not {type(value).__name__}")
    text = value.strip()
    if text.startswith(('"', "{")):
        try:
            inner = json.loads(text)
        except (ValueError, RecursionError):
            raise _reject("sdp looks JSON-encoded but is not valid JSON") from None
        return _sdp(inner) if isinstance(inner, dict | str) and inner != value else (text, None)
    return value, None


def _fallback_key(body: bytes) -> str:
    """For events without an id: the same body within the same hour is one event.

    Duplicates (WATI retries) carry the same bytes; a genuinely new, identical event in a
    later hour is processed again, which is harmless for a permission reply.
    """
    digest = hashlib.sha256(body).hexdigest()[:24]
    return f"{digest}:{int(time.time() // 3600)}"


def events(path: str, payload: dict[str, Any], body: bytes = b"") -> Iterator[CallEvent]:
    kind, source = _kind(path, payload)
    timestamp = _timestamp(payload.get("timestamp"))
    if kind is None:
        log.info("ignoring a WATI webhook with unknown %s", source)
        return
    if kind == "inbound":
        log.info("ignoring an inbound WATI call (only outbound calls are placed)")
        return
    if kind == "permission":
        yield _permission(payload, body, timestamp)
        return
    call_id = _text(payload, "callId", "call_id", "id", required=True)
    common: dict[str, Any] = {
        "provider": PROVIDER,
        "provider_call_id": call_id,
        "wa_id": _wa_id(payload),
        "timestamp": timestamp,
    }
    if kind in ("answer", "start"):
        sdp, sdp_type = _sdp(payload.get("sdp"))
        if sdp_type == "offer":
            log.info("ignoring a WATI webhook carrying an SDP offer (inbound call %s)", call_id)
            return
        if sdp:
            yield CallEvent(
                CallEventType.ANSWER, dedupe_key=f"wati:{call_id}:answer", sdp=sdp, **common
            )
        elif kind == "answer":
            raise _reject(f"the SDP-answer webhook for {call_id} has no sdp")
        if kind == "answer":
            return
    status_text = _text(payload, "status")
    status = status_text.strip().upper().replace(" ", "_") if status_text else None
    if kind == "start":
        status = status or "RINGING"
    if kind == "end" or (status in END_STATUSES):
        if status == "REJECTED":  # the single-URL shape says "declined" only in call.end
            yield CallEvent(
                CallEventType.REJECTED,
                dedupe_key=f"wati:{call_id}:status:REJECTED",
                status=status,
                **common,
            )
        yield CallEvent(
            CallEventType.TERMINATED,
            dedupe_key=f"wati:{call_id}:terminated",
            status=status,
            duration_seconds=_int(
                payload.get("duration", payload.get("durationSeconds")), "duration"
            ),
            **common,
        )
        return
    if status is None:
        raise _reject(f"the call-status webhook for {call_id} has no status")
    event_type = STATUS_EVENTS.get(status)
    if event_type is None:
        log.info("ignoring WATI call status %r for %s", status, call_id)
        return
    yield CallEvent(
        event_type, dedupe_key=f"wati:{call_id}:status:{status}", status=status, **common
    )


def _permission(payload: dict[str, Any], body: bytes, timestamp: datetime | None) -> CallEvent:
    wa_id = _wa_id(payload)
    if wa_id is None:
        raise _reject("the permission webhook names no user (waid)")
    has = payload.get("hasPermission")
    status = payload.get("status")
    if isinstance(has, bool):
        granted = has
    elif isinstance(has, str) and has.lower() in ("true", "false"):
        granted = has.lower() == "true"
    elif isinstance(status, str) and status.strip().lower() in GRANTED_WORDS | DENIED_WORDS:
        granted = status.strip().lower() in GRANTED_WORDS
    else:
        raise _reject(
            "the permission webhook has neither hasPermission nor a granted/denied status"
        )
    permanent = payload.get("isPermanent", payload.get("is_permanent"))
    expires = payload.get("expirationTime", payload.get("expiration_timestamp"))
    return CallEvent(
        CallEventType.PERMISSION_REPLY,
        PROVIDER,
        dedupe_key=f"wati:permission:{wa_id}:{'granted' if granted else 'denied'}:"
        + _fallback_key(body),
        wa_id=wa_id,
        permission_granted=granted,
        permission_permanent=permanent if isinstance(permanent, bool) and granted else None,
        permission_expires_at=_timestamp(expires) if granted else None,
        timestamp=timestamp,
    )
