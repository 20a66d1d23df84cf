"""A real local STUN/TURN server for the Twilio simulator.

When coturn's `turnserver` is installed (Debian: `apt-get install coturn`), `TurnServer`
runs it on 127.0.0.1 with a free port, no TLS/DTLS, no CLI, relaying only on 127.0.0.1 and
allowing loopback peers (coturn refuses 127.0.0.1 peers by default). Credentials use
coturn's TURN REST API scheme (`use-auth-secret`): any username of the form
`<expiry unix time>:<anything>` with credential base64(HMAC-SHA1(secret, username)) is
valid until that expiry, so every token the simulator mints works without telling coturn.

Without coturn, `StunServer` answers STUN Binding requests on 127.0.0.1 (enough for srflx
candidates) and there is no TURN relay; the simulator says so in its log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path

from aioice import stun

log = logging.getLogger("whatsapp_call_sim.turn")

TURNSERVER = "turnserver"


def turnserver_path() -> str | None:
    """Where coturn's `turnserver` is, or None when it is not installed."""
    return shutil.which(TURNSERVER) or next(
        (p for p in ("/usr/bin/turnserver", "/usr/sbin/turnserver") if Path(p).exists()), None
    )


def _free_udp_tcp_port(host: str) -> int:
    """A port free for both UDP and TCP on `host` (TURN listens on both, same number)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError(f"no port free for both UDP and TCP on {host}")


async def stun_binding(host: str, port: int, timeout: float = 1.0) -> tuple[str, int]:
    """Send one STUN Binding request over UDP; return the XOR-MAPPED-ADDRESS."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes] = loop.create_future()

    class _Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if not answer.done():
                answer.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(_Proto, local_addr=(host, 0))
    try:
        request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        transport.sendto(bytes(request), (host, port))
        async with asyncio.timeout(timeout):
            response = stun.parse_message(await answer)
        return response.attributes["XOR-MAPPED-ADDRESS"]
    finally:
        transport.close()


class TurnServer:
    """coturn on `host` (loopback) with REST-API credentials; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", realm: str = "sim.twilio.local"):
        self.host = host
        self.realm = realm
        self.port: int | None = None
        self._secret = secrets.token_urlsafe(32)
        self._process: asyncio.subprocess.Process | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def __repr__(self) -> str:
        return f"TurnServer(host={self.host!r}, port={self.port!r})"

    @staticmethod
    def available() -> bool:
        return turnserver_path() is not None

    @property
    def log_path(self) -> Path | None:
        return Path(self._dir.name) / "turnserver.log" if self._dir else None

    def urls(self) -> dict[str, str]:
        """The server's URLs, by kind: stun, turn_udp, turn_tcp."""
        if self.port is None:
            raise RuntimeError("TurnServer is not started")
        base = f"{self.host}:{self.port}"
        return {
            "stun": f"stun:{base}",
            "turn_udp": f"turn:{base}?transport=udp",
            "turn_tcp": f"turn:{base}?transport=tcp",
        }

    def credentials(self, ttl: int, now: float | None = None) -> tuple[str, str]:
        """A (username, credential) pair coturn accepts for `ttl` seconds."""
        expiry = int(now if now is not None else time.time()) + int(ttl)
        username = f"{expiry}:{secrets.token_hex(16)}"
        digest = hmac.new(self._secret.encode(), username.encode(), hashlib.sha1).digest()
        return username, base64.b64encode(digest).decode()

    async def start(self, timeout: float = 10.0) -> None:
        binary = turnserver_path()
        if binary is None:
            raise RuntimeError("coturn's turnserver is not installed (apt-get install coturn)")
        self._dir = tempfile.TemporaryDirectory(prefix="wacall-turn-")
        workdir = Path(self._dir.name)
        conf = workdir / "turnserver.conf"
        # The secret goes in a private file, not on the command line (visible in `ps`).
        conf.touch(mode=0o600)
        conf.write_text(f"static-auth-secret={self._secret}\n", encoding="utf-8")
        self.port = _free_udp_tcp_port(self.host)
        args = [
            "-c", str(conf),
            "--listening-ip", self.host,
            "--relay-ip", self.host,
            "--listening-port", str(self.port),
            "--realm", self.realm,
            "--use-auth-secret",
            "--fingerprint",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--no-rfc5780",
            "--allow-loopback-peers",
            "--no-multicast-peers",
            "--no-software-attribute",
            "--userdb", str(workdir / "turndb"),
            "--pidfile", str(workdir / "turnserver.pid"),
            "--log-file", str(self.log_path),
            "--simple-log",
            "--no-stdout-log",
        ]  # fmt: skip
        self._process = await asyncio.create_subprocess_exec(
            binary,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal is ours to handle, not coturn's
        )
        try:
            await self._wait_ready(timeout)
        except BaseException:
            await self.stop()
            raise
        log.info("coturn TURN server on %s:%s (udp+tcp)", self.host, self.port)

    async def _wait_ready(self, timeout: float) -> None:
        assert self._process is not None and self.port is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._process.returncode is not None:
                raise RuntimeError(
                    f"turnserver exited with status {self._process.returncode} at start-up; "
                    f"see its log: {self._log_tail()}"
                )
            with contextlib.suppress(TimeoutError, OSError, ValueError, KeyError):
                await stun_binding(self.host, self.port, timeout=0.3)
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"turnserver did not answer STUN within {timeout:.0f} s")
            await asyncio.sleep(0.05)

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-5:])  # type: ignore[union-attr]
        except OSError:
            return "(no log)"

    async def stop(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(timeout):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


class _StunProtocol(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            request = stun.parse_message(data)
        except ValueError:
            return
        if request.message_method != stun.Method.BINDING or (
            request.message_class != stun.Class.REQUEST
        ):
            return
        response = stun.Message(
            message_method=stun.Method.BINDING,
            message_class=stun.Class.RESPONSE,
            transaction_id=request.transaction_id,
        )
        response.attributes["XOR-MAPPED-ADDRESS"] = (addr[0], addr[1])
        response.add_fingerprint()
        self.transport.sendto(bytes(response), addr)  # type: ignore[attr-defined]


class StunServer:
    """A minimal STUN (RFC 5389 Binding) server on UDP: the fallback without coturn."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.port: int | None = None
        self._transport: asyncio.DatagramTransport | None = None

    def urls(self) -> dict[str, str]:
        if self.port is None:
            raise RuntimeError("StunServer is not started")
        return {"stun": f"stun:{self.host}:{self.port}"}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            _StunProtocol, local_addr=(self.host, 0)
        )
        self.port = self._transport.get_extra_info("sockname")[1]
        log.info("STUN server on %s:%s (no TURN: coturn is not installed)", self.host, self.port)

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
