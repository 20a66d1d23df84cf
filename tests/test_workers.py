"""`serve --workers N`: a front process routes calls and webhook events to media workers;
a worker that dies has its calls reconciled and is restarted. Real processes, real calls
against the simulators, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from whatsapp_call_sim.runner import SimulatorSet
from whatsapp_call_sim.whatsapp import Scenario

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).parent / "whatsapp-call")


@contextlib.asynccontextmanager
async def cluster(tmp_path, workers=2, scenario=None, env=None):
    async with SimulatorSet(
        provider="meta", state_dir=tmp_path, scenario=scenario, turn=False
    ) as sims:
        log = (tmp_path / "serve.log").open("ab")
        env = {**os.environ, "WHATSAPP_CALL_PLUGINS": "meta,openai", **(env or {})}
        proc = await asyncio.create_subprocess_exec(
            CLI,
            "-c",
            str(sims.config_path),
            "serve",
            "--workers",
            str(workers),
            env=env,
            stdout=log,
            stderr=log,
        )
        headers = {"Authorization": f"Bearer {sims.options['serviceToken']}"}
        try:
            async with httpx.AsyncClient(
                base_url=sims.urls["service"], headers=headers, timeout=10
            ) as client:
                for _ in range(300):
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get("/healthz")).status_code == 200:
                            break
                    assert proc.returncode is None, (tmp_path / "serve.log").read_text()
                    await asyncio.sleep(0.1)
                yield sims, client, proc
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


def worker_pids(config: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
                if b"worker" in cmd and str(config).encode() in cmd:
                    pids.append(int(entry.name))
    return pids


def worker_pid(config: Path, worker_id: str) -> int:
    for pid in worker_pids(config):
        if f"--id\0{worker_id}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError(f"no process for worker {worker_id}")


async def test_calls_spread_over_workers_and_complete(tmp_path):
    async with cluster(tmp_path, scenario=Scenario(hangup_after_s=3)) as (sims, client, proc):
        first = (
            await client.post("/v1/calls", json={"to": "+14155550123", "greeting": "Hi"})
        ).json()
        second = (
            await client.post("/v1/calls", json={"to": "+14155550124", "greeting": "Hi"})
        ).json()
        done = [await wait_state(client, c["id"], {"ended"}) for c in (first, second)]
        assert len(worker_pids(sims.config_path)) == 2
    assert [c["end_reason"] for c in done] == ["completed", "completed"], done
    assert {c["worker"] for c in done} == {"w1", "w2"}  # least-loaded placement
    assert all(c["transcript"] for c in done)  # webhooks reached the owning workers
    assert proc.returncode == 0
    assert worker_pids(sims.config_path) == []  # SIGTERM stopped the workers too


async def test_a_dead_worker_has_its_calls_reconciled_and_is_restarted(tmp_path):
    async with cluster(tmp_path, workers=2) as (sims, client, proc):
        created = (await client.post("/v1/calls", json={"to": "+14155550123"})).json()
        call = await wait_state(client, created["id"], {"in_progress"})
        victim = worker_pid(sims.config_path, call["worker"])
        os.kill(victim, signal.SIGKILL)
        ended = await wait_state(client, created["id"], {"ended"})
        sim_call = next(iter(sims.whatsapp.calls.values()))
        rung_first = [c for c in sims.whatsapp.calls.values() if c.wa_id == "14155550123"]
        # The worker comes back, and takes calls again.
        for _ in range(150):
            if len(worker_pids(sims.config_path)) == 2:
                break
            await asyncio.sleep(0.2)
        again = (
            await client.post("/v1/calls", json={"to": "+14155550124", "greeting": "Hi"})
        ).json()
        in_progress = await wait_state(client, again["id"], {"in_progress", "ended"})
        await client.post(f"/v1/calls/{again['id']}/hangup")
    assert ended["end_reason"] == "failed"
    assert f"media worker {call['worker']} stopped" in ended["end_detail"]
    assert sim_call.ended and sim_call.terminated_by == "business"  # nobody left on a dead line
    assert in_progress["state"] == "in_progress"
    assert len(rung_first) == 1  # reconciling never calls the person again


async def test_the_probe_times_event_routing_from_front_to_worker(tmp_path):
    """With WHATSAPP_CALL_WORKER_PROBE set, each worker writes how long webhook events took
    from the front's pool to its call (bench/routing.py reads these)."""
    probe = tmp_path / "probe"
    env = {"WHATSAPP_CALL_WORKER_PROBE": str(probe)}
    async with cluster(tmp_path, scenario=Scenario(hangup_after_s=2), env=env) as (_, client, _):
        created = (await client.post("/v1/calls", json={"to": "+14155550123"})).json()
        call = await wait_state(client, created["id"], {"ended"})
    lines = (probe / f"{call['worker']}.jsonl").read_text().splitlines()
    routes = [json.loads(line) for line in lines if '"route"' in line]
    assert {"answer", "terminated"} <= {t for r in routes for t in r["events"]}, routes
    assert all(0 <= r["ms"] < 5000 for r in routes), routes


