"""The peer: pipecat (its SmallWebRTC transport + its OpenAI Realtime service, used as a
library) bridging the benchmark's simulated callers to the same simulated Realtime server.

Runs in pipecat's own virtual environment (bench/.pipecat/.venv, built by `python -m
bench.run_all` from bench/pipecat_requirements.txt), never in ours; it imports nothing of
the project but the standard-library helpers in bench/harness/common.py. Pipecat's WebRTC
side answers, so the caller offers. Driven in JSON lines:

    bench/.pipecat/.venv/bin/python -m bench.pipecat_peer REALTIME_URL   (key: OPENAI_API_KEY)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from typing import Any

import aioice.ice
from loguru import logger
from pipecat.frames.frames import LLMRunFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.services.openai.realtime import events
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport

from bench.harness.common import commands, emit

# Host candidates on loopback only, like every peer of the benchmarks.
aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"]

INSTRUCTIONS = "You are a helpful assistant on a phone call."


class PipecatCall:
    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.task: PipelineTask | None = None
        self.runner_task: asyncio.Task[Any] | None = None
        self.conn: SmallWebRTCConnection | None = None

    async def answer(self, offer: str) -> str:
        self.conn = SmallWebRTCConnection(ice_servers=[])
        await self.conn.initialize(sdp=offer, type="offer")
        transport = SmallWebRTCTransport(
            webrtc_connection=self.conn,
            params=TransportParams(audio_in_enabled=True, audio_out_enabled=True),
        )
        # The same turn detection our service configures, so the simulated model behaves alike.
        session = events.SessionProperties(
            instructions=INSTRUCTIONS,
            audio=events.AudioConfiguration(
                input=events.AudioInput(
                    turn_detection=events.TurnDetection(
                        type="server_vad",
                        threshold=0.5,
                        prefix_padding_ms=300,
                        silence_duration_ms=500,
                    )
                )
            ),
        )
        llm = OpenAIRealtimeLLMService(
            api_key=self.key,
            base_url=self.url,
            settings=OpenAIRealtimeLLMService.Settings(
                model="gpt-realtime", session_properties=session
            ),
        )
        context = LLMContext()
        aggregators = LLMContextAggregatorPair(context)
        pipeline = Pipeline(
            [
                transport.input(),
                aggregators.user(),
                llm,
                transport.output(),
                aggregators.assistant(),
            ]
        )
        self.task = PipelineTask(pipeline, params=PipelineParams(enable_metrics=False))

        @transport.event_handler("on_client_connected")
        async def _connected(_transport: Any, _client: Any) -> None:
            await self.task.queue_frames([LLMRunFrame()])

        runner = PipelineRunner(handle_sigint=False)
        self.runner_task = asyncio.create_task(runner.run(self.task))
        return self.conn.get_answer()["sdp"]

    async def close(self) -> None:
        if self.task is not None:
            with contextlib.suppress(Exception):
                await self.task.cancel()
        if self.runner_task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(5):
                    await self.runner_task
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.disconnect()


async def main(url: str) -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    key = os.environ["OPENAI_API_KEY"]
    calls: dict[Any, PipecatCall] = {}
    emit({"cmd": "ready"})
    try:
        async for msg in commands():
            cmd, ident = msg["cmd"], msg.get("id")
            reply: dict[str, Any] = {"cmd": cmd, "id": ident}
            try:
                if cmd == "answer":
                    call = calls[ident] = PipecatCall(url, key)
                    reply["sdp"] = await call.answer(msg["sdp"])
                else:
                    reply["error"] = f"unknown command {cmd!r}"
            except Exception as exc:
                reply["error"] = f"{type(exc).__name__}: {exc}"
            emit(reply)
    finally:
        for call in calls.values():
            await call.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
