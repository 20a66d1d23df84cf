"""The simulated callers of the benchmarks: the project's `SimulatedUser` (which answers
offers, like WhatsApp) with a wire tap in front of it, and an offering variant for systems
that only answer (pipecat's SmallWebRTC transport). Both play and record the same shipped
utterances through the same scripts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from whatsapp_call.media import ice
from whatsapp_call.media.peer import opus_only
from whatsapp_call_sim.openai_realtime.server import Reply, ResponseRequest, default_responder
from whatsapp_call_sim.user import Pause, Say, SimulatedUser, UserScript, WaitForSpeech

from .wire import WireTap

LONG_REPLY = (
    "Let me tell you everything about the appointment we have for you next week, the time, "
    "the place, what to bring with you, and who you will meet when you arrive there."
)


def talk_script(turns: int = 200) -> UserScript:
    """A caller who keeps talking: waits for the AI (3 s at most at the start), then says
    hello / yes in turn, each time after the AI's reply has finished."""
    steps: list[Any] = [WaitForSpeech(timeout=3.0)]
    for i in range(turns):
        steps += [Say("hello" if i % 2 == 0 else "yes"), WaitForSpeech(silence_ms=600, timeout=8.0)]
    return UserScript(tuple(steps))


def barge_script(turns: int = 100, talk_over_after: float = 1.8) -> UserScript:
    """A caller who interrupts: each utterance starts about a second into the AI's (long)
    reply to the previous one."""
    steps: list[Any] = [WaitForSpeech(timeout=3.0)]
    for i in range(turns):
        steps += [Say("hello" if i % 2 == 0 else "yes"), Pause(talk_over_after)]
    return UserScript(tuple(steps))


SCRIPTS = {"talk": talk_script, "barge": barge_script, "silent": UserScript.silent}


def long_responder(req: ResponseRequest) -> Reply:
    """Every caller turn gets a long reply (about 9 s of speech) to talk over."""
    if req.trigger == "turn":
        return Reply(LONG_REPLY)
    return default_responder(req)


class TappedUser(SimulatedUser):
    """`SimulatedUser` whose media crosses a `WireTap`. Class attributes configure the taps
    of the users the WhatsApp simulator creates (it constructs them itself)."""

    tap_loss = 0.0
    tap_jitter_ms = 0.0
    tap_enabled = True
    default_script: UserScript | None = None
    registry: list[TappedUser] = []

    def __init__(self, wa_id: str, script: UserScript | None = None, **kwargs: Any) -> None:
        super().__init__(wa_id, script or self.default_script, **kwargs)
        self.tap: WireTap | None = None
        self.registry.append(self)

    async def _new_tap(self) -> WireTap | None:
        if not self.tap_enabled:
            return None
        tap = WireTap(self.tap_loss, self.tap_jitter_ms, seed=len(self.registry))
        await tap.start()
        self.tap = tap
        return tap

    async def answer(self, offer_sdp: str) -> str:
        tap = await self._new_tap()
        if tap is None:
            return await super().answer(offer_sdp)
        answer = await super().answer(tap.for_caller(offer_sdp))
        return tap.for_system(answer)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def close(self) -> None:
        await super().close()
        if self.tap is not None:
            self.tap.close()


class OfferingUser(TappedUser):
    """The same caller, but it makes the offer (for answer-only systems such as pipecat's
    SmallWebRTC transport) and then runs its script once the answer is applied."""

    def __init__(
        self, wa_id: str, script: UserScript | None = None, host_addresses: Sequence[str] = ()
    ) -> None:
        super().__init__(wa_id, script, host_addresses=host_addresses or ("127.0.0.1",))

    async def offer(self) -> str:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._pc = pc

        @pc.on("track")
        def _on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._tasks.append(asyncio.ensure_future(self._listen(track)))

        transceiver = pc.addTransceiver(self.player, direction="sendrecv")
        opus_only(transceiver)
        dtls = transceiver.sender.transport

        @dtls.on("statechange")
        def _dtls_state() -> None:
            if dtls.state == "connected":
                self.timings.setdefault("connected", time.monotonic())
                self._connected.set()
            elif dtls.state == "failed":
                self._end("dtls_failed")

        with ice.host_addresses(self.host_addresses):
            await pc.setLocalDescription(await pc.createOffer())
        tap = await self._new_tap()
        sdp = pc.localDescription.sdp
        return tap.for_system(sdp) if tap is not None else sdp

    async def accept(self, answer_sdp: str) -> None:
        assert self._pc is not None, "offer() first"
        sdp = self.tap.for_caller(answer_sdp) if self.tap is not None else answer_sdp
        await self._pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        self.timings["answered"] = time.monotonic()
        self._tasks.append(asyncio.ensure_future(self._media_timers()))
        self._tasks.append(asyncio.ensure_future(self._run_script()))
