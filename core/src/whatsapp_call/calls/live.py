"""Live call updates for whoever is watching: the CLI's progress view and the SSE stream.

An in-process publish/subscribe keyed by call id. Watchers get every update from the moment
they subscribe; the store keeps the full history for anyone who comes later. A slow watcher
never blocks a call: its queue is bounded and the oldest update is dropped when it is full.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

QUEUE_SIZE = 1000


class LiveUpdates:
    def __init__(self) -> None:
        self._watchers: dict[str, set[asyncio.Queue[dict[str, Any] | None]]] = defaultdict(set)

    def publish(self, call_id: str, update: dict[str, Any]) -> None:
        """Send `update` (tagged with `call_id`) to the call's watchers and to "*" watchers."""
        update = {"call_id": call_id, **update}
        for key in (call_id, "*"):
            for queue in list(self._watchers.get(key, ())):
                if queue.full():
                    with contextlib.suppress(asyncio.QueueEmpty):
                        queue.get_nowait()
                queue.put_nowait(update)

    def close(self, call_id: str) -> None:
        """The call is over: end every watcher's stream after the updates already queued."""
        for queue in self._watchers.pop(call_id, set()):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(None)

    @contextlib.asynccontextmanager
    async def subscribe(self, call_id: str = "*") -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """`async with live.subscribe(call_id) as updates: async for u in updates: ...`"""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUE_SIZE)
        self._watchers[call_id].add(queue)

        async def stream() -> AsyncIterator[dict[str, Any]]:
            while (item := await queue.get()) is not None:
                yield item

        try:
            yield stream()
        finally:
            watchers = self._watchers.get(call_id)
            if watchers is not None:
                watchers.discard(queue)
                if not watchers:
                    self._watchers.pop(call_id, None)
