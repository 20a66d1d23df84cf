"""Counts what the reliability suite does, so the README's figures come from a real run.

A test module enables it with `pytest_plugins = ["reliability_plugin"]`; its tests take
the `reliability` fixture and report what they did: `reliability.fault("provider.timeout")` when a fault is injected,
`reliability.survived("provider.timeout")` once every assertion about its outcome held,
`reliability.bad_inputs("config", tried=120, crashes=0)` and
`reliability.flood(sent=1000, lost=0, seconds=0.8)`. A fault whose test failed stays
"injected" without "survived", so a failing run shows up in the figures, not only in pytest.

At the end of the session the tally is merged into `bench/results/reliability.json` (per
test id, so running one file updates only its own entries); `bench/reliability_figures.py`
prints the totals.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "reliability.json"


class Tally:
    """Everything the reliability tests of this session reported, per test id."""

    def __init__(self) -> None:
        self.tests: dict[str, dict[str, Any]] = {}

    def entry(self, test_id: str) -> dict[str, Any]:
        return self.tests.setdefault(
            test_id,
            {"faults": {}, "survived": [], "bad_inputs": {}, "floods": [], "at": time.time()},
        )

    def write(self, path: Path = RESULTS) -> None:
        """Merge into `path` (a lock keeps parallel sessions from losing each other's)."""
        if not self.tests:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data: dict[str, Any] = {"tests": {}}
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_text())
            data.setdefault("tests", {}).update(self.tests)
            data["updated"] = time.time()
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)


class Reliability:
    """The per-test reporter handed to tests."""

    def __init__(self, tally: Tally, test_id: str):
        self._entry = tally.entry(test_id)
        # A re-run of a test replaces its previous figures.
        self._entry.update(faults={}, survived=[], bad_inputs={}, floods=[], at=time.time())

    def fault(self, name: str, count: int = 1) -> None:
        self._entry["faults"][name] = self._entry["faults"].get(name, 0) + count

    def survived(self, name: str) -> None:
        if name not in self._entry["faults"]:
            raise AssertionError(f"survived({name!r}) without fault({name!r}) first")
        self._entry["survived"].append(name)

    def bad_inputs(self, kind: str, *, tried: int, crashes: int) -> None:
        seen = self._entry["bad_inputs"].setdefault(kind, {"tried": 0, "crashes": 0})
        seen["tried"] += tried
        seen["crashes"] += crashes

    def flood(
        self, *, sent: int, lost: int, seconds: float, live_calls: int, offered: float
    ) -> None:
        """`offered`: seconds until every request was on the wire; `seconds`: until every
        one was answered."""
        self._entry["floods"].append(
            {
                "sent": sent,
                "lost": lost,
                "offered_seconds": round(offered, 3),
                "seconds": round(seconds, 3),
                "live_calls": live_calls,
            }
        )


@pytest.fixture(scope="session")
def reliability_tally() -> Iterator[Tally]:
    tally = Tally()
    yield tally
    tally.write()


@pytest.fixture
def reliability(reliability_tally: Tally, request: pytest.FixtureRequest) -> Reliability:
    return Reliability(reliability_tally, request.node.nodeid)


def totals(data: dict[str, Any]) -> dict[str, Any]:
    """Sum a results file: faults injected/survived, bad inputs tried/crashes, floods."""
    out: dict[str, Any] = {
        "faults_injected": 0,
        "faults_survived": 0,
        "fault_kinds": {},
        "bad_inputs_tried": 0,
        "bad_input_crashes": 0,
        "bad_input_kinds": {},
        "webhooks_flooded": 0,
        "webhooks_lost": 0,
        "flood_seconds": [],
        "flood_offered_seconds": [],
        "tests": len(data.get("tests", {})),
    }
    for entry in data.get("tests", {}).values():
        survived = list(entry.get("survived", []))
        for name, count in entry.get("faults", {}).items():
            out["faults_injected"] += count
            ok = count if name in survived else 0
            out["faults_survived"] += ok
            kind = out["fault_kinds"].setdefault(name.split(".")[0], [0, 0])
            kind[0] += count
            kind[1] += ok
        for name, seen in entry.get("bad_inputs", {}).items():
            out["bad_inputs_tried"] += seen["tried"]
            out["bad_input_crashes"] += seen["crashes"]
            kind = out["bad_input_kinds"].setdefault(name, [0, 0])
            kind[0] += seen["tried"]
            kind[1] += seen["crashes"]
        for flood in entry.get("floods", []):
            out["webhooks_flooded"] += flood["sent"]
            out["webhooks_lost"] += flood["lost"]
            out["flood_seconds"].append(flood["seconds"])
            out["flood_offered_seconds"].append(flood.get("offered_seconds"))
    return out
