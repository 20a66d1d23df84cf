"""Redaction of secret values in anything we log or print.

Secrets are pydantic `SecretStr` in the settings (shown as '**********'); this module also
scrubs the *values* of known secrets out of free text, for traces and error messages that
might echo a request (an Authorization header, a URL with `access_token=`).
"""

from __future__ import annotations

import re
from typing import Any

_known_secrets: set[str] = set()
_SECRET_KEY = re.compile(r"(token|secret|key|password|credential|authorization)", re.I)
_MASK = "***"


def remember_secret(value: str | None) -> None:
    """Register a secret value so `redact` removes it wherever it appears."""
    if value and len(value) >= 4:
        _known_secrets.add(value)


def scrub(text: str) -> str:
    for secret in sorted(_known_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, _MASK)
    return re.sub(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}", r"\1" + _MASK, text)


def redact(value: Any, _depth: int = 0) -> str:
    """A printable, secret-free rendering of `value` (nested dicts/lists handled)."""
    if _depth > 4:
        return "…"
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            if isinstance(k, str) and _SECRET_KEY.search(k) and v not in (None, ""):
                parts.append(f"{k}={_MASK}")
            else:
                parts.append(f"{k}={redact(v, _depth + 1)}")
        return "{" + ", ".join(parts) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(redact(v, _depth + 1) for v in value) + "]"
    text = repr(value)
    if len(text) > 300:
        text = text[:300] + "…"
    return scrub(text)
