"""The Redis event bus between service instances: routes a call's events to the one instance
that holds its media, and tracks which instance owns which call.

A webhook may land on any instance, but a call's media lives in exactly one process. So:

* Each instance reads its own Redis Stream (`inbox:<instance>`) in a consumer group, and
  acknowledges a message only after its handler succeeded. A message read but not
  acknowledged when the process died stays pending, and the restarted instance (same
  `instance_id`) claims and handles exactly those first (XAUTOCLAIM): nothing is lost, and
  nothing handled is handled again. A handler that keeps failing is retried, then moved to
  `dead:<instance>` after `max_deliveries`. Streams are capped (MAXLEN ~).
* Ownership: `claim_call` records "call → instance (this run)" and the provider's call id;
  a heartbeat keeps a TTL'd `alive:<instance>` key (holding a per-run token) and the call
  records fresh. When an instance dies its alive key expires (or is replaced by its next
  run's token), `owner_of` stops naming it, and `orphaned_calls()` lists its calls so that a
  live instance can reconcile them (end them, or re-claim them).

Every key shares one hash tag (`{namespace}`), so the scripts' keys live in one Redis Cluster
slot. Messages are JSON objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError, WhatsAppCallError

log = logging.getLogger("whatsapp_call.cluster")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]

GROUP = "instances"
DEFAULT_NAMESPACE = "whatsapp-call"
DEFAULT_INSTANCE_TTL = 10.0
DEFAULT_CALL_TTL = 3600.0
DEFAULT_MAXLEN = 10_000
DEFAULT_MAX_DELIVERIES = 5
DEFAULT_RETRY_AFTER = 30.0
READ_BATCH = 50
BLOCK_SECONDS = 1.0
CLOSE_TIMEOUT = 10.0
BACKOFF_MAX = 5.0


class BusError(WhatsAppCallError):
    """The event bus failed."""


class BusUnavailableError(BusError):
    """Redis cannot be reached or refused us."""


@dataclass(frozen=True)
class OwnedCall:
    """A call's ownership record: which instance holds its media."""

    call_id: str
    provider_call_id: str | None
    owner: str


# KEYS: none (all keys derive from the prefix, under one hash tag).
# ARGV: prefix, me, run, call_id, provider_call_id ('' for none), call_ttl_ms.
# Returns the owner after the call: `me` when claimed, else the live instance holding it.
_CLAIM = """
local p, me, run, id, pcid, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local key = p .. 'owner:' .. id
local prev = redis.call('HGET', key, 'instance')
local prev_run = redis.call('HGET', key, 'run')
if prev and not (prev == me and prev_run == run) then
  if redis.call('GET', p .. 'alive:' .. prev) == prev_run then
    return prev
  end
  redis.call('SREM', p .. 'owned:' .. prev, id)
end
redis.call('HSET', key, 'instance', me, 'run', run)
if pcid ~= '' then
  local old = redis.call('HGET', key, 'provider_call_id')
  if old and old ~= pcid and redis.call('GET', p .. 'provider:' .. old) == id then
    redis.call('DEL', p .. 'provider:' .. old)
  end
  redis.call('HSET', key, 'provider_call_id', pcid)
end
local stored = redis.call('HGET', key, 'provider_call_id')
if stored then
  redis.call('SET', p .. 'provider:' .. stored, id, 'PX', ttl)
end
redis.call('PEXPIRE', key, ttl)
redis.call('SADD', p .. 'owned:' .. me, id)
redis.call('PEXPIRE', p .. 'owned:' .. me, ttl)
return me
"""

# ARGV: prefix, call_id ('' when looked up by provider id), provider_call_id.
# Returns the live owner's instance id, or nil.
_OWNER_OF = """
local p, id = ARGV[1], ARGV[2]
if id == '' then
  id = redis.call('GET', p .. 'provider:' .. ARGV[3])
  if not id then return false end
end
local owner = redis.call('HMGET', p .. 'owner:' .. id, 'instance', 'run')
if not owner[1] then return false end
if redis.call('GET', p .. 'alive:' .. owner[1]) ~= owner[2] then return false end
return owner[1]
"""

