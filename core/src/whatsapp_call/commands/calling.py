"""`call`, `calls`, `serve` and `demo`: placing calls and watching them happen.

Local mode runs the whole service in this process for the length of the command (store,
webhook server, media); remote mode (`serviceUrl` set) asks a running service over HTTP.
Both show the same live progress, built from the same update messages.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from ..api.records import summary_line
from ..errors import BadInputError, WhatsAppCallError

ROLE_NAMES = {"assistant": "AI", "user": "User"}
STATE_TEXT = {
    "created": "Call created",
    "checking_permission": "Checking call permission",
    "permission_requested": "Permission requested",
    "offering": "Placing the call",
    "ringing": "Ringing",
    "in_progress": "Answered: the conversation is live",
}


class ProgressPrinter:
    """Renders live updates as lines for a person. With --json they go to stderr."""

    def __init__(self, err: bool):
        self.err = err

    def echo(self, text: str) -> None:
        click.echo(text, err=self.err)

    def show(self, update: dict[str, Any]) -> None:
        kind = update.get("type")
        if kind == "state":
            state = update.get("state")
            if state == "ended":
                reason = (update.get("end_reason") or "ended").replace("_", " ")
                detail = f" ({update['detail']})" if update.get("detail") else ""
                self.echo(f"-> Call ended: {reason}{detail}")
            elif state in STATE_TEXT:
                detail = f": {update['detail']}" if update.get("detail") else ""
                self.echo(f"-> {STATE_TEXT[state]}{detail}")
        elif kind == "transcript":
            self.echo(
                f"   {ROLE_NAMES.get(update.get('role', ''), update.get('role'))}: {update.get('text', '')}"
            )
        elif kind == "event" and update.get("event") in ("offer_sent", "media_connected"):
            data = update.get("data") or {}
            if update["event"] == "offer_sent":
                self.echo(f"   offer sent (provider call id {data.get('provider_call_id')})")
            else:
                self.echo("   media connected (DTLS-SRTP)")

    def summary(self, record: dict[str, Any]) -> None:
        self.echo("")
        self.echo("Summary: " + summary_line(record))
        metrics = record.get("metrics") or {}
        if metrics.get("setup_seconds") is not None:
            self.echo(
                f"  set-up time: {metrics['setup_seconds'] * 1000:.0f} ms (offer built to answered and connected)"
            )
        latencies = turn_latencies(metrics)
        if latencies:
            self.echo(
                f"  turn latency: p50 {statistics.median(latencies):.0f} ms, "
                f"max {max(latencies):.0f} ms over {len(latencies)} turn(s) "
                "(caller's end of speech to first AI audio sent)"
            )
        for warning in metrics.get("warnings", []):
            self.echo(f"  warning: {warning}")


def turn_latencies(metrics: dict[str, Any]) -> list[float]:
    turns = (metrics.get("audio") or {}).get("turns") or []
    return [
        float(t["response_latency_ms"]) for t in turns if t.get("response_latency_ms") is not None
    ]


def _call_options(f: Any) -> Any:
    for option in reversed(
        [
            click.option("--greeting", help="What the AI says first (default: voiceGreeting)."),
            click.option(
                "--instructions", help="Instructions for the AI (default: voiceInstructions)."
            ),
            click.option("--voice", help="Voice of the AI (default: voice)."),
            click.option(
                "--language", help="Language to speak, e.g. en or pt-BR (default: voiceLanguage)."
            ),
            click.option(
                "--json", "as_json", is_flag=True, help="Print the final call record as JSON."
            ),
        ]
    ):
        f = option(f)
    return f


async def run_local_call(settings: Any, request: Any, printer: ProgressPrinter) -> dict[str, Any]:
    """Run the service in this process for one call; returns the final record."""
    from ..api.records import full_record
    from ..runtime import Runtime

    async with Runtime(settings) as runtime:
        for record in runtime.reconciled:
            printer.echo(f"   note: reconciled an unfinished call from an earlier run: {record.id}")
        async with runtime.service.live.subscribe("*") as updates:
            record = await runtime.service.place_call(request)
            printer.echo(f"Calling {record.to_e164} ({record.id}) via {record.provider}")
            async for update in updates:
                if update["call_id"] != record.id:
                    continue
                printer.show(update)
                if update.get("type") == "state" and update.get("state") == "ended":
                    break
        final = await runtime.service.wait(record.id, timeout=30)
        return await full_record(runtime.store, final)


async def run_remote_call(
    settings: Any, request: Any, printer: ProgressPrinter, wait: bool
) -> dict[str, Any]:
    from ..client import ServiceClient

    async with ServiceClient.from_settings(settings) as client:
        record = await client.place_call(
            request.to,
            greeting=request.greeting,
            instructions=request.instructions,
            voice=request.voice,
            language=request.language,
        )
        printer.echo(f"Calling {record['to_e164']} ({record['id']}) via {settings.service_url}")
        if not wait:
            return record
        async for update in client.events(record["id"]):
            printer.show(update)
        return await client.get_call(record["id"])


def register(cli: click.Group) -> None:
    from .permission import permission

    cli.add_command(permission)

    @cli.command()
    @click.argument("to")
    @_call_options
    @click.option(
        "--no-wait", is_flag=True, help="Return once the call is placed (remote mode only)."
    )
    @click.option(
        "--voice-backend",
        help="Voice backend plugin for this call (default: voiceBackend), e.g. echo for a "
        "media test call with no AI.",
    )
    @click.pass_obj
    def call(
        app: Any,
        to: str,
        greeting,
        instructions,
        voice,
        language,
        as_json: bool,
        no_wait: bool,
        voice_backend: str | None,
    ) -> None:
        """Call TO and show the conversation live; TO is like +14085551234.

        Exit status 0 only when the call completed."""
        from ..calls.orchestrator import CallRequest
        from ..phone import parse_phone

        settings = app.settings({"voiceBackend": voice_backend} if voice_backend else None)
        if voice_backend and settings.remote:
            raise BadInputError(
                "--voice-backend chooses a backend of this machine; in remote mode the service's "
                "own voiceBackend is used.",
                "Drop --voice-backend, or set voiceBackend in the service's config.",
            )
        request = CallRequest(
            to=parse_phone(to).e164,
            greeting=greeting,
            instructions=instructions,
            voice=voice,
            language=language,
        )
        printer = ProgressPrinter(err=as_json)
        if settings.remote:
            record = asyncio.run(run_remote_call(settings, request, printer, wait=not no_wait))
        else:
            if no_wait:
                raise BadInputError(
                    "--no-wait needs a running service: a local call lasts as long as this command.",
                    "Set serviceUrl to a `whatsapp-call serve` instance, or drop --no-wait.",
                )
            record = asyncio.run(run_local_call(settings, request, printer))
        _finish(record, printer, as_json, placed_only=no_wait)

    @cli.command()
    @click.argument("call_id", required=False)
    @click.option("--state", help="Only calls in this state.")
    @click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 500))
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_obj
    def calls(app: Any, call_id: str | None, state: str | None, limit: int, as_json: bool) -> None:
        """List recent calls, or show one call's full record with its transcript."""
        settings = app.settings()
        result = asyncio.run(_read_calls(settings, call_id, state, limit))
        if as_json:
            click.echo(json.dumps(result, indent=2, default=str))
            return
        if call_id:
            _print_record(result)
            return
        if not result:
            click.echo("No calls yet.")
        for record in result:
            click.echo(f"{record['created_at'][:19]}  {summary_line(record)}")

    @cli.command()
    @click.option(
        "--workers",
        type=click.IntRange(1, 256),
        default=os.cpu_count() or 1,
        show_default="the number of CPU cores",
        help="Media worker processes. 1 runs everything in this process.",
    )
    @click.pass_obj
    def serve(app: Any, workers: int) -> None:
        """Run the service: webhooks, the /v1 API and calls, until SIGTERM or Ctrl-C."""
        settings = app.settings()
        if settings.remote:
            raise BadInputError(
                "serve runs the service itself; serviceUrl says to use a remote one.",
                "Remove serviceUrl from this config to serve.",
            )
        asyncio.run(_serve(settings, workers, _worker_command(app)))

    @cli.command(hidden=True)
    @click.option("--id", "worker_id", required=True)
    @click.pass_obj
    def worker(app: Any, worker_id: str) -> None:
        """A media worker of `serve --workers N` (started by serve, not by hand)."""
        from ..workers.worker import run_worker

        token = os.environ.get("WHATSAPP_CALL_WORKER_TOKEN")
        if not token:
            raise BadInputError("worker is started by `serve --workers N`.", "Run serve instead.")
        asyncio.run(run_worker(app.settings(), worker_id, token))

    @cli.command()
    @click.option(
        "--provider", type=click.Choice(["meta", "wati"]), default="meta", show_default=True
    )
    @click.option(
        "--to", "to", default="+14155550123", show_default=True, help="The simulated user's number."
    )
    @click.option("--json", "as_json", is_flag=True, help="Print the final call record as JSON.")
    @click.option(
        "--state-dir", type=click.Path(file_okay=False), help="Keep the demo's files here."
    )
    def demo(provider: str, to: str, as_json: bool, state_dir: str | None) -> None:
        """A whole call against the local simulators: no accounts, no cost.

        Starts simulated WhatsApp, OpenAI Realtime and Twilio, then calls a simulated user who
        answers, hears the AI's greeting, says something, hears the answer and hangs up."""
        printer = ProgressPrinter(err=as_json)
        record = asyncio.run(_demo(provider, to, printer, state_dir))
        _finish(record, printer, as_json)


