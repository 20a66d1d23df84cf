"""Where our service spends its CPU at a given load: N calls through ours (the same run as
bench.capacity), and `py-spy record` of the service process over the measured window. Writes
the speedscope profile and a summary of the top functions (self and inclusive share of the
samples) to bench/results/profile-ours-<time>.json (+ -latest.json); bench.run_all prints
that summary under the targets it missed.

py-spy is not a project dependency; install it into the venv for this (not into the lock):

    .tools/bin/uv pip install --python .venv/bin/python py-spy
    .venv/bin/python -m bench.profile_ours [--calls 5] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from .harness import runner
from .harness.common import RESULTS, BenchError, loadavg, now_iso, write_result


def py_spy() -> str | None:
    return shutil.which("py-spy") or (
        str(Path(sys.executable).parent / "py-spy")
        if (Path(sys.executable).parent / "py-spy").exists()
        else None
    )


def _idle(frame: dict[str, Any]) -> bool:
    """A thread parked in a wait (an executor worker or aiortc's decoder thread waiting for
    work), which py-spy does not always recognise as idle."""
    file = frame.get("file") or ""
    return (
        (frame["name"] == "_worker" and file.endswith("concurrent/futures/thread.py"))
        or (frame["name"] in ("Condition.wait", "Event.wait") and file.endswith("threading.py"))
        or (frame["name"].endswith("Selector.select") and file.endswith("selectors.py"))
    )


def summarise(speedscope: dict[str, Any], top: int = 10) -> dict[str, Any]:
    """Top functions by self and by inclusive share of the samples (all threads)."""
    frames = speedscope["shared"]["frames"]

    def name(i: int) -> str:  # one entry per function, whatever the line
        f = frames[i]
        file = (f.get("file") or "").split("site-packages/")[-1].split("/src/")[-1]
        return f"{f['name']} ({file.split('/lib/python3')[-1].lstrip('.0123456789/')})"

    self_w: Counter[str] = Counter()
    incl_w: Counter[str] = Counter()
    total = 0.0
    for prof in speedscope["profiles"]:
        for stack, weight in zip(prof["samples"], prof["weights"], strict=True):
            if not stack or _idle(frames[stack[-1]]):
                continue
            total += weight
            self_w[name(stack[-1])] += weight
            for n in {name(i) for i in stack}:
                incl_w[n] += weight
    pct = lambda w: round(100 * w / total, 1) if total else None  # noqa: E731
    return {
        "busy_samples_s": round(total, 2),  # idle waits left out; shares are of the rest
        "top_self": [{"function": n, "pct": pct(w)} for n, w in self_w.most_common(top)],
        "top_inclusive": [{"function": n, "pct": pct(w)} for n, w in incl_w.most_common(top * 3)],
    }


async def profile(calls: int, seconds: float) -> dict[str, Any]:
    exe = py_spy()
    if exe is None:
        raise BenchError(
            "py-spy is not installed: `.tools/bin/uv pip install --python .venv/bin/python py-spy`"
        )
    out = RESULTS / "profile-ours.speedscope.json"
    spy: dict[str, Any] = {}

    async def during_window(pid: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            exe, "record", "-d", str(int(seconds)), "-f", "speedscope", "-o", str(out),
            "-p", str(pid), "-r", "100", "--nonblocking",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        spy["task"] = proc

    run = await runner.run_system(
        "ours", calls, seconds=seconds + 1.0, warmup=3.0, on_window=during_window
    )
    proc = spy.get("task")
    log = (await proc.communicate())[0].decode(errors="replace")[-600:] if proc else ""
    if not out.exists():
        raise BenchError(f"py-spy wrote no profile: {log}")
    summary = summarise(json.loads(out.read_text()))
    return {
        "date": now_iso(),
        "calls": calls,
        "seconds": seconds,
        "load": loadavg(),
        "run": {k: run.get(k) for k in ("ok", "fails", "cpu_cores", "cpu_core_per_call")},
        "speedscope": str(out.relative_to(RESULTS.parent.parent)),
        **summary,
    }


def table(data: dict[str, Any], top: int = 10) -> str:
    lines = [
        f"py-spy profile of ours at {data['calls']} calls ({data['date']}, {data['seconds']:g} s, "
        f"{data['run'].get('cpu_cores')} cores, ok={data['run'].get('ok')}): top {top} by self time"
    ]
    lines += [f"  {f['pct']:>5}%  {f['function']}" for f in data["top_self"][:top]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--resummarise", action="store_true", help="re-read the last profile")
    args = parser.parse_args()
    if args.resummarise:
        data = json.loads((RESULTS / "profile-ours-latest.json").read_text())
        data.update(summarise(json.loads((RESULTS / "profile-ours.speedscope.json").read_text())))
    else:
        data = asyncio.run(profile(args.calls, args.seconds))
    print(table(data))
    print("inclusive:")
    for f in data["top_inclusive"][:20]:
        print(f"  {f['pct']:>5}%  {f['function']}")
    print(f"wrote {write_result('profile-ours', data)}")


if __name__ == "__main__":
    main()
