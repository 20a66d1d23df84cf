"""The plain data types that cross the hook boundary.

Plugins receive and return these, never provider-specific shapes: the orchestrator must not
need to know whether a call went through Meta or WATI.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from .phone import PhoneNumber


def new_call_id() -> str:
    """Our own call id. Carried to the provider (Meta `biz_opaque_callback_data`) so every
    webhook maps back to the call, even after a restart."""
    return "call_" + uuid.uuid4().hex


@dataclass
class Call:
    """One outbound call as the hooks see it.

    `id` is ours; `provider_call_id` is the provider's (Meta/WATI `wacid.…`), known once
    `send_offer` returned. The voice fields are the per-call values, already defaulted from
    settings (`voiceGreeting`, `voiceInstructions`, `voice`, `voiceLanguage`, `voiceSpeed`).
    """

    to: PhoneNumber
    id: str = field(default_factory=new_call_id)
    provider: str = ""
    provider_call_id: str | None = None
    greeting: str | None = None
    instructions: str | None = None
    voice: str | None = None
    language: str | None = None
    voice_speed: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class PermissionStatus(enum.StrEnum):
    GRANTED = "granted"  # the business may call now (temporary or permanent)
    NOT_GRANTED = "not_granted"  # no permission; see `can_request`
    REQUESTED = "requested"  # a request is out and the user has not answered yet


@dataclass
class PermissionState:
    """What `check_permission` returns.

    `can_request`: a permission request may be sent now. `can_call`: a call may be placed now
    (the provider's own limits included). When something is not possible now, `*_at` says when
    it becomes possible again, if the provider told us. `detail` is a sentence for a human.
    """

    status: PermissionStatus
    permanent: bool = False
    expires_at: datetime | None = None
    can_request: bool = False
    can_call: bool = False
    next_request_at: datetime | None = None
    next_call_at: datetime | None = None
    detail: str = ""


class PermissionRequestOutcome(enum.StrEnum):
    SENT = "sent"
    LIMIT_REACHED = "limit_reached"  # Meta 138009: no more requests to this user until `retry_at`
    ALREADY_PERMANENT = "already_permanent"  # Meta 138017: user already allowed calls permanently


@dataclass
class PermissionRequestResult:
    outcome: PermissionRequestOutcome
    message_id: str | None = None
    retry_at: datetime | None = None
    detail: str = ""


class CallEventType(enum.StrEnum):
    ANSWER = "answer"  # the SDP answer arrived (Meta `connect` event, WATI sdp-answer)
    RINGING = "ringing"
    ACCEPTED = "accepted"  # the user picked up (may arrive after media is already up)
    REJECTED = "rejected"  # the user declined
    TERMINATED = "terminated"  # the call is over at the provider (user hung up, failed, ...)
    PERMISSION_REPLY = "permission_reply"  # the user answered a call-permission request


@dataclass(frozen=True)
class CallEvent:
    """One verified event from a provider webhook, in the provider-neutral model.

    Correlate by `call_id` (ours, from `biz_opaque_callback_data`) when present, else by
    `provider_call_id`; permission replies carry only `wa_id`.
    `dedupe_key` is identical for duplicate deliveries of the same event.
    """

    type: CallEventType
    provider: str
    dedupe_key: str
    provider_call_id: str | None = None
    call_id: str | None = None
    wa_id: str | None = None
    sdp: str | None = None
    status: str | None = None  # the provider's raw status, upper-cased (COMPLETED, FAILED, ...)
    permission_granted: bool | None = None
    permission_permanent: bool | None = None
    permission_expires_at: datetime | None = None
    duration_seconds: int | None = None
    errors: tuple[ProviderErrorDetail, ...] = ()
    timestamp: datetime | None = None


@dataclass(frozen=True)
class ProviderErrorDetail:
    code: int | str | None
    message: str
    details: str | None = None


@dataclass(frozen=True)
class WebhookRequest:
    """An incoming webhook HTTP request, as raw as the signature check needs it.

    `headers` keys are lower-case. `body` is the raw bytes (signatures are over raw bytes).
    `path` is the path below the provider's webhook root (e.g. "" or "/sdp-answer").
    """

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes


@dataclass
class WebhookResult:
    """What `parse_webhook` returns: the HTTP answer and the events to process.

    A request that must be refused raises `WebhookRejected` instead.
    """

    events: list[CallEvent] = field(default_factory=list)
    status_code: int = 200
    body: str = ""  # e.g. Meta's hub.challenge echo
    content_type: str = "text/plain"


@dataclass(frozen=True)
class IceServer:
    """A STUN or TURN server. `urls` in WebRTC's form (`stun:host:port`, `turn:host:port?transport=udp`).

    `priority` orders the merged list from all plugins (lower first). aiortc uses only the first
    STUN URL and the first TURN URL it finds, so the order decides which ones are used.
    """

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = field(default=None, repr=False)
    priority: int = 100
    source: str = ""


class CheckStatus(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class DoctorCheck:
    """One line of `whatsapp-call doctor`. `hint` says how to fix a warn/fail. No secrets."""

    name: str
    status: CheckStatus
    message: str
    hint: str | None = None
    plugin: str = ""


@dataclass
class VoiceTool:
    """A function the AI may call during the conversation (e.g. `end_call`).

    `handler(arguments: dict) -> awaitable str` runs the tool; its string result is returned
    to the model.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    handler: Any


def event_to_dict(event: CallEvent) -> dict[str, Any]:
    """A JSON-able form of a `CallEvent`, for handing events between processes."""
    out: dict[str, Any] = {}
    for f in fields(event):
        value = getattr(event, f.name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, datetime):
            value = value.isoformat()
        elif f.name == "errors":
            value = [{"code": e.code, "message": e.message, "details": e.details} for e in value]
        out[f.name] = value
    return out


def event_from_dict(data: Mapping[str, Any]) -> CallEvent:
    """The inverse of `event_to_dict`."""
    values = dict(data)
    values["type"] = CallEventType(values["type"])
    for name in ("permission_expires_at", "timestamp"):
        if values.get(name):
            values[name] = datetime.fromisoformat(values[name])
    values["errors"] = tuple(ProviderErrorDetail(**e) for e in values.get("errors") or ())
    return CallEvent(**values)
