"""The running service, assembled: call store + orchestrator + HTTP server (webhooks, service
API, health, metrics). `serve`, a local `call` and `demo` all run exactly this.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from .config import Settings
from .errors import ConfigError

log = logging.getLogger("whatsapp_call.runtime")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Runtime:
    """`async with Runtime(settings) as rt:` serves until the block ends, then shuts down
    gracefully: active calls are ended politely and the store is flushed."""

    def __init__(
        self, settings: Settings, *, workers: int = 1, worker_command: list[str] | None = None
    ):
        """`workers` > 1 runs the calls' media in that many worker processes, started with
        `worker_command` (see whatsapp_call.workers); 1 runs everything in this process."""
        if workers > 1 and not worker_command:
            raise ValueError("worker_command is needed with more than one worker")
        self.settings = settings
        self.workers = workers
        self.worker_command = worker_command
        self.store: Any = None
        self.service: Any = None
        self.metrics: Any = None
        self.server: Any = None
        self.reconciled: list[Any] = []
        self._mcp_route: Any = None

    @property
    def url(self) -> str:
        return self.server.url

    async def __aenter__(self) -> Runtime:
        from .api import api_routes
        from .calls.orchestrator import CallService
        from .server import create_app
        from .server.metrics import Metrics
        from .serving import AsgiServer
        from .store import open_store

        settings = self.settings
        settings.require_complete()
        if not _is_loopback(settings.listen_host) and settings.service_token is None:
            raise ConfigError(
                f"Refusing to listen on {settings.listen_host} without a serviceToken: anyone who "
                "reaches it could place calls on your account.",
                "Set serviceToken (a long random string), or listen on 127.0.0.1.",
            )
        self.store = open_store(settings)
        await self.store.open()
        try:
            # Gauges count this process's calls: none at start (leftovers are reconciled).
            self.metrics = Metrics()
            instance_id = _instance_id(settings) if settings.redis_url else None
            if self.workers > 1:
                from .workers.front import WorkerPool

                self.service = WorkerPool(
                    settings,
                    self.store,
                    workers=self.workers,
                    worker_command=self.worker_command or [],
                    metrics=self.metrics,
                    instance_id=instance_id,
                )
            else:
                self.service = CallService(
                    settings, self.store, metrics=self.metrics, worker_id=instance_id
                )
            if instance_id is not None:
                from .cluster.bus import RedisEventBus
                from .cluster.instance import ClusterService

                bus = RedisEventBus(settings.secret("redis_url"), instance_id)
                self.service = ClusterService(self.service, bus)
            routes = list(api_routes(self.service))
            self._mcp_route = _mcp_route(self.service, settings)
            if self._mcp_route is not None:
                routes.append(self._mcp_route)
            app = create_app(
                settings,
                self.store,
                on_events=self.service.handle_events,
                metrics=self.metrics,
                extra_routes=routes,
            )
            # Reconcile calls a crash left behind before taking new work.
            self.reconciled = await self.service.start()
            self.server = AsgiServer(app, settings.listen_host, settings.listen_port)
            await self.server.start()
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._close()

    async def _close(self) -> None:
        if self.service is not None:
            await self.service.shutdown()
        if self._mcp_route is not None:
            await self._mcp_route.endpoint.aclose()
        if self.server is not None:
            await self.server.stop()
        if self.store is not None:
            await self.store.close()


def _mcp_route(service: Any, settings: Settings) -> Any:
    """The agent tool at `/mcp`, when the MCP extra is installed (else logged and skipped)."""
    try:
        from .agent.mcp_server import serve_mcp_routes

        return serve_mcp_routes(service, settings)
    except (ImportError, ConfigError) as exc:
        log.info("/mcp not served: %s", getattr(exc, "message", exc))
        return None


def _instance_id(settings: Settings) -> str:
    """This instance's stable name among several: `instanceId`, else the host name."""
    import socket

    return settings.instance_id or socket.gethostname().replace(":", "-")
