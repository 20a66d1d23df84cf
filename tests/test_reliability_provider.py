"""Provider API faults through whole call attempts: the service against the WhatsApp
simulator, with a real HTTP proxy in between that injects timeouts, refusals, 429s, 5xx
storms, malformed and surprising answers, and every mapped Meta/WATI error code.

Each test asserts what the user sees (the call ends or goes on), what the record says
(end_reason, end_detail, events), and that nobody was rung twice.
"""

from __future__ import annotations

import pytest
import whatsapp_call_meta
import whatsapp_call_openai
import whatsapp_call_wati
from reliability_support import (
    WA_ID,
    FaultProxy,
    Rule,
    assert_consistent,
    call_and_wait,
    closed_port_url,
    event_types,
    running,
    sim_calls_to,
    states_of,
    wait_until,
)
from whatsapp_call_sim.whatsapp import Scenario

pytestmark = pytest.mark.slow
pytest_plugins = ["reliability_plugin"]

QUICK = Scenario(hangup_after_s=1.0)
FAST_HTTP = {"metaHttpTimeoutSeconds": 1.0, "metaRetryBudgetSeconds": 4.0}
FAST_HTTP_WATI = {"watiHttpTimeoutSeconds": 1.0, "watiRetryBudgetSeconds": 4.0}
META_CALLS = r"/v\d+\.\d+/\d+/calls$"
META_PERMISSIONS = r"/call_permissions$"
WATI_CALL = r"/outbound-call/"
WATI_PERMISSIONS = r"/permissions/"


@pytest.fixture
def providers(register_plugin):
    for plugin in (whatsapp_call_meta, whatsapp_call_wati, whatsapp_call_openai):
        register_plugin(plugin)


def through_proxy(proxy_holder: dict):
    """A `before_start` that puts a FaultProxy between the service and the provider."""

    async def install(sims, options):
        proxy = FaultProxy(sims.urls["whatsapp"])
        await proxy.__aenter__()
        proxy_holder["proxy"] = proxy
        key = "metaGraphBaseUrl" if sims.provider == "meta" else "watiBaseUrl"
        options[key] = proxy.url

    return install


class Proxied:
    """`async with Proxied(...) as (sims, runtime, proxy)`: running() behind a FaultProxy."""

    def __init__(self, provider, make_settings, tmp_path, scenario=QUICK, **overrides):
        self.holder: dict = {}
        self.cm = running(
            provider,
            make_settings,
            tmp_path,
            scenario,
            before_start=through_proxy(self.holder),
            **{**(FAST_HTTP if provider == "meta" else FAST_HTTP_WATI), **overrides},
        )

    async def __aenter__(self):
        sims, runtime = await self.cm.__aenter__()
        return sims, runtime, self.holder["proxy"]

    async def __aexit__(self, *exc):
        try:
            await self.cm.__aexit__(*exc)
        finally:
            if "proxy" in self.holder:
                await self.holder["proxy"].__aexit__(None, None, None)


async def test_connection_refused_fails_the_call_and_rings_nobody(
    providers, make_settings, tmp_path, reliability
):
    reliability.fault("provider.connection_refused")
    async with running(
        "meta", make_settings, tmp_path, QUICK, metaGraphBaseUrl=closed_port_url(), **FAST_HTTP
    ) as (sims, runtime):
        record = await call_and_wait(runtime)
        states = await states_of(runtime, record.id)
        rung = sim_calls_to(sims)
    assert_consistent(record, states)
    assert record.end_reason == "failed"
    assert "no connection" in record.end_detail and "127.0.0.1" in record.end_detail
    assert "offering" not in states and not rung
    reliability.survived("provider.connection_refused")


@pytest.mark.parametrize("provider", ["meta", "wati"])
async def test_timeout_on_a_lookup_is_retried_and_the_call_completes(
    provider, providers, make_settings, tmp_path, reliability
):
    reliability.fault("provider.timeout_lookup")
    async with Proxied(provider, make_settings, tmp_path) as (sims, runtime, proxy):
        path = META_PERMISSIONS if provider == "meta" else WATI_PERMISSIONS
        proxy.add(Rule("GET", path, "hang"))
        record = await call_and_wait(runtime)
        states = await states_of(runtime, record.id)
        hung = proxy.count("GET", path, "hang")
        rung = sim_calls_to(sims)
    assert hung == 1
    assert_consistent(record, states)
    assert record.end_reason == "completed", record.end_detail
    assert len(rung) == 1
    reliability.survived("provider.timeout_lookup")


