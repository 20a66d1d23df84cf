"""`ProviderHooks`: the provider hook implementations, which are the same for every provider.

Each provider hook is firstresult and must answer only when the provider is its own
(`settings.provider`, or the webhook's provider for `parse_webhook`), returning None
otherwise so that several providers can be installed side by side. This class holds that
rule once; the plugin supplies what is its own: a client, a webhook parser, a settings model
and doctor checks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from .. import hookimpl

if TYPE_CHECKING:
    from pydantic import BaseModel

    from ..config import Settings
    from ..models import (
        Call,
        DoctorCheck,
        PermissionRequestResult,
        PermissionState,
        WebhookRequest,
        WebhookResult,
    )


class ProviderClient(Protocol):
    """What a provider's client offers (a module of these functions qualifies)."""

    async def check_permission(self, call: Call, settings: Settings) -> PermissionState: ...

    async def request_permission(
        self, call: Call, settings: Settings
    ) -> PermissionRequestResult: ...

    async def send_offer(self, call: Call, sdp: str, settings: Settings) -> str: ...

    async def terminate_call(self, call: Call, settings: Settings) -> bool: ...


class ProviderHooks:
    """The provider hooks for provider `name`, as `@hookimpl` methods.

    pluggy registers whatever module or object it is given: expose these methods as the
    plugin module's attributes (`send_offer = hooks.send_offer`, ...), or register the object.
    """

    def __init__(
        self,
        name: str,
        *,
        client: ProviderClient,
        parse_webhook: Callable[[WebhookRequest, Settings], WebhookResult],
        settings_model: type[BaseModel] | None = None,
        doctor_checks: Callable[[Settings], Awaitable[list[DoctorCheck]]] | None = None,
    ):
        self.name = name
        self._client = client
        self._parse = parse_webhook
        self._model = settings_model
        self._doctor = doctor_checks

    @hookimpl
    def provider_names(self) -> list[str]:
        return [self.name]

    @hookimpl
    def settings_model(self) -> type[BaseModel] | None:
        return self._model

    @hookimpl
    async def check_permission(self, call: Call, settings: Settings) -> PermissionState | None:
        if settings.provider != self.name:
            return None
        return await self._client.check_permission(call, settings)

    @hookimpl
    async def request_permission(
        self, call: Call, settings: Settings
    ) -> PermissionRequestResult | None:
        if settings.provider != self.name:
            return None
        return await self._client.request_permission(call, settings)

    @hookimpl
    async def send_offer(self, call: Call, sdp: str, settings: Settings) -> str | None:
        if settings.provider != self.name:
            return None
        return await self._client.send_offer(call, sdp, settings)

    @hookimpl
    async def terminate_call(self, call: Call, settings: Settings) -> bool | None:
        if settings.provider != self.name:
            return None
        return await self._client.terminate_call(call, settings)

    @hookimpl
    def parse_webhook(
        self, provider: str, request: WebhookRequest, settings: Settings
    ) -> WebhookResult | None:
        if provider != self.name:
            return None
        return self._parse(request, settings)

    @hookimpl
    async def doctor_checks(self, settings: Settings) -> list[DoctorCheck] | None:
        if settings.provider != self.name or self._doctor is None:
            return None
        return await self._doctor(settings)
