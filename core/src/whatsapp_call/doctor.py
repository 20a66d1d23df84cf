"""`whatsapp-call doctor`: configuration, plugins, and each plugin's own checks."""

from __future__ import annotations

from typing import Any

from . import plugins as plugin_mod
from .errors import WhatsAppCallError
from .models import CheckStatus, DoctorCheck


async def run_doctor(app: Any) -> list[DoctorCheck]:
    checks: list[DoctorCheck] = []
    try:
        settings = app.settings()
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
                    "pip install 'whatsapp-call[openai]', or set voiceBackend to an installed one.",
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
