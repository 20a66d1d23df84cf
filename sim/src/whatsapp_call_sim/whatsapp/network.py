"""The provider-neutral WhatsApp network: users, call permissions, limits and calls.

Meta's Graph routes and WATI's routes are two front doors onto this one state, exactly as
WATI is a BSP in front of Meta: a permission granted through one is seen by the other, and
one callee has at most one call at a time whichever API placed it. Events leave through a
per-provider `EventSink` that turns them into that provider's webhook payloads.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from .scenario import Limits, Scenario, SimConfig
from .sdp import canned_answer, sdp_problem

log = logging.getLogger("whatsapp_call_sim.whatsapp")

DAY = 24 * 3600
WEEK = 7 * DAY

#: Meta error code -> (HTTP status, title) from the spec's §1.11 table.
GRAPH_ERRORS: dict[int, tuple[int, str]] = {
    100: (400, "Invalid parameter"),
    613: (429, "Calls to this api have exceeded the rate limit."),
    131026: (400, "Message undeliverable"),
    131047: (400, "Re-engagement message"),
    132001: (404, "Template name does not exist in the translation"),
    138000: (401, "Calling is not enabled for this phone number"),
    138001: (400, "Receiver is uncallable"),
    138002: (429, "Concurrent calls limit reached"),
    138003: (400, "Duplicate call: a call is already ongoing with the receiver"),
    138004: (500, "Connection error"),
    138005: (429, "Call rate limit exceeded"),
    138006: (401, "No approved call permission found"),
    138007: (500, "Connect timeout"),
    138009: (400, "Call permission request limit hit"),
    138012: (400, "Business initiated calls limit hit"),
    138017: (400, "Call permission request not sent: permanent permission already exists"),
    138019: (400, "Call setup failed"),
    138020: (400, "Relay connection failed"),
    138021: (400, "Media receive timeout"),
    138022: (400, "Media transmit timeout"),
    138023: (400, "Call accepted but terminated with no media signals"),
}

#: How a SimulatedUser's `end_reason` shows up in a FAILED terminate's `errors[]`.
END_REASON_ERRORS = {
    "no_media": 138021,
    "ice_failed": 138020,
    "dtls_failed": 138020,
    "connect_timeout": 138007,
    "sdp_rejected": 138019,
    "simulator_error": 138004,
}

ERROR_HREF = "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"


class SimApiError(Exception):
    """A refusal in Meta's terms; each front door renders it in its own envelope."""

    def __init__(self, code: int, details: str, *, retry_after: int | None = None):
        self.code = code
        self.http_status, self.title = GRAPH_ERRORS.get(code, (400, "Error"))
        self.details = details
        self.retry_after = retry_after
        super().__init__(f"(#{code}) {self.title}: {details}")


class _CallFailed(Exception):
    def __init__(self, reason: str, details: str):
        self.reason = reason
        self.details = details
        super().__init__(details)


def new_wamid() -> str:
    return "wamid." + base64.urlsafe_b64encode(secrets.token_bytes(24)).decode().rstrip("=")


def new_wacid() -> str:
    return "wacid." + base64.urlsafe_b64encode(secrets.token_bytes(30)).decode().rstrip("=")


def error_entry(code: int, details: str) -> dict[str, Any]:
    """One `errors[]` item of a Meta webhook."""
    return {
        "code": code,
        "message": GRAPH_ERRORS.get(code, (400, "Error"))[1],
        "href": ERROR_HREF,
        "error_data": {"details": details},
    }


@dataclass
class PermissionRequest:
    id: str  # the request message's wamid (context.id of the reply)
    wa_id: str
    provider: str
    at: float


@dataclass
class UserState:
    """One callee as Meta sees it (per business number)."""

    wa_id: str
    permission: str = "no_permission"  # "no_permission" | "temporary" | "permanent"
    expiration_time: int | None = None
    requests: list[float] = field(default_factory=list)  # permission requests sent
    connected_calls: list[float] = field(default_factory=list)
    missed_in_a_row: int = 0

    def current_permission(self, now: float) -> str:
        if self.permission == "temporary" and (self.expiration_time or 0) <= now:
            self.permission, self.expiration_time = "no_permission", None
        return self.permission

    def grant(self, permanent: bool, lifetime_s: int, now: float) -> None:
        if permanent:
            self.permission, self.expiration_time = "permanent", None
        else:
            self.permission, self.expiration_time = "temporary", int(now + lifetime_s)


