"""Where the agent tool's calls happen.

`LocalBackend` drives the `CallService` of this process (the one `serve`, or a local
`whatsapp-call mcp`, runs); `RemoteBackend` drives a whatsapp-call service over its `/v1` API
(remote mode, `serviceUrl` set). Both speak the same four verbs and return the same JSON call
record (`full_record`: id, to_e164, state, end_reason, end_detail, duration_seconds, events,
transcript, metrics), so the tool never needs to know which one it has.

Errors are normalised too: a busy number is `CallInProgressError` (with `call_id`), a full
instance `ServiceBusyError`, an unknown call or a bad number `BadInputError`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection
from typing import Any, Protocol

from ..calls.orchestrator import CallInProgressError, ServiceBusyError
from ..errors import BadInputError

ENDED = "ended"
# After the "ended" update the call's task still flushes transcript lines and metrics.
CLEANUP_WAIT_SECONDS = 10.0
POLL_SECONDS = 1.0


class CallBackend(Protocol):
    """What the agent tool needs from wherever calls run."""

    async def place(
        self,
        to: str,
        *,
        greeting: str | None = None,
        instructions: str | None = None,
        voice: str | None = None,
        language: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]: ...

    async def get(self, call_id: str) -> dict[str, Any]: ...

    async def wait(
        self, call_id: str, timeout: float, *, until: Collection[str] = (ENDED,)
    ) -> dict[str, Any]:
        """The record once the call's state is one of `until`, or after `timeout` seconds
        (whichever comes first; never raises on timeout)."""
        ...

    async def hangup(self, call_id: str) -> dict[str, Any]: ...


def _no_such_call(call_id: str) -> BadInputError:
    return BadInputError(
        f"There is no call {call_id!r}.",
        "Use the call id that the call action returned (it starts with call_).",
    )


class LocalBackend:
    """The tool in the same process as the calls: talks to the `CallService` directly."""

    def __init__(self, service: Any):
        self.service = service

    async def _full(self, record: Any) -> dict[str, Any]:
        from ..api.records import full_record

        return await full_record(self.service.store, record)

    async def place(
        self,
        to: str,
        *,
        greeting: str | None = None,
        instructions: str | None = None,
        voice: str | None = None,
        language: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        from ..calls.orchestrator import CallRequest

        record = await self.service.place_call(
            CallRequest(
                to=to,
                greeting=greeting,
                instructions=instructions,
                voice=voice,
                language=language,
                metadata=dict(metadata or {}),
            )
        )
        return await self._full(record)

    async def get(self, call_id: str) -> dict[str, Any]:
        record = await self.service.store.get_call(call_id)
        if record is None:
            raise _no_such_call(call_id)
        return await self._full(record)

    async def wait(
        self, call_id: str, timeout: float, *, until: Collection[str] = (ENDED,)
    ) -> dict[str, Any]:
        # Subscribe before reading the state, so no change can slip in between.
        async with self.service.live.subscribe(call_id) as updates:
            record = await self.service.store.get_call(call_id)
            if record is None:
                raise _no_such_call(call_id)
            state = record.state.value
            if state not in until:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, timeout)):
                        async for update in updates:
                            if update.get("type") == "state" and update.get("state") in until:
                                state = update["state"]
                                break
        if state == ENDED:
            with contextlib.suppress(TimeoutError, BadInputError):
                await self.service.wait(call_id, timeout=CLEANUP_WAIT_SECONDS)
        return await self.get(call_id)

    async def hangup(self, call_id: str) -> dict[str, Any]:
        if await self.service.store.get_call(call_id) is None:
            raise _no_such_call(call_id)
        return await self._full(await self.service.hangup(call_id))


class RemoteBackend:
    """The tool in remote mode: talks to a whatsapp-call service through `ServiceClient`."""

    def __init__(self, client: Any, *, poll_seconds: float = POLL_SECONDS):
        self.client = client
        self.poll_seconds = poll_seconds

    async def place(
        self,
        to: str,
        *,
        greeting: str | None = None,
        instructions: str | None = None,
        voice: str | None = None,
        language: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        from ..client import ServiceError

        try:
            return await self.client.place_call(
                to,
                greeting=greeting,
                instructions=instructions,
                voice=voice,
                language=language,
                metadata=metadata or None,
            )
        except ServiceError as exc:
            error = (exc.body or {}).get("error", {}) if isinstance(exc.body, dict) else {}
            message = error.get("message") or exc.message
            if exc.status == 409:
                raise CallInProgressError(
                    message, error.get("call_id") or "", error.get("hint") or exc.hint
                ) from None
            if exc.status == 503:
                raise ServiceBusyError(message, error.get("hint") or exc.hint) from None
            raise

    async def _call(self, method: Any, call_id: str) -> dict[str, Any]:
        from ..client import ServiceError

        try:
            return await method(call_id)
        except ServiceError as exc:
            if exc.status == 404:
                raise _no_such_call(call_id) from None
            raise

    async def get(self, call_id: str) -> dict[str, Any]:
        return await self._call(self.client.get_call, call_id)

    async def hangup(self, call_id: str) -> dict[str, Any]:
        return await self._call(self.client.hangup, call_id)

    async def wait(
        self, call_id: str, timeout: float, *, until: Collection[str] = (ENDED,)
    ) -> dict[str, Any]:
        from ..client import ServiceError

        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        record = await self.get(call_id)
        if record["state"] in until:
            return record
        # Live updates (Server-Sent Events) first; if the stream is refused or breaks, poll.
        try:
            async with asyncio.timeout_at(deadline):
                async with contextlib.aclosing(self.client.events(call_id)) as updates:
                    async for update in updates:
                        if update.get("type") == "state" and update.get("state") in until:
                            break
        except TimeoutError:
            return await self.get(call_id)
        except ServiceError:
            pass
        record = await self.get(call_id)
        if record["state"] in until:
            return record
        while (remaining := deadline - loop.time()) > 0:
            await asyncio.sleep(min(self.poll_seconds, remaining))
            record = await self.get(call_id)
            if record["state"] in until:
                return record
        return await self.get(call_id)
