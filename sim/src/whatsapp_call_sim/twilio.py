"""A wire-faithful local Twilio Network Traversal Service (TURN credentials).

`POST /2010-04-01/Accounts/{AccountSid}/Tokens.json`, form-encoded, HTTP basic auth
(AccountSid:AuthToken), optional `Ttl`; answers 201 with Twilio's JSON (spec
openai-realtime-and-twilio-turn.md section 7): `ttl` a string, RFC 2822 dates, each
`ice_servers` entry with `urls` as one string plus the legacy `url`.

The entries point at a real TURN server: coturn on 127.0.0.1 when it is installed (see
`turn.py`), so a WebRTC peer can relay through it with the credentials handed out. Without
coturn the answer holds only a STUN entry (a small built-in STUN server) and a warning is
logged: there is no relay then.

Differences from Twilio, on purpose: hosts are 127.0.0.1 and one port serves STUN, TURN/UDP
and TURN/TCP (Twilio also lists TURN/TCP on 443); with coturn the username is coturn's REST
form `<expiry>:<hex>` and the credential a 28-character HMAC (Twilio's look like 64 hex and
44 base64 characters): clients must treat both as opaque strings.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .turn import StunServer, TurnServer

log = logging.getLogger("whatsapp_call_sim.twilio")

DEFAULT_ACCOUNT_SID = "AC" + "5ea1" * 8
DEFAULT_AUTH_TOKEN = "sim-twilio-auth-token"  # noqa: S105 - the simulator's documented default
ACCOUNT_SID_RE = re.compile(r"^AC[0-9a-fA-F]{32}$")
DEFAULT_TTL = 86400
MAX_TTL = 86400

_ERROR_MESSAGES = {
    400: (20001, "Invalid parameter"),
    401: (20003, "Authenticate"),
    404: (20404, "The requested resource {path} was not found"),
    405: (20004, "Method not allowed"),
    429: (20429, "Too Many Requests"),
    500: (20500, "Internal Server Error"),
    503: (20503, "Service Unavailable"),
}


def twilio_error(status: int, path: str = "", message: str | None = None) -> JSONResponse:
    """Twilio's standard JSON error body: code, message, more_info, status."""
    code, default = _ERROR_MESSAGES.get(status, (20500, "Internal Server Error"))
    body = {
        "code": code,
        "message": message or default.format(path=path),
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    headers = {"WWW-Authenticate": 'Basic realm="Twilio API"'} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


async def _form(request: Request) -> dict[str, str]:
    """The urlencoded form fields (last value wins). Parsed by hand: Starlette's
    `request.form()` needs python-multipart just for this one field."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    body = (await request.body()).decode("utf-8", errors="replace")
    return dict(parse_qsl(body, keep_blank_values=True))


@dataclass
class TokenRequest:
    """One request the simulator received (no credentials kept): for tests and logs."""

    account_sid: str
    ttl: str | None
    status: int
    at: float = field(default_factory=time.time)


class TwilioSimulator:
    """The Tokens endpoint plus a real STUN/TURN server behind the URLs it hands out.

    `turn`: None = use coturn when installed, else STUN only (with a warning); True = require
    coturn; False = STUN only. Tests can inject failures with `fail_next(status)`, slow the
    answer with `delay_seconds`, or replace the `ice_servers` list with `ice_servers_override`.
    """

    def __init__(
        self,
        account_sid: str = DEFAULT_ACCOUNT_SID,
        auth_token: str = DEFAULT_AUTH_TOKEN,
        *,
        turn: bool | None = None,
        host: str = "127.0.0.1",
    ):
        if not ACCOUNT_SID_RE.fullmatch(account_sid):
            raise ValueError("account_sid must look like 'AC' followed by 32 hex digits")
        self.account_sid = account_sid
        self._auth_token = auth_token
        self.host = host
        self._turn_wanted = turn
        self.turn_server: TurnServer | None = None
        self.stun_server: StunServer | None = None
        self.requests: list[TokenRequest] = []
        self.delay_seconds = 0.0
        self.ice_servers_override: list[dict[str, Any]] | None = None
        self._failures: list[int] = []
        self._server: Any = None
        self.url: str | None = None
        self.app = Starlette(
            routes=[
                Route(
                    "/2010-04-01/Accounts/{account_sid}/Tokens.json",
                    self._tokens,
                    methods=["GET", "POST", "PUT", "DELETE"],
                )
            ]
        )

    def __repr__(self) -> str:
        return f"TwilioSimulator(account_sid={self.account_sid!r}, url={self.url!r}, relay={self.relay_available})"

    @property
    def auth_token(self) -> str:
        return self._auth_token

    @property
    def relay_available(self) -> bool:
        """True when a real TURN relay (coturn) backs the handed-out credentials."""
        return self.turn_server is not None and self.turn_server.port is not None

    def fail_next(self, status: int, times: int = 1) -> None:
        """Answer the next `times` authenticated requests with Twilio's error for `status`."""
        self._failures.extend([status] * times)

    async def start(self, host: str | None = None, port: int = 0) -> str:
        """Start TURN/STUN and the HTTP API; returns the base URL (`twilioApiBaseUrl`)."""
        from whatsapp_call.serving import AsgiServer

        host = host or self.host
        self.host = host
        await self._start_turn()
        self._server = AsgiServer(self.app, host, port)
        self.url = await self._server.start()
        return self.url

    async def _start_turn(self) -> None:
        if self._turn_wanted is not False and TurnServer.available():
            turn = TurnServer(self.host)
            try:
                await turn.start()
                self.turn_server = turn
                return
            except (RuntimeError, OSError) as exc:
                if self._turn_wanted:
                    raise
                log.warning("coturn failed to start (%s); handing out STUN only, no TURN", exc)
        elif self._turn_wanted:
            raise RuntimeError(
                "TwilioSimulator(turn=True) needs coturn's turnserver: apt-get install coturn"
            )
        else:
            log.warning(
                "coturn (turnserver) is not installed: the Twilio simulator hands out a "
                "loopback STUN server only, no TURN relay. Install it with: apt-get install coturn"
            )
        self.stun_server = StunServer(self.host)
        await self.stun_server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None
        if self.turn_server is not None:
            await self.turn_server.stop()
            self.turn_server = None
        if self.stun_server is not None:
            await self.stun_server.stop()
            self.stun_server = None

    async def __aenter__(self) -> TwilioSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the endpoint ---------------------------------------------------------------------

    def _authenticated_as(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic" or not encoded:
            return None
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if not sep:
            return None
        ok_user = hmac.compare_digest(user.encode(), self.account_sid.encode())
        ok_password = hmac.compare_digest(password.encode(), self._auth_token.encode())
        return user if ok_user and ok_password else None

    async def _tokens(self, request: Request) -> JSONResponse:
        sid = request.path_params["account_sid"]
        path = request.url.path
        if self._authenticated_as(request) is None:
            self.requests.append(TokenRequest(sid, None, 401))
            return twilio_error(401)
        if not ACCOUNT_SID_RE.fullmatch(sid) or sid != self.account_sid:
            self.requests.append(TokenRequest(sid, None, 404))
            return twilio_error(404, path)
        if request.method != "POST":
            self.requests.append(TokenRequest(sid, None, 405))
            return twilio_error(405)
        ttl_text = (await _form(request)).get("Ttl")
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        if self._failures:
            status = self._failures.pop(0)
            self.requests.append(TokenRequest(sid, ttl_text, status))
            return twilio_error(status, path)
        ttl = DEFAULT_TTL
        if ttl_text is not None:
            if not re.fullmatch(r"\d+", ttl_text.strip()) or not 1 <= int(ttl_text) <= MAX_TTL:
                self.requests.append(TokenRequest(sid, ttl_text, 400))
                return twilio_error(
                    400, path, f"Invalid Ttl {ttl_text!r}: must be an integer from 1 to {MAX_TTL}"
                )
            ttl = int(ttl_text)
        self.requests.append(TokenRequest(sid, ttl_text, 201))
        return JSONResponse(self.token_body(ttl), status_code=201)

    def token_body(self, ttl: int) -> dict[str, Any]:
        """The 201 body for a token of `ttl` seconds, with fresh credentials."""
        if self.turn_server is not None:
            username, password = self.turn_server.credentials(ttl)
        else:  # no relay: Twilio-format values, which nothing checks
            username = secrets.token_hex(32)
            password = base64.b64encode(secrets.token_bytes(32)).decode()
        now = format_datetime(datetime.now(UTC).replace(microsecond=0))
        return {
            "account_sid": self.account_sid,
            "date_created": now,
            "date_updated": now,
            "ttl": str(ttl),
            "username": username,
            "password": password,
            "ice_servers": self.ice_servers(username, password),
        }

    def ice_servers(self, username: str, password: str) -> list[dict[str, Any]]:
        """STUN first, then TURN/UDP, then TURN/TCP: Twilio's order."""
        if self.ice_servers_override is not None:
            return [dict(entry) for entry in self.ice_servers_override]
        entries: list[dict[str, Any]] = []
        server = self.turn_server or self.stun_server
        if server is None:
            return entries
        urls = server.urls()
        entries.append({"url": urls["stun"], "urls": urls["stun"]})
        for key in ("turn_udp", "turn_tcp"):
            if key in urls:
                entries.append(
                    {
                        "url": urls[key],
                        "urls": urls[key],
                        "username": username,
                        "credential": password,
                    }
                )
        return entries
