"""The commented example config written by `whatsapp-call config init`, built from the
Settings model itself so it never drifts from the real options."""

from __future__ import annotations

import json

from pydantic.alias_generators import to_camel

from .config import PROVIDER_REQUIRED, Settings

_SECTIONS = {
    "meta": ("meta_",),
    "wati": ("wati_",),
}
_SKIP = {"enabled", "provider"}


def example_config(provider: str) -> str:
    required = set(PROVIDER_REQUIRED[provider]) | {"openaiApiKey"}
    other = "wati" if provider == "meta" else "meta"
    lines = [
        "# whatsapp-call configuration. Keys marked REQUIRED must be filled in.",
        "# Every key can also be set as an environment variable WHATSAPP_CALL_<KEY>,",
        "# e.g. WHATSAPP_CALL_OPENAI_API_KEY. Keep this file private (chmod 600).",
        "channels:",
        "  whatsappcall:",
        "    enabled: true",
        f"    provider: {provider}",
    ]
    for name, field in Settings.model_fields.items():
        if name in _SKIP or name.startswith(_SECTIONS[other]):
            continue
        key = to_camel(name)
        doc = field.description or ""
        if key in required:
            lines.append(f"    # {doc} REQUIRED")
            lines.append(f'    {key}: ""')
            continue
        default = field.get_default(call_default_factory=True)
        if default is None:
            shown = ""
        elif isinstance(default, str | int | float | bool | list):
            shown = json.dumps(default)
        else:
            shown = json.dumps(str(default))
        lines.append(f"    # {key}: {shown}" + (f"    # {doc}" if doc else ""))
    return "\n".join(lines) + "\n"
