"""Event routing in `serve --workers N`: from the front's worker pool receiving webhook events
(after signature check and de-duplication) to the owning worker handing them to its call
(p50/p99, ms), under 1 and 10 concurrent calls.

The front stamps each forwarded batch with time.monotonic(); a worker started with
WHATSAPP_CALL_WORKER_PROBE=<dir> writes one `route` line per batch it has handed over (see
whatsapp_call.workers.worker.Probe). `terminated` events are counted apart: they arrive
while the harness hangs every call up at once, so they measure the hang-up burst, not routing.

    .venv/bin/python -m bench.routing [--calls 1 10] [--workers 2] [--repeat 3] [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .harness.common import BenchError, pcts
from .harness.runner import run_system

PROBE_ENV = "WHATSAPP_CALL_WORKER_PROBE"


def _samples(directory: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            item = json.loads(line)
            if item.get("kind") == "route":
                out.append(item)
    return out


async def measure(calls: int, workers: int, repeat: int, seconds: float) -> dict[str, Any]:
    in_call: list[float] = []
    ended: list[float] = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="whatsapp-call-routing-") as tmp:
            os.environ[PROBE_ENV] = tmp
            try:
                await run_system("ours", calls, seconds=seconds, warmup=1.0, workers=workers)
            finally:
                os.environ.pop(PROBE_ENV, None)
            for s in _samples(Path(tmp)):
                (ended if s["events"] == ["terminated"] else in_call).append(s["ms"])
    return {
        "calls": calls,
        "workers": workers,
        "runs": repeat,
        "route_ms": pcts(in_call, (50, 99)),
        "terminated_route_ms": pcts(ended, (50, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", nargs="+", type=int, default=[1, 10])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    if args.workers < 2:
        raise SystemExit("routing happens only with --workers 2 or more")
    for n in args.calls:
        try:
            r = asyncio.run(measure(n, args.workers, args.repeat, args.seconds))
        except BenchError as exc:
            print(f"calls={n}: {exc}")
            continue
        a, b = r["route_ms"], r["terminated_route_ms"]
        print(
            f"routing workers={args.workers} calls={n:<3} in-call events n={a['n']} "
            f"p50={a['p50']} ms p99={a['p99']} ms | terminated (hang-up burst) n={b['n']} "
            f"p50={b['p50']} ms p99={b['p99']} ms",
            flush=True,
        )
        print(json.dumps(r))


if __name__ == "__main__":
    main()
