"""The `whatsapp_call` tool over MCP, driven by the official SDK's own client: over stdio
(`whatsapp-call mcp` spawned as a subprocess, in remote mode against a small in-test `/v1`
service) and over streamable HTTP (the `/mcp` endpoint, with and without the bearer token).
Also `RemoteBackend` against that `/v1` service: live updates, polling, error mapping."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from whatsapp_call import hookimpl
from whatsapp_call.agent import RemoteBackend, WhatsAppCallTool
from whatsapp_call.agent.mcp_server import mcp_endpoint, serve_mcp_routes
from whatsapp_call.calls.orchestrator import CallInProgressError, CallService
from whatsapp_call.client import ServiceClient
from whatsapp_call.errors import BadInputError
from whatsapp_call.models import (
    PermissionRequestOutcome,
    PermissionRequestResult,
    PermissionState,
    PermissionStatus,
)
from whatsapp_call.serving import serve_asgi
from whatsapp_call.store import open_store

TOKEN = "test-service-token-123456"
STEP = 0.05  # seconds between the fake service's state changes
CALLEE = "+14085551234"
WAITING = "+14085550000"  # a callee who never answers the permission request


class AskingProvider:
    """A provider where the callee has not allowed calls yet: a request is sent."""

    @hookimpl
    async def check_permission(self, call, settings):
        return PermissionState(status=PermissionStatus.NOT_GRANTED, can_request=True)

    @hookimpl
    async def request_permission(self, call, settings):
        return PermissionRequestResult(PermissionRequestOutcome.SENT, message_id="wamid.1")


class FakeV1Service:
    """Speaks the `/v1` API shape (records as `full_record` gives them, SSE live updates)
    with a scripted call: CALLEE answers and the call completes with a transcript; WAITING
    stays at `permission_requested` until hung up."""

    def __init__(self, token: str | None = TOKEN, *, sse: bool = True):
        self.token = token
        self.sse = sse
        self.records: dict[str, dict[str, Any]] = {}
        self.watchers: dict[str, list[asyncio.Queue]] = {}
        self.tasks: set[asyncio.Task] = set()
        self.bodies: list[dict[str, Any]] = []
        routes = [
            Route("/v1/calls", self.create, methods=["POST"]),
            Route("/v1/calls/{call_id}", self.get, methods=["GET"]),
            Route("/v1/calls/{call_id}/hangup", self.hangup, methods=["POST"]),
        ]
        if sse:
            routes.append(Route("/v1/calls/{call_id}/events", self.events, methods=["GET"]))
        self.app = Starlette(routes=routes)

    def _denied(self, request: Request) -> Response | None:
        if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse({"error": {"message": "Missing or wrong bearer token."}}, 401)
        return None

    def _now(self) -> str:
        from whatsapp_call.store.base import utcnow

        return utcnow().isoformat()

    async def _set(self, call_id: str, state: str, **fields: Any) -> None:
        record = self.records[call_id]
        record["events"].append(
            {"type": "state", "at": self._now(), "data": {"from": record["state"], "to": state}}
        )
        record["state"] = state
        record.update(fields)
        for queue in self.watchers.get(call_id, []):
            queue.put_nowait({"type": "state", "state": state})

    async def _script(self, call_id: str, to: str) -> None:
        await asyncio.sleep(STEP)
        await self._set(call_id, "checking_permission")
        await asyncio.sleep(STEP)
        if to == WAITING:
            await self._set(call_id, "permission_requested")
            return
        for state in ("offering", "ringing", "in_progress"):
            await self._set(call_id, state)
            await asyncio.sleep(STEP)
        record = self.records[call_id]
        for role, text in (("assistant", "Hello, this is Ada."), ("user", "Hi Ada, yes.")):
            record["transcript"].append({"at": self._now(), "role": role, "text": text})
        await asyncio.sleep(STEP)
        await self._set(
            call_id,
            "ended",
            end_reason="completed",
            end_detail="the call ended",
            ended_at=self._now(),
            duration_seconds=0.4,
        )

    async def create(self, request: Request) -> Response:
        if denied := self._denied(request):
            return denied
        body = await request.json()
        self.bodies.append(body)
        busy = next(
            (
                r
                for r in self.records.values()
                if r["to_e164"] == body["to"] and r["state"] != "ended"
            ),
            None,
        )
        if busy:
            return JSONResponse(
                {
                    "error": {
                        "message": f"A call to {body['to']} is already in progress.",
                        "hint": "Wait for it to end, or hang it up first.",
                        "call_id": busy["id"],
                    }
                },
                409,
            )
        call_id = f"call_{len(self.records) + 1}"
        self.records[call_id] = {
            "id": call_id,
            "to_e164": body["to"],
            "state": "created",
            "end_reason": None,
            "end_detail": None,
            "duration_seconds": None,
            "created_at": self._now(),
            "ended_at": None,
            "metadata": body.get("metadata") or {},
            "events": [],
            "transcript": [],
            "metrics": {},
        }
        task = asyncio.create_task(self._script(call_id, body["to"]))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return JSONResponse(self.records[call_id], 202)

    async def get(self, request: Request) -> Response:
        if denied := self._denied(request):
            return denied
        record = self.records.get(request.path_params["call_id"])
        if record is None:
            return JSONResponse({"error": {"message": "No such call."}}, 404)
        return JSONResponse(record)

    async def hangup(self, request: Request) -> Response:
        if denied := self._denied(request):
            return denied
        call_id = request.path_params["call_id"]
        if call_id not in self.records:
            return JSONResponse({"error": {"message": "No such call."}}, 404)
        if self.records[call_id]["state"] != "ended":
            await self._set(
                call_id,
                "ended",
                end_reason="cancelled",
                end_detail="hung up on request",
                ended_at=self._now(),
            )
        return JSONResponse(self.records[call_id])

    async def events(self, request: Request) -> Response:
        if denied := self._denied(request):
            return denied
        call_id = request.path_params["call_id"]
        queue: asyncio.Queue = asyncio.Queue()
        self.watchers.setdefault(call_id, []).append(queue)

        async def stream():
            try:
                state = self.records[call_id]["state"]
                yield f"event: state\ndata: {json.dumps({'type': 'state', 'state': state})}\n\n"
                while state != "ended":
                    update = await queue.get()
                    state = update["state"]
                    yield f"event: state\ndata: {json.dumps(update)}\n\n"
            finally:
                self.watchers[call_id].remove(queue)

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()


@pytest.fixture
async def fake_service():
    service = FakeV1Service()
    async with serve_asgi(service.app) as url:
        yield service, url
    await service.close()


def _settings(make_settings, url: str, **extra: Any):
    return make_settings(
        serviceUrl=url, serviceToken=TOKEN, allowedNumbers=[CALLEE, WAITING], **extra
    )


def _text(result: Any) -> str:
    return "".join(block.text for block in result.content if block.type == "text")


# -- RemoteBackend ------------------------------------------------------------------------------


async def test_remote_backend_follows_a_call_to_its_end(fake_service):
    service, url = fake_service
    async with ServiceClient(url, TOKEN) as client:
        backend = RemoteBackend(client)
        async with asyncio.timeout(10):
            placed = await backend.place(CALLEE, greeting="Hi", metadata={"source": "test"})
            assert placed["state"] == "created"
            assert service.bodies[-1] == {
                "to": CALLEE,
                "greeting": "Hi",
                "metadata": {"source": "test"},
            }
            ringing = await backend.wait(placed["id"], 5, until=("ringing", "ended"))
            assert ringing["state"] == "ringing"
            ended = await backend.wait(placed["id"], 5)
        assert ended["end_reason"] == "completed"
        assert [line["role"] for line in ended["transcript"]] == ["assistant", "user"]
        first = await backend.place(WAITING)
        with pytest.raises(CallInProgressError) as busy:
            await backend.place(WAITING)
        assert busy.value.call_id == first["id"]
        with pytest.raises(BadInputError, match="no call 'call_99'"):
            await backend.get("call_99")
        with pytest.raises(BadInputError, match="no call 'call_99'"):
            await backend.hangup("call_99")


async def test_remote_backend_polls_without_live_updates():
    service = FakeV1Service(sse=False)
    async with serve_asgi(service.app) as url, ServiceClient(url, TOKEN) as client:
        backend = RemoteBackend(client, poll_seconds=0.05)
        async with asyncio.timeout(10):
            placed = await backend.place(WAITING)
            record = await backend.wait(placed["id"], 5, until=("permission_requested",))
            assert record["state"] == "permission_requested"
            still = await backend.wait(placed["id"], 0.2)
            assert still["state"] == "permission_requested"
    await service.close()


# -- streamable HTTP at /mcp ----------------------------------------------------------------------


def _http_client(url: str, token: str | None) -> Client:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return Client(
        streamable_http_client(url, http_client=create_mcp_http_client(headers=headers)),
        mode="legacy" if token is None else "auto",
    )


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_mcp_over_http_with_bearer_token(fake_service, make_settings, mode):
    service, v1_url = fake_service
    settings = _settings(make_settings, v1_url)
    async with ServiceClient(v1_url, TOKEN) as client:
        endpoint = mcp_endpoint(RemoteBackend(client), settings)
        app = Starlette(routes=[Route("/mcp", endpoint=endpoint)])
        try:
            async with serve_asgi(app) as url, asyncio.timeout(20):
                headers = {"Authorization": f"Bearer {TOKEN}"}
                mcp = Client(
                    streamable_http_client(
                        url + "/mcp", http_client=create_mcp_http_client(headers=headers)
                    ),
                    mode=mode,
                )
                async with mcp:
                    tools = (await mcp.list_tools()).tools
                    assert [t.name for t in tools] == ["whatsapp_call"]
                    assert tools[0].input_schema["required"] == ["action"]
                    result = await mcp.call_tool(
                        "whatsapp_call",
                        {
                            "action": "call",
                            "to": "+1 408 555 1234",
                            "wait": True,
                            "wait_seconds": 10,
                        },
                    )
                    assert not result.is_error
                    text = _text(result)
                    assert text.startswith("Completed")
                    assert "Transcript: AI: Hello, this is Ada. / User: Hi Ada, yes." in text
                    assert result.structured_content["state"] == "ended"
                    refused = await mcp.call_tool(
                        "whatsapp_call", {"action": "call", "to": "+33612345678"}
                    )
                    assert refused.is_error
                    assert _text(refused).startswith(
                        "Refused: +33612345678 is not in allowedNumbers"
                    )
                    unknown = await mcp.call_tool("whatsapp_calls", {"action": "status"})
                    assert unknown.is_error
        finally:
            await endpoint.aclose()


async def test_mcp_over_http_refuses_a_missing_or_wrong_token(fake_service, make_settings):
    _service, v1_url = fake_service
    settings = _settings(make_settings, v1_url)
    async with ServiceClient(v1_url, TOKEN) as client:
        endpoint = mcp_endpoint(RemoteBackend(client), settings)
        app = Starlette(routes=[Route("/mcp", endpoint=endpoint)])
        try:
            async with serve_asgi(app) as url, asyncio.timeout(20):
                body = {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "initialize",
                    "params": {
                        "protocolVersion": "2025-06-18",
                        "capabilities": {},
                        "clientInfo": {"name": "t", "version": "1"},
                    },
                }
                accept = {"Accept": "application/json, text/event-stream"}
                async with httpx.AsyncClient() as http:
                    for auth in (None, "Bearer wrong-token-xxxxxxxx", f"Basic {TOKEN}"):
                        headers = dict(accept, **({"Authorization": auth} if auth else {}))
                        response = await http.post(url + "/mcp", json=body, headers=headers)
                        assert response.status_code == 401
                        assert response.headers["www-authenticate"] == "Bearer"
                        assert TOKEN not in response.text
                    ok = await http.post(
                        url + "/mcp",
                        json=body,
                        headers=dict(accept, Authorization=f"Bearer {TOKEN}"),
                    )
                    assert ok.status_code == 200
                    assert ok.json()["result"]["serverInfo"]["name"] == "whatsapp-call"
                with pytest.raises(Exception):  # noqa: B017 - the SDK's error type for HTTP 401
                    async with _http_client(url + "/mcp", token=None) as mcp:
                        await mcp.list_tools()
        finally:
            await endpoint.aclose()


async def test_serve_mcp_routes_over_a_call_service(make_settings, register_plugin, tmp_path):
    """The route `serve` mounts: no token configured, so loopback Host only."""
    register_plugin(AskingProvider(), name="asking-provider")
    settings = make_settings(
        provider="meta",
        metaPhoneNumberId="106540352242922",
        metaAccessToken="EAAG-test-token",
        openaiApiKey="sk-test-key",
        stateDir=str(tmp_path / "state"),
        allowedNumbers=["+1408555*"],
    )
    store = open_store(settings)
    await store.open()
    service = CallService(settings, store)
    route = serve_mcp_routes(service, settings)
    app = Starlette(routes=[route])
    try:
        async with serve_asgi(app) as url, asyncio.timeout(20):
            async with _http_client(url + "/mcp", token=None) as mcp:
                result = await mcp.call_tool(
                    "whatsapp_call", {"action": "call", "to": "+14085551234"}
                )
                assert _text(result).startswith("Permission requested: the user must accept")
                call_id = result.structured_content["id"]
                hung = await mcp.call_tool(
                    "whatsapp_call", {"action": "hangup", "call_id": call_id}
                )
                assert hung.structured_content["end_reason"] == "cancelled"
            async with httpx.AsyncClient() as http:  # DNS rebinding: a foreign Host is refused
                response = await http.post(
                    url + "/mcp",
                    json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                    headers={
                        "Host": "evil.example",
                        "Accept": "application/json, text/event-stream",
                    },
                )
                assert response.status_code in (403, 421)
    finally:
        await route.endpoint.aclose()
        await service.shutdown(timeout=5)
        await store.close()


# -- stdio: `whatsapp-call mcp` as a subprocess ---------------------------------------------------


def _mcp_command(config: Path) -> StdioServerParameters:
    """`.venv/bin/whatsapp-call -c CONFIG mcp` once cli.py registers the command; until then
    the same CLI object with `commands.agent.register` applied, run by this interpreter."""
    from whatsapp_call.cli import cli

    script = Path(sys.executable).with_name("whatsapp-call")
    if "mcp" in cli.commands and script.exists():
        return StdioServerParameters(command=str(script), args=["-c", str(config), "mcp"])
    bootstrap = (
        "from whatsapp_call.cli import cli\n"
        "from whatsapp_call.commands import agent\n"
        "'mcp' in cli.commands or agent.register(cli)\n"
        "cli(prog_name='whatsapp-call')\n"
    )
    return StdioServerParameters(
        command=sys.executable, args=["-c", bootstrap, "-c", str(config), "mcp"]
    )


@pytest.mark.slow
async def test_mcp_over_stdio_in_remote_mode(fake_service, tmp_path):
    service, v1_url = fake_service
    config = tmp_path / "whatsapp-call.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "channels": {
                    "whatsappcall": {
                        "serviceUrl": v1_url,
                        "serviceToken": TOKEN,
                        "allowedNumbers": [CALLEE, WAITING],
                    }
                }
            }
        )
    )
    config.chmod(0o600)
    async with asyncio.timeout(45), Client(_mcp_command(config)) as mcp:
        tools = (await mcp.list_tools()).tools
        assert [t.name for t in tools] == ["whatsapp_call"]
        result = await mcp.call_tool(
            "whatsapp_call",
            {
                "action": "call",
                "to": CALLEE,
                "greeting": "Hello!",
                "wait": True,
                "wait_seconds": 15,
            },
        )
        assert not result.is_error, _text(result)
        assert _text(result).startswith("Completed")
        assert service.bodies[-1]["greeting"] == "Hello!"
        assert service.bodies[-1]["metadata"] == {"source": "agent_tool"}
        waiting = await mcp.call_tool("whatsapp_call", {"action": "call", "to": WAITING})
        assert _text(waiting).startswith("Permission requested")
        call_id = waiting.structured_content["id"]
        status = await mcp.call_tool("whatsapp_call", {"action": "status", "call_id": call_id})
        assert status.structured_content["state"] == "permission_requested"
        hung = await mcp.call_tool("whatsapp_call", {"action": "hangup", "call_id": call_id})
        assert _text(hung).startswith("Cancelled: hung up on request.")
        bad = await mcp.call_tool("whatsapp_call", {"action": "call", "to": "+1 408"})
        assert bad.is_error and _text(bad).startswith("Bad input:")


def test_tool_wrapper_is_shared(make_settings):
    """Both transports serve the same definition object's schema."""
    settings = make_settings(allowedNumbers=["*"])
    tool = WhatsAppCallTool(RemoteBackend(None), settings)
    endpoint = mcp_endpoint(RemoteBackend(None), settings, tool=tool)
    assert endpoint.server.get_tool_input_schema("whatsapp_call") is tool.definition.parameters
