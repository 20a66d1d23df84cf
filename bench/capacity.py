"""Capacity: the most concurrent calls a system carries with no late outbound frame and no
inbound gap, and CPU-core / memory per call at 1, 5, 10, 20, 40 calls and at that point.

Each step starts the simulators (WhatsApp + users, Realtime, Twilio) in one process and
the system in another (ours: `Runtime` as `whatsapp-call serve` runs it, or `serve
--workers N` once that option exists), places N calls (ours: `POST /v1/calls` to N
different simulated users) whose callers keep talking, waits for all to connect, warms up,
then measures the system's process tree (/proc) over a steady window. "ok" = zero late
outbound frames (PlayoutTrack) and zero inbound gaps (lost packets in `inbound_stats()`)
for ours; for every system also no outbound wire gap over 40 ms and every call alive.

    .venv/bin/python -m bench.capacity [--systems ours baseline pipecat] [--calls 1 5 10 20 40]
                                       [--seconds 8] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from .harness.common import BenchError, loadavg, machine, now_iso, write_result
from .harness.runner import SYSTEMS, run_system

COLUMNS = [
    ("system", "system"),
    ("calls", "N"),
    ("ok", "ok"),
    ("cpu_core_per_call", "cpu/call"),
    ("mem_per_call_mb", "MB/call"),
    ("late_frames", "late"),
    ("inbound_gaps", "in gaps"),
    ("wire_late_gaps", "wire gaps"),
    ("sims_cpu_cores", "sims cpu"),
    ("load", "load"),
]


async def ladder(
    system: str, steps: list[int], seconds: float, workers: int, refine: bool
) -> dict[str, Any]:
    """Run the steps upwards; stop after the first failing step (plus one step between
    the last pass and that failure when `refine`)."""
    runs: list[dict[str, Any]] = []
    passed, failed = 0, None
    for n in steps:
        run = await _one(system, n, seconds, workers)
        runs.append(run)
        if run.get("ok"):
            passed = n
        else:
            failed = n
            break
    if refine and failed is not None and failed - passed > 1:
        mid = (passed + failed) // 2
        run = await _one(system, mid, seconds, workers)
        runs.append(run)
        if run.get("ok"):
            passed = mid
    at_capacity = next((r for r in runs if r["calls"] == passed), None)
    return {
        "system": system,
        "capacity": passed,
        "capacity_bound": failed,  # the smallest N that failed (None: none did)
        "cpu_core_per_call_at_capacity": at_capacity and at_capacity.get("cpu_core_per_call"),
        "mem_per_call_mb_at_capacity": at_capacity and at_capacity.get("mem_per_call_mb"),
        "runs": runs,
    }


async def _one(system: str, n: int, seconds: float, workers: int) -> dict[str, Any]:
    try:
        run = await run_system(system, n, seconds=seconds, warmup=3.0, workers=workers)
    except BenchError as exc:
        run = {"system": system, "calls": n, "ok": False, "error": str(exc)[:2000]}
    run["load"] = loadavg()[0]
    print(
        f"  capacity {system:<8} N={n:<3} ok={run.get('ok')} cpu/call={run.get('cpu_core_per_call')} "
        f"MB/call={run.get('mem_per_call_mb')} late={run.get('late_frames')} "
        f"wire gaps={run.get('wire_late_gaps')} load={run['load']}"
        + (f" error={run['error'][:200]}" if run.get("error") else ""),
        flush=True,
    )
    return run


def table(results: list[dict[str, Any]]) -> str:
    rows = [r for res in results for r in res["runs"]]
    widths = [max(len(h), *(len(str(r.get(k))) for r in rows)) for k, h in COLUMNS]
    lines = ["  ".join(h.rjust(w) for (_, h), w in zip(COLUMNS, widths, strict=True))]
    for r in rows:
        lines.append(
            "  ".join(str(r.get(k)).rjust(w) for (k, _), w in zip(COLUMNS, widths, strict=True))
        )
    for res in results:
        lines.append(
            f"{res['system']}: capacity {res['capacity']} calls"
            + (
                f" (fails at {res['capacity_bound']})"
                if res["capacity_bound"]
                else " (no step failed)"
            )
        )
    return "\n".join(lines)


async def run(
    systems: list[str], steps: list[int], seconds: float, workers: int, refine: bool
) -> dict[str, Any]:
    results = [await ladder(s, steps, seconds, workers, refine) for s in systems]
    return {"date": now_iso(), "machine": machine(), "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=["ours"])
    parser.add_argument("--calls", nargs="+", type=int, default=[1, 5, 10, 20, 40])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--workers", type=int, default=1, help="passed to `serve --workers` (ours)")
    parser.add_argument("--no-refine", dest="refine", action="store_false")
    args = parser.parse_args()
    data = asyncio.run(
        run(args.systems, sorted(args.calls), args.seconds, args.workers, args.refine)
    )
    print(table(data["results"]))
    path = write_result("capacity", data)
    print(f"wrote {path}")
    if not any(r["runs"] for r in data["results"]):
        raise SystemExit(json.dumps(data)[:500])


if __name__ == "__main__":
    main()
