"""The service's HTTP app: provider webhooks, GET /healthz, GET /metrics (+ extra routes).

Routes:
* `/webhooks/{provider}` and `/webhooks/{provider}/{sub-path}`: GET and POST, handed to the
  `parse_webhook` hook for that provider (Meta's GET handshake included).
* the path of `webhookUrl`, when it is not `/webhooks/<name>`: the same, for the configured
  provider (Meta when unset), so the public URL may have any path.
* `GET /healthz`: JSON status, version, uptime, active calls (503 when the store fails).
* `GET /metrics`: Prometheus text format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .. import __version__
from ..store.base import CallState, CallStore, StoreError
from .metrics import Metrics
from .webhooks import BODY_READ_TIMEOUT_SECONDS, MAX_BODY_BYTES, OnEvents, WebhookHandler

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger("whatsapp_call.server")

WEBHOOK_METHODS = ["GET", "POST"]
HEALTH_STORE_TIMEOUT_SECONDS = 2.0
SHUTDOWN_DRAIN_SECONDS = 10.0
_GENERIC_WEBHOOK_PATH = re.compile(r"/webhooks/[^/]+")


def webhook_path(settings: Settings) -> str | None:
    """The path of `webhookUrl` when it needs its own route (None: the generic
    `/webhooks/<provider>` route already serves it)."""
    if not settings.webhook_url:
        return None
    path = urlsplit(settings.webhook_url).path.rstrip("/") or "/"
    return None if _GENERIC_WEBHOOK_PATH.fullmatch(path) else path


def create_app(
    settings: Settings,
    store: CallStore,
    *,
    on_events: OnEvents,
    metrics: Metrics,
    extra_routes: Sequence[BaseRoute] = (),
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[Any]] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    body_read_timeout: float = BODY_READ_TIMEOUT_SECONDS,
) -> Starlette:
    """Build the app. `on_events(events)` receives verified, de-duplicated webhook events in a
    background task. `lifespan` (optional) runs inside ours, e.g. to start the orchestrator.
    The store is not opened or closed here: its owner does that.
    """
    handler = WebhookHandler(
        settings,
        store,
        metrics,
        on_events,
        max_body_bytes=max_body_bytes,
        body_read_timeout=body_read_timeout,
    )
    started = time.monotonic()

    async def provider_webhook(request: Request) -> Response:
        params = request.path_params
        rest = params.get("rest", "")
        return await handler.handle(request, params["provider"], "/" + rest if rest else "")

    routes: list[BaseRoute] = [
        Route("/webhooks/{provider}", provider_webhook, methods=WEBHOOK_METHODS),
        Route("/webhooks/{provider}/{rest:path}", provider_webhook, methods=WEBHOOK_METHODS),
    ]
    custom = webhook_path(settings)
    if custom is not None:
        configured = settings.provider or "meta"

        async def configured_webhook(request: Request) -> Response:
            rest = request.path_params.get("rest", "")
            return await handler.handle(request, configured, "/" + rest if rest else "")

        routes.append(Route(custom, configured_webhook, methods=WEBHOOK_METHODS))
        if custom != "/":
            routes.append(
                Route(custom + "/{rest:path}", configured_webhook, methods=WEBHOOK_METHODS)
            )

    async def healthz(request: Request) -> Response:
        body: dict[str, Any] = {
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - started, 3),
        }
        try:
            async with asyncio.timeout(HEALTH_STORE_TIMEOUT_SECONDS):
                counts = await store.count_by_state()
        except (StoreError, TimeoutError) as exc:
            message = exc.message if isinstance(exc, StoreError) else "call store timed out"
            return JSONResponse({"status": "unavailable", **body, "error": message}, 503)
        active = sum(n for state, n in counts.items() if state != CallState.ENDED.value)
        return JSONResponse({"status": "ok", **body, "calls_active": active})

    async def prometheus(request: Request) -> Response:
        await metrics.refresh()  # e.g. the front of `serve --workers N` reads its workers
        return Response(metrics.render(), media_type=metrics.content_type)

    routes += [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        *extra_routes,
    ]

    @contextlib.asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            if lifespan is None:
                yield
            else:
                async with lifespan(app):
                    yield
        finally:
            await handler.drain(SHUTDOWN_DRAIN_SECONDS)

    app = Starlette(routes=routes, lifespan=app_lifespan)
    app.state.settings = settings
    app.state.store = store
    app.state.metrics = metrics
    app.state.webhooks = handler
    return app
