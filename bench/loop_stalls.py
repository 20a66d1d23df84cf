"""Event-loop stalls at call set-up and call end, in the process that carries the calls.

Every live call sends a frame every 20 ms from one asyncio loop, so any callback that holds
the loop for longer than that makes every other call on it send late (a gap the caller
hears). This runs the service in this process exactly as `serve` runs it (`Runtime`), with
the simulators (WhatsApp and its users, Realtime) in a child process on 127.0.0.1 so that
their work is not on the measured loop, and prints the worst loop lag (a 5 ms ticker's
overshoot) in each phase: "first call" (the process's first call, alone: set-up and end),
"steady" (M live calls), "setup" and "teardown" (K more calls placed, then hung up, one every
`--spacing` seconds, while the M calls stay live). Then the time of one full GC pass.

    .venv/bin/python -m bench.loop_stalls [--live 8] [--calls 4] [--spacing 0.4] [--stacks]
                                          [--no-prepare] [--py-spy PHASE]

`--stacks` also times every loop callback and samples the stack of any that runs over 10 ms
(from a helper thread), times GC passes, and sums loop time per task: it prints the longest
callbacks with where they spent their time, innermost frame first ("live" is the M calls'
own set-up). `--no-prepare` skips `whatsapp_call.calls.warmup.prepare_process` (the start-up
warm-up and GC freeze), to compare with before. `--py-spy PHASE` records that phase with
py-spy into bench/results/loop_stalls-PHASE.txt. About 20 s.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import errno
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from whatsapp_call import plugins
from whatsapp_call.calls import orchestrator
from whatsapp_call.calls.orchestrator import CallRequest
from whatsapp_call.config import load_settings
from whatsapp_call.runtime import Runtime

from .harness.common import RESULTS, Child, loadavg, percentile

PY = sys.executable
TICK = 0.005
STALL_MS = 10.0  # the sampler looks at the loop's stack once it is this late


class LagMeter:
    """A 5 ms ticker: how late each wake-up was (ms), with the time it woke."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.beat = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(TICK)
            self.beat = now = time.monotonic()
            self.samples.append((now, (now - t0 - TICK) * 1e3))

    def take(self) -> list[float]:
        values = [ms for _, ms in self.samples]
        self.samples = []
        return values

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class SlowCallbacks(threading.Thread):
    """`--stacks`: times every loop callback (a wrapper around `asyncio.Handle._run`) and,
    from this helper thread, samples the loop thread's stack every 2 ms while one callback
    has run for more than `STALL_MS`; also times garbage-collector passes. `report` lists the
    longest callbacks with where they spent their time, and the GC passes over 5 ms."""

    def __init__(self, loop_thread: int) -> None:
        super().__init__(name="stall-sampler", daemon=True)
        self.loop_thread = loop_thread
        self.phase = "start-up"
        self.running = True
        self.slow: list[tuple[float, str, str]] = []  # (ms, phase, where)
        self.gc: list[tuple[float, str, int]] = []
        self.by_task: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self._cb_start: float | None = None
        self._samples: collections.Counter[str] = collections.Counter()
        self._gc_t0 = 0.0
        self._original = asyncio.events.Handle._run

    def install(self) -> None:
        sampler, original = self, self._original

        def _run(handle: asyncio.Handle) -> None:
            sampler._samples = collections.Counter()
            sampler._cb_start = time.perf_counter()
            try:
                original(handle)
            finally:
                ms = (time.perf_counter() - sampler._cb_start) * 1e3
                sampler._cb_start = None
                sampler.by_task[sampler.phase][_owner(handle)] += ms
                if ms > STALL_MS:
                    where = sampler._samples.most_common(1)
                    where_text = where[0][0] if where else "(no sample: the GIL was held)"
                    sampler.slow.append((ms, sampler.phase, f"{_owner(handle)}: {where_text}"))

        asyncio.events.Handle._run = _run  # type: ignore[method-assign]
        gc.callbacks.append(self._on_gc)
        self.start()

    def uninstall(self) -> None:
        self.running = False
        asyncio.events.Handle._run = self._original  # type: ignore[method-assign]
        gc.callbacks.remove(self._on_gc)

    def _on_gc(self, stage: str, info: dict[str, Any]) -> None:
        if stage == "start":
            self._gc_t0 = time.perf_counter()
            return
        ms = (time.perf_counter() - self._gc_t0) * 1e3
        if ms > 5 or info["generation"] == 2:
            self.gc.append((ms, self.phase, info["generation"]))

    def run(self) -> None:
        while self.running:
            time.sleep(0.002)
            started = self._cb_start
            if started is None or (time.perf_counter() - started) * 1e3 < STALL_MS:
                continue
            frame = sys._current_frames().get(self.loop_thread)
            if frame is not None:
                self._samples[_where(frame)] += 1


