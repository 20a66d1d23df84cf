"""The `whatsapp_call` tool over the Model Context Protocol (official `mcp` SDK, low-level
`Server`): over stdio for `whatsapp-call mcp` (what Claude Desktop, OpenClaw and most agent
hosts spawn), and over streamable HTTP at `/mcp` inside `serve`, behind the same bearer token
as the `/v1` API.

The tool's schema is ours (TOOL_PARAMETERS), so the low-level server is used rather than the
decorator-based MCPServer, which would derive a schema from a Python signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..config import Settings
from ..errors import ConfigError
from .backends import CallBackend, LocalBackend, RemoteBackend
from .tool import TOOL_NAME, ToolDefinition, WhatsAppCallTool

if TYPE_CHECKING:
    from starlette.routing import Route
    from starlette.types import Receive, Scope, Send

log = logging.getLogger("whatsapp_call.mcp")

SERVER_NAME = "whatsapp-call"
INSTRUCTIONS = (
    "whatsapp_call phones a person on WhatsApp; an AI voice agent talks with them following "
    "your instructions, and you get the outcome and the transcript."
)
LOOPBACK_HOSTS = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
LOOPBACK_ORIGINS = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]


def _require_mcp() -> Any:
    try:
        import mcp.server.lowlevel  # noqa: F401
    except ImportError:
        raise ConfigError(
            "The MCP server needs the `mcp` package, which is not installed.",
            "Install it with: pip install 'whatsapp-call[mcp]'",
        ) from None
    import mcp_types

    return mcp_types


def build_mcp_server(tool: ToolDefinition) -> Any:
    """An `mcp.server.Server` offering exactly `tool`."""
    types = _require_mcp()
    from mcp.server.lowlevel import Server

    listing = types.Tool(
        name=tool.name,
        title="WhatsApp call",
        description=tool.description,
        input_schema=tool.parameters,
        annotations=types.ToolAnnotations(
            title="WhatsApp call",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=True,
        ),
    )

    async def list_tools(ctx: Any, params: Any) -> Any:
        return types.ListToolsResult(tools=[listing])

    async def call_tool(ctx: Any, params: Any) -> Any:
        if params.name != tool.name:
            return types.CallToolResult(
                content=[types.TextContent(text=f"Unknown tool {params.name!r}; use {tool.name}.")],
                is_error=True,
            )
        result = await tool.handler(dict(params.arguments or {}))
        return types.CallToolResult(
            content=[types.TextContent(text=result.text)],
            structured_content=result.data,
            is_error=result.is_error,
        )

    return Server(
        SERVER_NAME,
        version=__version__,
        title="WhatsApp calls",
        instructions=INSTRUCTIONS,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        get_tool_input_schema=lambda name: tool.parameters if name == tool.name else None,
    )


async def serve_stdio(backend: CallBackend, settings: Settings) -> None:
    """Serve the tool on this process's stdin/stdout until the client closes it."""
    _require_mcp()
    from mcp.server.stdio import stdio_server

    server = build_mcp_server(WhatsAppCallTool(backend, settings).definition)
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


async def run_stdio(settings: Settings) -> None:
    """`whatsapp-call mcp`: with `serviceUrl` set, a thin client of that service; otherwise
    the whole service (webhooks, media) runs in this process for as long as the MCP client
    keeps it open, and calls still going on when it closes are ended."""
    _require_mcp()
    if settings.remote:
        from ..client import ServiceClient

        async with ServiceClient.from_settings(settings) as client:
            await serve_stdio(RemoteBackend(client), settings)
        return
    from ..runtime import Runtime

    async with Runtime(settings) as runtime:
        await serve_stdio(LocalBackend(runtime.service), settings)


# -- streamable HTTP at /mcp ------------------------------------------------------------------


class McpHttpEndpoint:
    """ASGI app serving the tool over streamable HTTP (stateless, JSON responses).

    Every request needs `Authorization: Bearer <serviceToken>` when a token is configured
    (constant-time compare). Without one the service only listens on loopback, so requests
    must then also name a loopback Host (DNS-rebinding protection).

    The SDK's session manager needs a running task group; a mounted app gets no lifespan
    events, so it is started on the first request and stopped by `aclose()`.
    """

    def __init__(self, tool: ToolDefinition, token: str | None):
        _require_mcp()
        from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
        from mcp.server.transport_security import TransportSecuritySettings

        self._token = token.encode() if token else None
        security = (
            None
            if token
            else TransportSecuritySettings(
                enable_dns_rebinding_protection=True,
                allowed_hosts=LOOPBACK_HOSTS,
                allowed_origins=LOOPBACK_ORIGINS,
            )
        )
        self.server = build_mcp_server(tool)
        self._manager = StreamableHTTPSessionManager(
            app=self.server, stateless=True, json_response=True, security_settings=security
        )
        self._lock = asyncio.Lock()
        self._runner: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._closed = False

    def _authorized(self, scope: Scope) -> bool:
        if self._token is None:
            return True
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
                break
        scheme, _, value = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self._token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from starlette.responses import JSONResponse

        if scope["type"] != "http":
            return
        if not self._authorized(scope):
            response = JSONResponse(
                {
                    "error": {
                        "message": "Missing or wrong bearer token.",
                        "hint": "Send Authorization: Bearer <serviceToken>.",
                    }
                },
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        if not await self._started():
            response = JSONResponse(
                {"error": {"message": "The MCP endpoint is shutting down."}}, status_code=503
            )
            await response(scope, receive, send)
            return
        await self._manager.handle_request(scope, receive, send)

    async def _started(self) -> bool:
        async with self._lock:
            if self._closed:
                return False
            if self._runner is not None:
                return True
            ready = asyncio.Event()
            self._stop = stop = asyncio.Event()

            async def run() -> None:
                async with self._manager.run():
                    ready.set()
                    await stop.wait()

            self._runner = asyncio.create_task(run(), name="mcp session manager")
            waiter = asyncio.ensure_future(ready.wait())
            await asyncio.wait({waiter, self._runner}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if self._runner.done():
                failed, self._runner = self._runner, None
                failed.result()  # raises the start-up error
            return True

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop the session manager (in-flight requests are cancelled)."""
        async with self._lock:
            self._closed = True
            runner, self._runner = self._runner, None
        if runner is None:
            return
        assert self._stop is not None
        self._stop.set()
        try:
            async with asyncio.timeout(timeout):
                await runner
        except TimeoutError:
            runner.cancel()
            with contextlib.suppress(BaseException):
                await runner


def mcp_endpoint(
    backend: CallBackend, settings: Settings, *, tool: WhatsAppCallTool | None = None
) -> McpHttpEndpoint:
    """The `/mcp` ASGI app for any backend (tests use a fake one)."""
    tool = tool or WhatsAppCallTool(backend, settings)
    return McpHttpEndpoint(tool.definition, settings.secret("service_token"))


def serve_mcp_routes(service: Any, settings: Settings, *, path: str = "/mcp") -> Route:
    """The route to add to `serve`'s extra routes: the tool at `path` over streamable HTTP,
    bound to the `CallService` of the process. `route.endpoint.aclose()` stops it cleanly
    (call it when the server shuts down)."""
    from starlette.routing import Route

    return Route(path, endpoint=mcp_endpoint(LocalBackend(service), settings))


__all__ = [
    "TOOL_NAME",
    "McpHttpEndpoint",
    "build_mcp_server",
    "mcp_endpoint",
    "run_stdio",
    "serve_mcp_routes",
    "serve_stdio",
]
