"""CPU and latency of the audio bridge with N concurrent calls on 127.0.0.1.

Each call is two aiortc peers: ours (a `PlayoutTrack` + `AudioBridge`, in this process) and
the far phone (in child processes, 6 calls each, so its CPU is not counted as ours and it never
starves). The far phone plays a 300 ms 440 Hz beep every second and notes when it hears the
echo. By default it is light, so that the 2 cores are left to what is measured: its beep is
Opus encoded once, and it hears by the RFC 6464 level on our packets instead of decoding them
(`--full-far`: encode and decode every frame, as a phone does). The voice session is an in-bench
echo backend: it repeats the caller's voiced audio after a fixed delay, and it pays the
JSON + base64 costs a real Realtime client pays (encode `input_audio_buffer.append`,
decode `response.output_audio.delta`).

Measured over a window after all calls are connected and warmed up:
  cpu/call     process CPU time (all threads: aiortc encoder pool, decoder threads) / wall / N
  in/out p50,p99  bridge processing per frame: inbound frame -> send_audio; outbound frame build
  late/drop    playout frames produced late (>10 ms) / skipped to catch up
  e2e          far beep onset -> its echo's onset at the far phone, minus the echo delay:
               the whole path both ways (Opus, SRTP, receive jitter buffer, bridge, playout)

    .venv/bin/python -m bench.bridge_bench [--calls 1 5 10] [--seconds 10] [--modes bare frames opus]

Modes: "opus" = the production path (`CallMedia` with our receive buffer decoding to 24 kHz,
the RTP fast path, `PlayoutTrack` encoding Opus itself, as calls run); "frames" = the naive
design: PlayoutTrack(encoded=False) handing aiortc 48 kHz frames (aiortc encodes), inbound audio
decoded at 48 kHz and resampled to 24 kHz, aiortc's own RTP path; "bare" = no bridge at all
(a plain aiortc peer: a silence track out, inbound frames decoded by aiortc and drained), the
floor.

Writes bench/results/bridge_bench-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fractions
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from whatsapp_call.bridge import AudioBridge, PlayoutTrack
from whatsapp_call.bridge.playout import SILENCE_DBOV
from whatsapp_call.media.ice import host_addresses
from whatsapp_call.media.jitter import install_receive_buffer
from whatsapp_call.media.peer import CallMedia
from whatsapp_call.media.sender import carry_audio_level
from whatsapp_call.voice import VoiceEvent, VoiceEventType, VoiceSession
from whatsapp_call_sim.user import OPUS_SILENCE, LevelOnlyReceiver, opus_packets

ECHO_DELAY = 0.400  # longer than a beep, so each echo is a distinct turn
BEEP_MS, BEEP_EVERY = 300, 1.0
LOOPBACK = ["127.0.0.1"]
LOUD_DBOV = -40  # the beep is about -15 dBov; silence -127
FAR_CALLS_PER_PROCESS = 6
RESULTS = Path(__file__).parent / "results"


# ---- the voice backend: an echo with a fixed delay ---------------------------------------


class EchoSession(VoiceSession):
    """Echoes voiced caller audio after `delay`, through JSON + base64 like a Realtime client."""

    def __init__(self, delay: float = ECHO_DELAY, threshold: int = 500):
        self._delay = delay
        self._threshold = threshold
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._voiced = False
        self._turn = 0

    async def start(self) -> None:
        pass

    async def send_audio(self, pcm: bytes) -> None:
        # what a Realtime client sends for each chunk
        json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})
        voiced = int(np.abs(np.frombuffer(pcm, dtype=np.int16)).max()) > self._threshold
        loop = asyncio.get_running_loop()
        if voiced:
            if not self._voiced:
                self._turn += 1
            delta = {
                "type": "response.output_audio.delta",
                "item_id": f"item_{self._turn}",
                "delta": base64.b64encode(pcm).decode(),
            }
            loop.call_later(self._delay, self._queue.put_nowait, json.dumps(delta))
        elif self._voiced:
            self._queue.put_nowait(json.dumps({"type": "input_audio_buffer.speech_stopped"}))
            done = json.dumps({"type": "response.done"})
            loop.call_later(self._delay + 0.001, self._queue.put_nowait, done)
        self._voiced = voiced

    async def greet(self, text: str) -> None:
        pass

    async def _events(self):
        while (raw := await self._queue.get()) is not None:
            msg = json.loads(raw)
            kind = msg["type"]
            if kind == "response.output_audio.delta":
                yield VoiceEvent(
                    VoiceEventType.AUDIO,
                    audio=base64.b64decode(msg["delta"]),
                    item_id=msg["item_id"],
                )
            elif kind == "input_audio_buffer.speech_stopped":
                yield VoiceEvent(VoiceEventType.SPEECH_STOPPED)
            elif kind == "response.done":
                yield VoiceEvent(VoiceEventType.RESPONSE_DONE)

    def events(self):
        return self._events()

    async def close(self) -> None:
        self._queue.put_nowait(None)


# ---- the far phone (child process) -------------------------------------------------------


class BeepTrack(MediaStreamTrack):
    """A 300 ms 440 Hz beep every second, paced; remembers when each beep started."""

    kind = "audio"

    def __init__(self, offset_frames: int, light: bool = False):
        super().__init__()
        t = np.arange(48000 * BEEP_MS // 1000) / 48000
        self._beep = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
        # light: the beep's Opus packets are encoded once, each with its RFC 6464 level
        self._packets = opus_packets(self._beep) if light else None
        self.audio_level: int | None = SILENCE_DBOV
        self._period = int(BEEP_EVERY * 50)
        self._i = 0
        self._offset = offset_frames
        self._start: float | None = None
        self.onsets: list[float] = []
        self._silence = np.zeros(960, dtype=np.int16)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            await asyncio.sleep(max(0.0, self._start + self._i * 0.02 - time.monotonic()))
        k = (self._i + self._offset) % self._period
        beeping = k * 960 < len(self._beep)
        if beeping and k == 0:
            self.onsets.append(time.monotonic())
        if self._packets is not None:
            data, self.audio_level = OPUS_SILENCE, SILENCE_DBOV
            if beeping:
                data, self.audio_level = self._packets[k]
            packet = av.Packet(data)
            packet.pts, packet.time_base = self._i * 960, fractions.Fraction(1, 48000)
            self._i += 1
            return packet
        data = self._beep[k * 960 : (k + 1) * 960] if beeping else self._silence
        frame = av.AudioFrame(format="s16", layout="mono", samples=960)
        frame.planes[0].update(data)
        frame.pts = self._i * 960
        frame.sample_rate = 48000
        frame.time_base = fractions.Fraction(1, 48000)
        self._i += 1
        return frame


async def _record_onsets(track: MediaStreamTrack, onsets: list[float]) -> None:
    loud_before = False
    with contextlib.suppress(MediaStreamError):
        while True:
            frame = await track.recv()
            loud = int(np.abs(np.frombuffer(frame.planes[0], dtype=np.int16)).max()) > 1000
            if loud and not loud_before:
                onsets.append(time.monotonic())
            loud_before = loud


def _echo_latencies(sent: list[float], heard: list[float], since: float) -> list[float]:
    """For each beep sent after `since`, the first heard onset after it + the echo delay."""
    out = []
    for s in sent:
        if s < since:
            continue
        later = [h for h in heard if h > s + ECHO_DELAY - 0.05]
        if later and later[0] - s < ECHO_DELAY + 0.6:
            out.append((later[0] - s - ECHO_DELAY) * 1e3)
    return out


class _LevelOnsets:
    """Light far phone's ears: beep onsets from the RFC 6464 level on our packets, no decoding."""

    def __init__(self, onsets: list[float]):
        self.onsets = onsets
        self.loud_before = False

    def __call__(self, level: float) -> None:
        loud = level > LOUD_DBOV
        if loud and not self.loud_before:
            self.onsets.append(time.monotonic())
        self.loud_before = loud


