"""The simulators' process: simulated WhatsApp (with its simulated users), OpenAI Realtime
and Twilio, so that their CPU is not counted as the system's. Driven in JSON lines:

    python -m bench.harness.sims '{"script": "talk", "loss": 0.02, "jitter_ms": 30}'

Commands: user_answer / user_offer / user_accept (callers for the baseline and pipecat,
which are not reached through WhatsApp), connected, mark (start of the measured window),
stats (what the wire and the simulators saw since mark). EOF on stdin stops everything.

With `"user_procs": K` (K > 0) the simulated users run in K processes of their own
(`callers.py`, children of this one; `RemoteUser` stands in for them here), each caller in
the least-loaded one; `"light": true` makes them light (`SimulatedUser(light_media=True)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
import time
from collections import Counter
from typing import Any

import whatsapp_call_sim.user as sim_user
from whatsapp_call.media.sdp import whatsapp_offer
from whatsapp_call_sim.openai_realtime import server as rt_server
from whatsapp_call_sim.runner import SimulatorSet
from whatsapp_call_sim.whatsapp import Scenario

from .common import BenchError, Child, CpuWindow, commands, emit
from .users import SCRIPTS, OfferingUser, TappedUser, call_stats, long_responder

TIMED_EVENTS = (
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "response.output_audio.delta",
)


def _timestamp_events() -> None:
    """Note when the Realtime simulator sent the events latency is measured from, and keep
    its per-session logs from growing (a long run would otherwise hold every audio chunk)."""
    original = rt_server.SimSession.emit

    async def emit_timed(self: Any, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind in TIMED_EVENTS:
            marks = self.__dict__.setdefault("bench_marks", [])
            if kind != "response.output_audio.delta" or not marks or marks[-1][1] != kind:
                marks.append((time.monotonic(), kind))
        await original(self, event)
        if len(self.sent) > 200:
            del self.sent[:100]
        if len(self.received) > 200:
            del self.received[:100]

    rt_server.SimSession.emit = emit_timed


def _session_info(session: Any) -> dict[str, Any]:
    turn = (session.config.get("audio", {}).get("input", {}) or {}).get("turn_detection") or {}
    return {"turn_detection": turn.get("type"), "silence_ms": turn.get("silence_duration_ms")}


class RemoteUser:
    """What the WhatsApp simulator sees of a caller running in a `callers.py` process: the
    `SimulatedUser` interface it uses (answer, wait_connected, hangup, close, ended,
    end_reason), forwarded. The caller plays the script its process was started with."""

    procs: list[Child] = []
    live: dict[str, RemoteUser] = {}
    _serial = itertools.count(1)

    def __init__(self, wa_id: str, script: Any = None, host_addresses: Any = ("127.0.0.1",)):
        self.wa_id = wa_id
        self.key = f"{wa_id}/{next(self._serial)}"
        self.host_addresses = list(host_addresses)
        load = Counter(u.proc.name for u in self.live.values() if not u.ended.is_set())
        self.proc = min(self.procs, key=lambda c: load[c.name])
        self.ended = asyncio.Event()
        self.end_reason: str | None = None
        self.live[self.key] = self

    @classmethod
    def on_ended(cls, msg: dict[str, Any]) -> None:
        user = cls.live.get(msg["id"])
        if user is not None:
            user._end(msg.get("end_reason"))

    def _end(self, reason: str | None) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()

    async def answer(self, offer_sdp: str) -> str:
        try:
            reply = await self.proc.ask(
                "answer",
                id=self.key,
                wa_id=self.wa_id,
                sdp=offer_sdp,
                host_addresses=self.host_addresses,
            )
        except BenchError as exc:
            if "SdpRejected" in str(exc):
                raise ValueError(str(exc)) from None  # what the simulator expects
            raise
        return reply["sdp"]

    async def wait_connected(self, timeout: float) -> None:
        try:
            await self.proc.ask("wait_connected", id=self.key, seconds=timeout, timeout=timeout + 5)
        except BenchError as exc:
            raise RuntimeError(str(exc)) from None

    async def hangup(self) -> None:
        with contextlib.suppress(BenchError):
            await self.proc.ask("hangup", id=self.key)
        self._end("hangup")

    async def close(self) -> None:
        with contextlib.suppress(BenchError):
            await self.proc.ask("close", id=self.key)
        self._end("closed")


async def _start_callers(count: int, options: dict[str, Any]) -> list[Child]:
    argv = [sys.executable, "-m", "bench.harness.callers", json.dumps(options)]
    procs = [Child(f"callers{i + 1}", argv) for i in range(count)]
    for proc in procs:
        proc.on_push["ended"] = RemoteUser.on_ended
    await asyncio.gather(*(p.start() for p in procs))
    return procs


async def main(options: dict[str, Any]) -> None:
    _timestamp_events()
    script = SCRIPTS[options.get("script", "talk")]()
    TappedUser.default_script = script
    TappedUser.tap_enabled = options.get("tap", True)
    TappedUser.tap_loss = options.get("loss", 0.0)
    TappedUser.tap_jitter_ms = options.get("jitter_ms", 0.0)
    TappedUser.light = options.get("light", False)
    procs = RemoteUser.procs = await _start_callers(options.get("user_procs", 0), options)
    # the WhatsApp simulator builds its callees from this
    sim_user.SimulatedUser = RemoteUser if procs else TappedUser
    sims = SimulatorSet(
        options.get("provider", "meta"),
        state_dir=options.get("state_dir"),
        scenario=Scenario(user_script=script),
        turn=options.get("turn", False),
    )
    await sims.start()
    sims.whatsapp.set_limits(
        permission_checks_per_second=100_000,
        connected_calls_per_24h=100_000,
        concurrent_calls=100_000,
    )
    sims.realtime.record_audio_ms = 1000
    sims.realtime.first_delta_delay = options.get("first_delta_delay", 0.25)
    if options.get("script") == "barge":
        sims.realtime._responder = long_responder
    cpu = CpuWindow(os.getpid())  # this process and its callers' processes
    direct: dict[Any, TappedUser] = {}
    since = time.monotonic()
    emit(
        {
            "cmd": "ready",
            "config_path": str(sims.config_path),
            "realtime_url": sims.urls["realtime"],
            "api_key": sims.options["openaiApiKey"],
            "relay": bool(sims.twilio.relay_available),
            "service_url": sims.urls["service"],
            "service_token": sims.options["serviceToken"],
            "first_delta_delay": sims.realtime.first_delta_delay,
        }
    )
    try:
        async for msg in commands():
            cmd, ident = msg["cmd"], msg.get("id")
            reply: dict[str, Any] = {"cmd": cmd, "id": ident}
            try:
                if cmd in ("user_answer", "user_offer", "user_accept") and procs:
                    fields = {k: v for k, v in msg.items() if k not in ("cmd", "id")}
                    answer = await procs[ident % len(procs)].ask(cmd, id=ident, **fields)
                    reply.update((k, v) for k, v in answer.items() if k not in ("cmd", "id"))
                elif cmd == "user_answer":
                    user = direct[ident] = TappedUser(f"bench{ident}")
                    # the simulated WhatsApp user refuses a plain aiortc offer (several
                    # fingerprints, several codecs): signalling-only rewrite, no media cost
                    reply["sdp"] = await user.answer(whatsapp_offer(msg["sdp"]))
                elif cmd == "user_offer":
                    user = direct[ident] = OfferingUser(f"bench{ident}")
                    reply["sdp"] = await user.offer()
                elif cmd == "user_accept":
                    await direct[ident].accept(msg["sdp"])
                elif cmd == "connected":
                    users = TappedUser.registry
                    count = sum(1 for u in users if u.connected and not u.ended.is_set())
                    ended = Counter(u.end_reason for u in users if u.ended.is_set())
                    for state in await asyncio.gather(*(p.ask("connected") for p in procs)):
                        count += state["count"]
                        ended.update(state["ended"])
                    reply["count"], reply["ended"] = count, dict(ended)
                elif cmd == "mark":
                    since = time.monotonic()
                    cpu.start()
                    await asyncio.gather(*(p.ask("mark") for p in procs))
                elif cmd == "stats":
                    until = time.monotonic()
                    marks = [
                        m for s in sims.realtime.sessions for m in s.__dict__.get("bench_marks", [])
                    ]
                    marks.sort()
                    remote = await asyncio.gather(
                        *(p.ask("stats", marks=marks, timeout=60) for p in procs)
                    )
                    reply["sims_cpu_cores"] = round(cpu.stop(), 3)
                    reply["callers_cpu_cores"] = [r["cpu_cores"] for r in remote]
                    reply["calls"] = [
                        call_stats(u, since, until, marks) for u in TappedUser.registry
                    ] + [c for r in remote for c in r["calls"]]
                    reply["sessions"] = [_session_info(s) for s in sims.realtime.sessions]
                    reply["twilio"] = {"relay": bool(sims.twilio.relay_available)}
                else:
                    reply["error"] = f"unknown command {cmd!r}"
            except Exception as exc:  # report to the driver, keep serving
                reply["error"] = f"{type(exc).__name__}: {exc}"
            emit(reply)
    finally:
        for user in direct.values():
            await user.close()
        await sims.stop()
        await asyncio.gather(*(p.stop() for p in procs))


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))
