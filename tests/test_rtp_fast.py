"""The RTP fast paths under aiortc (media.rtp_fast), between a real `CallMedia` and a
simulated WhatsApp user (a real aiortc peer) on 127.0.0.1: what reaches our buffer and how,
byte for byte; loss and reordering; RTCP reports both ways; RTCP BYE; the fallback when
aiortc's internals are not what the code expects; and the send path's packets on the wire."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct

import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCIceServer, RTCIceTransportPolicy, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import RtcpByePacket, RtcpRrPacket, RtcpSrPacket, RtpPacket
from test_inbound_audio import opus_packets, sine
from whatsapp_call.bridge.playout import PlayoutTrack
from whatsapp_call.media import rtp_fast
from whatsapp_call.media.ice import host_addresses
from whatsapp_call.media.jitter import LowLatencyAudioBuffer, install_receive_buffer
from whatsapp_call.media.peer import CallMedia, opus_only
from whatsapp_call.media.sender import carry_audio_level
from whatsapp_call_sim.audio import frame_to_mono, level_dbfs, tone
from whatsapp_call_sim.turn import TurnServer
from whatsapp_call_sim.user import AudioPlayerTrack, Say, SimulatedUser, UserScript

LOOPBACK = ["127.0.0.1"]


async def connect(user: SimulatedUser, **media_kwargs) -> CallMedia:
    media = CallMedia(host_addresses=LOOPBACK, **media_kwargs)
    async with asyncio.timeout(10):
        answer = await user.answer(await media.create_offer())
        await media.accept_answer(answer)
        await media.wait_connected(5)
        await user.wait_connected(5)
    return media


@contextlib.asynccontextmanager
async def connected(user: SimulatedUser, **media_kwargs):
    """A connected CallMedia to `user`; both are closed afterwards, whatever happens."""
    media = None
    try:
        media = await connect(user, **media_kwargs)
        yield media
    finally:
        if media:
            await media.close()
        await user.close()


async def wait_for(predicate, timeout: float = 5.0, step: float = 0.01) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(step)


def user_sender(user: SimulatedUser):
    return user._pc.getTransceivers()[0].sender


def tap_user_rtp(user: SimulatedUser) -> list[RtpPacket]:
    """Record every RTP packet the user's aiortc sends (plaintext, parsed by aiortc)."""
    dtls = user_sender(user).transport
    sent: list[RtpPacket] = []
    send = dtls._send_rtp

    async def _send_rtp(data: bytes) -> None:
        if not 192 <= data[1] <= 208:
            sent.append(RtpPacket.parse(data, dtls._rtp_header_extensions_map))
        await send(data)

    dtls._send_rtp = _send_rtp
    return sent


def tap_buffer(media: CallMedia) -> list[tuple[str, int, int, int, int, bytes]]:
    """Record what our buffer's `add()` is handed (packet type, seq, ts, ssrc, pt, payload)."""
    buffer = media._buffer
    seen: list[tuple[str, int, int, int, int, bytes]] = []
    add = buffer.add

    def _add(packet):
        payload = getattr(packet, "_data", packet.payload)
        seen.append(
            (
                type(packet).__name__,
                packet.sequence_number,
                packet.timestamp,
                packet.ssrc,
                packet.payload_type,
                bytes(payload),
            )
        )
        return add(packet)

    buffer.add = _add
    return seen


def user_srtp(media: CallMedia, user: SimulatedUser, rtp: list[bytes]) -> list[bytes]:
    """Protect plaintext RTP with the user's own SRTP session (so we accept it as theirs)."""
    tx = user_sender(user).transport._tx_srtp
    return [tx.protect(data) for data in rtp]


def our_protocol(media: CallMedia):
    connection = media._transceiver.sender.transport.transport._connection
    pair = connection._nominated[1]
    return pair.protocol, pair.remote_addr


async def silence_the_user(media: CallMedia, user: SimulatedUser) -> tuple[int, int, int, int]:
    """Stop the user's own RTP; returns (ssrc, payload type, next seq, next ts) of its stream."""
    sender = user_sender(user)
    sender._enabled = False
    await asyncio.sleep(0.1)  # a packet already on its way arrives
    stats = media._transceiver.receiver._RTCRtpReceiver__remote_streams[sender._ssrc]
    pt = media.rtp_fast.receive.payload_type
    return sender._ssrc, pt, (stats.max_seq + 1) & 0xFFFF, stats._last_timestamp + 960


