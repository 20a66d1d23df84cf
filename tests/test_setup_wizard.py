"""`whatsapp-call setup`, driven non-interactively (CliRunner with `input=`): OpenClaw's
JSON5 config gets our block and MCP server entry with everything else kept (backup first,
mode 600), a broken file is reported and left alone, wrong answers are asked again, and the
plain YAML target refuses to overwrite without --force. Every result is loaded back with
`load_settings`."""

from __future__ import annotations

import copy
import stat
from pathlib import Path

import json5
import pytest
import yaml
from click.testing import CliRunner
from whatsapp_call import cli as cli_module
from whatsapp_call.agent import openclaw as oc
from whatsapp_call.commands import agent
from whatsapp_call.config import load_settings

# The real CLI group (its --openclaw and -c options), in a copy with our commands added, so
# the global group is left exactly as cli.py builds it.
cli = copy.copy(cli_module.cli)
cli.commands = dict(cli_module.cli.commands)
if "setup" not in cli.commands:
    agent.register(cli)

SID = "AC" + "a1" * 16
SECRETS = (
    "EAAG-secret-token-value",
    "appsecret-123456",
    "sk-test-openai-key-123",
    "twilio-token-123456",
)

OPENCLAW_TEXT = """// OpenClaw's own settings: must survive the wizard.
{
  agents: { defaults: { model: "anthropic/claude-sonnet-4" } },
  channels: {
    telegram: { enabled: true, botToken: "123:telegram-token", },
  },
  mcp: { servers: { docs: { command: "uvx", args: ["docs-mcp"] } } },
  gateway: { port: 18789 },
}
"""


def _answers(*lines: str) -> str:
    return "\n".join(lines) + "\n"


