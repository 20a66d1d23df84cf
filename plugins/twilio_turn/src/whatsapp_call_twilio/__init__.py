"""Twilio Network Traversal Service (TURN credentials) for whatsapp-call.

With `twilioAccountSid` and `twilioAuthToken` set, every call gets Twilio's STUN/TURN servers
from one form-encoded `POST {twilioApiBaseUrl}/2010-04-01/Accounts/{sid}/Tokens.json`
(basic auth, `Ttl` = `twilioTtlSeconds`). Tokens are cached per account until 80% of their
TTL has passed, so most calls cost no request.

Order matters: aiortc uses only the first STUN URL and the first TURN URL of the merged list.
We set `IceServer.priority` so TURN over UDP comes first (20), then TURN over TCP (30),
then `turns:` (40), then STUN (60): after core's `stunServers` (50), so a configured STUN
server is used before Twilio's. With `twilioTurnTransport: tcp` (networks that block UDP) TURN
over TCP comes first, port 443 before others.

A failure (bad credentials, Twilio 5xx, timeout, unreachable) never fails a call: a warning
is logged (no secrets), `last_error(settings)` returns it until the next success, and the
hook returns an empty list, so the call proceeds with STUN only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel
from whatsapp_call import __version__, hookimpl
from whatsapp_call.errors import WhatsAppCallError
from whatsapp_call.models import CheckStatus, DoctorCheck, IceServer
from whatsapp_call.providers.http import tls_context
from whatsapp_call.redact import scrub

log = logging.getLogger("whatsapp_call_twilio")

SOURCE = "twilio"
TOKENS_ENDPOINT = "/2010-04-01/Accounts/{sid}/Tokens.json"
ACCOUNT_SID_RE = re.compile(r"^AC[0-9a-fA-F]{32}$")
TIMEOUT = httpx.Timeout(5.0, connect=3.0)
ATTEMPTS = 2  # one retry, on 5xx/429 and connection failures only (not on timeouts)
RETRY_DELAY = 0.25
REFRESH_FRACTION = 0.8

PRIORITY_FIRST_TURN = 20
PRIORITY_OTHER_TURN = 30
PRIORITY_TURNS = 40
PRIORITY_STUN = 60
PRIORITY_OTHER = 70

_URL_RE = re.compile(r"^(?P<scheme>stuns?|turns?):(?P<host>\[[^\]]+\]|[^:?]+)(?::(?P<port>\d+))?")


class TwilioSettings(BaseModel):
    """This plugin's own option (core already has the twilio* credentials and TTL)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    twilio_turn_transport: Literal["udp", "tcp"] = "udp"


class TwilioError(WhatsAppCallError):
    """A Tokens request failed. `http_status`/`code` are Twilio's when it answered."""

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        http_status: int | None = None,
        code: int | str | None = None,
    ):
        self.http_status = http_status
        self.code = code
        super().__init__(scrub(message), hint)


@dataclass
class _Cached:
    servers: list[IceServer]
    refresh_at: float  # _clock() time after which a new token is fetched


_clock = time.monotonic  # module-level so tests can move time forward
_cache: dict[tuple[str, str, int, str], _Cached] = {}
_last_errors: dict[tuple[str, str], str] = {}
_latest: list[tuple[str, str] | None] = [None]  # the account of the most recent fetch
_client: httpx.AsyncClient | None = None
_client_loop: asyncio.AbstractEventLoop | None = None
_locks: dict[tuple[str, str, int, str], asyncio.Lock] = {}


def _masked_sid(sid: str) -> str:
    return sid[:4] + "…" + sid[-4:] if len(sid) > 10 else sid


def _get_client() -> httpx.AsyncClient:
    """One shared client (connection pool) per event loop."""
    global _client, _client_loop, _locks
    loop = asyncio.get_running_loop()
    if _client is None or _client_loop is not loop or _client.is_closed:
        _client = httpx.AsyncClient(
            verify=tls_context(),
            timeout=TIMEOUT,
            headers={
                "Accept": "application/json",
                "User-Agent": f"whatsapp-call-twilio/{__version__}",
            },
        )
        _client_loop = loop
        _locks = {}  # asyncio locks belong to a loop too
    return _client


async def aclose() -> None:
    """Close the shared HTTP client (the service calls this at shut-down)."""
    global _client, _client_loop
    if _client is not None and _client_loop is asyncio.get_running_loop():
        await _client.aclose()
    _client = None
    _client_loop = None


def clear_cache() -> None:
    """Forget cached tokens and recorded errors (tests; after a credential change)."""
    _cache.clear()
    _last_errors.clear()
    _latest[0] = None


def _account_key(settings: Any) -> tuple[str, str]:
    return (settings.twilio_api_base_url, settings.twilio_account_sid or "")