def raw_rtp(
    pt: int,
    seq: int,
    ts: int,
    ssrc: int,
    payload: bytes,
    *,
    csrcs: tuple[int, ...] = (),
    extension: bytes | None = None,
    padding: int = 0,
) -> bytes:
    first = 0x80 | len(csrcs) | (0x10 if extension is not None else 0) | (0x20 if padding else 0)
    data = struct.pack("!BBHII", first, pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc)
    data += b"".join(struct.pack("!I", c) for c in csrcs)
    if extension is not None:
        data += struct.pack("!HH", 0xBEDE, len(extension) // 4) + extension
    data += payload
    if padding:
        data += bytes(padding - 1) + bytes([padding])
    return data


# -- receive ----------------------------------------------------------------------------------


async def test_inbound_packets_take_the_fast_path_with_aiortcs_payloads_and_headers():
    user = SimulatedUser("15550201", UserScript((Say("hello"),)), light_media=True)
    async with connected(user) as media:
        assert media.rtp_fast.receive is not None and media.rtp_fast.send is not None
        sent = tap_user_rtp(user)
        seen = tap_buffer(media)
        await wait_for(lambda: len(seen) >= 60)
        fast = media.rtp_fast.receive
        assert fast.packets >= 60 and fast.srtp_errors == fast.malformed == fast.errors == 0
        assert {kind for kind, *_ in seen} == {"FastRtpPacket"}
        # byte-identical to what the user's aiortc put on the wire (and would parse back)
        by_seq = {p.sequence_number: p for p in sent}
        assert all(s[1] in by_seq for s in seen)
        for _, seq, ts, ssrc, pt, payload in seen:
            packet = by_seq[seq]
            assert (ts, ssrc, pt, payload) == (
                packet.timestamp,
                packet.ssrc,
                packet.payload_type,
                packet.payload,
            )
        assert any(len(s[5]) > 20 for s in seen)  # speech, not only silence frames
        # aiortc's bookkeeping is fed: receiver statistics, active sources, DTLS counters
        receiver = media._transceiver.receiver
        stats = receiver._RTCRtpReceiver__remote_streams[user_sender(user)._ssrc]
        assert stats.packets_received >= fast.packets
        assert [s.source for s in receiver.getSynchronizationSources()] == [user_sender(user)._ssrc]
        transport = (await media.pc.getStats()).values()
        received = [s.packetsReceived for s in transport if s.type == "transport"]
        assert received and received[0] >= fast.packets


async def test_the_fast_parser_reads_csrcs_extensions_and_padding_and_drops_the_bad():
    user = SimulatedUser("15550202", UserScript.silent(), light_media=True)
    async with connected(user) as media:
        await wait_for(lambda: media._buffer.stats.packets > 3)
        ssrc, pt, seq, ts = await silence_the_user(media, user)
        seen = tap_buffer(media)
        protocol, addr = our_protocol(media)
        payloads = [bytes([0xF8, i]) * 20 for i in range(6)]
        plain = [
            raw_rtp(pt, seq, ts, ssrc, payloads[0]),
            raw_rtp(pt, seq + 1, ts + 960, ssrc, payloads[1], csrcs=(7, 8)),
            raw_rtp(pt, seq + 2, ts + 1920, ssrc, payloads[2], extension=b"\x10\x30\x20\x05"),
            raw_rtp(pt, seq + 3, ts + 2880, ssrc, payloads[3], padding=4),
            raw_rtp(
                pt, seq + 4, ts + 3840, ssrc, payloads[4], csrcs=(9,), extension=bytes(8), padding=1
            ),
        ]
        bad_padding = raw_rtp(pt, seq + 5, ts + 4800, ssrc, b"\x01\x02", padding=2)[:-1] + b"\xff"
        packets = user_srtp(media, user, [*plain, bad_padding])
        forged = bytearray(user_srtp(media, user, [raw_rtp(pt, seq + 6, ts, ssrc, payloads[5])])[0])
        forged[-1] ^= 0xFF  # the auth tag no longer matches
        replay = packets[0]
        for data in [*packets, bytes(forged), replay]:
            protocol.datagram_received(data, addr)
        fast = media.rtp_fast.receive
        assert [s[5] for s in seen] == payloads[:5]
        for (_, *fields, payload), data in zip(seen, plain, strict=True):
            parsed = RtpPacket.parse(data)
            assert fields == [parsed.sequence_number, parsed.timestamp, parsed.ssrc, pt]
            assert payload == parsed.payload
        assert fast.malformed == 1 and fast.srtp_errors == 2 and fast.errors == 0


async def test_loss_and_reordering_through_the_fast_path_are_handled_by_the_buffer():
    user = SimulatedUser("15550203", UserScript.silent(), light_media=True)
    async with connected(user) as media:
        await wait_for(lambda: media._buffer.stats.packets > 3)
        ssrc, pt, seq, ts = await silence_the_user(media, user)
        frames: list = []
        deliver = media._deliver
        media._buffer._deliver = lambda frame: (frames.append(frame), deliver(frame))
        opus = [p.payload for p in opus_packets([sine(440, 0.3)])][:12]
        plain = [raw_rtp(pt, seq + i, ts + i * 960, ssrc, opus[i]) for i in range(12)]
        srtp = user_srtp(media, user, plain)
        protocol, addr = our_protocol(media)
        stats = media._buffer.stats
        before = stats.lost, stats.concealed, stats.late
        order = [0, 1, 3, 2, 4, 6, 7, 8]  # 2 late but in time; 5 lost
        for i in order:
            protocol.datagram_received(srtp[i], addr)
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)  # past the buffer's wait: 5 is given up and concealed
        for i in (5, 9, 10, 11):  # 5 now too late
            protocol.datagram_received(srtp[i], addr)
        assert media.rtp_fast.receive.packets >= 12
        assert (stats.lost - before[0], stats.concealed - before[1], stats.late - before[2]) == (
            1,
            1,
            1,
        )
        pts = [f.pts for f in frames]
        assert len(frames) == 12 and np.all(np.diff(pts) == 960)


