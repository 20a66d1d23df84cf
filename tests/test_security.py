"""Security: secrets never leak (logs at DEBUG, hook traces, records, errors, `doctor`,
`config show`), the service API needs the bearer token on every /v1 route, compares it in
constant time, sends no CORS grant, and is rate-limited; `allowedNumbers` holds through the
real service's MCP endpoint; a config file others can read is warned about.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
from pathlib import Path

import httpx
import pytest
import whatsapp_call_meta
import whatsapp_call_openai
from reliability_support import TO, WA_ID, call_and_wait, running, sim_calls_to
from whatsapp_call import plugins
from whatsapp_call.api import routes
from whatsapp_call_sim.whatsapp import Scenario

pytest_plugins = ["reliability_plugin"]

CLI = str(Path(sys.executable).parent / "whatsapp-call")
SECRET_WORDS = ("Token", "Key", "Secret")
V1_ROUTES = [
    ("POST", "/v1/calls"),
    ("GET", "/v1/calls"),
    ("GET", "/v1/calls/some-id"),
    ("POST", "/v1/calls/some-id/hangup"),
    ("GET", "/v1/calls/some-id/events"),
    ("GET", "/v1/permissions/+14155550123"),
    ("POST", "/v1/permissions/+14155550123/request"),
]
PUBLIC_ROUTES = [("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/openapi.json")]


@pytest.fixture
def providers(register_plugin):
    for plugin in (whatsapp_call_meta, whatsapp_call_openai):
        register_plugin(plugin)


def secrets_of(options: dict) -> dict[str, str]:
    return {
        k: v
        for k, v in options.items()
        if any(word in k for word in SECRET_WORDS) and isinstance(v, str) and v
    }


async def run_cli(*args: str, env: dict | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        CLI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "WHATSAPP_CALL_PLUGINS": "meta,openai", **(env or {})},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(errors="replace")


@pytest.mark.slow
async def test_no_secret_in_any_output_of_a_full_call(
    providers, make_settings, tmp_path, caplog, reliability
):
    """A whole call with DEBUG logging and hook tracing on, a failed call whose error echoes
    a request, the records over the API, `doctor` and `config show`: every output is
    searched for every secret value."""
    caplog.set_level(logging.DEBUG)
    plugins.enable_tracing()
    outputs: dict[str, str] = {}
    try:
        async with running("meta", make_settings, tmp_path, Scenario(hangup_after_s=3)) as (
            sims,
            runtime,
        ):
            secrets = secrets_of(sims.options)
            record = await call_and_wait(runtime, greeting="Hello from the security test.")
            sims.realtime.faults.key_error_as_event = True
            runtime.settings.openai_api_key = type(runtime.settings.openai_api_key)(
                secrets["openaiApiKey"][:-3] + "zzz"
            )
            failed = await call_and_wait(runtime, to="+14155550199")
            headers = {"Authorization": f"Bearer {sims.options['serviceToken']}"}
            async with httpx.AsyncClient(
                base_url=sims.urls["service"], headers=headers, timeout=10
            ) as client:
                for call_id in (record.id, failed.id):
                    outputs[f"GET /v1/calls/{call_id}"] = (
                        await client.get(f"/v1/calls/{call_id}")
                    ).text
                outputs["GET /v1/calls"] = (await client.get("/v1/calls")).text
                outputs["/metrics"] = (await client.get("/metrics")).text
                outputs["/healthz"] = (await client.get("/healthz")).text
                outputs["401"] = (
                    await client.get("/v1/calls", headers={"Authorization": "Bearer x"})
                ).text
            for name in ("doctor", "config show", "config show --json"):
                code, out = await run_cli(
                    "-c",
                    str(sims.config_path),
                    *name.split(),
                    env={"WHATSAPP_CALL_TRACE_HOOKS": "1"},
                )
                outputs[name] = out
            events = [
                e.data for c in (record.id, failed.id) for e in await runtime.store.get_events(c)
            ]
            outputs["events"] = repr(events)
    finally:
        plugins.disable_tracing()
    outputs["logs"] = caplog.text + "\n".join(
        f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records
    )
    assert record.end_reason == "completed" and failed.end_reason == "failed"
    assert "whatsapp_call.hooks" in caplog.text  # the hook trace really ran
    assert "doctor" in outputs and outputs["config show"].strip()
    assert len(secrets) >= 6, secrets.keys()
    leaks = [
        (where, key)
        for where, text in outputs.items()
        for key, value in secrets.items()
        if value in text or value[:-3] in text
    ]
    assert not leaks, leaks
    reliability.bad_inputs(
        "secret_leak_scan", tried=len(outputs) * len(secrets), crashes=len(leaks)
    )


@pytest.mark.slow
async def test_api_needs_the_token_on_every_route_and_grants_no_cors(
    providers, make_settings, tmp_path, reliability
):
    async with running("meta", make_settings, tmp_path) as (sims, runtime):
        token = sims.options["serviceToken"]
        almost = token[:-1] + ("A" if token[-1] != "A" else "B")
        answers = {}
        async with httpx.AsyncClient(base_url=sims.urls["service"], timeout=10) as client:
            for method, path in V1_ROUTES:
                for label, headers in (
                    ("none", {}),
                    ("wrong", {"Authorization": f"Bearer {almost}"}),
                    ("scheme", {"Authorization": f"Basic {token}"}),
                ):
                    response = await client.request(method, path, headers=headers)
                    answers[(method, path, label)] = response.status_code
            public = {p: (await client.request(m, p)).status_code for m, p in PUBLIC_ROUTES}
            origin = {"Origin": "https://evil.example"}
            preflight = await client.options(
                "/v1/calls",
                headers={**origin, "Access-Control-Request-Method": "POST"},
            )
            simple = await client.get(
                "/v1/calls", headers={**origin, "Authorization": f"Bearer {token}"}
            )
        rung = sim_calls_to(sims)
    assert set(answers.values()) == {401}, answers
    assert public == {"/healthz": 200, "/metrics": 200, "/openapi.json": 200}
    assert simple.status_code == 200
    for response in (preflight, simple):
        assert not any(h.lower().startswith("access-control-") for h in response.headers)
    assert not rung
    reliability.bad_inputs("api_auth", tried=len(answers), crashes=0)


def test_every_secret_comparison_is_constant_time():
    """Code review as a test: each place a bearer token or webhook signature is checked
    uses hmac.compare_digest, and none compares it with ==."""
    from whatsapp_call.agent import mcp_server
    from whatsapp_call_meta import webhooks as meta_webhooks
    from whatsapp_call_wati import webhooks as wati_webhooks

    for check in (
        routes._authorized,
        mcp_server.McpHttpEndpoint._authorized,
        meta_webhooks,
        wati_webhooks,
    ):
        assert "compare_digest" in inspect.getsource(check), check
    for module in (meta_webhooks, wati_webhooks, mcp_server, routes):
        for line in inspect.getsource(module).splitlines():
            code = line.split("#")[0]
            if "==" in code and any(w in code.lower() for w in ("signature", "token", "digest")):
                assert "compare_digest" in code or "is None" in code or "len(" in code, line


@pytest.mark.slow
async def test_api_is_rate_limited_per_client(providers, make_settings, tmp_path, reliability):
    async with running("meta", make_settings, tmp_path) as (sims, runtime):
        headers = {"Authorization": f"Bearer {sims.options['serviceToken']}"}
        async with httpx.AsyncClient(
            base_url=sims.urls["service"], headers=headers, timeout=10
        ) as client:
            statuses = []
            for _ in range(routes.ApiRateLimiter().burst + 40):
                response = await client.get("/v1/calls")
                statuses.append(response.status_code)
                if response.status_code == 429:
                    limited = response
            guessing = [
                (
                    await client.get("/v1/calls", headers={"Authorization": "Bearer guess"})
                ).status_code
                for _ in range(5)
            ]
            await asyncio.sleep(float(limited.headers["Retry-After"]))
            after = (await client.get("/v1/calls")).status_code
            health = (await client.get("/healthz")).status_code
    assert statuses[:50] == [200] * 50  # ordinary use is never limited
    assert 429 in statuses and set(statuses) == {200, 429}
    assert "Slow down" in limited.json()["error"]["hint"]
    assert 429 in guessing and set(guessing) <= {401, 429}  # token guesses are slowed too
    assert after == 200 and health == 200  # the limit passes; webhooks/health never limited
    reliability.bad_inputs("api_flood", tried=len(statuses) + len(guessing), crashes=0)


def test_rate_limiter_refills_at_its_rate():
    limiter = routes.ApiRateLimiter(rate=10, burst=3)
    assert [limiter.retry_after("a", now=0.0) for _ in range(3)] == [None, None, None]
    assert limiter.retry_after("a", now=0.0) == pytest.approx(0.1)
    assert limiter.retry_after("b", now=0.0) is None  # per client
    assert limiter.retry_after("a", now=0.2) is None


@pytest.mark.slow
async def test_allowed_numbers_hold_through_the_services_mcp_endpoint(
    providers, make_settings, tmp_path, reliability
):
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    async with running(
        "meta", make_settings, tmp_path, Scenario(answer="reject"), allowedNumbers=[TO]
    ) as (sims, runtime):
        headers = {"Authorization": f"Bearer {sims.options['serviceToken']}"}
        async with asyncio.timeout(30):
            mcp = Client(
                streamable_http_client(
                    sims.urls["service"] + "/mcp",
                    http_client=create_mcp_http_client(headers=headers),
                )
            )
            async with mcp:
                refused = await mcp.call_tool(
                    "whatsapp_call", {"action": "call", "to": "+14155550999"}
                )
                allowed = await mcp.call_tool(
                    "whatsapp_call", {"action": "call", "to": TO, "wait": True, "wait_seconds": 15}
                )
        records = await runtime.store.list_calls(limit=10)
        rung = {c.wa_id for c in sims.whatsapp.calls.values()}
    assert refused.is_error and "allowedNumbers" in refused.content[0].text
    assert not allowed.is_error
    assert [r.to_e164 for r in records] == [TO]
    assert rung == {WA_ID}
    reliability.bad_inputs("not_allowed_number", tried=1, crashes=0)


async def test_config_readable_by_others_is_warned_about(tmp_path, reliability):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "channels:\n  whatsappcall:\n    provider: meta\n    metaPhoneNumberId: '1'\n"
        "    metaAccessToken: EAAsecretvalue123456\n"
    )
    path.chmod(0o644)
    code, out = await run_cli("-c", str(path), "config", "show")
    path.chmod(0o600)
    code_private, out_private = await run_cli("-c", str(path), "config", "show")
    assert code == 0 and "readable by other users" in out and f"chmod 600 {path}" in out
    assert "readable by other users" not in out_private and code_private == 0
    assert "EAAsecretvalue123456" not in out + out_private
