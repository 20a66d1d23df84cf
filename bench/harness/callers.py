"""A process of simulated callers, so that the callers of a big run are spread over several
processes (`sims.py` starts `user_procs` of these) and a stall of one does not look like a
stall of the system under test. Each caller is a `TappedUser` (its wire tap runs here too).
Driven in JSON lines by the simulators' process:

    python -m bench.harness.callers '{"script": "talk", "light": true, "loss": 0, "jitter_ms": 0}'

Commands (`id` names the caller): answer (an offer relayed by the WhatsApp simulator),
user_answer / user_offer / user_accept (callers reached directly: the baseline, pipecat),
wait_connected, hangup, close, connected, mark, stats. Unasked: `ended` when a caller's call
ends. EOF on stdin closes every caller.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from typing import Any

from whatsapp_call.media.sdp import whatsapp_offer

from .common import CpuWindow, commands, emit
from .users import SCRIPTS, OfferingUser, TappedUser, call_stats


class Callers:
    """This process's callers, by id, and what the commands do with them."""

    def __init__(self) -> None:
        self.users: dict[Any, TappedUser] = {}
        self._watchers: list[asyncio.Future[None]] = []
        self.since = time.monotonic()
        self.cpu = CpuWindow(os.getpid())
        self.cpu.start()

    def _add(self, ident: Any, user: TappedUser) -> TappedUser:
        self.users[ident] = user

        async def report_end() -> None:
            await user.ended.wait()
            emit({"cmd": "ended", "id": ident, "end_reason": user.end_reason})

        self._watchers.append(asyncio.ensure_future(report_end()))
        return user

    async def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        cmd, ident = msg["cmd"], msg.get("id")
        reply: dict[str, Any] = {}
        if cmd == "answer":
            user = self._add(ident, TappedUser(msg["wa_id"], host_addresses=msg["host_addresses"]))
            reply["sdp"] = await user.answer(msg["sdp"])
        elif cmd == "user_answer":
            user = self._add(ident, TappedUser(f"bench{ident}"))
            # the simulated WhatsApp user refuses a plain aiortc offer (several fingerprints,
            # several codecs): signalling-only rewrite, no media cost
            reply["sdp"] = await user.answer(whatsapp_offer(msg["sdp"]))
        elif cmd == "user_offer":
            user = self._add(ident, OfferingUser(f"bench{ident}"))
            reply["sdp"] = await user.offer()  # type: ignore[attr-defined]
        elif cmd == "user_accept":
            await self.users[ident].accept(msg["sdp"])  # type: ignore[attr-defined]
        elif cmd == "wait_connected":
            await self.users[ident].wait_connected(msg["seconds"])
        elif cmd == "hangup":
            await self.users[ident].hangup()
        elif cmd == "close":
            await self.users[ident].close()
        elif cmd == "connected":
            users = list(self.users.values())
            reply["count"] = sum(1 for u in users if u.connected and not u.ended.is_set())
            reply["ended"] = dict(Counter(u.end_reason for u in users if u.ended.is_set()))
        elif cmd == "mark":
            self.since = time.monotonic()
            self.cpu.start()
        elif cmd == "stats":
            until = time.monotonic()
            marks = [tuple(m) for m in msg.get("marks", [])]
            reply["cpu_cores"] = round(self.cpu.stop(), 3)
            reply["calls"] = [call_stats(u, self.since, until, marks) for u in self.users.values()]
        else:
            raise ValueError(f"unknown command {cmd!r}")
        return reply

    async def close(self) -> None:
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*(u.close() for u in self.users.values()), return_exceptions=True)


async def main(options: dict[str, Any]) -> None:
    TappedUser.default_script = SCRIPTS[options.get("script", "talk")]()
    TappedUser.tap_enabled = options.get("tap", True)
    TappedUser.tap_loss = options.get("loss", 0.0)
    TappedUser.tap_jitter_ms = options.get("jitter_ms", 0.0)
    TappedUser.light = options.get("light", False)
    callers = Callers()
    tasks: set[asyncio.Task[None]] = set()

    async def serve(msg: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"cmd": msg["cmd"], "id": msg.get("id")}
        try:
            reply.update(await callers.handle(msg))
        except Exception as exc:  # report to the simulators' process, keep serving
            reply["error"] = f"{type(exc).__name__}: {exc}"
        emit(reply)

    emit({"cmd": "ready", "pid": os.getpid()})
    try:
        async for msg in commands():  # each in its own task: wait_connected must not block
            task = asyncio.create_task(serve(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()
        await callers.close()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))
