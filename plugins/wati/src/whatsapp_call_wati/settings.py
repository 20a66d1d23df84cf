"""The WATI plugin's own options (beyond the core `wati*` keys): HTTP timing only."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from whatsapp_call.config import Settings
from whatsapp_call.providers.http import HttpPolicy


class WatiSettings(BaseModel):
    """Read from the same `channels.whatsappcall` block, camelCase keys."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    wati_http_timeout_seconds: float = Field(
        10.0, gt=0, le=120, description="Timeout of one WATI API request."
    )
    wati_retry_budget_seconds: float = Field(
        30.0,
        ge=0,
        le=600,
        description="Longest time spent retrying one WATI API call (429/5xx/network).",
    )


def http_policy(settings: Settings) -> HttpPolicy:
    own = settings.plugin_settings(WatiSettings)
    assert isinstance(own, WatiSettings)
    return HttpPolicy(timeout=own.wati_http_timeout_seconds, budget=own.wati_retry_budget_seconds)
