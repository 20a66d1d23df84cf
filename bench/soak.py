"""Soak: many concurrent calls for a long time; does the service leak?

The simulators (WhatsApp with real aiortc users, OpenAI Realtime) run in a child process
(`whatsapp-call sim`), the service (`Runtime`: store, webhooks, orchestrator, media, bridge)
in this one, so what is sampled is the service alone. `--calls` slots each place a call to a
fresh number, wait for its end, and place the next, until `--minutes` have passed. Every
`--sample-seconds` the process's RSS, asyncio task count and open file descriptors are
sampled. Leak check: a warm-up wave of calls first, then idle samples before and after the
soak are compared (same state: no call active), plus the RSS trend under load.

    .venv/bin/python -m bench.soak [--minutes 10] [--calls 20] [--call-seconds 8]

Writes bench/results/soak.json and prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CLI = str(Path(sys.executable).parent / "whatsapp-call")


def sample(runtime: Any, t0: float) -> dict[str, Any]:
    with open("/proc/self/status") as handle:
        rss_kb = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
    return {
        "t": round(time.monotonic() - t0, 1),
        "rss_mb": round(rss_kb / 1024, 1),
        "tasks": len(asyncio.all_tasks()),
        "fds": len(os.listdir("/proc/self/fd")),
        "active_calls": runtime.service.active_count,
    }


async def idle_sample(runtime: Any, t0: float, settle: float = 5.0) -> dict[str, Any]:
    """A sample once no call is active and things had `settle` s to wind down."""
    async with asyncio.timeout(120):
        while runtime.service.active_count:  # noqa: ASYNC110 - polled, no event exists
            await asyncio.sleep(0.2)
    await asyncio.sleep(settle)
    gc.collect()
    return sample(runtime, t0)


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per minute."""
    if len(points) < 3:
        return 0.0
    xs, ys = zip(*points, strict=True)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


async def start_simulators(workdir: Path, call_seconds: float) -> tuple[subprocess.Popen, Path]:
    config = workdir / "sim.yaml"
    ready = workdir / "ready.json"
    scenario = json.dumps({"hangup_after_s": call_seconds})
    proc = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
        [
            CLI,
            "sim",
            "--config-out",
            str(config),
            "--state-dir",
            str(workdir / "state"),
            "--no-turn",
            "--json",
            "--scenario",
            scenario,
            "--log-level",
            "warning",
        ],
        stdout=ready.open("w"),
        stderr=(workdir / "sim.log").open("w"),
    )
    for _ in range(600):
        if ready.exists() and ready.read_text().strip():
            return proc, config
        if proc.poll() is not None:
            raise SystemExit("the simulators did not start:\n" + (workdir / "sim.log").read_text())
        await asyncio.sleep(0.1)
    proc.kill()
    raise SystemExit("the simulators did not start within 60 s")


