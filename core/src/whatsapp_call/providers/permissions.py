"""WhatsApp's call-permission object (Graph `GET /{phone-number-id}/call_permissions`, spec
§1.4) as a provider-neutral `PermissionState`, and a refused permission request as a result.

Meta returns the object as is; WATI (and other Business Solution Providers that proxy the
Cloud API) wrap the same object in their envelope: pass the inner object.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from ..errors import ProviderError
from ..models import (
    PermissionRequestOutcome,
    PermissionRequestResult,
    PermissionState,
    PermissionStatus,
)
from ..redact import scrub


def to_datetime(value: Any) -> datetime | None:
    """Unix seconds (int or digit string, as Meta sends both) to an aware UTC datetime."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        seconds = float(value)
        return datetime.fromtimestamp(seconds, UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def human_period(period: str) -> str:
    """An ISO 8601 limit period as words: "P1D" -> "day", "P7D" -> "7 days", "PT1H" -> "1 h"."""
    match = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?)?", period or "")
    if not match or not any(match.groups()):
        return period or "period"
    days, hours, minutes = (int(g) if g else 0 for g in match.groups())
    if days and not hours and not minutes:
        return f"{days} days" if days != 1 else "day"
    hours += days * 24
    if hours and not minutes:
        return f"{hours} h"
    return f"{hours * 60 + minutes} min"


def _exhausted(action: Mapping[str, Any]) -> tuple[datetime | None, str]:
    """When an action's exhausted limit resets, and a phrase naming that limit."""
    latest: datetime | None = None
    phrase = ""
    limits = action.get("limits")
    for limit in limits if isinstance(limits, list) else []:
        if not isinstance(limit, dict):
            continue
        reset = to_datetime(limit.get("limit_expiration_time"))
        used, allowed = limit.get("current_usage"), limit.get("max_allowed")
        full = isinstance(used, int) and isinstance(allowed, int) and used >= allowed
        if reset is not None or full:
            if reset is not None and (latest is None or reset > latest):
                latest = reset
            phrase = f"{allowed} per {human_period(str(limit.get('time_period', '')))}"
    return latest, phrase


def fmt_time(when: datetime | None) -> str:
    """A time for a sentence shown to users ("2025-06-01 14:30 UTC"); "" for None."""
    return when.strftime("%Y-%m-%d %H:%M UTC") if when else ""


def permission_state(
    data: Mapping[str, Any],
    provider: str,
    what: str = "check call permission",
    *,
    label: str | None = None,
) -> PermissionState:
    """The call_permissions object (Meta's answer, WATI's `result`) as a PermissionState.

    `label` names the provider in errors as users know it ("Meta"; default `provider`).
    """
    label = label or provider
    permission = data.get("permission")
    if not isinstance(permission, dict) or not isinstance(permission.get("status"), str):
        shown = scrub(json.dumps(data, default=str)[:200])
        raise ProviderError(
            f"{label}: could not {what}: the answer has no permission.status: {shown}.",
            "Check the API base URL in your config; this may be an API change.",
            provider=provider,
        )
    status = permission["status"].strip().lower()
    actions: dict[str, dict[str, Any]] = {}
    raw_actions = data.get("actions")
    for action in raw_actions if isinstance(raw_actions, list) else []:
        if isinstance(action, dict) and isinstance(action.get("action_name"), str):
            actions[action["action_name"]] = action
    granted = status in ("temporary", "permanent")
    if status not in ("temporary", "permanent", "no_permission"):
        raise ProviderError(
            f"{label}: could not {what}: unknown permission status {status!r}.",
            "This may be an API change; please report it.",
            provider=provider,
        )
    expires_at = to_datetime(permission.get("expiration_time")) if status == "temporary" else None

    def allowed(name: str, default: bool) -> tuple[bool, datetime | None, str]:
        action = actions.get(name)
        if action is None:
            return default, None, ""
        can = action.get("can_perform_action") is True
        reset, phrase = _exhausted(action) if not can else (None, "")
        return can, reset, phrase

    can_call, next_call_at, call_limit = allowed("start_call", granted)
    can_request, next_request_at, request_limit = allowed(
        "send_call_permission_request", not granted
    )
    if granted:
        detail = (
            "The user allows calls permanently."
            if status == "permanent"
            else "The user allows calls"
            + (f" until {fmt_time(expires_at)}." if expires_at else " (temporarily).")
        )
        if not can_call:
            detail += " No call can be placed now" + (
                f" (limit of {call_limit} connected calls reached)" if call_limit else ""
            )
            detail += f"; next call possible at {fmt_time(next_call_at)}." if next_call_at else "."
    else:
        detail = "The user has not allowed calls."
        if can_request:
            detail += " A permission request can be sent."
        else:
            detail += " No permission request can be sent now" + (
                f" (limit of {request_limit} requests reached)" if request_limit else ""
            )
            detail += (
                f"; next request possible at {fmt_time(next_request_at)}."
                if next_request_at
                else "."
            )
    return PermissionState(
        status=PermissionStatus.GRANTED if granted else PermissionStatus.NOT_GRANTED,
        permanent=status == "permanent",
        expires_at=expires_at,
        can_request=can_request,
        can_call=can_call,
        next_request_at=None if can_request else next_request_at,
        next_call_at=None if can_call else next_call_at,
        detail=detail,
    )


_UNIX = re.compile(r"\b(1\d{9})\b")
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2})?(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?")


def time_in_details(details: str | None) -> datetime | None:
    """The retry time Meta writes into `error_data.details` (unix seconds or ISO 8601)."""
    if not details:
        return None
    match = _ISO.search(details)
    if match:
        try:
            when = datetime.fromisoformat(match.group(0).replace("Z", "+00:00"))
            return when if when.tzinfo else when.replace(tzinfo=UTC)
        except ValueError:
            pass
    match = _UNIX.search(details)
    return to_datetime(match.group(1)) if match else None


# WhatsApp's codes for a permission request that is refused because none is needed or allowed.
ALREADY_PERMANENT = 138017
REQUEST_LIMIT_REACHED = 138009


async def refused_request_result(
    error: ProviderError,
    check: Callable[[], Awaitable[PermissionState]],
    *,
    limit_note: str = "",
) -> PermissionRequestResult:
    """A refused permission request as the result callers act on, or `error` raised again.

    WhatsApp refuses a request to a user who already allows calls permanently (138017) and
    one beyond the request limit (138009): neither is a failure for the caller. For the limit,
    the reset time is read from the error's details, else asked with `check` (a permission
    check); `limit_note` follows "is reached" in the detail (e.g. " (1 per 24 h, 2 per 7 days)").
    """
    if error.code == ALREADY_PERMANENT:
        return PermissionRequestResult(
            PermissionRequestOutcome.ALREADY_PERMANENT,
            detail="The user already allows calls permanently; no request was sent.",
        )
    if error.code != REQUEST_LIMIT_REACHED:
        raise error
    retry_at = time_in_details(error.details)
    if retry_at is None:  # ask the provider when the request limit resets
        try:
            retry_at = (await check()).next_request_at
        except ProviderError:
            retry_at = None
    return PermissionRequestResult(
        PermissionRequestOutcome.LIMIT_REACHED,
        retry_at=retry_at,
        detail="No request was sent: the limit of permission requests to this user is "
        f"reached{limit_note}" + (f"; next possible at {fmt_time(retry_at)}." if retry_at else "."),
    )
