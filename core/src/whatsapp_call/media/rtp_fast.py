"""Per-call fast paths for Opus RTP under aiortc, receive and send.

Receive: aiortc hands every inbound datagram through aioice (a STUN parse attempt that fails
on RTP), an `asyncio.Queue`, the DTLS transport's reader task, a full `RtpPacket.parse` (every
header extension), the RTP router and the receiver's bookkeeping before our
`LowLatencyAudioBuffer` sees it. Here the datagram is taken straight from the socket's
protocol object: an SRTP packet of the negotiated Opus payload type from a source aiortc's
router gives our receiver is unprotected, its fixed header (CSRC count, extension length,
padding) read, and a small packet object handed to the buffer, in the same callback.
Everything else (STUN, DTLS, RTCP, other payload types, unknown sources) goes the unchanged
aiortc way, so RTCP BYE and DTLS close still end the call. Kept from aiortc: the receiver's
per-SSRC `StreamStatistics` (what its RTCP receiver reports say), its active-source table,
the DTLS transport's rx counters; SRTP failures (bad auth, replays) are dropped and counted.

Send: aiortc's sender still sends the RTCP sender reports and, for other tracks, fetches each
frame (track, packing, `carry_audio_level`); `FastSend` replaces the per-packet part of its loop
(packet object, header-extension serialising, four awaits down to aioice's `sendto`), and takes
our encoded `PlayoutTrack`'s packets straight from `recv_opus()` (no `av.Packet` to unwrap).

Both are installed per call when DTLS connects (the SRTP sessions exist from then on, and
aiortc starts the sender right after). They read aiortc 1.16 / aioice 0.13 internals; if
those are not what the code expects, one warning is logged and aiortc's path stays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from typing import Any

import pylibsrtp
from aiortc import clock
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.rtp import HeaderExtensions

from .jitter import LowLatencyAudioBuffer

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!HII")  # sequence number, timestamp, SSRC (after the first 2 bytes)
_RX_BYTES = "_RTCDtlsTransport__rx_bytes"
_RX_PACKETS = "_RTCDtlsTransport__rx_packets"
_REMOTE_STREAMS = "_RTCRtpReceiver__remote_streams"
_ACTIVE_SSRC = "_RTCRtpReceiver__active_ssrc"
_CODECS = "_RTCRtpReceiver__codecs"
_BUFFER = "_RTCRtpReceiver__jitter_buffer"
_TX_BYTES = "_RTCDtlsTransport__tx_bytes"
_TX_PACKETS = "_RTCDtlsTransport__tx_packets"
_S_STARTED = "_RTCRtpSender__started"
_S_RTP_STARTED = "_RTCRtpSender__rtp_started"
_S_RTP_EXITED = "_RTCRtpSender__rtp_exited"
_S_COUNTERS = (
    "_RTCRtpSender__ntp_timestamp",
    "_RTCRtpSender__rtp_timestamp",
    "_RTCRtpSender__octet_count",
    "_RTCRtpSender__packet_count",
)
_S_MAP = "_RTCRtpSender__rtp_header_extensions_map"
_S_MID = "_RTCRtpSender__mid"
_NTP_OFFSET = 2208988800  # seconds from 1900 (NTP epoch) to 1970
_HINT = (
    ". The call works as before, with more CPU per call; the fast path is written against"
    " aiortc 1.16 / aioice 0.13 (pin those to get it back)."
)


class FastRtpPacket:
    """The fields `LowLatencyAudioBuffer.add()` (and aiortc's router) read from a packet.
    `_data` is the depayloaded frame, which for Opus is the payload itself."""

    __slots__ = (
        "payload_type",
        "marker",
        "sequence_number",
        "timestamp",
        "ssrc",
        "payload",
        "_data",
    )

    def __init__(
        self, payload_type: int, marker: int, sequence_number: int, timestamp: int, ssrc: int
    ):
        self.payload_type = payload_type
        self.marker = marker
        self.sequence_number = sequence_number
        self.timestamp = timestamp
        self.ssrc = ssrc
        self.payload = self._data = b""

    def __repr__(self) -> str:
        return (
            f"FastRtpPacket(seq={self.sequence_number}, ts={self.timestamp}, "
            f"pt={self.payload_type}, {len(self.payload)} bytes)"
        )


class FastReceive:
    """The receive fast path of one call. Counters: `packets` handed to the buffer this way,
    `srtp_errors` (auth failures and replays, dropped as aiortc drops them), `malformed`
    (header inconsistent with the length, dropped), `errors` (unexpected exceptions)."""

    def __init__(self, transceiver: Any, buffer: Any) -> None:
        self.packets = 0
        self.srtp_errors = 0
        self.malformed = 0
        self.errors = 0
        self.payload_type: int | None = None  # resolved once the receiver knows its codecs
        self._receiver = transceiver.receiver
        self._dtls = transceiver.receiver.transport
        self._buffer = buffer
        self._clock_rate = 48000
        self._accepted: set[int] = set()  # SSRCs the router gives our receiver
        self._wrapped: list[tuple[Any, Any, Any]] = []  # (protocol, what it had, our wrapper)
        self._installed = False

    # -- installation --------------------------------------------------------------------
    def install(self) -> None:
        """Hook this call's sockets. Raises `RuntimeError` naming the internal that is not
        what this code was written against (nothing is changed then)."""
        dtls, receiver = self._dtls, self._receiver
        connection = getattr(getattr(dtls, "transport", None), "_connection", None)
        protocols = list(getattr(connection, "_protocols", None) or ())
        checks = {
            "RTCDtlsTransport._rx_srtp": getattr(dtls, "_rx_srtp", None) is not None,
            "RTCDtlsTransport._rtp_router.route_rtp": callable(
                getattr(getattr(dtls, "_rtp_router", None), "route_rtp", None)
            ),
            f"RTCDtlsTransport.{_RX_BYTES}": isinstance(getattr(dtls, _RX_BYTES, None), int),
            f"RTCDtlsTransport.{_RX_PACKETS}": isinstance(getattr(dtls, _RX_PACKETS, None), int),
            "aioice Connection._protocols": bool(protocols),
            "StunProtocol.datagram_received/local_candidate": all(
                callable(getattr(p, "datagram_received", None))
                and getattr(getattr(p, "local_candidate", None), "component", None) is not None
                for p in protocols
            ),
            "RTCRtpReceiver._enabled": isinstance(getattr(receiver, "_enabled", None), bool),
            f"RTCRtpReceiver.{_REMOTE_STREAMS}": isinstance(
                getattr(receiver, _REMOTE_STREAMS, None), dict
            ),
            f"RTCRtpReceiver.{_ACTIVE_SSRC}": isinstance(
                getattr(receiver, _ACTIVE_SSRC, None), dict
            ),
            f"RTCRtpReceiver.{_CODECS}": isinstance(getattr(receiver, _CODECS, None), dict),
            "our buffer installed in the receiver": getattr(receiver, _BUFFER, None)
            is self._buffer,
        }
        missing = [name for name, ok in checks.items() if not ok]
        if missing:
            raise RuntimeError(
                "aiortc/aioice internals differ from what the RTP fast path expects: "
                + ", ".join(missing)
            )
        self._rx_srtp = dtls._rx_srtp
        self._router = dtls._rtp_router
        self._streams: dict[int, StreamStatistics] = getattr(receiver, _REMOTE_STREAMS)
        self._active: dict[int, Any] = getattr(receiver, _ACTIVE_SSRC)
        self._codecs: dict[int, Any] = getattr(receiver, _CODECS)
        self._resolve_payload_type()  # known already when installed on a started receiver
        for protocol in protocols:
            self._wrap(protocol)
        self._installed = True

    def uninstall(self) -> None:
        """Give the sockets back to aiortc's path (a wrapper put on top of ours since is
        left alone)."""
        for protocol, own, wrapper in self._wrapped:
            if protocol.__dict__.get("datagram_received") is wrapper:
                if own is None:
                    del protocol.datagram_received  # the class's method again
                else:
                    protocol.datagram_received = own
        self._wrapped.clear()
        self._installed = False

    @property
    def installed(self) -> bool:
        return self._installed

    def counts(self) -> dict[str, int]:
        return {
            "packets": self.packets,
            "srtp_errors": self.srtp_errors,
            "malformed": self.malformed,
            "errors": self.errors,
        }

    # -- per packet ------------------------------------------------------------------------
    def _wrap(self, protocol: Any) -> None:
        if protocol.local_candidate.component != 1:  # rtcp-mux: media only on component 1
            return
        original = protocol.datagram_received  # the bound method (or someone's wrapper)
        handle = self._handle

        def datagram_received(data: bytes, addr: tuple[Any, ...]) -> None:
            if not handle(data):
                original(data, addr)

        own = protocol.__dict__.get("datagram_received")
        protocol.datagram_received = datagram_received
        self._wrapped.append((protocol, own, datagram_received))

    def _handle(self, data: bytes) -> bool:
        """Take `data` if it is SRTP Opus for our receiver; False = aiortc's path takes it."""
        if len(data) < 12:
            return False
        first = data[0]
        second = data[1]
        if first < 128 or first > 191:
            return False
        if (second & 0x7F) != self.payload_type and (
            self.payload_type is not None or (second & 0x7F) != self._resolve_payload_type()
        ):
            return False
        if 192 <= second <= 208:  # RTCP (aiortc's `is_rtcp`); unreachable for PT 96-127
            return False
        sequence_number, timestamp, ssrc = _HEADER.unpack_from(data, 2)
        if ssrc not in self._accepted and not self._accept(ssrc, second & 0x7F):
            return False
        if not self._receiver._enabled:
            return False
        try:
            return self._receive(data, first, second, sequence_number, timestamp, ssrc)
        except Exception:  # never take the socket down; aiortc would have dropped it too
            self.errors += 1
            if self.errors == 1:
                log.exception("RTP fast path: unexpected error on an inbound packet (dropped)")
            return True

    def _receive(
        self, data: bytes, first: int, second: int, sequence_number: int, timestamp: int, ssrc: int
    ) -> bool:
        dtls = self._dtls
        dtls._RTCDtlsTransport__rx_bytes += len(data)
        dtls._RTCDtlsTransport__rx_packets += 1
        try:
            plain = self._rx_srtp.unprotect(data)
        except pylibsrtp.Error:
            self.srtp_errors += 1
            return True
        end = len(plain)
        pos = 12 + 4 * (first & 0x0F)
        if first & 0x10:
            if end < pos + 4:
                self.malformed += 1
                return True
            pos += 4 + 4 * ((plain[pos + 2] << 8) | plain[pos + 3])
        if first & 0x20:
            padding = plain[-1]
            if not padding or padding > end - pos:
                self.malformed += 1
                return True
            end -= padding
        if pos > end:
            self.malformed += 1
            return True
        packet = FastRtpPacket(second & 0x7F, second >> 7, sequence_number, timestamp, ssrc)
        packet.payload = packet._data = plain[pos:end]
        self._active[ssrc] = clock.current_datetime()
        stats = self._streams.get(ssrc)
        if stats is None:
            stats = self._streams[ssrc] = StreamStatistics(self._clock_rate)
        stats.add(packet)  # type: ignore[arg-type]  # reads sequence_number and timestamp
        self.packets += 1
        self._buffer.add(packet)
        return True

    def _resolve_payload_type(self) -> int | None:
        """The receiver learns its codecs just after DTLS connects; until then aiortc's path
        (which drops media for an unstarted receiver) keeps every packet."""
        for payload_type, codec in self._codecs.items():
            if getattr(codec, "mimeType", "").lower() == "audio/opus":
                self._clock_rate = codec.clockRate
                self.payload_type = payload_type
                break
        return self.payload_type

    def _accept(self, ssrc: int, payload_type: int) -> bool:
        """Ask aiortc's router (it also learns a new SSRC as aiortc would)."""
        probe = FastRtpPacket(payload_type, 0, 0, 0, ssrc)
        if self._router.route_rtp(probe) is not self._receiver:
            return False
        self._accepted.add(ssrc)
        return True


