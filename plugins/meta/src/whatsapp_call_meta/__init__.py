"""WhatsApp Cloud API (Meta Graph API) provider for whatsapp-call.

Module-level hook implementations (core's `ProviderHooks`); each answers only when
`settings.provider == "meta"` (`parse_webhook` when the webhook is Meta's), so other providers
can be installed alongside.
"""

from __future__ import annotations

from whatsapp_call.providers.hooks import ProviderHooks

from . import client, doctor, webhooks
from .settings import MetaSettings

PROVIDER = "meta"

hooks = ProviderHooks(
    PROVIDER,
    client=client,
    parse_webhook=webhooks.parse,
    settings_model=MetaSettings,
    doctor_checks=doctor.run,
)
# The hook implementations pluggy finds on this module.
provider_names = hooks.provider_names
settings_model = hooks.settings_model
check_permission = hooks.check_permission
request_permission = hooks.request_permission
send_offer = hooks.send_offer
terminate_call = hooks.terminate_call
parse_webhook = hooks.parse_webhook
doctor_checks = hooks.doctor_checks


async def aclose() -> None:
    """Close this event loop's pooled HTTP connections (also done when the loop shuts down)."""
    await client.pool.aclose()
