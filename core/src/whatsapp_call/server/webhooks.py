"""Provider webhooks: read the body safely, let the provider's plugin verify and parse it,
drop duplicate deliveries, and hand new events to the orchestrator in the background.

Providers retry webhooks and may deliver one event several times, so every event's
`dedupe_key` goes through the store's `mark_webhook_processed` before it is dispatched: only
the first delivery of an event reaches `on_events`, even with several processes behind one
URL. The HTTP answer never waits for the orchestrator (Meta wants a fast 200).
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response

from .. import plugins
from ..errors import WebhookRejected
from ..models import CallEvent, WebhookRequest, WebhookResult
from ..redact import scrub
from ..store.base import CallStore, StoreError
from .metrics import Metrics

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger("whatsapp_call.server")

MAX_BODY_BYTES = 64 * 1024
BODY_READ_TIMEOUT_SECONDS = 10.0
BUILTIN_PROVIDERS = frozenset({"meta", "wati"})

OnEvents = Callable[[list[CallEvent]], Awaitable[None]]


class BodyTooLarge(Exception):
    pass


class WebhookHandler:
    """Serves `/webhooks/<provider>[/<sub-path>]` (and the configured `webhookUrl` path)."""

    def __init__(
        self,
        settings: Settings,
        store: CallStore,
        metrics: Metrics,
        on_events: OnEvents,
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        body_read_timeout: float = BODY_READ_TIMEOUT_SECONDS,
    ):
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.on_events = on_events
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout = body_read_timeout
        self.pending: set[asyncio.Task[None]] = set()

    def provider_label(self, provider: str) -> str:
        """The provider as a metrics label: only names we know, so strangers cannot grow
        the label set by requesting /webhooks/<anything>."""
        known = set(BUILTIN_PROVIDERS)
        if self.settings.provider:
            known.add(self.settings.provider)
        for _, names in plugins.call_all_sync("provider_names"):
            known.update(names)
        return provider if provider in known else "unknown"

    async def handle(self, request: Request, provider: str, path: str) -> Response:
        label = self.provider_label(provider)
        self.metrics.webhook_received(label)
        try:
            body = await self._read_body(request)
        except BodyTooLarge:
            return self._reject(label, "too_large", 413, f"Body over {self.max_body_bytes} bytes.")
        except TimeoutError:
            return self._reject(label, "timeout", 408, "Request body not received in time.")
        except ClientDisconnect:
            self.metrics.webhook_rejected(label, "disconnected")
            return Response(status_code=400)
        except ValueError:
            return self._reject(label, "bad_request", 400, "Invalid Content-Length.")

        webhook = WebhookRequest(
            method=request.method,
            path=path,
            query=dict(request.query_params),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
        )
        try:
            result: WebhookResult | None = plugins.call_first_sync(
                "parse_webhook", provider=provider, request=webhook, settings=self.settings
            )
        except WebhookRejected as exc:
            reason = {403: "forbidden", 401: "unauthorized", 400: "bad_request"}.get(
                exc.status_code, f"http_{exc.status_code}"
            )
            log.warning(
                "webhook %s%s refused (%d): %s", provider, path, exc.status_code, scrub(exc.message)
            )
            return self._reject(label, reason, exc.status_code, scrub(exc.message))
        except Exception as exc:
            _log_exception(f"parse_webhook failed for provider {provider!r}", exc)
            return self._reject(label, "error", 500, "Webhook processing failed.")
        if result is None:
            return self._reject(
                label,
                "no_plugin",
                404,
                f"No plugin handles webhooks for provider {provider[:64]!r}.",
            )

        fresh: list[CallEvent] = []
        try:
            for event in result.events:
                if await self.store.mark_webhook_processed(event.dedupe_key):
                    fresh.append(event)
                else:
                    self.metrics.event_deduplicated(label)
        except StoreError as exc:
            # Events marked so far are dispatched; the provider retries the rest on 503.
            log.error("webhook %s: the call store failed: %s", provider, exc.message)
            self.dispatch(label, fresh)
            return self._reject(label, "store_unavailable", 503, "Call store unavailable.")
        self.dispatch(label, fresh)
        return Response(result.body, status_code=result.status_code, media_type=result.content_type)

    async def _read_body(self, request: Request) -> bytes:
        """At most `max_body_bytes`, within `body_read_timeout` (against slow-loris bodies)."""
        declared = request.headers.get("content-length")
        if declared is not None:
            size = int(declared)
            if size < 0:
                raise ValueError(declared)
            if size > self.max_body_bytes:
                raise BodyTooLarge
        chunks: list[bytes] = []
        received = 0
        async with asyncio.timeout(self.body_read_timeout):
            async for chunk in request.stream():
                received += len(chunk)
                if received > self.max_body_bytes:
                    raise BodyTooLarge
                chunks.append(chunk)
        return b"".join(chunks)

    def _reject(self, label: str, reason: str, status: int, message: str) -> Response:
        self.metrics.webhook_rejected(label, reason)
        headers = {"connection": "close"} if status in (408, 413) else None
        return PlainTextResponse(message + "\n", status_code=status, headers=headers)

    def dispatch(self, label: str, events: list[CallEvent]) -> None:
        """Hand events to `on_events` in a task we keep a reference to."""
        if not events:
            return
        self.metrics.webhook_event(label, len(events))
        task = asyncio.create_task(self._deliver(events), name=f"webhook-events-{label}")
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _deliver(self, events: list[CallEvent]) -> None:
        try:
            await self.on_events(events)
        except asyncio.CancelledError:
            log.warning("dispatch of %d webhook event(s) was cancelled", len(events))
            raise
        except Exception as exc:
            keys = ", ".join(e.dedupe_key for e in events)
            _log_exception(f"on_events failed for webhook event(s) {keys}", exc)

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait for dispatched events to be handled; cancel what is left after `timeout`."""
        if not self.pending:
            return
        _done, left = await asyncio.wait(set(self.pending), timeout=timeout)
        for task in left:
            task.cancel()
        if left:
            log.warning(
                "cancelled %d webhook dispatch task(s) still running at shutdown", len(left)
            )
            await asyncio.wait(left, timeout=1.0)


def _log_exception(what: str, exc: BaseException) -> None:
    """The traceback frames and a secret-scrubbed message (an exception text may echo a
    request or a header)."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("%s: %s: %s\n%s", what, type(exc).__name__, scrub(str(exc)), frames.rstrip())