async def _far_main(conn, light: bool) -> None:
    loop = asyncio.get_running_loop()
    calls = []
    mark = None
    cpu0 = 0.0
    while True:
        msg = await loop.run_in_executor(None, conn.recv)
        if msg[0] == "offer":
            _, index, sdp = msg
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            beep = BeepTrack(offset_frames=(index * 7) % 50, light=light)
            heard: list[float] = []
            tasks: list[asyncio.Task] = []
            if not light:
                pc.on(
                    "track",
                    lambda t, h=heard, ts=tasks: ts.append(
                        asyncio.ensure_future(_record_onsets(t, h))
                    ),
                )
            sender = pc.addTrack(beep)
            with host_addresses(LOOPBACK):
                await pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
                if light:
                    carry_audio_level(sender)
                    receiver = pc.getTransceivers()[0].receiver
                    install_receive_buffer(receiver, LevelOnlyReceiver(_LevelOnsets(heard)))
                await pc.setLocalDescription(await pc.createAnswer())
            calls.append((pc, beep, heard, tasks))
            conn.send(("answer", index, pc.localDescription.sdp))
        elif msg[0] == "mark":
            mark, cpu0 = time.monotonic(), time.process_time()
        elif msg[0] == "stop":
            wall = time.monotonic() - (mark or time.monotonic())
            cpu = time.process_time() - cpu0
            latencies = []
            for _, beep, heard, _ in calls:
                latencies += _echo_latencies(beep.onsets, heard, mark or 0.0)
            for pc, _, _, tasks in calls:
                for t in tasks:
                    t.cancel()
                await pc.close()
            conn.send(("stats", {"cpu_core": cpu / wall if wall else None, "e2e_ms": latencies}))
            return