async def soak(
    minutes: float, calls: int, call_seconds: float, every: float, trace: bool = False
) -> dict[str, Any]:
    from whatsapp_call import plugins
    from whatsapp_call.calls.orchestrator import CallRequest
    from whatsapp_call.config import load_settings
    from whatsapp_call.runtime import Runtime

    workdir = Path(tempfile.mkdtemp(prefix="whatsapp-call-soak-"))
    sim, config = await start_simulators(workdir, call_seconds)
    try:
        plugins.load_plugins()
        models = [m for _, m in plugins.call_all_sync("settings_model")]
        settings = load_settings(
            config,
            overrides={"maxConcurrentCalls": calls, "logLevel": "warning"},
            plugin_models=models,
        )
        numbers = (f"+1415{n:07d}" for n in range(5550000, 9999999))
        outcomes: collections.Counter[str] = collections.Counter()
        placed: collections.Counter[str] = collections.Counter()
        details: collections.Counter[str] = collections.Counter()
        samples: list[dict[str, Any]] = []
        t0 = time.monotonic()

        async with Runtime(settings) as runtime:

            async def one_call() -> None:
                to = next(numbers)
                placed[to] += 1
                record = await runtime.service.place_call(CallRequest(to=to))
                record = await runtime.service.wait(record.id, timeout=call_seconds + 90)
                outcomes[record.end_reason.value if record.end_reason else "none"] += 1
                if record.end_reason is None or record.end_reason.value != "completed":
                    details[(record.end_detail or "")[:120]] += 1

            async def slot(deadline: float) -> None:
                while time.monotonic() < deadline:
                    await one_call()

            # Warm-up: one wave, so caches, pools and lazy imports exist before the baseline.
            await asyncio.gather(*(one_call() for _ in range(calls)))
            start_idle = await idle_sample(runtime, t0)
            if trace:
                tracemalloc.start(8)
                before = tracemalloc.take_snapshot()
            soak_start = time.monotonic()
            deadline = soak_start + minutes * 60

            async def sampler() -> None:
                while True:
                    samples.append(sample(runtime, t0))
                    await asyncio.sleep(every)

            sampling = asyncio.create_task(sampler())
            await asyncio.gather(*(slot(deadline) for _ in range(calls)))
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
            soak_seconds = time.monotonic() - soak_start
            end_idle = await idle_sample(runtime, t0)
            growth: list[str] = []
            if trace:
                after = tracemalloc.take_snapshot()
                stats = after.compare_to(before, "traceback")
                traced_kb = sum(s.size_diff for s in stats) / 1024
                growth = [f"total Python-allocated growth {traced_kb:+.0f} KB"] + [
                    f"{s.size_diff / 1024:+.0f} KB in {s.count_diff:+d} blocks: "
                    + " <- ".join(
                        f"{f.filename.split('site-packages/')[-1]}:{f.lineno}"
                        for f in s.traceback[:4]
                    )
                    for s in stats[:12]
                ]
                tracemalloc.stop()
    finally:
        sim.send_signal(signal.SIGTERM)
        try:
            sim.wait(30)
        except subprocess.TimeoutExpired:
            sim.kill()

    loaded = [s for s in samples if s["active_calls"] >= max(1, calls // 2)]
    total = sum(outcomes.values())
    return {
        "minutes": minutes,
        "soak_seconds": round(soak_seconds, 1),
        "concurrent_calls": calls,
        "call_seconds": call_seconds,
        "calls_total": total,
        "outcomes": dict(outcomes),
        "not_completed_details": dict(details.most_common(10)),
        "numbers_called_twice": sum(1 for n in placed.values() if n > 1),
        "start_idle": start_idle,
        "end_idle": end_idle,
        "growth_idle": {
            key: round(end_idle[key] - start_idle[key], 1) for key in ("rss_mb", "tasks", "fds")
        },
        "rss_mb_per_minute_under_load": round(
            slope_per_minute([(s["t"], s["rss_mb"]) for s in loaded]), 3
        ),
        # The trend once warmed up: the second half of the soak (allocator high-water marks
        # are reached in the first minutes; a leak keeps growing after that).
        "rss_mb_per_minute_second_half": round(
            slope_per_minute([(s["t"], s["rss_mb"]) for s in loaded[len(loaded) // 2 :]]), 3
        ),
        "peak": {key: max(s[key] for s in samples) for key in ("rss_mb", "tasks", "fds")},
        "python_allocation_growth": growth,
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--calls", type=int, default=20, help="concurrent calls")
    parser.add_argument("--call-seconds", type=float, default=8.0, help="the user hangs up after")
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument(
        "--tracemalloc", action="store_true", help="also report where Python memory grew"
    )
    args = parser.parse_args()
    result = asyncio.run(
        soak(args.minutes, args.calls, args.call_seconds, args.sample_seconds, args.tracemalloc)
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=1))
    s, e, g = result["start_idle"], result["end_idle"], result["growth_idle"]
    print(f"soak: {result['concurrent_calls']} concurrent calls for {result['soak_seconds']:.0f} s")
    print(f"  calls: {result['calls_total']}  outcomes: {result['outcomes']}")
    print(f"  numbers called twice: {result['numbers_called_twice']}")
    for key, unit in (("rss_mb", "MB"), ("tasks", ""), ("fds", "")):
        print(
            f"  {key:7s} idle before {s[key]:>8} {unit:2s} after {e[key]:>8} {unit:2s} "
            f"growth {g[key]:+} (peak under load {result['peak'][key]})"
        )
    print(
        f"  RSS trend under load: {result['rss_mb_per_minute_under_load']:+.2f} MB/min overall, "
        f"{result['rss_mb_per_minute_second_half']:+.2f} MB/min in the second half"
    )
    if result["not_completed_details"]:
        print("  not completed:", result["not_completed_details"])
    for line in result["python_allocation_growth"]:
        print("  " + line)
    print(f"  written to {RESULTS / 'soak.json'}")


if __name__ == "__main__":
    main()
