"""Media faults through whole calls: a broken answer SDP (malformed, no Opus, no
fingerprint; injected by rewriting the provider's signed connect webhook), ICE that never
connects, DTLS that fails, and a user who goes silent, loses packets, or vanishes without a
goodbye. The call must end (or go on) as a user would expect, terminated at the provider,
with a record that says why.
"""

from __future__ import annotations

import random
import re
import time

import pytest
import whatsapp_call_meta
import whatsapp_call_openai
from reliability_support import (
    WA_ID,
    WebhookRewriter,
    assert_consistent,
    call_and_wait,
    closed_port_url,
    running,
    sim_calls_to,
    states_of,
    wait_until,
)
from whatsapp_call.calls import orchestrator
from whatsapp_call.calls.orchestrator import CallRequest
from whatsapp_call_sim.user import UserScript
from whatsapp_call_sim.whatsapp import Scenario

pytestmark = pytest.mark.slow
pytest_plugins = ["reliability_plugin"]


@pytest.fixture
def providers(register_plugin):
    for plugin in (whatsapp_call_meta, whatsapp_call_openai):
        register_plugin(plugin)


def _closed_port() -> str:
    return closed_port_url().rsplit(":", 1)[1]


def _other_fingerprint(sdp: str) -> str:
    return re.sub(
        r"a=fingerprint:sha-256 [0-9A-Fa-f:]+",
        "a=fingerprint:sha-256 " + ":".join(f"{b:02X}" for b in random.Random(1).randbytes(32)),
        sdp,
    )


ANSWER_FAULTS = {
    # name: (rewrite of the answer SDP, what the record's end_detail must name)
    "malformed": (lambda sdp: "this is not an SDP answer", "SDP"),
    "no_opus": (lambda sdp: sdp.replace("opus/48000/2", "PCMU/8000"), "Opus"),
    "no_fingerprint": (
        lambda sdp: re.sub(r"a=fingerprint:[^\r\n]*\r\n", "", sdp),
        "fingerprint",
    ),
    # Our connectivity checks carry the wrong password: no candidate pair ever succeeds.
    "ice_never_connects": (
        lambda sdp: re.sub(r"a=ice-pwd:\S+", "a=ice-pwd:" + "w" * 24, sdp),
        "media failed",
    ),
    "dtls_fails": (_other_fingerprint, "media failed"),
}


@pytest.mark.parametrize("fault", list(ANSWER_FAULTS))
async def test_bad_answer_sdp_or_failed_media_ends_the_call_at_the_provider(
    fault, providers, make_settings, tmp_path, reliability, monkeypatch
):
    monkeypatch.setattr(orchestrator, "MEDIA_CONNECT_TIMEOUT", 4.0)
    name = f"media.{fault}"
    reliability.fault(name)
    rewrite, named = ANSWER_FAULTS[fault]
    holder = {}

    async def rewire(sims, options):
        rewriter = WebhookRewriter(sims.urls["webhook"], options["metaAppSecret"], rewrite)
        await rewriter.__aenter__()
        holder["rewriter"] = rewriter
        sims.whatsapp.config.meta_webhook_url = rewriter.url

    try:
        async with running(
            "meta", make_settings, tmp_path, Scenario(hangup_after_s=5), before_start=rewire
        ) as (sims, runtime):
            record = await call_and_wait(runtime, timeout=30)
            states = await states_of(runtime, record.id)
            rung = sim_calls_to(sims)
            await wait_until(lambda: rung[0].ended, 5, "the provider-side call to end")
    finally:
        if "rewriter" in holder:
            await holder["rewriter"].__aexit__(None, None, None)
    assert holder["rewriter"].rewritten >= 1
    assert_consistent(record, states)
    assert record.end_reason == "failed", record.end_detail
    assert named.lower() in record.end_detail.lower(), record.end_detail
    assert len(rung) == 1 and rung[0].terminated_by == "business"
    reliability.survived(name)


