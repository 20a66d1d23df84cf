"""The Meta (Graph API) provider plugin: webhook verification and parsing on payloads written
from the spec (every variant, signatures, duplicates, malformed, fuzzed), the Graph client
against a small in-test Graph app (responses, error envelopes, retries, timeouts, rate limit),
doctor, and the whole flow against the WhatsApp simulator."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import whatsapp_call_meta
from aiortc import RTCConfiguration, RTCPeerConnection
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from whatsapp_call import plugins as plugin_mod
from whatsapp_call.errors import CallPermissionError, ProviderError, WebhookRejected
from whatsapp_call.media.ice import host_addresses
from whatsapp_call.models import (
    Call,
    CallEventType,
    CheckStatus,
    PermissionRequestOutcome,
    PermissionStatus,
    WebhookRequest,
)
from whatsapp_call.phone import parse_phone
from whatsapp_call.providers import http as http_mod
from whatsapp_call.providers.http import ClientPool, RateLimiter, parse_retry_after
from whatsapp_call.serving import serve_asgi
from whatsapp_call_meta import client as meta_client
from whatsapp_call_meta import webhooks as meta_webhooks
from whatsapp_call_sim.whatsapp import Scenario, SimConfig, WhatsAppSimulator

APP_SECRET = "test-app-secret-123"
VERIFY_TOKEN = "test-verify-token-456"
TOKEN = "EAAG-test-token-very-secret-789"
PNID = "436666719526789"
BUSINESS = "13175551399"
USER = "12185552828"
WACID = "wacid.HBgLMTIxODU1NTI4MjgVAgARGCAyODRQIAFRoA"
OUR_ID = "call_0123456789abcdef0123456789abcdef"
ANSWER_SDP = "v=0\r\no=- 741807839102053725 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=ice-lite\r\n"


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def meta(register_plugin, make_settings):
    """Registers the plugin; returns a settings factory with test credentials."""
    register_plugin(whatsapp_call_meta, name="meta")

    def build(**options: Any):
        base = {
            "provider": "meta",
            "metaPhoneNumberId": PNID,
            "metaAccessToken": TOKEN,
            "metaAppSecret": APP_SECRET,
            "metaVerifyToken": VERIFY_TOKEN,
            "metaHttpTimeoutSeconds": 2,
            "metaRetryBudgetSeconds": 5,
        }
        base.update(options)
        return make_settings(**{k: v for k, v in base.items() if v is not None})

    return build


def sign(body: bytes, secret: str = APP_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(
    payload: Any, *, secret: str | None = APP_SECRET, raw: bytes | None = None
) -> WebhookRequest:
    body = raw if raw is not None else json.dumps(payload).encode()
    headers = {"content-type": "application/json"}
    if secret is not None:
        headers["x-hub-signature-256"] = sign(body, secret)
    return WebhookRequest("POST", "", {}, headers, body)


def parse(request: WebhookRequest, settings):
    return plugin_mod.call_first_sync(
        "parse_webhook", provider="meta", request=request, settings=settings
    )


def envelope(field_name: str, value: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "366634483210360", "changes": [{"field": field_name, "value": value}]}],
    }


def calls_value(**extra: Any) -> dict[str, Any]:
    return {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": BUSINESS, "phone_number_id": PNID},
        **extra,
    }


def connect_payload(*, contacts: bool = True, swapped: bool = False, legacy: bool = False):
    call = {
        "id": WACID,
        "to": BUSINESS if swapped else USER,
        "from": USER if swapped else BUSINESS,
        "event": "connect",
        "timestamp": "1749196895",
        "direction": "BUSINESS_INITIATED",
        "biz_opaque_callback_data": OUR_ID,
        "session": {"sdp_type": "answer", "sdp": ANSWER_SDP},
    }
    if legacy:
        call["connection"] = {
            "webrtc": {"sdp": json.dumps({"sdp": "v=0 legacy", "type": "answer"})}
        }
    value = calls_value(calls=[call])
    if contacts:
        value["contacts"] = [{"profile": {"name": "Pablo"}, "wa_id": USER}]
    return envelope("calls", value)


def status_payload(status: str, *, type_: str = "call"):
    return envelope(
        "calls",
        calls_value(
            statuses=[
                {
                    "id": WACID,
                    "type": type_,
                    "status": status,
                    "timestamp": "1749197000",
                    "recipient_id": USER,
                    "biz_opaque_callback_data": OUR_ID,
                }
            ]
        ),
    )


def terminate_payload(status: str = "COMPLETED", *, errors: bool = False):
    call = {
        "id": WACID,
        "to": USER,
        "from": BUSINESS,
        "event": "terminate",
        "direction": "BUSINESS_INITIATED",
        "biz_opaque_callback_data": OUR_ID,
        "timestamp": "1749197480",
        "status": status,
    }
    value = calls_value(calls=[call])
    if status.upper() == "COMPLETED":
        call.update(start_time="1749197010", end_time="1749197130", duration=120)
    if errors:
        value["errors"] = [
            {
                "code": 138021,
                "message": "Media receive timeout",
                "href": "https://developers.facebook.com/",
                "error_data": {"details": "no media for 20 s"},
            }
        ]
    return envelope("calls", value)


def permission_reply_payload(*, response="accept", permanent=False, expiry: Any = 1749800800):
    reply: dict[str, Any] = {
        "response": response,
        "is_permanent": permanent,
        "response_source": "user_action",
    }
    if expiry is not None:
        reply["expiration_timestamp"] = expiry
    return envelope(
        "messages",
        {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": BUSINESS, "phone_number_id": PNID},
            "contacts": [{"profile": {"name": "Pablo"}, "wa_id": "14085551234"}],
            "messages": [
                {
                    "from": "14085551234",
                    "id": "wamid.sH0kFlaCGg0xcvZbgmg90lHrg2dL",
                    "timestamp": "1749196000",
                    "type": "interactive",
                    "context": {"from": BUSINESS, "id": "wamid.gBGGFlaCmZ9plHrf2Mh-o"},
                    "interactive": {
                        "type": "call_permission_reply",
                        "call_permission_reply": reply,
                    },
                }
            ],
        },
    )


# ---------------------------------------------------------------------------- verification


def test_get_handshake_echoes_the_challenge(meta):
    request = WebhookRequest(
        "GET",
        "",
        {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"},
        {},
        b"",
    )
    result = parse(request, meta())
    assert (result.status_code, result.body, result.events) == (200, "1158201444", [])


@pytest.mark.parametrize(
    "query",
    [
        {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
        {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"},
        {"hub.challenge": "1"},
    ],
)
def test_get_handshake_refuses_a_wrong_token_or_mode(meta, query):
    with pytest.raises(WebhookRejected) as err:
        parse(WebhookRequest("GET", "", query, {}, b""), meta())
    assert err.value.status_code == 403
    assert VERIFY_TOKEN not in str(err.value)


def test_get_handshake_without_configured_verify_token_says_what_to_set(meta):
    query = {"hub.mode": "subscribe", "hub.verify_token": "x", "hub.challenge": "1"}
    with pytest.raises(WebhookRejected, match="metaVerifyToken") as err:
        parse(WebhookRequest("GET", "", query, {}, b""), meta(metaVerifyToken=None))
    assert err.value.status_code == 403


def test_signed_post_is_accepted_and_the_signature_covers_raw_bytes(meta):
    body = json.dumps(status_payload("RINGING"), indent=3).encode()  # not re-serialisable
    result = parse(post(None, raw=body), meta())
    assert [e.type for e in result.events] == [CallEventType.RINGING]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-hub-signature-256": "sha256=" + "0" * 64},
        {"x-hub-signature-256": sign(b"other body")},
        {"x-hub-signature-256": sign(b"", "wrong-secret")},
        {"x-hub-signature-256": "garbage"},
    ],
)
def test_missing_or_bad_signature_is_refused_with_403_before_parsing(meta, headers):
    body = b"{not even json"  # never parsed: the signature check comes first
    with pytest.raises(WebhookRejected) as err:
        parse(WebhookRequest("POST", "", {}, headers, body), meta())
    assert err.value.status_code == 403
    assert APP_SECRET not in str(err.value)


def test_signature_header_lookup_is_case_insensitive(meta):
    body = json.dumps(status_payload("RINGING")).encode()
    request = WebhookRequest("POST", "", {}, {"X-Hub-Signature-256": sign(body)}, body)
    assert len(parse(request, meta()).events) == 1


def test_unsigned_webhooks_are_refused_when_the_app_secret_is_not_configured(meta):
    with pytest.raises(WebhookRejected, match="metaAppSecret") as err:
        parse(post(status_payload("RINGING")), meta(metaAppSecret=None))
    assert err.value.status_code == 403
    assert "App secret" in (err.value.hint or "")


def test_other_methods_are_refused(meta):
    with pytest.raises(WebhookRejected) as err:
        parse(WebhookRequest("PUT", "", {}, {}, b""), meta())
    assert err.value.status_code == 405


def test_parse_webhook_answers_only_for_meta(meta):
    result = plugin_mod.call_first_sync(
        "parse_webhook", provider="wati", request=post(status_payload("RINGING")), settings=meta()
    )
    assert result is None


# ---------------------------------------------------------------------------- payloads


@pytest.mark.parametrize(
    "variant",
    [{}, {"contacts": False}, {"swapped": True}, {"legacy": True}],
    ids=["spec", "no-contacts", "swapped-from-to", "legacy-connection"],
)
def test_connect_event_is_an_answer_mapped_to_our_call(meta, variant):
    (event,) = parse(post(connect_payload(**variant)), meta()).events
    assert event.type == CallEventType.ANSWER
    assert event.provider == "meta"
    assert event.sdp == ANSWER_SDP  # `session` wins over the legacy `connection`
    assert event.provider_call_id == WACID
    assert event.call_id == OUR_ID
    assert event.wa_id == USER
    assert event.timestamp == datetime.fromtimestamp(1749196895, UTC)


def test_legacy_connection_alone_still_yields_the_answer(meta):
    payload = connect_payload()
    call = payload["entry"][0]["changes"][0]["value"]["calls"][0]
    del call["session"]
    call["connection"] = {"webrtc": {"sdp": json.dumps({"type": "answer", "sdp": ANSWER_SDP})}}
    (event,) = parse(post(payload), meta()).events
    assert event.sdp == ANSWER_SDP


def test_user_initiated_offer_is_ignored(meta):
    payload = connect_payload()
    call = payload["entry"][0]["changes"][0]["value"]["calls"][0]
    call.update(direction="USER_INITIATED", session={"sdp_type": "offer", "sdp": "v=0"})
    assert parse(post(payload), meta()).events == []


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("RINGING", CallEventType.RINGING),
        ("ACCEPTED", CallEventType.ACCEPTED),
        ("REJECTED", CallEventType.REJECTED),
        ("ringing", CallEventType.RINGING),
    ],
)
def test_call_statuses(meta, status, kind):
    (event,) = parse(post(status_payload(status)), meta()).events
    assert event.type == kind
    assert event.status == status.upper()
    assert (event.provider_call_id, event.call_id, event.wa_id) == (WACID, OUR_ID, USER)


def test_message_statuses_are_not_call_statuses(meta):
    payload = status_payload("delivered", type_="message")
    assert parse(post(payload), meta()).events == []


@pytest.mark.parametrize("status", ["COMPLETED", "Completed", "FAILED", "Failed", "REJECTED"])
def test_terminate_status_in_any_case(meta, status):
    (event,) = parse(post(terminate_payload(status)), meta()).events
    assert event.type == CallEventType.TERMINATED
    assert event.status == status.upper()
    assert event.call_id == OUR_ID
    assert event.duration_seconds == (120 if status.upper() == "COMPLETED" else None)


def test_terminate_carries_the_errors(meta):
    (event,) = parse(post(terminate_payload("FAILED", errors=True)), meta()).events
    assert [(e.code, e.message, e.details) for e in event.errors] == [
        (138021, "Media receive timeout", "no media for 20 s")
    ]


@pytest.mark.parametrize("expiry", [1749800800, "1749800800"])
def test_temporary_permission_reply_with_expiry_as_int_or_string(meta, expiry):
    (event,) = parse(post(permission_reply_payload(expiry=expiry)), meta()).events
    assert event.type == CallEventType.PERMISSION_REPLY
    assert event.wa_id == "14085551234"
    assert event.permission_granted is True
    assert event.permission_permanent is False
    assert event.permission_expires_at == datetime.fromtimestamp(1749800800, UTC)
    assert event.timestamp == datetime.fromtimestamp(1749196000, UTC)


def test_permanent_and_rejected_permission_replies(meta):
    (permanent,) = parse(post(permission_reply_payload(permanent=True, expiry=None)), meta()).events
    assert (permanent.permission_granted, permanent.permission_permanent) == (True, True)
    assert permanent.permission_expires_at is None
    (rejected,) = parse(
        post(permission_reply_payload(response="reject", expiry=None)), meta()
    ).events
    assert rejected.permission_granted is False
    assert rejected.permission_expires_at is None


def test_other_messages_and_fields_are_ignored(meta):
    text = envelope(
        "messages",
        {"messages": [{"from": USER, "id": "wamid.1", "type": "text", "text": {"body": "hi"}}]},
    )
    settings_change = envelope("account_settings_update", {"calling": {"status": "ENABLED"}})
    other_object = {"object": "page", "entry": [{"changes": []}]}
    for payload in (text, settings_change, other_object):
        assert parse(post(payload), meta()).events == []


def test_several_changes_in_one_delivery(meta):
    payload = connect_payload()
    payload["entry"][0]["changes"] += status_payload("RINGING")["entry"][0]["changes"]
    payload["entry"].append(permission_reply_payload()["entry"][0])
    kinds = [e.type for e in parse(post(payload), meta()).events]
    assert kinds == [CallEventType.ANSWER, CallEventType.RINGING, CallEventType.PERMISSION_REPLY]


def test_duplicate_deliveries_have_identical_dedupe_keys(meta):
    settings = meta()
    payloads = [
        connect_payload(),
        status_payload("RINGING"),
        status_payload("ACCEPTED"),
        terminate_payload(),
        permission_reply_payload(),
    ]
    first = [parse(post(p), settings).events[0].dedupe_key for p in payloads]
    again = [parse(post(copy.deepcopy(p)), settings).events[0].dedupe_key for p in payloads]
    assert first == again
    assert len(set(first)) == len(first)  # distinct events never collide


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"object": "whatsapp_business_account"}', "entry"),
        (b'{"entry": {"a": 1}}', "entry must be a list"),
        (b'{"entry": [{"changes": [{"field": "calls", "value": []}]}]}', "value must be an object"),
        (b'{"entry": [{"changes": [{"field": "calls", "value": {"calls": [5]}}]}]}', "calls[0]"),
        (
            b'{"entry": [{"changes": [{"field": "calls", "value": {"calls": [{"event": "connect"}]}}]}]}',
            "id is missing",
        ),
    ],
)
def test_malformed_bodies_are_refused_with_400_naming_the_problem(meta, body, problem):
    with pytest.raises(WebhookRejected) as err:
        parse(post(None, raw=body), meta())
    assert err.value.status_code == 400
    assert problem in str(err.value)


def test_deeply_nested_json_is_refused_not_crashed(meta):
    with pytest.raises(WebhookRejected) as err:
        parse(post(None, raw=b"[" * 100_000 + b"]" * 100_000), meta())
    assert err.value.status_code == 400


def test_connect_without_sdp_is_refused(meta):
    payload = connect_payload()
    del payload["entry"][0]["changes"][0]["value"]["calls"][0]["session"]
    with pytest.raises(WebhookRejected, match="without session.sdp"):
        parse(post(payload), meta())


def test_bad_timestamp_is_refused(meta):
    payload = status_payload("RINGING")
    payload["entry"][0]["changes"][0]["value"]["statuses"][0]["timestamp"] = "yesterday"
    with pytest.raises(WebhookRejected, match="timestamp"):
        parse(post(payload), meta())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)
# Fuzz inside the real structure too, not only at the top level.
meta_shaped = st.builds(
    lambda field_name, value, kind: {
        "object": "whatsapp_business_account",
        "entry": [{"changes": [{"field": field_name, "value": {kind: [value]}}]}],
    },
    st.sampled_from(["calls", "messages"]),
    st.dictionaries(
        st.sampled_from(
            [
                "id",
                "event",
                "type",
                "status",
                "session",
                "timestamp",
                "direction",
                "from",
                "to",
                "interactive",
                "duration",
                "errors",
                "biz_opaque_callback_data",
                "connection",
            ]
        ),
        json_values,
    ),
    st.sampled_from(["calls", "statuses", "messages", "errors"]),
)


@hsettings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=json_values | meta_shaped)
def test_parser_never_fails_with_anything_but_webhook_rejected_on_json(meta, payload):
    try:
        result = meta_webhooks.parse(post(payload), _fuzz_settings(meta))
    except WebhookRejected as exc:
        assert exc.status_code == 400
    else:
        assert all(e.provider == "meta" and e.dedupe_key for e in result.events)


@hsettings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.binary(max_size=200))
def test_parser_never_fails_with_anything_but_webhook_rejected_on_bytes(meta, body):
    with pytest.raises(WebhookRejected):
        meta_webhooks.parse(post(None, raw=body), _fuzz_settings(meta))


def _fuzz_settings(factory):
    return factory()


# ---------------------------------------------------------------------------- in-test Graph API


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    at: float


@dataclass
class FakeApi:
    """A tiny programmable HTTP API: per "METHOD /path", a queue of scripted answers (then a
    default); records every request. An answer is (status, body[, headers]) or an async
    callable returning one (to sleep, i.e. time out)."""

    scripts: dict[str, deque] = field(default_factory=lambda: defaultdict(deque))
    defaults: dict[str, Any] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def script(self, key: str, *answers: Any) -> None:
        self.scripts[key].extend(answers)

    def requests(self, key: str) -> list[Seen]:
        method, path = key.split(" ", 1)
        return [s for s in self.seen if s.method == method and s.path == path]

    async def handle(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        self.seen.append(
            Seen(
                request.method,
                request.url.path,
                dict(request.query_params),
                dict(request.headers),
                body,
                time.monotonic(),
            )
        )
        key = f"{request.method} {request.url.path}"
        queue = self.scripts.get(key)
        answer = queue.popleft() if queue else self.defaults.get(key)
        if answer is None:
            return JSONResponse({"error": {"message": f"no route {key}", "code": 100}}, 404)
        if callable(answer):
            answer = await answer()
        status, content, *rest = answer
        headers = rest[0] if rest else None
        if isinstance(content, bytes | str):
            return Response(content, status, headers=headers, media_type="application/json")
        return JSONResponse(content, status, headers=headers)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.handle, methods=["GET", "POST"])])


def graph_error(code: int, message: str, details: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {
        "message": message,
        "type": "OAuthException",
        "code": code,
        "fbtrace_id": "AbCdEf123",
    }
    if details:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details}
    return {"error": error}


PERMISSIONS = f"GET /v23.0/{PNID}/call_permissions"
MESSAGES = f"POST /v23.0/{PNID}/messages"
CALLS = f"POST /v23.0/{PNID}/calls"


@pytest.fixture
async def graph(meta):
    api = FakeApi()
    async with serve_asgi(api.app()) as url:
        api.url = url  # type: ignore[attr-defined]
        api.settings = lambda **o: meta(metaGraphBaseUrl=url, **o)  # type: ignore[attr-defined]
        yield api
        await whatsapp_call_meta.aclose()


def a_call(number: str = "+14085551234", **kw: Any) -> Call:
    return Call(to=parse_phone(number), provider="meta", id=OUR_ID, **kw)


PERMISSION_SPEC = {
    "messaging_product": "whatsapp",
    "permission": {"status": "temporary", "expiration_time": 1745343479},
    "actions": [
        {
            "action_name": "send_call_permission_request",
            "can_perform_action": True,
            "limits": [
                {"time_period": "PT24H", "max_allowed": 1, "current_usage": 0},
                {"time_period": "P7D", "max_allowed": 2, "current_usage": 1},
            ],
        },
        {
            "action_name": "start_call",
            "can_perform_action": False,
            "limits": [
                {
                    "time_period": "PT24H",
                    "max_allowed": 5,
                    "current_usage": 5,
                    "limit_expiration_time": 1745622600,
                }
            ],
        },
    ],
}


async def test_check_permission_reads_top_level_permission_and_actions(graph):
    graph.script(PERMISSIONS, (200, PERMISSION_SPEC))
    state = await plugin_mod.call_first(
        "check_permission", call=a_call(), settings=graph.settings()
    )
    assert state.status == PermissionStatus.GRANTED
    assert state.permanent is False
    assert state.expires_at == datetime.fromtimestamp(1745343479, UTC)
    assert (state.can_call, state.can_request) == (False, True)
    assert state.next_call_at == datetime.fromtimestamp(1745622600, UTC)
    assert "5 connected calls" in state.detail or "5 per 24 h" in state.detail
    (seen,) = graph.requests(PERMISSIONS)
    assert seen.query == {"user_wa_id": "14085551234"}
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in json.dumps(seen.query)


async def test_check_permission_no_permission_and_request_limit(graph):
    graph.script(
        PERMISSIONS,
        (
            200,
            {
                "permission": {"status": "no_permission"},
                "actions": [
                    {
                        "action_name": "send_call_permission_request",
                        "can_perform_action": False,
                        "limits": [
                            {
                                "time_period": "P7D",
                                "max_allowed": 2,
                                "current_usage": 2,
                                "limit_expiration_time": "1745622600",
                            }
                        ],
                    },
                    {"action_name": "start_call", "can_perform_action": False},
                ],
            },
        ),
        (200, {"permission": {"status": "PERMANENT"}}),
    )
    denied = await meta_client.check_permission(a_call(), graph.settings())
    assert denied.status == PermissionStatus.NOT_GRANTED
    assert (denied.can_call, denied.can_request) == (False, False)
    assert denied.next_request_at == datetime.fromtimestamp(1745622600, UTC)
    assert "2 per 7 days" in denied.detail
    permanent = await meta_client.check_permission(a_call(), graph.settings())
    assert (permanent.status, permanent.permanent, permanent.can_call) == (
        PermissionStatus.GRANTED,
        True,
        True,
    )
    assert permanent.expires_at is None


async def test_permission_checks_are_limited_to_5_per_second(graph):
    graph.defaults[PERMISSIONS] = (200, {"permission": {"status": "no_permission"}})
    settings = graph.settings()
    start = time.monotonic()
    await asyncio.gather(*(meta_client.check_permission(a_call(), settings) for _ in range(7)))
    assert time.monotonic() - start >= 0.95  # the 6th waited for the 1st to leave the window
    times = sorted(s.at for s in graph.requests(PERMISSIONS))
    assert len(times) == 7
    for i in range(len(times) - 5):  # never 6 at once (generous for network jitter under load)
        assert times[i + 5] - times[i] >= 0.5


async def test_rate_limiter_reserves_slots_without_overshoot():
    limiter = RateLimiter(3, 0.3)
    start = time.monotonic()
    await asyncio.gather(*(limiter.acquire() for _ in range(7)))
    assert time.monotonic() - start >= 0.55  # 3 now, 3 after 0.3 s, 1 after 0.6 s


async def test_429_with_retry_after_is_retried_after_that_delay(graph):
    graph.script(
        PERMISSIONS,
        (
            429,
            graph_error(613, "(#613) Calls to this api have exceeded the rate limit."),
            {"Retry-After": "1"},
        ),
        (200, PERMISSION_SPEC),
    )
    start = time.monotonic()
    state = await meta_client.check_permission(a_call(), graph.settings())
    assert state.status == PermissionStatus.GRANTED
    times = [s.at for s in graph.requests(PERMISSIONS)]
    assert len(times) == 2 and times[1] - times[0] >= 0.95
    assert time.monotonic() - start < 4


async def test_503_then_200_is_retried_even_for_a_post(graph):
    graph.script(
        CALLS, (503, b"<html>Service Unavailable</html>"), (200, {"calls": [{"id": WACID}]})
    )
    assert await meta_client.send_offer(a_call(), "v=0\r\n", graph.settings()) == WACID
    assert len(graph.requests(CALLS)) == 2


async def test_5xx_forever_gives_up_within_the_budget(graph):
    graph.defaults[PERMISSIONS] = (500, graph_error(138004, "Connection error"))
    start = time.monotonic()
    with pytest.raises(ProviderError) as err:
        await meta_client.check_permission(a_call(), graph.settings(metaRetryBudgetSeconds=1.5))
    assert time.monotonic() - start < 3.5
    assert err.value.code == 138004 and err.value.retryable
    assert "gave up after" in err.value.message
    assert len(graph.requests(PERMISSIONS)) >= 2


async def test_read_timeout_is_retried_for_a_lookup(graph):
    async def slow():
        await asyncio.sleep(1.0)
        return 200, PERMISSION_SPEC

    graph.script(PERMISSIONS, slow, (200, PERMISSION_SPEC))
    state = await meta_client.check_permission(a_call(), graph.settings(metaHttpTimeoutSeconds=0.3))
    assert state.status == PermissionStatus.GRANTED
    assert len(graph.requests(PERMISSIONS)) == 2


async def test_read_timeout_on_placing_a_call_is_not_repeated(graph):
    async def slow():
        await asyncio.sleep(1.0)
        return 200, {"calls": [{"id": WACID}]}

    graph.script(CALLS, slow, (200, {"calls": [{"id": "wacid.second"}]}))
    with pytest.raises(ProviderError, match="timed out") as err:
        await meta_client.send_offer(
            a_call(), "v=0\r\n", graph.settings(metaHttpTimeoutSeconds=0.3)
        )
    assert "may have been carried out" in err.value.hint
    assert len(graph.requests(CALLS)) == 1  # never rings the user twice


async def test_connection_refused_is_retried_then_reported(meta):
    settings = meta(metaGraphBaseUrl="http://127.0.0.1:9", metaRetryBudgetSeconds=1)
    start = time.monotonic()
    with pytest.raises(ProviderError, match="no connection to 127.0.0.1") as err:
        await meta_client.check_permission(a_call(), settings)
    assert time.monotonic() - start < 3
    assert err.value.retryable and "gave up after" in err.value.message
    assert TOKEN not in str(err.value)


async def test_malformed_json_answer_is_a_clear_error(graph):
    graph.script(PERMISSIONS, (200, b"{oops"))
    with pytest.raises(ProviderError, match="not a JSON object"):
        await meta_client.check_permission(a_call(), graph.settings())
    graph.script(CALLS, (200, {"calls": []}))
    with pytest.raises(ProviderError, match=r"calls\[0\].id"):
        await meta_client.send_offer(a_call(), "v=0\r\n", graph.settings())


# The spec's HTTP status for each code (§1.11); codes from a 429/5xx are retried first.
ERROR_STATUS = {
    100: 400,
    10: 403,
    190: 401,
    613: 429,
    131009: 400,
    131030: 400,
    131047: 400,
    131055: 400,
    138000: 401,
    138001: 400,
    138002: 429,
    138003: 400,
    138004: 500,
    138005: 429,
    138006: 401,
    138007: 500,
    138009: 400,
    138012: 400,
    138013: 400,
    138014: 400,
    138015: 400,
    138017: 400,
    138018: 400,
}


async def test_every_mapped_graph_error_code(graph):
    settings = graph.settings(metaRetryBudgetSeconds=0.2)
    for code in sorted(meta_client.HINTS):  # one server for all codes keeps this fast
        status = ERROR_STATUS[code]
        details = "SDP validation: no a=fingerprint" if code == 100 else f"details for {code}"
        graph.defaults[CALLS] = (status, graph_error(code, f"(#{code}) message {code}", details))
        graph.seen.clear()
        with pytest.raises(ProviderError) as err:
            await meta_client.send_offer(a_call(), "v=0\r\n", settings)
        exc = err.value
        assert (exc.code, exc.http_status, exc.provider) == (code, status, "meta"), code
        assert exc.hint == meta_client.HINTS[code], code
        assert exc.details == details and details in exc.message, code
        assert isinstance(exc, CallPermissionError) == (code == 138006), code
        assert exc.retryable == (status >= 500 or status == 429 or code == 613), code
        assert TOKEN not in str(exc)
        if status < 500 and status != 429:
            assert len(graph.requests(CALLS)) == 1, code  # 4xx are never retried


async def test_unknown_code_points_at_meta_docs_and_non_envelope_errors_are_clear(graph):
    graph.script(
        CALLS, (400, graph_error(999999, "Something new")), (403, b"<html>Forbidden</html>")
    )
    with pytest.raises(ProviderError, match="Something new") as err:
        await meta_client.send_offer(a_call(), "v=0\r\n", graph.settings())
    assert "999999" in err.value.hint
    with pytest.raises(ProviderError, match="HTTP 403") as err:
        await meta_client.send_offer(a_call(), "v=0\r\n", graph.settings())
    assert "metaAccessToken" in err.value.hint


async def test_request_permission_sends_the_interactive_message(graph):
    graph.script(
        MESSAGES,
        (
            200,
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": "14085551234", "wa_id": "14085551234"}],
                "messages": [{"id": "wamid.gBGGFlaCmZ9plHrf2Mh-o"}],
            },
        ),
    )
    settings = graph.settings(metaPermissionRequestText="May we call you about order 12853?")
    result = await plugin_mod.call_first("request_permission", call=a_call(), settings=settings)
    assert result.outcome == PermissionRequestOutcome.SENT
    assert result.message_id == "wamid.gBGGFlaCmZ9plHrf2Mh-o"
    (seen,) = graph.requests(MESSAGES)
    assert seen.body == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "14085551234",
        "type": "interactive",
        "interactive": {
            "type": "call_permission_request",
            "action": {"name": "call_permission_request"},
            "body": {"text": "May we call you about order 12853?"},
        },
    }


async def test_request_permission_uses_the_template_when_configured(graph):
    graph.script(MESSAGES, (200, {"messages": [{"id": "wamid.T"}]}))
    settings = graph.settings(
        metaPermissionTemplate="call_perm", metaPermissionTemplateLanguage="de"
    )
    result = await meta_client.request_permission(a_call(), settings)
    assert result.message_id == "wamid.T"
    body = graph.requests(MESSAGES)[0].body
    assert body["type"] == "template"
    assert body["template"] == {"name": "call_perm", "language": {"code": "de"}}
    assert "interactive" not in body


async def test_request_permission_limit_reached_with_time_in_details(graph):
    graph.script(
        MESSAGES,
        (
            400,
            graph_error(
                138009,
                "Call permission request limit reached",
                "Next request allowed after 1745622600",
            ),
        ),
    )
    result = await meta_client.request_permission(a_call(), graph.settings())
    assert result.outcome == PermissionRequestOutcome.LIMIT_REACHED
    assert result.retry_at == datetime.fromtimestamp(1745622600, UTC)
    assert "2025-04-25" in result.detail


async def test_request_permission_limit_reached_asks_meta_when_it_resets(graph):
    graph.script(MESSAGES, (400, graph_error(138009, "Call permission request limit reached")))
    graph.script(
        PERMISSIONS,
        (
            200,
            {
                "permission": {"status": "no_permission"},
                "actions": [
                    {
                        "action_name": "send_call_permission_request",
                        "can_perform_action": False,
                        "limits": [
                            {
                                "time_period": "PT24H",
                                "max_allowed": 1,
                                "current_usage": 1,
                                "limit_expiration_time": 1745600000,
                            }
                        ],
                    }
                ],
            },
        ),
    )
    result = await meta_client.request_permission(a_call(), graph.settings())
    assert result.outcome == PermissionRequestOutcome.LIMIT_REACHED
    assert result.retry_at == datetime.fromtimestamp(1745600000, UTC)


async def test_request_permission_already_permanent(graph):
    graph.script(MESSAGES, (400, graph_error(138017, "Permanent permission exists")))
    result = await meta_client.request_permission(a_call(), graph.settings())
    assert result.outcome == PermissionRequestOutcome.ALREADY_PERMANENT


async def test_send_offer_and_terminate_bodies(graph):
    graph.script(
        CALLS,
        (200, {"messaging_product": "whatsapp", "calls": [{"id": WACID}]}),
        (200, {"messaging_product": "whatsapp", "success": True}),
    )
    sdp = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"
    settings = graph.settings()
    call = a_call()
    call.provider_call_id = await plugin_mod.call_first(
        "send_offer", call=call, sdp=sdp, settings=settings
    )
    assert call.provider_call_id == WACID
    assert await plugin_mod.call_first("terminate_call", call=call, settings=settings) is True
    connect, terminate = graph.requests(CALLS)
    assert connect.body == {
        "messaging_product": "whatsapp",
        "to": "14085551234",
        "action": "connect",
        "session": {"sdp_type": "offer", "sdp": sdp},
        "biz_opaque_callback_data": OUR_ID,
    }
    assert terminate.body == {
        "messaging_product": "whatsapp",
        "call_id": WACID,
        "action": "terminate",
    }


async def test_terminate_without_a_provider_call_id_does_nothing(graph):
    assert await meta_client.terminate_call(a_call(), graph.settings()) is False
    assert graph.seen == []


async def test_hooks_answer_only_for_provider_meta(graph):
    settings = graph.settings(provider="wati")
    for hook, extra in (
        ("check_permission", {}),
        ("request_permission", {}),
        ("send_offer", {"sdp": "v=0"}),
        ("terminate_call", {}),
    ):
        assert await plugin_mod.call_first(hook, call=a_call(), settings=settings, **extra) is None
    assert graph.seen == []


def test_retry_backoff_is_full_jitter_and_leaves_the_global_random_alone():
    import random

    state = random.getstate()
    for attempt, ceiling in ((1, 0.25), (2, 0.5), (4, 2.0), (6, 8.0), (12, 8.0)):
        delays = [http_mod._backoff(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # spread over the range, not a fixed step
    assert random.getstate() == state  # hypothesis and the app keep their random state


def test_retry_after_accepts_seconds_and_http_dates():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("nonsense") is None
    assert parse_retry_after(None) is None


def test_pooled_client_is_closed_when_its_event_loop_ends():
    pool = ClientPool()

    async def use() -> httpx.AsyncClient:
        first = await pool.get()
        assert await pool.get() is first  # one client per loop
        return first

    client = asyncio.run(use())
    assert client.is_closed
    assert asyncio.run(use()) is not client  # a new loop gets a new client


# ---------------------------------------------------------------------------- doctor


async def test_doctor_all_good_against_the_graph_api(graph):
    graph.script(
        f"GET /v23.0/{PNID}",
        (200, {"id": PNID, "display_phone_number": "+1 317-555-1399", "verified_name": "Acme"}),
    )
    graph.script(f"GET /v23.0/{PNID}/settings", (200, {"calling": {"status": "ENABLED"}}))
    settings = graph.settings(webhookUrl="https://calls.example.com/webhooks/meta")
    results = dict(await plugin_mod.call_all("doctor_checks", settings=settings))["meta"]
    by_name = {c.name: c for c in results}
    assert {n: c.status for n, c in by_name.items()} == {
        "access token": CheckStatus.OK,
        "calling": CheckStatus.OK,
        "webhook security": CheckStatus.OK,
        "webhook url": CheckStatus.OK,
    }
    assert "Acme" in by_name["access token"].message
    assert all(TOKEN not in c.message for c in results)


async def test_doctor_reports_bad_token_disabled_calling_and_insecure_webhooks(graph):
    graph.script(f"GET /v23.0/{PNID}", (401, graph_error(190, "Error validating access token")))
    results = await whatsapp_call_meta.doctor_checks(
        graph.settings(metaAppSecret=None, webhookUrl="http://127.0.0.1:8787/webhooks/meta")
    )
    by_name = {c.name: c for c in results}
    assert by_name["access token"].status == CheckStatus.FAIL
    assert "system-user token" in by_name["access token"].hint
    assert by_name["webhook security"].status == CheckStatus.FAIL
    assert "metaAppSecret" in by_name["webhook security"].message
    # The Graph base URL is a loopback simulator here, so a local webhook URL only warns.
    assert by_name["webhook url"].status == CheckStatus.WARN

    graph.script(f"GET /v23.0/{PNID}", (200, {"id": PNID}))
    graph.script(f"GET /v23.0/{PNID}/settings", (200, {"calling": {"status": "DISABLED"}}))
    by_name = {c.name: c for c in await whatsapp_call_meta.doctor_checks(graph.settings())}
    assert by_name["calling"].status == CheckStatus.FAIL
    assert by_name["calling"].hint == meta_client.HINTS[138000]


def test_webhook_url_must_be_public_https_for_real_meta(meta):
    from whatsapp_call_meta.doctor import webhook_url_check

    def status(url):
        return webhook_url_check(meta(webhookUrl=url)).status

    assert status("https://calls.example.com/webhooks/meta") == CheckStatus.OK
    assert status("http://calls.example.com/webhooks/meta") == CheckStatus.FAIL
    assert status("https://192.168.1.5/webhooks/meta") == CheckStatus.FAIL
    assert status("https://localhost/webhooks/meta") == CheckStatus.FAIL
    assert webhook_url_check(meta()).status == CheckStatus.WARN


# ---------------------------------------------------------------------------- the simulator
# Meta's side is engineer A's WhatsApp simulator; our side is the plugin, plus a webhook
# endpoint that runs our parse_webhook on the raw request, as the product's server does.

# Meta's reference offer (spec §2), WhatsApp-ready: sha-256 only, setup:actpass, CRLF.
REFERENCE_OFFER = (
    "\r\n".join(
        [
            "v=0",
            "o=- 3626166318745852955 2 IN IP4 127.0.0.1",
            "s=-",
            "t=0 0",
            "a=group:BUNDLE 0",
            "m=audio 9 UDP/TLS/RTP/SAVPF 111 126",
            "c=IN IP4 0.0.0.0",
            "a=rtcp:9 IN IP4 0.0.0.0",
            "a=ice-ufrag:4g1c",
            "a=ice-pwd:qY/Bb+jQzg5ICn6X4fhJQetk",
            "a=fingerprint:sha-256 35:47:24:24:9F:93:C4:3E:DB:37:7F:BB:ED:F8:20:B5:AD:AC:DC:35:"
            "C2:7D:67:EE:6C:35:54:DF:A6:00:5C:4A",
            "a=setup:actpass",
            "a=mid:0",
            "a=sendrecv",
            "a=rtcp-mux",
            "a=rtpmap:111 opus/48000/2",
            "a=fmtp:111 minptime=10;useinbandfec=1",
            "a=rtpmap:126 telephone-event/8000",
        ]
    )
    + "\r\n"
)


class ParsingReceiver:
    """A real webhook endpoint (`/webhooks/<provider>[/sub-path]`) that hands the raw request
    to the plugins' parse_webhook and records the events, or the refusal."""

    def __init__(self, provider: str):
        self.provider = provider
        self.settings: Any = None
        self.events: list[Any] = []
        self.rejections: list[WebhookRejected] = []
        root = f"/webhooks/{provider}"
        self.app = Starlette(
            routes=[
                Route(root, self.handle, methods=["GET", "POST"]),
                Route(root + "/{sub:path}", self.handle, methods=["GET", "POST"]),
            ]
        )

    async def handle(self, request: Request) -> Response:
        sub = request.path_params.get("sub")
        webhook = WebhookRequest(
            request.method,
            f"/{sub}" if sub else "",
            dict(request.query_params),
            {k.lower(): v for k, v in request.headers.items()},
            await request.body(),
        )
        try:
            result = plugin_mod.call_first_sync(
                "parse_webhook", provider=self.provider, request=webhook, settings=self.settings
            )
        except WebhookRejected as exc:
            self.rejections.append(exc)
            return PlainTextResponse(exc.message, exc.status_code)
        self.events.extend(result.events)
        return Response(result.body, result.status_code, media_type=result.content_type)

    def of(self, kind: CallEventType, **match: Any) -> list[Any]:
        return [
            e
            for e in self.events
            if e.type == kind and all(getattr(e, k) == v for k, v in match.items())
        ]

    async def wait_for(self, kind: CallEventType, count: int = 1, timeout: float = 5.0, **match):
        async with asyncio.timeout(timeout):
            while len(found := self.of(kind, **match)) < count:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        return found


