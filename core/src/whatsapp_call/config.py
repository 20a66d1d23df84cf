"""Configuration: one pydantic model of every option, read from the `channels.whatsappcall`
block of a YAML or JSON file (or OpenClaw's JSON5 `~/.openclaw/openclaw.json`), with
environment overrides `WHATSAPP_CALL_<KEY>` (e.g. `WHATSAPP_CALL_OPENAI_API_KEY`).

Option names are the camelCase ones users already know (`metaAccessToken`, `voiceGreeting`);
Python code reads the snake_case attributes (`settings.meta_access_token`). Secrets are
`SecretStr`: they print as '**********' and never appear in output or errors.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import json5
import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from .errors import ConfigError
from .redact import remember_secret

ENV_PREFIX = "WHATSAPP_CALL_"
CONFIG_ENV = "WHATSAPP_CALL_CONFIG"
CHANNEL_KEYS = ("whatsappcall", "whatsapp-call", "wa-call", "wacall")
DEFAULT_CONFIG_PATHS = (
    Path("whatsapp-call.yaml"),
    Path("whatsapp-call.json"),
    Path("~/.config/whatsapp-call/config.yaml"),
)
OPENCLAW_CONFIG = Path("~/.openclaw/openclaw.json")

# Required keys per built-in provider; a third-party provider declares its own with
# `settings_model()` required fields.
PROVIDER_REQUIRED = {
    "meta": ("metaPhoneNumberId", "metaAccessToken"),
    "wati": ("watiTenantId", "watiApiToken"),
}


class Settings(BaseModel):
    """Every core option. Field docs are shown by `whatsapp-call config init`."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        frozen=False,
    )

    enabled: bool = True
    provider: str | None = Field(None, description="WhatsApp provider: meta or wati.")

    # WATI
    wati_tenant_id: str | None = Field(None, description="WATI tenant id (from the API URL).")
    wati_api_token: SecretStr | None = Field(None, description="WATI API access token.")
    wati_base_url: str = Field("https://live-mt-server.wati.io", description="WATI API host.")
    wati_channel_phone_number: str | None = Field(
        None, description="WATI channel (business) number, when the tenant has several."
    )
    wati_webhook_secret: SecretStr | None = Field(
        None, description="HMAC secret for WATI webhook signatures (optional)."
    )

    # Meta
    meta_phone_number_id: str | None = Field(None, description="Graph id of the business number.")
    meta_access_token: SecretStr | None = Field(None, description="System-user access token.")
    meta_app_secret: SecretStr | None = Field(
        None, description="App secret: verifies X-Hub-Signature-256 on webhooks."
    )
    meta_verify_token: SecretStr | None = Field(
        None, description="Token you chose for the webhook GET handshake."
    )
    meta_graph_base_url: str = Field("https://graph.facebook.com", description="Graph API host.")
    meta_graph_version: str = Field("v23.0", description="Graph API version.")
    meta_permission_request_text: str = Field(
        "We would like to call you on WhatsApp.",
        description="Body of the call-permission request message.",
    )
    meta_permission_template: str | None = Field(
        None, description="Approved template name with a call_permission_request component."
    )
    meta_permission_template_language: str = Field("en", description="That template's language.")

    # Voice backend
    voice_backend: str = Field("openai", description="Voice backend plugin: openai, echo, ...")
    openai_api_key: SecretStr | None = Field(None, description="OpenAI API key.")
    openai_model: str = Field("gpt-realtime-2", description="OpenAI Realtime model.")
    openai_realtime_url: str = Field(
        "wss://api.openai.com/v1/realtime", description="OpenAI Realtime WebSocket URL."
    )
    voice: str = Field("marin", description="Voice of the AI (marin, cedar, alloy, ...).")
    voice_speed: float = Field(1.0, ge=0.25, le=1.5, description="Speaking speed, 0.25-1.5.")
    voice_language: str | None = Field(None, description="Language to speak, e.g. en, de, pt-BR.")
    voice_greeting: str | None = Field(None, description="What the AI says first.")
    voice_instructions: str | None = Field(None, description="System instructions for the AI.")

    # TURN
    twilio_account_sid: str | None = Field(None, description="Twilio Account SID (AC...).")
    twilio_auth_token: SecretStr | None = Field(None, description="Twilio auth token.")
    twilio_api_base_url: str = Field("https://api.twilio.com", description="Twilio API host.")
    twilio_ttl_seconds: int = Field(3600, ge=60, le=86400, description="TURN credential TTL.")
    stun_servers: list[str] = Field(
        default_factory=lambda: ["stun:stun.l.google.com:19302"],
        description="STUN servers for ICE (empty list for none).",
    )
    ice_host_addresses: list[str] | None = Field(
        None,
        description="Restrict ICE host candidates to these local IPs (e.g. [127.0.0.1]); "
        "default every interface except loopback.",
    )
    ice_gather_timeout_seconds: float = Field(
        5.0, gt=0, le=60, description="Longest wait for ICE candidates before the offer is sent."
    )
    dead_peer_seconds: float = Field(
        10.0, gt=0, le=60, description="End a call after this long without audio from the caller."
    )
    rtp_fast_path: bool = Field(
        True,
        description="Send and receive call RTP through our short path under aiortc (less CPU "
        "per call); false keeps aiortc's own path.",
    )

    # Service
    webhook_url: str | None = Field(None, description="Public HTTPS URL of the webhook.")
    service_url: str | None = Field(
        None, description="Remote mode: URL of a whatsapp-call service."
    )
    service_token: SecretStr | None = Field(None, description="Bearer token of the service API.")
    listen_host: str = Field("127.0.0.1", description="HTTP server address.")
    listen_port: int = Field(8787, ge=0, le=65535, description="HTTP server port (0 = any free).")
    state_dir: Path = Field(
        Path("~/.local/state/whatsapp-call"), description="Where the call store lives."
    )
    database_url: SecretStr | None = Field(
        None,
        description="Shared call store for several instances: postgresql://user:pass@host/db "
        "(default: SQLite in stateDir).",
    )
    redis_url: SecretStr | None = Field(
        None,
        description="Redis for several instances: call ownership and webhook-event routing.",
    )
    instance_id: str | None = Field(
        None, description="This instance's name among several (default: hostname and pid)."
    )
    store_retention_days: float | None = Field(
        None, gt=0, description="Delete records of calls that ended longer ago (unset: keep)."
    )
    ring_timeout_seconds: float = Field(60, gt=0, description="Give up when nobody answers.")
    max_duration_seconds: float = Field(1800, gt=0, description="Hang up after this long.")
    permission_wait_seconds: float = Field(
        86400, gt=0, description="How long a call waits for the user to grant permission."
    )
    max_concurrent_calls: int = Field(10, ge=1, description="Calls at once, this instance.")
    allowed_numbers: list[str] | None = Field(
        None, description="Agent tool: only these numbers/patterns may be called."
    )
    tool_calls_per_number_per_hour: int = Field(
        3, ge=1, description="Agent tool: at most this many calls to one number per hour."
    )
    tool_calls_per_hour: int = Field(
        30, ge=1, description="Agent tool: at most this many calls in all per hour."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    _plugin_values: dict[str, Any] = {}
    _plugin_cache: dict[type, BaseModel] = {}

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, data: Any) -> Any:
        """`key: ""` (as `config init` writes it) means "not set", not "set to nothing"."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (isinstance(v, str) and not v.strip())}
        return data

    @field_validator("provider")
    @classmethod
    def _provider_lower(cls, value: str | None) -> str | None:
        return value.strip().lower() if isinstance(value, str) and value.strip() else None

    @field_validator("meta_graph_version")
    @classmethod
    def _graph_version(cls, value: str) -> str:
        if not re.fullmatch(r"v\d+\.\d+", value):
            raise ValueError("must look like v23.0")
        return value

    @field_validator(
        "meta_graph_base_url",
        "wati_base_url",
        "twilio_api_base_url",
        "openai_realtime_url",
        "webhook_url",
        "service_url",
    )
    @classmethod
    def _url(cls, value: str | None, info: Any) -> str | None:
        if value is None:
            return None
        value = value.strip()
        schemes = (
            ("ws://", "wss://")
            if info.field_name == "openai_realtime_url"
            else ("http://", "https://")
        )
        if not value.startswith(schemes):
            raise ValueError(f"must be a URL starting with {' or '.join(schemes)}")
        return value.rstrip("/")

    @field_validator(
        "wati_tenant_id",
        "meta_phone_number_id",
        "twilio_account_sid",
        "voice_greeting",
        "voice_instructions",
        "voice_language",
        "wati_channel_phone_number",
    )
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value.strip() or None if isinstance(value, str) else value

    @field_validator("state_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return Path(os.path.expanduser(str(value)))

    @model_validator(mode="after")
    def _remember_secrets(self) -> Settings:
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                remember_secret(value.get_secret_value())
                if name.endswith("_url"):  # a driver's error may quote just the password
                    with contextlib.suppress(ValueError):
                        remember_secret(urlsplit(value.get_secret_value()).password)
        return self

    @property
    def remote(self) -> bool:
        """Remote (hosted) mode: drive a whatsapp-call service at `service_url`."""
        return self.service_url is not None

    def secret(self, name: str) -> str | None:
        """The plain value of a secret option (snake_case name), or None."""
        value = getattr(self, name)
        return value.get_secret_value() if value is not None else None

    def plugin_settings(self, model: type[BaseModel]) -> BaseModel:
        """A plugin's own options (declared by its `settings_model` hook), validated."""
        if model not in self._plugin_cache:
            names = _model_keys(model)
            values = {k: v for k, v in self._plugin_values.items() if k in names}
            try:
                self._plugin_cache[model] = model.model_validate(values)
            except ValidationError as exc:
                raise ConfigError(_describe(exc), "Fix the plugin option named above.") from None
        return self._plugin_cache[model]

    def missing_for_provider(self) -> list[str]:
        """Config keys the chosen provider needs but which are unset."""
        missing = []
        if not self.remote:
            if self.provider is None:
                missing.append("provider")
            for key in PROVIDER_REQUIRED.get(self.provider or "", ()):
                if getattr(self, _snake(key)) is None:
                    missing.append(key)
            if self.voice_backend == "openai" and self.openai_api_key is None:
                missing.append("openaiApiKey")
        return missing

    def require_complete(self) -> None:
        """Raise ConfigError naming every key the chosen provider/backend still needs."""
        missing = self.missing_for_provider()
        if missing:
            where = f"for provider {self.provider!r}" if self.provider else ""
            raise ConfigError(
                f"Missing configuration {where}: {', '.join(missing)}.".replace("  ", " "),
                "Add them under channels.whatsappcall in your config file "
                "(whatsapp-call config init writes an example), or set WHATSAPP_CALL_<KEY>.",
            )

    def public_dict(self) -> dict[str, Any]:
        """The effective config with camelCase keys, secrets masked: safe to print."""
        out = {}
        for name, value in self.model_dump(by_alias=True, mode="json").items():
            field = _snake(name)
            raw = getattr(self, field, None)
            out[name] = "**********" if isinstance(raw, SecretStr) else value
        out.update(
            {k: ("**********" if _looks_secret(k) else v) for k, v in self._plugin_values.items()}
        )
        return out


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def _looks_secret(key: str) -> bool:
    return bool(re.search(r"(token|secret|key|password)", key, re.I))


