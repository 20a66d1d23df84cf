"""The PostgreSQL call store against a real PostgreSQL server: the shared behavioural suite of
test_store.py (same tests, same expectations as SQLite), two instances on one database, schema
creation and refusal of foreign or newer schemas, retention, and the failure modes (server
down, bad credentials, missing database) reported without the password."""

import asyncio
import secrets
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from pydantic import SecretStr
from services import postgres_server  # noqa: F401 - session fixture: one server per run

# The shared behavioural suite: these tests run here unchanged, with `store` (below) a
# PostgresCallStore instead of the SQLite one.
from test_store import (  # noqa: F401
    _call,
    test_concurrent_transitions_end_a_call_exactly_once,
    test_create_get_and_find,
    test_duplicate_id_or_idempotency_key_is_refused,
    test_events_transcripts_and_metrics,
    test_find_active_by_callee_and_list_calls,
    test_purge_deletes_old_ended_calls_and_dedupe_keys,
    test_transition_rules,
    test_update_call_changes_only_allowed_fields,
)
from whatsapp_call.errors import ConfigError
from whatsapp_call.store import (
    CallState,
    PostgresCallStore,
    StoreCorruptError,
    StoreError,
    StoreUnavailableError,
    open_store,
)
from whatsapp_call.store.postgres import SCHEMA_VERSION


def _schema() -> str:
    return f"t_{secrets.token_hex(6)}"


def _url(server, schema: str, **query: str) -> str:
    extra = "".join(f"&{k}={v}" for k, v in query.items())
    return f"{server.url}?schema={schema}{extra}"


@pytest.fixture
def pg_url(postgres_server):  # noqa: F811
    """A URL to a fresh, empty schema: tests never see each other's rows."""
    return _url(postgres_server, _schema())


@pytest.fixture
async def store(pg_url):
    s = PostgresCallStore(pg_url)
    await s.open()
    yield s
    await s.close()


async def _admin(server):
    return await asyncpg.connect(server.url, timeout=10)


async def test_schema_is_created_with_a_version_and_reopened(pg_url, postgres_server):  # noqa: F811
    first = PostgresCallStore(pg_url)
    record = await first.create_call(_call(idempotency_key="k"))  # opens on first use
    await first.transition(record.id, "in_progress")
    await first.add_transcript(record.id, "assistant", "Hello")
    await first.set_metrics(record.id, {"turns": 1})
    assert await first.mark_webhook_processed("dedupe-1")
    await first.close()
    await first.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        await first.get_call(record.id)

    conn = await _admin(postgres_server)
    try:
        schema = first.schema
        row = await conn.fetchrow(f'SELECT application, version FROM "{schema}".store_info')
        assert tuple(row) == ("whatsapp-call", SCHEMA_VERSION)
        tables = {
            r[0]
            for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = $1", schema
            )
        }
        assert tables == {"store_info", "calls", "events", "transcripts", "webhook_keys"}
    finally:
        await conn.close()

    second = PostgresCallStore(pg_url)
    await second.open()
    try:
        got = await second.get_call(record.id)
        assert got.state == CallState.IN_PROGRESS and got.metrics == {"turns": 1}
        assert got == (await second.list_calls())[0]
        assert len(await second.get_events(record.id)) == 2
        assert [t.text for t in await second.get_transcript(record.id)] == ["Hello"]
        assert not await second.mark_webhook_processed("dedupe-1")
        assert [c.id for c in await second.non_final_calls()] == [record.id]
    finally:
        await second.close()


async def test_instances_starting_together_create_the_schema_once(pg_url):
    stores = [PostgresCallStore(pg_url) for _ in range(4)]
    try:
        async with asyncio.timeout(20):
            await asyncio.gather(*(s.open() for s in stores))
        record = await stores[0].create_call(_call())
        assert all([(await s.get_call(record.id)).id == record.id for s in stores])
    finally:
        for s in stores:
            await s.close()