@pytest.fixture
async def sim(meta):
    receiver = ParsingReceiver("meta")
    async with serve_asgi(receiver.app) as receiver_url:
        simulator = WhatsAppSimulator(
            SimConfig(
                phone_number_id=PNID,
                meta_access_token=TOKEN,
                meta_app_secret=APP_SECRET,
                meta_verify_token=VERIFY_TOKEN,
                meta_webhook_url=receiver_url + "/webhooks/meta",
                display_phone_number=BUSINESS,
                default_scenario=Scenario(media=False, answer_delay_s=0.05),
                webhook_retry_delays_s=(0.05,),
            )
        )
        base = await simulator.start()
        try:
            settings = meta(metaGraphBaseUrl=base)
            receiver.settings = settings
            yield SimpleNamespace(sim=simulator, receiver=receiver, settings=settings)
        finally:
            await simulator.stop()
            await whatsapp_call_meta.aclose()


def scenario(**kw: Any) -> Scenario:
    return Scenario(**{"media": False, "answer_delay_s": 0.05, **kw})


async def test_sim_permission_request_and_reply(sim):
    call = a_call("+14085551234")
    sim.sim.set_scenario(
        call.to.wa_id, scenario(permission="grant_on_request", permission_reply_delay_s=0.05)
    )
    before = await plugin_mod.call_first("check_permission", call=call, settings=sim.settings)
    assert before.status == PermissionStatus.NOT_GRANTED
    assert (before.can_request, before.can_call) == (True, False)
    sent = await plugin_mod.call_first("request_permission", call=call, settings=sim.settings)
    assert sent.outcome == PermissionRequestOutcome.SENT and sent.message_id.startswith("wamid.")
    (reply,) = await sim.receiver.wait_for(CallEventType.PERMISSION_REPLY)
    assert (reply.wa_id, reply.permission_granted, reply.permission_permanent) == (
        call.to.wa_id,
        True,
        False,
    )
    assert reply.permission_expires_at is not None
    after = await meta_client.check_permission(call, sim.settings)
    assert after.status == PermissionStatus.GRANTED and after.can_call
    assert after.expires_at is not None


