"""The Redis event bus against a real redis-server: messages handled exactly once and in
order, a crash between read and acknowledgement re-delivering exactly the unacknowledged
messages to the restarted instance, retries and dead letters, call ownership that expires
with its instance (killed for real), routing between two instances, the stream cap, a Redis
restart, and errors that name the server but never the password."""

import asyncio
import json
import secrets
import signal
import sys
import textwrap

import pytest
from services import free_port, redis_server, start_redis  # noqa: F401 - session fixture
from whatsapp_call.cluster import BusError, BusUnavailableError, OwnedCall, RedisEventBus
from whatsapp_call.errors import ConfigError

WAIT = 10.0  # upper bound of every wait on the bus


@pytest.fixture
def namespace():
    """A namespace of its own per test: no test sees another's keys."""
    return f"test-{secrets.token_hex(4)}"


@pytest.fixture
async def buses(redis_server, namespace):  # noqa: F811
    """make(instance_id, **options) -> an open bus on the test's namespace; all closed after."""
    made: list[RedisEventBus] = []
    tasks: list[asyncio.Task] = []

    async def make(instance_id: str, **options) -> RedisEventBus:
        bus = RedisEventBus(redis_server.url, instance_id, namespace=namespace, **options)
        await bus.open()
        made.append(bus)
        return bus

    make.tasks = tasks
    yield make
    for bus in made:
        await bus.close()
    async with asyncio.timeout(WAIT):
        await asyncio.gather(*tasks, return_exceptions=True)


def consuming(make, bus: RedisEventBus, handler) -> asyncio.Task:
    task = asyncio.create_task(bus.consume(handler))
    make.tasks.append(task)
    return task


class Inbox:
    """A handler that records messages and lets a test wait for a number of them."""

    def __init__(self):
        self.messages: list[dict] = []
        self._changed = asyncio.Event()

    async def __call__(self, message: dict) -> None:
        self.messages.append(message)
        self._changed.set()

    async def wait_for(self, count: int) -> list[dict]:
        async with asyncio.timeout(WAIT):
            while len(self.messages) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.messages


async def _until(predicate, what: str):
    """Poll Redis-side state (which has no event to wait on) for up to WAIT seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while loop.time() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out after {WAIT:.0f} s waiting for {what}")


# A separate process, so "crash" and "death" are real: os._exit mid-handler, or SIGKILL.
CHILD = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from whatsapp_call.cluster import RedisEventBus

    url, namespace, instance, mode = sys.argv[1:5]

    async def main():
        bus = RedisEventBus(url, instance, namespace=namespace, instance_ttl=1.0)
        await bus.open()
        if mode == "crash-on-3":
            async def handler(message):
                if message["n"] == 3:
                    print("crashing", message["n"], flush=True)
                    os._exit(3)  # read, not acknowledged: the process dies
                print("handled", message["n"], flush=True)
            await bus.consume(handler)
        elif mode == "own":
            assert await bus.claim_call("call_a1", "wacid.A1")
            assert await bus.claim_call("call_a2")
            print("ready", flush=True)
            await asyncio.sleep(60)  # until killed

    asyncio.run(main())
    """
)


async def _child(redis_server, namespace, instance, mode):  # noqa: F811
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        redis_server.url,
        namespace,
        instance,
        mode,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_publish_consume_exactly_once_in_order(buses):
    sender = await buses("front")
    worker = await buses("worker-1")
    inbox = Inbox()
    consuming(buses, worker, inbox)
    ids = [await sender.publish("worker-1", {"n": i, "text": "héllo"}) for i in range(200)]
    assert len(set(ids)) == 200
    got = await inbox.wait_for(200)
    await asyncio.sleep(0.2)  # nothing more may arrive
    assert [m["n"] for m in got] == list(range(200))
    assert got[0] == {"n": 0, "text": "héllo"}
    pending = await worker._redis.xpending(worker.inbox("worker-1"), "instances")
    assert pending["pending"] == 0  # every message acknowledged
    with pytest.raises(BusError, match="JSON"):
        await sender.publish("worker-1", {"bad": object()})
    with pytest.raises(BusError, match="consumed already"):
        await worker.consume(inbox)


async def test_messages_published_before_the_consumer_starts_are_delivered(buses):
    sender = await buses("front")
    for i in range(3):
        await sender.publish("late-worker", {"n": i})
    worker = await buses("late-worker")
    inbox = Inbox()
    consuming(buses, worker, inbox)
    assert [m["n"] for m in await inbox.wait_for(3)] == [0, 1, 2]


