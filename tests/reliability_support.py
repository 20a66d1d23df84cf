"""Shared pieces of the reliability suite: the service + simulators, a fault-injecting HTTP
proxy in front of the provider API, and webhook signing. Everything on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from whatsapp_call.calls.orchestrator import CallRequest
from whatsapp_call.runtime import Runtime
from whatsapp_call.serving import AsgiServer
from whatsapp_call_sim.runner import SimulatorSet

TO = "+14155550123"
WA_ID = TO[1:]
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding", "host"}


@contextlib.asynccontextmanager
async def running(
    provider: str,
    make_settings: Callable[..., Any],
    tmp_path: Any,
    scenario: Any = None,
    *,
    before_start: Callable[[SimulatorSet, dict[str, Any]], Awaitable[None] | None] | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[SimulatorSet, Runtime]]:
    """Simulators + the service. `before_start(sims, options)` may change the options (e.g.
    point the provider base URL at a `FaultProxy`) before the service starts."""
    async with SimulatorSet(
        provider=provider, state_dir=tmp_path, scenario=scenario, turn=False
    ) as sims:
        options = {**sims.options, **overrides}
        if before_start is not None:
            result = before_start(sims, options)
            if asyncio.iscoroutine(result):
                await result
        settings = make_settings(**options)
        async with Runtime(settings) as runtime:
            yield sims, runtime


async def call_and_wait(runtime: Runtime, to: str = TO, timeout: float = 45.0, **request: Any):
    record = await runtime.service.place_call(CallRequest(to=to, **request))
    return await runtime.service.wait(record.id, timeout=timeout)


async def states_of(runtime: Runtime, call_id: str) -> list[str]:
    return [e.data.get("to") for e in await runtime.store.get_events(call_id) if e.type == "state"]


async def event_types(runtime: Runtime, call_id: str) -> list[str]:
    return [e.type for e in await runtime.store.get_events(call_id)]


def sim_calls_to(sims: SimulatorSet, wa_id: str = WA_ID) -> list[Any]:
    return [c for c in sims.whatsapp.calls.values() if c.wa_id == wa_id]


async def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `predicate` (sync or async) until it is truthy; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def assert_consistent(record: Any, states: list[str]) -> None:
    """What every ended call's record must satisfy, whatever went wrong."""
    assert record.state.value == "ended", record
    assert record.end_reason is not None and record.end_detail, record
    assert states and states[-1] == "ended", states
    assert len(states) == len(set(states)), f"a state was entered twice: {states}"


def meta_signature(body: bytes, app_secret: str) -> str:
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def meta_status_body(
    wacid: str, status: str, *, call_id: str | None, wa_id: str = WA_ID, pnid: str = "1234567890"
) -> bytes:
    """A Meta `statuses` webhook for one call status, as the Graph API sends it."""
    item: dict[str, Any] = {
        "id": wacid,
        "type": "call",
        "status": status,
        "timestamp": str(int(time.time())),
        "recipient_id": wa_id,
    }
    if call_id is not None:
        item["biz_opaque_callback_data"] = call_id
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "13175551399", "phone_number_id": pnid},
        "statuses": [item],
    }
    payload = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "366634483210360", "changes": [{"field": "calls", "value": value}]}],
    }
    return json.dumps(payload, separators=(",", ":")).encode()


# -- the fault proxy ------------------------------------------------------------------------


@dataclass
class Rule:
    """What to do to requests matching `method` and the `path` regex, `times` times (None:
    always). Actions:
    * "status": answer `status` with `body` (JSON if a dict) and `headers`; never forwarded;
    * "hang": never answer (the client's timeout fires); never forwarded;
    * "forward_then_hang": forward (the provider acts on it), then never answer;
    * "forward_then_garbage": forward, then answer 200 with a non-JSON body;
    * "forward_with_extras": forward, then add unexpected fields to every JSON object.
    """

    method: str
    path: str
    action: str
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    times: int | None = 1
    hits: int = 0

    def matches(self, request: Request) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return request.method == self.method and re.search(self.path, request.url.path) is not None