def _owner(handle: asyncio.Handle) -> str:
    """The coroutine a callback runs a step of (a task's wake-up), else the callback."""
    callback = handle._callback  # type: ignore[attr-defined]
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return getattr(coro, "__qualname__", repr(coro))
    return getattr(callback, "__qualname__", repr(callback))


def _where(frame: Any) -> str:
    """The innermost frames, shortest file names."""
    stack = traceback.extract_stack(frame)[-10:]
    return " < ".join(
        f"{f.filename.rsplit('site-packages/', 1)[-1].rsplit('src/', 1)[-1].rsplit('/', 1)[-1]}"
        f":{f.lineno} {f.name}"
        for f in reversed(stack)
        if "asyncio/" not in f.filename or f.name in ("sendto", "write", "close")
    )


async def py_spy(phase: str) -> asyncio.subprocess.Process:
    """`--py-spy PHASE`: record this process's loop thread (GIL holders only) during that
    phase into bench/results/loop_stalls-PHASE.txt (collapsed stacks: count per stack)."""
    out = RESULTS / f"loop_stalls-{phase.replace(' ', '_')}.txt"
    RESULTS.mkdir(parents=True, exist_ok=True)
    argv = [str(Path(PY).parent / "py-spy"), "record", "-p", str(os.getpid()), "-f", "raw"]
    argv += ["-r", "250", "--gil", "--nonblocking", "-o", str(out)]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
    await asyncio.sleep(1.0)  # py-spy attaches
    return proc


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "ticks": len(values),
        "max_ms": round(max(values), 1) if values else None,
        "p99_ms": percentile(values, 99),
        "over_20ms": sum(1 for v in values if v > 20),
        "over_40ms": sum(1 for v in values if v > 40),
    }


async def wait_live(runtime: Runtime, ids: list[str], timeout: float) -> None:
    """Until every call is connected, answered and has sent its greeting."""
    active = runtime.service._active
    deadline = time.monotonic() + timeout
    while not all(i in active and active[i].media_connected and active[i].greeted for i in ids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids)} calls did not all connect within {timeout:g} s")
        await asyncio.sleep(0.05)


async def place(runtime: Runtime, n: int, first: int, spacing: float) -> list[str]:
    ids = []
    for i in range(first, first + n):
        record = await runtime.service.place_call(CallRequest(to=f"+1415555{i:04d}"))
        ids.append(record.id)
        await asyncio.sleep(spacing)
    return ids


