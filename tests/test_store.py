"""The SQLite call store: every CallStore method, atomic transitions and webhook dedupe (also
between two store instances on one file), retention, reopening, and the failure modes
(unusable stateDir, a full database, a foreign or corrupt file, a crash mid-transaction)."""

import asyncio
import os
import sqlite3
import stat
import sys
import textwrap
from datetime import UTC, datetime, timedelta

import pytest
from whatsapp_call.errors import ConfigError
from whatsapp_call.store import (
    CallNotFoundError,
    CallRecord,
    CallState,
    DuplicateCallError,
    EndReason,
    PurgeResult,
    SqliteCallStore,
    StoreCorruptError,
    StoreError,
    StoreUnavailableError,
    open_store,
)
from whatsapp_call.store.sqlite import DB_FILENAME, SCHEMA_VERSION

NUMBER = "+14085551234"


@pytest.fixture
async def store(tmp_path):
    s = SqliteCallStore(tmp_path / "state")
    await s.open()
    yield s
    await s.close()


def _call(**kwargs):
    return CallRecord(to_e164=kwargs.pop("to_e164", NUMBER), provider="meta", **kwargs)


async def test_state_dir_and_file_are_private(tmp_path):
    state = tmp_path / "a" / "state"
    store = SqliteCallStore(state)
    await store.open()
    await store.close()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / DB_FILENAME).stat().st_mode) == 0o600
    with sqlite3.connect(state / DB_FILENAME) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_create_get_and_find(store):
    record = _call(idempotency_key="idem-1", greeting="Hi", metadata={"ticket": 7}, language="en")
    assert await store.create_call(record) is record
    got = await store.get_call(record.id)
    assert got == record
    assert got.created_at.tzinfo is not None
    assert await store.get_call("call_missing") is None
    assert (await store.find_by_idempotency_key("idem-1")).id == record.id
    assert await store.find_by_idempotency_key("other") is None

    await store.update_call(record.id, provider_call_id="wacid.ABC")
    assert (await store.find_by_provider_call_id("meta", "wacid.ABC")).id == record.id
    assert await store.find_by_provider_call_id("wati", "wacid.ABC") is None

    events = await store.get_events(record.id)
    assert [(e.seq, e.type, e.data) for e in events] == [
        (1, "state", {"from": None, "to": "created"})
    ]


async def test_duplicate_id_or_idempotency_key_is_refused(store):
    first = await store.create_call(_call(idempotency_key="same"))
    with pytest.raises(DuplicateCallError) as by_key:
        await store.create_call(_call(idempotency_key="same"))
    assert by_key.value.existing_id == first.id
    with pytest.raises(DuplicateCallError) as by_id:
        await store.create_call(_call(id=first.id))
    assert by_id.value.existing_id == first.id
    assert len(await store.list_calls()) == 1


async def test_find_active_by_callee_and_list_calls(store):
    old = await store.create_call(_call(created_at=datetime.now(UTC) - timedelta(minutes=5)))
    new = await store.create_call(_call())
    other = await store.create_call(_call(to_e164="+5511987654321"))
    assert (await store.find_active_by_callee(NUMBER)).id == new.id
    await store.transition(new.id, "ended", end_reason="completed")
    assert (await store.find_active_by_callee(NUMBER)).id == old.id
    await store.transition(old.id, CallState.ENDED, end_reason=EndReason.CANCELLED)
    assert await store.find_active_by_callee(NUMBER) is None

    assert [c.id for c in await store.list_calls()] == [other.id, new.id, old.id]
    assert [c.id for c in await store.list_calls(limit=2)] == [other.id, new.id]
    assert [c.id for c in await store.list_calls(state="ended")] == [new.id, old.id]
    assert [c.id for c in await store.list_calls(state=CallState.CREATED)] == [other.id]
    assert [c.id for c in await store.non_final_calls()] == [other.id]
    counts = await store.count_by_state()
    assert counts["ended"] == 2 and counts["created"] == 1 and counts["ringing"] == 0
    assert set(counts) == {s.value for s in CallState}


async def test_update_call_changes_only_allowed_fields(store):
    record = await store.create_call(_call())
    updated = await store.update_call(
        record.id, voice="cedar", metadata={"a": [1, 2]}, worker="w1", end_detail="x"
    )
    assert (updated.voice, updated.metadata, updated.worker) == ("cedar", {"a": [1, 2]}, "w1")
    assert updated.updated_at >= record.updated_at
    with pytest.raises(ValueError, match="state"):
        await store.update_call(record.id, state="ended")
    with pytest.raises(CallNotFoundError):
        await store.update_call("call_nope", voice="x")
    assert (await store.get_call(record.id)).state == CallState.CREATED