async def test_sim_request_limit_and_permanent_permission(sim):
    denied, permanent = a_call("+14085551235"), a_call("+14085551236")
    sim.sim.set_scenario(
        denied.to.wa_id, scenario(permission="deny_on_request", permission_reply_delay_s=0.05)
    )
    sim.sim.set_scenario(permanent.to.wa_id, scenario(permission="granted", permanent=True))
    assert (await meta_client.request_permission(denied, sim.settings)).outcome == "sent"
    (reply,) = await sim.receiver.wait_for(CallEventType.PERMISSION_REPLY, wa_id=denied.to.wa_id)
    assert reply.permission_granted is False
    again = await meta_client.request_permission(denied, sim.settings)
    assert again.outcome == PermissionRequestOutcome.LIMIT_REACHED
    assert again.retry_at is not None and again.retry_at > datetime.now(UTC)
    state = await meta_client.check_permission(denied, sim.settings)
    assert not state.can_request and state.next_request_at is not None

    result = await meta_client.request_permission(permanent, sim.settings)
    assert result.outcome == PermissionRequestOutcome.ALREADY_PERMANENT
    state = await meta_client.check_permission(permanent, sim.settings)
    assert (state.status, state.permanent, state.expires_at) == (
        PermissionStatus.GRANTED,
        True,
        None,
    )