async def test_two_instances_share_dedupe_and_transitions_exactly_once(pg_url):
    a = PostgresCallStore(pg_url)
    b = PostgresCallStore(pg_url)
    await asyncio.gather(a.open(), b.open())
    try:
        keys = [f"wacid.{i}:RINGING" for i in range(200)]
        async with asyncio.timeout(20):
            results = await asyncio.gather(
                *(s.mark_webhook_processed(k) for k in keys for s in (a, b))
            )
        assert results.count(True) == len(keys)  # each key won by exactly one instance
        assert not await b.mark_webhook_processed(keys[0])

        record = await a.create_call(_call())
        assert (await b.get_call(record.id)).id == record.id
        async with asyncio.timeout(20):
            won = await asyncio.gather(
                *(
                    s.transition(record.id, state, end_reason=reason)
                    for _ in range(20)
                    for s in (a, b)
                    for state, reason in (("ringing", None), ("ended", "completed"))
                )
            )
        # Whatever the interleaving: at most one move to ringing, exactly one end, and the
        # history agrees with the winners (no lost or doubled event).
        events = [e.data for e in await b.get_events(record.id)]
        assert won.count(True) == len(events) - 1
        assert [e["to"] for e in events][-1] == "ended"
        assert [e["to"] for e in events].count("ended") == 1
        assert [e["to"] for e in events].count("ringing") <= 1
        assert [e.seq for e in await a.get_events(record.id)] == list(range(1, len(events) + 1))

        # Appends from both instances interleave into one gap-free sequence.
        async with asyncio.timeout(20):
            seqs = await asyncio.gather(
                *(s.add_event(record.id, "tick") for _ in range(50) for s in (a, b))
            )
        assert sorted(seqs) == list(range(len(events) + 1, len(events) + 101))

        # The same call created through both instances at once: one wins, one is told.
        dup = _call(idempotency_key="same-request")
        twin = _call(idempotency_key="same-request")
        outcomes = await asyncio.gather(
            a.create_call(dup), b.create_call(twin), return_exceptions=True
        )
        winners = [o for o in outcomes if not isinstance(o, Exception)]
        losers = [o for o in outcomes if isinstance(o, Exception)]
        assert len(winners) == 1 and len(losers) == 1
        assert losers[0].existing_id == winners[0].id
    finally:
        await a.close()
        await b.close()


async def test_retention_purges_at_open(pg_url, postgres_server):  # noqa: F811
    store = PostgresCallStore(pg_url)
    record = await store.create_call(_call())
    await store.transition(record.id, "ended", end_reason="completed")
    await store.close()
    conn = await _admin(postgres_server)
    try:  # age it by 40 days
        await conn.execute(
            f'UPDATE "{store.schema}".calls SET ended_at = $1',
            datetime.now(UTC) - timedelta(days=40),
        )
    finally:
        await conn.close()
    kept = PostgresCallStore(pg_url, retention=timedelta(days=60))
    assert await kept.get_call(record.id) is not None
    await kept.close()
    purging = PostgresCallStore(pg_url, retention=timedelta(days=30))
    await purging.open()
    try:
        assert await purging.get_call(record.id) is None
        assert await purging.get_events(record.id) == []
    finally:
        await purging.close()


async def test_foreign_schema_is_refused_and_left_intact(postgres_server):  # noqa: F811
    schema = _schema()
    conn = await _admin(postgres_server)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(f"CREATE TABLE {schema}.notes (body text)")
        await conn.execute(f"INSERT INTO {schema}.notes VALUES ('keep me')")
        store = PostgresCallStore(_url(postgres_server, schema))
        with pytest.raises(StoreCorruptError, match="another application") as err:
            await store.open()
        assert "?schema=" in err.value.hint
        await store.close()
        assert await conn.fetchval(f"SELECT body FROM {schema}.notes") == "keep me"
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
        assert [r[0] for r in tables] == ["notes"]
    finally:
        await conn.close()


async def test_newer_schema_is_refused(pg_url, postgres_server):  # noqa: F811
    store = PostgresCallStore(pg_url)
    await store.open()
    await store.close()
    conn = await _admin(postgres_server)
    try:
        await conn.execute(
            f'UPDATE "{store.schema}".store_info SET version = $1', SCHEMA_VERSION + 1
        )
    finally:
        await conn.close()
    newer = PostgresCallStore(pg_url)
    with pytest.raises(StoreError, match="newer") as err:
        await newer.open()
    assert "Upgrade" in err.value.hint
    await newer.close()