class FastSend:
    """The send fast path of one call's Opus stream: aiortc's sender still fetches each frame
    (`_next_encoded_frame`: the track's `recv()`, its packing, `carry_audio_level`), and its
    RTCP task still sends the sender reports; this loop replaces only the per-packet part of
    `RTCRtpSender._run_rtp`: a header prebuilt with aiortc's own `HeaderExtensionsMap` (one
    per audio level), `protect`, one `sendto` on the selected candidate pair. It keeps the
    counters the sender reports read (packets, octets, last RTP timestamp and its NTP time)
    and the DTLS transport's tx counters. Not kept: aiortc's retransmission history (aiortc
    negotiates no NACK for audio, so it is never read). Counters: `packets`, `octets`."""

    def __init__(self, sender: Any) -> None:
        self.packets = 0
        self.octets = 0
        self.running = False  # the fast loop (not aiortc's) sends this call's RTP
        self._sender = sender
        self._original: Any = None
        self._ext_cache: dict[tuple[int | None, int], tuple[bytes, bytes]] = {}

    def install(self) -> None:
        """Take over `RTCRtpSender._run_rtp` before the sender starts (aiortc starts it right
        after DTLS connects). Raises `RuntimeError` naming what is not as expected."""
        sender = self._sender
        dtls = getattr(sender, "transport", None)
        connection = getattr(getattr(dtls, "transport", None), "_connection", None)
        names = [
            f"RTCRtpSender.{name}"
            for name in (_S_STARTED, _S_RTP_STARTED, _S_RTP_EXITED, *_S_COUNTERS, _S_MAP, _S_MID)
            if not hasattr(sender, name)
        ]
        names += [
            f"RTCRtpSender.{name}"
            for name in ("_run_rtp", "_next_encoded_frame", "_ssrc", "_enabled")
            if not hasattr(sender, name)
        ]
        names += [
            f"RTCDtlsTransport.{name}"
            for name in ("_tx_srtp", "_state", _TX_BYTES, _TX_PACKETS)
            if not hasattr(dtls, name)
        ]
        if not isinstance(getattr(connection, "_nominated", None), dict):
            names.append("aioice Connection._nominated")
        connected = getattr(type(getattr(dtls, "_state", None)), "CONNECTED", None)
        if connected is None:
            names.append("RTCDtlsTransport._state.CONNECTED")
        if names:
            raise RuntimeError(
                "aiortc/aioice internals differ from what the RTP send fast path expects: "
                + ", ".join(names)
            )
        if getattr(sender, _S_STARTED):
            raise RuntimeError("the RTP sender had already started")
        self._dtls = dtls
        self._connected = connected
        self._connection = connection
        self._original = sender._run_rtp
        sender._run_rtp = self._run_rtp

    def counts(self) -> dict[str, int]:
        return {"sent_packets": self.packets, "sent_octets": self.octets}

    def _header_parts(self, level: int | None, marker: int) -> tuple[bytes, bytes]:
        """The first two bytes and the header extensions of a packet, as
        `RtpPacket.serialize` writes them with this sender's `HeaderExtensionsMap`."""
        key = (level, marker)
        parts = self._ext_cache.get(key)
        if parts is None:
            values = HeaderExtensions()
            values.mid = self._mid
            if level is not None:
                values.audio_level = (False, -level)
            profile, value = self._ext_map.set(values)
            first = 0x90 if value else 0x80
            ext = struct.pack("!HH", profile, len(value) >> 2) + value if value else b""
            parts = bytes((first, (marker << 7) | self._payload_type)), ext
            self._ext_cache[key] = parts
        return parts

    async def _run_rtp(self, codec: Any) -> None:
        sender = self._sender
        if codec.mimeType.lower() != "audio/opus" or self._per_packet_extensions(sender):
            return await self._original(codec)  # not the case this path is built for
        self._payload_type = codec.payloadType
        getattr(sender, _S_RTP_STARTED).set()
        self.running = True
        dtls, connection = self._dtls, self._connection
        connected = self._connected
        tx = dtls._tx_srtp
        pack = _HEADER.pack
        ssrc = sender._ssrc
        sequence_number = struct.unpack("!H", os.urandom(2))[0]
        origin = struct.unpack("!L", os.urandom(4))[0]
        try:
            while True:
                track = sender.track
                if track is None:
                    await asyncio.sleep(0.02)
                    continue
                if getattr(track, "encoded", False) and hasattr(track, "recv_opus"):
                    # our PlayoutTrack: the packet as it is, no av.Packet to unwrap
                    payload, rtp_time = await track.recv_opus()
                    if not sender._enabled:
                        continue  # aiortc's rule: keep reading the track, send nothing
                    payloads, level = (payload,), track.audio_level
                else:
                    frame = await sender._next_encoded_frame(codec)
                    if frame is None:
                        continue
                    payloads, rtp_time, level = frame.payloads, frame.timestamp, frame.audio_level
                timestamp = (origin + rtp_time) & 0xFFFFFFFF
                last = len(payloads) - 1
                for i, payload in enumerate(payloads):
                    head, ext = self._header_parts(level, 1 if i == last else 0)
                    data = head + pack(sequence_number, timestamp, ssrc) + ext + payload
                    if dtls._state is not connected:
                        raise ConnectionError("Cannot send encrypted RTP, not connected")
                    data = tx.protect(data)
                    pair = connection._nominated.get(1)
                    if pair is None:
                        raise ConnectionError("Cannot send data, not connected")
                    protocol = pair.protocol
                    override = protocol.__dict__.get("send_data")
                    if override is None:
                        protocol.transport.sendto(data, pair.remote_addr)
                    else:  # someone wraps this socket's sends (a test's impairment): honour it
                        await override(data, pair.remote_addr)
                    dtls._RTCDtlsTransport__tx_bytes += len(data)
                    dtls._RTCDtlsTransport__tx_packets += 1
                    sender._RTCRtpSender__ntp_timestamp = _ntp_now()
                    sender._RTCRtpSender__rtp_timestamp = timestamp
                    sender._RTCRtpSender__octet_count += len(payload)
                    sender._RTCRtpSender__packet_count += 1
                    self.packets += 1
                    self.octets += len(payload)
                    sequence_number = (sequence_number + 1) & 0xFFFF
        except (asyncio.CancelledError, ConnectionError, MediaStreamError):
            pass
        except Exception:  # like aiortc: the sender's stop() must not hang on us
            log.exception("RTP send fast path failed; this call sends no more audio")
        finally:
            self.running = False
            track = sender.track
            if track is not None:
                track.stop()
                sender.replaceTrack(None)
            getattr(sender, _S_RTP_EXITED).set()

    def _per_packet_extensions(self, sender: Any) -> bool:
        """Whether a negotiated extension changes on every packet (abs-send-time,
        transport-cc: video in aiortc): then aiortc's own loop is used."""
        self._ext_map = getattr(sender, _S_MAP)
        self._mid = getattr(sender, _S_MID)
        for name in ("abs_send_time", "transport_sequence_number"):
            values = HeaderExtensions()
            setattr(values, name, 0)
            if self._ext_map.set(values)[1]:
                return True
        return False


