"""The call orchestrator: one explicit state machine per call, driven by one task.

    created → checking_permission → (permission_requested) → offering → ringing
            → in_progress → ended (completed | rejected | no_answer | busy | permission_denied
                                   | permission_pending_expired | failed | cancelled)

Everything that happens to a call (provider webhooks, media and bridge outcomes, timers, a
hang-up request) is posted to the call's inbox and handled in order by that call's task, so
there are no races between webhooks and the call's own progress: a duplicate or
out-of-order webhook is just an event the state machine already knows how to ignore.

Rules from the field (public implementations get these wrong):
* a terminate or REJECTED before ACCEPTED is never treated as answered;
* ACCEPTED may arrive after media is up (Meta says it typically does): media starts on the
  answer SDP, the greeting waits for ACCEPTED *and* connected media;
* the answer SDP may arrive before `send_offer` returns (WATI carries no opaque data):
  events for an unknown provider call id wait briefly in `_orphans`;
* every call we end is terminated at the provider, for billing accuracy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .. import plugins
from ..config import Settings
from ..errors import (
    BadInputError,
    ConfigError,
    MediaError,
    PluginError,
    ProviderError,
    VoiceBackendError,
    WhatsAppCallError,
)
from ..models import (
    Call,
    CallEvent,
    CallEventType,
    IceServer,
    PermissionRequestOutcome,
    PermissionStatus,
)
from ..phone import PhoneNumber, parse_phone
from ..redact import scrub
from ..store.base import CallRecord, CallState, CallStore, EndReason, utcnow
from .live import LiveUpdates
from .warmup import prepare_process

log = logging.getLogger("whatsapp_call.calls")

ORPHAN_TTL_SECONDS = 30.0  # how long an event for a not-yet-known call waits for its call
MEDIA_CONNECT_TIMEOUT = 20.0  # answer applied → DTLS up
MEDIA_END_GRACE = 3.0  # media gone: wait this long for the provider's terminate webhook
GOODBYE_TIMEOUT = 10.0
PROVIDER_CODE_REASONS = {138003: EndReason.BUSY, 138006: EndReason.PERMISSION_DENIED}


class ServiceBusyError(WhatsAppCallError):
    """This instance carries `maxConcurrentCalls` calls already."""


class CallInProgressError(WhatsAppCallError):
    """There is already an active call to this number. `call_id` names it."""

    def __init__(self, message: str, call_id: str, hint: str | None = None):
        self.call_id = call_id
        super().__init__(message, hint)


@dataclass
class CallRequest:
    """What a caller (CLI, service API, agent tool) asks for. Unset voice fields take the
    configured defaults (`voiceGreeting`, `voiceInstructions`, `voice`, `voiceLanguage`)."""

    to: str
    greeting: str | None = None
    instructions: str | None = None
    voice: str | None = None
    language: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None


def call_from_record(record: CallRecord, settings: Settings) -> Call:
    return Call(
        to=PhoneNumber(record.to_e164),
        id=record.id,
        provider=record.provider,
        provider_call_id=record.provider_call_id,
        greeting=record.greeting,
        instructions=record.instructions,
        voice=record.voice,
        language=record.language,
        voice_speed=settings.voice_speed,
        metadata=dict(record.metadata),
    )


class CallService:
    """Owns this process's calls: places them, routes webhook events to them, ends them."""

    def __init__(
        self,
        settings: Settings,
        store: CallStore,
        *,
        metrics: Any = None,
        live: LiveUpdates | None = None,
        worker_id: str | None = None,
    ):
        self.settings = settings
        self.worker_id = worker_id  # set in `serve --workers N`: this process owns these calls
        self.store = store
        self.metrics = metrics
        self.live = live or LiveUpdates()
        self._active: dict[str, ActiveCall] = {}
        self._by_provider_id: dict[str, str] = {}
        self._orphans: list[tuple[float, CallEvent]] = []
        self._accepting = True
        self._lock = asyncio.Lock()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> list[CallRecord]:
        """Prepare this process for calls (once: `warmup.prepare_process`), then reconcile
        calls a previous run left unfinished: terminate them at the provider and mark them
        `failed` ("restarted"). Returns the reconciled records."""
        prepare_process()
        reconciled = []
        for record in await self.store.non_final_calls():
            if record.id in self._active:
                continue
            if not self.owns(record):
                continue  # another process's call: its owner (or the front) reconciles it
            detail = f"restarted: the service stopped while the call was {record.state.value}"
            if await self.reconcile(record, detail):
                reconciled.append(record)
        return reconciled

    def owns(self, record: CallRecord) -> bool:
        """Whether reconciling `record` at start-up is this process's job."""
        return self.worker_id is None or record.worker == self.worker_id

    async def reconcile(self, record: CallRecord, detail: str) -> bool:
        """End a call whose owning process is gone: terminate it at the provider (so nobody
        stays on a dead line, and nobody is called again) and mark it failed."""
        if record.provider_call_id:
            await self._terminate_at_provider(call_from_record(record, self.settings))
        if await self.store.transition(
            record.id, CallState.ENDED, end_reason=EndReason.FAILED, detail=detail
        ):
            self._metric("call_state_changed", record.state.value, CallState.ENDED.value)
            self._metric("call_ended", EndReason.FAILED.value)
            log.warning("call %s reconciled (%s): %s", record.id, record.state.value, detail)
            return True
        return False

    async def shutdown(self, timeout: float = 15.0) -> None:
        """Stop accepting calls; end active calls politely (terminated at the provider)."""
        self._accepting = False
        calls = list(self._active.values())
        for active in calls:
            active.post("shutdown")
        if calls:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(a.task for a in calls), return_exceptions=True)
        for active in calls:  # anything still running after the timeout is cancelled
            if not active.task.done():
                active.task.cancel()
                with contextlib.suppress(BaseException):
                    await active.task

    @property
    def active_count(self) -> int:
        return len(self._active)

    # -- API ------------------------------------------------------------------------------------

    async def place_call(self, request: CallRequest) -> CallRecord:
        """Create the call and start it; returns at once with the stored record (state
        `created`). Raises BadInputError, ServiceBusyError or CallInProgressError."""
        to = parse_phone(request.to)
        if not self._accepting:
            raise ServiceBusyError(
                "The service is shutting down and takes no new calls.", "Retry on another instance."
            )
        async with self._lock:
            if request.idempotency_key:
                existing = await self.store.find_by_idempotency_key(request.idempotency_key)
                if existing is not None:
                    return existing
            if len(self._active) >= self.settings.max_concurrent_calls:
                raise ServiceBusyError(
                    f"This instance already carries {len(self._active)} calls "
                    f"(maxConcurrentCalls = {self.settings.max_concurrent_calls}).",
                    "Retry when a call has ended, or raise maxConcurrentCalls if the machine "
                    "has room (see the capacity figures in the README).",
                )
            busy = next((a for a in self._active.values() if a.call.to == to), None)
            existing_id = busy.call.id if busy else None
            if existing_id is None:
                other = await self.store.find_active_by_callee(to.e164)
                existing_id = other.id if other else None
            if existing_id is not None:
                raise CallInProgressError(
                    f"A call to {to.e164} is already in progress ({existing_id}).",
                    existing_id,
                    "Wait for it to end, or hang it up first.",
                )
            provider = self.settings.provider or ""
            record = CallRecord(
                to_e164=to.e164,
                provider=provider,
                greeting=request.greeting or self.settings.voice_greeting,
                instructions=request.instructions or self.settings.voice_instructions,
                voice=request.voice or self.settings.voice,
                language=request.language or self.settings.voice_language,
                metadata=dict(request.metadata),
                idempotency_key=request.idempotency_key,
                worker=self.worker_id,
            )
            record = await self.store.create_call(record)
            active = ActiveCall(self, record, call_from_record(record, self.settings))
            self._active[record.id] = active
            self._metric("call_state_changed", None, CallState.CREATED.value)
            active.task = asyncio.create_task(active.run(), name=f"call {record.id}")
        self.live.publish(
            record.id, {"type": "state", "state": "created", "call": record.to_dict()}
        )
        return record

    async def hangup(self, call_id: str) -> CallRecord:
        active = self._active.get(call_id)
        if active is not None:
            active.post("hangup")
            await self.wait(call_id, timeout=GOODBYE_TIMEOUT + 5)
        record = await self.store.get_call(call_id)
        if record is None:
            raise BadInputError(
                f"There is no call {call_id!r}.", "List calls with: whatsapp-call calls"
            )
        return record

    async def wait(self, call_id: str, timeout: float | None = None) -> CallRecord:
        """Wait until the call has ended (or `timeout`), then return its record."""
        active = self._active.get(call_id)
        if active is not None:
            async with asyncio.timeout(timeout):
                await asyncio.shield(active.task)
        record = await self.store.get_call(call_id)
        if record is None:
            raise BadInputError(
                f"There is no call {call_id!r}.", "List calls with: whatsapp-call calls"
            )
        return record

    async def check_permission(self, to: str) -> Any:
        call = Call(to=parse_phone(to), provider=self.settings.provider or "")
        return await _required("check_permission", call=call, settings=self.settings)

    async def request_permission(self, to: str) -> Any:
        call = Call(to=parse_phone(to), provider=self.settings.provider or "")
        return await _required("request_permission", call=call, settings=self.settings)

    # -- webhook events ---------------------------------------------------------------------

    async def handle_events(self, events: list[CallEvent]) -> None:
        """Route verified, de-duplicated provider events to their calls."""
        now = time.monotonic()
        self._orphans = [(t, e) for t, e in self._orphans if now - t < ORPHAN_TTL_SECONDS]
        for event in events:
            if event.type == CallEventType.PERMISSION_REPLY:
                waiting = [
                    a
                    for a in self._active.values()
                    if event.wa_id and a.call.to.wa_id == event.wa_id
                ]
                for active in waiting:
                    active.post("event", event)
                if not waiting:
                    log.info("permission reply from %s with no call waiting for it", event.wa_id)
                continue
            active = self._find(event)
            if active is not None:
                active.post("event", event)
                continue
            record = await self._find_record(event)
            if record is not None:  # for a call that ended already (or another process's)
                await self.store.add_event(
                    record.id, "late_webhook", {"event": event.type.value, "status": event.status}
                )
                await self._hang_up_unknown_provider_call(record, event)
                continue
            self._orphans.append((now, event))

    async def _hang_up_unknown_provider_call(self, record: CallRecord, event: CallEvent) -> None:
        """An ended call of ours turns out to ring at the provider under an id we never
        learnt (its answer to `send_offer` was lost, e.g. a read timeout): hang it up, so
        nobody is left ringing for a call we already gave up on."""
        live = event.type in (
            CallEventType.ANSWER,
            CallEventType.RINGING,
            CallEventType.ACCEPTED,
        )
        if not (record.is_final and live and event.provider_call_id):
            return
        if record.provider_call_id == event.provider_call_id:
            return  # a late duplicate of a call we knew, and terminated, ourselves
        call = call_from_record(record, self.settings)
        call.provider_call_id = event.provider_call_id
        if record.provider_call_id is None:  # later events for it are then known duplicates
            await self.store.update_call(record.id, provider_call_id=event.provider_call_id)
        error = await self._terminate_at_provider(call)
        await self.store.add_event(
            record.id,
            "terminated_unknown_provider_call",
            {"provider_call_id": event.provider_call_id, "error": error},
        )

    def _find(self, event: CallEvent) -> ActiveCall | None:
        if event.call_id and event.call_id in self._active:
            return self._active[event.call_id]
        if event.provider_call_id:
            call_id = self._by_provider_id.get(event.provider_call_id)
            if call_id is not None:
                return self._active.get(call_id)
        return None

    async def _find_record(self, event: CallEvent) -> CallRecord | None:
        if event.call_id:
            record = await self.store.get_call(event.call_id)
            if record is not None:
                return record
        if event.provider_call_id:
            return await self.store.find_by_provider_call_id(event.provider, event.provider_call_id)
        return None

    def _adopt_provider_id(self, active: ActiveCall, provider_call_id: str) -> None:
        self._by_provider_id[provider_call_id] = active.call.id
        kept = []
        for t, event in self._orphans:
            if event.provider_call_id == provider_call_id or event.call_id == active.call.id:
                active.post("event", event)
            else:
                kept.append((t, event))
        self._orphans = kept

    def _forget(self, active: ActiveCall) -> None:
        self._active.pop(active.call.id, None)
        if active.call.provider_call_id:
            self._by_provider_id.pop(active.call.provider_call_id, None)

    # -- helpers ----------------------------------------------------------------------------

    async def _terminate_at_provider(self, call: Call) -> str | None:
        """Hang up at the provider; returns an error text instead of raising."""
        try:
            await plugins.call_first("terminate_call", call=call, settings=self.settings)
            return None
        except WhatsAppCallError as exc:
            log.warning("terminating %s at the provider failed: %s", call.id, scrub(exc.message))
            return scrub(exc.message)
        except Exception as exc:  # a plugin bug must not keep a call open
            log.exception("terminate_call failed for %s", call.id)
            return scrub(str(exc))

    def _metric(self, name: str, *args: Any) -> None:
        if self.metrics is None:
            return
        method = getattr(self.metrics, name, None)
        if method is None:
            return
        try:
            method(*args)
        except Exception:  # metrics never break a call
            log.exception("metrics.%s failed", name)


