"""The call store interface: what the orchestrator, the CLI and the service API may ask of it.

Kept small and database-neutral (plain values, `datetime`s in UTC, JSON-able dicts) so that a
shared PostgreSQL store can later sit behind the same `CallStore` without changing callers.
Every method is a coroutine: callers live on the audio-critical event loop and must never wait
on disk I/O there.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from ..errors import WhatsAppCallError
from ..models import new_call_id


class CallState(enum.StrEnum):
    CREATED = "created"
    CHECKING_PERMISSION = "checking_permission"
    PERMISSION_REQUESTED = "permission_requested"
    OFFERING = "offering"
    RINGING = "ringing"
    IN_PROGRESS = "in_progress"
    ENDED = "ended"


class EndReason(enum.StrEnum):
    COMPLETED = "completed"
    REJECTED = "rejected"
    NO_ANSWER = "no_answer"
    BUSY = "busy"
    PERMISSION_DENIED = "permission_denied"
    PERMISSION_PENDING_EXPIRED = "permission_pending_expired"
    FAILED = "failed"
    CANCELLED = "cancelled"


def utcnow() -> datetime:
    return datetime.now(UTC)


# Fields `update_call` may change. State, end reason and timestamps only move through
# `transition`, so that every state change leaves an event behind.
UPDATABLE_FIELDS = frozenset(
    {
        "provider_call_id",
        "greeting",
        "instructions",
        "voice",
        "language",
        "metadata",
        "metrics",
        "worker",
        "end_detail",
    }
)


def transition_event(
    new_state: CallState | str,
    end_reason: EndReason | str | None,
    detail: str | None,
    data: dict[str, Any] | None,
) -> tuple[CallState, EndReason | None, dict[str, Any]]:
    """Check `transition()`'s arguments and build its "state" event (every store uses this;
    the store fills in "from"). A wrong combination is a caller bug: ValueError."""
    new_state = CallState(new_state)
    reason = None if end_reason is None else EndReason(end_reason)
    if (new_state == CallState.ENDED) != (reason is not None):
        raise ValueError(
            "transition() needs end_reason when, and only when, the new state is 'ended' "
            f"(got state {new_state.value!r}, end_reason {end_reason!r})."
        )
    event: dict[str, Any] = {**(data or {}), "from": None, "to": new_state.value}
    if reason is not None:
        event["end_reason"] = reason.value
    if detail is not None:
        event["detail"] = detail
    return new_state, reason, event


# The stored columns of a call, in the order every store selects them.
CALL_COLUMNS = (
    "id",
    "to_e164",
    "provider",
    "state",
    "provider_call_id",
    "end_reason",
    "end_detail",
    "greeting",
    "instructions",
    "voice",
    "language",
    "metadata",
    "metrics",
    "idempotency_key",
    "worker",
    "created_at",
    "updated_at",
    "ended_at",
)


@dataclass
class CallRecord:
    """One call as stored. `id` is ours ("call_…"); `provider_call_id` the provider's."""

    to_e164: str
    provider: str
    id: str = field(default_factory=new_call_id)
    state: CallState = CallState.CREATED
    provider_call_id: str | None = None
    end_reason: EndReason | None = None
    end_detail: str | None = None
    greeting: str | None = None
    instructions: str | None = None
    voice: str | None = None
    language: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    worker: str | None = None  # the process owning the call's media (scale-out, later)
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    ended_at: datetime | None = None

    def __post_init__(self) -> None:
        self.state = CallState(self.state)
        if self.end_reason is not None:
            self.end_reason = EndReason(self.end_reason)

    @property
    def is_final(self) -> bool:
        return self.state == CallState.ENDED

    @property
    def duration_seconds(self) -> float | None:
        """Wall time from creation to end (None while the call is not over)."""
        if self.ended_at is None:
            return None
        return (self.ended_at - self.created_at).total_seconds()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: enums as strings, datetimes as ISO 8601 UTC."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out


@dataclass(frozen=True)
class StoredEvent:
    """One entry of a call's history. `seq` orders a call's events (1, 2, …)."""

    call_id: str
    seq: int
    at: datetime
    type: str
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id,
            "seq": self.seq,
            "at": self.at.isoformat(),
            "type": self.type,
            "data": dict(self.data),
        }


