"""Wire-faithful local simulators: WhatsApp (Meta, WATI), a WhatsApp user, OpenAI Realtime, Twilio TURN.

The distribution is also a whatsapp-call plugin (entry point `sim`): it adds the
`whatsapp-call sim` command, which runs every simulator and writes a config pointing at them.
Imports stay lazy so that loading the plugin costs the CLI nothing.
"""

from __future__ import annotations

from typing import Any

from whatsapp_call import hookimpl

DEFAULT_STATE_DIR = "~/.local/state/whatsapp-call-sim"


@hookimpl
def register_commands(cli: Any) -> None:
    import click

    from .runner import SCENARIOS

    @cli.command("sim")
    @click.option(
        "--provider", type=click.Choice(["meta", "wati"]), default="meta", show_default=True
    )
    @click.option(
        "--scenario",
        default="accept",
        show_default=True,
        help=f"What the callee does: {', '.join(SCENARIOS)}; or a JSON object of "
        'Scenario fields, e.g. \'{"answer": "accept", "hangup_after_s": 5}\'.',
    )
    @click.option(
        "--config-out",
        type=click.Path(dir_okay=False),
        help="Where to write the config file. Default: STATE_DIR/whatsapp-call.sim.yaml.",
    )
    @click.option(
        "--state-dir",
        type=click.Path(file_okay=False),
        default=DEFAULT_STATE_DIR,
        show_default=True,
        help="stateDir of the written config (the simulated calls' store).",
    )
    @click.option(
        "--listen-port", type=int, help="Port for `serve` to listen on. Default: a free one."
    )
    @click.option(
        "--turn/--no-turn",
        default=None,
        help="Require coturn as TURN relay / hand out STUN only. Default: coturn if installed.",
    )
    @click.option(
        "--json", "as_json", is_flag=True, help="Print one JSON line with the URLs when ready."
    )
    @click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"]),
        default="info",
        show_default=True,
    )
    def sim(
        provider: str,
        scenario: str,
        config_out: str | None,
        state_dir: str,
        listen_port: int | None,
        turn: bool | None,
        as_json: bool,
        log_level: str,
    ) -> None:
        """Run local simulators of WhatsApp, OpenAI Realtime and Twilio TURN, and write a
        config that points whatsapp-call at them. Runs until Ctrl-C or SIGTERM."""
        import logging

        from .runner import run_until_signal

        logging.basicConfig(
            level=getattr(logging, log_level.upper()),
            format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        )
        run_until_signal(
            provider=provider,
            scenario=scenario,
            config_out=config_out,
            state_dir=state_dir,
            listen_port=listen_port,
            turn=turn,
            as_json=as_json,
            echo=click.echo,
        )
