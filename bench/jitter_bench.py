"""Inbound audio delay and choppiness: aiortc's default receive path vs ours.

A simulated WhatsApp user (aiortc) talks to a `CallMedia` through a UDP relay on 127.0.0.1
that drops RTP packets (0% or 2%) and delays each one by a uniform random 0..`jitter` ms
(30 ms: about 5% of consecutive packets arrive out of order). DTLS, STUN and RTCP pass
unharmed. The candidates in the offer and answer are rewritten to the relay's ports, so
all media really crosses it.

Measured per received frame at the consumer (a task awaiting `CallMedia.recv()`):
delay = RTP packet arrival at the receiver (after the relay) -> decoded frame returned.
Choppiness: frames concealed (synthesised for a lost packet), frames missing from the
timeline (neither received nor concealed), and the longest wait between two frames.

    .venv/bin/python -m bench.jitter_bench [--seconds 15] [--jitter-ms 30] [--seed 7]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
from whatsapp_call.media.jitter import delay_summary, install_receive_buffer
from whatsapp_call.media.peer import CallMedia
from whatsapp_call_sim.audio import load_utterance
from whatsapp_call_sim.user import SimulatedUser, UserScript

HOST = "127.0.0.1"


def _is_rtp(data: bytes) -> bool:
    """RTP, not RTCP/DTLS/STUN (RFC 7983 demultiplexing; RTCP types 192-223, RFC 5761)."""
    return len(data) >= 12 and 128 <= data[0] <= 191 and not 192 <= data[1] <= 223


class _Side(asyncio.DatagramProtocol):
    def __init__(self, on_datagram):
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.on_datagram(data)


class ImpairedRelay:
    """Two UDP sockets between a left peer (ours) and a right peer (the user). Packets the
    right peer sends towards us are impaired (RTP only); the other direction is clean."""

    def __init__(self, loss: float, jitter_ms: float, seed: int):
        self.loss = loss
        self.jitter = jitter_ms / 1000
        self.rng = random.Random(seed)
        self.left_addr: tuple[str, int] | None = None  # our real candidate
        self.right_addr: tuple[str, int] | None = None  # the user's real candidate
        self.dropped = 0
        self.forwarded = 0

    async def start(self) -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        _, self.facing_left = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_left), local_addr=(HOST, 0)
        )
        _, self.facing_right = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_right), local_addr=(HOST, 0)
        )
        return (
            self.facing_left.transport.get_extra_info("sockname")[1],
            self.facing_right.transport.get_extra_info("sockname")[1],
        )

    def _from_left(self, data: bytes) -> None:
        if self.right_addr:
            self.facing_right.transport.sendto(data, self.right_addr)

    def _from_right(self, data: bytes) -> None:
        if not self.left_addr:
            return
        if _is_rtp(data):
            if self.rng.random() < self.loss:
                self.dropped += 1
                return
            self.forwarded += 1
            delay = self.rng.uniform(0, self.jitter)
            asyncio.get_running_loop().call_later(delay, self._deliver_left, data)
        else:
            self.facing_left.transport.sendto(data, self.left_addr)

    def _deliver_left(self, data: bytes) -> None:
        if not self.facing_left.transport.is_closing():
            self.facing_left.transport.sendto(data, self.left_addr)

    def close(self) -> None:
        self.facing_left.transport.close()
        self.facing_right.transport.close()


def _retarget(sdp: str, port: int) -> tuple[str, int]:
    """Point the SDP's host candidate (and m-line) at `port`; return it and the old port."""
    match = re.search(rf"a=candidate:\S+ 1 udp \d+ {re.escape(HOST)} (\d+) typ host", sdp)
    assert match, "no loopback host candidate in the SDP"
    old = int(match.group(1))
    sdp = sdp.replace(f" {HOST} {old} typ host", f" {HOST} {port} typ host")
    sdp = re.sub(r"^m=audio \d+ ", f"m=audio {port} ", sdp, flags=re.M)
    return sdp, old


class _ArrivalTap:
    """Bench-only: notes when each RTP timestamp reached the receiver's buffer."""

    def __init__(self, inner):
        self.inner = inner
        self.arrivals: dict[int, float] = {}
        self.origin: int | None = None

    def add(self, packet):
        now = time.monotonic()
        if self.origin is None:
            self.origin = packet.timestamp
        self.arrivals.setdefault(packet.timestamp, now)
        return self.inner.add(packet)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@dataclass
