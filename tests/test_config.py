"""Configuration: every key, files (YAML/JSON/OpenClaw JSON5), env overrides, errors, secrets."""

import json
import warnings

import pytest
from pydantic.alias_generators import to_camel
from whatsapp_call.config import (
    CORE_KEYS,
    Settings,
    env_overrides,
    load_settings,
    read_config_file,
    settings_from_dict,
)
from whatsapp_call.errors import ConfigError

META = {
    "provider": "meta",
    "metaPhoneNumberId": "100200300",
    "metaAccessToken": "EAAG-secret-token",
    "openaiApiKey": "sk-test-secret-key",
}

# One valid, non-default value for every option: proves each key is read and typed.
EVERY_KEY = {
    "enabled": False,
    "provider": "meta",
    "watiTenantId": "100100",
    "watiApiToken": "wati-token-value",
    "watiBaseUrl": "https://wati.example",
    "watiChannelPhoneNumber": "13175551399",
    "watiWebhookSecret": "wati-hook-secret",
    "metaPhoneNumberId": "100200300",
    "metaAccessToken": "EAAG-secret-token",
    "metaAppSecret": "app-secret-value",
    "metaVerifyToken": "verify-token-value",
    "metaGraphBaseUrl": "https://graph.example",
    "metaGraphVersion": "v24.0",
    "metaPermissionRequestText": "May we call?",
    "metaPermissionTemplate": "call_perm",
    "metaPermissionTemplateLanguage": "de",
    "voiceBackend": "echo",
    "openaiApiKey": "sk-test-secret-key",
    "openaiModel": "gpt-realtime-2.1",
    "openaiRealtimeUrl": "ws://127.0.0.1:9/v1/realtime",
    "voice": "cedar",
    "voiceSpeed": 1.2,
    "voiceLanguage": "de",
    "voiceGreeting": "Hallo",
    "voiceInstructions": "Be brief.",
    "twilioAccountSid": "AC" + "0" * 32,
    "twilioAuthToken": "twilio-token-value",
    "twilioApiBaseUrl": "http://127.0.0.1:9",
    "twilioTtlSeconds": 600,
    "stunServers": [],
    "iceHostAddresses": ["127.0.0.1"],
    "iceGatherTimeoutSeconds": 2,
    "deadPeerSeconds": 7,
    "rtpFastPath": False,
    "webhookUrl": "https://example.com/webhooks/meta",
    "serviceUrl": "http://127.0.0.1:1",
    "serviceToken": "service-token-value",
    "listenHost": "0.0.0.0",
    "listenPort": 9000,
    "stateDir": "/tmp/wa-state",
    "storeRetentionDays": 90,
    "databaseUrl": "postgresql://wa:db-password-value@127.0.0.1:5432/wa",
    "redisUrl": "redis://:redis-password-value@127.0.0.1:6379/0",
    "instanceId": "node-a",
    "ringTimeoutSeconds": 30,
    "maxDurationSeconds": 60,
    "permissionWaitSeconds": 120,
    "maxConcurrentCalls": 3,
    "allowedNumbers": ["+4930*"],
    "toolCallsPerNumberPerHour": 2,
    "toolCallsPerHour": 9,
    "logLevel": "debug",
}
SECRETS = [
    "wati-token-value",
    "wati-hook-secret",
    "EAAG-secret-token",
    "app-secret-value",
    "verify-token-value",
    "sk-test-secret-key",
    "twilio-token-value",
    "service-token-value",
    "db-password-value",
    "redis-password-value",
]


def test_every_key_is_covered_by_this_test():
    assert set(EVERY_KEY) == CORE_KEYS


def test_every_key_is_read():
    s = settings_from_dict(dict(EVERY_KEY))
    for key, value in EVERY_KEY.items():
        got = getattr(s, _snake(key))
        if hasattr(got, "get_secret_value"):
            got = got.get_secret_value()
        if key == "stateDir":
            got = str(got)
        assert got == value, key


def _snake(camel):
    return next(name for name in Settings.model_fields if to_camel(name) == camel)