async def test_sim_call_accepted_then_terminated_by_us(sim):
    call = a_call("+14085551234")
    sim.sim.set_scenario(call.to.wa_id, scenario())
    call.provider_call_id = await plugin_mod.call_first(
        "send_offer", call=call, sdp=REFERENCE_OFFER, settings=sim.settings
    )
    assert call.provider_call_id.startswith("wacid.")
    ids = {"provider_call_id": call.provider_call_id, "call_id": OUR_ID}
    (answer,) = await sim.receiver.wait_for(CallEventType.ANSWER, **ids)
    assert "a=setup:active" in answer.sdp and answer.wa_id == call.to.wa_id
    await sim.receiver.wait_for(CallEventType.RINGING, **ids)
    await sim.receiver.wait_for(CallEventType.ACCEPTED, **ids)
    assert await plugin_mod.call_first("terminate_call", call=call, settings=sim.settings) is True
    (ended,) = await sim.receiver.wait_for(CallEventType.TERMINATED, **ids)
    assert ended.status == "COMPLETED" and ended.duration_seconds is not None
    assert sim.sim.calls[call.provider_call_id].terminated_by == "business"
    assert sim.receiver.rejections == []


async def test_sim_call_rejected_and_user_hangup(sim):
    rejecting, hanging_up = a_call("+14085551235"), a_call("+14085551236")
    sim.sim.set_scenario(rejecting.to.wa_id, scenario(answer="reject"))
    sim.sim.set_scenario(hanging_up.to.wa_id, scenario(hangup_after_s=0.1))
    first = await meta_client.send_offer(rejecting, REFERENCE_OFFER, sim.settings)
    second = await meta_client.send_offer(hanging_up, REFERENCE_OFFER, sim.settings)
    await sim.receiver.wait_for(CallEventType.REJECTED, provider_call_id=first)
    (failed,) = await sim.receiver.wait_for(CallEventType.TERMINATED, provider_call_id=first)
    assert failed.status == "FAILED" and failed.duration_seconds is None
    (done,) = await sim.receiver.wait_for(CallEventType.TERMINATED, provider_call_id=second)
    assert done.status == "COMPLETED"