async def test_our_rtcp_receiver_reports_still_tell_the_truth():
    user = SimulatedUser("15550204", UserScript((Say("hello"),)), light_media=True)
    async with connected(user) as media:
        sender = user_sender(user)
        sent = tap_user_rtp(user)
        reports = []
        handle = sender._handle_rtcp_packet

        async def _handle_rtcp_packet(packet):
            if isinstance(packet, RtcpRrPacket):
                reports.extend(r for r in packet.reports if r.ssrc == sender._ssrc)
            await handle(packet)

        sender._handle_rtcp_packet = _handle_rtcp_packet
        await wait_for(lambda: len(reports) >= 2, timeout=6)
        assert media.rtp_fast.receive.packets > 50
        last = reports[-1]
        sent_seqs = {p.sequence_number for p in sent}
        assert last.highest_sequence & 0xFFFF in sent_seqs  # our receiver saw the live stream
        assert (last.highest_sequence - reports[0].highest_sequence) % 65536 > 0
        assert last.packets_lost == 0 and last.fraction_lost == 0


async def test_an_rtcp_bye_still_ends_the_call_media():
    user = SimulatedUser("15550205", UserScript.silent(), light_media=True)
    async with connected(user, dead_peer_seconds=30) as media:
        await wait_for(lambda: media.rtp_fast.receive.packets > 5)
        sender = user_sender(user)
        await sender._send_rtcp([RtcpByePacket(sources=[sender._ssrc])])  # BYE alone
        async with asyncio.timeout(3):
            await media.ended.wait()
        assert media.end_reason == "closed"


# -- fallback ---------------------------------------------------------------------------------


async def test_unexpected_aiortc_internals_leave_aiortcs_paths_with_one_warning(
    monkeypatch, caplog
):
    monkeypatch.setattr(rtp_fast, "_REMOTE_STREAMS", "_RTCRtpReceiver__renamed_streams")
    monkeypatch.setattr(rtp_fast, "_S_RTP_EXITED", "_RTCRtpSender__renamed_exited")
    track = PlayoutTrack(sample_rate=48000)
    user = SimulatedUser("15550206", UserScript((Say("hello"),)))
    media = None
    try:
        with caplog.at_level(logging.WARNING, logger=rtp_fast.__name__):
            media = await connect(user, outbound_track=track)
        warnings = [r.getMessage() for r in caplog.records if r.name == rtp_fast.__name__]
        assert len(warnings) == 2
        assert "receive fast path not used" in warnings[0] and "renamed_streams" in warnings[0]
        assert "send fast path not used" in warnings[1] and "renamed_exited" in warnings[1]
        assert media.rtp_fast.receive is None and media.rtp_fast.send is None
        # the call works the aiortc way: audio both ways
        track.write(tone(0.4, freq=440).tobytes())
        await wait_for(lambda: media._buffer.stats.packets > 30)
        await wait_for(lambda: user.audible_ms() >= 300, timeout=5)
    finally:
        if media:
            await media.close()
        await user.close()