class FaultProxy:
    """A real HTTP reverse proxy in front of the provider simulator that injects faults.

    Point `metaGraphBaseUrl` / `watiBaseUrl` at `url`; add `Rule`s with `add()`. Every
    request is logged in `seen` as (method, path, what happened).
    """

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.rules: list[Rule] = []
        self.seen: list[tuple[str, str, str]] = []
        self._client = httpx.AsyncClient(timeout=30)
        self._server = AsgiServer(
            Starlette(
                routes=[
                    Route(
                        "/{path:path}",
                        self._handle,
                        methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
                    )
                ]
            )
        )
        self.url = self._server.url
        self._hangs: list[asyncio.Event] = []

    async def __aenter__(self) -> FaultProxy:
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for hang in self._hangs:
            hang.set()
        await self._server.stop()
        await self._client.aclose()

    def add(self, rule: Rule) -> Rule:
        self.rules.append(rule)
        return rule

    def count(self, method: str, path: str, what: str | None = None) -> int:
        return sum(
            1
            for m, p, w in self.seen
            if m == method and re.search(path, p) and (what is None or w == what)
        )

    async def _hang(self) -> Response:
        hang = asyncio.Event()
        self._hangs.append(hang)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(60):
                await hang.wait()
        return Response(status_code=504)

    async def _forward(self, request: Request) -> httpx.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        return await self._client.request(
            request.method,
            self.upstream + request.url.path,
            params=request.query_params,
            headers=headers,
            content=await request.body(),
        )

    async def _handle(self, request: Request) -> Response:
        rule = next((r for r in self.rules if r.matches(request)), None)
        path = request.url.path
        if rule is None:
            self.seen.append((request.method, path, "forwarded"))
            return _relay(await self._forward(request))
        rule.hits += 1
        self.seen.append((request.method, path, rule.action))
        if rule.action == "status":
            body = rule.body
            content = json.dumps(body).encode() if isinstance(body, dict | list) else body or b""
            if isinstance(content, str):
                content = content.encode()
            kind = "application/json" if isinstance(body, dict | list) else "text/plain"
            return Response(content, rule.status, headers=rule.headers, media_type=kind)
        if rule.action == "hang":
            return await self._hang()
        upstream = await self._forward(request)
        if rule.action == "forward_then_hang":
            return await self._hang()
        if rule.action == "forward_then_garbage":
            return Response(b"<html>502 Bad Gateway</html>", 200, media_type="application/json")
        if rule.action == "forward_with_extras":
            data = _with_extras(upstream.json())
            return Response(
                json.dumps(data).encode(), upstream.status_code, media_type="application/json"
            )
        raise AssertionError(f"unknown proxy action {rule.action!r}")


def _relay(upstream: httpx.Response) -> Response:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
    return Response(upstream.content, upstream.status_code, headers=headers)


def _with_extras(value: Any) -> Any:
    """Every JSON object gains fields nobody documented (APIs add fields without notice)."""
    if isinstance(value, dict):
        out = {k: _with_extras(v) for k, v in value.items()}
        out["x_unexpected"] = {"nested": [1, "two", None]}
        out["another_new_field"] = "surprise"
        return out
    if isinstance(value, list):
        return [_with_extras(v) for v in value]
    return value


def closed_port_url(scheme: str = "http") -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"{scheme}://127.0.0.1:{port}"


class WebhookRewriter:
    """Sits between the WhatsApp simulator and the service's Meta webhook: applies
    `rewrite_sdp` to the answer SDP of connect webhooks, signs the result again with the app
    secret (as a provider bug would still be signed), and forwards everything else as is."""

    def __init__(self, target: str, app_secret: str, rewrite_sdp: Callable[[str], str]):
        self.target = target
        self.app_secret = app_secret
        self.rewrite_sdp = rewrite_sdp
        self.rewritten = 0
        self._client = httpx.AsyncClient(timeout=10)
        self._server = AsgiServer(
            Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST"])])
        )
        self.url = self._server.url + "/hook"

    async def __aenter__(self) -> WebhookRewriter:
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop()
        await self._client.aclose()

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        payload = json.loads(body)
        changed = False
        for entry in payload.get("entry", []):
            for change in entry.get("changes", []):
                for call in change.get("value", {}).get("calls", []):
                    session = call.get("session")
                    if call.get("event") == "connect" and session and session.get("sdp"):
                        session["sdp"] = self.rewrite_sdp(session["sdp"])
                        changed = True
        if changed:
            self.rewritten += 1
            body = json.dumps(payload, separators=(",", ":")).encode()
            headers["x-hub-signature-256"] = meta_signature(body, self.app_secret)
        upstream = await self._client.post(self.target, content=body, headers=headers)
        return Response(upstream.content, upstream.status_code)
