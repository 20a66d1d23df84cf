"""The benchmark commands run end to end: one call for a few seconds through each system
(ours via `Runtime`, the aiortc echo baseline; pipecat when its environment was built), and
the JSON has the fields the reports are made of. No timing assertions: figures vary with
the machine's load."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives at the repo root
from bench import capacity  # noqa: E402
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
SERVICE_FIELDS = {
    "playout_frames",
    "late_frames",
    "dropped_frames",
    "underruns",
    "inbound_frames",
    "inbound_lost",
    "inbound_concealed",
    "inbound_gaps",
    "media_calls",
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
    assert SERVICE_FIELDS <= set(run["service"]) and run["service"]["playout_frames"] > 0
    assert isinstance(run["service_ok"], bool)


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


async def test_workers_comparison_runs_with_caller_processes_and_the_service_rule():
    """`--via-serve --workers 2`: ours through `serve --workers 2`, judged by its own
    /metrics (the front's totals), light callers in processes of their own."""
    options = capacity.Options(via_serve=True, rule="service", sim_procs=None, light_callers=True)
    res = await capacity.ladder("ours", [2], 2.0, 2, False, options)
    assert res["label"] == "ours w2" and res["rule"] == "service"
    run = res["runs"][0]
    assert "error" not in run, run.get("error")
    assert WIRE_FIELDS <= set(run) and SERVICE_FIELDS <= set(run["service"])
    assert {"wire_ok", "wire_fails", "service_ok", "callers_cpu_cores"} <= set(run)
    assert run["ok"] == run["service_ok"] and run["via_serve"] and run["light_users"]
    assert run["user_procs"] == 1 and len(run["callers_cpu_cores"]) == 1
    assert run["calls_alive"] == 2 and run["service"]["worker_calls"] == {"w1": 1, "w2": 1}
    assert run["service"]["playout_frames"] > 0 and run["turn_wire_ms"]["n"] >= 0


async def test_a_light_caller_hears_by_level_and_speaks_pre_encoded_opus():
    """SimulatedUser(light_media=True): no decoding, but it still hears speech (the RFC 6464
    level on the wire) and what it says is real Opus the other side decodes."""
    from whatsapp_call.media.peer import CallMedia
    from whatsapp_call_sim.audio import frame_to_mono, level_dbfs, tone
    from whatsapp_call_sim.user import (
        AudioPlayerTrack,
        HangUp,
        Say,
        SimulatedUser,
        UserScript,
        WaitForSpeech,
    )

    player = AudioPlayerTrack()
    script = UserScript((WaitForSpeech(silence_ms=250, min_speech_ms=100), Say("yes"), HangUp()))
    user = SimulatedUser("15551099", script, light_media=True)
    media = CallMedia(host_addresses=["127.0.0.1"], outbound_track=player)
    loud = 0
    try:
        async with asyncio.timeout(15):
            await media.accept_answer(await user.answer(await media.create_offer()))
            await media.wait_connected(5)
            await asyncio.sleep(0.3)
            assert user.said == []
            await player.play(tone(0.4, freq=300))
            with pytest.raises(Exception, match="ended"):
                while True:
                    loud += level_dbfs(frame_to_mono(await media.recv())) > -40
    finally:
        await media.close()
        await user.close()
    assert [s.utterance for s in user.said] == ["yes"] and user.end_reason == "hangup"
    assert 300 <= user.audible_ms() <= 600  # the 0.4 s tone, heard by level
    assert loud * 20 >= 1000  # most of the 1.67 s utterance arrived and decoded as speech
