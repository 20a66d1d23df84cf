"""The reliability figures the README reports, computed from a pytest run's results.

The reliability suite (tests/test_reliability_*.py, test_security.py, test_fuzz.py) counts
what it does through tests/reliability_plugin.py into bench/results/reliability.json: faults
injected and survived, bad inputs tried and crashes, webhooks flooded and lost. The soak
(bench/soak.py) writes bench/results/soak.json. This prints both and writes
bench/results/reliability_figures.json.

    .venv/bin/python -m bench.reliability_figures          # figures from the last run
    .venv/bin/python -m bench.reliability_figures --run    # run the suite first (~3-4 min)
    .venv/bin/python -m bench.reliability_figures --audit  # also pip-audit the lock file

`--audit` exports the pinned requirements from uv.lock and runs pip-audit on them (fetched
with `uv tool run`); it needs the network (PyPI and the OSV advisory database), so it is a
command to run, not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SUITE = [
    "tests/test_reliability_provider.py",
    "tests/test_reliability_webhooks.py",
    "tests/test_reliability_media.py",
    "tests/test_reliability_voice.py",
    "tests/test_reliability_process.py",
    "tests/test_security.py",
    "tests/test_fuzz.py",
]
sys.path.insert(0, str(ROOT / "tests"))
from reliability_plugin import totals  # noqa: E402


def run_suite() -> dict[str, Any]:
    """Run the suite afresh (old per-test entries are dropped) and time it."""
    (RESULTS / "reliability.json").unlink(missing_ok=True)
    started = time.monotonic()
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "pytest"), "-q", "-p", "no:cacheprovider", *SUITE],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {
        "exit_code": result.returncode,
        "summary": summary,
        "seconds": round(time.monotonic() - started, 1),
    }


def audit() -> dict[str, Any]:
    """pip-audit of the locked dependencies, as CI runs it (scripts/audit_deps.py)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "audit_deps.py"), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    try:
        return json.loads(result.stdout)
    except ValueError:
        return {"ok": False, "error": (result.stderr or result.stdout).strip()[-500:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="run the reliability suite first")
    parser.add_argument("--audit", action="store_true", help="pip-audit the locked dependencies")
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    if args.run:
        figures["run"] = run_suite()
    path = RESULTS / "reliability.json"
    if not path.exists():
        raise SystemExit(f"No {path}: run the suite first (--run, or pytest {' '.join(SUITE)}).")
    figures.update(totals(json.loads(path.read_text())))
    soak_path = RESULTS / "soak.json"
    if soak_path.exists():
        soak = json.loads(soak_path.read_text())
        soak.pop("samples", None)
        figures["soak"] = soak
    if args.audit:
        figures["audit"] = audit()
    (RESULTS / "reliability_figures.json").write_text(json.dumps(figures, indent=1))

    if "run" in figures:
        run = figures["run"]
        print(f"suite: {run['summary']} in {run['seconds']} s (exit {run['exit_code']})")
    print(
        f"faults injected / survived: {figures['faults_injected']} / {figures['faults_survived']}"
    )
    for kind, (injected, survived) in sorted(figures["fault_kinds"].items()):
        print(f"  {kind:10s} {injected:4d} / {survived}")
    print(
        f"bad inputs tried / crashes: {figures['bad_inputs_tried']} / {figures['bad_input_crashes']}"
    )
    for kind, (tried, crashes) in sorted(figures["bad_input_kinds"].items()):
        print(f"  {kind:20s} {tried:5d} / {crashes}")
    offered = [s for s in figures["flood_offered_seconds"] if s is not None]
    print(
        f"webhooks flooded / lost: {figures['webhooks_flooded']} / {figures['webhooks_lost']}"
        + (
            f" (offered in {max(offered):.2f} s, all answered in {max(figures['flood_seconds']):.2f} s)"
            if offered
            else ""
        )
    )
    soak = figures.get("soak")
    if soak:
        g = soak["growth_idle"]
        print(
            f"soak: {soak['concurrent_calls']} concurrent calls for {soak['soak_seconds']:.0f} s, "
            f"{soak['calls_total']} calls {soak['outcomes']}, numbers called twice: "
            f"{soak['numbers_called_twice']}"
        )
        print(
            f"  idle before -> after: RSS {soak['start_idle']['rss_mb']} -> "
            f"{soak['end_idle']['rss_mb']} MB, tasks {soak['start_idle']['tasks']} -> "
            f"{soak['end_idle']['tasks']}, fds {soak['start_idle']['fds']} -> "
            f"{soak['end_idle']['fds']} (growth {g})"
        )
        if "rss_mb_per_minute_second_half" in soak:
            print(
                f"  RSS trend in the second half: {soak['rss_mb_per_minute_second_half']:+.2f} MB/min"
            )
    if "audit" in figures:
        report = figures["audit"]
        if report["ok"]:
            print(
                f"pip-audit: {report['packages']} packages, vulnerable: {report['vulnerable'] or 'none'}"
            )
        else:
            print(f"pip-audit could not run: {report['error']}")
    print(f"written to {RESULTS / 'reliability_figures.json'}")


if __name__ == "__main__":
    main()