async def test_sim_call_errors_are_mapped(sim):
    none, busy = a_call("+14085551235"), a_call("+14085551236")
    sim.sim.set_scenario(none.to.wa_id, scenario(permission="none"))
    sim.sim.set_scenario(busy.to.wa_id, scenario(answer="no_answer", ring_timeout_s=30))
    with pytest.raises(CallPermissionError) as err:
        await meta_client.send_offer(none, REFERENCE_OFFER, sim.settings)
    assert err.value.code == 138006 and "permission request" in err.value.hint
    no_fingerprint = "\r\n".join(
        line for line in REFERENCE_OFFER.split("\r\n") if not line.startswith("a=fingerprint")
    )
    with pytest.raises(ProviderError) as err:
        await meta_client.send_offer(busy, no_fingerprint, sim.settings)
    assert err.value.code == 100 and "fingerprint" in err.value.details
    await meta_client.send_offer(busy, REFERENCE_OFFER, sim.settings)
    with pytest.raises(ProviderError) as err:
        await meta_client.send_offer(busy, REFERENCE_OFFER, sim.settings)
    assert err.value.code == 138003 and "in progress" in err.value.hint
    assert TOKEN not in str(err.value)


async def test_sim_real_aiortc_offer_is_accepted(sim):
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("audio", direction="sendrecv")
        with host_addresses(["127.0.0.1"]):
            async with asyncio.timeout(5):
                await pc.setLocalDescription(await pc.createOffer())
        lines = pc.localDescription.sdp.replace("\r\n", "\n").split("\n")
        kept = [
            line
            for line in lines
            if line and not (line.startswith("a=fingerprint:") and "sha-256" not in line)
        ]
        kept = ["a=setup:actpass" if line.startswith("a=setup:") else line for line in kept]
        offer = "\r\n".join(kept) + "\r\n"
        assert "127.0.0.1" in offer
        call = a_call("+14085551237")
        sim.sim.set_scenario(call.to.wa_id, scenario())
        wacid = await meta_client.send_offer(call, offer, sim.settings)
        (answer,) = await sim.receiver.wait_for(CallEventType.ANSWER, provider_call_id=wacid)
        assert answer.call_id == OUR_ID
        assert sim.sim.calls[wacid].offer_sdp == offer
    finally:
        await pc.close()


