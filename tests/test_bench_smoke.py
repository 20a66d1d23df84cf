"""The benchmark commands run end to end: one call for a few seconds through each system
(ours via `Runtime`, the aiortc echo baseline; pipecat when its environment was built), and
the JSON has the fields the reports are made of. No timing assertions: figures vary with
the machine's load."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives at the repo root
from bench.harness.common import PIPECAT_VENV  # noqa: E402
from bench.harness.runner import run_system  # noqa: E402
from bench.harness.wire import audio_level  # noqa: E402

pytestmark = pytest.mark.slow

WIRE_FIELDS = {
    "cpu_core_per_call",
    "mem_per_call_mb",
    "rss_mb",
    "sims_cpu_cores",
    "turn_wire_ms",
    "turn_added_ms",
    "barge_in_wire_ms",
    "wire_late_gaps",
    "calls_alive",
    "loadavg_start",
    "ok",
}


def test_audio_level_is_read_from_the_one_byte_header_extension():
    header = bytes([0x90, 111, 0, 1]) + bytes(8)  # V=2, X=1, PT 111
    ext = b"\xbe\xde\x00\x01" + bytes([0x20, 0x80 | 30, 0, 0])  # id 2, len 1: level 30
    packet = header + ext + b"payload"
    assert audio_level(packet, 2) == 30
    assert audio_level(packet, 3) is None
    assert audio_level(bytes([0x80, 111]) + bytes(10), 2) is None  # no extension


async def test_ours_one_call_reports_every_figure():
    run = await run_system("ours", 1, seconds=2.0, warmup=0.5)
    assert WIRE_FIELDS <= set(run)
    assert {"late_frames", "inbound_gaps", "jitter_buffer_ms", "loop_lag_ms", "setup_ms"} <= set(
        run
    )
    assert run["calls_alive"] == 1 and run["records"] == 1
    assert {"offer_built", "offer_sent", "media_connected"} <= set(run["setup_ms"])
    assert run["loop_lag_ms"]["n"] > 0 and run["cpu_cores"] > 0


async def test_baseline_one_call_with_loss_and_jitter():
    run = await run_system("baseline", 1, seconds=2.0, warmup=0.5, loss=0.02, jitter_ms=30)
    assert WIRE_FIELDS <= set(run)
    assert run["calls_alive"] == 1 and run["cpu_cores"] > 0
    assert "late_frames" not in run  # only our own process is looked into


@pytest.mark.skipif(
    not (PIPECAT_VENV / "bin" / "python").exists(),
    reason="pipecat's environment is built by `make bench` (python -m bench.run_all)",
)
async def test_pipecat_one_call():
    run = await run_system("pipecat", 1, seconds=2.0, warmup=0.5)
    assert WIRE_FIELDS <= set(run)
    assert run["calls_alive"] == 1 and run["cpu_cores"] > 0
