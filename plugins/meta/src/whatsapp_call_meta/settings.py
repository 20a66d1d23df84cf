"""The Meta plugin's own options (beyond the core `meta*` keys): HTTP timing only."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from whatsapp_call.config import Settings
from whatsapp_call.providers.http import HttpPolicy


class MetaSettings(BaseModel):
    """Read from the same `channels.whatsappcall` block, camelCase keys."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    meta_http_timeout_seconds: float = Field(
        10.0, gt=0, le=120, description="Timeout of one Graph API request."
    )
    meta_retry_budget_seconds: float = Field(
        30.0,
        ge=0,
        le=600,
        description="Longest time spent retrying one Graph API call (429/5xx/network).",
    )


def http_policy(settings: Settings) -> HttpPolicy:
    own = settings.plugin_settings(MetaSettings)
    assert isinstance(own, MetaSettings)
    return HttpPolicy(timeout=own.meta_http_timeout_seconds, budget=own.meta_retry_budget_seconds)
