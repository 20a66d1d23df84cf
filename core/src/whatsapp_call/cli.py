"""The `whatsapp-call` command line (alias `wacall`).

Commands that need configuration load it lazily, so `plugins` and `config init` work on a
machine with no config at all. Plugins add commands through the `register_commands` hook.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from . import plugins as plugin_mod
from .config import Settings, load_settings
from .errors import WhatsAppCallError
from .models import CheckStatus
from .redact import scrub


class AppContext:
    """What every command shares: where the config is, and the loaded settings."""

    def __init__(self, config_path: str | None, openclaw: str | None):
        self.config_path = config_path
        self.openclaw = openclaw
        self._settings: Settings | None = None

    def settings(self, overrides: dict[str, Any] | None = None) -> Settings:
        if self._settings is None or overrides:
            plugin_mod.load_plugins()
            models = [m for _, m in plugin_mod.call_all_sync("settings_model")]
            openclaw: Any = self.openclaw
            if openclaw == "default":
                openclaw = True
            self._settings = load_settings(
                self.config_path, openclaw=openclaw, overrides=overrides, plugin_models=models
            )
        return self._settings


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


class Cli(click.Group):
    """Turns our errors into a clean message and exit status 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except WhatsAppCallError as exc:
            click.echo(f"Error: {scrub(str(exc))}", err=True)
            sys.exit(2)


@click.group(cls=Cli)
@click.version_option(__version__, prog_name="whatsapp-call")
@click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Config file (YAML or JSON). Default: $WHATSAPP_CALL_CONFIG, ./whatsapp-call.yaml, "
    "~/.config/whatsapp-call/config.yaml.",
)
@click.option(
    "--openclaw",
    is_flag=False,
    flag_value="default",
    default=None,
    metavar="[PATH]",
    help="Read OpenClaw's config (default ~/.openclaw/openclaw.json) instead.",
)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, openclaw: str | None) -> None:
    """Let an AI agent phone a person on WhatsApp and hold a live voice conversation."""
    ctx.obj = AppContext(config_path, openclaw)


@cli.command(name="plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--hook", "hook", help="Only plugins implementing this hook.")
def plugins_command(as_json: bool, hook: str | None) -> None:
    """List the plugins that loaded, their versions and the hooks they implement."""
    plugin_mod.load_plugins()
    info = plugin_mod.plugin_info()
    if hook:
        known = {h for h in dir(plugin_mod.pm.hook) if not h.startswith("_")}
        if hook not in known:
            raise WhatsAppCallError(
                f"There is no hook named {hook!r}.", f"Hooks: {', '.join(sorted(known))}."
            )
        info = [p for p in info if hook in p["hooks"]]
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    if not info:
        click.echo(
            "No plugins loaded."
            + (
                f" ({plugin_mod.PLUGINS_ENV} is set)"
                if os.environ.get(plugin_mod.PLUGINS_ENV) is not None
                else ""
            )
        )
        return
    for p in info:
        version = f" {p['distribution']} {p['version']}" if p["distribution"] else ""
        click.echo(f"{p['name']}:{version}")
        click.echo(f"  hooks: {', '.join(p['hooks'])}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--smoke",
    is_flag=True,
    help="Then place a short test call to --smoke-to and check that audio goes both ways.",
)
@click.option("--smoke-to", metavar="NUMBER", help="Who the smoke call rings, e.g. +14085551234.")
@click.option(
    "--voice-backend", help="Voice backend of the smoke call (default: echo, no AI, no cost)."
)
@click.option(
    "--smoke-seconds",
    type=click.FloatRange(3, 600),
    default=30,
    show_default=True,
    help="Hang up the smoke call this long after it is answered.",
)
@click.pass_obj
def doctor(
    app: AppContext,
    as_json: bool,
    smoke: bool,
    smoke_to: str | None,
    voice_backend: str | None,
    smoke_seconds: float,
) -> None:
    """Check the configuration, the plugins and each plugin's own diagnostics.

    With --smoke, then place a real test call and report whether audio went both ways."""
    from .doctor import run_doctor, run_smoke, smoke_overrides

    checks = run_async(run_doctor(app, smoke_overrides(smoke, smoke_to, voice_backend)))
    if not as_json:
        _print_checks(checks)
    if smoke:
        from .commands.calling import ProgressPrinter

        printer = ProgressPrinter(err=as_json)
        smoke_checks = run_async(
            run_smoke(app, checks, smoke_to, talk_seconds=smoke_seconds, printer=printer)
        )
        if not as_json:
            _print_checks(smoke_checks)
        checks += smoke_checks
    if as_json:
        click.echo(json.dumps([c.__dict__ | {"status": str(c.status)} for c in checks], indent=2))
    if any(c.status == CheckStatus.FAIL for c in checks):
        sys.exit(1)


def _print_checks(checks: list[Any]) -> None:
    marks = {CheckStatus.OK: "ok  ", CheckStatus.WARN: "warn", CheckStatus.FAIL: "FAIL"}
    for c in checks:
        source = f" [{c.plugin}]" if c.plugin else ""
        click.echo(f"{marks[c.status]}  {c.name}{source}: {scrub(c.message)}")
        if c.hint and c.status != CheckStatus.OK:
            click.echo(f"        fix: {scrub(c.hint)}")


@cli.group()
def config() -> None:
    """Show or create configuration."""


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of YAML.")
@click.pass_obj
def config_show(app: AppContext, as_json: bool) -> None:
    """Print the effective configuration (file + environment), secrets masked."""
    import yaml

    data = app.settings().public_dict()
    data["stateDir"] = str(data["stateDir"])
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(yaml.safe_dump({"channels": {"whatsappcall": data}}, sort_keys=False))


@config.command("init")
@click.option("--provider", type=click.Choice(["meta", "wati"]), required=True)
@click.option(
    "--path",
    "path",
    type=click.Path(dir_okay=False),
    default="whatsapp-call.yaml",
    show_default=True,
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def config_init(provider: str, path: str, force: bool) -> None:
    """Write a commented example config for PROVIDER (mode 600: it will hold secrets)."""
    from .example_config import example_config

    target = Path(path)
    if target.exists() and not force:
        raise WhatsAppCallError(
            f"{target} already exists; nothing was written.",
            "Use --force to overwrite it, or --path for another file.",
        )
    target.write_text(example_config(provider), encoding="utf-8")
    target.chmod(0o600)
    click.echo(
        f"Wrote {target}. Fill in the values marked REQUIRED, then run: "
        f"whatsapp-call -c {target} doctor"
    )


def _register_core_commands() -> None:
    from .commands import agent, calling

    calling.register(cli)
    agent.register(cli)


def _register_plugin_commands() -> None:
    try:
        plugin_mod.load_plugins()
    except WhatsAppCallError:  # reported by the command itself, which then fails cleanly
        return
    for _name, impl in [
        (i.plugin_name, i) for i in plugin_mod.pm.hook.register_commands.get_hookimpls()
    ]:
        impl.function(cli)


_register_core_commands()
_register_plugin_commands()


if __name__ == "__main__":  # `python -m whatsapp_call.cli`, as serve starts its workers
    cli()
