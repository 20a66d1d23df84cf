"""One media worker of `serve --workers N`: its own process and event loop, owning its calls.

It runs the ordinary call service (orchestrator, media, voice), reachable only by the front on
127.0.0.1 with a per-run token: the `/v1` routes for placing and ending calls, plus
`/internal/events` (webhook events the front routes here) and `/internal/updates` (the live
updates of every call, which the front re-publishes). It exits when the front goes away
(its stdin closes) or on SIGTERM, ending its calls politely.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..config import Settings
from ..models import event_from_dict

READY_PREFIX = "WORKER-READY "
PROBE_ENV = "WHATSAPP_CALL_WORKER_PROBE"  # a directory: lag and routing samples go there
LAG_TICK = 0.010
LAG_LOGGED_MS = 5.0  # ticks later than this are written, with their time


class Probe:
    """Measurements for benchmarks, off unless WHATSAPP_CALL_WORKER_PROBE names a directory:
    JSON lines in `<dir>/<worker id>.jsonl`, times from time.monotonic() (comparable across
    processes on one machine). `lag`: a 10 ms ticker's overshoot over LAG_LOGGED_MS;
    `route`: from the front's pool receiving webhook events to this worker handing them to
    their calls."""

    def __init__(self, worker_id: str, directory: str | None):
        self._file = None
        self._task: asyncio.Task[None] | None = None
        if directory:
            path = Path(directory) / (worker_id.replace("/", "_") + ".jsonl")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)  # noqa: SIM115 - closed in stop()

    @property
    def on(self) -> bool:
        return self._file is not None

    def write(self, **item: Any) -> None:
        if self._file is not None:
            self._file.write(json.dumps(item) + "\n")

    def start(self) -> None:
        if self.on:
            self._task = asyncio.create_task(self._ticker())

    async def _ticker(self) -> None:
        ticks = 0
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(LAG_TICK)
            now = time.monotonic()
            ticks += 1
            lag_ms = (now - t0 - LAG_TICK) * 1e3
            if lag_ms > LAG_LOGGED_MS:
                self.write(kind="lag", t=round(now, 4), ms=round(lag_ms, 1), ticks=ticks)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._file is not None:
            self._file.close()
            self._file = None


def internal_routes(service: Any, token: str, probe: Probe | None = None) -> list[Route]:
    from ..api.routes import _authorized

    async def events(request: Request) -> Response:
        if not _authorized(request, token):
            return JSONResponse({"error": {"message": "unauthorized"}}, status_code=401)
        body = json.loads(await request.body())
        await service.handle_events([event_from_dict(e) for e in body["events"]])
        received_at = body.get("received_at")
        if probe is not None and probe.on and received_at is not None:
            probe.write(
                kind="route",
                t=round(time.monotonic(), 4),
                ms=round((time.monotonic() - received_at) * 1e3, 2),
                events=[e["type"] for e in body["events"]],
            )
        return JSONResponse({"accepted": len(body["events"])})

    async def updates(request: Request) -> Response:
        if not _authorized(request, token):
            return JSONResponse({"error": {"message": "unauthorized"}}, status_code=401)

        async def stream() -> AsyncIterator[bytes]:
            async with service.live.subscribe("*") as items:
                yield b": connected\n\n"
                async for item in items:
                    yield f"data: {json.dumps(item, default=str)}\n\n".encode()

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def load(request: Request) -> Response:
        if not _authorized(request, token):
            return JSONResponse({"error": {"message": "unauthorized"}}, status_code=401)
        return JSONResponse({"active_calls": service.active_count})

    return [
        Route("/internal/events", events, methods=["POST"]),
        Route("/internal/updates", updates, methods=["GET"]),
        Route("/internal/load", load, methods=["GET"]),
    ]


async def run_worker(settings: Settings, worker_id: str, token: str) -> None:
    from ..api import api_routes
    from ..calls.orchestrator import CallService
    from ..server import create_app
    from ..server.metrics import Metrics
    from ..serving import AsgiServer
    from ..store import open_store

    settings = settings.model_copy(
        update={"service_token": SecretStr(token), "listen_host": "127.0.0.1", "listen_port": 0}
    )
    store = open_store(settings)
    await store.open()
    metrics = Metrics()
    service = CallService(settings, store, metrics=metrics, worker_id=worker_id)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = None
    probe = Probe(worker_id, os.environ.get(PROBE_ENV))
    try:
        await service.start()  # warms up the media stack and freezes the start-up heap
        app = create_app(
            settings,
            store,
            on_events=service.handle_events,
            metrics=metrics,
            extra_routes=[*api_routes(service), *internal_routes(service, token, probe)],
        )
        server = AsgiServer(app, "127.0.0.1", 0)
        url = await server.start()
        print(READY_PREFIX + json.dumps({"worker": worker_id, "url": url}), flush=True)
        probe.start()
        _stop_when_stdin_closes(stop)
        await stop.wait()
    finally:
        probe.stop()
        await service.shutdown()
        if server is not None:
            await server.stop()
        await store.close()


def _stop_when_stdin_closes(stop: asyncio.Event) -> None:
    """The front holds our stdin open; when it dies, we stop instead of living on orphaned.
    A daemon thread, so a blocked read never holds up the process's exit."""
    loop = asyncio.get_running_loop()

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(0, 4096):  # unbuffered: no lock left held at interpreter exit
                pass
        with contextlib.suppress(RuntimeError):  # the loop may be gone already
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch, name="front-watch", daemon=True).start()