@pytest.mark.parametrize("webhook_delay", [0.0, 2.0], ids=["webhook_first", "webhook_late"])
async def test_timeout_after_the_offer_reached_the_provider_never_rings_twice(
    webhook_delay, providers, make_settings, tmp_path, reliability
):
    """The provider placed the call but its answer never came: retrying could ring the
    user twice, so the call fails; the provider's own connect webhook then tells us its id,
    and that ringing call is terminated instead of being left to ring out."""
    reliability.fault("provider.timeout_after_send")
    async with Proxied("meta", make_settings, tmp_path) as (sims, runtime, proxy):
        sims.whatsapp.set_faults(delay_s=webhook_delay)  # the connect webhook before/after the end
        proxy.add(Rule("POST", META_CALLS, "forward_then_hang"))
        record = await call_and_wait(runtime)
        rung = await wait_until(lambda: sim_calls_to(sims), 5, "the simulator's call")
        await wait_until(lambda: rung[0].ended, 10, "the provider-side call to end")

        async def terminated() -> bool:  # noted once the terminate request has returned
            return "terminated_unknown_provider_call" in await event_types(runtime, record.id)

        await wait_until(terminated, 5, "the terminate to be recorded")
        states = await states_of(runtime, record.id)
        types = await event_types(runtime, record.id)
        connects = proxy.count("POST", META_CALLS)
    assert_consistent(record, states)
    assert record.end_reason == "failed"
    assert "timed out" in record.end_detail and "carried out" in record.end_detail
    assert len(rung) == 1 and connects == 2  # one connect (hung) + one terminate
    assert rung[0].terminated_by == "business"
    assert types.count("terminated_unknown_provider_call") == 1
    assert ("late_webhook" in types) == (webhook_delay > 0)
    reliability.survived("provider.timeout_after_send")


@pytest.mark.parametrize("provider", ["meta", "wati"])
async def test_429_with_retry_after_is_honoured_and_the_call_completes(
    provider, providers, make_settings, tmp_path, reliability
):
    reliability.fault("provider.429")
    path = META_CALLS if provider == "meta" else WATI_CALL
    body = (
        {"error": {"message": "(#4) Application request limit reached", "code": 4}}
        if provider == "meta"
        else {"code": 429, "message": "Too many requests", "result": None}
    )
    async with Proxied(provider, make_settings, tmp_path) as (sims, runtime, proxy):
        proxy.add(Rule("POST", path, "status", 429, body, {"Retry-After": "1"}))
        record = await call_and_wait(runtime)
        states = await states_of(runtime, record.id)
        rung = sim_calls_to(sims)
        metrics = record.metrics["setup_ms"]
    assert_consistent(record, states)
    assert record.end_reason == "completed", record.end_detail
    assert len(rung) == 1
    assert metrics["offer_sent"] - metrics["offer_built"] >= 900  # waited Retry-After: 1
    reliability.survived("provider.429")


async def test_503_storm_gives_up_within_the_budget_and_rings_nobody(
    providers, make_settings, tmp_path, reliability
):
    reliability.fault("provider.503_storm")
    async with Proxied("meta", make_settings, tmp_path) as (sims, runtime, proxy):
        body = {"error": {"message": "Service temporarily unavailable", "code": 2}}
        proxy.add(Rule("GET", META_PERMISSIONS, "status", 503, body, times=None))
        record = await call_and_wait(runtime)
        states = await states_of(runtime, record.id)
        tries = proxy.count("GET", META_PERMISSIONS)
        rung = sim_calls_to(sims)
    assert_consistent(record, states)
    assert record.end_reason == "failed"
    assert "gave up after" in record.end_detail and "fix:" in record.end_detail
    assert 2 <= tries <= 5 and not rung
    reliability.survived("provider.503_storm")


async def test_500_burst_on_placing_the_call_is_ridden_out(
    providers, make_settings, tmp_path, reliability
):
    reliability.fault("provider.500_burst")
    async with Proxied("meta", make_settings, tmp_path) as (sims, runtime, proxy):
        body = {"error": {"message": "An unknown error occurred", "code": 1}}
        proxy.add(Rule("POST", META_CALLS, "status", 500, body, times=2))
        record = await call_and_wait(runtime)
        states = await states_of(runtime, record.id)
        rung = sim_calls_to(sims)
    assert_consistent(record, states)
    assert record.end_reason == "completed", record.end_detail
    assert len(rung) == 1
    reliability.survived("provider.500_burst")


@pytest.mark.parametrize("provider", ["meta", "wati"])
async def test_malformed_json_answer_fails_clearly_and_rings_nobody(
    provider, providers, make_settings, tmp_path, reliability
):
    reliability.fault("provider.malformed_json")
    path = META_PERMISSIONS if provider == "meta" else WATI_PERMISSIONS
    async with Proxied(provider, make_settings, tmp_path) as (sims, runtime, proxy):
        proxy.add(Rule("GET", path, "forward_then_garbage"))
        record = await call_and_wait(runtime)
        states = await states_of(runtime, record.id)
        rung = sim_calls_to(sims)
    assert_consistent(record, states)
    assert record.end_reason == "failed"
    assert "json" in record.end_detail.lower() and "fix:" in record.end_detail
    assert not rung
    reliability.survived("provider.malformed_json")


