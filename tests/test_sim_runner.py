"""The simulator runner: `SimulatorSet` writes a config that loads and whose URLs answer with
its credentials, and `whatsapp-call sim` starts, prints its URLs and stops cleanly."""

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest
import websockets
import whatsapp_call_twilio as twilio_plugin
from whatsapp_call import plugins as plugin_mod
from whatsapp_call.config import load_settings
from whatsapp_call.errors import BadInputError
from whatsapp_call_sim.runner import SCENARIOS, SimulatorSet, build_scenario, describe
from whatsapp_call_sim.turn import TurnServer

CLI = str(Path(sys.executable).with_name("whatsapp-call"))


@pytest.fixture(autouse=True)
async def _fresh_twilio_plugin():
    twilio_plugin.clear_cache()
    yield
    twilio_plugin.clear_cache()
    await twilio_plugin.aclose()


async def _realtime_greets(url: str, api_key: str, model: str) -> dict:
    async with asyncio.timeout(10):
        async with websockets.connect(
            f"{url}?model={model}", additional_headers={"Authorization": f"Bearer {api_key}"}
        ) as ws:
            return json.loads(await ws.recv())


async def test_meta_config_loads_and_every_url_answers_with_its_credentials(
    tmp_path, register_plugin
):
    register_plugin(twilio_plugin, name="twilio")
    async with SimulatorSet(provider="meta", state_dir=tmp_path / "state") as sims:
        path = sims.config_path
        assert path.parent == tmp_path / "state"
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        settings = load_settings(path, environ={})
        settings.require_complete()
        assert settings.provider == "meta"
        assert settings.meta_graph_base_url == sims.urls["whatsapp"]
        assert settings.openai_realtime_url == sims.urls["realtime"]
        assert settings.twilio_api_base_url == sims.urls["twilio"]
        assert settings.listen_host == "127.0.0.1" and settings.listen_port == sims.listen_port
        assert settings.webhook_url == f"http://127.0.0.1:{sims.listen_port}/webhooks/meta"
        assert settings.ice_host_addresses == ["127.0.0.1"] and settings.stun_servers == []
        assert settings.state_dir == tmp_path / "state"
        assert settings.service_token is not None
        # The WhatsApp simulator delivers webhooks where the service will listen, signed
        # with the app secret the config holds.
        assert sims.whatsapp.config.meta_webhook_url == settings.webhook_url
        assert sims.whatsapp.config.meta_app_secret == settings.secret("meta_app_secret")

        async with httpx.AsyncClient(timeout=5) as client:
            graph = await client.get(
                f"{settings.meta_graph_base_url}/{settings.meta_graph_version}/"
                f"{settings.meta_phone_number_id}",
                headers={"Authorization": f"Bearer {settings.secret('meta_access_token')}"},
            )
            assert graph.status_code == 200, graph.text
            assert graph.json()["id"] == settings.meta_phone_number_id
            refused = await client.get(
                f"{settings.meta_graph_base_url}/{settings.meta_graph_version}/"
                f"{settings.meta_phone_number_id}",
                headers={"Authorization": "Bearer not-the-token"},
            )
            assert refused.status_code in (400, 401)

        created = await _realtime_greets(
            settings.openai_realtime_url, settings.secret("openai_api_key"), settings.openai_model
        )
        assert created["type"] == "session.created"

        results = await plugin_mod.call_all("fetch_ice_servers", settings=settings)
        servers = [s for _, ss in results for s in ss]
        assert servers, twilio_plugin.last_error(settings)
        assert all("127.0.0.1" in s.urls[0] for s in servers)
        if TurnServer.available():
            assert servers[0].urls[0] == sims.urls["turn"]
            assert sims.urls["turn"].endswith("transport=udp")
    # Stopped: nothing answers any more, and the state dir (given by us) is kept.
    assert sims.whatsapp is None and sims.twilio is None and sims.realtime is None
    assert (tmp_path / "state").is_dir()
    async with httpx.AsyncClient(timeout=2) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(sims.urls["whatsapp"] + "/_sim/calls")


