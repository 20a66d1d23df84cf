"""The simulated Meta Graph Calling API: every route, validation error, limit, webhook and fault.

Real HTTP both ways: httpx against the started simulator, and the simulator's webhooks into a
small recording Starlette app that checks X-Hub-Signature-256 on the raw bytes. These calls
are signalling-only (`Scenario(media=False)`); tests/test_sim_whatsapp_call.py carries media.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from whatsapp_call.errors import WebhookRejected
from whatsapp_call.serving import serve_asgi
from whatsapp_call_sim.whatsapp import (
    Limits,
    Scenario,
    SimConfig,
    WhatsAppSimulator,
    check_signature,
    sdp_problem,
    verify_webhook,
)

APP_SECRET = "test-app-secret"
VERIFY_TOKEN = "test-verify-token"
TOKEN = "test-meta-token"
PNID = "436666719526789"
BIZ = "13175551399"
USER = "14085551234"

# Meta's reference offer (spec §2), already WhatsApp-ready: sha-256 only, setup:actpass, CRLF.
OFFER = (
    "\r\n".join(
        [
            "v=0",
            "o=- 3626166318745852955 2 IN IP4 127.0.0.1",
            "s=-",
            "t=0 0",
            "a=group:BUNDLE 0",
            "a=msid-semantic: WMS d8b26053",
            "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 110 126",
            "c=IN IP4 0.0.0.0",
            "a=rtcp:9 IN IP4 0.0.0.0",
            "a=ice-ufrag:4g1c",
            "a=ice-pwd:qY/Bb+jQzg5ICn6X4fhJQetk",
            "a=fingerprint:sha-256 35:47:24:24:9F:93:C4:3E:DB:37:7F:BB:ED:F8:20:B5:AD:AC:DC:35:C2:7D:67:EE:6C:35:54:DF:A6:00:5C:4A",
            "a=setup:actpass",
            "a=mid:0",
            "a=sendrecv",
            "a=rtcp-mux",
            "a=rtpmap:111 opus/48000/2",
            "a=fmtp:111 minptime=10;useinbandfec=1",
            "a=rtpmap:63 red/48000/2",
            "a=rtpmap:9 G722/8000",
            "a=rtpmap:0 PCMU/8000",
            "a=rtpmap:8 PCMA/8000",
            "a=rtpmap:110 telephone-event/48000",
            "a=rtpmap:126 telephone-event/8000",
        ]
    )
    + "\r\n"
)


class Receiver:
    """A webhook endpoint that records every request and checks signatures like a product."""

    def __init__(
        self,
        secret: str | None = APP_SECRET,
        verify_token: str = VERIFY_TOKEN,
        wati_secret: str | None = None,
    ):
        self.secret = secret  # for Meta's paths
        self.wati_secret = wati_secret  # for paths under /webhooks/wati (None: unsigned)
        self.verify_token = verify_token
        self.requests: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self.url = ""
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST"])])

    async def _handle(self, request: Request) -> Response:
        if request.method == "GET":
            q = request.query_params
            if q.get("hub.mode") == "subscribe" and q.get("hub.verify_token") == self.verify_token:
                return PlainTextResponse(q.get("hub.challenge", ""))
            return PlainTextResponse("forbidden", status_code=403)
        raw = await request.body()
        signature = request.headers.get("x-hub-signature-256")
        secret = self.wati_secret if request.url.path.startswith("/webhooks/wati") else self.secret
        valid = check_signature(raw, signature, secret) if secret else None
        self.requests.append(
            {
                "path": request.url.path,
                "raw": raw,
                "json": json.loads(raw),
                "signature": signature,
                "valid": valid,
                "at": time.monotonic(),
            }
        )
        self._arrived.set()
        if secret and not valid:
            return PlainTextResponse("bad signature", status_code=403)
        return PlainTextResponse("ok")

    def matching(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        return [r for r in self.requests if predicate(r)]

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], count: int = 1, timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while True:
                self._arrived.clear()
                found = self.matching(predicate)
                if len(found) >= count:
                    return found
                await self._arrived.wait()


def meta_value(record: dict[str, Any]) -> dict[str, Any]:
    body = record["json"]
    return body["entry"][0]["changes"][0]["value"]


def meta_field(record: dict[str, Any]) -> str:
    return record["json"]["entry"][0]["changes"][0]["field"]


def call_event(event: str, call_id: str | None = None) -> Callable[[dict[str, Any]], bool]:
    def match(r: dict[str, Any]) -> bool:
        if "entry" not in r["json"] or meta_field(r) != "calls":
            return False
        calls = meta_value(r).get("calls", [])
        return bool(calls) and calls[0]["event"] == event and call_id in (None, calls[0]["id"])

    return match


def call_status(status: str, call_id: str | None = None) -> Callable[[dict[str, Any]], bool]:
    def match(r: dict[str, Any]) -> bool:
        if "entry" not in r["json"] or meta_field(r) != "calls":
            return False
        statuses = meta_value(r).get("statuses", [])
        return (
            bool(statuses)
            and statuses[0]["status"] == status
            and call_id in (None, statuses[0]["id"])
        )

    return match


def messages_field(r: dict[str, Any]) -> bool:
    return "entry" in r["json"] and meta_field(r) == "messages"


FAST = Limits(connect_delay_s=0.01, ringing_delay_s=0.01, ring_timeout_s=0.3)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    async with serve_asgi(rec.app) as url:
        rec.url = url
        yield rec


def make_config(receiver: Receiver, **overrides: Any) -> SimConfig:
    options: dict[str, Any] = {
        "phone_number_id": PNID,
        "display_phone_number": BIZ,
        "meta_access_token": TOKEN,
        "meta_app_secret": APP_SECRET,
        "meta_verify_token": VERIFY_TOKEN,
        "meta_webhook_url": receiver.url + "/webhooks/meta",
        "default_scenario": Scenario(media=False, answer_delay_s=0.05),
        "limits": FAST,
        "webhook_retry_delays_s": (0.05,),
    }
    options.update(overrides)
    return SimConfig(**options)


@pytest.fixture
async def sim(receiver: Receiver) -> AsyncIterator[WhatsAppSimulator]:
    simulator = WhatsAppSimulator(make_config(receiver))
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def graph(sim: WhatsAppSimulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"{sim.url}/v23.0/{PNID}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    ) as client:
        yield client


def connect_body(to: str = USER, sdp: str = OFFER, **extra: Any) -> dict[str, Any]:
    body = {
        "messaging_product": "whatsapp",
        "to": to,
        "action": "connect",
        "session": {"sdp_type": "offer", "sdp": sdp},
    }
    body.update(extra)
    return body


def assert_graph_error(
    response: httpx.Response, code: int, http_status: int, details: str | None = None
) -> dict:
    assert response.status_code == http_status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["type"] in ("OAuthException", "GraphMethodException")
    assert error["fbtrace_id"]
    assert error["message"]
    if details is not None:
        assert error["error_data"]["messaging_product"] == "whatsapp"
        assert details.lower() in error["error_data"]["details"].lower(), error["error_data"][
            "details"
        ]
        assert error["message"].startswith(f"(#{code}) ")
    return error


# -- auth, versions, the phone-number object --------------------------------------------------


async def test_auth_is_required_and_checked(sim: WhatsAppSimulator):
    async with httpx.AsyncClient(base_url=sim.url, timeout=5) as client:
        missing = await client.get(f"/v23.0/{PNID}")
        assert_graph_error(missing, 2500, 400)
        wrong = await client.get(f"/v23.0/{PNID}", headers={"Authorization": "Bearer nope"})
        assert_graph_error(wrong, 190, 401)
        assert "nope" not in wrong.text
        by_query = await client.get(f"/v23.0/{PNID}", params={"access_token": TOKEN})
        assert by_query.status_code == 200


async def test_any_version_prefix_and_phone_number_object(
    graph: httpx.AsyncClient, sim: WhatsAppSimulator
):
    for version in ("v14.0", "v24.0", "v99.9"):
        response = await graph.get(f"{sim.url}/{version}/{PNID}")
        assert response.status_code == 200
        obj = response.json()
        assert obj["id"] == PNID
        assert obj["display_phone_number"] == "+1 317-555-1399"
        assert obj["platform_type"] == "CLOUD_API"
        assert obj["code_verification_status"] == "VERIFIED"
    only = await graph.get(
        f"{sim.url}/v23.0/{PNID}", params={"fields": "verified_name,quality_rating"}
    )
    assert only.json() == {"verified_name": "Sim Business", "quality_rating": "GREEN", "id": PNID}
    bad_version = await graph.get(f"{sim.url}/latest/{PNID}")
    assert_graph_error(bad_version, 2500, 400)
    other_number = await graph.get(f"{sim.url}/v23.0/999")
    error = assert_graph_error(other_number, 100, 400)
    assert error["type"] == "GraphMethodException"


# -- settings ---------------------------------------------------------------------------------


async def test_settings_round_trip_validation_and_disabled_calling(graph: httpx.AsyncClient):
    assert (await graph.get("/settings")).json()["calling"]["status"] == "ENABLED"
    response = await graph.post(
        "/settings", json={"calling": {"status": "DISABLED", "call_icon_visibility": "DISABLE_ALL"}}
    )
    assert response.json() == {"success": True}
    calling = (await graph.get("/settings")).json()["calling"]
    assert calling["status"] == "DISABLED" and calling["call_icon_visibility"] == "DISABLE_ALL"
    assert_graph_error(
        await graph.post("/calls", json=connect_body()), 138000, 401, "enable calling"
    )
    bad = await graph.post("/settings", json={"calling": {"status": "ON"}})
    assert_graph_error(bad, 100, 400, "calling.status must be one of ENABLED, DISABLED")
    unknown = await graph.post("/settings", json={"calling": {"colour": "red"}})
    assert_graph_error(unknown, 100, 400, "unknown calling setting")
    assert_graph_error(await graph.post("/settings", json={}), 100, 400, "calling is required")
    await graph.post("/settings", json={"calling": {"status": "ENABLED"}})
    assert (await graph.post("/calls", json=connect_body())).status_code == 200


# -- call permissions -------------------------------------------------------------------------


async def test_call_permissions_shapes(graph: httpx.AsyncClient, sim: WhatsAppSimulator):
    body = (await graph.get("/call_permissions", params={"user_wa_id": USER})).json()
    assert body["messaging_product"] == "whatsapp"
    assert body["permission"]["status"] == "temporary"
    assert abs(body["permission"]["expiration_time"] - (time.time() + 7 * 86400)) < 10
    request_action, call_action = body["actions"]
    assert request_action == {
        "action_name": "send_call_permission_request",
        "can_perform_action": True,
        "limits": [
            {"time_period": "PT24H", "max_allowed": 1, "current_usage": 0},
            {"time_period": "P7D", "max_allowed": 2, "current_usage": 0},
        ],
    }
    assert call_action == {
        "action_name": "start_call",
        "can_perform_action": True,
        "limits": [{"time_period": "PT24H", "max_allowed": 10, "current_usage": 0}],
    }
    sim.set_scenario("14085550000", Scenario(permission="grant_on_request", media=False))
    none = (await graph.get("/call_permissions", params={"user_wa_id": "14085550000"})).json()
    assert none["permission"] == {"status": "no_permission"}
    assert none["actions"][1]["can_perform_action"] is False
    sim.set_scenario("14085550001", Scenario(permission="granted", permanent=True, media=False))
    permanent = (await graph.get("/call_permissions", params={"user_wa_id": "14085550001"})).json()
    assert permanent["permission"] == {"status": "permanent"}
    assert permanent["actions"][0]["can_perform_action"] is False
    assert_graph_error(await graph.get("/call_permissions"), 100, 400, "user_wa_id is required")
    bad = await graph.get("/call_permissions", params={"user_wa_id": "+14085551234"})
    assert_graph_error(bad, 100, 400, "digits")


async def test_call_permissions_rate_limit_613(graph: httpx.AsyncClient):
    answers = [await graph.get("/call_permissions", params={"user_wa_id": USER}) for _ in range(6)]
    assert [a.status_code for a in answers[:5]] == [200] * 5
    assert_graph_error(answers[5], 613, 429, "5 requests per second")
    assert answers[5].headers["retry-after"] == "1"


# -- permission requests and replies ----------------------------------------------------------


def permission_request(to: str = USER, **interactive_extra: Any) -> dict[str, Any]:
    interactive = {
        "type": "call_permission_request",
        "action": {"name": "call_permission_request"},
        "body": {"text": "May we call you about your order?"},
    }
    interactive.update(interactive_extra)
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "interactive",
        "interactive": interactive,
    }


async def test_permission_request_granted_temporary(graph, sim, receiver):
    sim.set_scenario(USER, Scenario(permission="grant_on_request", media=False))
    assert_graph_error(await graph.post("/calls", json=connect_body()), 138006, 401, "permission")
    response = await graph.post("/messages", json=permission_request("+1 (408) 555-1234"))
    assert response.status_code == 200
    sent = response.json()
    assert sent["messaging_product"] == "whatsapp"
    assert sent["contacts"] == [{"input": "+1 (408) 555-1234", "wa_id": USER}]
    wamid = sent["messages"][0]["id"]
    assert wamid.startswith("wamid.")
    [record] = await receiver.wait_for(messages_field)
    assert record["valid"] is True
    body = record["json"]
    assert body["object"] == "whatsapp_business_account"
    assert body["entry"][0]["id"] == sim.config.waba_id
    value = meta_value(record)
    assert value["messaging_product"] == "whatsapp"
    assert value["metadata"] == {"display_phone_number": BIZ, "phone_number_id": PNID}
    assert value["contacts"] == [{"profile": {"name": "Sim User"}, "wa_id": USER}]
    [message] = value["messages"]
    assert message["from"] == USER and message["type"] == "interactive"
    assert message["id"].startswith("wamid.") and message["id"] != wamid
    assert message["timestamp"].isdigit()
    assert message["context"] == {"from": BIZ, "id": wamid}
    reply = message["interactive"]
    assert reply["type"] == "call_permission_reply"
    assert reply["call_permission_reply"]["response"] == "accept"
    assert reply["call_permission_reply"]["is_permanent"] is False
    assert reply["call_permission_reply"]["response_source"] == "user_action"
    assert (
        abs(reply["call_permission_reply"]["expiration_timestamp"] - (time.time() + 7 * 86400)) < 10
    )
    perm = (await graph.get("/call_permissions", params={"user_wa_id": USER})).json()
    assert perm["permission"]["status"] == "temporary"
    assert perm["actions"][0]["can_perform_action"] is False  # 1 per 24 h used
    assert "limit_expiration_time" in perm["actions"][0]["limits"][0]
    assert (await graph.post("/calls", json=connect_body())).status_code == 200


async def test_permission_request_limit_138009_and_permanent_138017(graph, sim, receiver):
    sim.set_scenario(USER, Scenario(permission="ignore_request", media=False))
    assert (await graph.post("/messages", json=permission_request())).status_code == 200
    again = await graph.post("/messages", json=permission_request())
    assert_graph_error(again, 138009, 400, "next request allowed at")
    sim.set_scenario(USER, Scenario(permission="grant_on_request", permanent=True, media=False))
    await graph.post("/messages", json=permission_request())
    [record] = await receiver.wait_for(messages_field)
    reply = meta_value(record)["messages"][0]["interactive"]["call_permission_reply"]
    assert reply["is_permanent"] is True and "expiration_timestamp" not in reply
    perm = (await graph.get("/call_permissions", params={"user_wa_id": USER})).json()
    assert perm["permission"] == {"status": "permanent"}
    assert_graph_error(
        await graph.post("/messages", json=permission_request()), 138017, 400, "permanent"
    )


async def test_permission_denied_ignored_and_undeliverable(graph, sim, receiver):
    sim.set_scenario("14085550001", Scenario(permission="deny_on_request", media=False))
    sim.set_scenario("14085550002", Scenario(permission="ignore_request", media=False))
    sim.set_scenario("14085550003", Scenario(permission="none", media=False))
    for wa_id in ("14085550001", "14085550002", "14085550003"):
        assert (await graph.post("/messages", json=permission_request(wa_id))).status_code == 200
    [denied] = await receiver.wait_for(lambda r: messages_field(r) and "messages" in meta_value(r))
    reply = meta_value(denied)["messages"][0]["interactive"]["call_permission_reply"]
    assert meta_value(denied)["messages"][0]["from"] == "14085550001"
    assert reply["response"] == "reject" and reply["is_permanent"] is False
    assert "expiration_timestamp" not in reply
    [failed] = await receiver.wait_for(lambda r: messages_field(r) and "statuses" in meta_value(r))
    status = meta_value(failed)["statuses"][0]
    assert status["status"] == "failed" and status["recipient_id"] == "14085550003"
    assert status["errors"][0]["code"] == 131026
    await asyncio.sleep(0.3)
    assert len(receiver.matching(messages_field)) == 2  # the ignoring user never answered
    perm = (await graph.get("/call_permissions", params={"user_wa_id": "14085550001"})).json()
    assert perm["permission"]["status"] == "no_permission"


async def test_permission_request_template_window_and_validation(graph, sim, receiver):
    sim.set_scenario(
        USER, Scenario(permission="grant_on_request", service_window_open=False, media=False)
    )
    outside = await graph.post("/messages", json=permission_request())
    assert_graph_error(outside, 131047, 400, "24 hours")
    unknown = {
        "messaging_product": "whatsapp",
        "to": USER,
        "type": "template",
        "template": {"name": "promo", "language": {"code": "en"}},
    }
    assert_graph_error(await graph.post("/messages", json=unknown), 132001, 404, "promo")
    template = {
        **unknown,
        "template": {"name": "call_permission_request", "language": {"code": "en"}},
    }
    response = await graph.post("/messages", json=template)
    assert response.status_code == 200
    await receiver.wait_for(messages_field)
    header = permission_request("14085550009", header={"type": "text", "text": "Hi"})
    assert_graph_error(
        await graph.post("/messages", json=header), 100, 400, "interactive.header is not supported"
    )
    wrong_action = permission_request("14085550009", action={"name": "send"})
    assert_graph_error(await graph.post("/messages", json=wrong_action), 100, 400, "action.name")
    no_product = {k: v for k, v in permission_request().items() if k != "messaging_product"}
    assert_graph_error(
        await graph.post("/messages", json=no_product), 100, 400, "messaging_product"
    )
    assert_graph_error(
        await graph.post("/messages", json={**permission_request(), "to": "abc"}),
        100,
        400,
        "to must",
    )
    assert_graph_error(
        await graph.post("/messages", content=b"{not json"), 100, 400, "not valid json"
    )


# -- connect validation -------------------------------------------------------------------------


def _without(line_prefix: str) -> str:
    return "".join(
        line + "\r\n" for line in OFFER.split("\r\n") if line and not line.startswith(line_prefix)
    )


SDP_CASES = {
    "LF line endings": (OFFER.replace("\r\n", "\n"), "CRLF"),
    "double-serialised": (json.dumps({"type": "offer", "sdp": OFFER}), "v=0"),
    "no audio": (OFFER.replace("m=audio", "m=video"), "exactly one m=audio"),
    "two media": (
        OFFER + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n",
        "only one media",
    ),
    "no opus": (_without("a=rtpmap:111").replace(" 111 63", " 63"), "Opus"),
    "no fingerprint": (_without("a=fingerprint"), "No fingerprint found"),
    "sha-384 too": (
        OFFER.replace("a=setup:actpass", "a=fingerprint:sha-384 AB:CD\r\na=setup:actpass"),
        "sha-384",
    ),
    "sha-1 only": (
        OFFER.replace("a=fingerprint:sha-256", "a=fingerprint:sha-1"),
        "must use sha-256",
    ),
    "setup active": (OFFER.replace("a=setup:actpass", "a=setup:active"), "a=setup:actpass"),
    "no ufrag": (_without("a=ice-ufrag"), "ice-ufrag"),
    "no pwd": (_without("a=ice-pwd"), "ice-pwd"),
}


async def test_connect_rejects_bad_sdp_with_100(graph: httpx.AsyncClient):
    assert sdp_problem(OFFER) is None
    for case, (sdp, details) in SDP_CASES.items():
        assert sdp_problem(sdp) is not None, case
        assert_graph_error(
            await graph.post("/calls", json=connect_body(sdp=sdp)), 100, 400, details
        )


async def test_connect_request_validation(graph: httpx.AsyncClient):
    cases = [
        ({**connect_body(), "messaging_product": "sms"}, "messaging_product"),
        (connect_body(to="+14085551234"), "digits"),
        (connect_body(to="1408-555"), "digits"),
        ({k: v for k, v in connect_body().items() if k != "session"}, "session"),
        (
            {
                **{k: v for k, v in connect_body().items() if k != "session"},
                "connection": {"webrtc": {"sdp": OFFER}},
            },
            "legacy connection.webrtc",
        ),
        (
            {**connect_body(), "session": {"sdp_type": "answer", "sdp": OFFER}},
            'sdp_type must be "offer"',
        ),
        (connect_body(biz_opaque_callback_data="x" * 513), "512"),
        ({**connect_body(), "action": "dial"}, "action must be one of"),
    ]
    for body, details in cases:
        assert_graph_error(await graph.post("/calls", json=body), 100, 400, details)


async def test_user_initiated_actions_are_refused_for_business_calls(graph: httpx.AsyncClient):
    call_id = (await graph.post("/calls", json=connect_body())).json()["calls"][0]["id"]
    base = {"messaging_product": "whatsapp", "call_id": call_id}
    for action in ("pre_accept", "accept"):
        offer_typed = {**base, "action": action, "session": {"sdp_type": "offer", "sdp": OFFER}}
        assert_graph_error(
            await graph.post("/calls", json=offer_typed), 100, 400, 'must be "answer"'
        )
        answer_typed = {**base, "action": action, "session": {"sdp_type": "answer", "sdp": OFFER}}
        assert_graph_error(
            await graph.post("/calls", json=answer_typed), 100, 400, "user-initiated"
        )
    assert_graph_error(
        await graph.post("/calls", json={**base, "action": "reject"}), 100, 400, "user-initiated"
    )
    missing = {"messaging_product": "whatsapp", "action": "terminate"}
    assert_graph_error(await graph.post("/calls", json=missing), 100, 400, "call_id is required")
    unknown = {"messaging_product": "whatsapp", "action": "terminate", "call_id": "wacid.nope"}
    assert_graph_error(await graph.post("/calls", json=unknown), 100, 400, "does not match a call")


async def test_connect_business_errors(graph: httpx.AsyncClient, sim: WhatsAppSimulator):
    sim.set_scenario("14085550001", Scenario(has_whatsapp=False, media=False))
    assert_graph_error(
        await graph.post("/calls", json=connect_body("14085550001")),
        138001,
        400,
        "not a whatsapp user",
    )
    sim.set_scenario("14085550002", Scenario(permission="none", media=False))
    assert_graph_error(
        await graph.post("/calls", json=connect_body("14085550002")), 138006, 401, "permission"
    )
    sim.set_scenario(USER, Scenario(answer="no_answer", ring_timeout_s=5, media=False))
    first = await graph.post("/calls", json=connect_body())
    assert first.status_code == 200
    assert_graph_error(
        await graph.post("/calls", json=connect_body()), 138003, 400, "already ongoing"
    )
    sim.set_limits(concurrent_calls=1)
    assert_graph_error(
        await graph.post("/calls", json=connect_body("14085550003")), 138002, 429, "ongoing"
    )


async def test_daily_connected_call_limit_138012(
    graph: httpx.AsyncClient, sim: WhatsAppSimulator, receiver
):
    sim.set_limits(connected_calls_per_24h=1)
    sim.set_scenario(USER, Scenario(hangup_after_s=0.05, answer_delay_s=0.01, media=False))
    call_id = (await graph.post("/calls", json=connect_body())).json()["calls"][0]["id"]
    await receiver.wait_for(call_event("terminate", call_id))
    perm = (await graph.get("/call_permissions", params={"user_wa_id": USER})).json()
    start_call = perm["actions"][1]
    assert start_call["can_perform_action"] is False
    assert start_call["limits"][0]["current_usage"] == 1
    assert start_call["limits"][0]["limit_expiration_time"] > time.time() + 86000
    error = assert_graph_error(
        await graph.post("/calls", json=connect_body()), 138012, 400, "next call allowed at"
    )
    assert str(start_call["limits"][0]["limit_expiration_time"]) in error["error_data"]["details"]


# -- call flows and their webhooks ----------------------------------------------------------------


async def test_accepted_call_webhooks_field_by_field(graph, sim, receiver):
    sim.set_scenario(
        USER, Scenario(hangup_after_s=1.1, answer_delay_s=0.05, name="Pablo", media=False)
    )
    response = await graph.post("/calls", json=connect_body(biz_opaque_callback_data="call_abc"))
    assert response.status_code == 200
    body = response.json()
    assert body["messaging_product"] == "whatsapp"
    call_id = body["calls"][0]["id"]
    assert call_id.startswith("wacid.")
    [terminate] = await receiver.wait_for(call_event("terminate", call_id), timeout=5)
    kinds = [r for r in receiver.requests if "entry" in r["json"]]
    assert all(r["valid"] for r in kinds)
    assert all(r["path"] == "/webhooks/meta" for r in kinds)
    connect, ringing, accepted = kinds[0], kinds[1], kinds[2]
    assert kinds[3] is terminate

    value = meta_value(connect)
    assert meta_field(connect) == "calls"
    assert value["metadata"] == {"display_phone_number": BIZ, "phone_number_id": PNID}
    assert value["contacts"] == [{"profile": {"name": "Pablo"}, "wa_id": USER}]
    [item] = value["calls"]
    assert item["id"] == call_id and item["to"] == USER and item["from"] == BIZ
    assert item["event"] == "connect" and item["direction"] == "BUSINESS_INITIATED"
    assert isinstance(item["timestamp"], str) and item["timestamp"].isdigit()
    assert item["biz_opaque_callback_data"] == "call_abc"
    assert item["session"]["sdp_type"] == "answer"
    answer = item["session"]["sdp"]
    assert "a=ice-lite\r\n" in answer and "a=setup:active\r\n" in answer
    assert "a=fingerprint:sha-256 " in answer and "opus/48000/2" in answer

    for record, status in ((ringing, "RINGING"), (accepted, "ACCEPTED")):
        [st] = meta_value(record)["statuses"]
        assert st == {
            "id": call_id,
            "type": "call",
            "status": status,
            "timestamp": st["timestamp"],
            "recipient_id": USER,
            "biz_opaque_callback_data": "call_abc",
        }

    [end] = meta_value(terminate)["calls"]
    assert end["event"] == "terminate" and end["status"] == "COMPLETED"
    assert (
        end["biz_opaque_callback_data"] == "call_abc" and end["direction"] == "BUSINESS_INITIATED"
    )
    assert int(end["end_time"]) - int(end["start_time"]) in (1, 2)
    assert end["duration"] == 1
    assert "errors" not in meta_value(terminate)
    call = sim.calls[call_id]
    assert call.state == "ended" and call.end_reason == "hangup" and call.terminated_by == "user"
    assert [e.get("status", e["event"]) for e in call.events] == [
        "connect",
        "RINGING",
        "ACCEPTED",
        "COMPLETED",
    ]


async def test_rejected_call(graph, sim, receiver):
    sim.set_scenario(USER, Scenario(answer="reject", answer_delay_s=0.05, media=False))
    call_id = (await graph.post("/calls", json=connect_body())).json()["calls"][0]["id"]
    [terminate] = await receiver.wait_for(call_event("terminate", call_id))
    assert receiver.matching(call_status("REJECTED", call_id))
    assert not receiver.matching(call_status("ACCEPTED", call_id))
    [end] = meta_value(terminate)["calls"]
    assert end["status"] == "FAILED"
    assert not {"start_time", "end_time", "duration"} & set(end)
    assert "biz_opaque_callback_data" not in end  # not given, not invented


async def test_unanswered_call_fails_after_ring_timeout(graph, sim, receiver):
    sim.set_scenario(USER, Scenario(answer="no_answer", ring_timeout_s=0.3, media=False))
    started = time.monotonic()
    call_id = (await graph.post("/calls", json=connect_body())).json()["calls"][0]["id"]
    [terminate] = await receiver.wait_for(call_event("terminate", call_id))
    assert time.monotonic() - started >= 0.3
    [end] = meta_value(terminate)["calls"]
    assert end["status"] == "FAILED" and "start_time" not in end
    assert sim.calls[call_id].end_reason == "no_answer"


async def test_repeated_missed_calls_revoke_permission(graph, sim, receiver):
    sim.set_limits(missed_calls_before_revoke=2)
    sim.set_scenario(USER, Scenario(answer="reject", answer_delay_s=0.01, media=False))
    for _ in range(2):
        call_id = (await graph.post("/calls", json=connect_body())).json()["calls"][0]["id"]
        await receiver.wait_for(call_event("terminate", call_id))
    perm = (await graph.get("/call_permissions", params={"user_wa_id": USER})).json()
    assert perm["permission"]["status"] == "no_permission"
    assert_graph_error(await graph.post("/calls", json=connect_body()), 138006, 401)


async def test_business_terminate_while_ringing_and_while_talking(graph, sim, receiver):
    sim.set_scenario(USER, Scenario(answer="no_answer", ring_timeout_s=10, media=False))
    call_id = (await graph.post("/calls", json=connect_body())).json()["calls"][0]["id"]
    await receiver.wait_for(call_status("RINGING", call_id))
    terminate = {"messaging_product": "whatsapp", "call_id": call_id, "action": "terminate"}
    response = await graph.post("/calls", json=terminate)
    assert response.json() == {"messaging_product": "whatsapp", "success": True}
    [record] = await receiver.wait_for(call_event("terminate", call_id))
    assert meta_value(record)["calls"][0]["status"] == "FAILED"
    assert (await graph.post("/calls", json=terminate)).json()["success"] is True  # idempotent
    await asyncio.sleep(0.1)
    assert len(receiver.matching(call_event("terminate", call_id))) == 1

    sim.set_scenario(USER, Scenario(answer_delay_s=0.01, media=False))
    call_id = (await graph.post("/calls", json=connect_body())).json()["calls"][0]["id"]
    await receiver.wait_for(call_status("ACCEPTED", call_id))
    await asyncio.sleep(1.05)
    await graph.post("/calls", json={**terminate, "call_id": call_id})
    [record] = await receiver.wait_for(call_event("terminate", call_id))
    end = meta_value(record)["calls"][0]
    assert end["status"] == "COMPLETED" and end["duration"] == 1
    assert sim.calls[call_id].terminated_by == "business"


async def test_user_hangup_through_control_api(graph, sim, receiver):
    call_id = (await graph.post("/calls", json=connect_body())).json()["calls"][0]["id"]
    await receiver.wait_for(call_status("ACCEPTED", call_id))
    async with httpx.AsyncClient(base_url=sim.url, timeout=5) as control:
        listed = (await control.get("/_sim/calls")).json()["calls"]
        assert [c["id"] for c in listed] == [call_id] and listed[0]["state"] == "accepted"
        hung = await control.post(f"/_sim/calls/{call_id}/hangup")
        assert hung.status_code == 200
        assert (await control.post("/_sim/calls/wacid.nope/hangup")).status_code == 404
        [record] = await receiver.wait_for(call_event("terminate", call_id))
        assert meta_value(record)["calls"][0]["status"] == "COMPLETED"
        one = (await control.get(f"/_sim/calls/{call_id}")).json()
        assert one["status"] == "COMPLETED" and one["end_reason"] == "hangup"


# -- signatures, faults, control API --------------------------------------------------------------


async def test_bad_signature_fault_is_rejected_and_retried(graph, sim, receiver):
    sim.set_scenario(USER, Scenario(answer="no_answer", ring_timeout_s=10, media=False))
    sim.set_faults(bad_signature=True)
    call_id = (await graph.post("/calls", json=connect_body())).json()["calls"][0]["id"]
    await receiver.wait_for(call_status("RINGING", call_id), count=2)  # first try + one retry
    await sim.drain_webhooks()
    assert len(receiver.requests) == 4 and all(r["valid"] is False for r in receiver.requests)
    assert [[a["status"] for a in d.attempts] for d in sim.deliveries] == [[403, 403], [403, 403]]
    assert not any(d.delivered for d in sim.deliveries)
    sim.set_faults(bad_signature=False)
    terminate = {"messaging_product": "whatsapp", "call_id": call_id, "action": "terminate"}
    await graph.post("/calls", json=terminate)
    [end] = await receiver.wait_for(call_event("terminate", call_id))
    assert end["valid"] is True


async def test_duplicate_delivery_fault(graph, sim, receiver):
    sim.set_faults(duplicate_delivery=True)
    call_id = (await graph.post("/calls", json=connect_body())).json()["calls"][0]["id"]
    connects = await receiver.wait_for(call_event("connect", call_id), count=2)
    assert (
        connects[0]["raw"] == connects[1]["raw"]
        and connects[0]["signature"] == connects[1]["signature"]
    )
    await receiver.wait_for(call_status("RINGING", call_id), count=2)


async def test_out_of_order_fault(graph, sim, receiver):
    sim.set_faults(out_of_order=True)
    call_id = (await graph.post("/calls", json=connect_body())).json()["calls"][0]["id"]
    await receiver.wait_for(call_event("connect", call_id))
    await receiver.wait_for(call_status("RINGING", call_id))
    order = [r for r in receiver.requests if call_event("connect")(r) or call_status("RINGING")(r)]
    assert call_status("RINGING")(order[0]) and call_event("connect")(order[1])


async def test_delayed_delivery_fault(graph, sim, receiver):
    sim.set_faults(delay_s=0.4)
    sent = time.monotonic()
    call_id = (await graph.post("/calls", json=connect_body())).json()["calls"][0]["id"]
    [connect] = await receiver.wait_for(call_event("connect", call_id))
    assert connect["at"] - sent >= 0.4


async def test_api_429_and_503_faults(graph, sim):
    async with httpx.AsyncClient(base_url=sim.url, timeout=5) as control:
        faults = (
            await control.put(
                "/_sim/faults", json={"api_429_count": 1, "api_503_count": 1, "retry_after_s": 3}
            )
        ).json()
        assert faults["api_429_count"] == 1
        bad = await control.put("/_sim/faults", json={"explode": True})
        assert bad.status_code == 400 and "explode" in bad.json()["error"]
    limited = await graph.get("/call_permissions", params={"user_wa_id": USER})
    assert_graph_error(limited, 4, 429)
    assert limited.headers["retry-after"] == "3"
    assert limited.json()["error"]["is_transient"] is True
    assert_graph_error(await graph.get("/call_permissions", params={"user_wa_id": USER}), 2, 503)
    assert (await graph.get("/call_permissions", params={"user_wa_id": USER})).status_code == 200


async def test_control_api_scenarios_limits_and_webhook_log(graph, sim, receiver):
    async with httpx.AsyncClient(base_url=sim.url, timeout=5) as control:
        put = await control.put(
            f"/_sim/scenarios/{USER}", json={"answer": "reject", "answer_delay_s": 0}
        )
        assert put.status_code == 200
        assert put.json()["scenario"]["answer"] == "reject"
        assert put.json()["scenario"]["media"] is False  # the rest comes from the default scenario
        assert (await control.get("/_sim/scenarios")).json()["scenarios"][USER][
            "answer"
        ] == "reject"
        bad = await control.put(f"/_sim/scenarios/{USER}", json={"answer": "maybe"})
        assert bad.status_code == 400 and "maybe" in bad.json()["error"] and bad.json()["hint"]
        assert (await control.put(f"/_sim/scenarios/{USER}", json={"colour": 1})).status_code == 400
        call_id = (await graph.post("/calls", json=connect_body())).json()["calls"][0]["id"]
        await receiver.wait_for(call_status("REJECTED", call_id))
        limits = await control.put("/_sim/limits", json={"connected_calls_per_24h": 3})
        assert limits.json()["connected_calls_per_24h"] == 3
        perm = (await graph.get("/call_permissions", params={"user_wa_id": USER})).json()
        assert perm["actions"][1]["limits"][0]["max_allowed"] == 3
        assert (await control.put("/_sim/limits", json={"nope": 3})).status_code == 400
        deleted = await control.delete(f"/_sim/scenarios/{USER}")
        assert deleted.json()["scenario"]["answer"] == "accept"
        await sim.drain_webhooks()
        log = (await control.get("/_sim/webhooks")).json()["webhooks"]
        assert [w["kind"] for w in log][:2] == ["calls.connect", "statuses.RINGING"]
        assert all(w["delivered"] for w in log)


# -- webhook verification handshake --------------------------------------------------------------


async def test_verify_webhook_helper(sim, receiver):
    assert (
        await verify_webhook(receiver.url + "/webhooks/meta", VERIFY_TOKEN, challenge="12345")
        == "12345"
    )
    assert await sim.verify_meta_webhook()
    with pytest.raises(WebhookRejected) as info:
        await verify_webhook(receiver.url + "/webhooks/meta", "wrong-token")
    assert info.value.status_code == 403 and info.value.hint
    async with httpx.AsyncClient(base_url=sim.url, timeout=5) as control:
        ok = await control.post("/_sim/verify-webhook", json={})
        assert ok.json()["verified"] is True
        echo_app = Starlette(routes=[Route("/", lambda r: PlainTextResponse("not the challenge"))])
        async with serve_asgi(echo_app) as bad_url:
            with pytest.raises(WebhookRejected, match="did not echo"):
                await verify_webhook(bad_url + "/", VERIFY_TOKEN)
            failed = await control.post("/_sim/verify-webhook", json={"url": bad_url + "/"})
            assert failed.status_code == 502 and failed.json()["verified"] is False


# -- lifecycle -----------------------------------------------------------------------------------


async def test_without_webhook_url_events_are_recorded_and_stop_leaks_nothing(receiver):
    sim = WhatsAppSimulator(make_config(receiver, meta_webhook_url=None))
    url = await sim.start()
    async with httpx.AsyncClient(timeout=5) as client:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        sim.set_scenario(USER, Scenario(answer="no_answer", ring_timeout_s=30, media=False))
        response = await client.post(
            f"{url}/v23.0/{PNID}/calls", json=connect_body(), headers=headers
        )
        assert response.status_code == 200
        async with asyncio.timeout(5):
            while len(sim.deliveries) < 2:  # noqa: ASYNC110 - polling the simulator's record
                await asyncio.sleep(0.01)
    assert [d.kind for d in sim.deliveries] == ["calls.connect", "statuses.RINGING"]
    assert sim.deliveries[0].url is None and not sim.deliveries[0].attempts
    await sim.stop()
    leftovers = [t for t in asyncio.all_tasks() if t.get_name().startswith("whatsapp-sim")]
    assert leftovers == []
    assert receiver.requests == []
    assert "sim-" not in repr(sim.config) and TOKEN not in repr(sim.config)