class Result:
    path: str
    loss: float
    jitter_ms: float
    delays_ms: list[float] = field(default_factory=list)
    frames: int = 0
    concealed: int = 0
    missing: int = 0
    max_gap_ms: float = 0.0
    dropped_by_relay: int = 0
    late: int | None = None  # ours: packets that came after their deadline (dropped)


def _speech(seconds: float) -> np.ndarray:
    """The shipped utterances back to back with short pauses, repeated: speech-like audio."""
    parts = []
    for name in ("hello", "yes", "goodbye"):
        parts += [load_utterance(name), np.zeros(9600, dtype=np.int16)]
    one = np.concatenate(parts)
    reps = int(np.ceil(seconds * 48000 / len(one)))
    return np.tile(one, reps)[: int(seconds * 48000)]


async def run_once(low_latency: bool, loss: float, jitter_ms: float, seconds: float, seed: int):
    relay = ImpairedRelay(loss, jitter_ms, seed)
    left_port, right_port = await relay.start()
    media = CallMedia(host_addresses=[HOST], low_latency_receive=low_latency, inbound_rate=24000)
    user = SimulatedUser("bench", UserScript.silent(), start_media_timeout=30, media_timeout=30)
    result = Result("ours (low-latency)" if low_latency else "aiortc default", loss, jitter_ms)
    try:
        offer = await media.create_offer()
        tap = _ArrivalTap(None)
        if low_latency:  # tap our buffer itself, so the RTP fast path stays in place
            tap.inner = SimpleNamespace(add=media._buffer.add)
            media._buffer.add = tap.add
        else:
            receiver = media.pc.getTransceivers()[0].receiver
            tap.inner = install_receive_buffer(receiver, tap)
        offer_for_user, our_port = _retarget(offer, right_port)
        answer = await user.answer(offer_for_user)
        answer_for_us, user_port = _retarget(answer, left_port)
        relay.left_addr, relay.right_addr = (HOST, our_port), (HOST, user_port)
        await media.accept_answer(answer_for_us)
        await media.wait_connected(10)
        user.player.play(_speech(seconds))
        seen_pts: set[int] = set()
        last_at = None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    frame = await media.recv()
            except TimeoutError:
                break
            now = time.monotonic()
            if last_at is not None and result.frames > 50:  # skip start-up
                result.max_gap_ms = max(result.max_gap_ms, (now - last_at) * 1000)
            last_at = now
            seen_pts.add(frame.pts)
            raw = (tap.origin + frame.pts) & 0xFFFFFFFF
            arrival = tap.arrivals.get(raw)
            if arrival is None:
                result.concealed += 1
            else:
                result.frames += 1
                result.delays_ms.append((now - arrival) * 1000)
        if seen_pts:
            expected = set(range(0, max(seen_pts) + 1, 960))
            result.missing = len(expected - seen_pts)
        result.dropped_by_relay = relay.dropped
        if low_latency:
            stats = media.inbound_stats()
            result.late = stats["late"]
            assert stats["rtp_fast_path"]["packets"] > 0, "the RTP fast path was not used"
    finally:
        await media.close()
        await user.close()
        relay.close()
    return result


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


async def main(seconds: float, jitter_ms: float, seed: int) -> None:
    rows = []
    for loss in (0.0, 0.02):
        for low_latency in (False, True):
            rows.append(await run_once(low_latency, loss, jitter_ms, seconds, seed))
    print(
        f"Inbound stack delay (RTP arrival -> decoded frame from recv()), {seconds:g} s of speech per "
        f"run, relay jitter uniform 0-{jitter_ms:g} ms, seed {seed}\n"
    )
    header = (
        f"{'receive path':<20} {'loss':>5} {'frames':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
        f"{'relay drops':>11} {'late':>5} {'concealed':>9} {'missing':>7} {'max gap ms':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        s = delay_summary(r.delays_ms)
        print(
            f"{r.path:<20} {r.loss:>5.0%} {r.frames:>7} {_fmt(s['p50']):>7} {_fmt(s['p95']):>7} "
            f"{_fmt(s['p99']):>7} {r.dropped_by_relay:>11} {'-' if r.late is None else r.late:>5} {r.concealed:>9} {r.missing:>7} "
            f"{r.max_gap_ms:>10.1f}"
        )
    print(
        "\nlate: packets that came after ours had given up on them (dropped, concealed instead); "
        "concealed: frames synthesised for lost packets (ours only); missing: 20 ms frames absent "
        "from the audio timeline; max gap: longest wait between two frames at the consumer."
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--jitter-ms", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.jitter_ms, args.seed))