async def test_wati_config_points_at_the_wati_routes(tmp_path):
    out = tmp_path / "elsewhere" / "wati.yaml"
    async with SimulatorSet(
        provider="wati", config_path=out, scenario="reject", turn=False
    ) as sims:
        assert sims.config_path == out and out.exists()
        assert sims.urls["turn"].startswith("stun:127.0.0.1:")
        assert "no TURN relay" in describe(sims)
        settings = load_settings(out, environ={})
        settings.require_complete()
        assert settings.provider == "wati"
        assert settings.meta_access_token is None
        assert settings.wati_base_url == sims.urls["whatsapp"]
        assert settings.webhook_url.endswith("/webhooks/wati")
        assert sims.whatsapp.config.wati_webhook_url == settings.webhook_url
        assert sims.whatsapp.config.wati_webhook_secret == settings.secret("wati_webhook_secret")
        assert sims.whatsapp.config.default_scenario.answer == "reject"
        async with httpx.AsyncClient(timeout=5) as client:
            permission = await client.get(
                f"{settings.wati_base_url}/{settings.wati_tenant_id}/api/v1/openapi/whatsapp/"
                "calls/permissions/14085551234",
                headers={"Authorization": f"Bearer {settings.secret('wati_api_token')}"},
            )
        assert permission.status_code == 200, permission.text
        state_dir = sims.state_dir
        assert state_dir.is_dir()
    assert not state_dir.exists()  # the temporary state dir is removed


def test_scenarios_presets_json_and_errors():
    for name, fields in SCENARIOS.items():
        scenario = build_scenario(name)
        for key, value in fields.items():
            assert getattr(scenario, key) == value, name
    assert build_scenario('{"answer": "no_answer", "hangup_after_s": 3}').hangup_after_s == 3
    with pytest.raises(BadInputError, match="Unknown scenario 'nope'"):
        build_scenario("nope")
    with pytest.raises(BadInputError, match="not valid JSON"):
        build_scenario("{bad json")
    with pytest.raises(BadInputError):
        build_scenario('{"answer": "maybe"}')
    with pytest.raises(BadInputError, match="provider"):
        SimulatorSet(provider="telegram")


async def _read_line(stream: asyncio.StreamReader, timeout: float) -> str:
    async with asyncio.timeout(timeout):
        line = await stream.readline()
    if not line:
        raise AssertionError("the sim command exited before printing its URLs")
    return line.decode()


async def _run_sim(*args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "WHATSAPP_CALL_PLUGINS": "sim"}
    return await asyncio.create_subprocess_exec(
        CLI,
        "sim",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def _stop(process: asyncio.subprocess.Process, sig: int) -> tuple[str, str]:
    process.send_signal(sig)
    try:
        async with asyncio.timeout(15):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return out.decode(), err.decode()


@pytest.mark.slow
async def test_sim_command_prints_json_urls_that_answer_and_stops_on_sigterm(tmp_path):
    config = tmp_path / "sim.yaml"
    process = await _run_sim(
        "--json", "--config-out", str(config), "--state-dir", str(tmp_path / "state")
    )
    try:
        ready = json.loads(await _read_line(process.stdout, 30))
        assert ready["config_path"] == str(config) and config.exists()
        async with httpx.AsyncClient(timeout=5) as client:
            calls = await client.get(ready["whatsapp"] + "/_sim/calls")
            assert calls.status_code == 200
            token = await client.post(
                ready["twilio"] + f"/2010-04-01/Accounts/AC{'0' * 32}/Tokens.json"
            )
            assert token.status_code == 401 and token.json()["code"] == 20003
        settings = load_settings(config, environ={})
        created = await _realtime_greets(
            ready["realtime"], settings.secret("openai_api_key"), settings.openai_model
        )
        assert created["type"] == "session.created"
    except BaseException:
        process.kill()
        await process.wait()
        raise
    out, err = await _stop(process, signal.SIGTERM)
    assert process.returncode == 0, err
    assert "Stopped." in out
    assert settings.secret("openai_api_key") not in out + err
    async with httpx.AsyncClient(timeout=2) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(ready["whatsapp"] + "/_sim/calls")


@pytest.mark.slow
async def test_sim_command_human_output_and_ctrl_c(tmp_path):
    config = tmp_path / "wati.yaml"
    process = await _run_sim(
        "--provider",
        "wati",
        "--scenario",
        "no_answer",
        "--config-out",
        str(config),
        "--state-dir",
        str(tmp_path / "state"),
        "--log-level",
        "warning",
    )
    lines = []
    try:
        while not lines or "serve" not in lines[-1]:
            lines.append(await _read_line(process.stdout, 30))
    except BaseException:
        process.kill()
        await process.wait()
        raise
    text = "".join(lines)
    assert "Simulators running for provider wati" in text
    assert f"whatsapp-call -c {config} call +" in text
    assert f"whatsapp-call -c {config} serve" in text
    assert "/webhooks/wati" in text
    out, err = await _stop(process, signal.SIGINT)
    assert process.returncode == 0, err
    assert "Stopped." in out and "Traceback" not in err


async def test_sim_command_refuses_a_bad_scenario_cleanly(tmp_path):
    process = await _run_sim("--scenario", "sing", "--state-dir", str(tmp_path / "s"))
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode == 2
    assert "Unknown scenario 'sing'" in err.decode() and "Traceback" not in err.decode()
    assert out == b""