def _ntp_now() -> int:
    """`aiortc.clock.current_ntp_time()` (64-bit NTP time) without the datetime arithmetic."""
    now = time.time() + _NTP_OFFSET
    seconds = int(now)
    return (seconds << 32) | int((now - seconds) * 4294967296.0)


class RtpFast:
    """What `install` put in place for one call: `receive` and `send` (None = aiortc's)."""

    def __init__(self, receive: FastReceive | None, send: FastSend | None) -> None:
        self.receive = receive
        self.send = send

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.receive is not None:
            out.update(self.receive.counts())
        if self.send is not None:
            out.update(self.send.counts())
        return out


def install(transceiver: Any, buffer: Any, *, send: bool = True) -> RtpFast:
    """Install the fast paths for this call's transceiver: receive if `buffer` is our
    `LowLatencyAudioBuffer` (aiortc's own buffer keeps aiortc's path), send if `send` and the
    sender has not started. Either one that finds aiortc's internals not as expected logs
    one warning and leaves aiortc's path; the call goes on unchanged."""
    receive: FastReceive | None = None
    if isinstance(buffer, LowLatencyAudioBuffer):
        receive = FastReceive(transceiver, buffer)
        try:
            receive.install()
        except Exception as exc:  # RuntimeError names the internal; anything else, too
            log.warning("RTP receive fast path not used, aiortc's path stays: %s%s", exc, _HINT)
            receive = None
    sending: FastSend | None = None
    if send:
        sending = FastSend(transceiver.sender)
        try:
            sending.install()
        except Exception as exc:  # never fail the call (this runs in aiortc's state callback)
            log.warning("RTP send fast path not used, aiortc's path stays: %s%s", exc, _HINT)
            sending = None
    return RtpFast(receive, sending)