async def test_bad_password_names_the_host_and_never_the_password(postgres_server):  # noqa: F811
    wrong = "not-the-password-" + secrets.token_hex(4)
    url = f"postgresql://wacall:{wrong}@127.0.0.1:{postgres_server.port}/postgres"
    store = PostgresCallStore(url)
    with pytest.raises(StoreUnavailableError) as err:
        await store.open()
    text = str(err.value)
    assert f"127.0.0.1:{postgres_server.port}" in text and "credentials" in text
    assert "password" in err.value.hint and "databaseUrl" in err.value.hint
    assert wrong not in text and wrong not in repr(store)
    await store.close()


async def test_missing_database_says_how_to_create_it(postgres_server):  # noqa: F811
    url = postgres_server.url.rsplit("/", 1)[0] + "/no_such_db"
    store = PostgresCallStore(url)
    with pytest.raises(StoreUnavailableError, match="does not exist") as err:
        await store.open()
    assert "createdb" in err.value.hint
    assert postgres_server.password not in str(err.value)
    await store.close()


async def test_unreachable_server_is_unavailable_with_the_fix(postgres_server):  # noqa: F811
    from services import free_port

    port = free_port()  # nothing listens there
    url = f"postgresql://wacall:{postgres_server.password}@127.0.0.1:{port}/postgres"
    store = PostgresCallStore(url, connect_timeout=5)
    async with asyncio.timeout(15):
        with pytest.raises(StoreUnavailableError) as err:
            await store.get_call("call_x")  # lazily opened: same report
    text = str(err.value)
    assert f"127.0.0.1:{port}" in text and "reachable" in text
    assert postgres_server.password not in text
    await store.close()


@pytest.mark.slow  # a server or a child process of its own: ~3 s
async def test_server_restart_costs_only_the_calls_in_flight():
    """A database restart: operations fail as StoreUnavailableError while it is down, and
    the same store works again once it is back (the pool reconnects)."""
    from services import start_postgres

    with start_postgres() as server:  # its own server: stopping the shared one would hurt
        store = PostgresCallStore(_url(server, _schema()), connect_timeout=3)
        await store.open()
        try:
            record = await store.create_call(_call())
            await asyncio.to_thread(server.stop)
            async with asyncio.timeout(15):
                with pytest.raises(StoreUnavailableError) as err:
                    await store.get_call(record.id)
            assert f"127.0.0.1:{server.port}" in str(err.value)
            await asyncio.to_thread(server.start)
            async with asyncio.timeout(15):
                assert (await store.get_call(record.id)).id == record.id
                assert await store.transition(record.id, "ringing")
        finally:
            await store.close()


async def test_url_options_and_open_store(postgres_server, make_settings, tmp_path):  # noqa: F811
    schema = _schema()
    settings = make_settings(stateDir=str(tmp_path / "st"))
    store = open_store(settings, url=_url(postgres_server, schema, pool_max_size="3"))
    assert isinstance(store, PostgresCallStore)
    assert (store.schema, store.pool_max_size) == (schema, 3)
    assert postgres_server.password not in repr(store)
    await store.open()
    await store.close()
    alias = open_store(settings, url=postgres_server.url.replace("postgresql://", "postgres://"))
    assert isinstance(alias, PostgresCallStore) and alias.schema == "whatsapp_call"

    class WithDatabaseUrl:  # what config.py's `databaseUrl` becomes
        state_dir = tmp_path / "st"
        database_url = _url(postgres_server, schema)

    by_setting = open_store(WithDatabaseUrl())
    assert isinstance(by_setting, PostgresCallStore) and by_setting.schema == schema

    class WithSecretDatabaseUrl(WithDatabaseUrl):
        database_url = SecretStr(_url(postgres_server, schema))

    by_secret = open_store(WithSecretDatabaseUrl())
    await by_secret.open()
    assert await by_secret.count_by_state() == {s.value: 0 for s in CallState}
    await by_secret.close()

    with pytest.raises(ConfigError, match="schema"):
        PostgresCallStore("postgresql://u@h/db?schema=Robert'); DROP TABLE x;--")
    with pytest.raises(ConfigError, match="pool_max_size"):
        PostgresCallStore("postgresql://u@h/db?pool_max_size=0")