async def test_transition_rules(store):
    record = await store.create_call(_call())
    assert await store.transition(record.id, "offering", data={"sdp_bytes": 900})
    assert not await store.transition(record.id, "offering")  # same state: no change
    with pytest.raises(ValueError, match="end_reason"):
        await store.transition(record.id, "ended")
    with pytest.raises(ValueError, match="end_reason"):
        await store.transition(record.id, "ringing", end_reason="completed")
    with pytest.raises(CallNotFoundError):
        await store.transition("call_nope", "ringing")
    assert await store.transition(record.id, "ringing")
    assert await store.transition(record.id, "ended", end_reason="rejected", detail="user declined")
    assert not await store.transition(record.id, "in_progress")  # ended is final
    assert not await store.transition(record.id, "ended", end_reason="failed")

    ended = await store.get_call(record.id)
    assert ended.state == CallState.ENDED and ended.end_reason == EndReason.REJECTED
    assert ended.end_detail == "user declined" and ended.is_final
    assert ended.ended_at is not None and ended.duration_seconds >= 0
    states = [e.data for e in await store.get_events(record.id)]
    assert states == [
        {"from": None, "to": "created"},
        {"from": "created", "to": "offering", "sdp_bytes": 900},
        {"from": "offering", "to": "ringing"},
        {"from": "ringing", "to": "ended", "end_reason": "rejected", "detail": "user declined"},
    ]


async def test_events_transcripts_and_metrics(store):
    record = await store.create_call(_call())
    at = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert await store.add_event(record.id, "answer", {"sdp_bytes": 1}, at=at) == 2
    assert await store.add_event(record.id, "note") == 3
    events = await store.get_events(record.id)
    assert (events[1].type, events[1].data, events[1].at) == ("answer", {"sdp_bytes": 1}, at)
    assert events[2].data == {}
    with pytest.raises(CallNotFoundError):
        await store.add_event("call_nope", "x")

    t0 = datetime.now(UTC)
    await store.add_transcript(record.id, "assistant", "Hello!", at=t0)
    await store.add_transcript(record.id, "user", "Hi, who is this?", at=t0 + timedelta(seconds=1))
    lines = await store.get_transcript(record.id)
    assert [(line.role, line.text, line.at) for line in lines] == [
        ("assistant", "Hello!", t0),
        ("user", "Hi, who is this?", t0 + timedelta(seconds=1)),
    ]
    with pytest.raises(CallNotFoundError):
        await store.add_transcript("call_nope", "user", "x")

    assert await store.set_metrics(record.id, {"setup_ms": 800}) == {"setup_ms": 800}
    assert await store.set_metrics(record.id, {"turns": 3}) == {"setup_ms": 800, "turns": 3}
    assert await store.set_metrics(record.id, {"turns": 4}, merge=False) == {"turns": 4}
    assert (await store.get_call(record.id)).metrics == {"turns": 4}
    with pytest.raises(CallNotFoundError):
        await store.set_metrics("call_nope", {})


async def test_concurrent_transitions_end_a_call_exactly_once(store):
    record = await store.create_call(_call())
    reasons = list(EndReason)
    async with asyncio.timeout(10):
        results = await asyncio.gather(
            *(
                store.transition(record.id, "ended", end_reason=reasons[i % len(reasons)])
                for i in range(50)
            )
        )
    assert results.count(True) == 1
    events = await store.get_events(record.id)
    assert [e.data["to"] for e in events] == ["created", "ended"]
    # Concurrent appends get distinct, gap-free sequence numbers.
    async with asyncio.timeout(10):
        seqs = await asyncio.gather(*(store.add_event(record.id, "tick") for _ in range(100)))
    assert sorted(seqs) == list(range(3, 103))


