"""The whole comparison in one command (`make bench`): ours vs a minimal aiortc echo bridge
("limit" baseline) vs pipecat, same machine, same simulated callers and Realtime server.
Builds pipecat's own virtual environment on first use, runs bench.latency and
bench.capacity for the three systems, prints the ratio table with the targets, and writes
bench/results/run_all-<time>.json (+ run_all-latest.json, run_all-latest.txt).

    .venv/bin/python -m bench.run_all [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import time
from typing import Any

from . import capacity, latency
from .harness import runner
from .harness.common import RESULTS, loadavg, machine, now_iso, ratio, write_result
from .harness.runner import SYSTEMS, ensure_pipecat


def _versions(pipecat_python: str) -> dict[str, Any]:
    import subprocess

    pipecat = subprocess.run(
        [pipecat_python, "-c", "import importlib.metadata as m; print(m.version('pipecat-ai'))"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    return {
        "aiortc": importlib.metadata.version("aiortc"),
        "whatsapp-call": importlib.metadata.version("whatsapp-call"),
        "pipecat-ai": pipecat or None,
    }


def _get(runs: list[dict[str, Any]], system: str, loss: float = 0.0) -> dict[str, Any]:
    return next((r for r in runs if r.get("system") == system and r.get("loss", 0.0) == loss), {})


def _p(d: Any, q: str) -> Any:
    return d.get(q) if isinstance(d, dict) else None


def summary(lat: dict[str, Any], cap: dict[str, Any]) -> dict[str, Any]:
    caps = {r["system"]: r for r in cap["results"]}
    row: dict[str, dict[str, Any]] = {}
    for s in SYSTEMS:
        c = caps.get(s, {})
        at10 = next(
            (r for r in c.get("runs", []) if r.get("calls") == 10 and "cpu_core_per_call" in r),
            None,
        )
        turns = _get(lat["turns"], s)
        barge = next((r for r in lat["barge_in"] if r.get("system") == s), {})
        row[s] = {
            "capacity": c.get("capacity"),
            "cpu_core_per_call_at_cap": c.get("cpu_core_per_call_at_capacity"),
            "mem_mb_per_call_at_cap": c.get("mem_per_call_mb_at_capacity"),
            "cpu_core_per_call_at_10": at10 and at10["cpu_core_per_call"],
            "mem_mb_per_call_at_10": at10 and at10["mem_per_call_mb"],
            "turn_added_p50_ms": _p(turns.get("turn_added_ms"), "p50"),
            "turn_added_p95_ms": _p(turns.get("turn_added_ms"), "p95"),
            "barge_in_p50_ms": _p(barge.get("barge_in_wire_ms"), "p50"),
            "barge_in_after_vad_p50_ms": _p(barge.get("barge_in_after_vad_ms"), "p50"),
        }
    ours = row["ours"]
    ratios = {
        k: {
            "ours/baseline": ratio(ours[k], row["baseline"][k]),
            "ours/pipecat": ratio(ours[k], row["pipecat"][k]),
        }
        for k in ours
    }
    turns0 = _get(lat["turns"], "ours")
    turns2 = _get(lat["turns"], "ours", 0.02)
    jb = (turns0.get("jitter_buffer_ms") or {}).get("p50")
    targets = {
        "cpu/call <= 0.5x baseline (each at its capacity)": _le(
            ratios["cpu_core_per_call_at_cap"]["ours/baseline"], 0.5
        ),
        "cpu/call <= 0.5x pipecat (each at its capacity)": _le(
            ratios["cpu_core_per_call_at_cap"]["ours/pipecat"], 0.5
        ),
        "capacity >= 2x pipecat": _ge(ratios["capacity"]["ours/pipecat"], 2.0),
        "turn added p95 < 40 ms (0% loss)": _lt(ours["turn_added_p95_ms"], 40),
        "turn added p95 < 40 ms (2% loss)": _lt(_p(turns2.get("turn_added_ms"), "p95"), 40),
        "jitter buffer p50 < 25 ms": _lt(jb, 25),
        "barge-in < 40 ms (wire, incl. the simulated VAD)": _lt(ours["barge_in_p50_ms"], 40),
        "barge-in < 40 ms (after the simulated VAD)": _lt(ours["barge_in_after_vad_p50_ms"], 40),
    }
    return {
        "systems": row,
        "ratios": ratios,
        "targets": targets,
        "limits": limits(targets, lat, cap),
        "capacity_rule": RULE,
    }


RULE = (
    f"capacity = most calls (steps 1, 5, 10, 20, then up to 2 bisection runs) with, over a {{seconds}} s window "
    f"starting {{warmup}} s after the last call connected: every call alive and seen by the tap, "
    f"wire gaps > {runner.LATE_GAP_MS:g} ms toward the callers (kernel-timed at the tap) "
    f"<= {runner.TOLERANCE:.1%} of the window's packets (rounded down) and none > "
    f"{runner.MAX_GAP_MS:g} ms. Same rule for all three; ours' inside counters (late frames, "
    "inbound gaps) are shown in the capacity table but do not decide"
)


def limits(targets: dict[str, str], lat: dict[str, Any], cap: dict[str, Any]) -> dict[str, str]:
    """For each target not met: what the measurements say limits it."""
    caps = {r["system"]: r for r in cap["results"]}
    ours = caps.get("ours", {})
    bound = next((r for r in ours.get("runs", []) if r["calls"] == ours.get("capacity_bound")), {})
    at_cap = next((r for r in ours.get("runs", []) if r["calls"] == ours.get("capacity")), {})
    cpus = machine()["cpus"]
    out: dict[str, str] = {}
    for name, verdict in targets.items():
        if verdict == "met":
            continue
        if name.startswith("capacity") or name.startswith("cpu/call"):
            if "capacity and cpu/call" in out:
                continue
            others = ", ".join(
                f"{s} {caps[s]['capacity']} ("
                + (
                    f"fails at {caps[s]['capacity_bound']}: "
                    + "; ".join(_bound(caps[s]).get("fails") or [_bound(caps[s]).get("error", "?")])
                    if caps[s].get("capacity_bound")
                    else "no step failed"
                )
                + ")"
                for s in SYSTEMS
                if s in caps
            )
            out["capacity and cpu/call"] = (
                f"ours at {ours.get('capacity')} calls used {at_cap.get('cpu_cores')} of {cpus} "
                f"cores (sims {at_cap.get('sims_cpu_cores')}, load {at_cap.get('load')}); at "
                f"{bound.get('calls')} calls {bound.get('cpu_cores')} cores, loop lag p99 "
                f"{_p(bound.get('loop_lag_ms'), 'p99')} ms; capacities: {others}"
            )
        elif name.startswith("turn added"):
            r = _get(lat["turns"], "ours", 0.02 if "2%" in name else 0.0)
            jb = r.get("jitter_buffer_ms") or {}
            out[name] = (
                f"turn added p95 {_p(r.get('turn_added_ms'), 'p95')} ms (n="
                f"{_p(r.get('turn_added_ms'), 'n')}) = inbound (jitter buffer p95 "
                f"{_r(jb.get('p95'))}, up to 30 ms of simulated jitter) + outbound (first delta "
                f"-> first packet p95 {_p(r.get('turn_outbound_ms'), 'p95')} ms); loop lag p99 "
                f"{_p(r.get('loop_lag_ms'), 'p99')} ms"
            )
        elif name.startswith("barge-in"):
            r = next((x for x in lat["barge_in"] if x.get("system") == "ours"), {})
            out[name] = (
                f"wire p50 {_p(r.get('barge_in_wire_ms'), 'p50')} ms of which the simulated VAD "
                f"p50 {_p(r.get('barge_in_vad_ms'), 'p50')} ms (n={_p(r.get('barge_in_wire_ms'), 'n')})"
                + (f"; error: {r['error'][:200]}" if r.get("error") else "")
            )
        elif name.startswith("jitter"):
            out[name] = "see the jitter buffer p50/p95/p99 in the latency table"
    return out


def _bound(res: dict[str, Any]) -> dict[str, Any]:
    return next((r for r in res["runs"] if r["calls"] == res.get("capacity_bound")), {})


def _r(v: Any) -> Any:
    return round(v, 1) if isinstance(v, float) else v


def profile_summary(top: int = 10) -> str | None:
    """The last `python -m bench.profile_ours` summary, if there is one."""
    path = RESULTS / "profile-ours-latest.json"
    if not path.exists():
        return None
    from .profile_ours import table as profile_table

    return profile_table(json.loads(path.read_text()), top)


def _le(v: Any, limit: float) -> str:
    return "n/a" if v is None else ("met" if v <= limit else "missed")


def _ge(v: Any, limit: float) -> str:
    return "n/a" if v is None else ("met" if v >= limit else "missed")


def _lt(v: Any, limit: float) -> str:
    return "n/a" if v is None else ("met" if v < limit else "missed")


def render(s: dict[str, Any], versions: dict[str, Any], info: dict[str, Any]) -> str:
    keys = list(s["systems"]["ours"])
    lines = [
        f"whatsapp-call benchmarks, {info['date']}, {info['machine']['cpus']} CPUs, python {info['machine']['python']}, "
        f"aiortc {versions['aiortc']}, pipecat-ai {versions['pipecat-ai']}, load {info['load']}",
        "",
        f"{'figure':<28} {'ours':>9} {'baseline':>9} {'pipecat':>9} {'ours/base':>9} {'ours/pipe':>9}",
    ]
    for k in keys:
        v = [s["systems"][x][k] for x in SYSTEMS]
        r = s["ratios"][k]
        lines.append(
            f"{k:<28} {v[0]!s:>9} {v[1]!s:>9} {v[2]!s:>9} {r['ours/baseline']!s:>9} {r['ours/pipecat']!s:>9}"
        )
    lines.append("")
    lines += [f"target: {name:<50} {verdict}" for name, verdict in s["targets"].items()]
    lines += ["", "capacity rule: " + s["capacity_rule"]]
    if s.get("limits"):
        lines += ["", "what limits the targets not met:"]
        lines += [f"  {name}: {why}" for name, why in s["limits"].items()]
    cpu_missed = any(v != "met" for k, v in s["targets"].items() if k.startswith("cpu/"))
    if cpu_missed and (prof := profile_summary()):  # a CPU profile explains CPU targets only
        lines += ["", prof]
    return "\n".join(lines)


async def _main(quick: bool) -> None:
    t0 = time.monotonic()
    python = ensure_pipecat()
    versions = _versions(str(python))
    systems = list(SYSTEMS)
    print("latency (turns with 30 ms jitter at 0% and 2% loss, barge-in, set-up)...", flush=True)
    lat = await latency.run(
        systems,
        seconds=6.0 if quick else 15.0,
        calls=1 if quick else 2,
        setup_calls=2 if quick else 5,
    )
    print("capacity...", flush=True)
    steps = [1, 5] if quick else [1, 5, 10, 20]
    seconds = 4.0 if quick else 6.0
    cap = await capacity.run(systems, steps, seconds=seconds, workers=1, refine=not quick)
    info = {"date": now_iso(), "machine": machine(), "load": loadavg()}
    s = summary(lat, cap)
    s["capacity_rule"] = s["capacity_rule"].format(seconds=f"{seconds:g}", warmup="3")
    print()
    print(latency.table(lat))
    print()
    print(capacity.table(cap["results"]))
    print()
    text = render(s, versions, info)
    print(text)
    elapsed = round(time.monotonic() - t0)
    print(f"\n(total {elapsed} s; load at the end {loadavg()})")
    path = write_result(
        "run_all",
        {
            **info,
            "versions": versions,
            "elapsed_s": elapsed,
            "summary": s,
            "latency": lat,
            "capacity": cap,
        },
    )
    (RESULTS / "run_all-latest.txt").write_text(text + "\n")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (1-5 calls)")
    asyncio.run(_main(parser.parse_args().quick))


if __name__ == "__main__":
    main()
