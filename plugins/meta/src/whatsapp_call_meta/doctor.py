"""`whatsapp-call doctor` checks for the Meta provider: credentials, calling enabled on the
number, webhook security, and a webhook URL Meta can actually reach."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from whatsapp_call.config import Settings
from whatsapp_call.errors import WhatsAppCallError
from whatsapp_call.models import CheckStatus, DoctorCheck
from whatsapp_call.providers.http import HttpPolicy
from whatsapp_call.providers.permissions import to_datetime

from . import client

PLUGIN = "meta"
# Doctor must answer quickly: short timeout, one retry at most.
DOCTOR_POLICY = HttpPolicy(timeout=5.0, budget=5.0, attempts=2)


def _check(name: str, status: CheckStatus, message: str, hint: str | None = None) -> DoctorCheck:
    return DoctorCheck(name, status, message, hint, PLUGIN)


def is_local_host(host: str) -> bool:
    """Loopback, private, link-local or unspecified: not reachable from Meta's servers."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return (
        address.is_loopback or address.is_private or address.is_link_local or address.is_unspecified
    )


def webhook_url_check(settings: Settings) -> DoctorCheck:
    url = settings.webhook_url
    simulated = is_local_host(urlsplit(settings.meta_graph_base_url).hostname or "")
    bad = CheckStatus.WARN if simulated else CheckStatus.FAIL
    note = " (fine for the local simulator)" if simulated else ""
    if not url:
        return _check(
            "webhook url",
            CheckStatus.WARN,
            "webhookUrl is not set" + note,
            "Set webhookUrl to the public HTTPS URL Meta posts to (…/webhooks/meta) and enter "
            "the same URL in the Meta app's webhook settings.",
        )
    parts = urlsplit(url)
    if parts.scheme != "https":
        return _check(
            "webhook url",
            bad,
            f"webhookUrl {url} is not HTTPS{note}",
            "Meta only delivers webhooks to HTTPS URLs with a valid certificate: put the "
            "service behind a TLS reverse proxy or tunnel.",
        )
    if is_local_host(parts.hostname or ""):
        return _check(
            "webhook url",
            bad,
            f"webhookUrl {url} is a local address Meta cannot reach{note}",
            "Use a public host name (a reverse proxy or a tunnel to this machine).",
        )
    return _check("webhook url", CheckStatus.OK, f"{url} (HTTPS, public host)")


def webhook_security_check(settings: Settings) -> DoctorCheck:
    missing = [
        key
        for key, name in (
            ("metaAppSecret", "meta_app_secret"),
            ("metaVerifyToken", "meta_verify_token"),
        )
        if not settings.secret(name)
    ]
    if missing:
        return _check(
            "webhook security",
            CheckStatus.FAIL,
            f"{' and '.join(missing)} not set: Meta webhooks will be refused",
            "Set metaAppSecret (Meta app > App settings > Basic > App secret) and "
            "metaVerifyToken (the Verify token you choose in the app's webhook settings).",
        )
    return _check("webhook security", CheckStatus.OK, "signature secret and verify token set")


async def run(settings: Settings) -> list[DoctorCheck]:
    checks: list[DoctorCheck] = []
    if not settings.meta_phone_number_id or not settings.meta_access_token:
        checks.append(
            _check(
                "graph api",
                CheckStatus.FAIL,
                "metaPhoneNumberId and metaAccessToken are needed to reach the Graph API",
                "Set both (WhatsApp Manager > API Setup shows the phone number id).",
            )
        )
    else:
        try:
            number = await client.get_phone_number(settings, DOCTOR_POLICY)
        except WhatsAppCallError as exc:
            checks.append(_check("access token", CheckStatus.FAIL, exc.message, exc.hint))
        else:
            shown = number.get("display_phone_number") or settings.meta_phone_number_id
            name = number.get("verified_name")
            checks.append(
                _check(
                    "access token",
                    CheckStatus.OK,
                    f"accepted; business number {shown}" + (f" ({name})" if name else ""),
                )
            )
            checks.append(await _calling_check(settings))
    checks.append(webhook_security_check(settings))
    checks.append(webhook_url_check(settings))
    return checks


async def _calling_check(settings: Settings) -> DoctorCheck:
    try:
        data = await client.get_calling_settings(settings, DOCTOR_POLICY)
    except WhatsAppCallError as exc:
        return _check("calling", CheckStatus.FAIL, exc.message, exc.hint)
    calling = data.get("calling")
    status = calling.get("status") if isinstance(calling, dict) else None
    if str(status).upper() != "ENABLED":
        return _check(
            "calling",
            CheckStatus.FAIL,
            f"calling is not enabled on this number (status {status or 'missing'})",
            client.HINTS[138000],
        )
    restrictions = calling.get("restrictions") if isinstance(calling, dict) else None
    listed = restrictions.get("restrictions_list") if isinstance(restrictions, dict) else None
    if isinstance(listed, list) and listed:
        first = listed[0] if isinstance(listed[0], dict) else {}
        until = to_datetime(first.get("expiration"))
        return _check(
            "calling",
            CheckStatus.WARN,
            f"enabled but restricted by Meta: {first.get('type', 'restriction')}"
            + (f" until {until:%Y-%m-%d %H:%M} UTC" if until else "")
            + (f" ({first['reason']})" if first.get("reason") else ""),
            "See WhatsApp Manager > Phone numbers for the quality rating and user feedback.",
        )
    return _check("calling", CheckStatus.OK, "enabled")
