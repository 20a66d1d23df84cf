"""CPU per RTP packet: aiortc's paths vs our fast paths (media.rtp_fast), receive and send.

One `CallMedia` (ours) connected to a simulated WhatsApp user (aiortc, light media) on
127.0.0.1; CPU is the event-loop thread's (`time.thread_time`).

Receive: `--packets` real SRTP packets (20 ms Opus frames of a tone, with the user's header
extensions, next in the user's sequence, protected with the user's own SRTP session) reach
our socket's protocol object, `--batch` at a time, and we count the CPU until our buffer has
them, minus the idle cost of the same wall time (the call's own 50 packets/s, RTCP, timers).
  - how=direct: handed to the protocol's `datagram_received` (no syscalls, no other thread);
  - how=socket: sent by a worker thread from a UDP socket, `--batch` per millisecond (adds
    the loop's recvfrom per datagram, as in a call).
  sink=count: the buffer's `add()` only counts (the path's own cost); sink=decode: our real
  `LowLatencyAudioBuffer` (Opus decoding included, what a call pays).

Send: our outbound track hands the sender `--packets` ready Opus packets back to back (no
pacing, no await in between, so nothing else runs) and the CPU from the first to the last
is divided by the packets: aiortc's `RTCRtpSender._run_rtp` loop vs `FastSend`, both behind
aiortc's own frame fetch (`_next_encoded_frame`, `carry_audio_level`).

    .venv/bin/python -m bench.rtp_path_bench [--packets 5000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import functools
import json
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtp import RtpPacket
from whatsapp_call.media import rtp_fast
from whatsapp_call.media.jitter import LowLatencyAudioBuffer, install_receive_buffer
from whatsapp_call.media.peer import CallMedia
from whatsapp_call_sim.user import SimulatedUser, UserScript

HOST = "127.0.0.1"
RESULTS = Path(__file__).parent / "results"
TIME_BASE = fractions.Fraction(1, 48000)


class CountingBuffer(LowLatencyAudioBuffer):
    """A buffer whose `add()` only counts (isolates the path's cost from Opus decoding)."""

    def add(self, packet: Any) -> tuple[bool, None]:
        self.stats.packets += 1
        self.last_arrival = time.monotonic()
        return False, None


class BurstTrack(MediaStreamTrack):
    """Ready Opus packets, paced at 20 ms until `burst(n)`: then n back to back, timing the
    event-loop thread's CPU from the first to the last."""

    kind = "audio"

    def __init__(self, payload: bytes) -> None:
        super().__init__()
        self.payload = payload
        self.audio_level = -30  # so the packets carry the audio-level extension
        self._pts = 0
        self._left = 0
        self._started: float | None = None
        self.done: asyncio.Future[float] | None = None

    def burst(self, n: int) -> asyncio.Future[float]:
        self._left = n
        self._started = None
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    async def recv(self) -> av.Packet:
        if self._left:
            if self._started is None:
                self._started = time.thread_time()
            self._left -= 1
            if not self._left and self.done is not None and not self.done.done():
                self.done.set_result(time.thread_time() - self._started)
        else:
            await asyncio.sleep(0.02)
        packet = av.Packet(self.payload)
        packet.pts, packet.time_base = self._pts, TIME_BASE
        self._pts += 960
        return packet


def opus_payloads(count: int) -> list[bytes]:
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = 48000, "mono", "s16"
    encoder.bit_rate = 32000
    t = np.arange(960 * 50) / 48000
    tone = (6000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    out: list[bytes] = []
    i = 0
    while len(out) < count:
        chunk = tone[(i % 50) * 960 : (i % 50 + 1) * 960].reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
        frame.sample_rate, frame.pts = 48000, i * 960
        out += [bytes(p) for p in encoder.encode(frame)]
        i += 1
    return out[:count]


async def connected(*, fast_send: bool, track: Any = None) -> tuple[CallMedia, SimulatedUser]:
    user = SimulatedUser("15550100", UserScript.silent(), light_media=True)
    media = CallMedia(host_addresses=[HOST], dead_peer_seconds=60, outbound_track=track)
    install = rtp_fast.install
    if not fast_send:  # CallMedia installs both paths when DTLS connects: ask for receive only
        rtp_fast.install = functools.partial(install, send=False)
    try:
        async with asyncio.timeout(10):
            offer = await media.create_offer()
            await media.accept_answer(await user.answer(offer))
            await media.wait_connected(5)
            await user.wait_connected(5)
            await asyncio.sleep(0.3)  # the receiver is started and has seen the user's stream
    finally:
        rtp_fast.install = install
    return media, user


def use_sink(media: CallMedia, mode: str, sink: str) -> None:
    receive = media.rtp_fast.receive if media.rtp_fast else None
    if receive is None:
        raise SystemExit("the receive fast path did not install (see the warning above)")
    receive.uninstall()
    if sink == "count":
        counting = CountingBuffer(media._deliver)
        install_receive_buffer(media._transceiver.receiver, counting)
        media._buffer = counting
    if mode == "fast":
        media.rtp_fast.receive = rtp_fast.install(
            media._transceiver, media._buffer, send=False
        ).receive
    else:
        media.rtp_fast.receive = None


def srtp_packets(media: CallMedia, user: SimulatedUser, count: int) -> list[bytes]:
    """The user's next `count` RTP packets, serialized as its sender would and protected with
    its SRTP session (so our receiver accepts them as the user's stream)."""
    sender = user._pc.getTransceivers()[0].sender
    receiver = media._transceiver.receiver
    stats = receiver._RTCRtpReceiver__remote_streams[sender._ssrc]
    ext_map = sender._RTCRtpSender__rtp_header_extensions_map
    codecs = receiver._RTCRtpReceiver__codecs
    pt = next(pt for pt, c in codecs.items() if c.mimeType.lower() == "audio/opus")
    seq, ts = stats.max_seq + 1, stats._last_timestamp + 960
    tx = sender.transport._tx_srtp
    out = []
    for i, payload in enumerate(opus_payloads(count)):
        packet = RtpPacket(payload_type=pt, sequence_number=(seq + i) & 0xFFFF)
        packet.timestamp = (ts + i * 960) & 0xFFFFFFFF
        packet.ssrc = sender._ssrc
        packet.payload = payload
        packet.extensions.mid = sender._RTCRtpSender__mid
        packet.extensions.audio_level = (False, 20)
        out.append(tx.protect(packet.serialize(ext_map)))
    return out


def inject(packets: list[bytes], addr: tuple[str, int], batch: int) -> None:
    """Runs in a worker thread: its CPU is not the event-loop thread's."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(0, len(packets), batch):
            for data in packets[i : i + batch]:
                sock.sendto(data, addr)
            time.sleep(0.001)


async def direct(media: CallMedia, packets: list[bytes], batch: int) -> tuple[float, float]:
    """Hand the packets to our socket's protocol object, `batch` at a time, letting the loop
    run in between (aiortc's reader task drains its queue then). Returns (cpu s, wall s)."""
    connection = media._transceiver.sender.transport.transport._connection
    pair = connection._nominated[1]
    protocol, addr = pair.protocol, pair.remote_addr
    c0, w0 = time.thread_time(), time.monotonic()
    for i in range(0, len(packets), batch):
        for data in packets[i : i + batch]:
            protocol.datagram_received(data, addr)
        for _ in range(3):
            await asyncio.sleep(0)
    await asyncio.sleep(0.02)  # aiortc's reader task drains its queue
    return time.thread_time() - c0, time.monotonic() - w0


async def idle_cpu_per_s(seconds: float = 1.0) -> float:
    c0, w0 = time.thread_time(), time.monotonic()
    await asyncio.sleep(seconds)
    return (time.thread_time() - c0) / (time.monotonic() - w0)


async def measure_receive(mode: str, sink: str, how: str, count: int, batch: int) -> dict[str, Any]:
    media, user = await connected(fast_send=True)
    try:
        use_sink(media, mode, sink)
        user._pc.getTransceivers()[0].sender._enabled = False  # the user's own RTP stops
        await asyncio.sleep(0.1)
        packets = srtp_packets(media, user, count)
        idle = await idle_cpu_per_s()
        before = media._buffer.stats.packets
        if how == "direct":
            cpu, wall = await direct(media, packets, batch)
        else:
            addr = media._transceiver.sender.transport.transport._connection._nominated[
                1
            ].local_addr
            c0, w0 = time.thread_time(), time.monotonic()
            async with asyncio.timeout(60):
                await asyncio.to_thread(inject, packets, addr, batch)
            await asyncio.sleep(0.05)  # the last datagrams (and aiortc's queue) drain
            cpu, wall = time.thread_time() - c0, time.monotonic() - w0
        got = media._buffer.stats.packets - before
        receive = media.rtp_fast.receive
        return {
            "what": f"receive/{how}/{sink}",
            "mode": mode,
            "sent": count,
            "handled": got,
            "us_per_packet": max(0.0, cpu - idle * wall) / max(got, 1) * 1e6,
            "idle_cpu_per_s": idle,
            "wall_s": wall,
            "fast_counts": receive.counts() if receive else None,
        }
    finally:
        await media.close()
        await user.close()


async def measure_send(mode: str, count: int) -> dict[str, Any]:
    track = BurstTrack(opus_payloads(1)[0])
    media, user = await connected(fast_send=mode == "fast", track=track)
    try:
        if (media.rtp_fast.send is not None) != (mode == "fast"):
            raise SystemExit("the send fast path is not in the state asked for")
        counter = "_RTCRtpSender__packet_count"
        sender = media._transceiver.sender
        before = getattr(sender, counter)
        async with asyncio.timeout(60):
            cpu = await track.burst(count)
        await asyncio.sleep(0.05)  # the last packet of the burst leaves
        sent = getattr(sender, counter) - before
        return {
            "what": "send",
            "mode": mode,
            "sent": count,
            "handled": sent,
            # the CPU from the first recv() of the burst to the last covers count - 1 packets
            "us_per_packet": cpu / max(count - 1, 1) * 1e6,
        }
    finally:
        await media.close()
        await user.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=10, help="packets per burst / millisecond")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    cases = [
        f"receive/{how}/{sink}" for how in ("direct", "socket") for sink in ("count", "decode")
    ]
    cases.append("send")
    for _ in range(args.repeats):
        for case in cases:
            for mode in ("aiortc", "fast"):
                if case == "send":
                    run = await measure_send(mode, args.packets)
                else:
                    _, how, sink = case.split("/")
                    run = await measure_receive(mode, sink, how, args.packets, args.batch)
                runs.append(run)
                print(
                    f"{case:22} {mode:6} {run['us_per_packet']:6.1f} us/packet "
                    f"({run['handled']}/{run['sent']} handled)"
                )
    summary = {}
    print("\nmedian CPU per RTP packet (event-loop thread; receive: idle cost removed):")
    for case in cases:
        row: dict[str, Any] = {}
        for mode in ("aiortc", "fast"):
            row[mode] = statistics.median(
                r["us_per_packet"] for r in runs if r["mode"] == mode and r["what"] == case
            )
        row["saved_us"] = row["aiortc"] - row["fast"]
        row["saved_pct"] = 100 * (1 - row["fast"] / row["aiortc"]) if row["aiortc"] else None
        summary[case] = row
        print(
            f"  {case:22}: aiortc {row['aiortc']:6.1f} us, fast {row['fast']:6.1f} us "
            f"(-{row['saved_us']:.1f} us, {row['saved_pct']:.0f}% less)"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "rtp_path_bench.json"
    out.write_text(json.dumps({"args": vars(args), "summary": summary, "runs": runs}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