async def test_uninstalling_gives_the_socket_back_to_aiortc():
    user = SimulatedUser("15550210", UserScript.silent(), light_media=True)
    async with connected(user) as media:
        receive = media.rtp_fast.receive
        await wait_for(lambda: receive.packets > 3)
        protocol, _ = our_protocol(media)
        assert "datagram_received" in protocol.__dict__
        receive.uninstall()
        assert "datagram_received" not in protocol.__dict__  # aioice's own method again
        seen = tap_buffer(media)
        await wait_for(lambda: len(seen) >= 5)
        assert {kind for kind, *_ in seen} == {"RtpPacket"}  # parsed and routed by aiortc


async def test_aiortcs_own_buffer_keeps_aiortcs_receive_path():
    user = SimulatedUser("15550207", UserScript.silent(), light_media=True)
    async with connected(user, low_latency_receive=False) as media:
        assert media.rtp_fast.receive is None and media.rtp_fast.send is not None
        async with asyncio.timeout(5):
            await media.recv()  # decoded by aiortc, as before
        assert not isinstance(media._buffer, LowLatencyAudioBuffer)


async def test_the_fast_path_is_counted_in_the_record_and_can_be_switched_off():
    """`rtpFastPath: false` (CallMedia(rtp_fast_path=False)) keeps aiortc's paths whole; on,
    the call's inbound stats count what went the fast way."""
    for enabled in (True, False):
        user = SimulatedUser("15550208", UserScript.silent(), light_media=True)
        media = None
        try:
            media = await connect(user, rtp_fast_path=enabled)
            async with asyncio.timeout(5):
                await media.recv()
                await media.recv()
            counts = media.inbound_stats()["rtp_fast_path"]
            if enabled:
                fast = media.rtp_fast
                await wait_for(
                    lambda fast=fast: (
                        fast.counts()["packets"] >= 5 and fast.counts()["sent_packets"] >= 5
                    )
                )
                counts = media.inbound_stats()["rtp_fast_path"]
                assert counts["srtp_errors"] == 0 and counts["malformed"] == 0, counts
            else:
                assert media.rtp_fast is None and counts is None
                assert "datagram_received" not in our_protocol(media)[0].__dict__
                assert "_run_rtp" not in media._transceiver.sender.__dict__
        finally:
            if media:
                await media.close()
            await user.close()


# -- send -------------------------------------------------------------------------------------


async def test_sent_packets_are_what_aiortc_would_serialize_and_the_user_hears_them():
    track = PlayoutTrack(sample_rate=48000)
    user = SimulatedUser("15550208", UserScript.silent())
    async with connected(user, outbound_track=track) as media:
        fast = media.rtp_fast.send
        assert fast is not None
        await wait_for(lambda: fast.running)
        aiortc_fetches = []  # our PlayoutTrack's packets skip aiortc's frame fetch
        fetch = media._transceiver.sender._next_encoded_frame
        media._transceiver.sender._next_encoded_frame = lambda codec: (
            aiortc_fetches.append(1) or fetch(codec)
        )
        their_dtls = user_sender(user).transport
        plain: list[bytes] = []
        handle = their_dtls._handle_rtp_data

        async def _handle_rtp_data(data: bytes, arrival_time_ms: int) -> None:
            plain.append(data)
            await handle(data, arrival_time_ms)

        their_dtls._handle_rtp_data = _handle_rtp_data
        sr: list = []
        receiver = user._pc.getTransceivers()[0].receiver
        handle_rtcp = receiver._handle_rtcp_packet

        async def _handle_rtcp_packet(packet):
            if isinstance(packet, RtcpSrPacket):
                sr.append(packet)
            await handle_rtcp(packet)

        receiver._handle_rtcp_packet = _handle_rtcp_packet
        track.write(tone(0.6, freq=440).tobytes())
        await wait_for(lambda: user.audible_ms() >= 500, timeout=5)
        await wait_for(lambda: len(sr) >= 2, timeout=6)
        segments = user.speech_segments()
        assert len(segments) == 1 and 500 <= segments[0].duration_ms <= 800
        sender = media._transceiver.sender
        ext_map = sender._RTCRtpSender__rtp_header_extensions_map
        packets = [RtpPacket.parse(d, their_dtls._rtp_header_extensions_map) for d in plain]
        assert len(packets) > 40
        assert {p.ssrc for p in packets} == {sender._ssrc}
        assert {(p.payload_type, p.marker, p.extensions.mid) for p in packets} == {
            (fast._payload_type, 1, sender._RTCRtpSender__mid)
        }
        assert np.all(np.diff([p.sequence_number for p in packets]) % 65536 == 1)
        assert np.all(np.diff([p.timestamp for p in packets]) % 2**32 == 960)
        levels = {p.extensions.audio_level for p in packets}
        assert (False, 127) in levels and any(lv[1] < 40 for lv in levels)  # silence and tone
        for data, packet in zip(plain, packets, strict=True):
            again = RtpPacket(
                payload_type=packet.payload_type,
                marker=1,
                sequence_number=packet.sequence_number,
                timestamp=packet.timestamp,
                ssrc=packet.ssrc,
                payload=packet.payload,
            )
            again.extensions.mid = packet.extensions.mid
            again.extensions.audio_level = packet.extensions.audio_level
            assert again.serialize(ext_map) == data  # byte for byte aiortc's packet
        # the sender reports carry the fast path's counters
        last = sr[-1].sender_info
        assert 0 < last.packet_count <= fast.packets
        assert last.octet_count <= fast.octets
        assert last.rtp_timestamp in {p.timestamp for p in packets}
        stats = [s for s in (await media.pc.getStats()).values() if s.type == "outbound-rtp"]
        assert 0 <= fast.packets - stats[0].packetsSent <= 2  # a packet may leave meanwhile
        assert sender._RTCRtpSender__packet_count == fast.packets
        assert aiortc_fetches == [] and track.frames >= fast.packets  # via recv_opus()


