"""`whatsapp-call setup`: interactive onboarding.

Asks for what a working install needs (where calls run, the WhatsApp provider and its
credentials, the OpenAI key, optional Twilio TURN, the public webhook URL, the numbers the
agent may call), checks each answer as it is typed and asks again with the reason when it is
wrong, then writes either OpenClaw's config (`--openclaw`: our channel block and an MCP server
entry, everything else kept, a backup first) or our own `whatsapp-call.yaml`. Both are mode
600. Secrets are typed hidden and never echoed.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import yaml

from ..config import CORE_KEYS, read_config_file, settings_from_dict
from ..errors import ConfigError, WhatsAppCallError
from . import openclaw as oc
from .tool import NumberPolicy

DEFAULT_WATI_BASE_URL = "https://live-mt-server.wati.io"
DEFAULT_LISTEN_PORT = 8787


# -- checks: each returns the cleaned value or raises ValueError with the reason --------------


def check_phone_number_id(value: str) -> str:
    if not re.fullmatch(r"\d{6,20}", value):
        raise ValueError(
            "the phone number ID is the numeric Graph id of the business number (digits "
            "only, e.g. 106540352242922; see WhatsApp Manager > API setup), not the number."
        )
    return value


def check_tenant_id(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise ValueError(
            "the tenant id is the part of your WATI API URL after the host, e.g. 123456 in "
            "https://live-mt-server.wati.io/123456 (letters, digits, - and _ only)."
        )
    return value


def check_secret(value: str) -> str:
    if any(c.isspace() for c in value):
        raise ValueError("it contains spaces; paste the value alone.")
    return value


def check_bearer_token(value: str) -> str:
    """WATI shows its token as "Bearer eyJ…"; people paste either form."""
    return check_secret(re.sub(r"(?i)^bearer\s+", "", value))


def check_twilio_sid(value: str) -> str:
    if not re.fullmatch(r"AC[0-9a-fA-F]{32}", value):
        raise ValueError("an Account SID is AC followed by 32 hex digits (Twilio Console).")
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(value: str, *, https_only: bool = False) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("write a full URL, e.g. https://calls.example.com/webhooks/meta.")
    if https_only and parts.scheme != "https" and not _is_loopback(parts.hostname):
        raise ValueError(
            "WhatsApp only delivers webhooks to https:// URLs (http is accepted for "
            "localhost tests only)."
        )
    return value.rstrip("/")


def check_webhook_url(value: str) -> str:
    return check_url(value, https_only=True)


def check_allowed_numbers(value: str) -> list[str]:
    entries = [part.strip() for part in value.split(",") if part.strip()]
    if not entries:
        raise ValueError("give at least one number or pattern.")
    try:
        NumberPolicy(entries)
    except ConfigError as exc:
        raise ValueError(exc.message) from None
    return entries


# -- prompting ------------------------------------------------------------------------------


def ask(
    text: str,
    check: Callable[[str], Any] = str,
    *,
    default: str | None = None,
    secret: bool = False,
    current: bool = False,
    optional: bool = False,
) -> Any:
    """Prompt until `check` accepts the answer. Enter takes `default`; for a secret with a
    `current` value Enter keeps it (returns None); an `optional` question may be skipped
    (returns None)."""
    if secret and current:
        text += " (Enter keeps the current one)"
    elif optional:
        text += " (Enter to skip)"
    elif default is not None and not secret:
        text += f" [{default}]"
    while True:
        raw = click.prompt(text, default="", show_default=False, hide_input=secret).strip()
        if not raw:
            if secret and current:
                return None
            if default is not None:
                raw = default
            elif optional:
                return None
            else:
                click.echo("Error: an answer is needed here.")
                continue
        try:
            return check(raw)
        except ValueError as exc:
            click.echo(f"Error: {exc}")


@dataclass
class Answers:
    """The collected options (camelCase keys) and how the MCP tool should reach the calls."""

    values: dict[str, Any] = field(default_factory=dict)
    drop: set[str] = field(default_factory=set)  # keys to remove from an existing block
    tool_service_url: str | None = None  # OpenClaw: MCP as a client of `whatsapp-call serve`


def _secret(
    answers: Answers,
    existing: dict[str, Any],
    key: str,
    text: str,
    check: Callable[[str], str] = check_secret,
    *,
    optional: bool = False,
) -> None:
    current = bool(existing.get(key))
    value = ask(text, check, secret=True, current=current, optional=optional and not current)
    if value is not None:
        answers.values[key] = value


def collect(existing: dict[str, Any], *, for_openclaw: bool) -> Answers:
    """Ask every question; `existing` (a config block) supplies defaults."""
    answers = Answers()
    click.echo("whatsapp-call setup: answers are checked as you type; secrets stay hidden.\n")
    remote_default = "remote" if existing.get("serviceUrl") else "here"
    where = click.prompt(
        "Where do calls run? here = this machine places them (needs provider and OpenAI "
        "credentials); remote = an existing whatsapp-call service",
        type=click.Choice(["here", "remote"]),
        default=remote_default,
    )
    if where == "remote":
        answers.values["serviceUrl"] = ask(
            "URL of the whatsapp-call service", check_url, default=existing.get("serviceUrl")
        )
        _secret(
            answers,
            existing,
            "serviceToken",
            "Its service token (serviceToken; none for a service on this machine)",
            optional=True,
        )
    else:
        answers.drop.add("serviceUrl")
        _collect_provider(answers, existing)
        _secret(answers, existing, "openaiApiKey", "OpenAI API key")
        if click.confirm(
            "Use Twilio TURN relays? (recommended when this machine is behind a strict NAT "
            "or firewall)",
            default=bool(existing.get("twilioAccountSid")),
        ):
            answers.values["twilioAccountSid"] = ask(
                "Twilio Account SID", check_twilio_sid, default=existing.get("twilioAccountSid")
            )
            _secret(answers, existing, "twilioAuthToken", "Twilio auth token")
        else:
            answers.drop |= {"twilioAccountSid", "twilioAuthToken"}
        answers.values["webhookUrl"] = ask(
            "Public HTTPS URL where WhatsApp sends call webhooks (it must reach "
            "whatsapp-call serve, e.g. https://calls.example.com/webhooks/meta)",
            check_webhook_url,
            default=existing.get("webhookUrl"),
        )
    current_numbers = existing.get("allowedNumbers")
    answers.values["allowedNumbers"] = ask(
        "Numbers the agent may call (comma-separated, e.g. +14085551234, +49*; * allows any)",
        check_allowed_numbers,
        default=", ".join(current_numbers) if isinstance(current_numbers, list) else None,
    )
    if for_openclaw and where == "here":
        port = existing.get("listenPort", DEFAULT_LISTEN_PORT)
        if click.confirm(
            "Let OpenClaw's agents use a running `whatsapp-call serve` on this machine? "
            "(recommended: calls survive agent restarts and several agents share one "
            "service; otherwise each agent session runs its own)",
            default=True,
        ):
            answers.tool_service_url = f"http://127.0.0.1:{port}"
    return answers


def _collect_provider(answers: Answers, existing: dict[str, Any]) -> None:
    provider = click.prompt(
        "WhatsApp provider",
        type=click.Choice(["meta", "wati"]),
        default=existing.get("provider") or "meta",
    )
    answers.values["provider"] = provider
    if provider == "meta":
        answers.drop |= {"watiTenantId", "watiApiToken", "watiBaseUrl"}
        answers.values["metaPhoneNumberId"] = ask(
            "Meta phone number ID", check_phone_number_id, default=existing.get("metaPhoneNumberId")
        )
        _secret(answers, existing, "metaAccessToken", "Meta access token (system user)")
        app_secret = ask(
            "Meta app secret (verifies webhook signatures; strongly recommended)",
            check_secret,
            secret=True,
            current=bool(existing.get("metaAppSecret")),
            optional=not existing.get("metaAppSecret"),
        )
        if app_secret is not None:
            answers.values["metaAppSecret"] = app_secret
        if not existing.get("metaVerifyToken"):
            token = secrets.token_urlsafe(24)
            answers.values["metaVerifyToken"] = token
            click.echo(
                "A webhook verify token was generated and saved as metaVerifyToken; enter it "
                "in Meta's webhook settings (whatsapp-call config show does not print it, "
                "read it from the config file)."
            )
    else:
        answers.drop |= {"metaPhoneNumberId", "metaAccessToken"}
        answers.values["watiTenantId"] = ask(
            "WATI tenant id", check_tenant_id, default=existing.get("watiTenantId")
        )
        _secret(answers, existing, "watiApiToken", "WATI API token", check_bearer_token)
        answers.values["watiBaseUrl"] = ask(
            "WATI API host",
            check_url,
            default=existing.get("watiBaseUrl") or DEFAULT_WATI_BASE_URL,
        )


def merged_block(existing: dict[str, Any], answers: Answers) -> dict[str, Any]:
    """The existing block with the answers applied; keys the wizard does not ask about stay."""
    block = {k: v for k, v in existing.items() if k not in answers.drop}
    block.update(answers.values)
    block.setdefault("enabled", True)
    return block


def validate_block(block: dict[str, Any]) -> None:
    """Check the core options as the service will read them (plugin options are checked by
    `whatsapp-call doctor`, once the plugins are loaded)."""
    settings_from_dict({k: v for k, v in block.items() if k in CORE_KEYS})


# -- the two targets --------------------------------------------------------------------------


def setup_openclaw(path: Path, own_config: Path | None = None, force: bool = False) -> None:
    """Write our channel block and MCP server entry into OpenClaw's config at `path`; with
    `own_config`, our options go to that YAML file instead and OpenClaw's config gets only
    the MCP server entry (for OpenClaw versions that refuse unknown `channels.*` keys)."""
    config = oc.read_openclaw_config(path)  # a broken file stops us before any question
    if own_config is not None:
        existing = _existing_yaml(own_config, force)
    else:
        existing = oc.channel_block(config)
    answers = collect(existing, for_openclaw=True)
    block = merged_block(existing, answers)
    validate_block(block)
    if own_config is not None:
        own_config = own_config.resolve()
        entry = oc.mcp_server_entry(
            own_config, service_url=answers.tool_service_url, own_config=True
        )
        _write_yaml(own_config, block)
        saved = oc.write_openclaw_config(path, oc.with_mcp_entry(config, entry))
        click.echo(
            f"\nWrote {own_config} and mcp.servers.{oc.MCP_SERVER_NAME} in {path} (mode 600)."
        )
        use = f"-c {own_config}"
    else:
        entry = oc.mcp_server_entry(path, service_url=answers.tool_service_url)
        saved = oc.write_openclaw_config(path, oc.updated_config(config, block, entry))
        key = oc.channel_key(config)
        click.echo(
            f"\nWrote channels.{key} and mcp.servers.{oc.MCP_SERVER_NAME} to {path} (mode 600)."
        )
        use = f"--openclaw {path}"
    if saved:
        click.echo(f"The previous file is saved as {saved} (comments are kept only there).")
    click.echo("Next:")
    click.echo(f"  whatsapp-call {use} doctor")
    if answers.tool_service_url:
        click.echo(
            f"  whatsapp-call {use} serve   (keep it running; agents reach it at "
            f"{answers.tool_service_url})"
        )
    click.echo("  openclaw config validate && openclaw gateway restart")
    click.echo("  then ask your agent to phone someone.")
    if own_config is None:
        click.echo(
            f"If OpenClaw reports channels.{oc.channel_key(config)} as an unknown channel id, "
            "run setup again with --config-file whatsapp-call.yaml: your options then live "
            "in that file and OpenClaw's config only names the MCP server."
        )


def _existing_yaml(path: Path, force: bool) -> dict[str, Any]:
    if not path.exists():
        return {}
    if not force:
        raise WhatsAppCallError(
            f"{path} already exists; nothing was written.",
            "Use --force to replace it (its values are offered as defaults), or another path.",
        )
    try:
        return read_config_file(path)
    except ConfigError as exc:
        click.echo(f"Note: the current {path} cannot be read ({exc.message}); starting fresh.")
        return {}


def _write_yaml(path: Path, block: dict[str, Any]) -> None:
    text = (
        "# whatsapp-call configuration, written by `whatsapp-call setup`. It holds secrets:\n"
        "# keep it mode 600. Every key: whatsapp-call config init --provider meta\n"
        + yaml.safe_dump({"channels": {"whatsappcall": block}}, sort_keys=False)
    )
    oc.write_private(path, text)


def setup_yaml(path: Path, force: bool) -> None:
    """Write our own YAML config at `path`; an existing file needs `force`."""
    existing = _existing_yaml(path, force)
    answers = collect(existing, for_openclaw=False)
    block = merged_block(existing, answers)
    validate_block(block)
    _write_yaml(path, block)
    click.echo(f"\nWrote {path} (mode 600).")
    click.echo("Next:")
    click.echo(f"  whatsapp-call -c {path} doctor")
    click.echo(f"  whatsapp-call -c {path} serve")
    click.echo(
        f"  give agents the tool: whatsapp-call -c {path.resolve()} mcp  (see the README: MCP)"
    )
