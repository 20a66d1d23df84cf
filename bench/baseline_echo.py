"""The "limit" baseline: the least a WebRTC <-> OpenAI Realtime bridge can do in Python with
aiortc. Per call: decode (aiortc) -> resample 48 -> 24 kHz -> base64 JSON over a WebSocket
to the Realtime server; its audio deltas -> base64 decode -> resample 24 -> 48 kHz -> a
paced 20 ms track -> encode (aiortc). The one extra is dropping queued audio when the
server says the caller started speaking, so barge-in can be compared at all. No state
machine, no metrics, no jitter-buffer changes (aiortc's own receive path).

It runs as its own process, driven in JSON lines by the benchmarks (it is the offerer):

    python -m bench.baseline_echo REALTIME_URL      (API key in OPENAI_API_KEY)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fractions
import json
import os
import sys
import time
from collections import deque
from typing import Any

import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from websockets.asyncio.client import connect
from whatsapp_call.media.ice import host_addresses

from bench.harness.common import commands, emit

SESSION = {
    "type": "realtime",
    "output_modalities": ["audio"],
    "instructions": "You are a helpful assistant on a phone call.",
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "turn_detection": {
                "type": "server_vad",
                "threshold": 0.5,
                "prefix_padding_ms": 300,
                "silence_duration_ms": 500,
            },
        },
        "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"},
    },
}


class QueueTrack(MediaStreamTrack):
    """20 ms 48 kHz frames of queued audio on an absolute clock; silence when empty."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.chunks: deque[np.ndarray] = deque()
        self._start: float | None = None
        self._i = 0

    def recv_sync(self) -> np.ndarray:
        out = np.zeros(960, dtype=np.int16)
        filled = 0
        while filled < 960 and self.chunks:
            head = self.chunks[0]
            take = min(960 - filled, len(head))
            out[filled : filled + take] = head[:take]
            filled += take
            if take == len(head):
                self.chunks.popleft()
            else:
                self.chunks[0] = head[take:]
        return out

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._i += 1
            wait = self._start + self._i * 0.02 - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        frame = av.AudioFrame(format="s16", layout="mono", samples=960)
        frame.planes[0].update(self.recv_sync())
        frame.sample_rate = 48000
        frame.pts = self._i * 960
        frame.time_base = fractions.Fraction(1, 48000)
        return frame


class EchoBridge:
    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.out = QueueTrack()
        self.pc.addTransceiver(self.out, direction="sendrecv")
        self.tasks: list[asyncio.Task[Any]] = []
        self.ws: Any = None
        self.down = av.AudioResampler(format="s16", layout="mono", rate=24000)
        self.up = av.AudioResampler(format="s16", layout="mono", rate=48000)

        @self.pc.on("track")
        def _track(track: MediaStreamTrack) -> None:
            self.tasks.append(asyncio.ensure_future(self._inbound(track)))

    async def offer(self) -> str:
        self.ws = await connect(
            f"{self.url}?model=gpt-realtime",
            additional_headers={"Authorization": f"Bearer {self.key}"},
            max_size=None,
            compression=None,
        )
        await self.ws.send(json.dumps({"type": "session.update", "session": SESSION}))
        self.tasks.append(asyncio.ensure_future(self._events()))
        with host_addresses(["127.0.0.1"]):
            await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def accept(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def _inbound(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                pcm = b"".join(f.to_ndarray().tobytes() for f in self.down.resample(frame))
                if pcm:
                    audio = base64.b64encode(pcm).decode()
                    await self.ws.send(
                        json.dumps({"type": "input_audio_buffer.append", "audio": audio})
                    )

    async def _events(self) -> None:
        async for raw in self.ws:
            event = json.loads(raw)
            kind = event["type"]
            if kind == "response.output_audio.delta":
                pcm = base64.b64decode(event["delta"])
                frame = av.AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2)
                frame.planes[0].update(pcm)
                frame.sample_rate = 24000
                for f in self.up.resample(frame):
                    self.out.chunks.append(f.to_ndarray().reshape(-1).copy())
            elif kind == "input_audio_buffer.speech_started":
                self.out.chunks.clear()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await self.ws.close()
        await self.pc.close()


async def main(url: str) -> None:
    key = os.environ["OPENAI_API_KEY"]
    bridges: dict[Any, EchoBridge] = {}
    emit({"cmd": "ready"})
    try:
        async for msg in commands():
            cmd, ident = msg["cmd"], msg.get("id")
            reply: dict[str, Any] = {"cmd": cmd, "id": ident}
            try:
                if cmd == "make_offer":
                    bridge = bridges[ident] = EchoBridge(url, key)
                    reply["sdp"] = await bridge.offer()
                elif cmd == "accept":
                    await bridges[ident].accept(msg["sdp"])
                else:
                    reply["error"] = f"unknown command {cmd!r}"
            except Exception as exc:
                reply["error"] = f"{type(exc).__name__}: {exc}"
            emit(reply)
    finally:
        for bridge in bridges.values():
            await bridge.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