async def hang_up(runtime: Runtime, ids: list[str], spacing: float) -> None:
    tasks = []
    for call_id in ids:
        tasks.append(asyncio.create_task(runtime.service.hangup(call_id)))
        await asyncio.sleep(spacing)
    async with asyncio.timeout(30):
        await asyncio.gather(*tasks)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.no_prepare:
        orchestrator.prepare_process = _old_worker_warm_up  # type: ignore[attr-defined]
    sims = Child("loop-stalls-sims", [PY, "-m", "bench.harness.sims", json.dumps({"tap": False})])
    ready = await sims.start()
    meter = LagMeter()
    sampler = SlowCallbacks(threading.get_ident()) if args.stacks else None
    result: dict[str, Any] = {
        "live": args.live,
        "calls": args.calls,
        "spacing": args.spacing,
        "prepared": not args.no_prepare,
    }
    phases: dict[str, Any] = {}
    try:
        plugins.load_plugins()
        models = [m for _, m in plugins.call_all_sync("settings_model")]
        settings = load_settings(
            ready["config_path"],
            plugin_models=models,
            environ={},
            overrides={"maxConcurrentCalls": 1000, "logLevel": "warning"},
        )
        async with Runtime(settings) as runtime:  # start-up (and its warm-up) is not measured
            meter.start()
            if sampler is not None:
                sampler.install()
            before = set(sys.modules)
            for phase in ("first call", "live", "steady", "setup", "teardown"):
                if sampler is not None:
                    sampler.phase = phase
                spy = await py_spy(phase) if phase == args.py_spy else None
                meter.take()
                if phase == "first call":  # this process's first call, alone
                    first = await place(runtime, 1, 9000, 0)
                    await wait_live(runtime, first, 30)
                    await hang_up(runtime, first, 0)
                    result["first_call_imports"] = sorted(set(sys.modules) - before)
                elif phase == "live":  # the M calls' own set-up: not reported
                    base = await place(runtime, args.live, 0, args.spacing)
                    await wait_live(runtime, base, 60)
                    await asyncio.sleep(1.0)
                elif phase == "steady":
                    await asyncio.sleep(2.0)
                elif phase == "setup":
                    extra = await place(runtime, args.calls, 100, args.spacing)
                    await wait_live(runtime, extra, 60)
                    await asyncio.sleep(0.5)
                else:
                    await hang_up(runtime, extra, args.spacing)
                    await asyncio.sleep(0.5)
                if phase != "live":
                    phases[phase] = summary(meter.take())
                if spy is not None:
                    spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                    async with asyncio.timeout(30):
                        await spy.wait()
            result["phases"] = phases
            if sampler is not None:
                sampler.phase = "after"
            t0 = time.perf_counter()  # after the measured phases: it stalls the loop itself
            gc.collect()
            result["full_gc_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
            result["gc_objects"] = len(gc.get_objects())
            result["gc_frozen"] = gc.get_freeze_count()
            if sampler is not None:
                sampler.phase = "shutdown"
    finally:
        meter.stop()
        if sampler is not None:
            sampler.uninstall()
        await sims.stop()
    result["loadavg"] = loadavg()
    if sampler is not None:
        result["slow_callbacks"] = sorted(sampler.slow, reverse=True)[: args.top]
        result["gc_pauses"] = sorted(sampler.gc, reverse=True)[: args.top]
        result["loop_ms_by_task"] = {
            phase: [(name, round(ms, 1)) for name, ms in counts.most_common(12)]
            for phase, counts in sampler.by_task.items()
        }
    return result


def _old_worker_warm_up() -> None:
    """`--no-prepare`: only what a worker did before `warmup.prepare_process` existed."""
    from whatsapp_call.bridge import AudioBridge, PlayoutTrack  # noqa: F401
    from whatsapp_call.media.peer import CallMedia  # noqa: F401

    PlayoutTrack().stop()


def report(result: dict[str, Any]) -> None:
    print(
        f"loop lag (5 ms ticker): a first call alone, then with {result['live']} live calls "
        f"{result['calls']} calls set up then torn down, one every {result['spacing']} s"
        + ("" if result["prepared"] else " (--no-prepare)")
    )
    print(f"{'phase':<10} {'ticks':>6} {'max ms':>8} {'p99 ms':>8} {'>20ms':>6} {'>40ms':>6}")
    for name, s in result["phases"].items():
        print(
            f"{name:<10} {s['ticks']:>6} {s['max_ms']:>8} {s['p99_ms']:>8} "
            f"{s['over_20ms']:>6} {s['over_40ms']:>6}"
        )
    print(
        f"a full GC pass with {result['live']} live calls: {result['full_gc_ms']} ms "
        f"({result['gc_objects']} tracked objects, {result['gc_frozen']} frozen)"
    )
    print("modules first imported by the first call:", " ".join(result["first_call_imports"]))
    print(f"load average {result['loadavg']}")
    if "slow_callbacks" in result:
        print(f"callbacks over {STALL_MS:g} ms (phase, innermost frames of the longest sample):")
        for ms, phase, where in result["slow_callbacks"]:
            print(f"{ms:>7.1f} ms [{phase}] {where}")
        print(
            "GC passes over 5 ms, and every full (generation 2) one:",
            [(round(ms, 1), p, g) for ms, p, g in result["gc_pauses"]],
        )
        print("loop time by task (ms) per phase:")
        for phase, items in result["loop_ms_by_task"].items():
            print(f"  {phase}: " + ", ".join(f"{name} {ms}" for name, ms in items))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--live", type=int, default=8, help="calls kept live throughout (M)")
    parser.add_argument("--calls", type=int, default=4, help="calls set up and torn down (K)")
    parser.add_argument("--spacing", type=float, default=0.4, help="seconds between calls")
    parser.add_argument("--stacks", action="store_true", help="sample stacks during stalls")
    parser.add_argument(
        "--py-spy",
        choices=["first call", "steady", "setup", "teardown"],
        help="profile one phase with py-spy",
    )
    parser.add_argument(
        "--no-prepare",
        action="store_true",
        help="skip warmup.prepare_process (the warm-up and GC freeze), to compare",
    )
    parser.add_argument("--top", type=int, default=25, help="slow callbacks printed")
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    cli = parser.parse_args()
    try:
        out = asyncio.run(main(cli))
    except OSError as exc:  # another process took the simulators' chosen port: once more
        if exc.errno != errno.EADDRINUSE:
            raise
        out = asyncio.run(main(cli))
    report(out)
    if cli.json:
        print(json.dumps(out))
