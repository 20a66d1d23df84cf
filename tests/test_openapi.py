"""The service API's OpenAPI document is valid, and the running service keeps to it.

schemathesis generates requests (valid and invalid) for every operation in `/openapi.json`
and sends them to a real Runtime on 127.0.0.1; every response must be documented, match its
schema and content type, and never be a 5xx; invalid input must be refused with a 4xx. Every
documented route refuses a request without the bearer token (or with a wrong one) with 401.

The provider is a small in-test plugin that answers at once and deterministically (nobody
allows calls; permission requests are at their limit), so calls the fuzzer places end
immediately without WebRTC, and the run is bounded by `MAX_EXAMPLES` per operation and mode.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from whatsapp_call import hookimpl
from whatsapp_call.api import openapi_document, ratelimit, routes
from whatsapp_call.models import (
    PermissionRequestOutcome,
    PermissionRequestResult,
    PermissionState,
    PermissionStatus,
)
from whatsapp_call.runtime import Runtime
from whatsapp_call.store.base import utcnow
from whatsapp_call_sim.runner import free_tcp_port

TOKEN = "openapi-test-token-0123456789"
MAX_EXAMPLES = 25  # per operation and generation mode: about 350 requests in all
TO = "+14085551234"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


class NobodyAllowsCalls:
    """A provider with instant, fixed answers: calls end as permission_denied at once."""

    @hookimpl
    async def check_permission(self, call, settings):
        return PermissionState(
            status=PermissionStatus.NOT_GRANTED,
            can_request=False,
            next_request_at=utcnow() + timedelta(days=1),
            detail="request limit reached (test provider)",
        )

    @hookimpl
    async def request_permission(self, call, settings):
        return PermissionRequestResult(
            PermissionRequestOutcome.LIMIT_REACHED,
            retry_at=utcnow() + timedelta(days=1),
            detail="1 request per 24 h (test provider)",
        )


@pytest.fixture
async def service(make_settings, register_plugin, tmp_path, monkeypatch):
    register_plugin(NobodyAllowsCalls(), name="nobody-allows-calls")
    # The fuzzer sends ~350 requests from one address: lift the per-client rate limit (its
    # own tests cover it) so that they reach the routes; a 429 would still be documented.
    monkeypatch.setattr(
        routes, "ApiRateLimiter", lambda: ratelimit.ApiRateLimiter(rate=1e6, burst=10**6)
    )
    settings = make_settings(
        provider="meta",
        metaPhoneNumberId="106540352242922",
        metaAccessToken="EAAG-openapi-test",
        openaiApiKey="sk-openapi-test",
        stateDir=str(tmp_path / "state"),
        listenHost="127.0.0.1",
        listenPort=free_tcp_port(),
        serviceToken=TOKEN,
        maxConcurrentCalls=100,
    )
    async with Runtime(settings) as runtime:
        yield runtime


def test_document_is_valid_openapi():
    schema = schemathesis.openapi.from_dict(openapi_document())
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} == {
        "POST /v1/calls",
        "GET /v1/calls",
        "GET /v1/calls/{call_id}",
        "POST /v1/calls/{call_id}/hangup",
        "GET /v1/calls/{call_id}/events",
        "GET /v1/permissions/{to}",
        "POST /v1/permissions/{to}/request",
    }
    for op in operations:  # every operation documents the 401 it answers without a token
        assert "401" in op.definition.raw["responses"], op.path


def _fuzz_operation(operation: Any, mode: GenerationMode, base_url: str, statuses: dict) -> None:
    checks = CHECKS + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call_and_validate(base_url=base_url, checks=checks, timeout=10)
        key = f"{operation.method.upper()} {operation.path} {response.status_code}"
        statuses[key] = statuses.get(key, 0) + 1

    run()


def _fuzz(base_url: str) -> dict[str, int]:
    """Run schemathesis over every operation (in a worker thread: it uses blocking I/O)."""
    # The token as an OpenAPI-aware credential: negative cases may then drop or spoil it
    # (and expect a 401), which a fixed header would hide.
    config = SchemathesisConfig.from_dict({"auth": {"openapi": {"bearer": {"bearer": TOKEN}}}})
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=config)
    schema.validate()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    statuses: dict[str, int] = {}
    with httpx.Client(base_url=base_url, headers=auth, timeout=10) as http:
        placed = http.post("/v1/calls", json={"to": TO, "greeting": "Hi"}).json()["id"]
    known = {"call_id": placed, "to": TO}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_operation(operation, mode, base_url, statuses)
        # Each operation once more with valid values the fuzzer can hardly guess: a real
        # number, and the id of a call that exists.
        params = {k: v for k, v in known.items() if "{" + k + "}" in operation.path}
        placing = operation.method.upper() == "POST" and operation.path == "/v1/calls"
        if params or placing:
            extra = {"body": {"to": TO, "greeting": "Hi"}} if placing else {}
            case = operation.Case(path_parameters=params or None, **extra)
            response = case.call_and_validate(
                base_url=base_url, headers=auth, checks=CHECKS, timeout=10
            )
            key = f"{operation.method.upper()} {operation.path} {response.status_code}"
            statuses[key] = statuses.get(key, 0) + 1
    return statuses


@pytest.mark.slow
async def test_running_service_conforms_to_its_openapi_document(service):
    statuses = await asyncio.wait_for(asyncio.to_thread(_fuzz, service.url), 120)
    # The fuzzer reached the success path of every operation, not only its refusals.
    for expected in (
        "POST /v1/calls 202",
        "GET /v1/calls 200",
        "GET /v1/calls/{call_id} 200",
        "POST /v1/calls/{call_id}/hangup 200",
        "GET /v1/calls/{call_id}/events 200",
        "GET /v1/permissions/{to} 200",
        "POST /v1/permissions/{to}/request 202",
        "POST /v1/calls 422",
    ):
        assert expected in statuses, sorted(statuses)


async def test_every_route_refuses_a_missing_or_wrong_token(service):
    document = openapi_document()
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as http:
        for path, methods in document["paths"].items():
            concrete = path.replace("{call_id}", "call_0").replace("{to}", TO)
            for method in methods:
                for headers in (
                    {},
                    {"Authorization": "Bearer wrong-token-0123456789"},
                    {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"},
                ):
                    response = await http.request(
                        method.upper(), concrete, headers=headers, json={"to": TO}
                    )
                    assert response.status_code == 401, (method, path, headers)
                    assert response.headers["www-authenticate"] == "Bearer"
                    assert response.json()["error"]["hint"].startswith("Send Authorization")
                    assert TOKEN not in response.text
        # The document itself is public (it holds no secret); /mcp is behind the token too.
        assert (await http.get("/openapi.json")).json() == document
        mcp = await http.post(
            "/mcp",
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            headers={"Accept": "application/json, text/event-stream"},
        )
        assert mcp.status_code == 401
