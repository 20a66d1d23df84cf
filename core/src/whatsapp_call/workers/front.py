"""`serve --workers N`: a front process and N media workers on one machine.

One Python process carries only a dozen or so calls before its event loop falls behind
(aiortc's per-packet Python work), while the machine still has idle cores. So the front
process serves HTTP (webhooks, the `/v1` API, MCP) and owns no media; each worker is a
process with its own event loop that owns its calls' media. The store (SQLite in WAL mode,
or a shared database) is common to all.

* A new call goes to the worker with the fewest calls in progress.
* A webhook event goes to the worker that owns the call: found in the store by our call id
  (Meta carries it in `biz_opaque_callback_data`) or by the provider's call id. Events for
  calls not yet in the store (WATI's answer can beat `send_offer`'s return) and permission
  replies go to every worker; each keeps only what concerns its own calls.
* A worker that dies has its calls reconciled (terminated at the provider, marked failed)
  and is restarted; the front keeps serving.
* The front's /metrics reads every worker's /metrics and reports every call metric (states,
  created / ended, histograms, media counters) summed over the workers, under the names a
  single process uses, and each worker's call count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
import time
from typing import Any

import httpx

from ..calls.live import LiveUpdates
from ..calls.orchestrator import CallInProgressError, CallRequest, CallService, ServiceBusyError
from ..client import ServiceClient, ServiceError
from ..config import Settings
from ..errors import BadInputError, WhatsAppCallError
from ..models import CallEvent, CallEventType, event_to_dict
from ..store.base import CallRecord, CallStore
from .worker import READY_PREFIX

log = logging.getLogger("whatsapp_call.workers")

READY_TIMEOUT = 60.0
RESTART_BACKOFF = 1.0
WAIT_POLL_SECONDS = 0.2
METRICS_TIMEOUT = 2.0  # a worker whose /metrics takes longer is reported down for that scrape


class Worker:
    """The front's handle on one worker process."""

    def __init__(self, worker_id: str):
        self.id = worker_id
        self.token = secrets.token_urlsafe(24)
        self.proc: asyncio.subprocess.Process | None = None
        self.url: str | None = None
        self.client: ServiceClient | None = None
        self.ready = asyncio.Event()
        self.restarts = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and self.ready.is_set()


