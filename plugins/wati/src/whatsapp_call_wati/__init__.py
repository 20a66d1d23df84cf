"""WATI Calling API provider for whatsapp-call.

Module-level hook implementations; each answers only when `settings.provider == "wati"`
(`parse_webhook` when the webhook is WATI's), so other providers can be installed alongside.
WATI cannot carry our own call id: its webhooks are correlated by WATI's `callId`.
"""

from __future__ import annotations

from pydantic import BaseModel
from whatsapp_call import hookimpl
from whatsapp_call.config import Settings
from whatsapp_call.models import (
    Call,
    DoctorCheck,
    PermissionRequestResult,
    PermissionState,
    WebhookRequest,
    WebhookResult,
)

from . import client, doctor, webhooks
from .settings import WatiSettings

PROVIDER = "wati"


@hookimpl
def provider_names() -> list[str]:
    return [PROVIDER]


@hookimpl
def settings_model() -> type[BaseModel]:
    return WatiSettings


@hookimpl
async def check_permission(call: Call, settings: Settings) -> PermissionState | None:
    if settings.provider != PROVIDER:
        return None
    return await client.check_permission(call, settings)


@hookimpl
async def request_permission(call: Call, settings: Settings) -> PermissionRequestResult | None:
    if settings.provider != PROVIDER:
        return None
    return await client.request_permission(call, settings)


@hookimpl
async def send_offer(call: Call, sdp: str, settings: Settings) -> str | None:
    if settings.provider != PROVIDER:
        return None
    return await client.send_offer(call, sdp, settings)


@hookimpl
async def terminate_call(call: Call, settings: Settings) -> bool | None:
    if settings.provider != PROVIDER:
        return None
    return await client.terminate_call(call, settings)


@hookimpl
def parse_webhook(
    provider: str, request: WebhookRequest, settings: Settings
) -> WebhookResult | None:
    if provider != PROVIDER:
        return None
    return webhooks.parse(request, settings)


@hookimpl
async def doctor_checks(settings: Settings) -> list[DoctorCheck] | None:
    if settings.provider != PROVIDER:
        return None
    return await doctor.run(settings)


async def aclose() -> None:
    """Close this event loop's pooled HTTP connections (also done when the loop shuts down)."""
    await client.pool.aclose()