# ARGV: prefix, me, run, instance_ttl_ms, call_ttl_ms. Refreshes this run's calls; drops
# ids whose record expired or went to another instance; keeps older runs' calls (orphans).
_HEARTBEAT = """
local p, me, run, ttl, call_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
redis.call('SET', p .. 'alive:' .. me, run, 'PX', ttl)
redis.call('SADD', p .. 'instances', me)
local owned = p .. 'owned:' .. me
local ids = redis.call('SMEMBERS', owned)
local mine = 0
for _, id in ipairs(ids) do
  local key = p .. 'owner:' .. id
  local rec = redis.call('HMGET', key, 'instance', 'run', 'provider_call_id')
  if rec[1] ~= me then
    redis.call('SREM', owned, id)
  elseif rec[2] == run then
    mine = mine + 1
    redis.call('PEXPIRE', key, call_ttl)
    if rec[3] then redis.call('PEXPIRE', p .. 'provider:' .. rec[3], call_ttl) end
  end
end
if #ids > 0 then redis.call('PEXPIRE', owned, call_ttl) end
return mine
"""

# ARGV: prefix, me, run, call_id. Refuses (0) to drop a call another live run holds.
_RELEASE = """
local p, me, run, id = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local key = p .. 'owner:' .. id
local rec = redis.call('HMGET', key, 'instance', 'run', 'provider_call_id')
if not rec[1] then return 1 end
if not (rec[1] == me and rec[2] == run) and redis.call('GET', p .. 'alive:' .. rec[1]) == rec[2] then
  return 0
end
if rec[3] and redis.call('GET', p .. 'provider:' .. rec[3]) == id then
  redis.call('DEL', p .. 'provider:' .. rec[3])
end
redis.call('DEL', key)
redis.call('SREM', p .. 'owned:' .. rec[1], id)
return 1
"""

# ARGV: prefix, instance. Forgets an instance that is gone and owns nothing any more.
_FORGET_IF_GONE = """
local p, who = ARGV[1], ARGV[2]
if redis.call('EXISTS', p .. 'alive:' .. who) == 0 and redis.call('SCARD', p .. 'owned:' .. who) == 0 then
  return redis.call('SREM', p .. 'instances', who)
end
return 0
"""

# ARGV: prefix, me, run. A clean exit: gone at once, not after the TTL.
_LEAVE = """
local p, me, run = ARGV[1], ARGV[2], ARGV[3]
if redis.call('GET', p .. 'alive:' .. me) == run then
  redis.call('DEL', p .. 'alive:' .. me)
end
if redis.call('SCARD', p .. 'owned:' .. me) == 0 then
  redis.call('SREM', p .. 'instances', me)
end
return 1
"""