async def test_sim_duplicate_and_bad_signature_faults(sim):
    call = a_call("+14085551234")
    sim.sim.set_scenario(call.to.wa_id, scenario(hangup_after_s=0.05))
    sim.sim.set_faults(duplicate_delivery=True)
    wacid = await meta_client.send_offer(call, REFERENCE_OFFER, sim.settings)
    await sim.receiver.wait_for(CallEventType.TERMINATED, count=2, provider_call_id=wacid)
    events = [e for e in sim.receiver.events if e.provider_call_id == wacid]
    keys = [e.dedupe_key for e in events]
    assert len(keys) == 8 and len(set(keys)) == 4  # 4 events, each delivered twice

    sim.sim.set_faults(duplicate_delivery=False, bad_signature=True)
    other = a_call("+14085551235")
    sim.sim.set_scenario(other.to.wa_id, scenario(hangup_after_s=0.05))
    wacid = await meta_client.send_offer(other, REFERENCE_OFFER, sim.settings)
    async with asyncio.timeout(5):
        while not sim.sim.calls[wacid].ended:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await sim.sim.drain_webhooks(timeout=5)
    assert [e for e in sim.receiver.events if e.provider_call_id == wacid] == []
    assert sim.receiver.rejections and all(r.status_code == 403 for r in sim.receiver.rejections)


