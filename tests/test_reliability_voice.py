"""Voice backend faults through whole calls (the OpenAI Realtime simulator's fault
switches): refused connection and invalid key (the phone never rings), a socket drop and a
`session_expired` in the middle of the AI's reply (survived), error events (benign ones
survived, a fatal one ends the call politely), and very slow responses.
"""

from __future__ import annotations

import asyncio

import pytest
import whatsapp_call_meta
import whatsapp_call_openai
from reliability_support import (
    WA_ID,
    assert_consistent,
    call_and_wait,
    closed_port_url,
    running,
    sim_calls_to,
    states_of,
    wait_until,
)
from whatsapp_call.calls.orchestrator import CallRequest
from whatsapp_call_sim.whatsapp import Scenario

pytestmark = pytest.mark.slow
pytest_plugins = ["reliability_plugin"]

GREETING = "Hello! This is a reliability test call, can you hear me well?"


@pytest.fixture
def providers(register_plugin):
    for plugin in (whatsapp_call_meta, whatsapp_call_openai):
        register_plugin(plugin)


@pytest.mark.parametrize("fault", ["connection_refused", "invalid_key"])
async def test_no_voice_backend_means_the_phone_never_rings(
    fault, providers, make_settings, tmp_path, reliability
):
    name = f"voice.{fault}"
    reliability.fault(name)
    bad_key = "sk-invalid-reliability-key-0123456789"
    overrides = (
        {"openaiRealtimeUrl": closed_port_url("ws") + "/v1/realtime"}
        if fault == "connection_refused"
        else {"openaiApiKey": bad_key}
    )
    async with running("meta", make_settings, tmp_path, Scenario(), **overrides) as (
        sims,
        runtime,
    ):
        record = await call_and_wait(runtime, greeting=GREETING)
        states = await states_of(runtime, record.id)
        rung = sim_calls_to(sims)
    assert_consistent(record, states)
    assert record.end_reason == "failed"
    assert "fix:" in record.end_detail and bad_key not in record.end_detail
    assert ("openaiApiKey" in record.end_detail) == (fault == "invalid_key"), record.end_detail
    assert not rung and "ringing" not in states
    reliability.survived(name)


async def _live_call(runtime, sims, scenario_seconds: float):
    record = await runtime.service.place_call(CallRequest(to="+" + WA_ID, greeting=GREETING))

    async def answered() -> bool:
        return (await runtime.store.get_call(record.id)).state.value == "in_progress"

    await wait_until(answered, 15, "the call to be answered")
    return record


@pytest.mark.parametrize("fault", ["socket_drop", "session_expired"])
async def test_voice_session_lost_mid_reply_is_survived(
    fault, providers, make_settings, tmp_path, reliability, caplog
):
    """The reply is cut off 400 ms in; a new session takes over, the call completes and its
    record says why the voice session was replaced."""
    name = f"voice.{fault}_mid_reply"
    reliability.fault(name)
    async with running("meta", make_settings, tmp_path, Scenario(hangup_after_s=8)) as (
        sims,
        runtime,
    ):
        if fault == "socket_drop":
            sims.realtime.faults.drop_mid_response_after_ms = 400
        else:
            sims.realtime.faults.expire_mid_response_after_ms = 400
        record = await call_and_wait(runtime, greeting=GREETING)
        states = await states_of(runtime, record.id)
        sessions = len(sims.realtime.sessions)
        heard = sim_calls_to(sims)[0].user.audible_ms()
        events = await runtime.store.get_events(record.id)
    assert_consistent(record, states)
    reconnects = [e.data["reason"] for e in events if e.type == "voice_reconnected"]
    expected = "session expired" if fault == "session_expired" else "connection lost"
    assert reconnects and all(expected in reason for reason in reconnects), reconnects
    assert record.end_reason == "completed", record.end_detail
    assert "opening a new session" in caplog.text
    assert sessions >= 2  # a second session took over
    assert heard > 1000
    reliability.survived(name)


async def test_benign_error_events_are_survived_and_a_fatal_one_ends_the_call(
    providers, make_settings, tmp_path, reliability
):
    reliability.fault("voice.error_events")
    reliability.fault("voice.fatal_error")
    async with running("meta", make_settings, tmp_path, Scenario(hangup_after_s=30)) as (
        sims,
        runtime,
    ):
        record = await _live_call(runtime, sims, 30)
        await sims.realtime.send_error(
            "conversation_already_has_active_response",
            "Conversation already has an active response",
        )
        await sims.realtime.send_error(
            "server_error",
            "The server had an error while processing your request.",
            type="server_error",
        )
        await asyncio.sleep(1.0)
        still_live = (await runtime.store.get_call(record.id)).state.value == "in_progress"
        await sims.realtime.send_error(
            "insufficient_quota", "You exceeded your current quota.", type="insufficient_quota"
        )
        record = await runtime.service.wait(record.id, timeout=20)
        states = await states_of(runtime, record.id)
        events = await runtime.store.get_events(record.id)
        rung = sim_calls_to(sims)
    assert still_live
    errors = [e.data for e in events if e.type == "voice_error"]
    assert any("server had an error" in e["message"] and not e["fatal"] for e in errors), errors
    assert_consistent(record, states)
    assert record.end_reason == "failed"
    assert "quota" in record.end_detail, record.end_detail
    assert len(rung) == 1 and rung[0].terminated_by == "business"
    reliability.survived("voice.error_events")
    reliability.survived("voice.fatal_error")


async def test_very_slow_responses_still_make_a_call(
    providers, make_settings, tmp_path, reliability
):
    """The model takes 3 s before each reply starts: slow, but the call works."""
    reliability.fault("voice.slow_responses")
    async with running("meta", make_settings, tmp_path, Scenario(hangup_after_s=14)) as (
        sims,
        runtime,
    ):
        sims.realtime.first_delta_delay = 3.0
        record = await call_and_wait(runtime, greeting=GREETING)
        states = await states_of(runtime, record.id)
        user = sim_calls_to(sims)[0].user
        heard = user.audible_ms()
        said = [s.utterance for s in user.said]
    assert_consistent(record, states)
    assert record.end_reason == "completed", record.end_detail
    assert heard > 1000 and "hello" in said
    reliability.survived("voice.slow_responses")