async def test_closing_stops_the_send_loop_and_the_user_notices():
    track = PlayoutTrack(sample_rate=48000)
    user = SimulatedUser("15550209", UserScript.silent(), light_media=True)
    async with connected(user, outbound_track=track) as media:
        await wait_for(lambda: media.rtp_fast.send.packets > 5)
        async with asyncio.timeout(5):
            await media.close()
        assert not media.rtp_fast.send.running and track.readyState == "ended"
        async with asyncio.timeout(5):
            await user.ended.wait()


# -- through a TURN relay ---------------------------------------------------------------------


@pytest.mark.skipif(
    not TurnServer.available(),
    reason="coturn's turnserver is not installed (apt-get install -y coturn): no TURN relay",
)
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_both_fast_paths_work_through_a_turn_relay(transport):
    """Relayed candidates: aioice's TURN client hands data to the same protocol object we
    hook, and the selected pair's transport is the TURN allocation."""
    server = TurnServer()
    await server.start()
    username, credential = server.credentials(600)
    ice = RTCIceServer(server.urls()[f"turn_{transport}"], username, credential)

    def config() -> RTCConfiguration:
        return RTCConfiguration(iceServers=[ice], iceTransportPolicy=RTCIceTransportPolicy.RELAY)

    ours, far = RTCPeerConnection(config()), RTCPeerConnection(config())
    heard: list = []
    received: list = []
    installed: list[rtp_fast.RtpFast] = []
    try:
        playout = PlayoutTrack(sample_rate=48000)
        transceiver = ours.addTransceiver(playout, direction="sendrecv")
        opus_only(transceiver)
        carry_audio_level(transceiver.sender)
        buffer = LowLatencyAudioBuffer(received.append)
        install_receive_buffer(transceiver.receiver, buffer)
        dtls = transceiver.sender.transport

        @dtls.on("statechange")
        def _connected() -> None:
            if dtls.state == "connected":
                installed.append(rtp_fast.install(transceiver, buffer))

        player = AudioPlayerTrack()
        far.addTrack(player)

        @far.on("track")
        def _on_track(track) -> None:
            async def listen() -> None:
                with contextlib.suppress(MediaStreamError):
                    while True:
                        heard.append(frame_to_mono(await track.recv()))

            asyncio.ensure_future(listen())

        async with asyncio.timeout(15):
            with host_addresses(LOOPBACK):
                await ours.setLocalDescription(await ours.createOffer())
                await far.setRemoteDescription(ours.localDescription)
                await far.setLocalDescription(await far.createAnswer())
            await ours.setRemoteDescription(far.localDescription)
            await wait_for(lambda: installed, timeout=10)
            pair = dtls.transport._connection._nominated[1]
            assert pair.local_candidate.type == "relay"
            player.play(tone(0.5, freq=440))
            playout.write(tone(0.5, freq=660).tobytes())
            await wait_for(lambda: installed[0].receive.packets >= 40, timeout=5)
            await wait_for(lambda: installed[0].send.packets >= 40, timeout=5)
            await wait_for(lambda: sum(level_dbfs(s) > -30 for s in heard) >= 20, timeout=5)
        assert sum(level_dbfs(frame_to_mono(f)) > -30 for f in received) >= 20
        assert installed[0].receive.srtp_errors == installed[0].receive.malformed == 0
    finally:
        await ours.close()
        await far.close()
        await server.stop()
