"""Process faults of `whatsapp-call serve`: kill -9 mid-call and restart (nobody is called a
second time, the store stays consistent), SIGTERM (graceful: the active call is terminated
at the provider, its record is final), and a stateDir that cannot be used (a clear error,
no traceback). The service runs as a real subprocess against the simulators.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from reliability_support import TO, sim_calls_to
from whatsapp_call_sim.runner import SimulatorSet
from whatsapp_call_sim.whatsapp import Scenario

pytestmark = pytest.mark.slow
pytest_plugins = ["reliability_plugin"]

CLI = str(Path(sys.executable).parent / "whatsapp-call")
ENV = {**os.environ, "WHATSAPP_CALL_PLUGINS": "meta,openai"}


class Service:
    """`whatsapp-call serve` as a subprocess, with its log and an API client."""

    def __init__(self, sims: SimulatorSet, log: Path):
        self.sims = sims
        self.log = log
        self.api = sims.urls["service"]
        self.headers = {"Authorization": f"Bearer {sims.options['serviceToken']}"}
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Service:
        out = self.log.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            CLI,
            "-c",
            str(self.sims.config_path),
            "serve",
            env=ENV,
            stdout=out,
            stderr=out,
            start_new_session=True,  # its own process group: kill -9 takes its workers too
        )
        async with httpx.AsyncClient(timeout=2) as client:
            for _ in range(200):
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.api + "/healthz")).status_code == 200:
                        return self
                if self.proc.returncode is not None:
                    raise AssertionError(self.log.read_text())
                await asyncio.sleep(0.1)
        self.proc.kill()
        raise AssertionError("service did not start: " + self.log.read_text())

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.api, headers=self.headers, timeout=10)

    async def call_until(self, state: str, to: str = TO) -> dict:
        async with self.client() as client:
            created = (await client.post("/v1/calls", json={"to": to})).json()
            for _ in range(200):
                call = (await client.get(f"/v1/calls/{created['id']}")).json()
                if call["state"] == state:
                    return call
                await asyncio.sleep(0.1)
        raise AssertionError(f"call never reached {state}: {call}")

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            if sig == signal.SIGKILL:  # a crash: the whole service, media workers too
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.send_signal(sig)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(
                f"serve did not stop within {timeout} s after signal {sig}"
            ) from None


def store_rows(state_dir: str) -> list[sqlite3.Row]:
    """Every call row, read straight from the SQLite file (after an integrity check)."""
    db = sqlite3.connect(Path(state_dir) / "calls.db")
    db.row_factory = sqlite3.Row
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return db.execute("SELECT * FROM calls").fetchall()
    finally:
        db.close()


async def test_kill_9_mid_call_then_restart_calls_nobody_twice(tmp_path, reliability):
    reliability.fault("process.kill_9")
    async with SimulatorSet(provider="meta", state_dir=tmp_path, turn=False) as sims:
        service = await Service(sims, tmp_path / "serve.log").start()
        try:
            first = await service.call_until("in_progress")
        finally:
            await service.stop(signal.SIGKILL)
        await service.start()
        try:
            await asyncio.sleep(2.0)  # time in which a buggy restart would redial
            rung_after_restart = len(sim_calls_to(sims))
            async with service.client() as client:
                reconciled = (await client.get(f"/v1/calls/{first['id']}")).json()
                listed = (await client.get("/v1/calls", params={"state": "ringing"})).json()
        finally:
            code = await service.stop()
        rows = store_rows(sims.options["stateDir"])
        old = sims.whatsapp.calls[first["provider_call_id"]]
    assert rung_after_restart == 1  # the restart did not place the call again
    assert reconciled["state"] == "ended" and reconciled["end_reason"] == "failed"
    assert reconciled["end_detail"].startswith("restarted")
    assert old.ended and old.terminated_by in ("business", "network", "user")
    assert listed["calls"] == [] and code == 0
    assert [r["state"] for r in rows] == ["ended"]
    assert all(r["end_reason"] for r in rows)
    reliability.survived("process.kill_9")


async def test_sigterm_ends_active_calls_politely_and_records_them(tmp_path, reliability):
    reliability.fault("process.sigterm")
    scenario = Scenario(hangup_after_s=60)
    async with SimulatorSet(
        provider="meta", state_dir=tmp_path, turn=False, scenario=scenario
    ) as sims:
        service = await Service(sims, tmp_path / "serve.log").start()
        try:
            call = await service.call_until("in_progress")
        finally:
            code = await service.stop(signal.SIGTERM)
        await sims.whatsapp.drain_webhooks(5)
        rows = {r["id"]: r for r in store_rows(sims.options["stateDir"])}
        sim_call = sims.whatsapp.calls[call["provider_call_id"]]
        rung = len(sim_calls_to(sims))
    row = rows[call["id"]]
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
    assert row["state"] == "ended" and row["end_reason"] == "completed"
    assert "shutting down" in row["end_detail"]
    assert sim_call.ended and sim_call.terminated_by == "business"
    assert rung == 1
    reliability.survived("process.sigterm")


def _config(tmp_path: Path, state_dir: str) -> Path:
    path = tmp_path / "cfg.yaml"
    block = {
        "provider": "meta",
        "metaPhoneNumberId": "123",
        "metaAccessToken": "EAAreliabilitytoken0001",
        "openaiApiKey": "sk-reliability-0001",
        "stateDir": state_dir,
        "listenPort": 0,
    }
    path.write_text(yaml.safe_dump({"channels": {"whatsappcall": block}}))
    path.chmod(0o600)
    return path


def _no_big_files() -> None:
    """In the child: writes beyond 4 KB fail with EFBIG, as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


@pytest.mark.parametrize("problem", ["not_a_directory", "disk_full"])
def test_unusable_state_dir_is_a_clear_error(problem, tmp_path, reliability):
    name = f"process.state_dir_{problem}"
    reliability.fault(name)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    state = str(blocker / "state") if problem == "not_a_directory" else str(tmp_path / "state")
    result = subprocess.run(
        [CLI, "-c", str(_config(tmp_path, state)), "serve"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=_no_big_files if problem == "disk_full" else None,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"The call store in {state} cannot be used" in result.stderr
    assert "fix:" in result.stderr and "stateDir" in result.stderr
    assert "EAAreliabilitytoken0001" not in result.stderr + result.stdout
    reliability.survived(name)
