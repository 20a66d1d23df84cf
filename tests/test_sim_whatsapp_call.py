"""Done when: a plain aiortc offer completes a call against the simulated Meta AND the
simulated WATI, with audio both ways.

The test is the business: it builds an aiortc offer on 127.0.0.1, rewrites it the WhatsApp
way (sha-256 fingerprint only, setup:actpass), sends it through the provider API, applies
the answer from the webhook, plays a 440 Hz tone and listens. The callee is the
simulator's SimulatedUser (a real aiortc peer): we assert it heard our tone (its recording,
by FFT) and that we heard its "hello".
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections.abc import AsyncIterator
from typing import Any

import av
import httpx
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from test_sim_meta import (
    PNID,
    TOKEN,
    USER,
    Receiver,
    call_event,
    call_status,
    make_config,
    meta_value,
)
from whatsapp_call.media.ice import host_addresses
from whatsapp_call.serving import serve_asgi
from whatsapp_call_sim.user import HangUp, Pause, Say, UserScript
from whatsapp_call_sim.whatsapp import Limits, Scenario, WhatsAppSimulator

pytestmark = pytest.mark.slow

RATE = 48_000
TONE_HZ = 440.0
WATI_TOKEN = "test-wati-token"
TENANT = "4321"


class ToneTrack(MediaStreamTrack):
    """A 440 Hz sine, 20 ms mono frames paced in real time: the business's voice."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pts = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._pts / RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        t = (self._pts + np.arange(960)) / RATE
        samples = (8000 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, RATE)
        self._pts += 960
        return frame


def whatsapp_ready(sdp: str) -> str:
    """Keep only the sha-256 fingerprint (aiortc also emits sha-384/512); setup stays actpass."""
    lines = [line for line in sdp.split("\r\n") if line]
    kept = [
        line
        for line in lines
        if not line.startswith("a=fingerprint:") or line.lower().startswith("a=fingerprint:sha-256")
    ]
    assert any(line == "a=setup:actpass" for line in kept)
    return "\r\n".join(kept) + "\r\n"


