"""`whatsapp-call doctor` checks for the WATI provider: the tenant answers and the token is
accepted, and whether webhooks are authenticated."""

from __future__ import annotations

import httpx
from whatsapp_call.config import Settings
from whatsapp_call.errors import WhatsAppCallError
from whatsapp_call.models import CheckStatus, DoctorCheck
from whatsapp_call.providers.http import HttpPolicy

from . import client

PLUGIN = "wati"
DOCTOR_POLICY = HttpPolicy(timeout=5.0, budget=5.0, attempts=1)


def _check(name: str, status: CheckStatus, message: str, hint: str | None = None) -> DoctorCheck:
    return DoctorCheck(name, status, message, hint, PLUGIN)


async def run(settings: Settings) -> list[DoctorCheck]:
    checks = [await _api_check(settings)]
    if settings.secret("wati_webhook_secret"):
        checks.append(_check("webhook security", CheckStatus.OK, "webhook signatures are verified"))
    else:
        checks.append(
            _check(
                "webhook security",
                CheckStatus.WARN,
                "watiWebhookSecret is not set: WATI webhooks are accepted without a signature",
                "If your WATI account signs webhooks (X-Hub-Signature-256), set the same "
                "secret as watiWebhookSecret; otherwise keep the webhook URL private.",
            )
        )
    return checks


async def _api_check(settings: Settings) -> DoctorCheck:
    try:
        response = await client.probe(settings, DOCTOR_POLICY)
    except WhatsAppCallError as exc:
        return _check("wati api", CheckStatus.FAIL, exc.message, exc.hint)
    except httpx.HTTPError as exc:
        return _check(
            "wati api",
            CheckStatus.FAIL,
            f"cannot reach {settings.wati_base_url} ({type(exc).__name__})",
            "Check watiBaseUrl and the network.",
        )
    tenant = settings.wati_tenant_id
    if response.status_code in (401, 403):
        return _check(
            "wati api",
            CheckStatus.FAIL,
            f"tenant {tenant} reachable, but the API token was rejected (HTTP {response.status_code})",
            "Copy the token again from WATI (Connectors > API Docs) into watiApiToken; it "
            "changes when the account password changes.",
        )
    if response.status_code == 404:
        return _check(
            "wati api",
            CheckStatus.FAIL,
            f"{settings.wati_base_url} does not know tenant {tenant} (HTTP 404)",
            "Check watiBaseUrl and watiTenantId (both are in your WATI API URL), and that "
            "WATI enabled the Calling API for your account.",
        )
    if response.status_code >= 500:
        return _check(
            "wati api",
            CheckStatus.WARN,
            f"WATI answered HTTP {response.status_code}; it may be temporarily down",
            "Try again later.",
        )
    return _check("wati api", CheckStatus.OK, f"tenant {tenant} reachable, token accepted")