async def _read_calls(settings: Any, call_id: str | None, state: str | None, limit: int) -> Any:
    if settings.remote:
        from ..client import ServiceClient

        async with ServiceClient.from_settings(settings) as client:
            if call_id:
                return await client.get_call(call_id)
            return await client.list_calls(state=state, limit=limit)
    from ..api.records import full_record
    from ..store import open_store

    store = open_store(settings)
    await store.open()
    try:
        if call_id:
            record = await store.get_call(call_id)
            if record is None:
                raise BadInputError(
                    f"There is no call {call_id!r}.", "List calls with: whatsapp-call calls"
                )
            return await full_record(store, record)
        return [r.to_dict() for r in await store.list_calls(state=state, limit=limit)]
    finally:
        await store.close()


def _print_record(record: dict[str, Any]) -> None:
    printer = ProgressPrinter(err=False)
    click.echo(summary_line(record))
    for event in record.get("events", []):
        data = event.get("data") or {}
        detail = f" {json.dumps(data, default=str)}" if data else ""
        click.echo(f"  {event['at'][11:23]}  {event['type']}{detail}")
    if record.get("transcript"):
        click.echo("Transcript:")
        for line in record["transcript"]:
            click.echo(
                f"  {line['at'][11:19]}  {ROLE_NAMES.get(line['role'], line['role'])}: {line['text']}"
            )
    printer.summary(record)