def scrape(text: str) -> dict[tuple[str, tuple], float]:
    """/metrics text as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def family_total(samples: dict[tuple[str, tuple], float], name: str) -> float:
    """A sample name's values added up over all its labels."""
    return sum(value for (sample, _), value in samples.items() if sample == name)


async def scrape_until(client, done, timeout=15.0) -> dict[tuple[str, tuple], float]:
    """Scrape /metrics until `done(samples)`: a call's histograms are observed as it is
    cleaned up, a moment after it is reported ended."""
    async with asyncio.timeout(timeout):
        while True:
            samples = scrape((await client.get("/metrics")).text)
            if done(samples):
                return samples
            await asyncio.sleep(0.2)


@pytest.mark.parametrize("workers", [1, 2])
async def test_front_metrics_total_the_workers_call_metrics(tmp_path, workers):
    """The front's /metrics reports every call metric summed over its workers (media counters,
    calls by state, created / ended, histograms), under the names one process uses
    (`--workers 1`), and how many calls each worker carries."""
    from whatsapp_call.server.metrics import MEDIA_COUNTERS

    async with cluster(tmp_path, workers=workers) as (_, client, _):
        ids = []
        for to in ("+14155550123", "+14155550124"):
            ids.append((await client.post("/v1/calls", json={"to": to, "greeting": "Hi"})).json())
        calls = [await wait_state(client, c["id"], {"in_progress"}) for c in ids]
        await asyncio.sleep(1.5)  # a second of media each way
        during = scrape((await client.get("/metrics")).text)
        for c in calls:  # the callers' default script: hello, a reply (a turn), goodbye
            await wait_state(client, c["id"], {"ended"})
        after = await scrape_until(
            client, lambda s: s.get(("whatsapp_call_setup_seconds_count", ()), 0) >= 2
        )
        records = [(await client.get(f"/v1/calls/{c['id']}")).json() for c in calls]
    for name in MEDIA_COUNTERS:
        assert (f"whatsapp_call_{name}_total", ()) in during, name
        # ended calls stay counted: totals never go down
        assert (
            after[(f"whatsapp_call_{name}_total", ())]
            >= during[(f"whatsapp_call_{name}_total", ())]
        )
    assert during[("whatsapp_call_media_calls", ())] == 2
    assert after[("whatsapp_call_media_calls", ())] == 0
    assert during[("whatsapp_call_playout_frames_total", ())] >= 2 * 50  # 2 calls, >= 1 s each
    assert during[("whatsapp_call_inbound_frames_total", ())] >= 2 * 25
    assert during[("whatsapp_call_calls", (("state", "in_progress"),))] == 2
    assert family_total(during, "whatsapp_call_calls") == 2
    assert family_total(after, "whatsapp_call_calls") == 0  # every state back at 0
    assert after[("whatsapp_call_calls_created_total", ())] == 2
    assert family_total(after, "whatsapp_call_calls_ended_total") == 2
    assert after[("whatsapp_call_setup_seconds_count", ())] == 2
    assert after[("whatsapp_call_setup_seconds_bucket", (("le", "+Inf"),))] == 2
    turns = [
        t
        for r in records
        for t in (r["metrics"].get("audio") or {}).get("turns", [])
        if t.get("response_latency_ms") is not None
    ]
    assert turns and after[("whatsapp_call_turn_latency_seconds_count", ())] == len(turns)
    if workers == 2:
        per_worker = {
            dict(labels)["worker"]: value
            for (name, labels), value in during.items()
            if name == "whatsapp_call_worker_calls"
        }
        assert per_worker == {"w1": 1, "w2": 1}, per_worker
        assert during[("whatsapp_call_worker_up", (("worker", "w1"),))] == 1
    else:
        assert not any(name.startswith("whatsapp_call_worker_") for name, _ in during)