async def test_a_silent_user_is_not_a_dead_peer(providers, make_settings, tmp_path, reliability):
    """Silence still flows as audio packets: the call goes on until it ends normally."""
    reliability.fault("media.user_silent")
    scenario = Scenario(user_script=UserScript.silent())
    async with running(
        "meta", make_settings, tmp_path, scenario, deadPeerSeconds=2, maxDurationSeconds=5
    ) as (sims, runtime):
        record = await call_and_wait(runtime, timeout=30)
        states = await states_of(runtime, record.id)
        rung = sim_calls_to(sims)
    assert_consistent(record, states)
    assert record.end_reason == "completed"
    assert "maximum call duration" in record.end_detail
    assert len(rung) == 1 and rung[0].terminated_by == "business"
    reliability.survived("media.user_silent")


async def test_packet_loss_from_the_user_is_concealed_and_the_call_completes(
    providers, make_settings, tmp_path, reliability
):
    """One packet in five from the user's phone is lost on the way; the call still carries
    the conversation to its end (the user hangs up after saying goodbye)."""
    reliability.fault("media.packet_loss")
    async with running("meta", make_settings, tmp_path, Scenario(hangup_after_s=12)) as (
        sims,
        runtime,
    ):
        record = await runtime.service.place_call(CallRequest(to="+" + WA_ID, greeting="Hello!"))
        sim_call = await wait_until(
            lambda: next((c for c in sim_calls_to(sims) if c.user is not None), None),
            10,
            "the simulated user",
        )
        await sim_call.user.wait_connected(10)  # its ICE sockets exist only from here on
        dropped = lossy(sim_call.user, rate=0.2)
        record = await runtime.service.wait(record.id, timeout=40)
        states = await states_of(runtime, record.id)
    assert dropped["packets"] > 50, dropped
    assert_consistent(record, states)
    assert record.end_reason == "completed", record.end_detail
    inbound = record.metrics["inbound_audio"]
    assert inbound["lost"] + inbound["concealed"] > 0, inbound  # the losses were seen...
    assert inbound["frames"] > inbound["lost"], inbound  # ...and the rest was heard
    reliability.survived("media.packet_loss")


def lossy(user, rate: float) -> dict[str, int]:
    """Drop `rate` of the RTP packets the simulated user's phone sends (seeded)."""
    rng = random.Random(5)
    counts = {"packets": 0, "dropped": 0}
    for transceiver in user._pc.getTransceivers():
        connection = transceiver.sender.transport.transport._connection
        for protocol in connection._protocols:
            send = protocol.send_data

            async def send_data(data, addr, _send=send):
                if len(data) >= 12 and 128 <= data[0] <= 191 and not 192 <= data[1] <= 223:
                    counts["packets"] += 1
                    if rng.random() < rate:
                        counts["dropped"] += 1
                        return
                await _send(data, addr)

            protocol.send_data = send_data
    return counts


async def test_a_vanished_user_is_detected_as_a_dead_peer(
    providers, make_settings, tmp_path, reliability
):
    """The phone drops off the network without a goodbye, and the provider's terminate is
    late: our dead-peer detection ends the call within deadPeerSeconds (+ grace)."""
    reliability.fault("media.user_vanished")
    dead_peer = 2.0
    scenario = Scenario(user_script=UserScript.silent())
    async with running("meta", make_settings, tmp_path, scenario, deadPeerSeconds=dead_peer) as (
        sims,
        runtime,
    ):
        record = await runtime.service.place_call(CallRequest(to="+" + WA_ID))

        async def answered() -> bool:
            return (await runtime.store.get_call(record.id)).state.value == "in_progress"

        await wait_until(answered, 15, "the call to be answered")
        sims.whatsapp.set_faults(delay_s=30)  # WhatsApp's own terminate comes too late
        sim_call = sim_calls_to(sims)[0]
        vanished_at = time.monotonic()
        await sim_call.user.vanish()
        record = await runtime.service.wait(record.id, timeout=dead_peer + 15)
        took = time.monotonic() - vanished_at
        states = await states_of(runtime, record.id)
    assert_consistent(record, states)
    assert record.end_reason == "completed", record.end_detail
    assert "media stopped" in record.end_detail and "no terminate" in record.end_detail
    assert took < dead_peer + orchestrator.MEDIA_END_GRACE + 3, took
    reliability.survived("media.user_vanished")