async def test_two_instances_on_one_file_share_dedupe_and_transitions(tmp_path):
    a = SqliteCallStore(tmp_path / "state")
    b = SqliteCallStore(tmp_path / "state")
    await asyncio.gather(a.open(), b.open())
    try:
        keys = [f"wacid.{i}:RINGING" for i in range(200)]
        async with asyncio.timeout(20):
            results = await asyncio.gather(
                *(s.mark_webhook_processed(k) for k in keys for s in (a, b))
            )
        assert results.count(True) == len(keys)  # each key won by exactly one instance
        assert not await a.mark_webhook_processed(keys[0])

        record = await a.create_call(_call())
        assert (await b.get_call(record.id)).id == record.id
        async with asyncio.timeout(20):
            won = await asyncio.gather(
                *(
                    s.transition(record.id, "ended", end_reason="completed")
                    for _ in range(20)
                    for s in (a, b)
                )
            )
        assert won.count(True) == 1
    finally:
        await a.close()
        await b.close()


async def test_instances_opening_a_new_file_at_once_never_see_a_foreign_store(tmp_path):
    """Both create-or-check the schema at the same moment: the one that loses the race must
    see our store (consistent identity read), not "an SQLite database of another application"."""
    for i in range(40):
        stores = [SqliteCallStore(tmp_path / f"state{i}") for _ in range(3)]
        try:
            async with asyncio.timeout(20):
                await asyncio.gather(*(s.open() for s in stores))
        finally:
            for store in stores:
                await store.close()


async def test_purge_deletes_old_ended_calls_and_dedupe_keys(store):
    old = await store.create_call(_call())
    await store.add_event(old.id, "x")
    await store.add_transcript(old.id, "user", "bye")
    await store.transition(old.id, "ended", end_reason="completed")
    live = await store.create_call(_call(created_at=datetime.now(UTC) - timedelta(days=9)))
    await store.mark_webhook_processed("k1")
    await asyncio.sleep(0.01)
    cutoff = datetime.now(UTC)
    recent = await store.create_call(_call())
    await store.transition(recent.id, "ended", end_reason="failed")
    await store.mark_webhook_processed("k2")

    assert await store.purge(cutoff) == PurgeResult(
        calls=1, events=3, transcripts=1, webhook_keys=1
    )
    assert await store.get_call(old.id) is None
    assert await store.get_events(old.id) == [] and await store.get_transcript(old.id) == []
    assert await store.get_call(live.id) is not None  # not ended: never purged
    assert await store.get_call(recent.id) is not None
    assert await store.mark_webhook_processed("k1")  # forgotten
    assert not await store.mark_webhook_processed("k2")
    assert await store.purge(timedelta(days=1)) == PurgeResult()


async def test_retention_purges_at_open(tmp_path):
    store = SqliteCallStore(tmp_path / "state")
    record = await store.create_call(_call())
    await store.transition(record.id, "ended", end_reason="completed")
    await store.close()
    with sqlite3.connect(tmp_path / "state" / DB_FILENAME) as conn:  # age it by 40 days
        aged = (datetime.now(UTC) - timedelta(days=40)).isoformat(timespec="microseconds")
        conn.execute("UPDATE calls SET ended_at = ?", (aged,))
    kept = SqliteCallStore(tmp_path / "state", retention=timedelta(days=60))
    assert await kept.get_call(record.id) is not None
    await kept.close()
    purging = SqliteCallStore(tmp_path / "state", retention=timedelta(days=30))
    await purging.open()
    assert await purging.get_call(record.id) is None
    await purging.close()


async def test_reopen_after_close_keeps_everything(tmp_path):
    first = SqliteCallStore(tmp_path / "state")
    record = await first.create_call(_call(idempotency_key="k"))
    await first.transition(record.id, "in_progress")
    await first.add_transcript(record.id, "assistant", "Hello")
    await first.set_metrics(record.id, {"turns": 1})
    await first.mark_webhook_processed("dedupe-1")
    await first.close()
    await first.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        await first.get_call(record.id)

    second = SqliteCallStore(tmp_path / "state")
    await second.open()
    try:
        got = await second.get_call(record.id)
        assert got.state == CallState.IN_PROGRESS and got.metrics == {"turns": 1}
        assert len(await second.get_events(record.id)) == 2
        assert [t.text for t in await second.get_transcript(record.id)] == ["Hello"]
        assert not await second.mark_webhook_processed("dedupe-1")
        assert [c.id for c in await second.non_final_calls()] == [record.id]
    finally:
        await second.close()


async def test_unusable_state_dir_is_reported_with_the_fix(tmp_path):
    # Tests run as root, which ignores permission bits; a path below a regular file fails
    # for root too (ENOTDIR), as a read-only or missing mount would.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    store = SqliteCallStore(blocker / "state")
    with pytest.raises(StoreUnavailableError) as err:
        await store.open()
    assert str(blocker / "state") in str(err.value)
    assert "stateDir" in err.value.hint
    await store.close()
    assert blocker.read_text() == "x"