def _far_process(conn, light: bool) -> None:
    asyncio.run(_far_main(conn, light))


# ---- our side ----------------------------------------------------------------------------


class SilenceTrack(MediaStreamTrack):
    """The "bare" baseline's outbound track: paced 48 kHz silence, no bridge work."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._i = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            await asyncio.sleep(max(0.0, self._start + self._i * 0.02 - time.monotonic()))
        frame = av.AudioFrame(format="s16", layout="mono", samples=960)
        frame.planes[0].update(bytes(1920))
        frame.pts, frame.sample_rate = self._i * 960, 48000
        frame.time_base = fractions.Fraction(1, 48000)
        self._i += 1
        return frame


class _Drain:
    """The "bare" baseline's inbound side: read every frame and never return one, so the
    bridge does no work while aiortc receives and decodes as usual."""

    def __init__(self, track: MediaStreamTrack):
        self._track = track

    async def recv(self) -> av.AudioFrame:
        while True:
            await self._track.recv()


async def _ask(conn, msg):
    conn.send(msg)
    return await asyncio.get_running_loop().run_in_executor(None, conn.recv)


async def run_once(
    n: int, seconds: float, mode: str, warmup: float = 2.0, light_far: bool = True
) -> dict:
    # Far phones in several processes (6 calls each): one process saturates its core at ~12,
    # and a starved far side sends less audio, which would flatter our CPU per call.
    pipes, procs = [], []
    for _ in range(max(1, -(-n // FAR_CALLS_PER_PROCESS))):
        parent, child = mp.Pipe()
        proc = mp.get_context("spawn").Process(
            target=_far_process, args=(child, light_far), daemon=True
        )
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    calls = []
    medias: list[CallMedia] = []
    try:
        for i in range(n):
            if mode == "bare":  # aiortc alone: the floor under any bridge
                pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
                playout = PlayoutTrack(encoded=False)  # only read for its (zero) counters
                pc.addTrack(SilenceTrack())
                remote = asyncio.get_running_loop().create_future()
                pc.on("track", remote.set_result)
                with host_addresses(LOOPBACK):
                    await pc.setLocalDescription(await pc.createOffer())
                offer = pc.localDescription.sdp
                _, _, answer = await _ask(pipes[i % len(pipes)], ("offer", i, offer))
                await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
                media = _Drain(await remote)
            else:  # the production path: CallMedia (our receive buffer) + PlayoutTrack
                playout = PlayoutTrack(encoded=(mode == "opus"))
                shipped = mode == "opus"  # "frames": the design before media.opus/rtp_fast
                media = CallMedia(
                    host_addresses=LOOPBACK,
                    outbound_track=playout,
                    inbound_rate=24000 if shipped else 48000,
                    rtp_fast_path=shipped,
                )
                offer = await media.create_offer()
                _, _, answer = await _ask(pipes[i % len(pipes)], ("offer", i, offer))
                await media.accept_answer(answer)
                pc = media.pc
                medias.append(media)
            bridge = AudioBridge(media, playout, EchoSession())
            calls.append((pc, playout, bridge, asyncio.create_task(bridge.run())))
        async with asyncio.timeout(20):
            while any(pc.connectionState != "connected" for pc, *_ in calls):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await asyncio.sleep(warmup)
        base = [(p.late_frames, p.dropped_frames, p.underruns) for _, p, _, _ in calls]
        for parent in pipes:
            parent.send(("mark",))
        wall0, cpu0 = time.monotonic(), time.process_time()
        await asyncio.sleep(seconds)
        wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
        metrics = [b.metrics for _, _, b, _ in calls]
        late = sum(p.late_frames - b[0] for (_, p, _, _), b in zip(calls, base, strict=True))
        dropped = sum(p.dropped_frames - b[1] for (_, p, _, _), b in zip(calls, base, strict=True))
        underruns = sum(p.underruns - b[2] for (_, p, _, _), b in zip(calls, base, strict=True))
        fars = [(await _ask(parent, ("stop",)))[1] for parent in pipes]
        far = {
            "cpu_core": sum(f["cpu_core"] or 0.0 for f in fars),
            "e2e_ms": [ms for f in fars for ms in f["e2e_ms"]],
        }
    finally:
        for pc, _, bridge, task in calls:
            await bridge.stop()
            await task
            await pc.close()
        for media in medias:
            await media.close()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()

    def agg(path: tuple[str, ...], key: str) -> float | None:
        values = []
        for m in metrics:
            v = m
            for p in path:
                v = v[p]
            if v[key] is not None:
                values.append(v[key])
        if not values:
            return None
        return round(statistics.median(values) if key == "p50" else max(values), 1)

    e2e = far["e2e_ms"]
    turns = [t["response_latency_ms"] for m in metrics for t in m["turns"]]
    frames = sum(m["outbound"]["frames"] for m in metrics)
    return {
        "calls": n,
        "mode": mode,
        "seconds": round(wall, 2),
        "cpu_core_per_call": round(cpu / wall / n, 4),
        "far_cpu_core_per_call": round(far["cpu_core"] / n, 4) if far["cpu_core"] else None,
        "inbound_us_p50": agg(("inbound", "processing_us"), "p50"),
        "inbound_us_p99": agg(("inbound", "processing_us"), "p99"),
        "outbound_frame_us_p50": agg(("outbound", "frame_us"), "p50"),
        "outbound_frame_us_p99": agg(("outbound", "frame_us"), "p99"),
        "outbound_write_us_p99": agg(("outbound", "write_us"), "p99"),
        "send_audio_us_p99": agg(("inbound", "send_audio_us"), "p99"),
        "late_frames": late,
        "dropped_frames": dropped,
        "underruns": underruns,
        "frames_total": frames,
        "playout_delay_ms_p99": agg(("outbound", "playout_delay_ms"), "p99"),
        "e2e_ms_p50": round(statistics.median(e2e), 1) if e2e else None,
        "e2e_ms_p99": round(float(np.percentile(e2e, 99)), 1) if e2e else None,
        "e2e_samples": len(e2e),
        "turn_latency_ms_p50": round(statistics.median(turns), 1) if turns else None,
        "loadavg_1m": round(os.getloadavg()[0], 2),  # other work on the machine skews all of it
    }


COLUMNS = [
    ("calls", "N"),
    ("mode", "mode"),
    ("cpu_core_per_call", "cpu/call"),
    ("far_cpu_core_per_call", "far cpu/call"),
    ("inbound_us_p50", "in µs p50"),
    ("inbound_us_p99", "in µs p99"),
    ("outbound_frame_us_p50", "out µs p50"),
    ("outbound_frame_us_p99", "out µs p99"),
    ("late_frames", "late"),
    ("dropped_frames", "dropped"),
    ("e2e_ms_p50", "e2e ms p50"),
    ("e2e_ms_p99", "e2e ms p99"),
    ("loadavg_1m", "load"),
]


def print_table(rows: list[dict]) -> None:
    widths = [max(len(h), *(len(str(r[k])) for r in rows)) for k, h in COLUMNS]
    print("  ".join(h.rjust(w) for (_, h), w in zip(COLUMNS, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[k]).rjust(w) for (k, _), w in zip(COLUMNS, widths, strict=True)))


async def main(args: argparse.Namespace) -> None:
    rows = []
    for mode in args.modes:
        for n in args.calls:
            row = await run_once(n, args.seconds, mode, light_far=not args.full_far)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print_table(rows)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bridge_bench-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    out.write_text(
        json.dumps({"machine": machine, "echo_delay_ms": ECHO_DELAY * 1e3, "runs": rows}, indent=2)
    )
    print(f"\nwrote {out}")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--full-far",
        action="store_true",
        help="far phones encode every frame and decode ours (default: pre-encoded, level-only)",
    )
    parser.add_argument(
        "--modes", nargs="+", choices=["bare", "frames", "opus"], default=["bare", "frames", "opus"]
    )
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