async def test_crash_between_read_and_ack_redelivers_exactly_those(
    buses,
    redis_server,  # noqa: F811
    namespace,
):
    sender = await buses("front")
    for n in range(1, 6):
        await sender.publish("w1", {"n": n})
    child = await _child(redis_server, namespace, "w1", "crash-on-3")
    async with asyncio.timeout(30):
        out, err = await child.communicate()
    assert child.returncode == 3, err.decode()
    assert out.decode().split("\n")[:3] == ["handled 1", "handled 2", "crashing 3"]
    # All five were read by the dead run; 3, 4 and 5 were never acknowledged.
    probe = await buses("probe")
    pending = await probe._redis.xpending(probe.inbox("w1"), "instances")
    assert pending["pending"] == 3

    restarted = await buses("w1")  # same instance id: its pending messages come back
    inbox = Inbox()
    consuming(buses, restarted, inbox)
    await sender.publish("w1", {"n": 6})
    got = await inbox.wait_for(4)
    await asyncio.sleep(0.3)
    assert [m["n"] for m in got] == [3, 4, 5, 6]  # 1 and 2 not again; 3-5 exactly once
    pending = await probe._redis.xpending(probe.inbox("w1"), "instances")
    assert pending["pending"] == 0


async def test_failing_handler_is_retried_then_dead_lettered(buses):
    worker = await buses("w", retry_after=0.3, max_deliveries=3, block=0.1)
    attempts: dict[int, int] = {}
    done = Inbox()

    async def handler(message):
        n = message["n"]
        attempts[n] = attempts.get(n, 0) + 1
        if n == 1 or (n == 2 and attempts[n] == 1):
            raise RuntimeError("handler bug")  # 1 always fails; 2 fails once
        await done(message)

    consuming(buses, worker, handler)
    for n in range(4):
        await worker.publish("w", {"n": n})
    await done.wait_for(3)
    dead = worker.dead_letters("w")
    await _until(lambda: _xlen(worker, dead, 1), "the poison message in the dead-letter stream")
    assert attempts == {0: 1, 1: 3, 2: 2, 3: 1}
    assert sorted(m["n"] for m in done.messages) == [0, 2, 3]
    (entry,) = await worker._redis.xrange(dead)
    assert json.loads(entry[1]["data"]) == {"n": 1} and "failed 3 times" in entry[1]["why"]
    assert (await worker._redis.xpending(worker.inbox("w"), "instances"))["pending"] == 0


async def _xlen(bus, key, n):
    return await bus._redis.xlen(key) >= n


@pytest.mark.slow  # a server or a child process of its own: ~3 s
async def test_ownership_expires_when_the_owner_is_killed(
    buses,
    redis_server,  # noqa: F811
    namespace,
):
    b = await buses("b", instance_ttl=1.0)
    child = await _child(redis_server, namespace, "a", "own")
    try:
        async with asyncio.timeout(30):
            line = await child.stdout.readline()
        assert line == b"ready\n", (await child.stderr.read()).decode()
        assert await b.owner_of("call_a1") == "a"
        assert await b.owner_of(provider_call_id="wacid.A1") == "a"
        assert await b.instances_alive() == ["a", "b"]
        assert await b.orphaned_calls() == []
        assert not await b.claim_call("call_a1")  # a live instance holds it
        assert not await b.release_call("call_a1")
        await asyncio.sleep(1.5)  # heartbeats keep a's ownership past its TTL
        assert await b.owner_of("call_a1") == "a"
    finally:
        child.send_signal(signal.SIGKILL)  # no clean exit: only the TTL can tell
        async with asyncio.timeout(WAIT):
            await child.wait()

    await _until(lambda: _is_none(b.owner_of("call_a1")), "a's ownership to expire")
    assert await b.owner_of(provider_call_id="wacid.A1") is None
    assert await b.instances_alive() == ["b"]
    orphans = await b.orphaned_calls()
    assert sorted(orphans, key=lambda o: o.call_id) == [
        OwnedCall("call_a1", "wacid.A1", "a"),
        OwnedCall("call_a2", None, "a"),
    ]
    # b reconciles: takes one call over, releases the other (ended at the provider).
    assert await b.claim_call("call_a1")
    assert await b.owner_of(provider_call_id="wacid.A1") == "b"
    assert await b.release_call("call_a2")
    assert await b.orphaned_calls() == []
    assert await b.owner_of("call_a2") is None
    members = await b._redis.smembers("{" + b.namespace + "}:instances")
    assert members == {"b"}  # the dead instance, owning nothing, is forgotten


async def _is_none(coro):
    return await coro is None


async def test_a_restarted_instance_finds_its_previous_runs_calls_orphaned(buses):
    first = await buses("a")
    assert await first.claim_call("call_1", "wacid.1")
    assert await first.claim_call("call_1", "wacid.1")  # idempotent
    second = await buses("a")  # the same instance id, restarted: a new run
    assert await second.owner_of("call_1") is None  # its media died with the old run
    assert await second.orphaned_calls() == [OwnedCall("call_1", "wacid.1", "a")]
    assert await second.claim_call("call_2")
    assert await second.orphaned_calls() == [OwnedCall("call_1", "wacid.1", "a")]
    assert await second.claim_call("call_1")  # reconciled and taken over
    assert await second.owner_of(provider_call_id="wacid.1") == "a"
    assert await second.orphaned_calls() == []


