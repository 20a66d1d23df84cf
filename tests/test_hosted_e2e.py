"""Hosted mode end to end, against the simulators: the agent tool over MCP (streamable HTTP at
`/mcp` of a Runtime, and stdio through `whatsapp-call mcp` in remote mode), the remote CLI
(`call`, `calls`, `permission check`) against a `whatsapp-call serve` subprocess, and the
service API's live events (SSE), idempotency and field-naming 422s.

Every call is a real one: the simulated user is an aiortc peer that hears the AI's greeting,
says hello, hears the answer and hangs up (a short script, to keep the file fast).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import whatsapp_call_meta
import whatsapp_call_openai
import yaml
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from whatsapp_call.api import routes
from whatsapp_call.runtime import Runtime
from whatsapp_call_sim.audio import UTTERANCE_TEXT
from whatsapp_call_sim.runner import SimulatorSet
from whatsapp_call_sim.user import HangUp, Say, UserScript, WaitForSpeech
from whatsapp_call_sim.whatsapp import Scenario

pytestmark = pytest.mark.slow

TO = "+14155550123"
GREETING = "Hi, this is a test call."
HELLO = UTTERANCE_TEXT["hello"]
CLI = str(Path(sys.executable).parent / "whatsapp-call")
# One process keeps the file fast on 2 cores; HOSTED_E2E_SERVE_ARGS="" runs the same tests
# against the default `serve` (a front process and one media worker per core).
SERVE_ARGS = os.environ.get("HOSTED_E2E_SERVE_ARGS", "--workers 1").split()
# Hear the greeting, say hello, hear the AI's answer, hang up: about 6 s of call.
SHORT_CALL = Scenario(
    user_script=UserScript((WaitForSpeech(), Say("hello"), WaitForSpeech(), HangUp()))
)


@pytest.fixture
def providers(register_plugin):
    for plugin in (whatsapp_call_meta, whatsapp_call_openai):
        register_plugin(plugin)


@contextlib.asynccontextmanager
async def in_process(make_settings, tmp_path, **overrides):
    """The simulators plus a Runtime in this process (as `running` in test_calls_e2e)."""
    async with SimulatorSet(
        provider="meta", state_dir=tmp_path, scenario=SHORT_CALL, turn=False
    ) as sims:
        settings = make_settings(**{**sims.options, **overrides})
        async with Runtime(settings) as runtime:
            yield sims, runtime


def write_config(path: Path, **options: Any) -> Path:
    path.write_text(yaml.safe_dump({"channels": {"whatsappcall": options}}))
    path.chmod(0o600)
    return path


@contextlib.asynccontextmanager
async def serve_subprocess(
    tmp_path: Path, scenario: Scenario = SHORT_CALL
) -> AsyncIterator[tuple[SimulatorSet, str, str]]:
    """The simulators in this process and `whatsapp-call serve` as a subprocess using them.
    Yields (sims, service URL, service token)."""
    async with SimulatorSet(
        provider="meta", state_dir=tmp_path / "sims", scenario=scenario, turn=False
    ) as sims:
        env = {**os.environ, "WHATSAPP_CALL_PLUGINS": "meta,openai"}
        log_path = tmp_path / "serve.log"
        url = sims.urls["service"]
        with log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                CLI,
                "-c",
                str(sims.config_path),
                "serve",
                *SERVE_ARGS,
                env=env,
                stdout=log,
                stderr=log,
            )
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                for _ in range(200):
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(url + "/healthz")).status_code == 200:
                            break
                    if proc.returncode is not None:
                        raise AssertionError("serve exited: " + log_path.read_text())
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("serve did not start: " + log_path.read_text())
            yield sims, url, sims.options["serviceToken"]
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 20)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


async def run_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None):
    """Run the CLI without blocking the event loop the simulators live in."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


def _text(result: Any) -> str:
    return "".join(block.text for block in result.content if block.type == "text")


def assert_completed_tool_result(result: Any) -> dict[str, Any]:
    text = _text(result)
    assert not result.is_error, text
    assert text.startswith("Completed"), text
    assert f"Transcript: AI: {GREETING}" in text
    assert f"User: {HELLO}" in text
    data = result.structured_content
    assert data["state"] == "ended" and data["end_reason"] == "completed"
    assert data["to"] == TO and data["id"].startswith("call_")
    return data