def _finish(
    record: dict[str, Any], printer: ProgressPrinter, as_json: bool, placed_only: bool = False
) -> None:
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
    elif placed_only:
        printer.echo(f"Placed {record['id']}; follow it with: whatsapp-call calls {record['id']}")
    else:
        printer.summary(record)
    if placed_only:
        return
    if record.get("end_reason") != "completed":
        sys.exit(1)


def _worker_command(app: Any) -> list[str]:
    """How `serve` starts a worker: this CLI, with the same config source."""
    command = [sys.executable, "-m", "whatsapp_call.cli"]
    if app.config_path:
        command += ["-c", os.path.abspath(app.config_path)]
    if app.openclaw:
        path = "~/.openclaw/openclaw.json" if app.openclaw == "default" else app.openclaw
        command += ["--openclaw", os.path.abspath(os.path.expanduser(path))]
    return [*command, "worker"]


async def _serve(settings: Any, workers: int, worker_command: list[str]) -> None:
    from ..runtime import Runtime

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Runtime(settings, workers=workers, worker_command=worker_command) as runtime:
        where = f"{workers} media workers" if workers > 1 else "one process"
        click.echo(
            f"whatsapp-call serving on {runtime.url} (provider {settings.provider}, {where})"
        )
        click.echo(
            f"  webhooks: {runtime.url}/webhooks/{settings.provider}   API: {runtime.url}/v1"
        )
        for record in runtime.reconciled:
            click.echo(f"  reconciled an unfinished call from an earlier run: {record.id}")
        await stop.wait()
        click.echo("Shutting down: ending active calls politely...")
    click.echo("Stopped.")


async def _demo(
    provider: str, to: str, printer: ProgressPrinter, state_dir: str | None
) -> dict[str, Any]:
    try:
        from whatsapp_call_sim.runner import SimulatorSet
    except ImportError:
        raise WhatsAppCallError(
            "The demo needs the simulators, which are not installed.",
            "pip install 'whatsapp-call[sim,all]' (or run `make demo` in a clone).",
        ) from None
    from .. import plugins
    from ..calls.orchestrator import CallRequest
    from ..config import load_settings

    with tempfile.TemporaryDirectory(prefix="whatsapp-call-demo-") as tmp:
        base = Path(state_dir) if state_dir else Path(tmp)
        async with SimulatorSet(provider=provider, state_dir=base) as sims:
            printer.echo(
                f"Simulators up ({provider}): "
                + ", ".join(f"{k} {v}" for k, v in sims.urls.items())
            )
            printer.echo(f"Config written to {sims.config_path}")
            plugins.load_plugins()
            models = [m for _, m in plugins.call_all_sync("settings_model")]
            settings = load_settings(sims.config_path, plugin_models=models)
            request = CallRequest(
                to=to,
                greeting=settings.voice_greeting
                or "Hi! This is the whatsapp-call demo. Can you hear me?",
                instructions=settings.voice_instructions
                or "You are a friendly assistant on a short demo call.",
            )
            return await run_local_call(settings, request, printer)