async def _required(hook: str, **kwargs: Any) -> Any:
    result = await plugins.call_first(hook, **kwargs)
    if result is None:
        settings = kwargs["settings"]
        raise PluginError(
            f"No installed plugin answers {hook} for provider {settings.provider!r}.",
            f"Install it (pip install 'whatsapp-call[{settings.provider}]') or fix `provider`; "
            "whatsapp-call plugins lists what is installed.",
        )
    return result


class _Ended(Exception):
    """Raised inside a call's task once it has reached `ended`: unwinds to cleanup."""


class ActiveCall:
    """One call's task and its inbox. Only this task changes the call's state."""

    def __init__(self, service: CallService, record: CallRecord, call: Call):
        self.service = service
        self.settings = service.settings
        self.store = service.store
        self.record = record
        self.call = call
        self.task: asyncio.Task[None] = None  # type: ignore[assignment]
        self.inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.state = CallState.CREATED
        self.t0 = time.monotonic()
        self.marks: dict[str, float] = {}
        self.answered = False  # the answer SDP was applied
        self.accepted = False  # the user picked up (ACCEPTED)
        self.rejected = False
        self.provider_ended = False  # the provider said the call is over
        self.media_connected = False
        self.greeted = False
        self.session: Any = None
        self.media: Any = None
        self.playout: Any = None
        self.bridge: Any = None
        self.warnings: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writes: list[asyncio.Task[Any]] = []
        self.webhook_provider_call_id: str | None = None

    def post(self, kind: str, payload: Any = None) -> None:
        if kind == "event" and payload.provider_call_id and not self.call.provider_call_id:
            # The provider's id may arrive by webhook before (or instead of) send_offer's
            # answer: kept so that ending the call can still hang it up there.
            self.webhook_provider_call_id = payload.provider_call_id
        self.inbox.put_nowait((kind, payload))

    # -- the whole call -----------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if await self._obtain_permission():
                await self._connect()
                await self._supervise()
        except _Ended:
            pass
        except asyncio.CancelledError:
            await self._end_quietly(EndReason.CANCELLED, "the service stopped the call")
            raise
        except ProviderError as exc:
            reason = PROVIDER_CODE_REASONS.get(_int(exc.code), EndReason.FAILED)
            await self._end_quietly(reason, _describe(exc), terminate=True)
        except (MediaError, VoiceBackendError, ConfigError, PluginError, BadInputError) as exc:
            await self._end_quietly(EndReason.FAILED, _describe(exc), terminate=True)
        except Exception as exc:
            log.exception("call %s failed unexpectedly", self.call.id)
            await self._end_quietly(
                EndReason.FAILED, f"internal error: {scrub(str(exc))}", terminate=True
            )
        finally:
            await self._cleanup()

    # -- permission -----------------------------------------------------------------------------

    async def _obtain_permission(self) -> bool:
        await self._transition(CallState.CHECKING_PERMISSION)
        state = await _required("check_permission", call=self.call, settings=self.settings)
        await self._event("permission_checked", _permission_dict(state))
        if state.status == PermissionStatus.GRANTED:
            if state.can_call:
                return True
            when = f" until {_fmt(state.next_call_at)}" if state.next_call_at else ""
            await self._end(
                EndReason.FAILED,
                f"permission granted, but WhatsApp allows no call to this user now{when}"
                + (f" ({state.detail})" if state.detail else ""),
            )
        if state.status == PermissionStatus.NOT_GRANTED:
            if not state.can_request:
                when = (
                    f"; a new request can be sent after {_fmt(state.next_request_at)}"
                    if state.next_request_at
                    else ""
                )
                await self._end(
                    EndReason.PERMISSION_DENIED,
                    f"{self.call.to} has not allowed calls and no permission request can be sent now{when}",
                )
            result = await _required("request_permission", call=self.call, settings=self.settings)
            await self._event(
                "permission_request",
                {
                    "outcome": result.outcome.value,
                    "message_id": result.message_id,
                    "detail": result.detail,
                },
            )
            if result.outcome == PermissionRequestOutcome.ALREADY_PERMANENT:
                return True
            if result.outcome == PermissionRequestOutcome.LIMIT_REACHED:
                when = f" until {_fmt(result.retry_at)}" if result.retry_at else ""
                await self._end(
                    EndReason.PERMISSION_DENIED,
                    f"no permission, and the permission-request limit for {self.call.to} is reached{when}",
                )
        await self._transition(
            CallState.PERMISSION_REQUESTED,
            detail="waiting for the user to allow calls on WhatsApp; the call is placed as soon as they do",
        )
        return await self._wait_for_permission()

    async def _wait_for_permission(self) -> bool:
        deadline = time.monotonic() + self.settings.permission_wait_seconds
        while True:
            kind, payload = await self._next(deadline)
            if kind == "timeout":
                await self._end(
                    EndReason.PERMISSION_PENDING_EXPIRED,
                    f"the user did not answer the permission request within "
                    f"{_human_seconds(self.settings.permission_wait_seconds)}",
                )
            if kind in ("hangup", "shutdown"):
                await self._end(
                    EndReason.CANCELLED, f"cancelled ({kind}) while waiting for permission"
                )
            if kind == "event" and payload.type == CallEventType.PERMISSION_REPLY:
                await self._event(
                    "permission_reply",
                    {
                        "granted": payload.permission_granted,
                        "permanent": payload.permission_permanent,
                    },
                )
                if payload.permission_granted:
                    return True
                await self._end(
                    EndReason.PERMISSION_DENIED, "the user declined the permission request"
                )

    # -- offer -------------------------------------------------------------------------------

    async def _connect(self) -> None:
        from ..bridge import PlayoutTrack
        from ..media.peer import CallMedia

        await self._transition(CallState.OFFERING)
        self.session = await plugins.call_first(
            "open_voice_session", call=self.call, settings=self.settings
        )
        if self.session is None:
            raise ConfigError(
                f"No installed plugin provides the voice backend {self.settings.voice_backend!r}.",
                "Install it (pip install 'whatsapp-call[openai]') or set voiceBackend; "
                "whatsapp-call plugins lists what is installed.",
            )
        # Connect to the voice backend before ringing anyone: a bad key must not ring a phone.
        await self.session.start()
        self._mark("voice_ready")
        rate = getattr(self.session, "sample_rate", 24000)
        self.playout = PlayoutTrack(sample_rate=rate)
        self.media = CallMedia(
            inbound_rate=rate,
            ice_servers=await self._ice_servers(),
            host_addresses=self.settings.ice_host_addresses,
            gather_timeout=self.settings.ice_gather_timeout_seconds,
            outbound_track=self.playout,
            dead_peer_seconds=self.settings.dead_peer_seconds,
            rtp_fast_path=self.settings.rtp_fast_path,
        )
        self.service._metric("media_started", self.call.id, self.playout, self.media)
        offer = await self.media.create_offer()
        self._mark("offer_built")
        provider_call_id = await _required(
            "send_offer", call=self.call, sdp=offer, settings=self.settings
        )
        self._mark("offer_sent")
        self.call.provider_call_id = provider_call_id
        self.record = await self.store.update_call(self.call.id, provider_call_id=provider_call_id)
        self.service._adopt_provider_id(self, provider_call_id)
        await self._event("offer_sent", {"provider_call_id": provider_call_id})

    async def _ice_servers(self) -> list[IceServer]:
        servers = [
            IceServer(urls=(url,), priority=50, source="config")
            for url in self.settings.stun_servers
        ]
        for _plugin_name, result in await plugins.call_all(
            "fetch_ice_servers", settings=self.settings
        ):
            servers.extend(result)
        self.warnings.extend(_ice_warnings())
        servers.sort(key=lambda s: s.priority)
        return servers

    # -- ringing and talking --------------------------------------------------------------------

    async def _supervise(self) -> None:
        ring_deadline = time.monotonic() + self.settings.ring_timeout_seconds
        end_deadline: float | None = None
        grace_deadline: float | None = None
        while True:
            deadlines = [
                d
                for d in (None if self.accepted else ring_deadline, end_deadline, grace_deadline)
                if d
            ]
            kind, payload = await self._next(min(deadlines) if deadlines else None)
            now = time.monotonic()
            if kind == "timeout":
                if grace_deadline is not None and now >= grace_deadline:
                    await self._end(
                        EndReason.COMPLETED if self.accepted else EndReason.FAILED,
                        f"media stopped ({self.media.end_reason or 'peer gone'}) and the provider sent no terminate",
                        terminate=True,
                    )
                if not self.accepted and now >= ring_deadline:
                    await self._end(
                        EndReason.NO_ANSWER,
                        f"nobody answered within {_human_seconds(self.settings.ring_timeout_seconds)}",
                        terminate=True,
                    )
                if end_deadline is not None and now >= end_deadline:
                    await self._end(
                        EndReason.COMPLETED,
                        f"maximum call duration reached ({_human_seconds(self.settings.max_duration_seconds)})",
                        terminate=True,
                    )
                continue
            if kind == "event":
                await self._on_provider_event(payload)
                if self.accepted and end_deadline is None:
                    end_deadline = time.monotonic() + self.settings.max_duration_seconds
            elif kind == "media_connected":
                self.media_connected = True
                self._mark("media_connected")
                await self._event("media_connected", _rel(self.media.timings, self.t0))
                self._spawn(self._run_bridge())
                await self._maybe_greet()
            elif kind == "media_failed":
                await self._end(EndReason.FAILED, f"media failed: {payload}", terminate=True)
            elif kind == "bridge_done":
                if payload == "end_call":
                    await self._end(EndReason.COMPLETED, "the AI ended the call", terminate=True)
                if isinstance(payload, str) and payload.startswith("voice_error"):
                    await self._end(EndReason.FAILED, payload, terminate=True)
                grace_deadline = time.monotonic() + MEDIA_END_GRACE
            elif kind == "hangup":
                await self._end(
                    EndReason.COMPLETED if self.accepted else EndReason.CANCELLED,
                    "hung up on request",
                    terminate=True,
                )
            elif kind == "shutdown":
                await self._end(
                    EndReason.COMPLETED if self.accepted else EndReason.CANCELLED,
                    "the service is shutting down",
                    terminate=True,
                )

    async def _on_provider_event(self, event: CallEvent) -> None:
        kind = event.type
        if kind == CallEventType.ANSWER:
            if self.answered or not event.sdp:
                return
            self.answered = True
            self._mark("answer_received")
            await self.media.accept_answer(event.sdp)
            await self._event("answer_received")
            self._spawn(self._watch_media())
        elif kind == CallEventType.RINGING:
            if self.state == CallState.OFFERING:
                await self._transition(CallState.RINGING)
        elif kind == CallEventType.ACCEPTED:
            if self.accepted or self.rejected:
                return
            self.accepted = True
            self._mark("accepted")
            await self._transition(CallState.IN_PROGRESS)
            await self._maybe_greet()
        elif kind == CallEventType.REJECTED:
            if self.accepted:  # an out-of-order REJECTED after ACCEPTED changes nothing
                await self._event("ignored_event", {"event": "rejected", "why": "after accepted"})
                return
            self.rejected = True
            await self._end(EndReason.REJECTED, "the user declined the call")
        elif kind == CallEventType.TERMINATED:
            self.provider_ended = True
            errors = "; ".join(f"{e.code}: {e.message}" for e in event.errors)
            status = (event.status or "").upper()
            if self.accepted:
                failed = status == "FAILED" or bool(errors)
                reason = EndReason.FAILED if failed else EndReason.COMPLETED
                detail = (
                    "the call failed on the WhatsApp side" if failed else "the user hung up"
                ) + (f"; provider status {status}" if status else "")
            elif self.rejected or status == "REJECTED":
                reason, detail = EndReason.REJECTED, "the user declined the call"
            elif errors:
                reason, detail = EndReason.FAILED, "the call failed before it was answered"
            else:
                reason, detail = EndReason.NO_ANSWER, "the call ended before anyone answered"
            if errors:
                detail += f" ({errors})"
            if event.duration_seconds is not None:
                await self._metrics({"provider_duration_seconds": event.duration_seconds})
            await self._end(reason, detail)

    async def _watch_media(self) -> None:
        try:
            await self.media.wait_connected(MEDIA_CONNECT_TIMEOUT)
        except MediaError as exc:
            self.post("media_failed", exc.message)
            return
        self.post("media_connected")

    async def _run_bridge(self) -> None:
        from ..bridge import AudioBridge

        self.bridge = AudioBridge(
            self.media,
            self.playout,
            self.session,
            on_transcript=self._on_transcript,
            on_event=self._on_bridge_event,
        )
        try:
            reason = await self.bridge.run()
        except Exception as exc:
            log.exception("bridge of %s failed", self.call.id)
            reason = f"voice_error: {scrub(str(exc))}"
        self.post("bridge_done", reason)

    async def _maybe_greet(self) -> None:
        """Speak the greeting once the user picked up AND media flows, not before: what is
        said before that is lost to ringing or DTLS set-up."""
        if self.greeted or not (self.accepted and self.media_connected) or self.bridge is None:
            return
        self.greeted = True
        text = self.call.greeting
        if text:
            self._mark("greeting_sent")
            await self.bridge.greet(text)

    def _on_transcript(self, role: str, text: str, at: datetime | None = None) -> None:
        at = at or utcnow()
        self._writes.append(
            asyncio.ensure_future(self.store.add_transcript(self.call.id, role, text, at=at))
        )
        self.service.live.publish(
            self.call.id, {"type": "transcript", "role": role, "text": text, "at": at.isoformat()}
        )

    def _on_bridge_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        self.service.live.publish(
            self.call.id, {"type": "media", "event": name, "data": data or {}}
        )
        if name in ("barge_in", "voice_reconnected", "voice_error"):
            self._writes.append(
                asyncio.ensure_future(self.store.add_event(self.call.id, name, data or {}))
            )

    # -- state, events, ending --------------------------------------------------------------

    async def _next(self, deadline: float | None) -> tuple[str, Any]:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            async with asyncio.timeout(timeout):
                return await self.inbox.get()
        except TimeoutError:
            return ("timeout", None)

    async def _transition(self, state: CallState, detail: str | None = None) -> None:
        old = self.state
        if await self.store.transition(self.call.id, state, detail=detail):
            self.state = state
            self.service._metric("call_state_changed", old.value, state.value)
            self.service.live.publish(
                self.call.id, {"type": "state", "state": state.value, "detail": detail}
            )

    async def _event(self, type: str, data: dict[str, Any] | None = None) -> None:
        await self.store.add_event(self.call.id, type, data or {})
        self.service.live.publish(
            self.call.id, {"type": "event", "event": type, "data": data or {}}
        )

    async def _metrics(self, values: dict[str, Any]) -> None:
        await self.store.set_metrics(self.call.id, values)

    def _mark(self, name: str) -> None:
        self.marks.setdefault(name, time.monotonic())

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _end(self, reason: EndReason, detail: str, *, terminate: bool = False) -> None:
        await self._end_quietly(reason, detail, terminate=terminate)
        raise _Ended

    async def _end_quietly(
        self, reason: EndReason, detail: str, *, terminate: bool = False
    ) -> None:
        if self.state == CallState.ENDED:
            return
        if terminate and not self.call.provider_call_id and self.webhook_provider_call_id:
            self.call.provider_call_id = self.webhook_provider_call_id
            with contextlib.suppress(Exception):
                await self.store.update_call(
                    self.call.id, provider_call_id=self.call.provider_call_id
                )
                await self._event(
                    "terminated_unknown_provider_call",
                    {"provider_call_id": self.webhook_provider_call_id},
                )
        if terminate and self.call.provider_call_id and not self.provider_ended:
            error = await self.service._terminate_at_provider(self.call)
            if error:
                detail += f"; terminating at the provider failed: {error}"
        old = self.state
        self.state = CallState.ENDED
        try:
            await self.store.transition(
                self.call.id, CallState.ENDED, end_reason=reason, detail=detail
            )
        except Exception:
            log.exception("could not record the end of call %s", self.call.id)
        self.service._metric("call_state_changed", old.value, CallState.ENDED.value)
        self.service._metric("call_ended", reason.value)
        self.service.live.publish(
            self.call.id,
            {"type": "state", "state": "ended", "end_reason": reason.value, "detail": detail},
        )

    async def _cleanup(self) -> None:
        if self.bridge is not None:
            with contextlib.suppress(Exception):
                await self.bridge.stop()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for resource in (self.session, self.media):
            if resource is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await resource.close()
        with contextlib.suppress(Exception):
            await self._store_metrics()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        self.service._metric("media_ended", self.call.id)  # no await before _forget: counted once
        self.service._forget(self)
        self.service.live.close(self.call.id)

    async def _store_metrics(self) -> None:
        setup = {
            name: round((t - self.t0) * 1000, 1)
            for name, t in sorted(self.marks.items(), key=lambda i: i[1])
        }
        if self.media is not None:
            for name, t in getattr(self.media, "timings", {}).items():
                setup.setdefault(name, round((t - self.t0) * 1000, 1))
        metrics: dict[str, Any] = {"setup_ms": setup}
        if "accepted" in self.marks and "offer_built" in self.marks:
            connected = max(
                self.marks["accepted"], self.marks.get("media_connected", self.marks["accepted"])
            )
            setup_seconds = connected - self.marks.get("offer_built", self.t0)
            metrics["setup_seconds"] = round(setup_seconds, 3)
            self.service._metric("observe_setup_seconds", setup_seconds)
        if self.bridge is not None:
            bridge_metrics = dict(getattr(self.bridge, "metrics", {}) or {})
            metrics["audio"] = bridge_metrics
            for turn in bridge_metrics.get("turns", []):
                if turn.get("response_latency_ms") is not None:
                    self.service._metric(
                        "observe_turn_latency_seconds", turn["response_latency_ms"] / 1000
                    )
        if self.media is not None and hasattr(self.media, "inbound_stats"):
            metrics["inbound_audio"] = self.media.inbound_stats()
        if self.warnings:
            metrics["warnings"] = self.warnings
        await self.store.set_metrics(self.call.id, metrics)


def _ice_warnings() -> list[str]:
    """Warnings that ICE-server plugins recorded for their last fetch (e.g. Twilio down)."""
    out = []
    for name, plugin in plugins.pm.list_name_plugin():
        error = getattr(plugin, "last_error", None)
        if callable(error):
            error = error()
        if error:
            out.append(f"{name}: {error}")
    return out


def _describe(exc: WhatsAppCallError) -> str:
    return scrub(exc.message + (f" (fix: {exc.hint})" if exc.hint else ""))


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _fmt(when: datetime | None) -> str:
    return when.isoformat(timespec="seconds") if when else "unknown"


def _human_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


def _rel(timings: dict[str, float], t0: float) -> dict[str, float]:
    return {k: round((v - t0) * 1000, 1) for k, v in timings.items()}


def _permission_dict(state: Any) -> dict[str, Any]:
    return {
        "status": state.status.value,
        "permanent": state.permanent,
        "expires_at": state.expires_at.isoformat() if state.expires_at else None,
        "can_request": state.can_request,
        "can_call": state.can_call,
        "detail": state.detail,
    }