class Business:
    """Our side of one call: an aiortc offerer with a tone out and a recorder in."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTrack(ToneTrack())
        self.heard: list[np.ndarray] = []
        self._tasks: list[asyncio.Task[None]] = []

        @self.pc.on("track")
        def _on_track(track: MediaStreamTrack) -> None:
            self._tasks.append(asyncio.ensure_future(self._listen(track)))

    async def _listen(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                pcm = frame.to_ndarray().reshape(-1)
                if len(frame.layout.channels) == 2:
                    pcm = pcm.reshape(-1, 2).mean(axis=1)
                self.heard.append(pcm.astype(np.int16))
        except MediaStreamError:
            return

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def apply_answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    def loud_ms(self) -> float:
        loud = [c for c in self.heard if np.sqrt(np.mean(c.astype(np.float64) ** 2)) > 300]
        return sum(len(c) for c in loud) * 1000 / RATE

    async def close(self) -> None:
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def make_offer(business: Business) -> str:
    with host_addresses(["127.0.0.1"]):
        return whatsapp_ready(await business.offer())


def dominant_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
    return float(np.fft.rfftfreq(len(samples), 1 / RATE)[int(np.argmax(spectrum))])


async def until(predicate: Any, timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - polling audio levels, no event to await
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def assert_two_way_audio(sim: WhatsAppSimulator, call_id: str, business: Business) -> None:
    user = sim.calls[call_id].user
    assert user is not None
    heard = user.heard_audio()
    assert user.audible_ms() >= 500
    loud = heard[np.abs(heard) > 2000]
    assert len(loud) > RATE // 4
    assert abs(dominant_hz(heard[-RATE // 2 :]) - TONE_HZ) < 15  # the user heard our tone
    assert business.loud_ms() >= 300  # and we heard the user's "hello"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    async with serve_asgi(rec.app) as url:
        rec.url = url
        yield rec


MEDIA_LIMITS = Limits(connect_delay_s=0.01, ringing_delay_s=0.01, connect_timeout_s=10)


@pytest.fixture
async def sim(receiver: Receiver) -> AsyncIterator[WhatsAppSimulator]:
    config = make_config(
        receiver,
        default_scenario=Scenario(media=True, answer_delay_s=0.2),
        limits=MEDIA_LIMITS,
        wati_tenant_id=TENANT,
        wati_api_token=WATI_TOKEN,
        wati_webhook_url=receiver.url + "/webhooks/wati",
    )
    simulator = WhatsAppSimulator(config)
    await simulator.start()
    yield simulator
    await simulator.stop()


async def test_call_through_meta_with_audio_both_ways(sim: WhatsAppSimulator, receiver: Receiver):
    sim.set_scenario(
        USER, Scenario(user_script=UserScript((Say("hello"), Pause(30))), answer_delay_s=0.2)
    )
    business = Business()
    try:
        offer = await make_offer(business)
        async with httpx.AsyncClient(
            base_url=f"{sim.url}/v24.0/{PNID}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        ) as graph:
            body = {
                "messaging_product": "whatsapp",
                "to": USER,
                "action": "connect",
                "session": {"sdp_type": "offer", "sdp": offer},
                "biz_opaque_callback_data": "call_media_1",
            }
            response = await graph.post("/calls", json=body)
            assert response.status_code == 200, response.text
            call_id = response.json()["calls"][0]["id"]
            [connect] = await receiver.wait_for(call_event("connect", call_id), timeout=10)
            session = meta_value(connect)["calls"][0]["session"]
            assert session["sdp_type"] == "answer"
            assert "a=setup:active" in session["sdp"] and "a=ice-lite" in session["sdp"]
            await business.apply_answer(session["sdp"])
            await receiver.wait_for(call_status("RINGING", call_id), timeout=5)
            [accepted] = await receiver.wait_for(call_status("ACCEPTED", call_id), timeout=15)
            assert meta_value(accepted)["statuses"][0]["biz_opaque_callback_data"] == "call_media_1"
            user = sim.calls[call_id].user
            assert user.timings["connected"] <= accepted["at"]  # ACCEPTED after media is up
            await until(
                lambda: business.loud_ms() >= 300 and user.audible_ms() >= 800,
                15,
                "audio both ways",
            )
            assert_two_way_audio(sim, call_id, business)
            terminate = {"messaging_product": "whatsapp", "call_id": call_id, "action": "terminate"}
            assert (await graph.post("/calls", json=terminate)).json()["success"] is True
            [end] = await receiver.wait_for(call_event("terminate", call_id), timeout=10)
            item = meta_value(end)["calls"][0]
            assert item["status"] == "COMPLETED" and item["duration"] >= 1
            assert item["biz_opaque_callback_data"] == "call_media_1"
            assert user.ended.is_set()
    finally:
        await business.close()


async def test_call_through_wati_with_audio_both_ways(sim: WhatsAppSimulator, receiver: Receiver):
    script = UserScript((Say("hello"), Pause(1.0), HangUp()))
    sim.set_scenario(USER, Scenario(user_script=script, answer_delay_s=0.2))
    business = Business()
    try:
        offer = await make_offer(business)
        async with httpx.AsyncClient(
            base_url=f"{sim.url}/{TENANT}/api/v1/openapi/whatsapp/calls",
            headers={"Authorization": f"Bearer {WATI_TOKEN}"},
            timeout=10,
        ) as wati:
            permission = (await wati.get(f"/permissions/{USER}")).json()
            assert permission["code"] == 200
            assert permission["result"]["actions"][1]["can_perform_action"] is True
            response = await wati.post(f"/outbound-call/{USER}", json={"Sdp": offer})
            assert response.json()["code"] == 200, response.text
            call_id = response.json()["result"]["callId"]
            path = "/webhooks/wati/"
            [answer] = await receiver.wait_for(
                lambda r: r["path"] == path + "sdp-answer", timeout=10
            )
            assert answer["json"]["callId"] == call_id
            await business.apply_answer(answer["json"]["sdp"])

            def status(name: str) -> Any:
                return lambda r: r["path"] == path + "call-status" and r["json"]["status"] == name

            await receiver.wait_for(status("ACCEPTED"), timeout=15)
            user = sim.calls[call_id].user
            # The script says hello, pauses and hangs up: the simulator reports the end.
            await receiver.wait_for(lambda r: r["path"] == path + "terminate", timeout=15)
            assert_two_way_audio(sim, call_id, business)
            assert [
                r["json"]["status"] for r in receiver.requests if r["path"] == path + "call-status"
            ] == [
                "RINGING",
                "ACCEPTED",
                "ENDED",
            ]
            call = sim.calls[call_id]
            assert (
                call.status == "COMPLETED"
                and call.end_reason == "hangup"
                and user.end_reason == "hangup"
            )
    finally:
        await business.close()


async def test_answer_never_applied_fails_with_138007(sim: WhatsAppSimulator, receiver: Receiver):
    sim.set_limits(connect_timeout_s=1.0)
    business = Business()
    try:
        offer = await make_offer(business)
        async with httpx.AsyncClient(
            base_url=f"{sim.url}/v23.0/{PNID}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        ) as graph:
            body = {
                "messaging_product": "whatsapp",
                "to": USER,
                "action": "connect",
                "session": {"sdp_type": "offer", "sdp": offer},
            }
            call_id = (await graph.post("/calls", json=body)).json()["calls"][0]["id"]
            [end] = await receiver.wait_for(call_event("terminate", call_id), timeout=10)
        value = meta_value(end)
        assert value["calls"][0]["status"] == "FAILED" and "duration" not in value["calls"][0]
        assert value["errors"][0]["code"] == 138007
        assert value["errors"][0]["message"] == "Connect timeout"
        assert not receiver.matching(call_status("ACCEPTED", call_id))
        assert sim.calls[call_id].user.ended.is_set()  # closed by the simulator
    finally:
        await business.close()


async def test_user_dropping_mid_call_is_a_failed_terminate(
    sim: WhatsAppSimulator, receiver: Receiver
):
    sim.set_scenario(USER, Scenario(user_script=UserScript.silent(), answer_delay_s=0.1))
    business = Business()
    try:
        offer = await make_offer(business)
        async with httpx.AsyncClient(
            base_url=f"{sim.url}/v23.0/{PNID}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        ) as graph:
            body = {
                "messaging_product": "whatsapp",
                "to": USER,
                "action": "connect",
                "session": {"sdp_type": "offer", "sdp": offer},
            }
            call_id = (await graph.post("/calls", json=body)).json()["calls"][0]["id"]
            [connect] = await receiver.wait_for(call_event("connect", call_id), timeout=10)
            await business.apply_answer(meta_value(connect)["calls"][0]["session"]["sdp"])
            await receiver.wait_for(call_status("ACCEPTED", call_id), timeout=15)
            await business.pc.close()  # our peer goes away without terminate
            [end] = await receiver.wait_for(call_event("terminate", call_id), timeout=15)
        item = meta_value(end)["calls"][0]
        assert item["status"] == "FAILED"
        assert sim.calls[call_id].end_reason not in (None, "hangup")
    finally:
        await business.close()
