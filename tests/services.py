"""Real PostgreSQL and Redis servers for tests: started on 127.0.0.1 on free ports, with their
data in a temporary directory, stopped (and the directory removed) at the end.

Import the session fixtures into a test module (`from services import postgres_server,
redis_server`) so each server starts once per test run. When a server's binaries are missing
the fixture FAILS, naming the Debian package to install: a cluster test skipped silently
would hide a broken deployment path.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
PG_USER = "wacall"
PG_DATABASE = "postgres"


@dataclass
class RunningServer:
    """One started server. `url` is what the code under test is given."""

    name: str
    host: str
    port: int
    url: str
    password: str
    workdir: Path
    process: subprocess.Popen
    log_path: Path
    argv: list[str]
    popen_kwargs: dict
    ready: Callable[[], bool]
    stop_signal: int = signal.SIGTERM
    extra: dict[str, str] = field(default_factory=dict)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, sig: int | None = None) -> None:
        """Stop the server and wait for it (SIGKILL after a grace period)."""
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal if sig is None else sig)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)

    def start(self) -> None:
        """Start it (again) on the same port and data, and wait until it serves."""
        if self.process.poll() is None:
            return
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                **self.popen_kwargs,
            )
        _wait_until(self.ready, self, self.name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _wait_until(ready, server: RunningServer, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{what} exited with code {server.process.returncode} while starting:\n"
                + server.log_tail()
            )
        if ready():
            return
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    raise RuntimeError(
        f"{what} did not become ready in {START_TIMEOUT:.0f} s:\n" + server.log_tail()
    )


# -- Redis ---------------------------------------------------------------------------------------


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(
            "redis-server is not installed; the cluster event bus tests need a real Redis. "
            "Install it with: apt-get install -y redis-server",
            pytrace=False,
        )
    return path


def _redis_ping(port: int, password: str) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            sock.sendall(f"AUTH {password}\r\nPING\r\n".encode())
            reply = b""
            while b"PONG" not in reply and len(reply) < 1024:
                chunk = sock.recv(256)
                if not chunk:
                    return False
                reply += chunk
            return True
    except OSError:
        return False


@contextlib.contextmanager
def start_redis() -> Iterator[RunningServer]:
    """A throw-away redis-server: no persistence, password-protected, loopback only."""
    binary = redis_binary()
    workdir = Path(tempfile.mkdtemp(prefix="wacall-redis-"))
    port = free_port()
    password = secrets.token_hex(12)
    log_path = workdir / "redis.log"
    config = workdir / "redis.conf"
    # The password goes in a 0600 config file, never on the command line (`ps` shows argv).
    config.write_text(
        "\n".join(
            [
                f"bind {HOST}",
                f"port {port}",
                f"dir {workdir}",
                f"logfile {log_path}",
                f"requirepass {password}",
                'save ""',
                "appendonly no",
                "daemonize no",
                "protected-mode yes",
            ]
        )
        + "\n"
    )
    os.chmod(config, 0o600)
    argv = [binary, str(config)]
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    server = RunningServer(
        name="redis",
        host=HOST,
        port=port,
        url=f"redis://:{password}@{HOST}:{port}/0",
        password=password,
        workdir=workdir,
        process=process,
        log_path=log_path,
        argv=argv,
        popen_kwargs={},
        ready=lambda: _redis_ping(port, password),
    )
    try:
        _wait_until(server.ready, server, "redis-server")
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# -- PostgreSQL ----------------------------------------------------------------------------------


def postgres_bindir() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian puts it off PATH)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is not None:
        return Path(initdb).parent
    pytest.fail(
        "PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin); the "
        "PostgreSQL call store tests need a real server. Install it with: "
        "apt-get install -y postgresql",
        pytrace=False,
    )


def _server_user() -> pwd.struct_passwd | None:
    """The unprivileged account to run PostgreSQL as (it refuses to run as root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail(
            "Tests run as root, and PostgreSQL refuses to; the 'postgres' account that the "
            "Debian package creates is missing. Install it with: apt-get install -y postgresql",
            pytrace=False,
        )


def _as_user(account: pwd.struct_passwd | None) -> dict:
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _pg_ready(bindir: Path, port: int) -> bool:
    result = subprocess.run(
        [str(bindir / "pg_isready"), "-q", "-h", HOST, "-p", str(port), "-t", "1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=5,
        check=False,
    )
    return result.returncode == 0


@contextlib.contextmanager
def start_postgres() -> Iterator[RunningServer]:
    """A throw-away PostgreSQL cluster: password (SCRAM) authentication, loopback only,
    durability off (fsync) since the data dies with the test run anyway."""
    bindir = postgres_bindir()
    account = _server_user()
    workdir = Path(tempfile.mkdtemp(prefix="wacall-pg-"))
    data = workdir / "data"
    sockets = workdir / "sock"
    sockets.mkdir()
    password = secrets.token_hex(12)
    pwfile = workdir / "pwfile"
    pwfile.write_text(password + "\n")
    os.chmod(pwfile, 0o600)
    log_path = workdir / "postgres.log"
    log_path.touch()
    if account is not None:
        for path in (workdir, sockets, pwfile, log_path):
            os.chown(path, account.pw_uid, account.pw_gid)
    port = free_port()
    try:
        init = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                PG_USER,
                "--pwfile",
                str(pwfile),
                "--auth",
                "scram-sha-256",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=workdir,
            **_as_user(account),
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        pwfile.unlink()
        argv = [
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(sockets),
            "-c",
            f"listen_addresses={HOST}",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
        ]
        popen_kwargs = {"cwd": workdir, **_as_user(account)}
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                **popen_kwargs,
            )
        server = RunningServer(
            name="postgresql",
            host=HOST,
            port=port,
            url=f"postgresql://{PG_USER}:{password}@{HOST}:{port}/{PG_DATABASE}",
            password=password,
            workdir=workdir,
            process=process,
            log_path=log_path,
            argv=argv,
            popen_kwargs=popen_kwargs,
            ready=lambda: _pg_ready(bindir, port),
            # "fast" shutdown: ends open sessions (SIGTERM would wait for every client).
            stop_signal=signal.SIGINT,
            extra={"user": PG_USER, "database": PG_DATABASE, "bindir": str(bindir)},
        )
        try:
            _wait_until(server.ready, server, "postgres")
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- pytest fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RunningServer]:
    with start_redis() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[RunningServer]:
    with start_postgres() as server:
        yield server
