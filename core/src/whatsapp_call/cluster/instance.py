"""Several service instances (machines) sharing PostgreSQL and Redis.

Any instance takes any webhook or API request, but a call's media lives in exactly one
process. `ClusterService` wraps an instance's own service (a `CallService`, or the
`WorkerPool` of `serve --workers N`) and adds what several instances need:

* a call placed here is claimed on the bus (`RedisEventBus.claim_call`) for this instance;
* a webhook event for a call owned by another live instance is published to that
  instance's stream, and handled there (acknowledged only once handled: nothing is lost
  when an instance restarts); events for calls nobody knows yet (WATI's answer can beat
  `send_offer`'s return) and permission replies go to every live instance;
* every instance periodically reconciles the calls of instances that died (ended at the
  provider, marked failed), so a crashed machine leaves no caller on a dead line.

Worker ids in the store carry the instance id ("node-a" or "node-a/w1"), so an instance's
own start-up reconciliation never touches another instance's live calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ..calls.orchestrator import CallRequest
from ..models import CallEvent, CallEventType, event_from_dict, event_to_dict
from ..store.base import CallRecord
from .bus import RedisEventBus

log = logging.getLogger("whatsapp_call.cluster")

RECONCILE_INTERVAL = 5.0


class ClusterService:
    """The instance's service as the HTTP routes see it, with cross-instance routing."""

    def __init__(self, inner: Any, bus: RedisEventBus):
        self.inner = inner
        self.bus = bus
        self.instance_id = bus.instance_id
        self._tasks: list[asyncio.Task[Any]] = []

    # The routes and the agent tool use these attributes of a service.
    @property
    def settings(self) -> Any:
        return self.inner.settings

    @property
    def store(self) -> Any:
        return self.inner.store

    @property
    def live(self) -> Any:
        return self.inner.live

    @property
    def active_count(self) -> int:
        return self.inner.active_count

    async def start(self) -> list[CallRecord]:
        await self.bus.open()
        reconciled = await self.inner.start()
        self._tasks.append(asyncio.create_task(self.bus.consume(self._on_message)))
        self._tasks.append(asyncio.create_task(self._reconcile_loop()))
        return reconciled

    async def shutdown(self, timeout: float = 15.0) -> None:
        await self.inner.shutdown(timeout)
        await self.bus.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task

    async def place_call(self, request: CallRequest) -> CallRecord:
        record = await self.inner.place_call(request)
        await self.bus.claim_call(record.id)
        return record

    async def hangup(self, call_id: str) -> CallRecord:
        owner = await self.bus.owner_of(call_id=call_id)
        if owner in (None, self.instance_id):
            return await self.inner.hangup(call_id)
        await self.bus.publish(owner, {"hangup": call_id})
        return await self.inner.wait(call_id, timeout=30)

    async def wait(self, call_id: str, timeout: float | None = None) -> CallRecord:
        from ..workers.front import WorkerPool

        if isinstance(self.inner, WorkerPool) or call_id not in getattr(self.inner, "_active", {}):
            return await _poll_until_final(self.store, call_id, timeout)
        return await self.inner.wait(call_id, timeout)

    async def check_permission(self, to: str) -> Any:
        return await self.inner.check_permission(to)

    async def request_permission(self, to: str) -> Any:
        return await self.inner.request_permission(to)

    # -- events -------------------------------------------------------------------------------

    async def handle_events(self, events: list[CallEvent]) -> None:
        local: list[CallEvent] = []
        remote: dict[str, list[CallEvent]] = {}
        everyone: list[CallEvent] = []
        for event in events:
            if event.type == CallEventType.PERMISSION_REPLY:
                everyone.append(event)
                continue
            record = await self.inner._find_record(event)
            if record is None:
                everyone.append(event)
                continue
            owner = await self.bus.owner_of(call_id=record.id)
            if owner == self.instance_id:
                local.append(event)
            elif owner is not None:
                remote.setdefault(owner, []).append(event)
            else:
                local.append(event)  # a dead owner's call: recorded here as a late webhook
        for owner, owned in remote.items():
            await self.bus.publish(owner, {"events": [event_to_dict(e) for e in owned]})
        if everyone:
            for instance in await self.bus.instances_alive():
                if instance != self.instance_id:
                    await self.bus.publish(
                        instance, {"events": [event_to_dict(e) for e in everyone]}
                    )
        if local or everyone:
            await self.inner.handle_events(local + everyone)

    async def _on_message(self, message: dict[str, Any]) -> None:
        if "events" in message:
            await self.inner.handle_events([event_from_dict(e) for e in message["events"]])
        if "hangup" in message:
            await self.inner.hangup(message["hangup"])

    # -- dead instances ---------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL)
            try:
                await self.reconcile_orphans()
            except Exception:
                log.exception("reconciling the calls of stopped instances failed")

    async def reconcile_orphans(self) -> list[str]:
        """End the calls whose owning instance is gone; returns their ids."""
        done = []
        for orphan in await self.bus.orphaned_calls():
            if orphan.owner == self.instance_id and orphan.call_id in getattr(
                self.inner, "_active", {}
            ):
                continue
            record = await self.store.get_call(orphan.call_id)
            if record is not None and not record.is_final:
                if await self.inner.reconcile(record, f"failed: instance {orphan.owner} stopped"):
                    done.append(record.id)
            await self.bus.claim_call(orphan.call_id)
            await self.bus.release_call(orphan.call_id)
        return done


async def _poll_until_final(store: Any, call_id: str, timeout: float | None) -> CallRecord:
    from ..errors import BadInputError

    async with asyncio.timeout(timeout):
        while True:
            record = await store.get_call(call_id)
            if record is None:
                raise BadInputError(
                    f"There is no call {call_id!r}.", "List calls with: whatsapp-call calls"
                )
            if record.is_final:
                return record
            await asyncio.sleep(0.2)