# -- MCP over streamable HTTP at /mcp of a Runtime -------------------------------------------


async def test_mcp_over_http_places_a_real_call(providers, make_settings, tmp_path):
    async with in_process(make_settings, tmp_path, allowedNumbers=[TO]) as (sims, runtime):
        token = sims.options["serviceToken"]
        async with httpx.AsyncClient(timeout=5) as http:  # no token, no tool
            refused = await http.post(
                runtime.url + "/mcp",
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                headers={"Accept": "application/json, text/event-stream"},
            )
        assert refused.status_code == 401
        headers = {"Authorization": f"Bearer {token}"}
        client = Client(
            streamable_http_client(
                runtime.url + "/mcp", http_client=create_mcp_http_client(headers=headers)
            )
        )
        async with asyncio.timeout(60), client as mcp:
            assert [t.name for t in (await mcp.list_tools()).tools] == ["whatsapp_call"]
            result = await mcp.call_tool(
                "whatsapp_call",
                {
                    "action": "call",
                    "to": "+1 415 555 0123",
                    "greeting": GREETING,
                    "wait": True,
                    "wait_seconds": 45,
                },
            )
            data = assert_completed_tool_result(result)
            status = await mcp.call_tool(
                "whatsapp_call", {"action": "status", "call_id": data["id"]}
            )
            assert status.structured_content["end_reason"] == "completed"
            outside = await mcp.call_tool("whatsapp_call", {"action": "call", "to": "+4930123456"})
            assert outside.is_error and "not in allowedNumbers" in _text(outside)
        stored = await runtime.store.get_call(data["id"])
        assert stored.metadata == {"source": "agent_tool"}
        assert len(sims.whatsapp.calls) == 1  # the refused number was never rung


# -- the /v1 API: SSE, idempotency, 422 ------------------------------------------------------


async def test_sse_streams_a_call_live_and_idempotency_key_dedupes(
    providers, make_settings, tmp_path, monkeypatch
):
    # Keep-alives every 0.2 s: the stream must carry on through them.
    monkeypatch.setattr(routes, "SSE_HEARTBEAT_SECONDS", 0.2)
    async with in_process(make_settings, tmp_path) as (sims, runtime):
        headers = {"Authorization": f"Bearer {sims.options['serviceToken']}"}
        async with httpx.AsyncClient(base_url=runtime.url, headers=headers, timeout=10) as http:
            # 422 names the offending fields.
            bad = await http.post("/v1/calls", json={"greeting": 5, "colour": "red"})
            assert bad.status_code == 422
            error = bad.json()["error"]
            assert {f["field"] for f in error["fields"]} == {"to", "greeting", "colour"}
            assert "to" in error["message"] and "colour" in error["message"]
            not_a_number = await http.post("/v1/calls", json={"to": "+1 415"})
            assert not_a_number.status_code == 422
            assert "number" in not_a_number.json()["error"]["message"].lower()

            key = {"Idempotency-Key": "order-4711-reminder"}
            body = {"to": TO, "greeting": GREETING}
            first = await http.post("/v1/calls", json=body, headers=key)
            assert first.status_code == 202, first.text
            call_id = first.json()["id"]

            received: list[tuple[float, str, dict[str, Any]]] = []

            async def follow() -> None:
                async with http.stream(
                    "GET", f"/v1/calls/{call_id}/events", timeout=httpx.Timeout(60, connect=5)
                ) as stream:
                    assert stream.status_code == 200
                    assert stream.headers["content-type"].startswith("text/event-stream")
                    event = None
                    async for line in stream.aiter_lines():
                        if line.startswith(": keep-alive"):
                            received.append((time.monotonic(), "keep-alive", {}))
                        elif line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:"):
                            received.append((time.monotonic(), event, json.loads(line[5:])))

            async with asyncio.timeout(60):
                follower = asyncio.create_task(follow())
                # A retry with the same key is the same call, not a second one.
                retry = await http.post("/v1/calls", json=body, headers=key)
                assert retry.status_code == 202 and retry.json()["id"] == call_id
                await follower  # returns only because the server ends the stream
            final = (await http.get(f"/v1/calls/{call_id}")).json()
        assert len(sims.whatsapp.calls) == 1

    assert final["end_reason"] == "completed", final["end_detail"]
    states = [d["state"] for _, e, d in received if e == "state"]
    assert states[-1] == "ended" and received[-1][1] == "state"  # the stream ends after ended
    assert len(states) == len(set(states)), states  # each state once, snapshot included
    later = states[states.index("ringing") :]
    assert later[:2] == ["ringing", "in_progress"], states
    assert any(e == "keep-alive" for _, e, _ in received[:-1])
    lines = [(at, d) for at, e, d in received if e == "transcript"]
    assert any(d["role"] == "assistant" and d["text"] == GREETING for _, d in lines)
    assert any(d["role"] == "user" and d["text"] == HELLO for _, d in lines)
    # Live: the lines arrived while the call was going on, not in one batch at the end.
    answered_at = next(at for at, e, d in received if e == "state" and d["state"] == "in_progress")
    ended_at = received[-1][0]
    assert all(answered_at <= at < ended_at for at, _ in lines)
    assert ended_at - lines[0][0] > 0.5
    assert {d["text"] for _, d in lines} <= {line["text"] for line in final["transcript"]}


