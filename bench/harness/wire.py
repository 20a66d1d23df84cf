"""The wire tap: a UDP relay on 127.0.0.1 between a simulated caller and the system under
test (ours, the baseline or pipecat), through which all of a call's media really passes.

It impairs the caller -> system direction (RTP only: loss and a uniform random delay, as
`bench/jitter_bench.py` does) and, for both directions, notes when each RTP packet crossed
it and whether it carried voice, read from the RFC 6464 audio-level header extension (it is
not encrypted by SRTP; every aiortc sender fills it in). That gives the same wire-level
figures for every system: per-turn latency, barge-in time, outbound pacing gaps.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from bench.jitter_bench import HOST, _is_rtp, _retarget

AUDIO_LEVEL_URI = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
VOICED_DBOV = 50  # a packet louder than -50 dBov carries voice (silence is 127)
QUIET_GAP = 0.200  # this long without voiced packets ends a stretch of speech


def audio_level_id(sdp: str) -> int | None:
    match = re.search(rf"^a=extmap:(\d+)(?:/\w+)? {re.escape(AUDIO_LEVEL_URI)}", sdp, re.M)
    return int(match.group(1)) if match else None


def host_only(sdp: str) -> str:
    """`sdp` without its server-reflexive / relayed candidates. Ours gathers a srflx
    candidate from the simulated STUN server that is its own loopback address and port: left
    in, the caller's ICE pairs with it directly and the media bypasses the tap (then the tap
    sees nothing of the call, and every wire figure of ours is empty or wrong)."""
    return re.sub(
        r"^a=candidate:\S+ \d+ udp \d+ \S+ \d+ typ (?!host)\w+.*\r?\n", "", sdp, flags=re.M
    )


def audio_level(data: bytes, ext_id: int | None) -> int | None:
    """-dBov of an RTP packet from its one-byte-header audio-level extension, or None."""
    if ext_id is None or not data[0] & 0x10:
        return None
    offset = 12 + 4 * (data[0] & 0x0F)
    if len(data) < offset + 4 or data[offset : offset + 2] != b"\xbe\xde":
        return None
    words = int.from_bytes(data[offset + 2 : offset + 4], "big")
    pos, end = offset + 4, min(len(data), offset + 4 + 4 * words)
    while pos < end:
        byte = data[pos]
        if byte == 0:  # padding
            pos += 1
            continue
        eid, length = byte >> 4, (byte & 0x0F) + 1
        if eid == ext_id:
            return data[pos + 1] & 0x7F
        pos += 1 + length
    return None


SO_TIMESTAMPNS = 35  # Linux: the kernel's receive time of each datagram, in ancillary data
_TIMESPEC = struct.Struct("@qq")


class _KernelSide:
    """One UDP socket of the tap that reads each datagram with the time the kernel received
    it (SO_TIMESTAMPNS, mapped to time.monotonic()), so that a stall of the simulators' own
    event loop (the tap runs in their process) is not mistaken for a gap on the wire. Quacks
    like the (protocol, transport) pair of `create_datagram_endpoint` that it replaces."""

    def __init__(self, on_datagram: Any) -> None:
        self.on_datagram = on_datagram
        self.kernel_times = sys.platform == "linux"
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind((HOST, 0))
        if self.kernel_times:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.transport = self
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(65536, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            at = time.monotonic()
            for level, kind, raw in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
                    sec, nsec = _TIMESPEC.unpack(raw[:16])
                    # realtime -> monotonic: the offset is read now; it does not move in ms
                    at = sec + nsec / 1e9 - (time.time() - time.monotonic())
            self.on_datagram(data, at)

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._closed:
            return
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            pass  # a full socket buffer drops the datagram, as UDP would
        except OSError:
            pass

    def get_extra_info(self, name: str) -> Any:
        return self.sock.getsockname() if name == "sockname" else None

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()


@dataclass
class Direction:
    """The RTP packets of one direction: (time they crossed the tap, voiced?)."""

    ext_id: int | None = None
    times: list[float] = field(default_factory=list)
    voiced: list[bool] = field(default_factory=list)

    def note(self, at: float, data: bytes) -> None:
        level = audio_level(data, self.ext_id)
        self.times.append(at)
        self.voiced.append(level is not None and level < VOICED_DBOV)

    def spurts(self, since: float = 0.0) -> list[tuple[float, float]]:
        """Stretches of voice (first, last voiced packet), split by `QUIET_GAP` of quiet."""
        out: list[list[float]] = []
        for t, v in zip(self.times, self.voiced, strict=True):
            if not v or t < since:
                continue
            if out and t - out[-1][1] <= QUIET_GAP:
                out[-1][1] = t
            else:
                out.append([t, t])
        return [(a, b) for a, b in out]

    def gaps(self, since: float, until: float) -> list[float]:
        """Inter-packet gaps (ms) between `since` and `until`."""
        ts = [t for t in self.times if since <= t <= until]
        return [(b - a) * 1e3 for a, b in zip(ts, ts[1:], strict=False)]


class WireTap:
    """One call's relay. `system_sdp()` / `caller_sdp()` rewrite each side's description so
    that the other side sends to the tap; `to_system` is impaired, `to_caller` is not."""

    def __init__(self, loss: float = 0.0, jitter_ms: float = 0.0, seed: int = 7):
        self.loss = loss
        self.jitter = jitter_ms / 1000
        self.rng = random.Random(seed)
        self.system_addr: tuple[str, int] | None = None
        self.caller_addr: tuple[str, int] | None = None
        self.to_system = Direction()  # caller -> system (delivery times, after impairment)
        self.to_caller = Direction()  # system -> caller
        self.dropped = 0
        self._facing_system: Any = None
        self._facing_caller: Any = None

    async def start(self) -> None:
        self._facing_system = _KernelSide(self._from_system)
        self._facing_caller = _KernelSide(self._from_caller)

    def _port(self, side: Any) -> int:
        return side.transport.get_extra_info("sockname")[1]

    def for_caller(self, system_sdp: str) -> str:
        """The system's description as the caller must see it (media to the tap)."""
        self.to_caller.ext_id = audio_level_id(system_sdp)
        sdp, port = _retarget(host_only(system_sdp), self._port(self._facing_caller))
        self.system_addr = (HOST, port)
        return sdp

    def for_system(self, caller_sdp: str) -> str:
        """The caller's description as the system must see it (media to the tap)."""
        self.to_system.ext_id = audio_level_id(caller_sdp)
        sdp, port = _retarget(host_only(caller_sdp), self._port(self._facing_system))
        self.caller_addr = (HOST, port)
        return sdp

    def _from_system(self, data: bytes, at: float) -> None:
        if self.caller_addr is None:
            return
        if _is_rtp(data):
            self.to_caller.note(at, data)  # when it reached the tap's socket
        self._facing_caller.transport.sendto(data, self.caller_addr)

    def _from_caller(self, data: bytes, at: float) -> None:
        if self.system_addr is None:
            return
        if not _is_rtp(data):
            self._facing_system.transport.sendto(data, self.system_addr)
            return
        if self.loss and self.rng.random() < self.loss:
            self.dropped += 1
            return
        delay = self.rng.uniform(0, self.jitter) if self.jitter else 0.0
        if delay:
            asyncio.get_running_loop().call_later(delay, self._deliver, data)
        else:
            self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        if not self._facing_system.transport.is_closing():
            self.to_system.note(time.monotonic(), data)
            self._facing_system.transport.sendto(data, self.system_addr)

    def close(self) -> None:
        for side in (self._facing_system, self._facing_caller):
            if side is not None and side.transport is not None:
                side.transport.close()