async def test_two_instances_route_events_to_the_owner(buses):
    a = await buses("a")
    b = await buses("b")
    inbox_a, inbox_b = Inbox(), Inbox()
    consuming(buses, a, inbox_a)
    consuming(buses, b, inbox_b)
    assert await a.claim_call("call_a")
    assert await a.claim_call("call_a", "wacid.A")  # the provider's id, once known
    assert await b.claim_call("call_b", "wacid.B")
    # Webhooks land anywhere: each instance routes by the provider's call id or ours.
    routed = [
        await a.route({"call": "b", "n": 1}, provider_call_id="wacid.B"),
        await b.route({"call": "a", "n": 1}, provider_call_id="wacid.A"),
        await a.route({"call": "a", "n": 2}, call_id="call_a"),
        await b.route({"call": "b", "n": 2}, call_id="call_b"),
        await a.route({"call": "b", "n": 3}, provider_call_id="wacid.B"),
    ]
    assert routed == ["b", "a", "a", "b", "b"]
    assert await a.route({"call": "?"}, provider_call_id="wacid.UNKNOWN") is None
    got_a = await inbox_a.wait_for(2)
    got_b = await inbox_b.wait_for(3)
    await asyncio.sleep(0.2)
    assert got_a == [{"call": "a", "n": 1}, {"call": "a", "n": 2}]
    assert got_b == [{"call": "b", "n": 1}, {"call": "b", "n": 2}, {"call": "b", "n": 3}]

    # A call that ends is released; its ids no longer route.
    assert await b.release_call("call_b")
    assert await a.owner_of(provider_call_id="wacid.B") is None
    with pytest.raises(ValueError):
        await a.owner_of()


async def test_clean_close_leaves_at_once_and_stops_consuming(buses):
    a = await buses("a", block=5.0)
    b = await buses("b")
    task = consuming(buses, a, Inbox())
    assert await a.claim_call("call_1")
    await asyncio.sleep(0.1)  # a is blocked in XREADGROUP now
    async with asyncio.timeout(3):  # well under the 5 s block: close interrupts the read
        await a.close()
        await task
    assert await b.instances_alive() == ["b"]
    assert await b.owner_of("call_1") is None
    assert await b.orphaned_calls() == [OwnedCall("call_1", None, "a")]
    await a.close()  # idempotent
    with pytest.raises(BusError, match="closed"):
        await a.publish("b", {})


async def test_streams_are_capped(buses):
    sender = await buses("front", maxlen=100)
    for i in range(1000):
        await sender.publish("offline", {"n": i})
    length = await sender._redis.xlen(sender.inbox("offline"))
    assert 100 <= length < 300  # MAXLEN ~ trims whole nodes (100 entries each)


async def test_consumer_waits_out_a_redis_restart(namespace):
    with start_redis() as server:  # its own server: restarting the shared one would hurt
        bus = RedisEventBus(server.url, "w", namespace=namespace, instance_ttl=1.0, block=0.2)
        await bus.open()
        inbox = Inbox()
        task = asyncio.create_task(bus.consume(inbox))
        try:
            await bus.publish("w", {"n": 1})
            await inbox.wait_for(1)
            await asyncio.to_thread(server.stop)
            with pytest.raises(BusUnavailableError, match="reach Redis"):
                await bus.publish("w", {"n": 2})
            await asyncio.to_thread(server.start)  # empty: no persistence in tests
            await bus.claim_call("call_1")
            await bus.publish("w", {"n": 3})
            assert [m["n"] for m in await inbox.wait_for(2)] == [1, 3]
            await _until(lambda: _alive(bus, "w"), "the heartbeat to re-announce w")
        finally:
            async with asyncio.timeout(WAIT):
                await bus.close()
                await task


async def _alive(bus, who):
    return who in await bus.instances_alive()


async def test_errors_name_the_server_never_the_password(redis_server):  # noqa: F811
    wrong = "wrong-" + secrets.token_hex(4)
    bad = RedisEventBus(f"redis://:{wrong}@127.0.0.1:{redis_server.port}/0", "x")
    with pytest.raises(BusUnavailableError, match="credentials") as err:
        await bad.open()
    assert f"127.0.0.1:{redis_server.port}" in str(err.value) and wrong not in str(err.value)
    assert wrong not in repr(bad)

    port = free_port()
    down = RedisEventBus(f"redis://:{redis_server.password}@127.0.0.1:{port}/0", "x")
    with pytest.raises(BusUnavailableError, match="reach Redis") as err:
        await down.open()
    assert f"127.0.0.1:{port}" in str(err.value) and "running and reachable" in err.value.hint
    assert redis_server.password not in str(err.value)

    with pytest.raises(ConfigError, match="scheme"):
        RedisEventBus("http://127.0.0.1:6379", "x")
    with pytest.raises(ConfigError, match="Instance id"):
        RedisEventBus(redis_server.url, "has space")
    with pytest.raises(BusError, match="not open"):
        await RedisEventBus(redis_server.url, "x").publish("y", {})
