"""`whatsapp-call doctor`: configuration, plugins, and each plugin's own checks.

`doctor --smoke --smoke-to NUMBER` then places one short real test call (voice backend
`echo` unless `--voice-backend` says otherwise) and reports whether audio went both ways:
the checks above it cannot see a firewall that drops UDP or a backend that stays silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from typing import Any

from . import plugins as plugin_mod
from .errors import BadInputError, WhatsAppCallError
from .models import CheckStatus, DoctorCheck

SMOKE_BACKEND = "echo"
SMOKE_GREETING = "This is a whatsapp-call test call. Say a few words, listen, then hang up."
SMOKE_INSTRUCTIONS = (
    "This is a short test of a phone line, not a conversation. After the greeting, when the "
    "person speaks, repeat back in a few words what you heard, then end the call."
)
_BACKEND_HINTS = {
    "openai": "pip install 'whatsapp-call[openai]', or set voiceBackend to an installed one.",
    "echo": "Install the example echo plugin (pip install ./examples/whatsapp-call-echo in a "
    "clone of whatsapp-call), or pick an installed backend with --voice-backend.",
}
SMOKE_SETUP_MARGIN = 30.0  # seconds on top of ringTimeoutSeconds before an unanswered call stops


def smoke_overrides(
    smoke: bool, smoke_to: str | None, voice_backend: str | None
) -> dict[str, Any] | None:
    """The config overrides for a smoke run (its voice backend), after checking the options."""
    if not smoke:
        if smoke_to or voice_backend:
            raise BadInputError(
                "--smoke-to and --voice-backend only apply to the smoke test call.",
                "Add --smoke, e.g. whatsapp-call doctor --smoke --smoke-to +14085551234",
            )
        return None
    if not smoke_to:
        raise BadInputError(
            "--smoke needs the number to call.",
            "Add --smoke-to with a phone you can answer (or the simulated user's), "
            "e.g. --smoke-to +14085551234",
        )
    from .phone import parse_phone

    parse_phone(smoke_to)  # a bad number fails now, not after the checks
    return {"voiceBackend": voice_backend or SMOKE_BACKEND}


async def run_doctor(app: Any, overrides: dict[str, Any] | None = None) -> list[DoctorCheck]:
    checks: list[DoctorCheck] = []
    try:
        settings = app.settings(overrides)
    except WhatsAppCallError as exc:
        return [DoctorCheck("config", CheckStatus.FAIL, exc.message, exc.hint)]
    missing = settings.missing_for_provider()
    if missing:
        checks.append(
            DoctorCheck(
                "config",
                CheckStatus.FAIL,
                f"missing keys: {', '.join(missing)}",
                "Add them under channels.whatsappcall (whatsapp-call config init shows every key).",
            )
        )
    else:
        mode = (
            "remote, service at " + settings.service_url
            if settings.remote
            else (f"provider {settings.provider}, voice backend {settings.voice_backend}")
        )
        checks.append(DoctorCheck("config", CheckStatus.OK, f"valid ({mode})"))

    info = plugin_mod.plugin_info()
    names = ", ".join(p["name"] for p in info) or "none"
    checks.append(
        DoctorCheck(
            "plugins",
            CheckStatus.OK if info else CheckStatus.WARN,
            f"loaded: {names}",
            None if info else "Install a provider, e.g. pip install 'whatsapp-call[meta]'.",
        )
    )
    if not settings.remote:
        checks.append(_media_check())
        providers = {n for _, ns in plugin_mod.call_all_sync("provider_names") for n in ns}
        backends = {n for _, ns in plugin_mod.call_all_sync("voice_backend_names") for n in ns}
        if settings.provider and settings.provider not in providers:
            checks.append(
                DoctorCheck(
                    "provider",
                    CheckStatus.FAIL,
                    f"no installed plugin answers for provider {settings.provider!r} "
                    f"(installed: {', '.join(sorted(providers)) or 'none'})",
                    f"pip install 'whatsapp-call[{settings.provider}]'",
                )
            )
        if settings.voice_backend not in backends:
            checks.append(
                DoctorCheck(
                    "voice backend",
                    CheckStatus.FAIL,
                    f"no installed plugin answers for voice backend {settings.voice_backend!r} "
                    f"(installed: {', '.join(sorted(backends)) or 'none'})",
                    _BACKEND_HINTS.get(
                        settings.voice_backend,
                        f"Install the plugin that provides {settings.voice_backend!r}, or set "
                        "voiceBackend to an installed one.",
                    ),
                )
            )
    for plugin_name, result in await plugin_mod.call_all("doctor_checks", settings=settings):
        for check in result:
            if not check.plugin:
                check = DoctorCheck(
                    check.name, check.status, check.message, check.hint, plugin_name
                )
            checks.append(check)
    return checks


def _media_check() -> DoctorCheck:
    """The call audio needs libopus (`media.opus`); say which one a local service uses."""
    from .media import opus

    try:
        return DoctorCheck("media", CheckStatus.OK, f"{opus.version()} ({opus.loaded_from()})")
    except WhatsAppCallError as exc:
        return DoctorCheck("media", CheckStatus.FAIL, exc.message, exc.hint)


async def run_smoke(
    app: Any,
    checks: list[DoctorCheck],
    to: str,
    *,
    talk_seconds: float = 30.0,
    printer: Any = None,
) -> list[DoctorCheck]:
    """Place one test call to `to` and check that audio flowed both ways.

    Skipped (a failure) when `checks` already failed: a call would only fail the same way.
    The call is hung up `talk_seconds` after it is answered unless the callee ended it first.
    `printer` (optional) has `echo(text)` and `show(update)`, like the `call` command's.
    """
    if any(c.status == CheckStatus.FAIL for c in checks):
        return [
            DoctorCheck(
                "smoke call",
                CheckStatus.FAIL,
                "not placed: the checks above failed",
                "Fix those first, then run doctor --smoke again.",
            )
        ]
    settings = app.settings()
    if settings.remote:
        return [
            DoctorCheck(
                "smoke call",
                CheckStatus.FAIL,
                "not placed: serviceUrl is set, and the smoke call runs on this machine",
                "Run doctor --smoke on the machine that runs the service, with its config.",
            )
        ]
    from .phone import parse_phone

    number = parse_phone(to).e164
    if printer is not None:
        printer.echo(f"Smoke test: calling {number} with voice backend {settings.voice_backend}")
    record, transcript = await _smoke_call(settings, number, talk_seconds, printer)
    return smoke_checks(record, transcript)


async def _smoke_call(settings: Any, number: str, talk_seconds: float, printer: Any) -> Any:
    from .calls.orchestrator import CallRequest
    from .runtime import Runtime

    request = CallRequest(to=number, greeting=SMOKE_GREETING, instructions=SMOKE_INSTRUCTIONS)
    async with Runtime(settings) as runtime:
        service = runtime.service
        async with service.live.subscribe("*") as updates:
            placed = await service.place_call(request)
            stream = aiter(updates)
            deadline = time.monotonic() + settings.ring_timeout_seconds + SMOKE_SETUP_MARGIN
            ended = False
            while not ended:
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        update = await anext(stream)
                except (TimeoutError, StopAsyncIteration):
                    break
                if update.get("call_id") != placed.id:
                    continue
                if printer is not None:
                    printer.show(update)
                if update.get("type") == "state" and update.get("state") == "in_progress":
                    deadline = time.monotonic() + talk_seconds
                ended = update.get("type") == "state" and update.get("state") == "ended"
        if not ended:
            if printer is not None:
                printer.echo("   hanging up the test call")
            with contextlib.suppress(WhatsAppCallError, TimeoutError):
                await service.hangup(placed.id)
        record = await service.wait(placed.id, timeout=30)
        transcript = await runtime.store.get_transcript(record.id)
    return record, transcript


def smoke_checks(record: Any, transcript: list[Any]) -> list[DoctorCheck]:
    """What a finished smoke call proves: connected, audio in from the phone, audio out."""
    metrics = record.metrics or {}
    setup = metrics.get("setup_ms") or {}
    ended = f"ended: {record.end_reason}" + (f" ({record.end_detail})" if record.end_detail else "")
    if not {"accepted", "media_connected"} <= set(setup):
        return [
            DoctorCheck(
                "smoke call",
                CheckStatus.FAIL,
                f"{record.id} was not answered with media up; {ended}",
                _SMOKE_HINTS.get(
                    str(record.end_reason),
                    f"See what happened with: whatsapp-call calls {record.id}",
                ),
            )
        ]
    completed = str(record.end_reason) == "completed"
    checks = [
        DoctorCheck(
            "smoke call",
            CheckStatus.OK if completed else CheckStatus.FAIL,
            f"{record.id} answered, media up in {metrics.get('setup_seconds') or 0:.1f} s; {ended}",
            None if completed else f"See what happened with: whatsapp-call calls {record.id}",
        )
    ]
    audio = metrics.get("audio") or {}
    inbound = audio.get("inbound") or {}
    outbound = audio.get("outbound") or {}
    heard_speech = any(t.role == "user" for t in transcript)
    received_s = (inbound.get("audio_ms") or 0) / 1000
    if not inbound.get("frames"):
        checks.append(
            DoctorCheck(
                "audio from the phone",
                CheckStatus.FAIL,
                "no audio arrived from the phone",
                "Inbound UDP is probably blocked: open it, or configure a TURN relay "
                "(twilioAccountSid), then try again.",
            )
        )
    elif not heard_speech:
        checks.append(
            DoctorCheck(
                "audio from the phone",
                CheckStatus.WARN,
                f"received {received_s:.1f} s of audio, but no speech in it",
                "Say a few words after the greeting (is the phone's microphone muted?).",
            )
        )
    else:
        checks.append(
            DoctorCheck(
                "audio from the phone",
                CheckStatus.OK,
                f"received {received_s:.1f} s of audio; the voice backend heard speech",
            )
        )
    sent_s = (outbound.get("audio_frames") or 0) * 0.02
    if not sent_s:
        checks.append(
            DoctorCheck(
                "audio to the phone",
                CheckStatus.FAIL,
                "the voice backend produced no audio, so the phone heard nothing",
                "Check the voice backend (its doctor checks above); with the echo backend a "
                "chime plays as soon as the call is answered.",
            )
        )
    else:
        latencies = [t["response_latency_ms"] for t in audio.get("turns") or []]
        replies = (
            f"; {len(latencies)} repl{'y' if len(latencies) == 1 else 'ies'} to the caller, "
            f"p50 {statistics.median(latencies):.0f} ms after they stopped talking"
            if latencies
            else ""
        )
        checks.append(
            DoctorCheck(
                "audio to the phone",
                CheckStatus.OK,
                f"sent {sent_s:.1f} s of audio (greeting and replies){replies}",
            )
        )
    return checks


_SMOKE_HINTS = {
    "rejected": "The call was declined: run the smoke test again and answer it.",
    "no_answer": "Nobody answered: answer the test call on the phone given with --smoke-to.",
    "permission_denied": "The callee declined call permission; they must allow calls first.",
    "permission_pending_expired": "The callee did not answer the call-permission request in "
    "time: accept it on the phone, then run the smoke test again.",
    "busy": "The phone was busy: run the smoke test again when it is free.",
    "cancelled": "The call was not answered in time: answer it, or check that webhooks reach "
    "this machine (webhookUrl).",
}