async def test_full_database_is_unavailable_not_corrupt(store):
    record = await store.create_call(_call())
    # A full disk as SQLite sees it: no page may be added (SQLITE_FULL).
    pages = await store._run(lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
    await store._run(lambda conn: conn.execute(f"PRAGMA max_page_count = {pages}"))
    with pytest.raises(StoreUnavailableError, match="full"):
        for i in range(1000):
            await store.add_transcript(record.id, "user", f"{i} " + "words " * 200)
    assert (await store.get_call(record.id)).id == record.id  # reads still work


@pytest.mark.parametrize(
    "content",
    [b"this is not a database at all" * 100, b"SQLite format 3\x00" + b"\xff" * 4000],
    ids=["text", "damaged-header"],
)
async def test_corrupt_file_is_refused_and_left_intact(tmp_path, content):
    state = tmp_path / "state"
    state.mkdir()
    (state / DB_FILENAME).write_bytes(content)
    store = SqliteCallStore(state)
    with pytest.raises(StoreCorruptError) as err:
        await store.open()
    assert str(state / DB_FILENAME) in str(err.value) and err.value.hint
    with pytest.raises(StoreCorruptError):  # every later use says the same
        await store.count_by_state()
    await store.close()
    assert (state / DB_FILENAME).read_bytes() == content
    assert sorted(os.listdir(state)) == [DB_FILENAME]


async def test_foreign_sqlite_database_is_refused_and_left_intact(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    with sqlite3.connect(state / DB_FILENAME) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("INSERT INTO notes VALUES ('keep me')")
    before = (state / DB_FILENAME).read_bytes()
    store = SqliteCallStore(state)
    with pytest.raises(StoreCorruptError, match="another application"):
        await store.open()
    await store.close()
    assert (state / DB_FILENAME).read_bytes() == before


async def test_newer_schema_is_refused(tmp_path):
    store = SqliteCallStore(tmp_path / "state")
    await store.open()
    await store.close()
    with sqlite3.connect(tmp_path / "state" / DB_FILENAME) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer = SqliteCallStore(tmp_path / "state")
    with pytest.raises(StoreError, match="newer") as err:
        await newer.open()
    assert "Upgrade whatsapp-call" in err.value.hint
    await newer.close()


async def test_crash_mid_transaction_loses_nothing_committed(tmp_path):
    state = tmp_path / "state"
    child = textwrap.dedent(
        f"""
        import asyncio, os
        from pathlib import Path
        from whatsapp_call.store import CallRecord, SqliteCallStore

        async def main():
            store = SqliteCallStore(Path({str(state)!r}))
            kept = await store.create_call(CallRecord(to_e164="+14085551234", provider="meta", id="call_kept"))
            await store.transition(kept.id, "ringing")

            def half_done(conn):
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("UPDATE calls SET state = 'in_progress' WHERE id = 'call_kept'")
                conn.execute("DELETE FROM events")
                os._exit(3)  # the process dies with the transaction open

            await store._run(half_done)

        asyncio.run(main())
        """
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", child, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        _, stderr = await proc.communicate()
    assert proc.returncode == 3, stderr.decode()
    store = SqliteCallStore(state)
    await store.open()
    try:
        got = await store.get_call("call_kept")
        assert got.state == CallState.RINGING
        assert [e.data["to"] for e in await store.get_events("call_kept")] == [
            "created",
            "ringing",
        ]
        ok = await store._run(lambda conn: conn.execute("PRAGMA integrity_check").fetchone()[0])
        assert ok == "ok"
    finally:
        await store.close()


async def test_open_store_picks_sqlite_in_state_dir(tmp_path, make_settings):
    settings = make_settings(stateDir=str(tmp_path / "st"))
    store = open_store(settings)
    assert isinstance(store, SqliteCallStore) and store.state_dir == tmp_path / "st"
    await store.open()
    await store.close()
    assert (tmp_path / "st" / DB_FILENAME).exists()

    by_url = open_store(settings, url=f"sqlite://{tmp_path / 'other'}")
    assert by_url.state_dir == tmp_path / "other"
    with pytest.raises(ConfigError, match="postgresql"):
        open_store(settings, url="mysql://user@db/calls")  # the hint lists postgresql
