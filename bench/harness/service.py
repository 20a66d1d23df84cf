"""Our service under test, in its own process: exactly what `whatsapp-call serve` runs
(plugins from entry points, settings from the config file and WHATSAPP_CALL_* variables,
`Runtime`), plus what only the inside of the process can see: event-loop lag (a 10 ms
ticker's overshoot) and live per-call playout / receive counters (`snapshot`).

    python -m bench.harness.service CONFIG_PATH
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

from whatsapp_call import plugins
from whatsapp_call.config import load_settings
from whatsapp_call.runtime import Runtime

from .common import commands, emit, pcts

TICK = 0.010


class LoopLag:
    """How late a 10 ms sleep wakes up: the delay any callback in this loop may suffer."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(TICK)
            self.samples.append((time.monotonic() - t0 - TICK) * 1e3)

    def take(self) -> dict[str, Any]:
        values, self.samples = self.samples, []
        out = pcts(values, (50, 99))
        out["max"] = round(max(values), 1) if values else None
        return out


def _snapshot(runtime: Runtime) -> dict[str, Any]:
    calls = {}
    for call_id, active in list(runtime.service._active.items()):
        playout, media = active.playout, active.media
        if playout is None or media is None:
            continue
        calls[call_id] = {
            "late_frames": playout.late_frames,
            "dropped_frames": playout.dropped_frames,
            "frames": playout.frames,
            "inbound": media.inbound_stats(),
        }
    return calls


async def main(config_path: str) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    plugins.load_plugins()
    models = [m for _, m in plugins.call_all_sync("settings_model")]
    settings = load_settings(config_path, plugin_models=models)
    lag = LoopLag()
    async with Runtime(settings) as runtime:
        lag.start()
        emit({"cmd": "ready", "url": runtime.url})
        async for msg in commands():
            cmd = msg["cmd"]
            reply: dict[str, Any] = {"cmd": cmd, "id": msg.get("id")}
            if cmd == "mark":
                lag.take()
            elif cmd == "lag":
                reply["lag_ms"] = lag.take()
            elif cmd == "snapshot":
                reply["calls"] = _snapshot(runtime)
            else:
                reply["error"] = f"unknown command {cmd!r}"
            emit(reply)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
