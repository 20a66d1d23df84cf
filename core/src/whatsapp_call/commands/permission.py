"""`whatsapp-call permission check|request TO`: WhatsApp's call permission, by hand.

A business may only call a user who allowed it. `check` asks the configured provider what
the user allowed and what may be done now; `request` sends WhatsApp's "Allow calls" request.
Both print what to do next, or JSON with `--json`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
from datetime import datetime
from typing import Any

import click

from .. import plugins as plugin_mod
from ..config import Settings
from ..errors import ConfigError, PluginError
from ..models import (
    Call,
    PermissionRequestOutcome,
    PermissionRequestResult,
    PermissionState,
    PermissionStatus,
)
from ..phone import PhoneNumber, parse_phone


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else ""


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _provider(settings: Settings) -> str:
    if not settings.provider:
        raise ConfigError(
            "No WhatsApp provider is configured.",
            "Set provider: meta or wati under channels.whatsappcall (whatsapp-call config init).",
        )
    return settings.provider


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


async def _ask_service(hook: str, to: PhoneNumber, settings: Settings) -> Any:
    """Remote mode: the service asks its provider (this machine has no provider set up)."""
    from ..client import ServiceClient

    async with ServiceClient.from_settings(settings) as client:
        if hook == "check_permission":
            data = await client.check_permission(to.e164)
            return PermissionState(
                status=PermissionStatus(data["status"]),
                permanent=bool(data.get("permanent")),
                expires_at=_time(data.get("expires_at")),
                can_request=bool(data.get("can_request")),
                can_call=bool(data.get("can_call")),
                next_request_at=_time(data.get("next_request_at")),
                next_call_at=_time(data.get("next_call_at")),
                detail=data.get("detail") or "",
            )
        data = await client.request_permission(to.e164)
        return PermissionRequestResult(
            outcome=PermissionRequestOutcome(data["outcome"]),
            message_id=data.get("message_id"),
            retry_at=_time(data.get("retry_at")),
            detail=data.get("detail") or "",
        )


async def _ask(hook: str, to: PhoneNumber, settings: Settings) -> Any:
    if settings.remote:
        return await _ask_service(hook, to, settings)
    provider = _provider(settings)
    call = Call(to=to, provider=provider)
    result = await plugin_mod.call_first(hook, call=call, settings=settings)
    if result is None:
        raise PluginError(
            f"No installed plugin answers for provider {provider!r}.",
            f"Install it (pip install 'whatsapp-call[{provider}]') or fix 'provider' in the "
            "config; 'whatsapp-call plugins' lists what is installed.",
        )
    return result


def describe_state(to: PhoneNumber, state: PermissionState) -> list[str]:
    """Lines for a person: what the user allowed, then what to do next."""
    lines: list[str] = []
    if state.status == PermissionStatus.GRANTED:
        kind = "permanently" if state.permanent else "temporarily"
        until = f" (until {_when(state.expires_at)})" if state.expires_at else ""
        lines.append(f"{to}: calls allowed {kind}{until}.")
        if state.can_call:
            lines.append(f"Next: call now with: whatsapp-call call {to}")
        else:
            at = f" at {_when(state.next_call_at)}" if state.next_call_at else " later"
            lines.append(f"No call can be placed right now (a call limit is reached); try{at}.")
    elif state.status == PermissionStatus.REQUESTED:
        lines.append(f"{to}: a permission request is waiting for the user's answer.")
        lines.append(
            f"Next: wait for it, then check again with: whatsapp-call permission check {to}"
        )
    else:
        lines.append(f"{to}: calls not allowed (no permission).")
        if state.can_request:
            lines.append(f"A request can be sent: whatsapp-call permission request {to}")
        else:
            at = f" at {_when(state.next_request_at)}" if state.next_request_at else " later"
            lines.append(
                f"No request can be sent right now (request limit reached); try{at}, or ask "
                "the user to call your business number (with callback permission enabled, "
                "that allows calls back)."
            )
    blocked = not (
        state.can_call if state.status == PermissionStatus.GRANTED else state.can_request
    )
    if state.detail and blocked:  # the provider's words on which limit applies
        lines.append(f"({state.detail})")
    return lines


def describe_request(to: PhoneNumber, result: PermissionRequestResult) -> list[str]:
    if result.outcome == PermissionRequestOutcome.SENT:
        ref = f" (message id {result.message_id})" if result.message_id else ""
        return [
            f"Permission request sent to {to}{ref}.",
            "The user sees 'Allow calls' in WhatsApp; their answer arrives by webhook.",
            f"Next: once they accept, check with: whatsapp-call permission check {to}",
        ]
    if result.outcome == PermissionRequestOutcome.ALREADY_PERMANENT:
        return [
            f"Not sent: {to} already allows calls permanently.",
            f"Next: call now with: whatsapp-call call {to}",
        ]
    at = f" at {_when(result.retry_at)}" if result.retry_at else " later"
    return [
        f"Not sent: the permission-request limit for {to} is reached (WhatsApp allows 1 per "
        "24 h and 2 per 7 days).",
        f"Next: try again{at}, or ask the user to call your business number.",
    ]


@click.group()
def permission() -> None:
    """Check or request a user's permission to be called on WhatsApp."""


@permission.command("check")
@click.argument("to")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def check(app: Any, to: str, as_json: bool) -> None:
    """Has TO (e.g. +14085551234) allowed calls, and what can be done now?"""
    number = parse_phone(to)
    state: PermissionState = asyncio.run(_ask("check_permission", number, app.settings()))
    if as_json:
        click.echo(json.dumps({"to": number.e164} | _jsonable(state), indent=2))
        return
    for line in describe_state(number, state):
        click.echo(line)


@permission.command("request")
@click.argument("to")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def request(app: Any, to: str, as_json: bool) -> None:
    """Send TO WhatsApp's "Allow calls" request (limited to 1 per 24 h, 2 per 7 days)."""
    number = parse_phone(to)
    result: PermissionRequestResult = asyncio.run(
        _ask("request_permission", number, app.settings())
    )
    if as_json:
        click.echo(json.dumps({"to": number.e164} | _jsonable(result), indent=2))
        return
    for line in describe_request(number, result):
        click.echo(line)