# -- remote mode: the CLI and stdio MCP against a `serve` subprocess --------------------------


async def test_remote_cli_and_stdio_mcp_against_serve(tmp_path):
    async with serve_subprocess(tmp_path) as (sims, url, token):
        remote = write_config(tmp_path / "remote.yaml", serviceUrl=url, serviceToken=token)

        # `call --json`: live progress on stderr, the completed record on stdout.
        code, out, err = await run_cli(
            CLI, "-c", str(remote), "call", TO, "--greeting", GREETING, "--json"
        )
        assert code == 0, err
        record = json.loads(out)
        assert record["state"] == "ended" and record["end_reason"] == "completed"
        assert record["to_e164"] == TO and record["provider"] == "meta"
        assert [line["role"] for line in record["transcript"]][:2] == ["assistant", "user"]
        assert f"Calling {TO} ({record['id']}) via {url}" in err
        assert "-> Ringing" in err and "-> Answered" in err
        assert f"User: {HELLO}" in err and "-> Call ended: completed" in err

        # `calls` and `calls ID`, remotely.
        code, out, err = await run_cli(CLI, "-c", str(remote), "calls", "--json")
        assert code == 0, err
        assert [c["id"] for c in json.loads(out)] == [record["id"]]
        code, out, err = await run_cli(CLI, "-c", str(remote), "calls", record["id"])
        assert code == 0, err
        assert out.startswith(f"{record['id']} to {TO}: completed")
        assert f"User: {HELLO}" in out

        # `permission check`, remotely (the simulated user allows calls).
        code, out, err = await run_cli(CLI, "-c", str(remote), "permission", "check", TO)
        assert code == 0, err
        assert out.startswith(f"{TO}: calls allowed")
        code, out, err = await run_cli(CLI, "-c", str(remote), "permission", "check", TO, "--json")
        assert code == 0, err
        assert json.loads(out)["status"] == "granted"

        # A wrong token: a clear error, exit 2, no traceback, no secret.
        wrong = "wrong-token-0123456789abcdef"
        bad = write_config(tmp_path / "bad.yaml", serviceUrl=url, serviceToken=wrong)
        for args in (["calls"], ["call", TO], ["permission", "check", TO]):
            code, out, err = await run_cli(CLI, "-c", str(bad), *args)
            assert code == 2, (args, out, err)
            assert err.startswith("Error: The service answered 401"), err
            assert "serviceToken" in err and "Traceback" not in out + err
            assert wrong not in out + err and token not in out + err

        # The agent tool over stdio: `whatsapp-call mcp` in remote mode.
        agent = write_config(
            tmp_path / "agent.yaml", serviceUrl=url, serviceToken=token, allowedNumbers=[TO]
        )
        params = StdioServerParameters(command=CLI, args=["-c", str(agent), "mcp"])
        async with asyncio.timeout(60), Client(params) as mcp:
            result = await mcp.call_tool(
                "whatsapp_call",
                {
                    "action": "call",
                    "to": TO,
                    "greeting": GREETING,
                    "wait": True,
                    "wait_seconds": 45,
                },
            )
            data = assert_completed_tool_result(result)
        assert len(sims.whatsapp.calls) == 2  # the CLI's call and the agent's; nothing else

        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http:
            stored = (await http.get(f"{url}/v1/calls/{data['id']}")).json()
        assert stored["metadata"] == {"source": "agent_tool"}
        assert stored["greeting"] == GREETING
