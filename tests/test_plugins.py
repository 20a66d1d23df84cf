"""The plugin manager: registration, hook-name checking, async firstresult semantics,
entry-point discovery and the WHATSAPP_CALL_PLUGINS restriction, and hook tracing."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from whatsapp_call import hookimpl
from whatsapp_call import plugins as plugin_mod
from whatsapp_call.errors import PluginError
from whatsapp_call.models import Call, IceServer
from whatsapp_call.phone import parse_phone

CLI = str(Path(sys.executable).with_name("whatsapp-call"))


def _call():
    return Call(to=parse_phone("+14085551234"))


def test_tests_load_no_installed_plugins():
    plugin_mod.load_plugins()
    names = {name for name, _ in plugin_mod.pm.list_name_plugin()}
    assert not names & {"meta", "wati", "openai", "twilio", "sim"}


def test_misspelt_hook_is_refused(register_plugin):
    class Typo:
        @hookimpl
        def send_ofer(self, call, sdp, settings):
            return "x"

    with pytest.raises(PluginError, match="send_ofer"):
        register_plugin(Typo(), name="typo")
    plugin_mod.pm.unregister(name="typo")


async def test_async_firstresult_skips_plugins_answering_none(register_plugin, make_settings):
    class Meta:
        @hookimpl
        async def send_offer(self, call, sdp, settings):
            return "wacid.meta" if settings.provider == "meta" else None

    class Wati:
        @hookimpl
        async def send_offer(self, call, sdp, settings):
            return "wacid.wati" if settings.provider == "wati" else None

    register_plugin(Meta(), name="t-meta")
    register_plugin(Wati(), name="t-wati")
    call = _call()
    assert (
        await plugin_mod.call_first(
            "send_offer", call=call, sdp="v=0", settings=make_settings(provider="meta")
        )
        == "wacid.meta"
    )
    assert (
        await plugin_mod.call_first(
            "send_offer", call=call, sdp="v=0", settings=make_settings(provider="wati")
        )
        == "wacid.wati"
    )
    assert (
        await plugin_mod.call_first(
            "send_offer", call=call, sdp="v=0", settings=make_settings(provider="other")
        )
        is None
    )


async def test_fetch_ice_servers_merges_every_plugin(register_plugin, make_settings):
    class Stun:
        @hookimpl
        def fetch_ice_servers(self, settings):
            return [IceServer(urls=("stun:127.0.0.1:3478",), priority=50)]

    class Turn:
        @hookimpl
        async def fetch_ice_servers(self, settings):
            return [
                IceServer(
                    urls=("turn:127.0.0.1:3478?transport=udp",),
                    username="u",
                    credential="c",
                    priority=10,
                )
            ]

    register_plugin(Stun(), name="t-stun")
    register_plugin(Turn(), name="t-turn")
    results = await plugin_mod.call_all("fetch_ice_servers", settings=make_settings())
    merged = sorted((s for _, servers in results for s in servers), key=lambda s: s.priority)
    assert [s.urls[0] for s in merged] == [
        "turn:127.0.0.1:3478?transport=udp",
        "stun:127.0.0.1:3478",
    ]
    assert {name for name, _ in results} == {"t-stun", "t-turn"}


def test_sync_hook_must_not_be_async(register_plugin, make_settings):
    class AsyncParser:
        @hookimpl
        async def parse_webhook(self, provider, request, settings):
            return None

    register_plugin(AsyncParser(), name="t-async-parser")
    with pytest.raises(PluginError, match="must be synchronous"):
        plugin_mod.call_first_sync(
            "parse_webhook", provider="meta", request=None, settings=make_settings()
        )


def test_plugin_info_lists_hooks(register_plugin):
    class Backend:
        @hookimpl
        def voice_backend_names(self):
            return ["echo"]

        @hookimpl
        def voice_tools(self, call, settings):
            return []

    register_plugin(Backend(), name="t-backend")
    info = {p["name"]: p for p in plugin_mod.plugin_info()}
    assert info["t-backend"]["hooks"] == ["voice_backend_names", "voice_tools"]


async def test_tracing_logs_calls_and_results_without_secrets(
    register_plugin, make_settings, caplog
):
    class Provider:
        @hookimpl
        async def check_permission(self, call, settings):
            return {"status": "granted", "access_token": settings.secret("meta_access_token")}

    register_plugin(Provider(), name="t-traced")
    settings = make_settings(provider="meta", metaAccessToken="EAAG-very-secret-token")
    plugin_mod.enable_tracing()
    try:
        with caplog.at_level(logging.DEBUG, logger="whatsapp_call.hooks"):
            await plugin_mod.call_first("check_permission", call=_call(), settings=settings)
    finally:
        plugin_mod.disable_tracing()
    text = caplog.text
    assert "call check_permission(" in text and "check_permission -> t-traced" in text
    assert "EAAG-very-secret-token" not in text


def _run_cli(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHATSAPP_CALL_")}
    env.update(env_extra or {})
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=60)


def test_entry_points_discovered_and_restricted():
    everything = json.loads(_run_cli("plugins", "--json").stdout)
    names = {p["name"] for p in everything}
    assert {"meta", "wati", "openai", "twilio"} <= names
    assert all(p["version"] for p in everything if p["name"] in {"meta", "wati"})
    only = json.loads(
        _run_cli("plugins", "--json", env_extra={"WHATSAPP_CALL_PLUGINS": "meta"}).stdout
    )
    assert [p["name"] for p in only] == ["meta"]
    none = _run_cli("plugins", env_extra={"WHATSAPP_CALL_PLUGINS": ""})
    assert "No plugins loaded" in none.stdout


def test_restriction_to_missing_plugin_is_a_clear_error():
    result = _run_cli("plugins", env_extra={"WHATSAPP_CALL_PLUGINS": "meta,nosuch"})
    assert result.returncode != 0
    assert "nosuch" in result.stderr and "Installed plugins:" in result.stderr


def test_trace_env_var_switches_tracing_on(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "channels:\n  whatsappcall:\n    provider: meta\n    metaAccessToken: EAAG-trace-secret\n"
    )
    config.chmod(0o600)
    result = _run_cli("-c", str(config), "doctor", env_extra={"WHATSAPP_CALL_TRACE_HOOKS": "1"})
    assert "whatsapp_call.hooks: call doctor_checks(" in result.stderr
    assert "EAAG-trace-secret" not in result.stderr + result.stdout
