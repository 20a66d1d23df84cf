"""The shared uvicorn runner binds a real loopback socket and shuts down cleanly."""

import socket

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from whatsapp_call.serving import AsgiServer, serve_asgi


def _app() -> Starlette:
    return Starlette(routes=[Route("/ping", lambda request: PlainTextResponse("pong"))])


async def test_serves_on_a_free_loopback_port_and_releases_it():
    async with serve_asgi(_app()) as url:
        assert url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(url + "/ping")
        assert response.text == "pong"
        port = int(url.rsplit(":", 1)[1])
    with socket.socket() as sock:  # the port is free again after the block
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


async def test_stop_without_start_closes_the_socket():
    server = AsgiServer(_app())
    await server.stop()
    assert server._sock.fileno() == -1
