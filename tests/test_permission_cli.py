"""`whatsapp-call permission check|request`: human output that says what to do next, and
--json, against the WhatsApp simulator (served from its own thread, as the CLI runs its own
event loop) with the provider plugins registered in-process."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import whatsapp_call_meta
import whatsapp_call_wati
import yaml
from click.testing import CliRunner
from whatsapp_call.cli import cli
from whatsapp_call.commands.permission import permission
from whatsapp_call_sim.whatsapp import Scenario, SimConfig, WhatsAppSimulator

if "permission" not in cli.commands:  # the lead registers it in cli.py
    cli.add_command(permission)

PNID = "436666719526789"
TOKEN = "EAAG-cli-test-token-123456"
WATI_TOKEN = "wati-cli-test-token-123456"
NUMBER = "+14085551234"
WA_ID = "14085551234"


class SimThread:
    """The WhatsApp simulator on its own event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.sim = WhatsAppSimulator(
            SimConfig(
                phone_number_id=PNID,
                meta_access_token=TOKEN,
                wati_api_token=WATI_TOKEN,
                default_scenario=Scenario(media=False),
            )
        )
        self.url = ""

    def run(self, coro: Any, timeout: float = 15.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.thread.start()
        self.url = self.run(self.sim.start())

    def stop(self) -> None:
        try:
            self.run(self.sim.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()

    def set_scenario(self, wa_id: str, scenario: Scenario) -> None:
        async def apply() -> None:
            self.sim.set_scenario(wa_id, scenario)

        self.run(apply())

    def _permission(self, wa_id: str) -> str:
        return self.sim.network.user_state(wa_id).current_permission(time.time())

    def wait_until_granted(self, wa_id: str, timeout: float = 5.0) -> None:
        async def granted() -> None:
            async with asyncio.timeout(timeout):
                while self._permission(wa_id) == "no_permission":  # noqa: ASYNC110
                    await asyncio.sleep(0.02)

        self.run(granted(), timeout + 1)


@pytest.fixture
def sim(register_plugin) -> Iterator[SimThread]:
    register_plugin(whatsapp_call_meta, name="meta")
    register_plugin(whatsapp_call_wati, name="wati")
    thread = SimThread()
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()


def config(tmp_path, **block: Any) -> str:
    path = tmp_path / "whatsapp-call.yaml"
    path.write_text(yaml.safe_dump({"channels": {"whatsappcall": block}}))
    path.chmod(0o600)
    return str(path)


def meta_config(tmp_path, sim: SimThread, **extra: Any) -> str:
    block = {
        "provider": "meta",
        "metaPhoneNumberId": PNID,
        "metaAccessToken": TOKEN,
        "metaGraphBaseUrl": sim.url,
    }
    return config(tmp_path, **(block | extra))


def run(path: str, *args: str):
    return CliRunner().invoke(cli, ["-c", path, "permission", *args])


def test_check_then_request_then_check_again(tmp_path, sim):
    sim.set_scenario(
        WA_ID, Scenario(media=False, permission="grant_on_request", permission_reply_delay_s=0.05)
    )
    path = meta_config(tmp_path, sim)

    check = run(path, "check", NUMBER)
    assert check.exit_code == 0, check.output
    assert "calls not allowed" in check.output
    assert f"A request can be sent: whatsapp-call permission request {NUMBER}" in check.output

    request = run(path, "request", NUMBER)
    assert request.exit_code == 0, request.output
    assert "Permission request sent to +14085551234 (message id wamid." in request.output
    assert f"whatsapp-call permission check {NUMBER}" in request.output

    sim.wait_until_granted(WA_ID)
    after = run(path, "check", NUMBER)
    assert after.exit_code == 0, after.output
    assert "calls allowed temporarily (until 20" in after.output
    assert f"call now with: whatsapp-call call {NUMBER}" in after.output

    limited = run(path, "request", NUMBER)
    assert limited.exit_code == 0, limited.output
    assert "Not sent: the permission-request limit for +14085551234 is reached" in limited.output
    assert "try again at 20" in limited.output
    assert TOKEN not in check.output + request.output + after.output + limited.output


def test_json_output(tmp_path, sim):
    sim.set_scenario(WA_ID, Scenario(media=False, permission="granted", permanent=True))
    path = meta_config(tmp_path, sim)
    check = run(path, "check", "0014085551234", "--json")  # any number shape works
    assert check.exit_code == 0, check.output
    data = json.loads(check.output)
    assert data["to"] == NUMBER
    assert (data["status"], data["permanent"], data["can_call"]) == ("granted", True, True)
    assert data["expires_at"] is None and isinstance(data["detail"], str)
    request = run(path, "request", NUMBER, "--json")
    assert request.exit_code == 0, request.output
    assert json.loads(request.output)["outcome"] == "already_permanent"
    human = run(path, "request", NUMBER)
    assert "already allows calls permanently" in human.output


def test_works_the_same_through_wati(tmp_path, sim):
    sim.set_scenario(WA_ID, Scenario(media=False, permission="none"))
    path = config(
        tmp_path, provider="wati", watiTenantId="1000", watiApiToken=WATI_TOKEN, watiBaseUrl=sim.url
    )
    check = run(path, "check", NUMBER, "--json")
    assert check.exit_code == 0, check.output
    data = json.loads(check.output)
    assert (data["status"], data["can_request"]) == ("not_granted", True)
    request = run(path, "request", NUMBER)
    assert request.exit_code == 0 and "Permission request sent" in request.output


def test_errors_are_clean_and_secret_free(tmp_path, sim):
    bad_token = meta_config(tmp_path, sim, metaAccessToken="EAAG-wrong-token-999999")
    result = run(bad_token, "check", NUMBER)
    assert result.exit_code == 2
    assert result.output.startswith("Error: Meta: could not check call permission")
    assert "fix:" in result.output and "EAAG-wrong-token-999999" not in result.output

    bad_number = run(meta_config(tmp_path, sim), "check", "12")
    assert bad_number.exit_code == 2 and "international form" in bad_number.output

    no_plugin = run(config(tmp_path, provider="dialog360"), "check", NUMBER)
    assert no_plugin.exit_code == 2
    assert "No installed plugin answers for provider 'dialog360'" in no_plugin.output

    no_provider = run(config(tmp_path, voiceBackend="openai"), "check", NUMBER)
    assert no_provider.exit_code == 2 and "provider: meta or wati" in no_provider.output