def test_secrets_never_in_repr_str_or_public_dict():
    s = settings_from_dict(dict(EVERY_KEY))
    rendered = repr(s) + str(s) + json.dumps(s.public_dict(), default=str)
    for secret in SECRETS:
        assert secret not in rendered
    assert s.public_dict()["metaAccessToken"] == "**********"


def test_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "channels:\n  whatsappcall:\n    provider: meta\n    metaPhoneNumberId: '1'\n"
        "    metaAccessToken: t0ken-value\n    openaiApiKey: sk-x1234\n"
    )
    path.chmod(0o600)
    s = load_settings(path, environ={})
    assert s.provider == "meta" and s.meta_phone_number_id == "1"
    assert s.missing_for_provider() == []


def test_json_file_and_bare_block(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"channels": {"whatsappcall": META}}))
    path.chmod(0o600)
    assert load_settings(path, environ={}).meta_phone_number_id == "100200300"
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(META))
    bare.chmod(0o600)
    assert load_settings(bare, environ={}).provider == "meta"


def test_openclaw_json5_with_aliases(tmp_path):
    path = tmp_path / "openclaw.json"
    path.write_text("""{
      // OpenClaw's config is JSON5: comments, trailing commas, unquoted keys
      gateway: {port: 18789},
      channels: {
        whatsappcall: {provider: 'wati', watiTenantId: '100100', watiApiToken: 'Bearer abc.def',
                       openaiApiKey: 'sk-zzzz', appSecret: 'shh-secret', verifyToken: 'vt-value',},
      },
    }""")
    path.chmod(0o600)
    s = load_settings(openclaw=path, environ={})
    assert s.provider == "wati" and s.wati_tenant_id == "100100"
    assert s.secret("meta_app_secret") == "shh-secret"  # OpenClaw's appSecret name
    assert s.secret("meta_verify_token") == "vt-value"


def test_env_overrides_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("channels:\n  whatsappcall:\n    provider: meta\n    voice: alloy\n")
    path.chmod(0o600)
    env = {
        "WHATSAPP_CALL_VOICE": "cedar",
        "WHATSAPP_CALL_VOICE_SPEED": "1.25",
        "WHATSAPP_CALL_STUN_SERVERS": "stun:a:1, stun:b:2",
        "WHATSAPP_CALL_ICE_HOST_ADDRESSES": '["127.0.0.1"]',
    }
    s = load_settings(path, environ=env)
    assert s.voice == "cedar" and s.voice_speed == 1.25
    assert s.stun_servers == ["stun:a:1", "stun:b:2"] and s.ice_host_addresses == ["127.0.0.1"]
    assert env_overrides({"UNRELATED": "x"}) == {}


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError) as exc:
        settings_from_dict({"metaAcessToken": "x", "voiceGretting": "hi"})
    text = str(exc.value)
    assert "'metaAcessToken' (did you mean 'metaAccessToken'?)" in text
    assert "'voiceGretting' (did you mean 'voiceGreeting'?)" in text
    assert "Unknown configuration keys" in text


def test_unknown_key_error_names_the_key():
    with pytest.raises(ConfigError, match="'bogus'"):
        settings_from_dict({"bogus": 1})


@pytest.mark.parametrize(
    "key,value,expect",
    [
        ("voiceSpeed", "fast", "voiceSpeed"),
        ("voiceSpeed", 3, "voiceSpeed"),
        ("listenPort", 70000, "listenPort"),
        ("listenPort", "http", "listenPort"),
        ("maxConcurrentCalls", 0, "maxConcurrentCalls"),
        ("metaGraphVersion", "23", "metaGraphVersion"),
        ("metaGraphBaseUrl", "graph.facebook.com", "metaGraphBaseUrl"),
        ("openaiRealtimeUrl", "https://api.openai.com", "openaiRealtimeUrl"),
        ("enabled", "perhaps", "enabled"),
        ("stunServers", "notalist", "stunServers"),
        ("ringTimeoutSeconds", -1, "ringTimeoutSeconds"),
        ("logLevel", "loud", "logLevel"),
        ("twilioTtlSeconds", 10, "twilioTtlSeconds"),
    ],
)
def test_wrong_types_name_the_key(key, value, expect):
    with pytest.raises(ConfigError, match=expect):
        settings_from_dict({key: value})