@dataclass(frozen=True)
class TranscriptLine:
    """One spoken line. `role` is "assistant" (the AI) or "user" (the person called)."""

    call_id: str
    at: datetime
    role: str
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id,
            "at": self.at.isoformat(),
            "role": self.role,
            "text": self.text,
        }


@dataclass(frozen=True)
class PurgeResult:
    calls: int = 0
    events: int = 0
    transcripts: int = 0
    webhook_keys: int = 0


class StoreError(WhatsAppCallError):
    """The call store failed."""


class StoreUnavailableError(StoreError):
    """The store cannot be written: read-only or full state directory, no permission."""


class StoreCorruptError(StoreError):
    """The store file is damaged or is not a whatsapp-call store. It is never recreated over."""


class CallNotFoundError(StoreError):
    """No call with that id."""


class DuplicateCallError(StoreError):
    """A call with this id or idempotency key exists already. `existing_id` names it."""

    def __init__(self, message: str, existing_id: str | None = None, hint: str | None = None):
        self.existing_id = existing_id
        super().__init__(message, hint)


class CallStore(abc.ABC):
    """Persistence of calls, their events and transcripts, and processed webhook ids."""

    async def open(self) -> None:  # noqa: B027 - optional for stores that connect lazily
        """Connect, and create or migrate the schema. Raises StoreError with a fix."""

    @abc.abstractmethod
    async def create_call(self, record: CallRecord) -> CallRecord:
        """Insert a new call (and its first event). Raises `DuplicateCallError` when the id or
        the idempotency key is taken."""

    @abc.abstractmethod
    async def get_call(self, call_id: str) -> CallRecord | None: ...

    @abc.abstractmethod
    async def find_by_provider_call_id(
        self, provider: str, provider_call_id: str
    ) -> CallRecord | None: ...

    @abc.abstractmethod
    async def find_by_idempotency_key(self, key: str) -> CallRecord | None: ...

    @abc.abstractmethod
    async def find_active_by_callee(self, to_e164: str) -> CallRecord | None:
        """The newest not-ended call to this number (at most one should exist)."""

    @abc.abstractmethod
    async def list_calls(
        self, state: CallState | str | None = None, limit: int = 50
    ) -> list[CallRecord]:
        """Newest first."""

    @abc.abstractmethod
    async def update_call(self, call_id: str, **fields: Any) -> CallRecord:
        """Change non-state fields (see `UPDATABLE_FIELDS`); returns the updated record."""

    @abc.abstractmethod
    async def transition(
        self,
        call_id: str,
        new_state: CallState | str,
        *,
        end_reason: EndReason | str | None = None,
        detail: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> bool:
        """Atomically move the call to `new_state` and append a "state" event.

        Returns False (and changes nothing) when the call has ended already or is in
        `new_state` already. `end_reason` is required for, and only allowed with, `ended`.
        """

    @abc.abstractmethod
    async def add_event(
        self,
        call_id: str,
        type: str,
        data: dict[str, Any] | None = None,
        *,
        at: datetime | None = None,
    ) -> int:
        """Append a notable event; returns its `seq`."""

    @abc.abstractmethod
    async def add_transcript(
        self, call_id: str, role: str, text: str, *, at: datetime | None = None
    ) -> None: ...

    @abc.abstractmethod
    async def set_metrics(
        self, call_id: str, metrics: dict[str, Any], *, merge: bool = True
    ) -> dict[str, Any]:
        """Store the call's metrics (merged into the existing ones by default); returns them."""

    @abc.abstractmethod
    async def get_events(self, call_id: str) -> list[StoredEvent]: ...

    @abc.abstractmethod
    async def get_transcript(self, call_id: str) -> list[TranscriptLine]: ...

    @abc.abstractmethod
    async def non_final_calls(self) -> list[CallRecord]:
        """Calls not ended: reconciled at start (left over by a crash or restart)."""

    @abc.abstractmethod
    async def count_by_state(self) -> dict[str, int]:
        """Number of calls per state (seeds the metrics gauges at start)."""

    @abc.abstractmethod
    async def mark_webhook_processed(self, key: str) -> bool:
        """Remember a webhook event's dedupe key. True the first time, False for a
        duplicate; atomic, also between processes sharing the store."""

    @abc.abstractmethod
    async def purge(self, older_than: timedelta | datetime) -> PurgeResult:
        """Delete calls that ended before the cutoff (with their events and transcripts)
        and dedupe keys recorded before it. A `timedelta` counts back from now."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush and release the store; idempotent."""