@pytest.mark.parametrize("provider", ["meta", "wati"])
async def test_unexpected_fields_in_every_answer_change_nothing(
    provider, providers, make_settings, tmp_path, reliability
):
    reliability.fault("provider.unexpected_fields")
    async with Proxied(provider, make_settings, tmp_path) as (sims, runtime, proxy):
        proxy.add(Rule("GET", ".", "forward_with_extras", times=None))
        proxy.add(Rule("POST", ".", "forward_with_extras", times=None))
        record = await call_and_wait(runtime)
        states = await states_of(runtime, record.id)
        rung = sim_calls_to(sims)
        rewritten = sum(1 for *_, what in proxy.seen if what == "forward_with_extras")
    assert rewritten >= 2
    assert_consistent(record, states)
    assert record.end_reason == "completed", record.end_detail
    assert len(rung) == 1
    reliability.survived("provider.unexpected_fields")


# Meta Graph error code -> (HTTP status, what the record must say).
META_CODES = [
    (138006, 401, "permission_denied", "allowed calls"),
    (138003, 400, "busy", "still in progress"),
    (100, 400, "failed", "details: offer m-line broken"),
    (138001, 400, "failed", "cannot receive WhatsApp calls"),
    (138000, 401, "failed", "Calling is not enabled"),
    (190, 401, "failed", "access token is invalid"),
    (138012, 400, "failed", "daily limit"),
    (131055, 400, "failed", "SIP is enabled"),
    (999999, 400, "failed", "error code 999999"),
]


@pytest.mark.parametrize(("code", "http", "reason", "says"), META_CODES)
async def test_every_mapped_meta_code_through_a_call_attempt(
    code, http, reason, says, providers, make_settings, tmp_path, reliability
):
    name = f"provider.meta_{code}"
    reliability.fault(name)
    envelope = {
        "error": {
            "message": f"(#{code}) Refused by the fault proxy",
            "type": "OAuthException",
            "code": code,
            "error_data": {"messaging_product": "whatsapp", "details": "offer m-line broken"},
            "fbtrace_id": "Afault",
        }
    }
    async with Proxied("meta", make_settings, tmp_path) as (sims, runtime, proxy):
        proxy.add(Rule("POST", META_CALLS, "status", http, envelope))
        record = await call_and_wait(runtime)
        states = await states_of(runtime, record.id)
        posts = proxy.count("POST", META_CALLS)
        rung = sim_calls_to(sims)
    assert_consistent(record, states)
    assert record.end_reason == reason, record.end_detail
    assert says in record.end_detail and "fix:" in record.end_detail, record.end_detail
    assert posts == 1 and not rung  # a 4xx is never retried: nobody is rung
    reliability.survived(name)


WATI_CODES = [
    (138006, "permission_denied", "allowed calls"),
    (138003, "busy", "still in progress"),
    (100, "failed", "Invalid parameter"),
    (138001, "failed", "cannot receive WhatsApp calls"),
    (401, "failed", "rejected the API token"),
]


@pytest.mark.parametrize(("code", "reason", "says"), WATI_CODES)
async def test_every_mapped_wati_code_through_a_call_attempt(
    code, reason, says, providers, make_settings, tmp_path, reliability
):
    name = f"provider.wati_{code}"
    reliability.fault(name)
    if code == 401:
        body = {"code": 401, "message": "Unauthorized: invalid Bearer token", "result": None}
    else:
        body = {"code": 400, "message": f"(#{code}) Invalid parameter: refused", "result": None}
    async with Proxied("wati", make_settings, tmp_path) as (sims, runtime, proxy):
        proxy.add(Rule("POST", WATI_CALL, "status", 200, body))
        record = await call_and_wait(runtime)
        states = await states_of(runtime, record.id)
        rung = sim_calls_to(sims)
    assert_consistent(record, states)
    assert record.end_reason == reason, record.end_detail
    assert says in record.end_detail and "fix:" in record.end_detail, record.end_detail
    assert not rung
    reliability.survived(name)


async def test_real_duplicate_call_refusal_from_the_simulator_maps_to_busy(
    providers, make_settings, tmp_path, reliability
):
    """The simulator itself refuses with 138003 while another call to the user rings
    (placed behind our back): the record says busy, and that other call is untouched."""
    reliability.fault("provider.sim_138003")
    async with running(
        "meta",
        make_settings,
        tmp_path,
        Scenario(answer="no_answer", ring_timeout_s=30, media=False),
    ) as (sims, runtime):
        other = sims.whatsapp.network.connect("meta", WA_ID, _offer_from(sims))
        record = await call_and_wait(runtime)
        states = await states_of(runtime, record.id)
        untouched = not other.ended
    assert_consistent(record, states)
    assert record.end_reason == "busy", record.end_detail
    assert untouched
    reliability.survived("provider.sim_138003")


def _offer_from(sims) -> str:
    """A WhatsApp-valid offer SDP (as our media layer builds it), for a call we place
    directly in the simulator."""
    return (
        "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 127.0.0.1\r\na=mid:0\r\n"
        "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"
        "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\n"
        "a=setup:actpass\r\na=sendrecv\r\na=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\n"
    )