META_ANSWERS = _answers(
    "here",
    "meta",
    "+1 408 555",  # not a phone number ID: asked again
    "106540352242922",
    SECRETS[0],
    SECRETS[1],
    SECRETS[2],
    "y",
    "AC123",  # not an Account SID: asked again
    SID,
    SECRETS[3],
    "http://calls.example.com/webhooks/meta",  # not https: asked again
    "https://calls.example.com/webhooks/meta",
    "12345",  # not a number: asked again
    "+14085551234, +49*",
    "y",
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _invoke(args: list[str], answers: str = ""):
    return CliRunner().invoke(cli, args, input=answers)


def test_openclaw_setup_keeps_other_settings_and_loads(tmp_path):
    path = tmp_path / "openclaw.json"
    path.write_text(OPENCLAW_TEXT)
    result = _invoke(["setup", "--openclaw", str(path)], META_ANSWERS)
    assert result.exit_code == 0, result.output
    for secret in SECRETS:
        assert secret not in result.output
    assert "Error: the phone number ID is the numeric Graph id" in result.output
    assert "Error: an Account SID is AC followed by 32 hex digits" in result.output
    assert "Error: WhatsApp only delivers webhooks to https:// URLs" in result.output
    assert "Error: allowedNumbers entry '12345' is not a phone number" in result.output

    data = json5.loads(path.read_text())
    assert data["agents"] == {"defaults": {"model": "anthropic/claude-sonnet-4"}}
    assert data["channels"]["telegram"] == {"enabled": True, "botToken": "123:telegram-token"}
    assert data["gateway"] == {"port": 18789}
    assert data["mcp"]["servers"]["docs"] == {"command": "uvx", "args": ["docs-mcp"]}
    entry = data["mcp"]["servers"]["whatsapp-call"]
    assert entry["args"] == ["--openclaw", str(path), "mcp"]
    assert Path(entry["command"]).name == "whatsapp-call"
    assert entry["env"] == {"WHATSAPP_CALL_SERVICE_URL": "http://127.0.0.1:8787"}
    block = data["channels"]["whatsappcall"]
    assert block["provider"] == "meta"
    assert block["metaAccessToken"] == SECRETS[0]
    assert len(block["metaVerifyToken"]) >= 24
    assert _mode(path) == 0o600

    backups = list(tmp_path.glob("openclaw.json.*.bak"))
    assert len(backups) == 1
    assert backups[0].read_text() == OPENCLAW_TEXT
    assert _mode(backups[0]) == 0o600

    settings = load_settings(openclaw=path)
    assert settings.provider == "meta"
    assert settings.meta_phone_number_id == "106540352242922"
    assert settings.secret("openai_api_key") == SECRETS[2]
    assert settings.twilio_account_sid == SID
    assert settings.webhook_url == "https://calls.example.com/webhooks/meta"
    assert settings.allowed_numbers == ["+14085551234", "+49*"]
    assert settings.missing_for_provider() == []


def test_the_mcp_entry_args_parse_as_intended(tmp_path):
    """`--openclaw` takes an optional value: the path must be explicit, or "mcp" is eaten."""
    path = tmp_path / "openclaw.json"
    block = {"serviceUrl": "https://calls.example.com", "allowedNumbers": ["*"]}
    entry = oc.mcp_server_entry(path)
    oc.write_openclaw_config(path, oc.updated_config({}, block, entry))
    assert entry["args"][-1] == "mcp"
    # The same options in front of another command read the file named in the entry.
    shown = _invoke([*entry["args"][:-1], "config", "show", "--json"])
    assert shown.exit_code == 0, shown.output
    assert '"serviceUrl": "https://calls.example.com"' in shown.output
    swallowed = _invoke(["--openclaw", "mcp"])
    assert swallowed.exit_code != 0  # why the entry never uses the bare flag


def test_openclaw_setup_again_keeps_secrets_on_enter(tmp_path):
    path = tmp_path / "openclaw.json"
    assert _invoke(["setup", "--openclaw", str(path)], META_ANSWERS).exit_code == 0
    first = json5.loads(path.read_text())["channels"]["whatsappcall"]
    rerun = _answers(
        "",  # where: keep "here"
        "",  # provider: keep meta
        "",  # phone number ID: keep
        "",  # access token: keep
        "",  # app secret: keep
        "sk-new-openai-key-456",
        "n",  # no Twilio now
        "",  # webhook URL: keep
        "",  # allowed numbers: keep
        "n",  # the MCP server runs the calls itself
    )
    result = _invoke(["setup", "--openclaw", str(path)], rerun)
    assert result.exit_code == 0, result.output
    data = json5.loads(path.read_text())
    block = data["channels"]["whatsappcall"]
    assert block["metaAccessToken"] == first["metaAccessToken"]
    assert block["metaVerifyToken"] == first["metaVerifyToken"]
    assert block["openaiApiKey"] == "sk-new-openai-key-456"
    assert "twilioAccountSid" not in block and "twilioAuthToken" not in block
    assert block["allowedNumbers"] == ["+14085551234", "+49*"]
    assert "env" not in data["mcp"]["servers"]["whatsapp-call"]
    assert len(list(tmp_path.glob("openclaw.json.*.bak"))) == 1  # the first run made no backup
    assert load_settings(openclaw=path).secret("openai_api_key") == "sk-new-openai-key-456"


def test_broken_openclaw_file_is_reported_not_overwritten(tmp_path):
    path = tmp_path / "openclaw.json"
    broken = '{ agents: { defaults: { model: "x" }, \n channels: [ }'
    path.write_text(broken)
    result = _invoke(["setup", "--openclaw", str(path)], META_ANSWERS)
    assert result.exit_code == 2
    assert "is not valid JSON5" in result.output
    assert "nothing was written" in result.output
    assert "Where do calls run" not in result.output  # refused before any question
    assert path.read_text() == broken
    assert not list(tmp_path.glob("openclaw.json.*.bak"))


def test_wati_setup_with_alias_key_and_bearer_prefix(tmp_path):
    path = tmp_path / "openclaw.json"
    path.write_text('{channels: {wacall: {voiceGreeting: "Hi there"}}}')
    answers = _answers(
        "here",
        "wati",
        "tenant/123",  # bad tenant id: asked again
        "123456",
        "Bearer eyJwati-token-abc",
        "",  # WATI host: default
        "sk-test-openai-key-123",
        "n",
        "https://calls.example.com/webhooks/wati",
        "*",
        "n",
    )
    result = _invoke(["setup", "--openclaw", str(path)], answers)
    assert result.exit_code == 0, result.output
    assert "eyJwati-token-abc" not in result.output
    data = json5.loads(path.read_text())
    assert "whatsappcall" not in data["channels"]
    block = data["channels"]["wacall"]
    assert block["voiceGreeting"] == "Hi there"
    assert block["watiApiToken"] == "eyJwati-token-abc"
    assert block["watiBaseUrl"] == "https://live-mt-server.wati.io"
    settings = load_settings(openclaw=path)
    assert settings.provider == "wati" and settings.wati_tenant_id == "123456"
    assert settings.allowed_numbers == ["*"]


def test_remote_setup_into_a_new_openclaw_file(tmp_path):
    path = tmp_path / "sub" / "openclaw.json"
    answers = _answers(
        "remote",
        "calls.example.com",  # not a URL: asked again
        "https://calls.example.com",
        "service-token-0123456789",
        "+14085551234",
    )
    result = _invoke(["setup", "--openclaw", str(path)], answers)
    assert result.exit_code == 0, result.output
    settings = load_settings(openclaw=path)
    assert settings.remote and settings.service_url == "https://calls.example.com"
    assert settings.secret("service_token") == "service-token-0123456789"
    assert _mode(path) == 0o600
    assert not list(path.parent.glob("*.bak"))


def test_yaml_setup_writes_a_private_file_and_refuses_to_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    answers = _answers(
        "here",
        "meta",
        "106540352242922",
        SECRETS[0],
        "",  # no app secret
        SECRETS[2],
        "n",
        "https://calls.example.com/webhooks/meta",
        "+14085551234",
    )
    result = _invoke(["setup"], answers)
    assert result.exit_code == 0, result.output
    path = tmp_path / "whatsapp-call.yaml"
    assert _mode(path) == 0o600
    assert set(yaml.safe_load(path.read_text())) == {"channels"}
    settings = load_settings(path)
    assert settings.meta_app_secret is None
    assert settings.secret("meta_access_token") == SECRETS[0]

    before = path.read_text()
    refused = _invoke(["setup"], answers)
    assert refused.exit_code == 2
    assert "already exists" in refused.output and "--force" in refused.output
    assert path.read_text() == before

    forced = _invoke(["setup", "--force"], _answers("", "", "", "", "", "", "n", "", ""))
    assert forced.exit_code == 0, forced.output
    again = load_settings(path)
    assert again.secret("meta_access_token") == SECRETS[0]
    assert again.secret("meta_verify_token") == settings.secret("meta_verify_token")


@pytest.mark.parametrize(
    "url, ok",
    [
        ("https://calls.example.com/hook", True),
        ("http://127.0.0.1:8787/webhooks/meta", True),
        ("http://calls.example.com/hook", False),
        ("calls.example.com", False),
        ("ftp://calls.example.com", False),
    ],
)
def test_webhook_url_check(url, ok):
    from whatsapp_call.agent.setup_wizard import check_webhook_url

    if ok:
        assert check_webhook_url(url + "/") == url
    else:
        with pytest.raises(ValueError):
            check_webhook_url(url)


def test_openclaw_with_own_config_file_adds_only_the_mcp_entry(tmp_path):
    path = tmp_path / "openclaw.json"
    path.write_text(OPENCLAW_TEXT)
    own = tmp_path / "whatsapp-call.yaml"
    result = _invoke(["setup", "--openclaw", str(path), "--config-file", str(own)], META_ANSWERS)
    assert result.exit_code == 0, result.output
    data = json5.loads(path.read_text())
    assert set(data["channels"]) == {"telegram"}  # nothing of ours among OpenClaw's channels
    entry = data["mcp"]["servers"]["whatsapp-call"]
    assert entry["args"] == ["-c", str(own.resolve()), "mcp"]
    assert _mode(own) == 0o600 and _mode(path) == 0o600
    settings = load_settings(own)
    assert settings.provider == "meta" and settings.allowed_numbers == ["+14085551234", "+49*"]
    again = _invoke(["setup", "--openclaw", str(path), "--config-file", str(own)], META_ANSWERS)
    assert again.exit_code == 2 and "already exists" in again.output
    misuse = _invoke(["setup", "--config-file", str(own)])
    assert misuse.exit_code == 2 and "--config-file only goes with --openclaw" in misuse.output
