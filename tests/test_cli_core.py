"""The core CLI: plugins, doctor, config show/init; clean errors, no secrets in output."""

import json

import yaml
from click.testing import CliRunner
from whatsapp_call import hookimpl
from whatsapp_call.cli import cli
from whatsapp_call.models import CheckStatus, DoctorCheck


def _write(tmp_path, block):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"channels": {"whatsappcall": block}}))
    path.chmod(0o600)
    return str(path)


class FakeMeta:
    """A minimal in-process provider + backend, enough for doctor to find them."""

    @hookimpl
    def provider_names(self):
        return ["meta"]

    @hookimpl
    def voice_backend_names(self):
        return ["openai"]

    @hookimpl
    async def doctor_checks(self, settings):
        ok = settings.secret("meta_access_token") == "EAAG-good-token"
        return [
            DoctorCheck(
                "token",
                CheckStatus.OK if ok else CheckStatus.FAIL,
                "accepted" if ok else "rejected by the provider",
                None if ok else "Renew the token.",
            )
        ]


def test_config_init_writes_a_loadable_private_file(tmp_path):
    path = tmp_path / "new.yaml"
    result = CliRunner().invoke(cli, ["config", "init", "--provider", "wati", "--path", str(path)])
    assert result.exit_code == 0, result.output
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    text = path.read_text()
    assert "watiTenantId" in text and "REQUIRED" in text and "metaAccessToken" not in text
    again = CliRunner().invoke(cli, ["config", "init", "--provider", "wati", "--path", str(path)])
    assert again.exit_code == 2 and "already exists" in again.output
    show = CliRunner().invoke(cli, ["-c", str(path), "config", "show", "--json"])
    assert show.exit_code == 0, show.output
    assert json.loads(show.output)["provider"] == "wati"


def test_config_show_masks_secrets(tmp_path):
    path = _write(
        tmp_path,
        {
            "provider": "meta",
            "metaPhoneNumberId": "1",
            "metaAccessToken": "EAAG-good-token",
            "openaiApiKey": "sk-show-secret",
        },
    )
    result = CliRunner().invoke(cli, ["-c", path, "config", "show"])
    assert result.exit_code == 0
    assert "EAAG-good-token" not in result.output and "sk-show-secret" not in result.output
    assert "metaAccessToken: '**********'" in result.output


def test_doctor_ok_and_fail(tmp_path, register_plugin):
    register_plugin(FakeMeta(), name="fake-meta")
    good = _write(
        tmp_path,
        {
            "provider": "meta",
            "metaPhoneNumberId": "1",
            "metaAccessToken": "EAAG-good-token",
            "openaiApiKey": "sk-doctor-secret",
        },
    )
    result = CliRunner().invoke(cli, ["-c", good, "doctor"])
    assert result.exit_code == 0, result.output
    assert "token [fake-meta]: accepted" in result.output
    assert "media: libopus " in result.output  # the codec library the call audio uses
    bad = _write(
        tmp_path,
        {"provider": "meta", "metaPhoneNumberId": "1", "metaAccessToken": "EAAG-bad-token"},
    )
    result = CliRunner().invoke(cli, ["-c", bad, "doctor", "--json"])
    assert result.exit_code == 1
    checks = {c["name"]: c for c in json.loads(result.output)}
    assert checks["config"]["status"] == "fail" and "openaiApiKey" in checks["config"]["message"]
    assert checks["token"]["status"] == "fail" and checks["token"]["hint"] == "Renew the token."
    assert "EAAG-bad-token" not in result.output


def test_doctor_names_a_provider_with_no_plugin(tmp_path):
    path = _write(
        tmp_path,
        {
            "provider": "wati",
            "watiTenantId": "1",
            "watiApiToken": "tok-123",
            "openaiApiKey": "sk-1234",
        },
    )
    result = CliRunner().invoke(cli, ["-c", path, "doctor"])
    assert result.exit_code == 1
    assert "no installed plugin answers for provider 'wati'" in result.output
    assert "pip install 'whatsapp-call[wati]'" in result.output


def test_bad_config_is_a_clean_error_not_a_traceback(tmp_path):
    path = _write(tmp_path, {"provider": "meta", "voiceSped": 1.0})
    result = CliRunner().invoke(cli, ["-c", path, "config", "show"])
    assert result.exit_code == 2
    assert "did you mean 'voiceSpeed'" in result.output and "Traceback" not in result.output


def test_plugins_hook_filter(register_plugin):
    register_plugin(FakeMeta(), name="fake-meta")
    result = CliRunner().invoke(cli, ["plugins", "--hook", "doctor_checks", "--json"])
    assert [p["name"] for p in json.loads(result.output)] == ["fake-meta"]
    unknown = CliRunner().invoke(cli, ["plugins", "--hook", "nope"])
    assert unknown.exit_code == 2 and "no hook named 'nope'" in unknown.output


def test_register_commands_adds_plugin_commands(register_plugin):
    import click
    from whatsapp_call import cli as cli_module

    class Extra:
        @hookimpl
        def register_commands(self, cli):
            @cli.command(name="hello-test")
            def hello():
                click.echo("hello from a plugin")

    register_plugin(Extra(), name="t-commands")
    cli_module._register_plugin_commands()
    try:
        result = CliRunner().invoke(cli, ["hello-test"])
        assert result.exit_code == 0 and result.output == "hello from a plugin\n"
    finally:
        cli.commands.pop("hello-test", None)
