"""Whole calls through the real stack: the service (store, webhook server, orchestrator,
WebRTC media, audio bridge, provider and voice plugins) against the simulators: simulated
WhatsApp (Meta or WATI) with a simulated user that is a real aiortc peer, and the simulated
OpenAI Realtime server. Everything on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import whatsapp_call_meta
import whatsapp_call_openai
import whatsapp_call_wati
from prometheus_client.parser import text_string_to_metric_families
from whatsapp_call.calls.orchestrator import CallInProgressError, CallRequest, ServiceBusyError
from whatsapp_call.runtime import Runtime
from whatsapp_call_sim.audio import UTTERANCE_TEXT
from whatsapp_call_sim.runner import SimulatorSet
from whatsapp_call_sim.whatsapp import Scenario

pytestmark = pytest.mark.slow

TO = "+14155550123"
WA_ID = TO[1:]
GREETING = "Hi! This is a test call. Can you hear me?"
PROVIDERS = ["meta", "wati"]
CLI = str(Path(sys.executable).parent / "whatsapp-call")


@pytest.fixture
def providers(register_plugin):
    for plugin in (whatsapp_call_meta, whatsapp_call_wati, whatsapp_call_openai):
        register_plugin(plugin)


@contextlib.asynccontextmanager
async def running(provider, make_settings, tmp_path, scenario=None, **overrides):
    """The simulators and the service, wired together (the service's webhooks are where the
    simulator delivers them)."""
    async with SimulatorSet(
        provider=provider, state_dir=tmp_path, scenario=scenario, turn=False
    ) as sims:
        settings = make_settings(**{**sims.options, **overrides})
        async with Runtime(settings) as runtime:
            yield sims, runtime


async def call_and_wait(runtime, timeout=45.0, **request):
    request.setdefault("greeting", GREETING)
    record = await runtime.service.place_call(CallRequest(to=TO, **request))
    return await runtime.service.wait(record.id, timeout=timeout)


def only_sim_call(sims):
    calls = list(sims.whatsapp.calls.values())
    assert len(calls) == 1, [c.to_dict() for c in calls]
    return calls[0]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_completed_call_carries_audio_both_ways(provider, providers, make_settings, tmp_path):
    async with running(provider, make_settings, tmp_path) as (sims, runtime):
        record = await call_and_wait(runtime)
        transcript = await runtime.store.get_transcript(record.id)
        events = [e.type for e in await runtime.store.get_events(record.id)]
        sim_call = only_sim_call(sims)
        heard = sim_call.user.speech_segments()
        audible_ms = sim_call.user.audible_ms()

    assert record.end_reason == "completed", record.end_detail
    assert record.provider_call_id == sim_call.id
    # The AI's greeting was spoken, and arrived at the user's phone as audible audio.
    assert transcript[0].role == "assistant" and transcript[0].text == GREETING
    assert heard and audible_ms > 1500
    # The user's words reached the voice backend and were transcribed.
    user_lines = [t.text for t in transcript if t.role == "user"]
    assert UTTERANCE_TEXT["hello"] in user_lines
    assert {"offer_sent", "answer_received", "media_connected"} <= set(events)
    # The set-up phases and per-turn latency are in the record.
    metrics = record.metrics
    assert metrics["setup_ms"]["offer_sent"] < metrics["setup_ms"]["accepted"]
    assert 0 < metrics["setup_seconds"] < 10
    turns = metrics["audio"]["turns"]
    assert turns and all(0 < t["response_latency_ms"] < 3000 for t in turns), turns
    assert metrics["inbound_audio"], metrics
    fast = metrics["inbound_audio"]["rtp_fast_path"]  # the call's RTP went the short way
    assert fast["packets"] > 50 and fast["sent_packets"] > 50 and fast["srtp_errors"] == 0, fast


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_rejected(provider, providers, make_settings, tmp_path):
    async with running(provider, make_settings, tmp_path, Scenario(answer="reject")) as (
        sims,
        runtime,
    ):
        record = await call_and_wait(runtime)
        states = [
            e.data.get("to") for e in await runtime.store.get_events(record.id) if e.type == "state"
        ]
    assert record.end_reason == "rejected"
    assert "in_progress" not in states  # a REJECTED before ACCEPTED is never "answered"
    assert await runtime_transcript_empty(record, tmp_path) is None


async def runtime_transcript_empty(record, tmp_path):
    assert not record.metrics.get("audio", {}).get("turns")
    return None


async def test_ring_timeout_terminates_at_the_provider(providers, make_settings, tmp_path):
    scenario = Scenario(answer="no_answer", ring_timeout_s=60)
    async with running("meta", make_settings, tmp_path, scenario, ringTimeoutSeconds=2) as (
        sims,
        runtime,
    ):
        record = await call_and_wait(runtime)
        await asyncio.sleep(0.2)
        sim_call = only_sim_call(sims)
    assert record.end_reason == "no_answer"
    assert "nobody answered within 2 s" in record.end_detail
    assert sim_call.ended and sim_call.terminated_by == "business"


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_provider_side_no_answer(provider, providers, make_settings, tmp_path):
    scenario = Scenario(answer="no_answer", ring_timeout_s=1.5)
    async with running(provider, make_settings, tmp_path, scenario) as (sims, runtime):
        record = await call_and_wait(runtime)
    assert record.end_reason == "no_answer", record.end_detail


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_permission_requested_then_granted_places_the_call(
    provider, providers, make_settings, tmp_path
):
    scenario = Scenario(
        permission="grant_on_request", permission_reply_delay_s=0.5, hangup_after_s=2
    )
    async with running(provider, make_settings, tmp_path, scenario) as (sims, runtime):
        record = await call_and_wait(runtime)
        states = [
            e.data.get("to") for e in await runtime.store.get_events(record.id) if e.type == "state"
        ]
    assert "permission_requested" in states
    assert (
        states.index("permission_requested")
        < states.index("offering")
        < states.index("in_progress")
    )
    assert record.end_reason == "completed", record.end_detail


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_permission_denied(provider, providers, make_settings, tmp_path):
    scenario = Scenario(permission="deny_on_request", permission_reply_delay_s=0.3)
    async with running(provider, make_settings, tmp_path, scenario) as (sims, runtime):
        record = await call_and_wait(runtime)
        rung = dict(sims.whatsapp.calls)
    assert record.end_reason == "permission_denied"
    assert not rung  # nobody was rung


async def test_permission_wait_expires(providers, make_settings, tmp_path):
    scenario = Scenario(permission="ignore_request")
    async with running("meta", make_settings, tmp_path, scenario, permissionWaitSeconds=1) as (
        sims,
        runtime,
    ):
        record = await call_and_wait(runtime)
        rung = dict(sims.whatsapp.calls)
    assert record.end_reason == "permission_pending_expired"
    assert not rung


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_duplicate_and_out_of_order_webhooks(provider, providers, make_settings, tmp_path):
    async with running(provider, make_settings, tmp_path, Scenario(hangup_after_s=3)) as (
        sims,
        runtime,
    ):
        sims.whatsapp.set_faults(duplicate_delivery=True, out_of_order=True)
        record = await call_and_wait(runtime)
        events = await runtime.store.get_events(record.id)
    assert record.end_reason == "completed", record.end_detail
    states = [e.data.get("to") for e in events if e.type == "state"]
    assert len(states) == len(set(states))  # every transition exactly once


async def test_bad_signature_is_refused_and_changes_nothing(providers, make_settings, tmp_path):
    async with running("meta", make_settings, tmp_path, ringTimeoutSeconds=3) as (sims, runtime):
        sims.whatsapp.set_faults(bad_signature=True)
        record = await call_and_wait(runtime)
        events = [e.type for e in await runtime.store.get_events(record.id)]
        statuses = [a.get("status") for d in sims.whatsapp.deliveries for a in d.attempts]
    assert statuses and set(statuses) == {403}
    assert "answer_received" not in events
    assert record.end_reason == "no_answer"


async def test_max_duration_ends_the_call(providers, make_settings, tmp_path):
    async with running("meta", make_settings, tmp_path, maxDurationSeconds=2) as (sims, runtime):
        record = await call_and_wait(runtime)
        sim_call = only_sim_call(sims)
    assert record.end_reason == "completed"
    assert "maximum call duration" in record.end_detail
    assert sim_call.terminated_by == "business"


async def test_concurrency_limit_and_one_call_per_callee(providers, make_settings, tmp_path):
    scenario = Scenario(answer="no_answer", ring_timeout_s=60)
    async with running("meta", make_settings, tmp_path, scenario, maxConcurrentCalls=1) as (
        sims,
        runtime,
    ):
        first = await runtime.service.place_call(CallRequest(to=TO))
        with pytest.raises(ServiceBusyError, match="maxConcurrentCalls"):
            await runtime.service.place_call(CallRequest(to="+14155550124"))
        runtime.service.settings.max_concurrent_calls = 2
        with pytest.raises(CallInProgressError) as exc:
            await runtime.service.place_call(CallRequest(to=TO))
        assert exc.value.call_id == first.id
        ended = await runtime.service.hangup(first.id)
    assert ended.end_reason == "cancelled"


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_restart_mid_call_reconciles_without_calling_twice(
    workers, providers, make_settings, tmp_path
):
    """kill -9 of `serve` mid-call: the next start terminates the call at the provider and
    marks it failed; nobody is called a second time, and /metrics no longer counts it live."""
    async with SimulatorSet(provider="meta", state_dir=tmp_path, turn=False) as sims:
        env = {**os.environ, "WHATSAPP_CALL_PLUGINS": "meta,openai"}
        cli = [CLI, "-c", str(sims.config_path), "serve", "--workers", workers]
        api = sims.urls["service"]
        headers = {"Authorization": f"Bearer {sims.options['serviceToken']}"}

        async def start_service():
            log = (tmp_path / "serve.log").open("ab")
            proc = await asyncio.create_subprocess_exec(
                *cli, env=env, stdout=log, stderr=log, start_new_session=True
            )
            async with httpx.AsyncClient(timeout=2) as client:
                for _ in range(150):
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(api + "/healthz")).status_code == 200:
                            return proc
                    if proc.returncode is not None:
                        raise AssertionError((tmp_path / "serve.log").read_text())
                    await asyncio.sleep(0.1)
            proc.kill()
            raise AssertionError("service did not start: " + (tmp_path / "serve.log").read_text())

        proc = await start_service()
        try:
            async with httpx.AsyncClient(base_url=api, headers=headers, timeout=10) as client:
                created = (await client.post("/v1/calls", json={"to": TO})).json()
                for _ in range(150):
                    call = (await client.get(f"/v1/calls/{created['id']}")).json()
                    if call["state"] == "in_progress":
                        break
                    await asyncio.sleep(0.1)
                assert call["state"] == "in_progress", call
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole service, workers too: a crash
            await asyncio.wait_for(proc.wait(), 10)
        proc = await start_service()
        try:
            async with httpx.AsyncClient(base_url=api, headers=headers, timeout=10) as client:
                call = (await client.get(f"/v1/calls/{created['id']}")).json()
                metrics = (await client.get("/metrics")).text
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)
        sim_call = only_sim_call(sims)
    assert call["state"] == "ended" and call["end_reason"] == "failed"
    live = {  # the reconciled call is no longer counted as live
        s.labels["state"]: s.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "whatsapp_call_calls"
        for s in family.samples
    }
    assert live and not any(live.values()), live
    assert call["end_detail"].startswith("restarted")
    assert sim_call.ended and sim_call.terminated_by in ("business", "user", "network")


def test_call_command_prints_live_transcript_and_json_record(tmp_path):
    """`whatsapp-call call` against the simulators, as a user runs it."""
    config = tmp_path / "sim.yaml"
    ready = tmp_path / "ready.json"
    sim = subprocess.Popen(
        [CLI, "sim", "--config-out", str(config), "--json"],
        stdout=ready.open("w"),
        stderr=(tmp_path / "sim.log").open("w"),
    )
    try:
        for _ in range(300):
            if ready.exists() and ready.read_text().strip():
                break
            assert sim.poll() is None, (tmp_path / "sim.log").read_text()
            time.sleep(0.1)
        json.loads(ready.read_text().splitlines()[0])
        result = subprocess.run(
            [CLI, "-c", str(config), "call", TO, "--json"],
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(15)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["end_reason"] == "completed"
    assert "AI: " in result.stderr and "User: " + UTTERANCE_TEXT["hello"] in result.stderr
    assert any(line["role"] == "user" for line in record["transcript"])
    secrets = [
        v for k, v in yaml_options(config).items() if "Token" in k or "Key" in k or "Secret" in k
    ]
    for secret in secrets:
        assert secret not in result.stdout + result.stderr


def yaml_options(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())["channels"]["whatsappcall"]


async def test_barge_in_stops_the_ai_at_once(providers, make_settings, tmp_path):
    """The user talks over the AI's greeting: our outbound audio stops, and the voice backend
    is told how much of the greeting was heard."""
    from whatsapp_call_sim.user import HangUp, Pause, Say, UserScript

    long_greeting = (
        "Hello, this is a long greeting from the test, and it goes on for quite a while "
        "so that the person on the phone has plenty of time to interrupt it."
    )
    script = UserScript((Pause(1.2), Say("yes"), Pause(2.0), HangUp()))
    async with running("meta", make_settings, tmp_path, Scenario(user_script=script)) as (
        sims,
        runtime,
    ):
        record = await call_and_wait(runtime, greeting=long_greeting)
        events = await runtime.store.get_events(record.id)
        user = only_sim_call(sims).user
        spoke = user.said[0]
        heard = user.speech_segments()
        truncations = [s.truncated for s in sims.realtime.sessions if s.truncated]
    barge_ins = [e.data for e in events if e.type == "barge_in"]
    assert record.end_reason == "completed", record.end_detail
    assert barge_ins and 0 < barge_ins[0]["played_ms"] < 8000, barge_ins
    assert truncations, "the backend was not told what was heard"
    # The AI's audio heard while the user spoke ended soon after the user started speaking:
    # the simulated model's VAD needs a few hundred ms to detect speech; we add at most a frame.
    overlapping = [seg for seg in heard if seg.start < spoke.start + 0.05]
    assert overlapping and overlapping[-1].end < spoke.start + 1.0, (spoke, heard)


async def test_voice_socket_drop_mid_call_is_survived(providers, make_settings, tmp_path):
    async with running("meta", make_settings, tmp_path) as (sims, runtime):
        sims.realtime.faults.drop_mid_response_after_ms = 800  # during the greeting
        record = await call_and_wait(runtime)
        sessions = len(sims.realtime.sessions)
        transcript = [t.text for t in await runtime.store.get_transcript(record.id)]
    assert record.end_reason == "completed", record.end_detail
    assert sessions == 2  # reconnected once
    assert UTTERANCE_TEXT["hello"] in transcript  # the conversation went on afterwards
