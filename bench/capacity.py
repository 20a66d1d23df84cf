"""Capacity: the most concurrent calls a system carries with no late outbound frame and no
inbound gap, and CPU-core / memory per call at 1, 5, 10, 20, 40 calls and at that point.

Each step starts the simulators (WhatsApp + users, Realtime, Twilio) in one process and
the system in another (ours: `Runtime` as `whatsapp-call serve` runs it, or `serve
--workers N` once that option exists), places N calls (ours: `POST /v1/calls` to N
different simulated users) whose callers keep talking, waits for all to connect, warms up,
then measures the system's process tree (/proc) over a steady window. "ok" is the same rule
for every system (`bench.harness.runner.judge`): every call alive and seen by the wire tap,
gaps over 40 ms between packets toward the callers (timed by the kernel at the tap) at most
0.1% of the window's packets and none over 100 ms. Ours' late outbound frames (PlayoutTrack)
and inbound gaps (`inbound_stats()`) are reported, not judged (the others have no such
counters that could be read: the rule uses only what is seen of all three). The window starts
`warmup` s after the last call connected (set-up and the start of media are outside it).

    .venv/bin/python -m bench.capacity [--systems ours baseline pipecat] [--calls 1 5 10 20 40]
                                       [--seconds 8] [--workers 1] [--via-serve]

`--via-serve` runs ours through `whatsapp-call serve --workers N` for every N, 1 included
(by default N=1 runs in-process through bench/harness/service.py, which also reads playout and
receive counters from inside): every N is then measured the same way, from outside (wire
gaps and calls alive only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from .harness import runner
from .harness.common import BenchError, Child, loadavg, machine, now_iso, write_result
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
    ("tolerated", "allowed"),
    ("wire_max_gap_ms", "max gap"),
    ("sims_cpu_cores", "sims cpu"),
    ("load", "load"),
]


REFINE_STEPS = 2  # e.g. pass 5, fail 10 -> 7 -> 6 or 8


async def ladder(
    system: str, steps: list[int], seconds: float, workers: int, refine: bool
) -> dict[str, Any]:
    """Run the steps upwards; stop after the first failing step (then, when `refine`, bisect
    between the last pass and that failure, `REFINE_STEPS` runs at most)."""
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
    for _ in range(REFINE_STEPS if refine else 0):  # bisect between the last pass and failure
        if failed is None or failed - passed <= 1:
            break
        mid = (passed + failed) // 2
        run = await _one(system, mid, seconds, workers)
        runs.append(run)
        if run.get("ok"):
            passed = mid
        else:
            failed = mid
    at_capacity = next((r for r in runs if r["calls"] == passed), None)
    return {
        "system": system,
        "capacity": passed,
        "capacity_bound": failed,  # the smallest N that failed (None: none did)
        "cpu_core_per_call_at_capacity": at_capacity and at_capacity.get("cpu_core_per_call"),
        "mem_per_call_mb_at_capacity": at_capacity and at_capacity.get("mem_per_call_mb"),
        "runs": runs,
    }


class _ServeOneWorker(Child):
    """The runner starts `serve --workers N` only for N > 1: asked for N=2, start N=1."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None):
        if name == "service" and "--workers" in argv:
            argv = list(argv)
            argv[argv.index("--workers") + 1] = "1"
        super().__init__(name, argv, env)


VIA_SERVE = False  # set by --via-serve


async def _one(system: str, n: int, seconds: float, workers: int) -> dict[str, Any]:
    one_via_serve = VIA_SERVE and system == "ours" and workers == 1
    try:
        if one_via_serve:
            runner.Child = _ServeOneWorker  # type: ignore[misc]
        try:
            run = await run_system(
                system, n, seconds=seconds, warmup=3.0, workers=2 if one_via_serve else workers
            )
        finally:
            runner.Child = Child  # type: ignore[misc]
        if one_via_serve:
            run["workers"] = 1
        run["via_serve"] = VIA_SERVE or (system == "ours" and workers > 1)
    except BenchError as exc:
        run = {"system": system, "calls": n, "ok": False, "error": str(exc)[:2000]}
    run["load"] = loadavg()[0]
    print(
        f"  capacity {system:<8} N={n:<3} ok={run.get('ok')} cpu/call={run.get('cpu_core_per_call')} "
        f"MB/call={run.get('mem_per_call_mb')} late={run.get('late_frames')} "
        f"wire gaps={run.get('wire_late_gaps')} (allowed {run.get('tolerated')}, max "
        f"{run.get('wire_max_gap_ms')} ms) load={run['load']}"
        + (f" fails: {'; '.join(run['fails'])}" if run.get("fails") else "")
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
        bound = next((r for r in res["runs"] if r["calls"] == res["capacity_bound"]), None)
        why = bound and ("; ".join(bound.get("fails") or []) or bound.get("error", "")[:200])
        lines.append(
            f"{res['system']}: capacity {res['capacity']} calls"
            + (
                f" (fails at {res['capacity_bound']}: {why})"
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
    parser.add_argument("--calls", nargs="+", type=int, default=[1, 5, 10, 20])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--workers", type=int, default=1, help="passed to `serve --workers` (ours)")
    parser.add_argument("--no-refine", dest="refine", action="store_false")
    parser.add_argument(
        "--via-serve",
        action="store_true",
        help="ours: run `serve --workers N` for N=1 too and measure from outside",
    )
    args = parser.parse_args()
    global VIA_SERVE
    VIA_SERVE = args.via_serve
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