@dataclass(eq=False)
class SimCall:
    """One business-initiated call. `state`: connecting -> ringing -> accepted -> ended;
    `status` is the terminate status (COMPLETED/FAILED) once ended; `events` lists every
    webhook-worthy event in order."""

    id: str
    provider: str
    wa_id: str
    scenario: Scenario
    offer_sdp: str
    biz_opaque_callback_data: str | None = None
    answer_sdp: str | None = None
    state: str = "connecting"
    status: str | None = None
    created_at: float = field(default_factory=time.time)
    start_time: float | None = None
    end_time: float | None = None
    end_reason: str | None = None
    terminated_by: str | None = None  # "business" | "user" | "network"
    errors: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    user: Any = None  # the SimulatedUser, when the scenario has media
    _user_done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _user_end_reason: str | None = field(default=None, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, repr=False)
    _watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def duration(self) -> int | None:
        if self.start_time is None or self.end_time is None:
            return None
        return int(round(self.end_time - self.start_time))

    @property
    def ended(self) -> bool:
        return self.state == "ended"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "provider": self.provider,
            "wa_id": self.wa_id,
            "state": self.state,
            "status": self.status,
            "biz_opaque_callback_data": self.biz_opaque_callback_data,
            "created_at": self.created_at,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "duration": self.duration,
            "end_reason": self.end_reason,
            "terminated_by": self.terminated_by,
            "errors": self.errors,
            "events": self.events,
            "has_media_user": self.user is not None,
        }


class EventSink(Protocol):
    """What a front door (Meta, WATI) does with network events: build and send webhooks."""

    def call_connect(self, call: SimCall) -> None: ...
    def call_status(self, call: SimCall, status: str) -> None: ...
    def call_terminate(self, call: SimCall) -> None: ...
    def permission_reply(
        self, user: UserState, request: PermissionRequest, accepted: bool, scenario: Scenario
    ) -> None: ...
    def permission_undeliverable(self, user: UserState, request: PermissionRequest) -> None: ...


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _limit(
    period: str, max_allowed: int, stamps: list[float], window: int, now: float
) -> dict[str, Any]:
    inside = sorted(t for t in stamps if t > now - window)
    out: dict[str, Any] = {
        "time_period": period,
        "max_allowed": max_allowed,
        "current_usage": len(inside),
    }
    if len(inside) >= max_allowed:
        # The moment enough old entries leave the window for one more.
        oldest = inside[len(inside) - max_allowed] if max_allowed > 0 else now
        out["limit_expiration_time"] = int(oldest + window)
    return out