def test_blank_values_count_as_unset():
    s = settings_from_dict(
        {"provider": "meta", "metaAccessToken": "", "metaPhoneNumberId": "  ", "openaiApiKey": ""}
    )
    assert s.missing_for_provider() == ["metaPhoneNumberId", "metaAccessToken", "openaiApiKey"]


def test_required_keys_per_provider_named_all_at_once():
    with pytest.raises(ConfigError) as exc:
        settings_from_dict({"provider": "wati"}).require_complete()
    assert "watiTenantId, watiApiToken, openaiApiKey" in str(exc.value)
    with pytest.raises(ConfigError, match="metaPhoneNumberId, metaAccessToken"):
        settings_from_dict({"provider": "meta", "openaiApiKey": "sk-1"}).require_complete()
    settings_from_dict(dict(META)).require_complete()


def test_remote_mode_needs_no_provider_or_openai_key():
    s = settings_from_dict({"serviceUrl": "https://calls.example.com", "serviceToken": "tok-12345"})
    assert s.remote and s.missing_for_provider() == []


def test_provider_detected_from_credentials():
    assert settings_from_dict({"watiTenantId": "1", "watiApiToken": "t"}).provider == "wati"
    assert settings_from_dict({"metaPhoneNumberId": "1"}).provider == "meta"
    assert settings_from_dict({"metaPhoneNumberId": "1", "watiTenantId": "1"}).provider is None


def test_echo_backend_needs_no_openai_key():
    s = settings_from_dict(
        {
            "provider": "meta",
            "metaPhoneNumberId": "1",
            "metaAccessToken": "tok1",
            "voiceBackend": "echo",
        }
    )
    assert s.missing_for_provider() == []


def test_malformed_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("channels: [unclosed\n")
    bad.chmod(0o600)
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_config_file(bad)
    noblock = tmp_path / "noblock.yaml"
    noblock.write_text("channels:\n  telegram: {}\n")
    noblock.chmod(0o600)
    with pytest.raises(ConfigError, match="no channels.whatsappcall block"):
        read_config_file(noblock)
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.json"
    scalar.write_text("42")
    scalar.chmod(0o600)
    with pytest.raises(ConfigError, match="mapping"):
        read_config_file(scalar)


def test_world_readable_config_warns(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("channels:\n  whatsappcall: {provider: meta}\n")
    path.chmod(0o644)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_config_file(path)
    assert any("chmod 600" in str(w.message) for w in caught)


def test_plugin_settings_models(register_plugin, make_settings):
    from pydantic import BaseModel, ConfigDict
    from pydantic.alias_generators import to_camel as camel
    from whatsapp_call import hookimpl

    class EchoSettings(BaseModel):
        model_config = ConfigDict(alias_generator=camel, populate_by_name=True)
        echo_delay_ms: int = 200

    class Plugin:
        @hookimpl
        def settings_model(self):
            return EchoSettings

    register_plugin(Plugin(), name="echo-settings")
    s = make_settings(provider="meta", echoDelayMs=50)
    assert s.plugin_settings(EchoSettings).echo_delay_ms == 50
    with pytest.raises(ConfigError, match="echoDelayMs"):
        make_settings(echoDelayMs="soon")
    with pytest.raises(ConfigError, match="did you mean 'echoDelayMs'"):
        make_settings(echoDelayMss=1)


def test_passwords_inside_database_and_redis_urls_are_scrubbed():
    from whatsapp_call.redact import scrub

    settings_from_dict(dict(EVERY_KEY))
    assert "db-password-value" not in scrub("connect failed: password db-password-value rejected")
    assert "redis-password-value" not in scrub("AUTH redis-password-value failed")
