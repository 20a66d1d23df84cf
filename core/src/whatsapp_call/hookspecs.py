"""Every hook a whatsapp-call plugin can implement.

Names carry no prefix: they are few, and the `whatsapp_call` project name of the plugin
manager already namespaces them. Each `firstresult` hook is answered by exactly one plugin:
provider hooks by the plugin whose provider name equals `settings.provider` (the others
return None), `open_voice_session` by the one named in `settings.voice_backend`.
`settings` is always the validated `whatsapp_call.config.Settings`.

The reference with examples is docs/plugins.md; a test keeps the two in step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pluggy import HookspecMarker

if TYPE_CHECKING:
    import click
    from pydantic import BaseModel

    from .config import Settings
    from .models import (
        Call,
        DoctorCheck,
        IceServer,
        PermissionRequestResult,
        PermissionState,
        VoiceTool,
        WebhookRequest,
        WebhookResult,
    )
    from .voice import VoiceSession

hookspec = HookspecMarker("whatsapp_call")


@hookspec(firstresult=True)
async def check_permission(call: Call, settings: Settings) -> PermissionState | None:
    """Ask the provider whether `call.to` has allowed this business to call.

    Returns a `PermissionState` (granted with expiry / not granted with whether a request
    can be sent and when / requested). Answered by the configured provider only; async.
    Raises `ProviderError` when the provider fails.
    """


@hookspec(firstresult=True)
async def request_permission(call: Call, settings: Settings) -> PermissionRequestResult | None:
    """Send WhatsApp's call-permission request to `call.to`.

    Returns a `PermissionRequestResult`: sent (with the message id), limit reached (with
    when it resets) or already permanently allowed. The user's answer arrives later as a
    `PERMISSION_REPLY` event from `parse_webhook`. Configured provider only; async.
    """


@hookspec(firstresult=True)
async def send_offer(call: Call, sdp: str, settings: Settings) -> str | None:
    """Place the call: send our SDP offer to `call.to`. Returns the provider's call id.

    The answer SDP arrives later as an `ANSWER` event (possibly before this returns).
    The provider must carry `call.id` so webhooks map back (Meta: biz_opaque_callback_data).
    Configured provider only; async. Raises `ProviderError` (e.g. code 138006 no permission).
    """


@hookspec(firstresult=True)
async def terminate_call(call: Call, settings: Settings) -> bool | None:
    """Hang up `call` (by `call.provider_call_id`) at the provider. Returns True when done.

    Called for every call we end, even after media stopped (billing accuracy). Async.
    """


@hookspec(firstresult=True)
def parse_webhook(
    provider: str, request: WebhookRequest, settings: Settings
) -> WebhookResult | None:
    """Verify and parse one webhook request for `provider` ("meta", "wati", ...).

    Verify the signature on the raw `request.body` BEFORE parsing; on failure raise
    `WebhookRejected` (status 403) and change nothing. Return a `WebhookResult` with the
    typed `CallEvent`s (or the GET verification answer). Return None when `provider` is not
    yours. Synchronous: it must not do I/O.
    """


@hookspec
async def fetch_ice_servers(settings: Settings) -> list[IceServer] | None:
    """Contribute STUN/TURN servers for the next call. NOT firstresult: the lists from all
    plugins are merged and sorted by `IceServer.priority`. Async. On failure, log a warning
    and return an empty list: the call proceeds with what the other plugins gave.
    """


@hookspec(firstresult=True)
async def open_voice_session(call: Call, settings: Settings) -> VoiceSession | None:
    """Return a new (not yet started) `VoiceSession` for `call`, when
    `settings.voice_backend` names your backend; else None. Async.
    """


@hookspec
def voice_tools(call: Call, settings: Settings) -> list[VoiceTool] | None:
    """Functions the AI may call during `call` (core adds `end_call`). All plugins' lists
    are merged; backends that support function calling offer them to the model.
    """


@hookspec
def provider_names() -> list[str] | None:
    """The provider names this plugin answers for (e.g. ["meta"]). Lets `doctor` and config
    validation tell a user that the configured provider's plugin is not installed."""


@hookspec
def voice_backend_names() -> list[str] | None:
    """The voice backend names this plugin answers for (e.g. ["openai"])."""


@hookspec
def settings_model() -> type[BaseModel] | None:
    """A pydantic model of the plugin's own extra config keys (camelCase aliases), read
    from the same `channels.whatsappcall` block. Unknown keys of no model are an error.
    Read the values back with `settings.plugin_settings(YourModel)`.
    """


@hookspec
def doctor_checks(settings: Settings) -> list[DoctorCheck] | None:
    """Diagnostics for `whatsapp-call doctor`: config the plugin needs, reachability.
    May be async (return an awaitable). Never put a secret in a message.
    """


@hookspec
def register_commands(cli: click.Group) -> Any:
    """Add click commands to the `whatsapp-call` CLI (e.g. the simulators' `sim`)."""