class WorkerPool(CallService):
    """What the `/v1` routes, the agent tool and the webhook handler talk to in the front.

    It has the `CallService` interface (place_call, hangup, wait, handle_events, live, ...),
    but places no call itself: it forwards to the workers. It inherits the provider helpers
    (permission checks, reconciliation), which need no media.
    """

    def __init__(
        self,
        settings: Settings,
        store: CallStore,
        *,
        workers: int,
        worker_command: list[str],
        metrics: Any = None,
        instance_id: str | None = None,
    ):
        super().__init__(settings, store, metrics=metrics, live=LiveUpdates())
        self.instance_id = instance_id  # set when several instances share the store
        prefix = f"{instance_id}/" if instance_id else ""
        self.workers = [Worker(f"{prefix}w{i + 1}") for i in range(workers)]
        self.worker_command = worker_command
        self._supervisors: list[asyncio.Task[None]] = []
        self._streams: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0))
        if metrics is not None and hasattr(metrics, "add_refresher"):
            metrics.add_refresher(self._read_worker_metrics)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> list[CallRecord]:
        """Reconcile what a previous run left, then start every worker and wait until ready."""
        reconciled = await super().start()
        for worker in self.workers:
            self._supervisors.append(asyncio.create_task(self._supervise(worker)))
        async with asyncio.timeout(READY_TIMEOUT):
            await asyncio.gather(*(w.ready.wait() for w in self.workers))
        return reconciled

    async def shutdown(self, timeout: float = 15.0) -> None:
        """Stop the workers gracefully (each ends its calls politely), then the streams."""
        self._stopping = True
        self._accepting = False
        for task in self._streams.values():
            task.cancel()
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.terminate()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout + 5):
                await asyncio.gather(*self._supervisors, return_exceptions=True)
        for task in [*self._supervisors, *self._streams.values()]:
            task.cancel()
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is None:
                worker.proc.kill()
            if worker.client is not None:
                await worker.client.close()
        await self._http.aclose()

    async def _supervise(self, worker: Worker) -> None:
        while not self._stopping:
            try:
                await self._run_worker(worker)
            except Exception:
                log.exception("worker %s failed to start", worker.id)
            if self._stopping:
                return
            worker.ready.clear()
            await self._reconcile_worker(worker)
            worker.restarts += 1
            log.warning("worker %s exited; restarting it (restart %d)", worker.id, worker.restarts)
            await asyncio.sleep(RESTART_BACKOFF)

    async def _run_worker(self, worker: Worker) -> None:
        env = {**os.environ, "WHATSAPP_CALL_WORKER_TOKEN": worker.token}
        worker.proc = await asyncio.create_subprocess_exec(
            *self.worker_command,
            "--id",
            worker.id,
            env=env,
            stdin=asyncio.subprocess.PIPE,  # the worker stops when this closes (front gone)
            stdout=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(READY_TIMEOUT):
            while True:
                line = await worker.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"worker {worker.id} exited before it was ready")
                text = line.decode(errors="replace").strip()
                if text.startswith(READY_PREFIX):
                    worker.url = json.loads(text[len(READY_PREFIX) :])["url"]
                    break
                print(text, file=sys.stderr)
        if worker.client is not None:
            await worker.client.close()
        worker.client = ServiceClient(worker.url, worker.token)
        self._streams[worker.id] = asyncio.create_task(self._follow_updates(worker))
        worker.ready.set()
        log.info("worker %s ready at %s", worker.id, worker.url)
        relay = asyncio.create_task(_relay_output(worker))
        await worker.proc.wait()
        relay.cancel()
        self._streams.pop(worker.id).cancel()

    async def _reconcile_worker(self, worker: Worker) -> None:
        """The worker died: its calls' media died with it. End them at the provider."""
        for record in await self.store.non_final_calls():
            if record.worker == worker.id:
                await self.reconcile(
                    record, f"failed: media worker {worker.id} stopped unexpectedly"
                )
                self.live.publish(
                    record.id, {"type": "state", "state": "ended", "end_reason": "failed"}
                )
                self.live.close(record.id)

    async def _follow_updates(self, worker: Worker) -> None:
        """Re-publish the worker's live updates here, for the SSE stream and the agent tool."""
        headers = {"Authorization": f"Bearer {worker.token}"}
        while True:
            try:
                async with self._http.stream(
                    "GET", f"{worker.url}/internal/updates", headers=headers, timeout=None
                ) as response:
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        update = json.loads(line[5:])
                        call_id = update.pop("call_id")
                        self.live.publish(call_id, update)
                        if update.get("type") == "state" and update.get("state") == "ended":
                            self.live.close(call_id)
            except (httpx.HTTPError, json.JSONDecodeError):
                await asyncio.sleep(0.2)

    async def _read_worker_metrics(self) -> None:
        """Read every worker's /metrics into the front's (before the front's is rendered)."""

        async def read(worker: Worker) -> None:
            if not worker.alive:
                self.metrics.read_worker(worker.id, worker.restarts, None)
                return
            try:
                response = await self._http.get(f"{worker.url}/metrics", timeout=METRICS_TIMEOUT)
                response.raise_for_status()
                self.metrics.read_worker(worker.id, worker.restarts, response.text)
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("could not read worker %s's metrics: %s", worker.id, exc)
                self.metrics.read_worker(worker.id, worker.restarts, None)

        await asyncio.gather(*(read(w) for w in self.workers))

    # -- calls ----------------------------------------------------------------------------

    async def place_call(self, request: CallRequest) -> CallRecord:
        if not self._accepting:
            raise ServiceBusyError(
                "The service is shutting down and takes no new calls.", "Retry later."
            )
        if request.idempotency_key:
            existing = await self.store.find_by_idempotency_key(request.idempotency_key)
            if existing is not None:
                return existing
        worker = await self._least_loaded()
        try:
            body = await worker.client.place_call(
                request.to,
                idempotency_key=request.idempotency_key,
                greeting=request.greeting,
                instructions=request.instructions,
                voice=request.voice,
                language=request.language,
                metadata=request.metadata or None,
            )
        except ServiceError as exc:
            raise _from_worker(exc) from None
        record = await self.store.get_call(body["id"])
        assert record is not None
        return record

    async def hangup(self, call_id: str) -> CallRecord:
        record = await self.store.get_call(call_id)
        if record is None:
            raise BadInputError(
                f"There is no call {call_id!r}.", "List calls with: whatsapp-call calls"
            )
        worker = self._owner(record)
        if worker is not None and not record.is_final:
            with contextlib.suppress(ServiceError):
                await worker.client.hangup(call_id)
        return await self.store.get_call(call_id)  # type: ignore[return-value]

    async def wait(self, call_id: str, timeout: float | None = None) -> CallRecord:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = await self.store.get_call(call_id)
            if record is None:
                raise BadInputError(
                    f"There is no call {call_id!r}.", "List calls with: whatsapp-call calls"
                )
            if record.is_final:
                return record
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError
            await asyncio.sleep(WAIT_POLL_SECONDS)

    def owns(self, record: CallRecord) -> bool:
        if self.instance_id is None:
            return True  # the only instance: whatever a previous run left is ours
        return any(record.worker == w.id for w in self.workers)

    @property
    def active_count(self) -> int:
        return 0  # the front owns no call; /healthz counts come from the store

    async def _least_loaded(self) -> Worker:
        alive = [w for w in self.workers if w.alive]
        if not alive:
            raise ServiceBusyError(
                "No media worker is running.",
                "Check the service log; workers restart by themselves.",
            )
        load = {w.id: 0 for w in alive}
        for record in await self.store.non_final_calls():
            if record.worker in load:
                load[record.worker] += 1
        return min(alive, key=lambda w: (load[w.id], w.id))

    def _owner(self, record: CallRecord) -> Worker | None:
        return next((w for w in self.workers if w.id == record.worker and w.alive), None)

    # -- webhook events -------------------------------------------------------------------

    async def handle_events(self, events: list[CallEvent]) -> None:
        received_at = time.monotonic()  # the worker measures routing latency from here
        routed: dict[str, list[CallEvent]] = {}
        broadcast: list[CallEvent] = []
        for event in events:
            record = None
            if event.type != CallEventType.PERMISSION_REPLY:
                record = await self._find_record(event)
            worker = self._owner(record) if record is not None else None
            if worker is not None:
                routed.setdefault(worker.id, []).append(event)
            elif record is not None and record.worker is not None:
                log.info("event %s for call %s of a stopped worker dropped", event.type, record.id)
            else:
                broadcast.append(event)
        sends = [
            self._send(w, routed.get(w.id, []) + broadcast, received_at)
            for w in self.workers
            if w.alive
        ]
        await asyncio.gather(*sends)

    async def _send(self, worker: Worker, events: list[CallEvent], received_at: float) -> None:
        if not events:
            return
        try:
            response = await self._http.post(
                f"{worker.url}/internal/events",
                json={"events": [event_to_dict(e) for e in events], "received_at": received_at},
                headers={"Authorization": f"Bearer {worker.token}"},
            )
            response.raise_for_status()
        except httpx.HTTPError as exc:
            log.error("could not hand %d event(s) to worker %s: %s", len(events), worker.id, exc)


def _from_worker(exc: ServiceError) -> WhatsAppCallError:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", {}) if isinstance(body, dict) else {}
    message = error.get("message") or exc.message
    hint = error.get("hint")
    if exc.status == 503:
        return ServiceBusyError(message, hint)
    if exc.status == 409:
        return CallInProgressError(message, error.get("call_id", ""), hint)
    return WhatsAppCallError(message, hint)


async def _relay_output(worker: Worker) -> None:
    """Pass the worker's own output through to ours (its log lines)."""
    assert worker.proc is not None and worker.proc.stdout is not None
    while line := await worker.proc.stdout.readline():
        sys.stderr.write(f"[{worker.id}] {line.decode(errors='replace')}")
