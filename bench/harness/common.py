"""Standard-library-only helpers shared by every benchmark process (the pipecat peer runs in
its own virtual environment, where only this module of ours is importable).

Processes talk in JSON lines: a line starting with `@@` on stdout is a message; anything
else (a library's logging) is ignored, so a chatty dependency cannot break the protocol.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MARK = "@@"
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
PIPECAT_VENV = ROOT / "bench" / ".pipecat" / ".venv"
PIPECAT_REQUIREMENTS = ROOT / "bench" / "pipecat_requirements.txt"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class BenchError(RuntimeError):
    """A benchmark could not run; the message says what failed and how to fix it."""


# ---- JSON lines ----------------------------------------------------------------------------


def emit(message: dict[str, Any]) -> None:
    """Send one message to the parent (stdout)."""
    sys.stdout.write(MARK + json.dumps(message) + "\n")
    sys.stdout.flush()


async def commands() -> Any:
    """Yield the parent's messages (stdin), one dict per line, until stdin closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        line = line.strip()
        if line:
            yield json.loads(line)


class Child:
    """A benchmark child process: `ask()` sends a command and waits for its reply (matched
    by `cmd`+`id`); the child's stderr goes to a log file under bench/results/logs.
    Messages the child sends unasked go to `on_push[cmd]` when there is one."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.on_push: dict[str, Callable[[dict[str, Any]], None]] = {}
        self.proc: asyncio.subprocess.Process | None = None
        self._waiters: dict[tuple[str, Any], asyncio.Future[dict[str, Any]]] = {}
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self.log_path = RESULTS / "logs" / f"{name}.log"

    async def start(self, ready_timeout: float = 60.0) -> dict[str, Any]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: ASYNC230, SIM115 - handed to the child
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            cwd=ROOT,
            env={**os.environ, **(self.env or {})},
            limit=64 * 1024 * 1024,
        )
        log.close()
        self._reader = asyncio.create_task(self._read())
        if ready_timeout <= 0:  # a child that speaks no JSON lines (plain `serve`)
            return {}
        return await self.expect("ready", ready_timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode(errors="replace").strip()
            if not text.startswith(MARK):
                continue
            msg = json.loads(text[len(MARK) :])
            key = (msg.get("cmd"), msg.get("id"))
            waiter = self._waiters.pop(key, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(msg)
            elif msg.get("cmd") in self.on_push:
                self.on_push[msg["cmd"]](msg)
            else:
                self._inbox.put_nowait(msg)
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(self._died())
        self._inbox.put_nowait({"cmd": "exited"})

    def _died(self) -> BenchError:
        tail = ""
        if self.log_path.exists():
            tail = self.log_path.read_text(errors="replace")[-1500:]
        return BenchError(f"benchmark process {self.name} exited; its log ends:\n{tail}")

    async def expect(self, cmd: str, timeout: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                msg = await self._inbox.get()
                if msg.get("cmd") == cmd:
                    if msg.get("error"):
                        raise BenchError(f"{self.name}: {msg['error']}")
                    return msg
                if msg.get("cmd") == "exited":
                    raise self._died()

    async def ask(self, cmd: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        key = (cmd, fields.get("id"))
        future = asyncio.get_running_loop().create_future()
        self._waiters[key] = future
        self.proc.stdin.write((json.dumps({"cmd": cmd, **fields}) + "\n").encode())
        await self.proc.stdin.drain()
        try:
            async with asyncio.timeout(timeout):
                msg = await future
        except TimeoutError:
            raise BenchError(f"{self.name} did not answer {cmd!r} within {timeout:g} s") from None
        finally:
            self._waiters.pop(key, None)
        if msg.get("error"):
            raise BenchError(f"{self.name} failed {cmd!r}: {msg['error']}")
        return msg

    async def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # EOF: the child shuts down cleanly
            async with asyncio.timeout(timeout):
                await self.proc.wait()
        except TimeoutError:
            self.proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()


# ---- /proc ---------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (serve --workers N forks workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its live descendants (all threads)."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its descendants."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


class CpuWindow:
    """CPU cores used by a process tree between `start()` and `stop()`."""

    def __init__(self, pid: int):
        self.pid = pid
        self._cpu0 = self._t0 = 0.0

    def start(self) -> None:
        self._cpu0, self._t0 = cpu_seconds(self.pid), time.monotonic()

    def stop(self) -> float:
        wall = time.monotonic() - self._t0
        return (cpu_seconds(self.pid) - self._cpu0) / wall if wall > 0 else 0.0


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "kernel": platform.release(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), None)
        info["cpu_model"] = model
    except OSError:
        pass
    return info


# ---- numbers -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(float(ordered[k]), 1)


def pcts(values: Sequence[float], qs: Sequence[int] = (50, 95, 99)) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(values)}
    for q in qs:
        out[f"p{q}"] = percentile(values, q)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps(data, indent=2))
    (RESULTS / f"{name}-latest.json").write_text(json.dumps(data, indent=2))
    return path


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
