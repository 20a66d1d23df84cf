"""The simulators' process: simulated WhatsApp (with its simulated users), OpenAI Realtime
and Twilio, so that their CPU is not counted as the system's. Driven in JSON lines:

    python -m bench.harness.sims '{"script": "talk", "loss": 0.02, "jitter_ms": 30}'

Commands: user_answer / user_offer / user_accept (callers for the baseline and pipecat,
which are not reached through WhatsApp), connected, mark (start of the measured window),
stats (what the wire and the simulators saw since mark). EOF on stdin stops everything.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from typing import Any

import whatsapp_call_sim.user as sim_user
from whatsapp_call.media.sdp import whatsapp_offer
from whatsapp_call_sim.openai_realtime import server as rt_server
from whatsapp_call_sim.runner import SimulatorSet
from whatsapp_call_sim.whatsapp import Scenario

from . import wire
from .common import CpuWindow, commands, emit
from .users import SCRIPTS, OfferingUser, TappedUser, long_responder

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


def _call_stats(user: TappedUser, since: float, until: float, marks: list) -> dict[str, Any]:
    out: dict[str, Any] = {"id": user.wa_id, "end_reason": user.end_reason}
    tap = user.tap
    if tap is None:
        return out
    deltas = [t for t, k in marks if k == "response.output_audio.delta"]
    starts = [t for t, k in marks if k == "input_audio_buffer.speech_started"]
    turns = []
    for t in wire.turn_latencies(tap, since, until):
        first = max((d for d in deltas if d <= t["reply_start"]), default=None)
        outbound = (t["reply_start"] - first) * 1e3 if first and first > t["caller_end"] else None
        turns.append({"wire_ms": round(t["ms"], 1), "outbound_ms": outbound and round(outbound, 1)})
    barges = []
    for b_ms, start in zip(
        wire.barge_ins(tap, since, until), _barge_starts(tap, since, until), strict=True
    ):
        heard = min((s for s in starts if s >= start), default=None)
        vad = (heard - start) * 1e3 if heard is not None and heard - start < 1.0 else None
        barges.append({"wire_ms": round(b_ms, 1), "vad_ms": vad and round(vad, 1)})
    out.update(
        turns=turns,
        barge_ins=barges,
        pacing=wire.outbound_pacing(tap, since, until),
        relay_dropped=tap.dropped,
        audible_ms=round(user.audible_ms()),
    )
    return out


def _barge_starts(tap: wire.WireTap, since: float, until: float) -> list[float]:
    system = tap.to_caller.spurts(since)
    return [
        start
        for start, _ in tap.to_system.spurts(since)
        if start <= until and any(s[0] < start <= s[1] for s in system)
    ]


async def main(options: dict[str, Any]) -> None:
    _timestamp_events()
    script = SCRIPTS[options.get("script", "talk")]()
    TappedUser.default_script = script
    TappedUser.tap_enabled = options.get("tap", True)
    TappedUser.tap_loss = options.get("loss", 0.0)
    TappedUser.tap_jitter_ms = options.get("jitter_ms", 0.0)
    sim_user.SimulatedUser = TappedUser  # the WhatsApp simulator builds its callees from it
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
    cpu = CpuWindow(__import__("os").getpid())
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
                if cmd == "user_answer":
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
                    reply["count"] = sum(1 for u in users if u.connected and not u.ended.is_set())
                    reply["ended"] = dict(Counter(u.end_reason for u in users if u.ended.is_set()))
                elif cmd == "mark":
                    since = time.monotonic()
                    cpu.start()
                elif cmd == "stats":
                    until = time.monotonic()
                    marks = [
                        m for s in sims.realtime.sessions for m in s.__dict__.get("bench_marks", [])
                    ]
                    marks.sort()
                    reply["sims_cpu_cores"] = round(cpu.stop(), 3)
                    reply["calls"] = [
                        _call_stats(u, since, until, marks) for u in TappedUser.registry
                    ]
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


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))
