"""A client-only install (`pip install whatsapp-call`, no extras) is enough for remote mode.

In a fresh venv with just `./core`: none of the media/server stack (aiortc, av, starlette,
uvicorn, numpy) nor the MCP SDK is installed, and `whatsapp-call -c remote.yaml call …`
still places a whole call through a `whatsapp-call serve` subprocess backed by the
simulators, with live progress and the completed record.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_hosted_e2e import GREETING, HELLO, TO, run_cli, serve_subprocess, write_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
UV = ROOT / ".tools" / "bin" / "uv"
SERVER_ONLY = ["aiortc", "av", "starlette", "uvicorn", "numpy", "soxr", "mcp"]


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A venv holding whatsapp-call without extras (the uv cache keeps this to seconds)."""
    if not UV.exists():
        pytest.fail(f"{UV} is missing: the workspace's uv is needed to build the client venv")
    venv = tmp_path_factory.mktemp("client") / "venv"
    for command in (
        [str(UV), "venv", "--quiet", "--python", sys.executable, str(venv)],
        [str(UV), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), "./core"],
    ):
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    return venv


def test_client_venv_has_no_server_stack(client_venv):
    python = str(client_venv / "bin" / "python")
    probe = (
        "import importlib.util, json, sys\n"
        f"names = {SERVER_ONLY!r}\n"
        "found = [n for n in names if importlib.util.find_spec(n) is not None]\n"
        "import whatsapp_call.cli, whatsapp_call.client, whatsapp_call.commands.calling\n"
        "loaded = [n for n in names if n in sys.modules]\n"
        "print(json.dumps({'found': found, 'loaded': loaded}))\n"
    )
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"found": [], "loaded": []}
    listed = subprocess.run(
        [str(UV), "pip", "list", "--python", python, "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "whatsapp-call" in names
    assert not names & {*SERVER_ONLY, "whatsapp-call-meta", "whatsapp-call-openai"}


async def test_client_only_install_places_a_remote_call(client_venv, tmp_path):
    cli = str(client_venv / "bin" / "whatsapp-call")
    async with serve_subprocess(tmp_path) as (sims, url, token):
        remote = write_config(tmp_path / "remote.yaml", serviceUrl=url, serviceToken=token)
        code, out, err = await run_cli(
            cli, "-c", str(remote), "call", TO, "--greeting", GREETING, "--json"
        )
        assert code == 0, err
        record = json.loads(out)
        assert record["end_reason"] == "completed"
        assert f"User: {HELLO}" in err and "-> Call ended: completed" in err
        code, out, err = await run_cli(cli, "-c", str(remote), "calls")
        assert code == 0, err
        assert f"{record['id']} to {TO}: completed" in out
        code, out, err = await run_cli(cli, "-c", str(remote), "permission", "check", TO)
        assert code == 0, err
        assert out.startswith(f"{TO}: calls allowed")
        assert len(sims.whatsapp.calls) == 1
