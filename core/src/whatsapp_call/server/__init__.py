"""The service's HTTP server: provider webhooks, health and Prometheus metrics."""

from .app import create_app, webhook_path
from .metrics import Metrics
from .webhooks import BODY_READ_TIMEOUT_SECONDS, MAX_BODY_BYTES, WebhookHandler

__all__ = [
    "BODY_READ_TIMEOUT_SECONDS",
    "MAX_BODY_BYTES",
    "Metrics",
    "WebhookHandler",
    "create_app",
    "webhook_path",
]