def worker_text(calls: list[tuple[str, float | None]], live: int = 0, frames: int = 0) -> str:
    """The /metrics text of a worker process that ended `calls` ((end reason, set-up
    seconds)), carries `live` calls in progress and sent `frames` audio frames."""
    from whatsapp_call.server.metrics import Metrics

    metrics = Metrics()
    for reason, setup in calls:
        metrics.call_state_changed(None, "created")
        metrics.call_state_changed("created", "ended")
        metrics.call_ended(reason)
        if setup is not None:
            metrics.observe_setup_seconds(setup)
    for _ in range(live):
        metrics.call_state_changed(None, "created")
        metrics.call_state_changed("created", "in_progress")
    metrics.media_started("c", SimpleNamespace(frames=frames), None)
    return metrics.render().decode()


def test_the_front_totals_its_workers_and_keeps_a_restarted_ones_counts():
    """Counters and histograms are summed over the workers, a restarted worker's earlier
    counts kept (totals never go down); gauges are the workers' alone (the front runs no
    call)."""
    from whatsapp_call.server.metrics import Metrics

    front = Metrics()
    front.call_ended("failed")  # the front reconciled a call of a worker that died
    front.read_worker("w1", 0, worker_text([("completed", 0.3)], live=1, frames=100))
    front.read_worker("w2", 0, worker_text([("rejected", None), ("completed", 0.6)]))
    first = scrape(front.render().decode())
    assert first[("whatsapp_call_calls_created_total", ())] == 4
    assert first[("whatsapp_call_calls_ended_total", (("reason", "completed"),))] == 2
    assert first[("whatsapp_call_calls_ended_total", (("reason", "rejected"),))] == 1
    assert first[("whatsapp_call_calls_ended_total", (("reason", "failed"),))] == 1
    assert first[("whatsapp_call_calls", (("state", "in_progress"),))] == 1
    assert family_total(first, "whatsapp_call_calls") == 1
    assert first[("whatsapp_call_setup_seconds_count", ())] == 2
    assert first[("whatsapp_call_setup_seconds_sum", ())] == pytest.approx(0.9)
    assert first[("whatsapp_call_setup_seconds_bucket", (("le", "0.5"),))] == 1
    assert first[("whatsapp_call_setup_seconds_bucket", (("le", "+Inf"),))] == 2
    assert first[("whatsapp_call_playout_frames_total", ())] == 100
    assert first[("whatsapp_call_media_calls", ())] == 2
    assert first[("whatsapp_call_worker_calls", (("worker", "w1"),))] == 1
    # Every family one process has, under the same names and labels.
    alone = scrape(worker_text([("completed", 0.3)]))
    assert {k for k in alone if not k[0].endswith("_created")} <= set(first)

    # w1 restarts (counting from zero), w2 stops answering.
    front.read_worker("w1", 1, worker_text([("completed", 0.2)], frames=30))
    front.read_worker("w2", 0, None)
    then = scrape(front.render().decode())
    assert then[("whatsapp_call_calls_created_total", ())] == 5
    assert then[("whatsapp_call_calls_ended_total", (("reason", "completed"),))] == 3
    assert then[("whatsapp_call_setup_seconds_count", ())] == 3
    assert then[("whatsapp_call_setup_seconds_sum", ())] == pytest.approx(1.1)
    assert then[("whatsapp_call_playout_frames_total", ())] == 130
    assert family_total(then, "whatsapp_call_calls") == 0
    assert then[("whatsapp_call_media_calls", ())] == 1  # w1's new process; w2 unknown
    assert then[("whatsapp_call_worker_restarts_total", (("worker", "w1"),))] == 1
    assert then[("whatsapp_call_worker_up", (("worker", "w2"),))] == 0
