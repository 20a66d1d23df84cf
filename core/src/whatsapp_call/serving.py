"""Run an ASGI app with uvicorn inside the current event loop, on a real socket.

The service, every simulator and the tests use this one helper, so they all bind the same
way: an explicit host (127.0.0.1 by default), port 0 for any free port, and a bounded
start-up and shut-down.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn


class AsgiServer:
    """One uvicorn server running as a task. `url` is known once `start()` returned."""

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_level: str = "warning",
        **uvicorn_options: Any,
    ):
        self.host = host
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only then, and without it every
        # keep-alive reply waits ~40 ms for a delayed ACK.
        self._sock = socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET,
            socket.SOCK_STREAM,
            socket.IPPROTO_TCP,
        )
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_level=log_level, lifespan="auto", access_log=False, **uvicorn_options
        )
        self._server = uvicorn.Server(config)
        # The process (serve, demo, tests) owns SIGINT/SIGTERM, not each server: uvicorn would
        # otherwise take them over and re-raise them when it stops.
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self, timeout: float = 10.0) -> str:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        async with asyncio.timeout(timeout):
            while not self._server.started:
                if self._task.done():
                    self._task.result()  # raises the start-up error
                    raise RuntimeError("uvicorn exited during start-up")
                await asyncio.sleep(0.01)
        return self.url

    async def stop(self, timeout: float = 5.0) -> None:
        if self._task is None:
            self._sock.close()
            return
        self._server.should_exit = True
        try:
            async with asyncio.timeout(timeout):
                await self._task
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        finally:
            self._task = None
            self._sock.close()


@contextlib.asynccontextmanager
async def serve_asgi(
    app: Any, host: str = "127.0.0.1", port: int = 0, **uvicorn_options: Any
) -> AsyncIterator[str]:
    """`async with serve_asgi(app) as url:` serves `app` until the block ends."""
    server = AsgiServer(app, host, port, **uvicorn_options)
    await server.start()
    try:
        yield server.url
    finally:
        await server.stop()
