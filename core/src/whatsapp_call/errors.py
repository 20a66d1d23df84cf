"""The exception hierarchy. Every error says what went wrong *and* what to do about it.

`str(err)` is the full message (problem, then the fix on a new line), safe to show a user:
no error message may contain a secret value.
"""

from __future__ import annotations


class WhatsAppCallError(Exception):
    """Base class. `hint` is the one-line fix shown under the message."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}\n  fix: {hint}")


class ConfigError(WhatsAppCallError):
    """The configuration is missing, malformed or inconsistent."""


class BadInputError(WhatsAppCallError):
    """Input from a user or an agent (a phone number, a CLI argument) is not usable."""


class PluginError(WhatsAppCallError):
    """A plugin is missing, misspelt or failed to load."""


class ProviderError(WhatsAppCallError):
    """The WhatsApp provider (Meta Graph API, WATI) refused or failed a request.

    `code` is the provider's own error code (Meta's 138006, WATI's envelope code),
    `http_status` the HTTP status, `details` the provider's free-text details.
    `retryable` tells whether the same request may succeed later unchanged.
    """

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        provider: str = "",
        code: int | str | None = None,
        http_status: int | None = None,
        details: str | None = None,
        retryable: bool = False,
    ):
        self.provider = provider
        self.code = code
        self.http_status = http_status
        self.details = details
        self.retryable = retryable
        super().__init__(message, hint)


class CallPermissionError(ProviderError):
    """The callee has not granted call permission and it cannot be obtained now."""


class WebhookRejected(WhatsAppCallError):
    """A webhook request is refused (bad signature, malformed body). Nothing was changed.

    `status_code` is the HTTP status to answer with (403 for signatures, 400 for bodies).
    """

    def __init__(self, message: str, status_code: int = 400, hint: str | None = None):
        self.status_code = status_code
        super().__init__(message, hint)


class MediaError(WhatsAppCallError):
    """WebRTC media failed: bad SDP, ICE or DTLS failure, a dead peer."""


class VoiceBackendError(WhatsAppCallError):
    """The voice backend (e.g. OpenAI Realtime) refused or dropped the session.

    `fatal` is False for errors the session recovers from by itself.
    """

    def __init__(
        self, message: str, hint: str | None = None, *, fatal: bool = True, code: str | None = None
    ):
        self.fatal = fatal
        self.code = code
        super().__init__(message, hint)