def last_error(settings: Any = None) -> str | None:
    """The warning of the last failed fetch for this account (without `settings`: of the
    most recent fetch, any account); None after a success.

    The orchestrator reads it after `fetch_ice_servers` to note in the call record why the
    call runs without TURN. It never contains a secret.
    """
    key = _account_key(settings) if settings is not None else _latest[0]
    return _last_errors.get(key) if key is not None else None


def _credentials(settings: Any) -> tuple[str, str] | None:
    """(sid, token), None when TURN is not configured; TwilioError when half-configured."""
    sid = settings.twilio_account_sid
    token = settings.secret("twilio_auth_token")
    if not sid and not token:
        return None
    if not sid or not token:
        missing = "twilioAccountSid" if not sid else "twilioAuthToken"
        raise TwilioError(
            f"Twilio TURN is half-configured: {missing} is not set.",
            "Set both twilioAccountSid and twilioAuthToken, or neither (STUN only).",
        )
    if not ACCOUNT_SID_RE.fullmatch(sid):
        raise TwilioError(
            f"twilioAccountSid {_masked_sid(sid)!r} is not an Account SID ('AC' + 32 hex digits).",
            "Copy the Account SID from the Twilio Console (Account info); API key SIDs (SK…) "
            "are not accepted here.",
        )
    return sid, token


def _error_from_response(response: httpx.Response, sid: str) -> TwilioError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    code = body.get("code") if isinstance(body, dict) else None
    text = body.get("message") if isinstance(body, dict) else None
    twilio = f"HTTP {response.status_code}" + (f", Twilio code {code}" if code else "")
    twilio += f": {text}" if text else ""
    status = response.status_code
    if status in (401, 403):
        return TwilioError(
            f"Twilio rejected the credentials of account {_masked_sid(sid)} ({twilio}).",
            "Check twilioAccountSid and twilioAuthToken (Twilio Console, Account info).",
            http_status=status,
            code=code,
        )
    if status == 404:
        return TwilioError(
            f"Twilio does not know account {_masked_sid(sid)} ({twilio}).",
            "Check twilioAccountSid, and twilioApiBaseUrl (normally https://api.twilio.com).",
            http_status=status,
            code=code,
        )
    if status == 429 or status >= 500:
        return TwilioError(
            f"Twilio failed to issue TURN credentials ({twilio}).",
            "A Twilio-side or rate-limit problem; it usually passes. Calls use STUN only meanwhile.",
            http_status=status,
            code=code,
        )
    return TwilioError(
        f"Twilio refused the TURN token request ({twilio}).",
        "Check twilioTtlSeconds (1-86400) and twilioApiBaseUrl.",
        http_status=status,
        code=code,
    )


async def fetch_token(
    base_url: str, account_sid: str, auth_token: str, ttl: int | None = None
) -> dict[str, Any]:
    """POST the Tokens request; returns Twilio's JSON. Raises TwilioError (no secrets)."""
    url = base_url.rstrip("/") + TOKENS_ENDPOINT.format(sid=account_sid)
    data = {"Ttl": str(ttl)} if ttl is not None else {}
    client = _get_client()
    for attempt in range(1, ATTEMPTS + 1):
        try:
            response = await client.post(url, data=data, auth=(account_sid, auth_token))
        except httpx.TimeoutException:
            raise TwilioError(
                f"Twilio did not answer the TURN token request within {TIMEOUT.read:.0f} s "
                f"({base_url}).",
                "Check this machine's network access to twilioApiBaseUrl.",
            ) from None
        except httpx.TransportError as exc:
            if attempt < ATTEMPTS:
                await asyncio.sleep(RETRY_DELAY)
                continue
            raise TwilioError(
                f"Cannot reach Twilio at {base_url}: {type(exc).__name__}: {exc}",
                "Check twilioApiBaseUrl and this machine's network access to it.",
            ) from None
        if response.status_code in (200, 201):
            try:
                body = response.json()
            except ValueError:
                body = None
            if not isinstance(body, dict) or not isinstance(body.get("ice_servers"), list):
                raise TwilioError(
                    f"Twilio answered HTTP {response.status_code} without an ice_servers list.",
                    "Check that twilioApiBaseUrl points at the Twilio REST API.",
                    http_status=response.status_code,
                )
            return body
        if (response.status_code == 429 or response.status_code >= 500) and attempt < ATTEMPTS:
            await asyncio.sleep(RETRY_DELAY)
            continue
        raise _error_from_response(response, account_sid)
    raise AssertionError("unreachable")  # the loop always returns or raises


def _priority(url: str, prefer: str) -> int:
    match = _URL_RE.match(url)
    if match is None:
        return PRIORITY_OTHER
    scheme = match["scheme"]
    if scheme == "stun":
        return PRIORITY_STUN
    if scheme == "turns":
        return PRIORITY_TURNS
    if scheme != "turn":
        return PRIORITY_OTHER
    transport = re.search(r"[?&]transport=(\w+)", url)
    proto = transport.group(1).lower() if transport else "udp"  # RFC 7065 default
    if proto != prefer:
        return PRIORITY_OTHER_TURN
    if prefer == "tcp" and match["port"] != "443":
        return PRIORITY_FIRST_TURN + 1  # TCP/443 passes more firewalls than TCP/3478
    return PRIORITY_FIRST_TURN


