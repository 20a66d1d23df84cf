"""Capacity: the most concurrent calls a system carries with no late outbound frame and no
inbound gap, and CPU-core / memory per call at 1, 5, 10, 20, 40 calls and at that point.

Each step starts the simulators (WhatsApp + users, Realtime, Twilio) in one process and
the system in another (ours: `Runtime` as `whatsapp-call serve` runs it, or `serve
--workers N`), places N calls (ours: `POST /v1/calls` to N different simulated users) whose
callers keep talking, waits for all to connect, warms up, then measures the system's process
tree (/proc) over a steady window. The window starts `warmup` s after the last call connected
(set-up and the start of media are outside it).

Two rules decide "ok" (`bench.harness.runner`):
* the wire rule (`judge`), the same for every system, for the 3-system comparison (`make
  bench`): every call alive and seen by the wire tap, gaps over 40 ms between packets toward
  the callers (timed by the kernel at the tap) at most 0.1% of the window's packets and none
  over 100 ms. Ours' late frames and inbound gaps are reported, not judged.
* the service rule (`judge_service`), ours only, for `--workers 1` vs `--workers 2` (issue
  10: "calls with no late frames"): every call alive, and late outbound frames and inbound
  gaps in our service's own counters (its /metrics, which in `serve --workers N` totals the
  workers') each at most 0.1% of the frames (rounded down), over the same window. Wire gaps
  are reported next to it: they also count stalls of the simulated callers' processes.

    .venv/bin/python -m bench.capacity [--systems ours baseline pipecat] [--calls 1 5 10 20 40]
                                       [--seconds 8] [--workers 1 2] [--via-serve]
                                       [--rule wire|service] [--sim-procs K] [--callers light|full]

`--via-serve` runs ours through `whatsapp-call serve --workers N` for every N, 1 included, and
is the workers comparison: by default it judges by the service rule, runs the simulated
callers in `--sim-procs` processes (default: enough that each carries at most 8) and makes
them light (`--callers light`: pre-encoded Opus, no decoding: they hear by the RFC 6464 level
on the wire, which changes nothing the service does). Without it the defaults are those of
`make bench`: the wire rule, callers in the simulators' process, full callers. CPU per call is
the service's process tree (front + workers) over the window / calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from .harness.common import BenchError, loadavg, machine, now_iso, write_result
from .harness.runner import SYSTEMS, run_system

COLUMNS = [
    ("label", "system"),
    ("calls", "N"),
    ("ok", "ok"),
    ("cpu_core_per_call", "cpu/call"),
    ("mem_per_call_mb", "MB/call"),
    ("late", "late"),
    ("in_gaps", "in gaps"),
    ("wire_late_gaps", "wire gaps"),
    ("tolerated", "allowed"),
    ("wire_max_gap_ms", "max gap"),
    ("sims_cpu_cores", "sims cpu"),
    ("per_worker", "per worker"),
    ("load", "load"),
]
PER_PROC_CALLERS = 8  # --sim-procs default: at most this many simulated callers per process
REFINE_STEPS = 2  # e.g. pass 5, fail 10 -> 7 -> 6 or 8


class Options:
    """How ours is run and judged, and where the callers run (defaults: `make bench`'s)."""

    def __init__(
        self,
        via_serve: bool = False,
        rule: str = "wire",
        sim_procs: int | None = 0,
        light_callers: bool = False,
    ):
        self.via_serve = via_serve
        self.rule = rule
        self.sim_procs = sim_procs  # None: one process per PER_PROC_CALLERS calls
        self.light_callers = light_callers

    def procs(self, calls: int) -> int:
        if self.sim_procs is None:
            return -(-calls // PER_PROC_CALLERS)
        return self.sim_procs

    def rule_for(self, system: str) -> str:
        return self.rule if system == "ours" else "wire"

    def label(self, system: str, workers: int) -> str:
        return f"{system} w{workers}" if system == "ours" and self.via_serve else system


async def ladder(
    system: str,
    steps: list[int],
    seconds: float,
    workers: int,
    refine: bool,
    options: Options | None = None,
) -> dict[str, Any]:
    """Run the steps upwards; stop after the first failing step (then, when `refine`, bisect
    between the last pass and that failure, `REFINE_STEPS` runs at most)."""
    options = options or Options()
    runs: list[dict[str, Any]] = []
    passed, failed = 0, None
    for n in steps:
        run = await _one(system, n, seconds, workers, options)
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
        run = await _one(system, mid, seconds, workers, options)
        runs.append(run)
        if run.get("ok"):
            passed = mid
        else:
            failed = mid
    at_capacity = next((r for r in runs if r["calls"] == passed), None)
    return {
        "system": system,
        "label": options.label(system, workers),
        "workers": workers if system == "ours" else None,
        "rule": options.rule_for(system),
        "capacity": passed,
        "capacity_bound": failed,  # the smallest N that failed (None: none did)
        "cpu_core_per_call_at_capacity": at_capacity and at_capacity.get("cpu_core_per_call"),
        "mem_per_call_mb_at_capacity": at_capacity and at_capacity.get("mem_per_call_mb"),
        "runs": runs,
    }


async def _one(
    system: str, n: int, seconds: float, workers: int, options: Options
) -> dict[str, Any]:
    rule = options.rule_for(system)
    try:
        run = await run_system(
            system,
            n,
            seconds=seconds,
            warmup=3.0,
            workers=workers,
            via_serve=options.via_serve,
            user_procs=options.procs(n),
            light_users=options.light_callers,
        )
        run["wire_ok"], run["wire_fails"] = run["ok"], run["fails"]
        if rule == "service":
            run["ok"], run["fails"] = run["service_ok"], run["service_fails"]
        run["rule"] = rule
    except BenchError as exc:
        run = {"system": system, "calls": n, "ok": False, "error": str(exc)[:2000]}
    run["label"] = options.label(system, workers)
    run["load"] = loadavg()[0]
    svc = run.get("service") or {}
    run["late"] = svc.get("late_frames", run.get("late_frames"))
    run["in_gaps"] = svc.get("inbound_gaps", run.get("inbound_gaps"))
    run["per_worker"] = "/".join(str(v) for v in (svc.get("worker_calls") or {}).values()) or None
    print(
        f"  capacity {run['label']:<8} N={n:<3} ok={run.get('ok')} ({rule} rule) "
        f"cpu/call={run.get('cpu_core_per_call')} MB/call={run.get('mem_per_call_mb')} "
        f"late={run['late']} in gaps={run['in_gaps']} wire gaps={run.get('wire_late_gaps')} "
        f"(allowed {run.get('tolerated')}, max {run.get('wire_max_gap_ms')} ms, wire ok "
        f"{run.get('wire_ok')}) sims cpu={run.get('sims_cpu_cores')} (callers "
        f"{run.get('callers_cpu_cores')}) load={run['load']}"
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
            f"{res.get('label', res['system'])}: capacity {res['capacity']} calls "
            f"({res.get('rule', 'wire')} rule; cpu/call at capacity "
            f"{res['cpu_core_per_call_at_capacity']})"
            + (
                f", fails at {res['capacity_bound']}: {why}"
                if res["capacity_bound"]
                else ", no step failed"
            )
        )
    return "\n".join(lines)


async def run(
    systems: list[str],
    steps: list[int],
    seconds: float,
    workers: int | list[int],
    refine: bool,
    options: Options | None = None,
) -> dict[str, Any]:
    """A ladder per system, and for ours one per number of workers."""
    counts = [workers] if isinstance(workers, int) else list(workers)
    results = []
    for system in systems:
        for n in counts if system == "ours" else counts[:1]:
            results.append(await ladder(system, steps, seconds, n, refine, options))
    return {"date": now_iso(), "machine": machine(), "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=["ours"])
    parser.add_argument("--calls", nargs="+", type=int, default=[1, 5, 10, 20])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument(
        "--workers", nargs="+", type=int, default=[1], help="ours: `serve --workers N`, each N"
    )
    parser.add_argument("--no-refine", dest="refine", action="store_false")
    parser.add_argument(
        "--via-serve",
        action="store_true",
        help="ours: run `serve --workers N` for N=1 too (the workers comparison)",
    )
    parser.add_argument(
        "--rule",
        choices=["wire", "service"],
        help="what decides ok for ours (default: service with --via-serve, else wire)",
    )
    parser.add_argument(
        "--sim-procs",
        type=int,
        help="processes for the simulated callers (0: the simulators' own; default: with "
        f"--via-serve one per {PER_PROC_CALLERS} calls, else 0)",
    )
    parser.add_argument(
        "--callers",
        choices=["light", "full"],
        help="light: pre-encoded Opus, no decoding (default with --via-serve); full: "
        "SimulatedUser as the tests use it",
    )
    args = parser.parse_args()
    options = Options(
        via_serve=args.via_serve,
        rule=args.rule or ("service" if args.via_serve else "wire"),
        sim_procs=args.sim_procs if args.sim_procs is not None else (None if args.via_serve else 0),
        light_callers=(args.callers or ("light" if args.via_serve else "full")) == "light",
    )
    data = asyncio.run(
        run(args.systems, sorted(args.calls), args.seconds, args.workers, args.refine, options)
    )
    data["options"] = vars(options)
    print(table(data["results"]))
    path = write_result("capacity", data)
    print(f"wrote {path}")
    if not any(r["runs"] for r in data["results"]):
        raise SystemExit(json.dumps(data)[:500])


if __name__ == "__main__":
    main()