class WhatsAppNetwork:
    """Users, permissions and calls, shared by the Meta and WATI front doors."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.limits: Limits = config.limits
        self.scenarios: dict[str, Scenario] = {}
        self.users: dict[str, UserState] = {}
        self.calls: dict[str, SimCall] = {}
        self.permission_requests: dict[str, PermissionRequest] = {}
        self.sinks: dict[str, EventSink] = {}
        self.calling_settings: dict[str, Any] = {
            "status": "ENABLED" if config.calling_enabled else "DISABLED",
            "call_icon_visibility": "DEFAULT",
            "callback_permission_status": "DISABLED",
        }
        self._permission_checks: deque[float] = deque()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- scenarios and users -------------------------------------------------------------

    def scenario_for(self, wa_id: str) -> Scenario:
        return self.scenarios.get(wa_id, self.config.default_scenario)

    def set_scenario(self, wa_id: str, scenario: Scenario) -> None:
        """Set what `wa_id` does; their permission state and counters start afresh."""
        self.scenarios[wa_id] = scenario
        self.users.pop(wa_id, None)

    def user_state(self, wa_id: str) -> UserState:
        state = self.users.get(wa_id)
        if state is None:
            state = UserState(wa_id)
            scenario = self.scenario_for(wa_id)
            if scenario.permission == "granted" and scenario.has_whatsapp:
                state.grant(scenario.permanent, self.limits.temporary_permission_s, time.time())
            self.users[wa_id] = state
        return state

    # -- permissions ---------------------------------------------------------------------

    def check_permission_rate(self) -> None:
        """Meta's 5 requests / 1 s window on call_permissions (613, HTTP 429)."""
        now = time.monotonic()
        while self._permission_checks and self._permission_checks[0] <= now - 1.0:
            self._permission_checks.popleft()
        if len(self._permission_checks) >= self.limits.permission_checks_per_second:
            raise SimApiError(
                613,
                f"call_permissions allows {self.limits.permission_checks_per_second} requests per second",
                retry_after=1,
            )
        self._permission_checks.append(now)

    def permission_object(self, wa_id: str) -> dict[str, Any]:
        """The `call_permissions` response body (spec §1.4)."""
        now = time.time()
        state = self.user_state(wa_id)
        status = state.current_permission(now)
        permission: dict[str, Any] = {"status": status}
        if status == "temporary":
            permission["expiration_time"] = state.expiration_time
        lim = self.limits
        request_limits = [
            _limit("PT24H", lim.permission_requests_per_24h, state.requests, DAY, now),
            _limit("P7D", lim.permission_requests_per_7d, state.requests, WEEK, now),
        ]
        call_limits = [
            _limit("PT24H", lim.connected_calls_per_24h, state.connected_calls, DAY, now)
        ]
        within = lambda limits: all(x["current_usage"] < x["max_allowed"] for x in limits)  # noqa: E731
        return {
            "messaging_product": "whatsapp",
            "permission": permission,
            "actions": [
                {
                    "action_name": "send_call_permission_request",
                    "can_perform_action": status != "permanent" and within(request_limits),
                    "limits": request_limits,
                },
                {
                    "action_name": "start_call",
                    "can_perform_action": status != "no_permission" and within(call_limits),
                    "limits": call_limits,
                },
            ],
        }

    def request_permission(
        self, provider: str, wa_id: str, *, free_form: bool
    ) -> PermissionRequest:
        """Send a call-permission request (interactive or template); the user's reply follows
        per their scenario. Raises SimApiError 131047 / 138017 / 138009."""
        scenario = self.scenario_for(wa_id)
        if free_form and not scenario.service_window_open:
            raise SimApiError(
                131047,
                "Message failed to send because more than 24 hours have passed since the "
                "customer last replied to this number; send the permission request as a template",
            )
        now = time.time()
        state = self.user_state(wa_id)
        if state.current_permission(now) == "permanent":
            raise SimApiError(138017, f"{wa_id} has already granted permanent call permission")
        lim = self.limits
        for period, max_allowed, window in (
            ("24 hours", lim.permission_requests_per_24h, DAY),
            ("7 days", lim.permission_requests_per_7d, WEEK),
        ):
            inside = _limit(period, max_allowed, state.requests, window, now)
            if inside["current_usage"] >= max_allowed:
                raise SimApiError(
                    138009,
                    f"Limit of {max_allowed} call permission request(s) per {period} reached for "
                    f"this user; next request allowed at {_iso(inside['limit_expiration_time'])}",
                )
        state.requests.append(now)
        request = PermissionRequest(new_wamid(), wa_id, provider, now)
        self.permission_requests[request.id] = request
        self._spawn(self._answer_permission_request(request, scenario), f"permission-{wa_id}")
        return request

    async def _answer_permission_request(
        self, request: PermissionRequest, scenario: Scenario
    ) -> None:
        await asyncio.sleep(scenario.permission_reply_delay_s)
        state = self.user_state(request.wa_id)
        sink = self.sinks.get(request.provider)
        if sink is None:
            return
        if not scenario.has_whatsapp or scenario.permission == "none":
            sink.permission_undeliverable(state, request)
        elif scenario.permission in ("grant_on_request", "granted"):
            state.grant(scenario.permanent, self.limits.temporary_permission_s, time.time())
            sink.permission_reply(state, request, True, scenario)
        elif scenario.permission == "deny_on_request":
            sink.permission_reply(state, request, False, scenario)
        # ignore_request: the user never answers.

    # -- calls -----------------------------------------------------------------------------

    def active_call_for(self, wa_id: str) -> SimCall | None:
        return next((c for c in self.calls.values() if c.wa_id == wa_id and not c.ended), None)

    def connect(
        self, provider: str, wa_id: str, offer_sdp: str, biz_opaque_callback_data: str | None = None
    ) -> SimCall:
        """Place a business-initiated call: every synchronous check of spec §1.7, then the
        call runs by itself (§1.13) and reports through the provider's sink."""
        if self.calling_settings.get("status") != "ENABLED":
            raise SimApiError(138000, "Enable calling with POST /{phone_number_id}/settings first")
        problem = sdp_problem(offer_sdp)
        if problem:
            raise SimApiError(100, problem)
        scenario = self.scenario_for(wa_id)
        if not scenario.has_whatsapp:
            raise SimApiError(138001, f"{wa_id} is not a WhatsApp user or cannot receive calls")
        if self.active_call_for(wa_id) is not None:
            raise SimApiError(138003, f"A call is already ongoing with {wa_id}")
        now = time.time()
        state = self.user_state(wa_id)
        if state.current_permission(now) == "no_permission":
            raise SimApiError(138006, f"No approved call permission from {wa_id}")
        daily = _limit(
            "PT24H", self.limits.connected_calls_per_24h, state.connected_calls, DAY, now
        )
        if daily["current_usage"] >= daily["max_allowed"]:
            at = daily["limit_expiration_time"]
            raise SimApiError(
                138012,
                f"Limit of {daily['max_allowed']} connected business-initiated calls per 24 hours "
                f"reached for this user; next call allowed at {_iso(at)} ({at})",
            )
        active = sum(1 for c in self.calls.values() if not c.ended)
        if active >= self.limits.concurrent_calls:
            raise SimApiError(138002, f"{active} calls are ongoing on this number")
        call = SimCall(new_wacid(), provider, wa_id, scenario, offer_sdp, biz_opaque_callback_data)
        self.calls[call.id] = call
        call._task = self._spawn(self._run_call(call), f"call-{call.id[:16]}")
        return call

    def find_call(self, call_id: str) -> SimCall:
        call = self.calls.get(call_id)
        if call is None:
            raise SimApiError(100, f"call_id {call_id!r} does not match a call on this number")
        return call

    async def terminate(self, call_id: str) -> SimCall:
        """The business ends the call. Idempotent for a call that already ended."""
        call = self.find_call(call_id)
        if call.ended:
            return call
        call.terminated_by = "business"
        await self._stop_flow(call)
        self._finish(call, "COMPLETED" if call.start_time else "FAILED", "business_terminated")
        return call

    async def hangup(self, call_id: str) -> SimCall:
        """The user hangs up (from code, a test, or `POST /_sim/calls/{id}/hangup`)."""
        call = self.find_call(call_id)
        if call.ended:
            return call
        if call.user is not None:
            await call.user.hangup()
        else:
            call._user_end_reason = "hangup"
            call._user_done.set()
        return call

    async def close(self) -> None:
        """Cancel every timer and call, close every simulated user."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await asyncio.gather(*tasks, return_exceptions=True)
        for call in self.calls.values():
            await self._close_user(call)

    # -- the call state machine (spec §1.13) -------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"whatsapp-sim-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _event(self, call: SimCall, event: str, **data: Any) -> None:
        call.events.append({"at": time.time(), "event": event, **data})

    async def _run_call(self, call: SimCall) -> None:
        try:
            await self._call_flow(call)
        except _CallFailed as exc:
            self._finish(call, "FAILED", exc.reason, details=exc.details)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("simulated call %s failed", call.id)
            self._finish(call, "FAILED", "simulator_error", details=type(exc).__name__)
        finally:
            await self._close_user(call)

    async def _call_flow(self, call: SimCall) -> None:
        scenario, lim = call.scenario, self.limits
        sink = self.sinks[call.provider]
        await asyncio.sleep(lim.connect_delay_s)
        call.answer_sdp = await self._make_answer(call)
        connect_sent = time.monotonic()
        self._event(call, "connect")
        sink.call_connect(call)

        await asyncio.sleep(lim.ringing_delay_s)
        call.state = "ringing"
        self._event(call, "status", status="RINGING")
        sink.call_status(call, "RINGING")

        if scenario.answer == "no_answer":
            ring = (
                scenario.ring_timeout_s
                if scenario.ring_timeout_s is not None
                else lim.ring_timeout_s
            )
            if not await self._user_done_within(call, ring):
                self._finish(call, "FAILED", "no_answer")
                return
            self._finish_user_ended(call)
            return

        if await self._user_done_within(call, scenario.answer_delay_s):
            self._finish_user_ended(call)
            return
        if scenario.answer == "reject":
            self._event(call, "status", status="REJECTED")
            sink.call_status(call, "REJECTED")
            self._finish(call, "FAILED", "rejected")
            return

        # Accepted. Meta reports ACCEPTED once media is up (spec §0 note).
        if call.user is not None:
            remaining = lim.connect_timeout_s - (time.monotonic() - connect_sent)
            if not await self._media_connected(call, max(remaining, 0.01)):
                if call._user_done.is_set():
                    self._finish_user_ended(call)
                    return
                raise _CallFailed(
                    "connect_timeout", "ICE/DTLS did not complete; was the answer applied?"
                )
        call.state = "accepted"
        call.start_time = time.time()
        state = self.user_state(call.wa_id)
        state.connected_calls.append(call.start_time)
        state.requests.clear()  # "These limits reset when any connected call is made."
        state.missed_in_a_row = 0
        self._event(call, "status", status="ACCEPTED")
        sink.call_status(call, "ACCEPTED")

        if await self._user_done_within(call, scenario.hangup_after_s):
            self._finish_user_ended(call)
            return
        # The scenario's hang-up time passed: the user hangs up.
        if call.user is not None:
            await call.user.hangup()
        call.terminated_by = "user"
        self._finish(call, "COMPLETED", "hangup")

    async def _make_answer(self, call: SimCall) -> str:
        if not call.scenario.media:
            return canned_answer(call.offer_sdp)
        from whatsapp_call_sim.user import SimulatedUser  # engineer B's module; heavy (aiortc)

        call.user = SimulatedUser(
            call.wa_id,
            script=call.scenario.user_script,
            host_addresses=self.config.user_host_addresses,
        )
        try:
            answer = await call.user.answer(call.offer_sdp)
        except ValueError as exc:  # SdpRejected
            raise _CallFailed(
                "sdp_rejected", f"The callee's client refused the offer: {exc}"
            ) from None
        call._watcher = asyncio.create_task(self._watch_user(call), name="whatsapp-sim-user-watch")
        return answer

    async def _watch_user(self, call: SimCall) -> None:
        await call.user.ended.wait()
        call._user_end_reason = call.user.end_reason or "peer_closed"
        call._user_done.set()

    async def _user_done_within(self, call: SimCall, timeout: float | None) -> bool:
        """True if the user side ended (hung up, lost media) within `timeout` (None: ever)."""
        try:
            async with asyncio.timeout(timeout):
                await call._user_done.wait()
        except TimeoutError:
            return False
        return True

    async def _media_connected(self, call: SimCall, timeout: float) -> bool:
        connected = asyncio.create_task(call.user.wait_connected(timeout))
        gone = asyncio.create_task(call._user_done.wait())
        try:
            done, _ = await asyncio.wait(
                {connected, gone}, timeout=timeout + 1.0, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (connected, gone):
                task.cancel()
            await asyncio.gather(connected, gone, return_exceptions=True)
        return connected in done and not connected.cancelled() and connected.exception() is None

    def _finish_user_ended(self, call: SimCall) -> None:
        reason = call._user_end_reason or "peer_closed"
        if reason == "no_media" and call.start_time is None:
            reason = "connect_timeout"  # media never came up: Meta's 138007, not a mid-call drop
        call.terminated_by = "user" if reason == "hangup" else "network"
        ok = reason == "hangup" and call.start_time is not None
        self._finish(call, "COMPLETED" if ok else "FAILED", reason)

    def _finish(self, call: SimCall, status: str, reason: str, details: str | None = None) -> None:
        """End the call once: record it, update the user's counters, send terminate."""
        if call.ended:
            return
        call.state = "ended"
        call.status = status
        call.end_reason = reason
        call.end_time = time.time()
        code = END_REASON_ERRORS.get(reason)
        if status == "FAILED" and code is not None:
            call.errors = [error_entry(code, details or reason.replace("_", " "))]
        if call.start_time is None and reason in ("rejected", "no_answer"):
            state = self.user_state(call.wa_id)
            state.missed_in_a_row += 1
            if state.missed_in_a_row >= self.limits.missed_calls_before_revoke:
                state.permission, state.expiration_time = "no_permission", None
                state.missed_in_a_row = 0
        self._event(call, "terminate", status=status, reason=reason)
        self.sinks[call.provider].call_terminate(call)

    async def _stop_flow(self, call: SimCall) -> None:
        task = call._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(10):
                    await task

    async def _close_user(self, call: SimCall) -> None:
        if call._watcher is not None:
            call._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call._watcher
            call._watcher = None
        if call.user is not None:
            try:
                async with asyncio.timeout(5):
                    await call.user.close()
            except Exception as exc:  # a broken user must not break the simulator
                log.warning("closing simulated user %s: %s", call.wa_id, type(exc).__name__)