async def test_sim_429_and_503_are_retried(sim):
    sim.sim.set_faults(api_429_count=1, api_503_count=1, retry_after_s=1)
    start = time.monotonic()
    state = await meta_client.check_permission(a_call(), sim.settings)
    assert state.status == PermissionStatus.GRANTED  # the default scenario: granted
    assert time.monotonic() - start >= 0.9  # the Retry-After was honoured


async def test_sim_webhook_verification_handshake_goes_through_our_parser(sim):
    challenge = await sim.sim.verify_meta_webhook()
    assert challenge
    assert sim.receiver.rejections == []


async def test_sim_doctor(sim):
    checks = {c.name: c for c in await whatsapp_call_meta.doctor_checks(sim.settings)}
    assert checks["access token"].status == CheckStatus.OK
    assert "Sim Business" in checks["access token"].message
    assert checks["calling"].status == CheckStatus.OK


async def test_sim_closed_service_window_needs_the_template(sim):
    call = a_call("+14085551238")
    sim.sim.set_scenario(
        call.to.wa_id, scenario(permission="ignore_request", service_window_open=False)
    )
    with pytest.raises(ProviderError) as err:
        await meta_client.request_permission(call, sim.settings)
    assert err.value.code == 131047 and "metaPermissionTemplate" in err.value.hint
    with_template = sim.settings.model_copy(
        update={"meta_permission_template": "call_permission_request"}
    )
    result = await meta_client.request_permission(call, with_template)
    assert result.outcome == PermissionRequestOutcome.SENT
