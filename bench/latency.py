"""Latency: per-turn added latency, inbound jitter-buffer delay, event-loop lag, barge-in
and call set-up, on 127.0.0.1 with a UDP loss/jitter shim (the `WireTap` relay in
bench/harness/wire.py, built on bench/jitter_bench.py's relay; not tc netem): caller ->
system RTP is dropped (0% or 2%) and delayed uniformly 0-30 ms.

Per turn: the caller's last voiced RTP packet delivered to the system -> the system's first
voiced packet leaving it (read at the relay from the audio-level header extension), minus
the simulated model's own delay (its VAD silence window + `first_delta_delay`).
"outbound" is the part from the simulator's first audio delta to that packet. Barge-in:
the caller's first voiced packet over a long AI reply -> the system's last voiced packet;
"after VAD" subtracts the time the simulated server took to send speech_started.
Set-up: ours only, from the call records' `metrics.setup_ms`, host candidates only and
with the simulated TURN server (coturn via the Twilio simulator).

    .venv/bin/python -m bench.latency [--systems ours baseline pipecat] [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from .harness.common import BenchError, loadavg, machine, now_iso, write_result
from .harness.runner import SYSTEMS, run_system


async def _safe(label: str, **kwargs: Any) -> dict[str, Any]:
    try:
        run = await run_system(**kwargs)
    except BenchError as exc:
        run = {"system": kwargs["system"], "error": str(exc)[:2000]}
    run["load"] = loadavg()[0]
    print(f"  {label}: {_brief(run)}", flush=True)
    return run


def _brief(run: dict[str, Any]) -> str:
    if run.get("error"):
        return "error: " + run["error"][:300]
    keys = (
        "turn_added_ms",
        "turn_outbound_ms",
        "barge_in_wire_ms",
        "jitter_buffer_ms",
        "loop_lag_ms",
    )
    parts = [
        f"{k}={run[k]}"
        for k in keys
        if run.get(k) and (run[k].get("n", 1) if isinstance(run[k], dict) else 1)
    ]
    return "; ".join(parts) + f"; load {run['load']}"


async def run(systems: list[str], seconds: float, calls: int, setup_calls: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "date": now_iso(),
        "machine": machine(),
        "turns": [],
        "barge_in": [],
        "setup": [],
    }
    for system in systems:
        for loss in (0.0, 0.02):
            out["turns"].append(
                await _safe(
                    f"turns {system} loss {loss:.0%} jitter 30 ms",
                    system=system,
                    calls=calls,
                    seconds=seconds,
                    loss=loss,
                    jitter_ms=30.0,
                )
            )
    for system in systems:
        out["barge_in"].append(
            await _safe(
                f"barge-in {system}", system=system, calls=1, seconds=seconds, script="barge"
            )
        )
    if "ours" in systems:
        for turn in (False, True):
            run_ = await _safe(
                f"set-up ours {'TURN' if turn else 'host only'}",
                system="ours",
                calls=setup_calls,
                seconds=1.0,
                warmup=0.5,
                turn=turn,
                tap=not turn,
            )
            run_["ice"] = "turn" if turn else "host"
            out["setup"].append(run_)
    return out


def table(data: dict[str, Any]) -> str:
    def p(d: Any, q: str) -> Any:
        return d.get(q) if isinstance(d, dict) else None

    lines = [
        f"{'system':<9} {'loss':>4}  {'turn+ p50':>9} {'p95':>6}  {'out p50':>7}  {'jb p50':>6} {'p95':>5} {'p99':>5}  {'lag p99':>7}  load"
    ]
    for r in data["turns"]:
        jb = r.get("jitter_buffer_ms") or {}
        lines.append(
            f"{r['system']:<9} {r.get('loss', 0):>4.0%}  {p(r.get('turn_added_ms'), 'p50')!s:>9} "
            f"{p(r.get('turn_added_ms'), 'p95')!s:>6}  {p(r.get('turn_outbound_ms'), 'p50')!s:>7}  "
            f"{_r(jb.get('p50'))!s:>6} {_r(jb.get('p95'))!s:>5} {_r(jb.get('p99'))!s:>5}  "
            f"{p(r.get('loop_lag_ms'), 'p99')!s:>7}  {r['load']}"
        )
    lines.append(
        f"\n{'barge-in':<9} {'wire p50':>8} {'p95':>6} {'vad p50':>7} {'after-vad p50':>13} {'p95':>6}"
    )
    for r in data["barge_in"]:
        lines.append(
            f"{r['system']:<9} {p(r.get('barge_in_wire_ms'), 'p50')!s:>8} {p(r.get('barge_in_wire_ms'), 'p95')!s:>6} "
            f"{p(r.get('barge_in_vad_ms'), 'p50')!s:>7} {p(r.get('barge_in_after_vad_ms'), 'p50')!s:>13} "
            f"{p(r.get('barge_in_after_vad_ms'), 'p95')!s:>6}"
        )
    for r in data["setup"]:
        setup = r.get("setup_ms") or {}
        sent = setup.get("offer_sent") or {}
        built = setup.get("offer_built") or {}
        lines.append(
            f"set-up ours {r.get('ice')}: POST -> offer sent p50 {sent.get('p50')} p95 {sent.get('p95')} ms "
            f"(offer built p50 {built.get('p50')}; n={sent.get('n')})"
            + (f" error: {r['error'][:200]}" if r.get("error") else "")
        )
    return "\n".join(lines)


def _r(v: Any) -> Any:
    return round(v, 1) if isinstance(v, float) else v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=["ours"])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--calls", type=int, default=2, help="concurrent calls per latency run")
    parser.add_argument("--setup-calls", type=int, default=5)
    args = parser.parse_args()
    data = asyncio.run(run(args.systems, args.seconds, args.calls, args.setup_calls))
    print(table(data))
    print(f"wrote {write_result('latency', data)}")


if __name__ == "__main__":
    main()
