"""Two service instances sharing real PostgreSQL and Redis on 127.0.0.1: a call placed
through instance A with its webhooks delivered to instance B completes; killing A mid-call
has B reconcile the call; no event is lost or handled twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from services import postgres_server, redis_server  # noqa: F401 - session fixtures
from whatsapp_call_sim.runner import SimulatorSet, free_tcp_port
from whatsapp_call_sim.whatsapp import Scenario

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).parent / "whatsapp-call")
TO = "+14155550123"


def instance_config(
    sims, tmp_path: Path, name: str, port: int, database_url: str, redis_url: str
) -> Path:
    options = dict(sims.options)
    options.update(
        listenPort=port,
        instanceId=name,
        databaseUrl=database_url,
        redisUrl=redis_url,
        stateDir=str(tmp_path / name),
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"channels": {"whatsappcall": options}}))
    path.chmod(0o600)
    return path


@contextlib.asynccontextmanager
async def instance(config: Path, port: int, log: Path):
    env = {**os.environ, "WHATSAPP_CALL_PLUGINS": "meta,openai"}
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            CLI,
            "-c",
            str(config),
            "serve",
            "--workers",
            "1",
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            for _ in range(200):
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                assert proc.returncode is None, f"instance exited; see {log}"
                await asyncio.sleep(0.1)
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)


async def wait_state(client, call_id, states, timeout=40.0):
    async with asyncio.timeout(timeout):
        while True:
            call = (await client.get(f"/v1/calls/{call_id}")).json()
            if call["state"] in states:
                return call
            await asyncio.sleep(0.1)


@pytest.fixture
def cluster_urls(postgres_server, redis_server):  # noqa: F811
    schema = f"t_{secrets.token_hex(6)}"
    return f"{postgres_server.url}?schema={schema}", redis_server.url


async def test_webhooks_on_b_reach_the_call_on_a_and_a_dead_a_is_reconciled_by_b(
    tmp_path, cluster_urls
):
    database_url, redis_url = cluster_urls
    port_a, port_b = free_tcp_port(), free_tcp_port()
    async with SimulatorSet(
        provider="meta", state_dir=tmp_path, turn=False, scenario=Scenario(hangup_after_s=3)
    ) as sims:
        # Every webhook goes to B, while calls are placed through A.
        sims.whatsapp.config.meta_webhook_url = f"http://127.0.0.1:{port_b}/webhooks/meta"
        config_a = instance_config(sims, tmp_path, "node-a", port_a, database_url, redis_url)
        config_b = instance_config(sims, tmp_path, "node-b", port_b, database_url, redis_url)
        headers = {"Authorization": f"Bearer {sims.options['serviceToken']}"}
        api_a = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port_a}", headers=headers, timeout=10
        )
        api_b = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port_b}", headers=headers, timeout=10
        )
        async with api_a, api_b, instance(config_b, port_b, tmp_path / "b.log"):
            async with instance(config_a, port_a, tmp_path / "a.log") as proc_a:
                first = (await api_a.post("/v1/calls", json={"to": TO, "greeting": "Hi"})).json()
                completed = await wait_state(api_a, first["id"], {"ended"})

                # A second call, then A dies mid-call (the whole process group: a crash).
                sims.whatsapp.set_scenario(TO[1:], Scenario(hangup_after_s=None))
                second = (await api_a.post("/v1/calls", json={"to": TO, "greeting": "Hi"})).json()
                await wait_state(api_a, second["id"], {"in_progress"})
                os.killpg(proc_a.pid, signal.SIGKILL)
                await proc_a.wait()
                reconciled = await wait_state(api_b, second["id"], {"ended"}, timeout=60)
            sim_calls = [c for c in sims.whatsapp.calls.values() if c.wa_id == TO[1:]]

    assert completed["end_reason"] == "completed", completed["end_detail"]
    assert completed["worker"] == "node-a"
    states = [e["data"]["to"] for e in completed["events"] if e["type"] == "state"]
    assert states == sorted(set(states), key=states.index)  # each transition exactly once
    assert "in_progress" in states and completed["transcript"]
    assert reconciled["end_reason"] == "failed"
    assert "instance node-a stopped" in reconciled["end_detail"]
    assert len(sim_calls) == 2  # nobody was called a second time
    assert all(c.ended for c in sim_calls)