class RedisEventBus:
    """One instance's connection to the bus. `instance_id` must be stable across restarts of
    the same instance (e.g. host name + worker slot): it names the stream whose pending
    messages a restart re-delivers. Use as `async with RedisEventBus(...) as bus:` or call
    `open()` / `close()`; run `consume(handler)` as a task to receive.

    `instance_ttl`: an instance that stopped heart-beating is dead after this (seconds).
    `call_ttl`: a dead instance's call records stay listed by `orphaned_calls()` this long.
    `maxlen`: approximate cap of each stream (oldest entries are trimmed).
    `retry_after` / `max_deliveries`: a failed message is retried after `retry_after`
    seconds, and moved to the dead-letter stream after `max_deliveries` deliveries.
    """

    def __init__(
        self,
        url: str,
        instance_id: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        instance_ttl: float = DEFAULT_INSTANCE_TTL,
        heartbeat_interval: float | None = None,
        call_ttl: float = DEFAULT_CALL_TTL,
        maxlen: int = DEFAULT_MAXLEN,
        retry_after: float = DEFAULT_RETRY_AFTER,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        block: float = BLOCK_SECONDS,
    ):
        if not instance_id or any(c in instance_id for c in "{}: \t\n"):
            raise ConfigError(
                f"Instance id {instance_id!r} is not usable on the event bus.",
                "Use a non-empty name without spaces, braces or colons (e.g. host-1.worker-2).",
            )
        if "{" in namespace or "}" in namespace or not namespace:
            raise ConfigError(
                f"Event bus namespace {namespace!r} is not usable.",
                "Use a non-empty name without braces.",
            )
        self.url = url
        self.instance_id = instance_id
        self.namespace = namespace
        self.instance_ttl = instance_ttl
        self.heartbeat_interval = heartbeat_interval or instance_ttl / 3
        self.call_ttl = call_ttl
        self.maxlen = maxlen
        self.retry_after = retry_after
        self.max_deliveries = max_deliveries
        self.block = block
        self.location, self._password = _describe_url(url)
        self.run_id = secrets.token_hex(8)  # this process's run: older runs' calls are orphans
        self._prefix = "{" + namespace + "}:"
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._consuming = False
        self._consume_done = asyncio.Event()
        self._consume_done.set()
        self._closed = False
        self._last_reclaim = 0.0

    def __repr__(self) -> str:
        return f"RedisEventBus({self.location!r}, instance_id={self.instance_id!r})"

    # -- keys -------------------------------------------------------------------------------

    def inbox(self, instance: str) -> str:
        return f"{self._prefix}inbox:{instance}"

    def dead_letters(self, instance: str) -> str:
        return f"{self._prefix}dead:{instance}"

    # -- errors -----------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    def _translate(self, exc: BaseException) -> BusError:
        import redis.exceptions as rex

        text = self._scrub(str(exc).strip() or type(exc).__name__).rstrip(".")
        if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError) or (
            isinstance(exc, rex.ResponseError) and text.startswith(("NOAUTH", "WRONGPASS"))
        ):
            return BusUnavailableError(
                f"Redis at {self.location} refused the credentials ({text}).",
                "Check the password (and user) in the Redis URL.",
            )
        if isinstance(exc, rex.ConnectionError | rex.TimeoutError | OSError | TimeoutError):
            return BusUnavailableError(
                f"The event bus cannot reach Redis at {self.location}: {text}.",
                f"Check that Redis at {self.location} is running and reachable from this "
                "machine (host, port, firewall, TLS: rediss://), or fix the Redis URL.",
            )
        if isinstance(exc, rex.ResponseError) and text.startswith(("READONLY", "OOM")):
            return BusUnavailableError(
                f"Redis at {self.location} cannot take writes: {text}.",
                "Point the Redis URL at the primary, and give Redis memory (maxmemory) "
                "with a policy that never evicts streams (noeviction).",
            )
        return BusError(
            f"The event bus on Redis at {self.location} failed: {text}.",
            "Check the Redis server's log; report it if it happens again.",
        )

    @contextlib.asynccontextmanager
    async def _errors(self):
        import redis.exceptions as rex

        try:
            yield
        except BusError:
            raise
        except (rex.RedisError, OSError, TimeoutError) as exc:
            raise self._translate(exc) from None

    def _client(self) -> Any:
        if self._closed:
            raise BusError(
                f"The event bus of {self.instance_id} is closed.",
                "This is a bug in the caller: it used the bus after close().",
            )
        if self._redis is None:
            raise BusError(
                "The event bus is not open.", "Call `await bus.open()` (or use `async with`)."
            )
        return self._redis

    # -- life cycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, announce this instance (heartbeat) and start heart-beating."""
        if self._redis is not None:
            return
        try:
            import redis.asyncio as aredis
        except ImportError as exc:
            raise ConfigError(
                "The event bus needs the redis client, which is not installed.",
                "Install the cluster extra: pip install 'whatsapp-call[cluster]'.",
            ) from exc
        try:
            client = aredis.Redis.from_url(
                self.url,
                decode_responses=True,
                protocol=2,
                socket_connect_timeout=5,
                socket_timeout=max(10.0, self.block + 5),
                health_check_interval=30,
            )
        except ValueError as exc:
            raise ConfigError(
                f"The Redis URL for {self.location} is malformed ({self._scrub(str(exc))}).",
                "Write it as redis://:password@host:6379/0 (rediss:// for TLS).",
            ) from None
        self._scripts = {
            name: client.register_script(source)
            for name, source in (
                ("claim", _CLAIM),
                ("owner_of", _OWNER_OF),
                ("heartbeat", _HEARTBEAT),
                ("release", _RELEASE),
                ("forget", _FORGET_IF_GONE),
                ("leave", _LEAVE),
            )
        }
        self._redis = client
        try:
            async with self._errors():
                await client.ping()
                await self._heartbeat_once()
                await self._ensure_group()
        except BaseException:
            self._redis = None
            await client.aclose()
            raise
        self._heartbeat_task = asyncio.get_running_loop().create_task(
            self._heartbeat_loop(), name=f"bus-heartbeat-{self.instance_id}"
        )

    async def __aenter__(self) -> RedisEventBus:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop consuming (after the message in hand), stop heart-beating, leave, disconnect.
        Idempotent. The calls this instance still owns become orphans at once."""
        if self._closed:
            return
        self._stopping.set()
        if self._consuming:
            try:
                await asyncio.wait_for(self._consume_done.wait(), CLOSE_TIMEOUT)
            except TimeoutError:
                log.warning("event bus consumer of %s did not stop in time", self.instance_id)
        task, self._heartbeat_task = self._heartbeat_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        client, self._redis = self._redis, None
        self._closed = True
        if client is None:
            return
        try:
            await self._scripts["leave"](
                args=[self._prefix, self.instance_id, self.run_id], client=client
            )
        except Exception as exc:  # Redis gone: the TTL will say we left
            log.warning("event bus: could not deregister %s: %s", self.instance_id, exc)
        with contextlib.suppress(Exception):
            await client.aclose()

    # -- heartbeats and ownership -----------------------------------------------------------

    async def _heartbeat_once(self) -> int:
        return await self._scripts["heartbeat"](
            args=[
                self._prefix,
                self.instance_id,
                self.run_id,
                int(self.instance_ttl * 1000),
                int(self.call_ttl * 1000),
            ],
            client=self._redis,
        )

    async def _heartbeat_loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self._heartbeat_once()
                if failing:
                    log.info("event bus: heartbeat of %s restored", self.instance_id)
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning(
                        "event bus: heartbeat of %s failed (%s); other instances will "
                        "consider it dead after %.0f s",
                        self.instance_id,
                        self._translate(exc).message,
                        self.instance_ttl,
                    )
                failing = True

    async def claim_call(self, call_id: str, provider_call_id: str | None = None) -> bool:
        """Record that this instance holds the call's media (again with the provider's call id
        once known). False when another live instance holds it; a dead instance's call (or
        this instance's, from before a restart) may be taken over."""
        async with self._errors():
            owner = await self._scripts["claim"](
                args=[
                    self._prefix,
                    self.instance_id,
                    self.run_id,
                    call_id,
                    provider_call_id or "",
                    int(self.call_ttl * 1000),
                ],
                client=self._client(),
            )
        return owner == self.instance_id

    async def release_call(self, call_id: str) -> bool:
        """Forget the call's ownership (it ended, or a dead owner's call was reconciled).
        False when another live instance holds it (nothing is changed then)."""
        async with self._errors():
            done = await self._scripts["release"](
                args=[self._prefix, self.instance_id, self.run_id, call_id],
                client=self._client(),
            )
        return bool(done)

    async def owner_of(
        self, call_id: str | None = None, provider_call_id: str | None = None
    ) -> str | None:
        """The live instance holding the call (by our id or the provider's), or None: unknown
        call, or its owner is dead (stopped heart-beating, or restarted since claiming)."""
        if not call_id and not provider_call_id:
            raise ValueError("owner_of() needs call_id or provider_call_id")
        async with self._errors():
            return await self._scripts["owner_of"](
                args=[self._prefix, call_id or "", provider_call_id or ""],
                client=self._client(),
            )

    async def instances_alive(self) -> list[str]:
        """Instances whose heartbeat has not expired, sorted."""
        client = self._client()
        async with self._errors():
            members = sorted(await client.smembers(self._prefix + "instances"))
            if not members:
                return []
            alive = await client.mget([f"{self._prefix}alive:{m}" for m in members])
        return [m for m, run in zip(members, alive, strict=True) if run is not None]

    async def orphaned_calls(self) -> list[OwnedCall]:
        """Calls whose owner is dead (or restarted since claiming them, this instance
        included): reconcile each, then `claim_call` or `release_call` it. Instances that are
        gone and own nothing any more are forgotten on the way."""
        client = self._client()
        orphans: list[OwnedCall] = []
        async with self._errors():
            members = sorted(await client.smembers(self._prefix + "instances"))
            if not members:
                return []
            runs = await client.mget([f"{self._prefix}alive:{m}" for m in members])
            for member, live_run in zip(members, runs, strict=True):
                ids = sorted(await client.smembers(f"{self._prefix}owned:{member}"))
                if not ids and live_run is None:
                    await self._scripts["forget"](args=[self._prefix, member], client=client)
                    continue
                async with client.pipeline(transaction=False) as pipe:
                    for call_id in ids:
                        pipe.hmget(
                            f"{self._prefix}owner:{call_id}",
                            ["instance", "run", "provider_call_id"],
                        )
                    records = await pipe.execute()
                for call_id, (instance, run, provider_call_id) in zip(ids, records, strict=True):
                    if instance == member and run != live_run:
                        orphans.append(OwnedCall(call_id, provider_call_id, member))
        return orphans

    # -- messages ---------------------------------------------------------------------------

    async def publish(self, owner: str, message: dict[str, Any]) -> str:
        """Append `message` (a JSON object) to `owner`'s stream; returns the stream entry id.
        Delivered once `owner` consumes, even if it is restarting right now."""
        if not isinstance(message, dict):
            raise BusError(
                f"An event bus message must be a JSON object (a dict), not {type(message).__name__}.",
                "Wrap the value in a dict.",
            )
        try:
            body = json.dumps(message, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise BusError(
                f"An event bus message must be JSON: {exc}.",
                "Convert the values to strings, numbers, lists and objects first.",
            ) from None
        async with self._errors():
            return await self._client().xadd(
                self.inbox(owner),
                {"data": body, "from": self.instance_id},
                maxlen=self.maxlen,
                approximate=True,
            )

    async def route(
        self,
        message: dict[str, Any],
        *,
        call_id: str | None = None,
        provider_call_id: str | None = None,
    ) -> str | None:
        """Publish to the live owner of the call; returns it, or None (nobody owns it)."""
        owner = await self.owner_of(call_id=call_id, provider_call_id=provider_call_id)
        if owner is not None:
            await self.publish(owner, message)
        return owner

    async def _ensure_group(self) -> None:
        import redis.exceptions as rex

        try:
            # From id 0: messages published before this instance ever started are delivered.
            await self._redis.xgroup_create(
                self.inbox(self.instance_id), GROUP, id="0", mkstream=True
            )
        except rex.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def consume(self, handler: Handler) -> None:
        """Handle this instance's messages until `close()`: first those a previous run read
        but never acknowledged, then new ones, one at a time and in order. A message is
        acknowledged only after `handler(message)` returned; Redis outages are waited out."""
        client = self._client()
        if self._consuming:
            raise BusError(
                f"The event bus of {self.instance_id} is consumed already.",
                "Run one consume() per bus.",
            )
        self._consuming = True
        self._consume_done.clear()
        backoff = 0.2
        recovered = False
        try:
            while not self._stopping.is_set():
                try:
                    if not recovered:
                        await self._ensure_group()
                        await self._reclaim(handler, min_idle=0.0)  # a crashed run's messages
                        recovered = True
                    elif time.monotonic() - self._last_reclaim >= self.retry_after / 2:
                        await self._reclaim(handler, min_idle=self.retry_after)
                    entries = await self._read(client)
                    for entry_id, fields in entries:
                        await self._handle(handler, entry_id, fields, deliveries=1)
                    backoff = 0.2
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    error = self._translate(exc)
                    if "NOGROUP" in str(exc):  # Redis lost its data (restart, no persistence)
                        recovered = False
                    log.warning("event bus consumer of %s: %s", self.instance_id, error.message)
                    if isinstance(error, BusUnavailableError):
                        recovered = False  # on reconnect, take back what was pending
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            self._consuming = False
            self._consume_done.set()

    async def _read(self, client: Any) -> list[tuple[str, dict[str, str]]]:
        """New messages, or [] after `block` seconds; returns early (with []) on close. A read
        interrupted by close leaves its messages pending: the next run gets them."""
        read = asyncio.ensure_future(
            client.xreadgroup(
                GROUP,
                self.instance_id,
                {self.inbox(self.instance_id): ">"},
                count=READ_BATCH,
                block=int(self.block * 1000),
            )
        )
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not read.done():
            read.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await read
            return []
        reply = read.result()
        return [entry for _stream, entries in reply or [] for entry in entries]

    async def _reclaim(self, handler: Handler, *, min_idle: float) -> None:
        """Take over and handle pending messages idle for `min_idle` seconds (XAUTOCLAIM)."""
        client = self._client()
        stream = self.inbox(self.instance_id)
        self._last_reclaim = time.monotonic()
        cursor = "0-0"
        while not self._stopping.is_set():
            reply = await client.xautoclaim(
                stream,
                GROUP,
                self.instance_id,
                min_idle_time=int(min_idle * 1000),
                start_id=cursor,
                count=READ_BATCH,
            )
            cursor, entries = reply[0], reply[1]
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                log.warning(
                    "event bus: %d pending message(s) for %s were trimmed before handling "
                    "(stream cap %d reached); raise maxlen",
                    len(deleted),
                    self.instance_id,
                    self.maxlen,
                )
            for entry_id, fields in entries:
                if fields is None:  # deleted between claim and read
                    await client.xack(stream, GROUP, entry_id)
                    continue
                info = await client.xpending_range(stream, GROUP, entry_id, entry_id, 1)
                deliveries = info[0]["times_delivered"] if info else 1
                await self._handle(handler, entry_id, fields, deliveries=deliveries)
            if cursor == "0-0":
                return

    async def _handle(
        self, handler: Handler, entry_id: str, fields: dict[str, str], *, deliveries: int
    ) -> None:
        client = self._client()
        stream = self.inbox(self.instance_id)
        try:
            message = json.loads(fields["data"])
        except (KeyError, ValueError, TypeError) as exc:
            await self._dead_letter(entry_id, fields, f"not a bus message: {exc}")
            return
        if deliveries > self.max_deliveries:
            await self._dead_letter(entry_id, fields, f"failed {deliveries - 1} times")
            return
        try:
            await handler(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "event bus: handler failed on message %s for %s (delivery %d of %d); "
                "retried in %g s",
                entry_id,
                self.instance_id,
                deliveries,
                self.max_deliveries,
                self.retry_after,
            )
            return
        await client.xack(stream, GROUP, entry_id)

    async def _dead_letter(self, entry_id: str, fields: dict[str, str], why: str) -> None:
        client = self._client()
        log.error(
            "event bus: message %s for %s moved to %s: %s",
            entry_id,
            self.instance_id,
            self.dead_letters(self.instance_id),
            why,
        )
        async with client.pipeline(transaction=True) as pipe:
            pipe.xadd(
                self.dead_letters(self.instance_id),
                {**fields, "id": entry_id, "why": why},
                maxlen=self.maxlen,
                approximate=True,
            )
            pipe.xack(self.inbox(self.instance_id), GROUP, entry_id)
            await pipe.execute()


def _describe_url(url: str) -> tuple[str, str | None]:
    """(`host:port/db`, password) of a Redis URL; the first is safe to print."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(
            f"The Redis URL is malformed ({exc}).",
            "Write it as redis://:password@host:6379/0 (rediss:// for TLS).",
        ) from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"{parts.scheme or '(no scheme)'!r} is not a Redis URL scheme.",
            "Write it as redis://:password@host:6379/0 (rediss:// for TLS, unix:// for a socket).",
        )
    if parts.scheme == "unix":
        return f"unix:{parts.path}", parts.password
    db = parts.path.lstrip("/") or "0"
    return f"{parts.hostname or 'localhost'}:{port or 6379}/{db}", parts.password
