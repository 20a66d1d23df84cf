"""`mcp` and `setup`: giving agents the `whatsapp_call` tool, and onboarding."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from ..errors import BadInputError


def register(cli: click.Group) -> None:
    @cli.command()
    @click.pass_obj
    def mcp(app: Any) -> None:
        """Serve the whatsapp_call tool to an agent over MCP (stdio).

        With serviceUrl set it asks that service to place the calls; otherwise the whole
        service runs in this process while the agent keeps it open."""
        from ..agent.mcp_server import run_stdio

        settings = app.settings()
        asyncio.run(run_stdio(settings))

    @cli.command()
    @click.option(
        "--openclaw",
        "openclaw_path",
        is_flag=False,
        flag_value="default",
        default=None,
        metavar="[PATH]",
        help="Write into OpenClaw's config (default ~/.openclaw/openclaw.json) and register "
        "the tool as an OpenClaw MCP server.",
    )
    @click.option(
        "--path",
        "yaml_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="Without --openclaw: the YAML file to write (default ./whatsapp-call.yaml, or -c).",
    )
    @click.option(
        "--config-file",
        "own_config",
        type=click.Path(dir_okay=False),
        default=None,
        help="With --openclaw: keep our options in this YAML file and add only the MCP "
        "server entry to OpenClaw's config.",
    )
    @click.option("--force", is_flag=True, help="Replace an existing YAML file.")
    @click.pass_obj
    def setup(
        app: Any,
        openclaw_path: str | None,
        yaml_path: str | None,
        own_config: str | None,
        force: bool,
    ) -> None:
        """Interactive set-up: provider, credentials, OpenAI key, TURN, webhook URL and the
        numbers the agent may call; writes the config (mode 600)."""
        from ..agent import openclaw as oc
        from ..agent.setup_wizard import setup_openclaw, setup_yaml

        target = openclaw_path or (app.openclaw if app is not None else None)
        if target is not None:
            path = oc.default_path() if target == "default" else Path(target).expanduser()
            setup_openclaw(path, Path(own_config).expanduser() if own_config else None, force)
            return
        if own_config:
            raise BadInputError(
                "--config-file only goes with --openclaw.",
                "Without --openclaw, name the YAML file with --path.",
            )
        chosen = yaml_path or (app.config_path if app is not None else None)
        setup_yaml(Path(chosen or "whatsapp-call.yaml").expanduser(), force)