def _model_keys(model: type[BaseModel]) -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        keys.add(name)
        if field.alias:
            keys.add(field.alias)
        elif model.model_config.get("alias_generator"):
            keys.add(model.model_config["alias_generator"](name))
        if isinstance(field.validation_alias, AliasChoices):
            keys.update(a for a in field.validation_alias.choices if isinstance(a, str))
    return keys


CORE_KEYS = {to_camel(name) for name in Settings.model_fields}


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        lines.append(f"{loc}: {err['msg']}")
    return "Invalid configuration: " + "; ".join(lines) + "."


def read_config_file(path: Path) -> dict[str, Any]:
    """Read the `channels.whatsappcall` block (or a bare block) from YAML, JSON or JSON5."""
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise ConfigError(
            f"Config file {path} does not exist.",
            "Create one with: whatsapp-call config init --provider meta",
        )
    _warn_if_world_readable(path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif path.suffix == ".json5" or "openclaw" in path.name:
            data = json5.loads(text)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = json5.loads(text)
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(
            f"Config file {path} is not valid {path.suffix.lstrip('.').upper() or 'YAML/JSON'}: {exc}",
            "Fix the syntax at the position named above.",
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file {path} must hold a mapping at the top level.",
            "Start it with 'channels:' (see whatsapp-call config init).",
        )
    channels = data.get("channels")
    if isinstance(channels, dict):
        for key in CHANNEL_KEYS:
            if key in channels:
                block = channels[key]
                if not isinstance(block, dict):
                    raise ConfigError(
                        f"channels.{key} in {path} must be a mapping.",
                        "Put the options below it, indented.",
                    )
                return dict(block)
        raise ConfigError(
            f"Config file {path} has no channels.whatsappcall block.",
            "Add 'channels: {whatsappcall: {...}}' (see whatsapp-call config init).",
        )
    if set(data) & CORE_KEYS:  # a bare block is accepted too
        return dict(data)
    raise ConfigError(
        f"Config file {path} has no channels.whatsappcall block.",
        "Add 'channels: {whatsappcall: {...}}' (see whatsapp-call config init).",
    )


def _warn_if_world_readable(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.warn(
            f"{path} is readable by other users and may hold secrets; run: chmod 600 {path}",
            stacklevel=3,
        )


def find_config_file(explicit: str | Path | None = None) -> Path | None:
    if explicit:
        return Path(os.path.expanduser(str(explicit)))
    if os.environ.get(CONFIG_ENV):
        return Path(os.path.expanduser(os.environ[CONFIG_ENV]))
    for candidate in DEFAULT_CONFIG_PATHS:
        candidate = Path(os.path.expanduser(str(candidate)))
        if candidate.exists():
            return candidate
    return None


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """`WHATSAPP_CALL_OPENAI_API_KEY=…` → {"openaiApiKey": "…"}; list values as JSON or commas."""
    environ = dict(os.environ if environ is None else environ)
    out: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        value: Any = raw
        if "list" in str(field.annotation):
            value = (
                json.loads(raw)
                if raw.strip().startswith("[")
                else [part.strip() for part in raw.split(",") if part.strip()]
            )
        out[to_camel(name)] = value
    return out


def load_settings(
    path: str | Path | None = None,
    *,
    openclaw: str | Path | bool | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    plugin_models: list[type[BaseModel]] | None = None,
) -> Settings:
    """Build the effective settings: file < environment < explicit overrides.

    `openclaw` reads OpenClaw's config (True = the default path). `plugin_models` are the
    models from the `settings_model` hook; keys none of them nor core knows are an error.
    """
    raw: dict[str, Any] = {}
    if openclaw:
        raw.update(read_config_file(OPENCLAW_CONFIG if openclaw is True else Path(openclaw)))
    else:
        found = find_config_file(path)
        if found is not None:
            raw.update(read_config_file(found))
    raw.update(env_overrides(environ))
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return settings_from_dict(raw, plugin_models=plugin_models)


def settings_from_dict(
    raw: dict[str, Any], plugin_models: list[type[BaseModel]] | None = None
) -> Settings:
    # OpenClaw's names for the Meta webhook secrets.
    for old, new in (("appSecret", "metaAppSecret"), ("verifyToken", "metaVerifyToken")):
        if old in raw and new not in raw:
            raw[new] = raw.pop(old)
    plugin_keys: set[str] = set()
    for model in plugin_models or []:
        plugin_keys |= _model_keys(model)
    core_names = CORE_KEYS | set(Settings.model_fields)
    unknown = [k for k in raw if k not in core_names and k not in plugin_keys]
    if unknown:
        known = sorted(CORE_KEYS | plugin_keys)
        parts = []
        for key in unknown:
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            parts.append(f"{key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        raise ConfigError(
            f"Unknown configuration key{'s' if len(unknown) > 1 else ''}: {', '.join(parts)}.",
            "Fix the spelling; whatsapp-call config init lists every key.",
        )
    core = {k: v for k, v in raw.items() if k in core_names}
    try:
        settings = Settings.model_validate(core)
    except ValidationError as exc:
        raise ConfigError(_describe(exc), "Fix the values named above.") from None
    settings._plugin_values = {k: v for k, v in raw.items() if k not in core_names}
    settings._plugin_cache = {}
    if settings.provider is None and not settings.remote:
        settings.provider = _detect_provider(settings)
    for model in plugin_models or []:
        settings.plugin_settings(model)  # validate now, so errors surface at start-up
    return settings


def _detect_provider(settings: Settings) -> str | None:
    """OpenClaw auto-detects the provider from which credentials are present; so do we."""
    has_meta = settings.meta_phone_number_id is not None or settings.meta_access_token is not None
    has_wati = settings.wati_tenant_id is not None or settings.wati_api_token is not None
    if has_meta and not has_wati:
        return "meta"
    if has_wati and not has_meta:
        return "wati"
    return None
