"""The WATI provider plugin: webhook parsing in both payload shapes (per-event sub-paths and
one URL with `event`), HMAC, duplicates, malformed and fuzzed bodies; the client against an
in-test WATI app (envelope codes, errors, retries); doctor; and the whole flow against the
WhatsApp simulator's WATI front door in both webhook shapes."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
import whatsapp_call_wati
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from test_meta_plugin import REFERENCE_OFFER, FakeApi, ParsingReceiver, sign
from whatsapp_call import plugins as plugin_mod
from whatsapp_call.errors import CallPermissionError, ProviderError, WebhookRejected
from whatsapp_call.models import (
    Call,
    CallEventType,
    CheckStatus,
    PermissionRequestOutcome,
    PermissionStatus,
    WebhookRequest,
)
from whatsapp_call.phone import parse_phone
from whatsapp_call.serving import serve_asgi
from whatsapp_call_sim.whatsapp import Scenario, SimConfig, WhatsAppSimulator
from whatsapp_call_wati import client as wati_client
from whatsapp_call_wati import webhooks as wati_webhooks

TENANT = "1000"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.wati-test-token.sig"
SECRET = "wati-webhook-secret-123"
CALL_ID = "wacid.HBgLMTIxODU1NTI4MjgVAgARGCAy"
USER = "14085551234"
ANSWER_SDP = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=setup:active\r\n"
BASE_PATH = f"/{TENANT}/api/v1/openapi/whatsapp/calls"


@pytest.fixture
def wati(register_plugin, make_settings):
    register_plugin(whatsapp_call_wati, name="wati")

    def build(**options: Any):
        base = {
            "provider": "wati",
            "watiTenantId": TENANT,
            "watiApiToken": TOKEN,
            "watiHttpTimeoutSeconds": 2,
            "watiRetryBudgetSeconds": 5,
        }
        base.update(options)
        return make_settings(**{k: v for k, v in base.items() if v is not None})

    return build


def hook(path: str, payload: Any, *, secret: str | None = None, raw: bytes | None = None):
    body = raw if raw is not None else json.dumps(payload).encode()
    headers = {"content-type": "application/json"}
    if secret:
        headers["x-hub-signature-256"] = sign(body, secret)
    return WebhookRequest("POST", path, {}, headers, body)


def parse(request: WebhookRequest, settings):
    return plugin_mod.call_first_sync(
        "parse_webhook", provider="wati", request=request, settings=settings
    )


def kinds(result) -> list[CallEventType]:
    return [e.type for e in result.events]


# ---------------------------------------------------------------------------- webhooks


def test_per_event_sub_paths(wati):
    s = wati()
    (answer,) = parse(hook("/sdp-answer", {"callId": CALL_ID, "sdp": ANSWER_SDP}), s).events
    assert (answer.type, answer.sdp, answer.provider_call_id) == (
        CallEventType.ANSWER,
        ANSWER_SDP,
        CALL_ID,
    )
    assert answer.call_id is None  # WATI cannot carry our id: correlate by callId
    for status, kind in (
        ("RINGING", CallEventType.RINGING),
        ("ACCEPTED", CallEventType.ACCEPTED),
        ("REJECTED", CallEventType.REJECTED),
        ("ENDED", CallEventType.TERMINATED),
    ):
        (event,) = parse(hook("/call-status", {"callId": CALL_ID, "status": status}), s).events
        assert (event.type, event.status, event.provider) == (kind, status, "wati")
    terminate = {"tenantId": TENANT, "callId": CALL_ID, "contact": {"ContactNumber": USER}}
    (ended,) = parse(hook("/terminate", terminate), s).events
    assert (ended.type, ended.wa_id) == (CallEventType.TERMINATED, USER)
    permission = {
        "waid": USER,
        "channelPhoneNumber": "13175551399",
        "hasPermission": True,
        "status": "granted",
        "tenantId": TENANT,
    }
    (reply,) = parse(hook("/outbound/permission", permission), s).events
    assert (reply.type, reply.wa_id, reply.permission_granted) == (
        CallEventType.PERMISSION_REPLY,
        USER,
        True,
    )


def test_ended_status_and_terminate_are_one_event(wati):
    s = wati()
    a = parse(hook("/call-status", {"callId": CALL_ID, "status": "ENDED"}), s).events[0]
    b = parse(hook("/terminate", {"tenantId": TENANT, "callId": CALL_ID}), s).events[0]
    assert a.dedupe_key == b.dedupe_key


def test_single_url_shape_with_event_field(wati):
    s = wati()
    fields = {
        "callId": CALL_ID,
        "tenantId": TENANT,
        "businessNumber": "13175551399",
        "contact": {"ContactName": "Pablo", "ContactNumber": USER},
    }
    start = {"event": "call.start", **fields, "status": "ringing", "sdp": ANSWER_SDP}
    result = parse(hook("", start | {"hasPermission": None}), s)
    assert kinds(result) == [CallEventType.ANSWER, CallEventType.RINGING]
    assert all(e.wa_id == USER for e in result.events)
    accepted = {"event": "call.start", **fields, "status": "accepted"}
    assert kinds(parse(hook("", accepted), s)) == [CallEventType.ACCEPTED]
    rejected = {"event": "call.end", **fields, "status": "rejected"}
    assert kinds(parse(hook("", rejected), s)) == [
        CallEventType.REJECTED,
        CallEventType.TERMINATED,
    ]
    ended = parse(hook("/", {"event": "call.end", **fields, "status": "ended"}), s).events
    assert [(e.type, e.status) for e in ended] == [(CallEventType.TERMINATED, "ENDED")]
    perm = {"event": "permission", "waid": USER, "hasPermission": False}
    (reply,) = parse(hook("", perm), s).events
    assert reply.permission_granted is False


def test_start_without_status_means_ringing_and_fields_decide_without_event(wati):
    s = wati()
    start = parse(hook("", {"event": "call.start", "callId": CALL_ID, "sdp": ANSWER_SDP}), s)
    assert kinds(start) == [CallEventType.ANSWER, CallEventType.RINGING]
    assert kinds(parse(hook("", {"callId": CALL_ID, "sdp": ANSWER_SDP}), s)) == [
        CallEventType.ANSWER
    ]
    assert kinds(parse(hook("", {"callId": CALL_ID, "status": "ACCEPTED"}), s)) == [
        CallEventType.ACCEPTED
    ]
    assert kinds(parse(hook("", {"waid": USER, "hasPermission": "true"}), s)) == [
        CallEventType.PERMISSION_REPLY
    ]
    assert kinds(parse(hook("", {"callId": CALL_ID, "tenantId": TENANT}), s)) == [
        CallEventType.TERMINATED
    ]


@pytest.mark.parametrize(
    "sdp",
    [ANSWER_SDP, json.dumps(ANSWER_SDP), {"type": "answer", "sdp": ANSWER_SDP}],
    ids=["plain", "json-quoted", "object"],
)
def test_sdp_answer_variants(wati, sdp):
    (event,) = parse(hook("/sdp-answer", {"callId": CALL_ID, "sdp": sdp}), wati()).events
    assert event.sdp == ANSWER_SDP


def test_inbound_calls_and_unknown_events_are_ignored(wati):
    s = wati()
    offer = {"callId": CALL_ID, "sdp": {"type": "offer", "sdp": "v=0"}, "businessNumber": "1"}
    assert parse(hook("", offer), s).events == []
    assert parse(hook("/new-call", {"callId": CALL_ID, "sdp": "v=0"}), s).events == []
    assert parse(hook("", {"event": "message.received", "text": "hi"}), s).events == []
    assert parse(hook("/call-status", {"callId": CALL_ID, "status": "CONNECTING"}), s).events == []


def test_timestamps_and_duration(wati):
    payload = {"callId": CALL_ID, "status": "ENDED", "timestamp": "1749197480", "duration": "42"}
    (event,) = parse(hook("/call-status", payload), wati()).events
    assert event.timestamp == datetime.fromtimestamp(1749197480, UTC)
    assert event.duration_seconds == 42
    iso = {"callId": CALL_ID, "status": "RINGING", "timestamp": "2025-06-06T08:00:00Z"}
    (event,) = parse(hook("/call-status", iso), wati()).events
    assert event.timestamp == datetime(2025, 6, 6, 8, 0, tzinfo=UTC)


def test_duplicates_share_a_dedupe_key_and_events_do_not_collide(wati, monkeypatch):
    # id-less events (permission replies) are keyed by body and hour: keep the hour fixed
    monkeypatch.setattr(wati_webhooks.time, "time", lambda: 1_750_000_000.0)
    s = wati()
    deliveries = [
        ("/sdp-answer", {"callId": CALL_ID, "sdp": ANSWER_SDP}),
        ("/call-status", {"callId": CALL_ID, "status": "RINGING"}),
        ("/call-status", {"callId": CALL_ID, "status": "ACCEPTED"}),
        ("/terminate", {"callId": CALL_ID}),
        ("/permission", {"waid": USER, "hasPermission": True}),
    ]
    first = [parse(hook(p, b), s).events[0].dedupe_key for p, b in deliveries]
    again = [parse(hook(p, b), s).events[0].dedupe_key for p, b in deliveries]
    assert first == again and len(set(first)) == len(first)
    denied = parse(hook("/permission", {"waid": USER, "hasPermission": False}), s).events[0]
    assert denied.dedupe_key not in first


def test_signature_is_required_when_a_secret_is_set(wati):
    s = wati(watiWebhookSecret=SECRET)
    payload = {"callId": CALL_ID, "status": "RINGING"}
    assert kinds(parse(hook("/call-status", payload, secret=SECRET), s)) == [CallEventType.RINGING]
    for bad in (None, "wrong-secret"):
        with pytest.raises(WebhookRejected) as err:
            parse(hook("/call-status", payload, secret=bad), s)
        assert err.value.status_code == 403 and SECRET not in str(err.value)
    # checked on the raw bytes before parsing
    with pytest.raises(WebhookRejected) as err:
        parse(hook("/call-status", None, raw=b"{broken", secret="wrong"), s)
    assert err.value.status_code == 403


def test_deeply_nested_json_is_refused_not_crashed(wati):
    deep = b"[" * 100_000 + b"]" * 100_000
    deep_sdp = '{"a":' * 100_000 + "1" + "}" * 100_000  # an "SDP" that is deep JSON
    for body in (deep, json.dumps({"callId": "x", "sdp": deep_sdp}).encode()):
        with pytest.raises(WebhookRejected) as err:
            parse(hook("/sdp-answer", None, raw=body), wati())
        assert err.value.status_code == 400


def test_unsigned_webhooks_are_accepted_without_a_secret(wati):
    result = parse(hook("/call-status", {"callId": CALL_ID, "status": "RINGING"}), wati())
    assert kinds(result) == [CallEventType.RINGING]


def test_only_post_and_only_wati(wati):
    with pytest.raises(WebhookRejected) as err:
        parse(WebhookRequest("GET", "", {}, {}, b""), wati())
    assert err.value.status_code == 405
    result = plugin_mod.call_first_sync(
        "parse_webhook",
        provider="meta",
        request=hook("/call-status", {"callId": CALL_ID, "status": "RINGING"}),
        settings=wati(),
    )
    assert result is None


@pytest.mark.parametrize(
    ("path", "body", "problem"),
    [
        ("", b"{nope", "not JSON"),
        ("", b'"text"', "JSON object"),
        ("", b'{"hello": 1}', "cannot tell which event"),
        ("/sdp-answer", b'{"callId": "x"}', "has no sdp"),
        ("/sdp-answer", b'{"sdp": "v=0"}', "callId is missing"),
        ("/call-status", b'{"callId": "x"}', "has no status"),
        ("/call-status", b'{"callId": ["x"], "status": "RINGING"}', "must be a string"),
        ("/permission", b'{"hasPermission": true}', "names no user"),
        ("/permission", b'{"waid": "1", "hasPermission": "maybe"}', "neither hasPermission"),
        ("", b'{"event": 5}', "event must be a string"),
        ("/call-status", b'{"callId": "x", "status": "ENDED", "duration": "long"}', "whole number"),
    ],
)
def test_malformed_webhooks_are_refused_with_400(wati, path, body, problem):
    with pytest.raises(WebhookRejected) as err:
        parse(hook(path, None, raw=body), wati())
    assert err.value.status_code == 400
    assert problem in str(err.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)
wati_shaped = st.dictionaries(
    st.sampled_from(
        [
            "event",
            "callId",
            "sdp",
            "status",
            "waid",
            "hasPermission",
            "contact",
            "timestamp",
            "duration",
            "isPermanent",
            "expirationTime",
        ]
    ),
    json_values | st.sampled_from(["call.start", "call.end", "permission", "RINGING", "v=0"]),
)
paths = st.sampled_from(["", "/", "/permission", "/sdp-answer", "/call-status", "/terminate", "/x"])


@hsettings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(path=paths, payload=json_values | wati_shaped)
def test_parser_never_fails_with_anything_but_webhook_rejected(wati, path, payload):
    try:
        result = wati_webhooks.parse(hook(path, payload), wati())
    except WebhookRejected as exc:
        assert exc.status_code == 400
    else:
        assert all(e.provider == "wati" and e.dedupe_key for e in result.events)


@hsettings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(path=paths, body=st.binary(max_size=200))
def test_parser_on_arbitrary_bytes(wati, path, body):
    try:
        wati_webhooks.parse(hook(path, None, raw=body), wati())
    except WebhookRejected:
        pass


# ---------------------------------------------------------------------------- client


PERMISSIONS = f"GET {BASE_PATH}/permissions/{USER}"
REQUEST = f"POST {BASE_PATH}/call-permission-request/{USER}"
OUTBOUND = f"POST {BASE_PATH}/outbound-call/{USER}"
TERMINATE = f"POST {BASE_PATH}/{CALL_ID}/terminate"


def ok(result: Any = None) -> tuple[int, dict[str, Any]]:
    return 200, {"code": 200, "message": "Success", "result": result}


def refused(code: int, message: str, http: int = 200) -> tuple[int, dict[str, Any]]:
    return http, {"code": code, "message": message, "result": None}


@pytest.fixture
async def api(wati):
    fake = FakeApi()
    async with serve_asgi(fake.app()) as url:
        fake.settings = lambda **o: wati(watiBaseUrl=url, **o)  # type: ignore[attr-defined]
        yield fake
        await whatsapp_call_wati.aclose()


def a_call(**kw: Any) -> Call:
    return Call(to=parse_phone("+" + USER), provider="wati", **kw)


PERMISSION_RESULT = {
    "messaging_product": "whatsapp",
    "permission": {"status": "temporary", "expiration_time": 1745343479},
    "actions": [
        {
            "action_name": "send_call_permission_request",
            "can_perform_action": False,
            "limits": [
                {
                    "time_period": "PT24H",
                    "max_allowed": 1,
                    "current_usage": 1,
                    "limit_expiration_time": 1745622600,
                }
            ],
        },
        {
            "action_name": "start_call",
            "can_perform_action": True,
            "limits": [{"time_period": "PT24H", "max_allowed": 10, "current_usage": 0}],
        },
    ],
}


@pytest.mark.parametrize("token", [TOKEN, f"Bearer {TOKEN}", f"  bearer {TOKEN} "])
async def test_check_permission_reads_the_envelope_and_sends_the_token(api, token):
    api.script(PERMISSIONS, ok(PERMISSION_RESULT))
    settings = api.settings(watiApiToken=token, watiChannelPhoneNumber="+1 317-555-1399")
    state = await plugin_mod.call_first("check_permission", call=a_call(), settings=settings)
    assert state.status == PermissionStatus.GRANTED
    assert (state.can_call, state.can_request) == (True, False)
    assert state.expires_at == datetime.fromtimestamp(1745343479, UTC)
    assert state.next_request_at == datetime.fromtimestamp(1745622600, UTC)
    (seen,) = api.requests(PERMISSIONS)
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"
    assert seen.query == {"channelPhoneNumber": "13175551399"}


async def test_non_200_code_in_an_http_200_envelope_is_an_error(api):
    api.script(OUTBOUND, refused(401, "(#138006) No approved call permission: from 14085551234"))
    with pytest.raises(CallPermissionError) as err:
        await wati_client.send_offer(a_call(), REFERENCE_OFFER, api.settings())
    exc = err.value
    assert (exc.code, exc.http_status, exc.provider) == (138006, 200, "wati")
    assert "No approved call permission" in exc.message
    assert exc.hint == wati_client.HINTS[138006]
    assert len(api.requests(OUTBOUND)) == 1


@pytest.mark.parametrize(
    ("http", "body", "hint"),
    [
        (401, {"code": 401, "message": "Unauthorized"}, "watiApiToken"),
        (404, {"code": 404, "message": "Tenant 1000 not found"}, "watiTenantId"),
        (400, {"code": 400, "message": "(#100) Invalid parameter: no fingerprint"}, "Opus"),
        (400, b"<html>Bad Request</html>", "WATI message"),
    ],
)
async def test_http_errors_carry_a_hint_and_are_not_retried(api, http, body, hint):
    api.script(OUTBOUND, (http, body))
    with pytest.raises(ProviderError) as err:
        await wati_client.send_offer(a_call(), REFERENCE_OFFER, api.settings())
    assert hint in err.value.hint
    assert err.value.http_status == http
    assert TOKEN not in str(err.value)
    assert len(api.requests(OUTBOUND)) == 1


async def test_429_and_503_are_retried(api):
    api.script(
        PERMISSIONS,
        (429, {"code": 429, "message": "Too many requests"}, {"Retry-After": "1"}),
        (503, {"code": 503, "message": "Service unavailable"}),
        ok(PERMISSION_RESULT),
    )
    start = time.monotonic()
    state = await wati_client.check_permission(a_call(), api.settings())
    assert state.status == PermissionStatus.GRANTED
    assert time.monotonic() - start >= 0.95
    assert len(api.requests(PERMISSIONS)) == 3


async def test_timeouts_and_malformed_answers(api):
    async def slow():
        await asyncio.sleep(1.0)
        return ok({"callId": CALL_ID})

    api.script(OUTBOUND, slow)
    with pytest.raises(ProviderError, match="timed out"):
        await wati_client.send_offer(
            a_call(), REFERENCE_OFFER, api.settings(watiHttpTimeoutSeconds=0.3)
        )
    assert len(api.requests(OUTBOUND)) == 1  # never placed twice
    api.script(OUTBOUND, (200, b"not json"), ok({"id": "no callId"}))
    with pytest.raises(ProviderError, match="not a JSON object"):
        await wati_client.send_offer(a_call(), REFERENCE_OFFER, api.settings())
    with pytest.raises(ProviderError, match="result.callId"):
        await wati_client.send_offer(a_call(), REFERENCE_OFFER, api.settings())
    api.script(PERMISSIONS, ok({"unexpected": True}))
    with pytest.raises(ProviderError, match="permission.status"):
        await wati_client.check_permission(a_call(), api.settings())


async def test_send_offer_and_terminate(api):
    api.script(OUTBOUND, ok({"callId": CALL_ID}))
    api.script(TERMINATE, ok())
    settings = api.settings()
    call = a_call()
    call.provider_call_id = await plugin_mod.call_first(
        "send_offer", call=call, sdp=REFERENCE_OFFER, settings=settings
    )
    assert call.provider_call_id == CALL_ID
    assert api.requests(OUTBOUND)[0].body == {"Sdp": REFERENCE_OFFER}
    assert await plugin_mod.call_first("terminate_call", call=call, settings=settings) is True
    assert len(api.requests(TERMINATE)) == 1
    assert await wati_client.terminate_call(a_call(), settings) is False


async def test_request_permission_outcomes(api):
    api.script(
        REQUEST,
        ok(),
        refused(400, "(#138009) Limit reached; next request allowed at 2025-04-25T23:10:00Z"),
        refused(400, "(#138017) Permanent permission already granted"),
        refused(400, "(#138009) Limit reached"),
    )
    api.script(PERMISSIONS, ok(PERMISSION_RESULT))
    settings = api.settings()
    sent = await plugin_mod.call_first("request_permission", call=a_call(), settings=settings)
    assert sent.outcome == PermissionRequestOutcome.SENT
    limited = await wati_client.request_permission(a_call(), settings)
    assert limited.outcome == PermissionRequestOutcome.LIMIT_REACHED
    assert limited.retry_at == datetime(2025, 4, 25, 23, 10, tzinfo=UTC)
    permanent = await wati_client.request_permission(a_call(), settings)
    assert permanent.outcome == PermissionRequestOutcome.ALREADY_PERMANENT
    asked = await wati_client.request_permission(a_call(), settings)  # time from a GET
    assert asked.retry_at == datetime.fromtimestamp(1745622600, UTC)


async def test_hooks_answer_only_for_provider_wati(api):
    settings = api.settings(provider="meta")
    assert await plugin_mod.call_first("check_permission", call=a_call(), settings=settings) is None
    assert await whatsapp_call_wati.doctor_checks(settings) is None
    assert api.seen == []


async def test_doctor(api):
    api.script(f"GET {BASE_PATH}/permissions/10000000000", ok(PERMISSION_RESULT))
    checks = {c.name: c for c in await whatsapp_call_wati.doctor_checks(api.settings())}
    assert checks["wati api"].status == CheckStatus.OK
    assert checks["webhook security"].status == CheckStatus.WARN
    api.script(f"GET {BASE_PATH}/permissions/10000000000", (401, {"code": 401}))
    checks = {c.name: c for c in await whatsapp_call_wati.doctor_checks(api.settings())}
    assert checks["wati api"].status == CheckStatus.FAIL
    assert "token was rejected" in checks["wati api"].message
    api.script(f"GET {BASE_PATH}/permissions/10000000000", (404, {"code": 404}))
    checks = {c.name: c for c in await whatsapp_call_wati.doctor_checks(api.settings())}
    assert "does not know tenant" in checks["wati api"].message


async def test_doctor_unreachable(wati):
    checks = await whatsapp_call_wati.doctor_checks(wati(watiBaseUrl="http://127.0.0.1:9"))
    assert checks[0].status == CheckStatus.FAIL and "cannot reach" in checks[0].message


# ---------------------------------------------------------------------------- the simulator


@pytest.fixture(params=["per_event", "single"])
async def sim(request, wati):
    receiver = ParsingReceiver("wati")
    async with serve_asgi(receiver.app) as receiver_url:
        simulator = WhatsAppSimulator(
            SimConfig(
                wati_tenant_id=TENANT,
                wati_api_token=TOKEN,
                wati_webhook_url=receiver_url + "/webhooks/wati",
                wati_webhook_secret=SECRET,
                wati_webhook_shape=request.param,
                default_scenario=Scenario(media=False, answer_delay_s=0.05),
                webhook_retry_delays_s=(0.05,),
            )
        )
        base = await simulator.start()
        try:
            settings = wati(watiBaseUrl=base, watiWebhookSecret=SECRET)
            receiver.settings = settings
            yield SimpleNamespace(sim=simulator, receiver=receiver, settings=settings)
        finally:
            await simulator.stop()
            await whatsapp_call_wati.aclose()


def scenario(**kw: Any) -> Scenario:
    return Scenario(**{"media": False, "answer_delay_s": 0.05, **kw})


async def test_sim_permission_flow(sim):
    call = a_call()
    sim.sim.set_scenario(
        USER, scenario(permission="grant_on_request", permission_reply_delay_s=0.05)
    )
    before = await plugin_mod.call_first("check_permission", call=call, settings=sim.settings)
    assert before.status == PermissionStatus.NOT_GRANTED and before.can_request
    sent = await plugin_mod.call_first("request_permission", call=call, settings=sim.settings)
    assert sent.outcome == PermissionRequestOutcome.SENT
    (reply,) = await sim.receiver.wait_for(CallEventType.PERMISSION_REPLY)
    assert (reply.wa_id, reply.permission_granted) == (USER, True)
    after = await wati_client.check_permission(call, sim.settings)
    assert after.status == PermissionStatus.GRANTED and after.can_call
    again = await wati_client.request_permission(call, sim.settings)
    assert again.outcome == PermissionRequestOutcome.LIMIT_REACHED and again.retry_at


async def test_sim_call_accepted_then_terminated(sim):
    call = a_call()
    sim.sim.set_scenario(USER, scenario())
    call.provider_call_id = await plugin_mod.call_first(
        "send_offer", call=call, sdp=REFERENCE_OFFER, settings=sim.settings
    )
    ids = {"provider_call_id": call.provider_call_id}
    (answer,) = await sim.receiver.wait_for(CallEventType.ANSWER, **ids)
    assert "a=setup:active" in answer.sdp
    await sim.receiver.wait_for(CallEventType.ACCEPTED, **ids)
    assert await plugin_mod.call_first("terminate_call", call=call, settings=sim.settings)
    ended = await sim.receiver.wait_for(CallEventType.TERMINATED, **ids)
    assert len({e.dedupe_key for e in ended}) == 1  # ENDED status + terminate: one event
    assert sim.sim.calls[call.provider_call_id].terminated_by == "business"
    assert sim.receiver.rejections == []


async def test_sim_call_rejected(sim):
    call = a_call()
    sim.sim.set_scenario(USER, scenario(answer="reject"))
    wacid = await wati_client.send_offer(call, REFERENCE_OFFER, sim.settings)
    await sim.receiver.wait_for(CallEventType.REJECTED, provider_call_id=wacid)
    await sim.receiver.wait_for(CallEventType.TERMINATED, provider_call_id=wacid)


async def test_sim_errors_and_bad_signatures(sim, wati):
    call = a_call()
    sim.sim.set_scenario(USER, scenario(permission="none"))
    with pytest.raises(CallPermissionError) as err:
        await wati_client.send_offer(call, REFERENCE_OFFER, sim.settings)
    assert err.value.code == 138006
    wrong = wati(watiBaseUrl=sim.settings.wati_base_url, watiApiToken="wrong-token-xyz")
    with pytest.raises(ProviderError) as err:
        await wati_client.check_permission(call, wrong)
    assert err.value.http_status == 401 and "watiApiToken" in err.value.hint

    sim.sim.set_scenario(USER, scenario(hangup_after_s=0.05))
    sim.sim.set_faults(bad_signature=True)
    wacid = await wati_client.send_offer(call, REFERENCE_OFFER, sim.settings)
    async with asyncio.timeout(5):
        while not sim.sim.calls[wacid].ended:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await sim.sim.drain_webhooks(timeout=5)
    assert [e for e in sim.receiver.events if e.provider_call_id == wacid] == []
    assert sim.receiver.rejections and {r.status_code for r in sim.receiver.rejections} == {403}


async def test_sim_faults_429_503(sim):
    sim.sim.set_faults(api_429_count=1, api_503_count=1, retry_after_s=1)
    state = await wati_client.check_permission(a_call(), sim.settings)
    assert state.status == PermissionStatus.GRANTED


async def test_sim_doctor(sim):
    checks = {c.name: c for c in await whatsapp_call_wati.doctor_checks(sim.settings)}
    assert checks["wati api"].status == CheckStatus.OK
    assert checks["webhook security"].status == CheckStatus.OK
