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

from . import wire
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
    light = False  # SimulatedUser(light_media=True): pre-encoded Opus out, levels only in
    default_script: UserScript | None = None
    registry: list[TappedUser] = []

    def __init__(self, wa_id: str, script: UserScript | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("light_media", self.light)
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
        if self.light_media:
            self._use_light_media(transceiver)
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


# ---- what the wire saw of a call, for the report ---------------------------------------------


def call_stats(user: TappedUser, since: float, until: float, marks: list) -> dict[str, Any]:
    """One caller's figures over [since, until]: per-turn and barge-in latency on the wire
    (`marks`: the Realtime simulator's (time.monotonic(), event type), for the outbound part
    and the simulated VAD's share), outbound pacing gaps, what the relay dropped."""
    out: dict[str, Any] = {"id": user.wa_id, "end_reason": user.end_reason}
    tap = user.tap
    if tap is None:
        return out
    deltas = [t for t, k in marks if k == "response.output_audio.delta"]
    starts = [t for t, k in marks if k == "input_audio_buffer.speech_started"]
    turns = []
    for t in wire.turn_latencies(tap, since, until):
        first = max((d for d in deltas if d <= t["reply_start"]), default=None)
        outbound = (t["reply_start"] - first) * 1e3 if first and first > t["caller_end"] else None
        turns.append({"wire_ms": round(t["ms"], 1), "outbound_ms": outbound and round(outbound, 1)})
    barges = []
    for b_ms, start in zip(
        wire.barge_ins(tap, since, until), _barge_starts(tap, since, until), strict=True
    ):
        heard = min((s for s in starts if s >= start), default=None)
        vad = (heard - start) * 1e3 if heard is not None and heard - start < 1.0 else None
        barges.append({"wire_ms": round(b_ms, 1), "vad_ms": vad and round(vad, 1)})
    out.update(
        turns=turns,
        barge_ins=barges,
        pacing=wire.outbound_pacing(tap, since, until),
        relay_dropped=tap.dropped,
        audible_ms=round(user.audible_ms()),
    )
    return out


def _barge_starts(tap: WireTap, since: float, until: float) -> list[float]:
    system = tap.to_caller.spurts(since)
    return [
        start
        for start, _ in tap.to_system.spurts(since)
        if start <= until and any(s[0] < start <= s[1] for s in system)
    ]