def ice_servers_from_token(body: dict[str, Any], prefer: str = "udp") -> list[IceServer]:
    """Map Twilio's `ice_servers` (`urls` one string, legacy `url`) to IceServers, ordered
    by priority (ties keep Twilio's order)."""
    out = []
    for entry in body.get("ice_servers") or []:
        if not isinstance(entry, dict):
            continue
        urls = entry.get("urls") or entry.get("url")
        if isinstance(urls, str):
            urls = [urls]
        if not isinstance(urls, list):
            continue
        for url in urls:
            if not isinstance(url, str) or not url:
                continue
            is_turn = url.startswith(("turn:", "turns:"))
            out.append(
                IceServer(
                    urls=(url,),
                    username=entry.get("username") if is_turn else None,
                    credential=entry.get("credential") if is_turn else None,
                    priority=_priority(url, prefer),
                    source=SOURCE,
                )
            )
    return sorted(out, key=lambda server: server.priority)


def _transport(settings: Any) -> str:
    return settings.plugin_settings(TwilioSettings).twilio_turn_transport


def _ttl_of(body: dict[str, Any], requested: int) -> int:
    try:
        return max(1, int(body.get("ttl", requested)))
    except (TypeError, ValueError):
        return requested


@hookimpl
def settings_model() -> type[BaseModel]:
    return TwilioSettings


@hookimpl
async def fetch_ice_servers(settings: Any) -> list[IceServer] | None:
    """Twilio's STUN/TURN servers for the next call; [] (and a warning) on failure."""
    account = _account_key(settings)
    try:
        credentials = _credentials(settings)
    except TwilioError as exc:
        return _failed(account, exc)
    if credentials is None:
        return None
    _latest[0] = account
    sid, token = credentials
    ttl = settings.twilio_ttl_seconds
    prefer = _transport(settings)
    key = (settings.twilio_api_base_url, sid, ttl, prefer)
    cached = _cache.get(key)
    if cached is not None and _clock() < cached.refresh_at:
        return list(cached.servers)
    _get_client()
    lock = _locks.setdefault(key, asyncio.Lock())
    async with lock:  # concurrent calls share one fetch
        cached = _cache.get(key)
        if cached is not None and _clock() < cached.refresh_at:
            return list(cached.servers)
        started = _clock()
        try:
            body = await fetch_token(settings.twilio_api_base_url, sid, token, ttl)
        except TwilioError as exc:
            return _failed(account, exc)
        servers = ice_servers_from_token(body, prefer)
        _cache[key] = _Cached(servers, started + REFRESH_FRACTION * _ttl_of(body, ttl))
        _last_errors.pop(account, None)
        log.debug("Twilio TURN token for %s: %d ICE servers", _masked_sid(sid), len(servers))
        return list(servers)


def _failed(account: tuple[str, str], exc: TwilioError) -> list[IceServer]:
    message = f"No Twilio TURN servers for this call (STUN only): {exc.message}"
    _last_errors[account] = message
    _latest[0] = account
    log.warning("%s Fix: %s", message, exc.hint)
    return []


@hookimpl
async def doctor_checks(settings: Any) -> list[DoctorCheck]:
    """Credentials set and accepted: a live token request (not cached)."""
    name = "twilio turn"
    try:
        credentials = _credentials(settings)
    except TwilioError as exc:
        return [DoctorCheck(name, CheckStatus.FAIL, exc.message, exc.hint)]
    if credentials is None:
        return [
            DoctorCheck(
                name,
                CheckStatus.WARN,
                "not configured: calls use STUN only, no TURN relay",
                "Optional. Set twilioAccountSid and twilioAuthToken so calls can relay media "
                "through Twilio TURN when a direct path is blocked (strict NAT, firewalls).",
            )
        ]
    sid, token = credentials
    try:
        body = await fetch_token(
            settings.twilio_api_base_url, sid, token, settings.twilio_ttl_seconds
        )
    except TwilioError as exc:
        return [DoctorCheck(name, CheckStatus.FAIL, exc.message, exc.hint)]
    servers = ice_servers_from_token(body, _transport(settings))
    turn = [s.urls[0] for s in servers if s.urls[0].startswith(("turn:", "turns:"))]
    if not turn:
        return [
            DoctorCheck(
                name,
                CheckStatus.WARN,
                f"credentials of {_masked_sid(sid)} accepted, but Twilio returned no TURN server",
                "Check twilioApiBaseUrl; calls will use STUN only.",
            )
        ]
    return [
        DoctorCheck(
            name,
            CheckStatus.OK,
            f"credentials of {_masked_sid(sid)} accepted; {len(servers)} ICE servers, "
            f"first TURN {turn[0]}, ttl {body.get('ttl')} s",
        )
    ]
