"""Webhook helpers for provider plugins: the `X-Hub-Signature-256` scheme (HMAC-SHA256 of the
raw body, used by Meta and by WATI when a webhook secret is set), header lookup, JSON bodies.
Compare a received signature with `hmac.compare_digest`, never `==`.

Pure functions, no I/O: `parse_webhook` runs inside the HTTP request handler. The messages of
signature failures stay with each plugin (they name its config keys); these only decide.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from ..errors import WebhookRejected

SIGNATURE_HEADER = "x-hub-signature-256"


def hub_signature(body: bytes, secret: str) -> str:
    """The `X-Hub-Signature-256` value for `body`: "sha256=" + hex HMAC-SHA256 with `secret`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def get_header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by lower-case `name`, whatever case the mapping uses for it."""
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


def json_object(body: bytes, label: str) -> dict[str, Any]:
    """The body as a JSON object; anything else is `WebhookRejected` (400) naming why."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise WebhookRejected(f"{label} webhook: the body is not JSON ({exc}).", 400) from None
    if not isinstance(payload, dict):
        raise WebhookRejected(
            f"{label} webhook: the body must be a JSON object, not {type(payload).__name__}.", 400
        )
    return payload
