"""The simulated WATI Calling API: endpoints, envelope, auth, both webhook shapes, signatures,
and the network state it shares with the simulated Meta API. Signalling-only calls."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from test_sim_meta import (
    FAST,
    OFFER,
    PNID,
    TOKEN,
    USER,
    Receiver,
    call_event,
    make_config,
)
from whatsapp_call.serving import serve_asgi
from whatsapp_call_sim.whatsapp import Scenario, WhatsAppSimulator, sign

WATI_TOKEN = "test-wati-token"
WATI_SECRET = "test-wati-secret"
TENANT = "4321"
BIZ = "13175551399"
HOOKS = "/webhooks/wati"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver(wati_secret=WATI_SECRET)
    async with serve_asgi(rec.app) as url:
        rec.url = url
        yield rec


async def start_sim(receiver: Receiver, **overrides: Any) -> WhatsAppSimulator:
    options: dict[str, Any] = {
        "wati_tenant_id": TENANT,
        "wati_api_token": WATI_TOKEN,
        "wati_webhook_url": receiver.url + HOOKS,
        "wati_webhook_secret": WATI_SECRET,
        "limits": FAST,
    }
    options.update(overrides)
    simulator = WhatsAppSimulator(make_config(receiver, **options))
    await simulator.start()
    return simulator


@pytest.fixture
async def sim(receiver: Receiver) -> AsyncIterator[WhatsAppSimulator]:
    simulator = await start_sim(receiver)
    yield simulator
    await simulator.stop()


@pytest.fixture
async def wati(sim: WhatsAppSimulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"{sim.url}/{TENANT}/api/v1/openapi/whatsapp/calls",
        headers={"Authorization": f"Bearer {WATI_TOKEN}"},
        timeout=5,
    ) as client:
        yield client


def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"code", "message", "result"}
    assert body["code"] == 200 and body["message"] == "Success", body
    return body["result"]


def refused(response: httpx.Response, http_status: int, code: int, text: str) -> None:
    assert response.status_code == http_status, response.text
    body = response.json()
    assert set(body) == {"code", "message", "result"}
    assert body["code"] == code and body["result"] is None
    assert text.lower() in body["message"].lower(), body["message"]


def at(path: str) -> Any:
    return lambda r: r["path"] == HOOKS + path


async def test_auth_tenant_and_channel(sim: WhatsAppSimulator, wati: httpx.AsyncClient):
    base = f"{sim.url}/{TENANT}/api/v1/openapi/whatsapp/calls"
    async with httpx.AsyncClient(timeout=5) as anonymous:
        refused(await anonymous.get(f"{base}/permissions/{USER}"), 401, 401, "missing bearer token")
        wrong = await anonymous.get(
            f"{base}/permissions/{USER}", headers={"Authorization": "Bearer x"}
        )
        refused(wrong, 401, 401, "invalid bearer token")
    other_tenant = await wati.get(f"{sim.url}/999/api/v1/openapi/whatsapp/calls/permissions/{USER}")
    refused(other_tenant, 404, 404, "tenant 999 not found")
    ok(await wati.get(f"/permissions/{USER}", params={"channelPhoneNumber": "+1 317 555 1399"}))
    refused(
        await wati.get(f"/permissions/{USER}", params={"channelPhoneNumber": "15550001111"}),
        400,
        400,
        "channel",
    )
    refused(await wati.get("/permissions/+14085551234"), 400, 400, "digits")


async def test_auth_can_be_switched_off(receiver: Receiver):
    sim = await start_sim(receiver, wati_require_auth=False)
    try:
        async with httpx.AsyncClient(timeout=5) as anonymous:
            response = await anonymous.get(
                f"{sim.url}/{TENANT}/api/v1/openapi/whatsapp/calls/permissions/{USER}"
            )
            ok(response)
    finally:
        await sim.stop()


async def test_permissions_wrap_metas_object(wati: httpx.AsyncClient):
    result = ok(await wati.get(f"/permissions/{USER}"))
    assert result["messaging_product"] == "whatsapp"
    assert result["permission"]["status"] == "temporary"
    assert [a["action_name"] for a in result["actions"]] == [
        "send_call_permission_request",
        "start_call",
    ]


async def test_permission_request_and_per_event_webhook(sim, wati, receiver):
    sim.set_scenario(USER, Scenario(permission="grant_on_request", media=False))
    before = ok(await wati.get(f"/permissions/{USER}"))
    assert before["permission"]["status"] == "no_permission"
    assert before["actions"][0]["can_perform_action"] is True
    assert ok(await wati.post(f"/call-permission-request/{USER}")) is None
    [hook] = await receiver.wait_for(at("/permission"))
    assert hook["json"] == {
        "waid": USER,
        "channelPhoneNumber": BIZ,
        "hasPermission": True,
        "status": "granted",
        "tenantId": TENANT,
    }
    assert hook["signature"] == sign(hook["raw"], WATI_SECRET) and hook["valid"] is True
    after = ok(await wati.get(f"/permissions/{USER}"))
    assert after["permission"]["status"] == "temporary"
    assert after["actions"][0]["can_perform_action"] is False
    # The WhatsApp-side refusal: HTTP 200, non-200 code, Meta's text.
    refused(await wati.post(f"/call-permission-request/{USER}"), 200, 400, "(#138009)")


async def test_permission_denied(sim, wati, receiver):
    sim.set_scenario(USER, Scenario(permission="deny_on_request", media=False))
    ok(await wati.post(f"/call-permission-request/{USER}"))
    [hook] = await receiver.wait_for(at("/permission"))
    assert hook["json"]["hasPermission"] is False and hook["json"]["status"] == "denied"
    refused(await wati.post(f"/outbound-call/{USER}", json={"Sdp": OFFER}), 200, 401, "(#138006)")


async def test_outbound_call_validation(sim, wati):
    refused(await wati.post(f"/outbound-call/{USER}"), 400, 400, "Sdp is required")
    refused(
        await wati.post(f"/outbound-call/{USER}", json={"offer": OFFER}),
        400,
        400,
        "Sdp is required",
    )
    refused(await wati.post(f"/outbound-call/{USER}", content=b"{x"), 400, 400, "not valid json")
    bad_sdp = OFFER.replace("\r\n", "\n")
    refused(await wati.post(f"/outbound-call/{USER}", json={"Sdp": bad_sdp}), 200, 400, "(#100)")
    sim.set_scenario("14085550001", Scenario(has_whatsapp=False, media=False))
    refused(
        await wati.post("/outbound-call/14085550001", json={"Sdp": OFFER}), 200, 400, "(#138001)"
    )
    sim.set_scenario(USER, Scenario(answer="no_answer", ring_timeout_s=5, media=False))
    first = ok(
        await wati.post(f"/outbound-call/{USER}", json={"sdp": OFFER})
    )  # lower-case key works
    assert first["callId"].startswith("wacid.")
    refused(await wati.post(f"/outbound-call/{USER}", json={"Sdp": OFFER}), 200, 400, "(#138003)")
    assert ok(await wati.post(f"/{first['callId']}/terminate")) is None
    refused(await wati.post("/wacid.nope/terminate"), 404, 404, "not found")


async def test_per_event_call_webhooks(sim, wati, receiver):
    sim.set_scenario(
        USER, Scenario(hangup_after_s=0.1, answer_delay_s=0.05, name="Pablo", media=False)
    )
    call_id = ok(await wati.post(f"/outbound-call/{USER}", json={"Sdp": OFFER}))["callId"]
    [end] = await receiver.wait_for(at("/terminate"))
    assert end["json"] == {
        "callId": call_id,
        "tenantId": TENANT,
        "businessNumber": BIZ,
        "contact": {"ContactName": "Pablo", "ContactNumber": USER},
    }
    [answer] = receiver.matching(at("/sdp-answer"))
    assert set(answer["json"]) == {"callId", "sdp"} and answer["json"]["callId"] == call_id
    assert answer["json"]["sdp"].startswith("v=0\r\n") and "a=setup:active" in answer["json"]["sdp"]
    statuses = [r["json"] for r in receiver.matching(at("/call-status"))]
    assert statuses == [{"callId": call_id, "status": s} for s in ("RINGING", "ACCEPTED", "ENDED")]
    assert all(r["valid"] is True for r in receiver.requests)
    order = [r["path"].rsplit("/", 1)[1] for r in receiver.requests]
    assert order == ["sdp-answer", "call-status", "call-status", "call-status", "terminate"]
    assert sim.calls[call_id].status == "COMPLETED"
    assert not receiver.matching(lambda r: r["path"] == "/webhooks/meta")  # WATI calls stay WATI


async def test_per_event_rejected_call(sim, wati, receiver):
    sim.set_scenario(USER, Scenario(answer="reject", answer_delay_s=0.05, media=False))
    call_id = ok(await wati.post(f"/outbound-call/{USER}", json={"Sdp": OFFER}))["callId"]
    await receiver.wait_for(at("/terminate"))
    statuses = [r["json"]["status"] for r in receiver.matching(at("/call-status"))]
    assert statuses == ["RINGING", "REJECTED", "ENDED"]
    assert sim.calls[call_id].status == "FAILED"


async def test_single_url_event_shape(receiver: Receiver):
    sim = await start_sim(receiver, wati_webhook_shape="single")
    try:
        async with httpx.AsyncClient(
            base_url=f"{sim.url}/{TENANT}/api/v1/openapi/whatsapp/calls",
            headers={"Authorization": f"Bearer {WATI_TOKEN}"},
            timeout=5,
        ) as wati:
            sim.set_scenario(USER, Scenario(hangup_after_s=0.1, answer_delay_s=0.05, media=False))
            call_id = ok(await wati.post(f"/outbound-call/{USER}", json={"Sdp": OFFER}))["callId"]
            await receiver.wait_for(lambda r: r["json"].get("event") == "call.end")
            sim.set_scenario(
                "14085550001", Scenario(answer="reject", answer_delay_s=0.01, media=False)
            )
            rejected_id = ok(await wati.post("/outbound-call/14085550001", json={"Sdp": OFFER}))[
                "callId"
            ]
            await receiver.wait_for(lambda r: r["json"].get("event") == "call.end", count=2)
            sim.set_scenario("14085550002", Scenario(permission="grant_on_request", media=False))
            ok(await wati.post("/call-permission-request/14085550002"))
            [perm] = await receiver.wait_for(lambda r: r["json"].get("event") == "permission")
        assert all(r["path"] == HOOKS and r["valid"] is True for r in receiver.requests)
        mine = [r["json"] for r in receiver.requests if r["json"].get("callId") == call_id]
        start, accepted, end = mine
        assert start["event"] == "call.start" and start["status"] == "ringing"
        assert start["sdp"].startswith("v=0\r\n") and start["hasPermission"] is None
        assert start["tenantId"] == TENANT and start["businessNumber"] == BIZ
        assert start["contact"] == {"ContactName": "Sim User", "ContactNumber": USER}
        assert (accepted["event"], accepted["status"]) == ("call.start", "accepted")
        assert (end["event"], end["status"]) == ("call.end", "ended")
        rejected = [r["json"] for r in receiver.requests if r["json"].get("callId") == rejected_id]
        assert [(r["event"], r["status"]) for r in rejected] == [
            ("call.start", "ringing"),
            ("call.end", "rejected"),
        ]
        assert perm["json"]["hasPermission"] is True and perm["json"]["waid"] == "14085550002"
    finally:
        await sim.stop()


async def test_unsigned_without_secret(receiver: Receiver):
    receiver.wati_secret = None
    sim = await start_sim(receiver, wati_webhook_secret=None)
    try:
        sim.set_scenario(USER, Scenario(permission="deny_on_request", media=False))
        async with httpx.AsyncClient(
            timeout=5, headers={"Authorization": f"Bearer {WATI_TOKEN}"}
        ) as client:
            ok(
                await client.post(
                    f"{sim.url}/{TENANT}/api/v1/openapi/whatsapp/calls/call-permission-request/{USER}"
                )
            )
        [hook] = await receiver.wait_for(at("/permission"))
        assert hook["signature"] is None
    finally:
        await sim.stop()


async def test_bad_signature_and_api_faults(sim, wati, receiver):
    sim.set_faults(bad_signature=True, api_429_count=1, api_503_count=1, retry_after_s=2)
    limited = await wati.get(f"/permissions/{USER}")
    refused(limited, 429, 429, "too many requests")
    assert limited.headers["retry-after"] == "2"
    refused(await wati.get(f"/permissions/{USER}"), 503, 503, "unavailable")
    sim.set_scenario(USER, Scenario(permission="grant_on_request", media=False))
    ok(await wati.post(f"/call-permission-request/{USER}"))
    hooks = await receiver.wait_for(at("/permission"), count=2)
    assert all(h["valid"] is False for h in hooks)


async def test_wati_and_meta_share_one_network(sim, wati, receiver):
    sim.set_scenario(
        USER,
        Scenario(permission="grant_on_request", answer="no_answer", ring_timeout_s=5, media=False),
    )
    ok(await wati.post(f"/call-permission-request/{USER}"))
    await receiver.wait_for(at("/permission"))
    async with httpx.AsyncClient(
        base_url=f"{sim.url}/v23.0/{PNID}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    ) as graph:
        perm = (await graph.get("/call_permissions", params={"user_wa_id": USER})).json()
        assert perm["permission"]["status"] == "temporary"  # granted through WATI, seen by Meta
        body = {
            "messaging_product": "whatsapp",
            "to": USER,
            "action": "connect",
            "session": {"sdp_type": "offer", "sdp": OFFER},
        }
        call_id = (await graph.post("/calls", json=body)).json()["calls"][0]["id"]
        await receiver.wait_for(call_event("connect", call_id))
        refused(
            await wati.post(f"/outbound-call/{USER}", json={"Sdp": OFFER}), 200, 400, "(#138003)"
        )
        assert ok(await wati.post(f"/{call_id}/terminate")) is None  # same call ids on both doors
        await receiver.wait_for(call_event("terminate", call_id))
