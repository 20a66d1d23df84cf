"""Our side of one WhatsApp call's media: an aiortc peer connection built the way WhatsApp
needs it (spec whatsapp-calling-api.md §2).

We are always the offerer. The offer carries every ICE candidate (WhatsApp has no trickle
ICE), Opus 48 kHz only, a sha-256 fingerprint only, `a=setup:actpass`. Against Meta's
ICE-lite answer we stay ICE-controlling (aiortc sets that role when it creates the offer and
never changes it for an answer) and become the DTLS server when the answer says
`a=setup:active` (client for `passive`).

WhatsApp drops a call after 20 s without media from us, so we send silence when there is no
outbound track. We watch the peer ourselves (no inbound RTP for `dead_peer_seconds`, ICE or
DTLS failure, RTCP BYE) because aiortc would keep a dead call open for a long time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

import av
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, MediaStreamTrack
from aiortc.rtcicetransport import parse_stun_turn_uri

from ..errors import ConfigError, MediaError
from ..models import IceServer
from . import ice, rtp_fast
from .jitter import ArrivalTap, InboundAudioStats, LowLatencyAudioBuffer, install_receive_buffer
from .sdp import validate_answer, whatsapp_offer
from .sender import carry_audio_level

log = logging.getLogger(__name__)
_GATHER_GRACE = 2.0  # hard ceiling on setLocalDescription beyond gather_timeout


def rtc_ice_servers(servers: Sequence[IceServer]) -> list[RTCIceServer]:
    """Map our `IceServer`s to aiortc's, in the given order. Raises `ConfigError` for a URL
    aiortc cannot parse (named in the message; credentials are never shown)."""
    out = []
    for server in servers:
        for url in server.urls:
            try:
                parse_stun_turn_uri(url)
            except ValueError as exc:
                raise ConfigError(
                    f"ICE server URL {url!r} is not a valid STUN/TURN URL ({exc}).",
                    "Use stun:host[:port], turn:host[:port][?transport=udp|tcp] or "
                    "turns:host[:port]?transport=tcp.",
                ) from None
        out.append(
            RTCIceServer(
                urls=list(server.urls), username=server.username, credential=server.credential
            )
        )
    return out


def opus_only(transceiver: Any) -> None:
    """Restrict the transceiver to Opus 48 kHz, the only codec WhatsApp speaks."""
    caps = RTCRtpSender.getCapabilities("audio")
    opus = [c for c in caps.codecs if c.mimeType.lower() == "audio/opus"]
    if not opus:
        raise MediaError(
            "This aiortc build has no Opus codec.",
            "Install aiortc with its bundled PyAV/libopus (pip install aiortc).",
        )
    transceiver.setCodecPreferences(opus)


class CallMedia:
    """One call's WebRTC media; we are the offerer.

    ICE servers are handed to aiortc in the given order, but **aiortc uses only the first
    STUN URL and the first TURN URL it finds** (it skips `turns:` over UDP and non-password
    credentials); order the list so the best server comes first. `host_addresses` limits
    host candidates (config `iceHostAddresses`; None = every interface but loopback).

    `low_latency_receive` (default on) replaces aiortc's audio jitter buffer on this
    connection only with `LowLatencyAudioBuffer` (see `media.jitter`), cutting ~80 ms off
    everything the caller says, and decodes at `inbound_rate` (the voice backend's: the
    bridge then has nothing to resample) when Opus can (8/12/16/24/48 kHz; else 48 kHz).
    `rtp_fast_path` (default on) moves this call's RTP through `media.rtp_fast` once DTLS
    is up: about half of aiortc's per-packet CPU, same bytes on the wire.
    `timings` holds `time.monotonic()` of each milestone.
    """

    def __init__(
        self,
        *,
        ice_servers: Sequence[IceServer] = (),
        host_addresses: Sequence[str] | None = None,
        gather_timeout: float = 5.0,
        outbound_track: MediaStreamTrack | None = None,
        dead_peer_seconds: float = 10.0,
        low_latency_receive: bool = True,
        max_inbound_frames: int = 500,
        inbound_rate: int = 48000,
        rtp_fast_path: bool = True,
    ) -> None:
        self._ice_servers = rtc_ice_servers(ice_servers)
        self.host_addresses = (
            None if host_addresses is None else ice.validate_addresses(host_addresses)
        )
        self.gather_timeout = gather_timeout
        self.dead_peer_seconds = dead_peer_seconds
        self.low_latency_receive = low_latency_receive
        self.inbound_rate = inbound_rate
        self.rtp_fast_path = rtp_fast_path
        self._outbound_track = outbound_track
        self._max_inbound = max_inbound_frames
        self.ended = asyncio.Event()
        self.end_reason: str | None = None
        self.timings: dict[str, float] = {}
        self.dropped_unread = 0  # inbound frames dropped because nobody called recv()
        self._pc: RTCPeerConnection | None = None
        self._transceiver: Any = None
        self._buffer: LowLatencyAudioBuffer | ArrivalTap | None = None
        self.rtp_fast: rtp_fast.RtpFast | None = None  # RTP fast paths, once DTLS is up
        self._inbound: asyncio.Queue[av.AudioFrame | None] = asyncio.Queue()
        self._connected = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._answered = False
        self._closed = False
        self._last_frame_at = 0.0

    # -- diagnostics ---------------------------------------------------------------------
    @property
    def pc(self) -> RTCPeerConnection | None:
        return self._pc

    @property
    def ice_role(self) -> str | None:
        """Our ICE role, "controlling" or "controlled" (WhatsApp requires controlling)."""
        if self._transceiver is None:
            return None
        return self._transceiver.sender.transport.transport.role

    @property
    def dtls_role(self) -> str | None:
        """Our DTLS role, "server" or "client", once the answer is applied ("auto" before)."""
        if self._transceiver is None:
            return None
        return getattr(self._transceiver.sender.transport, "_role", None)

    def inbound_counts(self) -> dict[str, int]:
        """The receive path's counters alone, cheap enough for every /metrics scrape
        (`inbound_stats()` also sorts up to 5,000 delays for its percentiles)."""
        if isinstance(self._buffer, LowLatencyAudioBuffer):
            counts = self._buffer.stats.counts()
        else:
            counts = dict.fromkeys(InboundAudioStats.COUNTS, 0)
        return {**counts, "dropped_unread": self.dropped_unread}

    def inbound_stats(self) -> dict[str, Any]:
        """Receive-path counters and stack delay percentiles (for the bridge's metrics)."""
        out: dict[str, Any] = {"dropped_unread": self.dropped_unread}
        if isinstance(self._buffer, LowLatencyAudioBuffer):
            out.update(self._buffer.stats.summary())
        out["rtp_fast_path"] = self.rtp_fast.counts() if self.rtp_fast else None
        return out

    # -- the call ------------------------------------------------------------------------
    async def create_offer(self) -> str:
        """Build the WhatsApp-ready offer: every candidate gathered, sha-256 only,
        `a=setup:actpass`, Opus only, CRLF. STUN/TURN candidates not in by
        `gather_timeout` are left out (WhatsApp accepts peer-reflexive candidates);
        `MediaError` if even that overruns by 2 s."""
        if self._pc is not None:
            raise MediaError(
                "create_offer() was already called for this call.", "Use a new CallMedia per call."
            )
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self._ice_servers))
        self._pc = pc
        track = self._outbound_track or AudioStreamTrack()  # silence keeps WhatsApp's timer happy
        self._transceiver = pc.addTransceiver(track, direction="sendrecv")
        carry_audio_level(self._transceiver.sender)  # for tracks that hand it Opus packets
        opus_only(self._transceiver)
        self._bound_gathering()
        self._install_receive_path()
        self._watch_states()
        offer = await pc.createOffer()
        ceiling = self.gather_timeout + _GATHER_GRACE
        try:
            with ice.host_addresses(self.host_addresses):
                await asyncio.wait_for(pc.setLocalDescription(offer), ceiling)
        except TimeoutError:
            await self.close()
            raise MediaError(
                f"ICE candidate gathering did not finish within {ceiling:g} s.",
                "Check that the STUN/TURN servers are reachable, or raise iceGatherTimeoutSeconds.",
            ) from None
        sdp = whatsapp_offer(pc.localDescription.sdp)
        self.timings["offer_built"] = time.monotonic()
        return sdp

    async def accept_answer(self, sdp: str) -> None:
        """Apply the callee's answer; ICE and DTLS start at once. Raises `MediaError` that
        names what is wrong with the answer."""
        if self._pc is None:
            raise MediaError("accept_answer() before create_offer().", "Create the offer first.")
        if self._answered:
            raise MediaError(
                "An answer was already applied to this call.", "Apply one answer per offer."
            )
        if self.ended.is_set():
            raise MediaError(
                f"The call media already ended ({self.end_reason}).", "Place a new call."
            )
        validate_answer(sdp)
        try:
            await self._pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        except (ValueError, KeyError, IndexError, AttributeError) as exc:
            raise MediaError(
                f"The SDP answer could not be applied: {type(exc).__name__}: {exc}.",
                "The answer must answer our offer (same m-line, Opus payload type).",
            ) from None
        except Exception as exc:  # aiortc's InvalidStateError/InvalidAccessError
            raise MediaError(
                f"The SDP answer was refused by the WebRTC stack: {exc}.",
                "Apply the answer only once, to a fresh offer.",
            ) from None
        self._answered = True
        self.timings["answer_applied"] = time.monotonic()
        self._tasks.append(asyncio.create_task(self._monitor(), name="call-media-monitor"))
        self._tasks.append(asyncio.create_task(self._watch_remote_track(), name="call-media-track"))

    async def wait_connected(self, timeout: float) -> None:
        """Return once DTLS is up (media flows); raise `MediaError` on failure or timeout."""
        ended = asyncio.ensure_future(self.ended.wait())
        connected = asyncio.ensure_future(self._connected.wait())
        try:
            await asyncio.wait(
                {ended, connected}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ended.cancel()
            connected.cancel()
        if self._connected.is_set():
            return
        if self.ended.is_set():
            raise MediaError(
                f"Call media ended before connecting ({self.end_reason}).",
                "The callee's address was unreachable or DTLS failed; a TURN server helps behind NAT.",
            )
        raise MediaError(
            f"ICE/DTLS did not connect within {timeout:g} s.",
            "Check UDP reachability of the callee's candidates (firewall), or configure a TURN server.",
        )

    async def recv(self) -> av.AudioFrame:
        """The next decoded inbound frame (s16; mono at `inbound_rate` with our receive path,
        48 kHz stereo with aiortc's). Raises `MediaError` once the call
        media has ended (dead peer, failure, close) and every received frame was read."""
        if self._inbound.empty() and self.ended.is_set():
            raise self._ended_error()
        frame = await self._inbound.get()
        if frame is None:
            self._inbound.put_nowait(None)  # later recv() calls end too
            raise self._ended_error()
        return frame

    async def close(self) -> None:
        """Hang up the media (RTCP BYE, DTLS close). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._end("closed")
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if isinstance(self._buffer, LowLatencyAudioBuffer):
            self._buffer.close()
        if self._pc is not None:
            with contextlib.suppress(Exception):
                await self._pc.close()

    # -- internals -----------------------------------------------------------------------
    def _ended_error(self) -> MediaError:
        return MediaError(
            f"Call media ended ({self.end_reason}).",
            "The call is over; end the conversation and terminate the call at the provider.",
        )

    def _end(self, reason: str) -> None:
        if self.ended.is_set():
            return
        self.end_reason = reason
        self.timings["ended"] = time.monotonic()
        log.info("call media ended: %s", reason)
        self.ended.set()
        self._inbound.put_nowait(None)

    def _deliver(self, frame: av.AudioFrame) -> None:
        if self.ended.is_set():
            return
        self._last_frame_at = time.monotonic()
        self.timings.setdefault("first_audio_in", self._last_frame_at)
        while self._inbound.qsize() >= self._max_inbound:
            self._inbound.get_nowait()
            self.dropped_unread += 1
        self._inbound.put_nowait(frame)

    def _bound_gathering(self) -> None:
        """aioice waits a fixed 5 s for STUN/TURN candidates, then keeps what it has. Give
        this connection's gatherer our `gather_timeout` instead, so a slow or unreachable
        server yields a partial offer (host candidates at least) on time, as the spec asks."""
        gatherer = self._transceiver.sender.transport.transport.iceGatherer
        connection = getattr(gatherer, "_connection", None)
        gather = getattr(connection, "get_component_candidates", None)
        if gather is None:
            log.warning("cannot bound aioice's gathering time; it uses its own 5 s limit")
            return
        connection.get_component_candidates = functools.partial(gather, timeout=self.gather_timeout)

    def _install_receive_path(self) -> None:
        receiver = self._transceiver.receiver
        if self.low_latency_receive:
            buffer = LowLatencyAudioBuffer(self._deliver, rate=self.inbound_rate)
            try:
                install_receive_buffer(receiver, buffer)
                self._buffer = buffer
                return
            except RuntimeError as exc:
                log.warning("low-latency receive path unavailable, using aiortc's: %s", exc)
                self.low_latency_receive = False
        tap = ArrivalTap(JitterBuffer(capacity=16, prefetch=4))  # what aiortc itself uses
        try:
            install_receive_buffer(receiver, tap)
            self._buffer = tap
        except RuntimeError:  # dead-peer detection then goes by decoded frames
            self._buffer = None

    def _watch_states(self) -> None:
        pc = self._pc
        dtls = self._transceiver.sender.transport

        @pc.on("iceconnectionstatechange")
        def _ice() -> None:
            if pc.iceConnectionState == "completed":
                self.timings.setdefault("ice_connected", time.monotonic())
            elif pc.iceConnectionState == "failed":
                self._end("ice_failed")

        @dtls.on("statechange")
        def _dtls() -> None:
            if dtls.state == "connected":
                self.timings.setdefault("dtls_connected", time.monotonic())
                if self.rtp_fast_path:
                    self.rtp_fast = rtp_fast.install(self._transceiver, self._buffer)
                self._connected.set()
            elif dtls.state == "failed":
                self._end("dtls_failed")
            elif dtls.state == "closed":
                self._end("closed")

        @pc.on("connectionstatechange")
        def _conn() -> None:
            if pc.connectionState == "failed":
                self._end("dtls_failed" if dtls.state == "failed" else "ice_failed")
            elif pc.connectionState == "closed":
                self._end("closed")

    async def _watch_remote_track(self) -> None:
        """With our receive path the remote track only ever yields aiortc's end sentinel
        (RTCP BYE or transport gone). With aiortc's path it yields the frames: pump them."""
        track = self._transceiver.receiver.track
        try:
            while True:
                frame = await track.recv()
                self._deliver(frame)  # aiortc path only
        except MediaStreamError:
            self._end("closed")

    async def _monitor(self) -> None:
        """Dead-peer detection: no inbound RTP for `dead_peer_seconds` once connected."""
        poll = min(0.1, self.dead_peer_seconds / 10)
        while not self.ended.is_set():
            await asyncio.sleep(poll)
            connected_at = self.timings.get("dtls_connected")
            if connected_at is None:
                continue
            last_rtp = (self._buffer.last_arrival if self._buffer else None) or 0.0
            silent_for = time.monotonic() - max(last_rtp, self._last_frame_at, connected_at)
            if silent_for > self.dead_peer_seconds:
                log.warning("no inbound RTP for %.1f s: treating the peer as gone", silent_for)
                self._end("no_media")