# ---- what the wire says about a call -------------------------------------------------------


def turn_latencies(tap: WireTap, since: float, until: float) -> list[dict[str, float]]:
    """Each caller spurt that the system answered: caller's last voiced packet (delivered
    to the system) -> the system's first voiced packet after it (left the system)."""
    caller = [s for s in tap.to_system.spurts(since) if s[1] <= until]
    system = tap.to_caller.spurts(since)
    out = []
    for i, (_, end) in enumerate(caller):
        nxt = caller[i + 1][0] if i + 1 < len(caller) else until
        reply = next((s for s in system if end < s[0] < nxt), None)
        # a system spurt already running when the caller stopped is not a reply
        running = any(s[0] <= end <= s[1] + QUIET_GAP for s in system)
        if reply is not None and not running:
            out.append({"caller_end": end, "reply_start": reply[0], "ms": (reply[0] - end) * 1e3})
    return out


def barge_ins(tap: WireTap, since: float, until: float) -> list[float]:
    """For each caller spurt that began while the system was talking: ms from its first
    voiced packet (delivered) to the system's last voiced packet of that stretch."""
    system = tap.to_caller.spurts(since)
    out = []
    for start, _ in tap.to_system.spurts(since):
        if start > until:
            break
        talking = next((s for s in system if s[0] < start <= s[1]), None)
        if talking is not None:
            out.append((talking[1] - start) * 1e3)
    return out


def outbound_pacing(tap: WireTap, since: float, until: float) -> dict[str, Any]:
    """System -> caller packet gaps over the window: late = a gap over 40 ms (2 frames).
    `late_at_s` says where each late gap ended: seconds after the call's first outbound
    packet and after the window's start (to tell start-up from steady-state gaps)."""
    times = [t for t in tap.to_caller.times if since <= t <= until]
    gaps = [(b - a) * 1e3 for a, b in zip(times, times[1:], strict=False)]
    first = tap.to_caller.times[0] if tap.to_caller.times else None
    late = [(g, times[i + 1]) for i, g in enumerate(gaps) if g > 40.0]
    return {
        "packets": len(times),
        "late_gaps": len(late),
        "max_gap_ms": round(max(gaps), 1) if gaps else None,
        "late_at_s": [
            {
                "gap_ms": round(g, 1),
                "after_first_packet_s": round(t - first, 2) if first is not None else None,
                "after_window_start_s": round(t - since, 2),
            }
            for g, t in late[:20]
        ],
    }
