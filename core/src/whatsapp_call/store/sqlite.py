"""The SQLite call store: one file in `stateDir`, safe for several processes on one machine.

Every database call runs on one dedicated worker thread that owns the connection, so the
audio-critical event loop never waits on the disk and SQLite never sees two threads. WAL
mode lets readers run beside the writer; `synchronous=NORMAL` in WAL mode keeps every
committed transaction across a process crash (only a power cut may lose the last ones).
State changes use `BEGIN IMMEDIATE`, so "check the state, then change it" is atomic even
between processes sharing the file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from .base import (
    CALL_COLUMNS as _CALL_COLUMNS,
)
from .base import (
    UPDATABLE_FIELDS,
    CallNotFoundError,
    CallRecord,
    CallState,
    CallStore,
    DuplicateCallError,
    EndReason,
    PurgeResult,
    StoreCorruptError,
    StoredEvent,
    StoreError,
    StoreUnavailableError,
    TranscriptLine,
    transition_event,
    utcnow,
)

log = logging.getLogger("whatsapp_call.store")

T = TypeVar("T")

DB_FILENAME = "calls.db"
# Written into the SQLite header (PRAGMA application_id): "WACS", whatsapp-call store.
APPLICATION_ID = 0x57414353
SCHEMA_VERSION = 1
BUSY_TIMEOUT_SECONDS = 10.0
# Dedupe keys outlive Meta's retry window (up to 36 h) comfortably, then go.
WEBHOOK_KEY_TTL = timedelta(days=7)
HOUSEKEEPING_INTERVAL_SECONDS = 3600.0

_SCHEMA_V1 = """
CREATE TABLE calls (
    id               TEXT PRIMARY KEY,
    to_e164          TEXT NOT NULL,
    provider         TEXT NOT NULL,
    state            TEXT NOT NULL,
    provider_call_id TEXT,
    end_reason       TEXT,
    end_detail       TEXT,
    greeting         TEXT,
    instructions     TEXT,
    voice            TEXT,
    language         TEXT,
    metadata         TEXT NOT NULL DEFAULT '{}',
    metrics          TEXT NOT NULL DEFAULT '{}',
    idempotency_key  TEXT UNIQUE,
    worker           TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    ended_at         TEXT
);
CREATE INDEX calls_provider_call ON calls (provider, provider_call_id);
CREATE INDEX calls_callee ON calls (to_e164, created_at);
CREATE INDEX calls_state ON calls (state, created_at);
CREATE INDEX calls_created ON calls (created_at);
CREATE INDEX calls_ended ON calls (ended_at) WHERE ended_at IS NOT NULL;

CREATE TABLE events (
    call_id TEXT NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    seq     INTEGER NOT NULL,
    at      TEXT NOT NULL,
    type    TEXT NOT NULL,
    data    TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (call_id, seq)
) WITHOUT ROWID;

CREATE TABLE transcripts (
    id      INTEGER PRIMARY KEY,
    call_id TEXT NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    at      TEXT NOT NULL,
    role    TEXT NOT NULL,
    text    TEXT NOT NULL
);
CREATE INDEX transcripts_call ON transcripts (call_id, at);

CREATE TABLE webhook_keys (
    key         TEXT PRIMARY KEY,
    received_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX webhook_keys_received ON webhook_keys (received_at);
"""

# Schema migrations: MIGRATIONS[n] upgrades version n-1 to n. Version 1 is created whole.
MIGRATIONS: dict[int, str] = {}

_SELECT_CALL = f"SELECT {', '.join(_CALL_COLUMNS)} FROM calls"
_JSON_FIELDS = frozenset({"metadata", "metrics"})

_UNAVAILABLE_CODES = (
    "SQLITE_FULL",
    "SQLITE_READONLY",
    "SQLITE_CANTOPEN",
    "SQLITE_IOERR",
    "SQLITE_PERM",
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_AUTH",
)
_CORRUPT_CODES = ("SQLITE_CORRUPT", "SQLITE_NOTADB")


def _ts(value: datetime) -> str:
    """Fixed-width ISO 8601 in UTC, so text order is time order. Naive means UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _json(value: dict[str, Any] | None) -> str:
    return json.dumps(value or {}, separators=(",", ":"), default=str)


def _row_to_call(row: tuple[Any, ...]) -> CallRecord:
    values = dict(zip(_CALL_COLUMNS, row, strict=True))
    for name in _JSON_FIELDS:
        values[name] = json.loads(values[name])
    for name in ("created_at", "updated_at", "ended_at"):
        values[name] = _dt(values[name])
    return CallRecord(**values)


class SqliteCallStore(CallStore):
    """`CallStore` in `<state_dir>/calls.db`.

    `retention`: ended calls older than this are purged at open and hourly while running
    (None keeps them). Webhook dedupe keys are always dropped after 7 days.
    `await open()` creates or upgrades the schema and reports problems at start-up; any
    other method opens the store on first use when `open()` was not called.
    """

    def __init__(self, state_dir: Path, *, retention: timedelta | None = None):
        self.state_dir = Path(os.path.expanduser(str(state_dir)))
        self.path = self.state_dir / DB_FILENAME
        self.retention = retention
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="whatsapp-call-store")
        self._conn: sqlite3.Connection | None = None  # touched only on the worker thread
        self._closed = False
        self._last_housekeeping = 0.0

    def __repr__(self) -> str:
        return f"SqliteCallStore({str(self.path)!r})"

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreError(
                f"The call store {self.path} is closed.",
                "This is a bug in the caller: it used the store after close().",
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._on_worker, fn)

    def _on_worker(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            if self._conn is None:
                if self._closed:
                    raise StoreError(f"The call store {self.path} is closed.")
                self._conn = self._connect()
            return fn(self._conn)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: sqlite3.Error) -> StoreError:
        code = getattr(exc, "sqlite_errorname", "") or ""
        text = str(exc)
        if code.startswith(_CORRUPT_CODES) or "malformed" in text or "not a database" in text:
            return self._corrupt(text)
        if code.startswith(_UNAVAILABLE_CODES):
            return self._unavailable(text)
        return StoreError(
            f"The call store {self.path} failed: {text}.",
            "Check the file and the disk; report it if it happens again.",
        )

    def _unavailable(self, reason: str) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"The call store in {self.state_dir} cannot be used: {reason}.",
            f"Make {self.state_dir} a writable directory for this user with free disk space, "
            "or set stateDir to one.",
        )

    def _corrupt(self, reason: str) -> StoreCorruptError:
        return StoreCorruptError(
            f"{self.path} is not a whatsapp-call store or is damaged ({reason}). "
            "It was left untouched.",
            f"Move the file aside (or restore a backup of it), or set stateDir to another "
            f"directory; `sqlite3 {self.path} .recover` may rescue its data.",
        )

    # -- opening ----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.state_dir.is_dir():
                raise NotADirectoryError(f"{self.state_dir} is not a directory")
            if not self.path.exists():
                # Create it private: SQLite gives the -wal/-shm files the same mode.
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as exc:
            raise self._unavailable(exc.strerror or str(exc)) from exc
        if self.path.is_dir():
            raise self._corrupt("it is a directory")
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=True
        )
        try:
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        app_id, version, tables = self._identity(conn)
        if app_id not in (0, APPLICATION_ID) or (app_id == 0 and (tables or version)):
            raise self._corrupt("it is an SQLite database of another application")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"The call store {self.path} has schema version {version}, newer than this "
                f"whatsapp-call understands ({SCHEMA_VERSION}).",
                "Upgrade whatsapp-call to the version that wrote it, or set stateDir to "
                "another directory.",
            )
        conn.execute("PRAGMA foreign_keys = ON")
        if self._journal_mode_wal(conn) != "wal":
            raise self._unavailable("it cannot be switched to WAL mode")
        conn.execute("PRAGMA synchronous = NORMAL")
        if version < SCHEMA_VERSION:
            self._migrate(conn)
        self._housekeeping(conn)

    @staticmethod
    def _journal_mode_wal(conn: sqlite3.Connection) -> str:
        """Switch to WAL. The switch needs the file to itself and SQLite answers "database is
        locked" at once, without its busy wait, while another process is opening the same
        new store (`serve --workers N` starting): retry for up to the busy timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
        while True:
            try:
                return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(0.01)

    @staticmethod
    def _identity(conn: sqlite3.Connection) -> tuple[int, int, int]:
        """(application_id, user_version, tables), read in one transaction: three separate
        reads could straddle another process creating the schema (an id of 0 and then its
        tables) and mistake our own store for another application's."""
        own = not conn.in_transaction
        if own:
            conn.execute("BEGIN")
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        finally:
            if own:
                conn.execute("COMMIT")
        return app_id, version, tables

    def _migrate(self, conn: sqlite3.Connection) -> None:
        def upgrade() -> None:
            # Another process may have created or upgraded it while we waited for the lock.
            _app_id, version, tables = self._identity(conn)
            if version == 0:
                if tables:
                    raise self._corrupt("it is an SQLite database of another application")
                _execute_script(conn, _SCHEMA_V1)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                version = 1
            while version < SCHEMA_VERSION:
                version += 1
                _execute_script(conn, MIGRATIONS[version])
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

        self._write(conn, upgrade)

    async def open(self) -> None:
        """Create or upgrade the schema now, so a bad `stateDir` is reported at start-up."""
        await self._run(lambda conn: None)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._close_on_worker)
        finally:
            self._executor.shutdown(wait=False)

    def _close_on_worker(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.execute("PRAGMA optimize")
            except sqlite3.Error as exc:
                log.debug("PRAGMA optimize failed on close: %s", exc)
            conn.close()  # checkpoints the WAL into the main file when we are the last user

    # -- transactions -----------------------------------------------------------------------

    @staticmethod
    def _write(conn: sqlite3.Connection, fn: Callable[[], T]) -> T:
        """Run `fn` in one write transaction, taking the write lock first (cross-process)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn()
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back by itself already (SQLITE_FULL, SQLITE_IOERR).
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as exc:
                    log.warning("call store rollback failed: %s", exc)
            raise
        return result

    @staticmethod
    def _require_call(conn: sqlite3.Connection, call_id: str) -> tuple[str]:
        row = conn.execute("SELECT state FROM calls WHERE id = ?", (call_id,)).fetchone()
        if row is None:
            raise CallNotFoundError(
                f"No call with id {call_id!r}.", "List calls with: whatsapp-call calls"
            )
        return row

    @staticmethod
    def _append_event(
        conn: sqlite3.Connection, call_id: str, type: str, data: dict[str, Any], at: datetime
    ) -> int:
        seq = conn.execute(
            "SELECT coalesce(max(seq), 0) + 1 FROM events WHERE call_id = ?", (call_id,)
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO events (call_id, seq, at, type, data) VALUES (?, ?, ?, ?, ?)",
            (call_id, seq, _ts(at), type, _json(data)),
        )
        return seq

    def _maybe_housekeeping(self) -> None:
        """Schedule the hourly purge behind the current job (same thread, no extra lock)."""
        now = time.monotonic()
        if now - self._last_housekeeping < HOUSEKEEPING_INTERVAL_SECONDS or self._closed:
            return
        self._last_housekeeping = now
        future = self._executor.submit(self._on_worker, self._housekeeping)
        future.add_done_callback(_log_housekeeping_failure)

    def _housekeeping(self, conn: sqlite3.Connection) -> None:
        self._last_housekeeping = time.monotonic()
        now = utcnow()
        key_cutoff = now - WEBHOOK_KEY_TTL
        call_cutoff = None if self.retention is None else now - self.retention
        result = self._write(conn, lambda: self._purge(conn, call_cutoff, key_cutoff))
        if result != PurgeResult():
            log.info("call store retention purge: %s", result)

    @staticmethod
    def _purge(
        conn: sqlite3.Connection, call_cutoff: datetime | None, key_cutoff: datetime
    ) -> PurgeResult:
        calls = events = transcripts = 0
        if call_cutoff is not None:
            old = "SELECT id FROM calls WHERE state = 'ended' AND ended_at < ?"
            cutoff = (_ts(call_cutoff),)
            events = conn.execute(f"DELETE FROM events WHERE call_id IN ({old})", cutoff).rowcount
            transcripts = conn.execute(
                f"DELETE FROM transcripts WHERE call_id IN ({old})", cutoff
            ).rowcount
            calls = conn.execute(
                "DELETE FROM calls WHERE state = 'ended' AND ended_at < ?", cutoff
            ).rowcount
        keys = conn.execute(
            "DELETE FROM webhook_keys WHERE received_at < ?", (_ts(key_cutoff),)
        ).rowcount
        return PurgeResult(calls=calls, events=events, transcripts=transcripts, webhook_keys=keys)

    # -- CallStore --------------------------------------------------------------------------

    async def create_call(self, record: CallRecord) -> CallRecord:
        values = record.to_dict()
        for name in _JSON_FIELDS:
            values[name] = _json(getattr(record, name))
        for name in ("created_at", "updated_at", "ended_at"):
            value = getattr(record, name)
            values[name] = None if value is None else _ts(value)
        row = tuple(values[c] for c in _CALL_COLUMNS)

        def insert(conn: sqlite3.Connection) -> CallRecord:
            def body() -> None:
                existing = conn.execute(
                    "SELECT id FROM calls WHERE id = ? OR "
                    "(idempotency_key IS NOT NULL AND idempotency_key = ?)",
                    (record.id, record.idempotency_key),
                ).fetchone()
                if existing is not None:
                    what = (
                        f"id {record.id!r}"
                        if existing[0] == record.id
                        else f"idempotency key {record.idempotency_key!r}"
                    )
                    raise DuplicateCallError(
                        f"A call with {what} exists already: {existing[0]}.",
                        existing_id=existing[0],
                        hint="Look it up with: whatsapp-call status " + existing[0],
                    )
                conn.execute(
                    f"INSERT INTO calls ({', '.join(_CALL_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(_CALL_COLUMNS))})",
                    row,
                )
                self._append_event(
                    conn,
                    record.id,
                    "state",
                    {"from": None, "to": record.state.value},
                    record.created_at,
                )

            self._write(conn, body)
            self._maybe_housekeeping()
            return record

        return await self._run(insert)

    async def get_call(self, call_id: str) -> CallRecord | None:
        return await self._run(lambda conn: self._get(conn, call_id))

    @staticmethod
    def _get(conn: sqlite3.Connection, call_id: str) -> CallRecord | None:
        row = conn.execute(_SELECT_CALL + " WHERE id = ?", (call_id,)).fetchone()
        return None if row is None else _row_to_call(row)

    async def _one(self, sql: str, params: tuple[Any, ...]) -> CallRecord | None:
        def query(conn: sqlite3.Connection) -> CallRecord | None:
            row = conn.execute(sql, params).fetchone()
            return None if row is None else _row_to_call(row)

        return await self._run(query)

    async def _many(self, sql: str, params: tuple[Any, ...]) -> list[CallRecord]:
        return await self._run(
            lambda conn: [_row_to_call(row) for row in conn.execute(sql, params).fetchall()]
        )

    async def find_by_provider_call_id(
        self, provider: str, provider_call_id: str
    ) -> CallRecord | None:
        return await self._one(
            _SELECT_CALL + " WHERE provider = ? AND provider_call_id = ? "
            "ORDER BY created_at DESC, rowid DESC LIMIT 1",
            (provider, provider_call_id),
        )

    async def find_by_idempotency_key(self, key: str) -> CallRecord | None:
        return await self._one(_SELECT_CALL + " WHERE idempotency_key = ?", (key,))

    async def find_active_by_callee(self, to_e164: str) -> CallRecord | None:
        return await self._one(
            _SELECT_CALL + " WHERE to_e164 = ? AND state != 'ended' "
            "ORDER BY created_at DESC, rowid DESC LIMIT 1",
            (to_e164,),
        )

    async def list_calls(
        self, state: CallState | str | None = None, limit: int = 50
    ) -> list[CallRecord]:
        if state is None:
            return await self._many(
                _SELECT_CALL + " ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,)
            )
        return await self._many(
            _SELECT_CALL + " WHERE state = ? ORDER BY created_at DESC, rowid DESC LIMIT ?",
            (CallState(state).value, limit),
        )

    async def update_call(self, call_id: str, **fields: Any) -> CallRecord:
        unknown = set(fields) - UPDATABLE_FIELDS
        if unknown:
            raise ValueError(
                f"update_call cannot change {', '.join(sorted(unknown))}; state, end reason "
                "and timestamps change only through transition()."
            )
        values = {k: _json(v) if k in _JSON_FIELDS else v for k, v in fields.items()}

        def update(conn: sqlite3.Connection) -> CallRecord:
            def body() -> CallRecord:
                self._require_call(conn, call_id)
                assignments = [f"{name} = ?" for name in values] + ["updated_at = ?"]
                conn.execute(
                    f"UPDATE calls SET {', '.join(assignments)} WHERE id = ?",
                    (*values.values(), _ts(utcnow()), call_id),
                )
                record = self._get(conn, call_id)
                assert record is not None
                return record

            return self._write(conn, body)

        return await self._run(update)

    async def transition(
        self,
        call_id: str,
        new_state: CallState | str,
        *,
        end_reason: EndReason | str | None = None,
        detail: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> bool:
        new_state, reason, event = transition_event(new_state, end_reason, detail, data)

        def move(conn: sqlite3.Connection) -> bool:
            def body() -> bool:
                (current,) = self._require_call(conn, call_id)
                if current == CallState.ENDED.value or current == new_state.value:
                    return False
                now = utcnow()
                if new_state == CallState.ENDED:
                    conn.execute(
                        "UPDATE calls SET state = ?, end_reason = ?, "
                        "end_detail = coalesce(?, end_detail), ended_at = ?, updated_at = ? "
                        "WHERE id = ?",
                        (new_state.value, reason.value, detail, _ts(now), _ts(now), call_id),
                    )
                else:
                    conn.execute(
                        "UPDATE calls SET state = ?, updated_at = ? WHERE id = ?",
                        (new_state.value, _ts(now), call_id),
                    )
                event["from"] = current
                self._append_event(conn, call_id, "state", event, now)
                return True

            return self._write(conn, body)

        return await self._run(move)

    async def add_event(
        self,
        call_id: str,
        type: str,
        data: dict[str, Any] | None = None,
        *,
        at: datetime | None = None,
    ) -> int:
        when = at or utcnow()

        def add(conn: sqlite3.Connection) -> int:
            def body() -> int:
                self._require_call(conn, call_id)
                return self._append_event(conn, call_id, type, data or {}, when)

            return self._write(conn, body)

        return await self._run(add)

    async def add_transcript(
        self, call_id: str, role: str, text: str, *, at: datetime | None = None
    ) -> None:
        when = _ts(at or utcnow())

        def add(conn: sqlite3.Connection) -> None:
            def body() -> None:
                self._require_call(conn, call_id)
                conn.execute(
                    "INSERT INTO transcripts (call_id, at, role, text) VALUES (?, ?, ?, ?)",
                    (call_id, when, role, text),
                )

            self._write(conn, body)

        await self._run(add)

    async def set_metrics(
        self, call_id: str, metrics: dict[str, Any], *, merge: bool = True
    ) -> dict[str, Any]:
        def store(conn: sqlite3.Connection) -> dict[str, Any]:
            def body() -> dict[str, Any]:
                row = conn.execute("SELECT metrics FROM calls WHERE id = ?", (call_id,)).fetchone()
                if row is None:
                    self._require_call(conn, call_id)  # raises CallNotFoundError
                merged = {**json.loads(row[0]), **metrics} if merge else dict(metrics)
                encoded = _json(merged)
                conn.execute(
                    "UPDATE calls SET metrics = ?, updated_at = ? WHERE id = ?",
                    (encoded, _ts(utcnow()), call_id),
                )
                return json.loads(encoded)

            return self._write(conn, body)

        return await self._run(store)

    async def get_events(self, call_id: str) -> list[StoredEvent]:
        def query(conn: sqlite3.Connection) -> list[StoredEvent]:
            rows = conn.execute(
                "SELECT seq, at, type, data FROM events WHERE call_id = ? ORDER BY seq",
                (call_id,),
            ).fetchall()
            return [
                StoredEvent(call_id, seq, datetime.fromisoformat(at), type, json.loads(data))
                for seq, at, type, data in rows
            ]

        return await self._run(query)

    async def get_transcript(self, call_id: str) -> list[TranscriptLine]:
        def query(conn: sqlite3.Connection) -> list[TranscriptLine]:
            rows = conn.execute(
                "SELECT at, role, text FROM transcripts WHERE call_id = ? ORDER BY at, id",
                (call_id,),
            ).fetchall()
            return [
                TranscriptLine(call_id, datetime.fromisoformat(at), role, text)
                for at, role, text in rows
            ]

        return await self._run(query)

    async def non_final_calls(self) -> list[CallRecord]:
        return await self._many(
            _SELECT_CALL + " WHERE state != 'ended' ORDER BY created_at, rowid", ()
        )

    async def count_by_state(self) -> dict[str, int]:
        def query(conn: sqlite3.Connection) -> dict[str, int]:
            counts = {state.value: 0 for state in CallState}
            for state, count in conn.execute("SELECT state, count(*) FROM calls GROUP BY state"):
                counts[state] = count
            return counts

        return await self._run(query)

    async def mark_webhook_processed(self, key: str) -> bool:
        when = _ts(utcnow())

        def mark(conn: sqlite3.Connection) -> bool:
            # One statement is its own transaction; the primary key makes it atomic
            # between processes too.
            cursor = conn.execute(
                "INSERT OR IGNORE INTO webhook_keys (key, received_at) VALUES (?, ?)", (key, when)
            )
            self._maybe_housekeeping()
            return cursor.rowcount == 1

        return await self._run(mark)

    async def purge(self, older_than: timedelta | datetime) -> PurgeResult:
        cutoff = utcnow() - older_than if isinstance(older_than, timedelta) else older_than
        return await self._run(
            lambda conn: self._write(conn, lambda: self._purge(conn, cutoff, cutoff))
        )


def _execute_script(conn: sqlite3.Connection, script: str) -> None:
    """Statement by statement: `executescript` would commit the open transaction first."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _log_housekeeping_failure(future: Any) -> None:
    exc = future.exception()
    if exc is not None:
        log.warning("call store housekeeping failed: %s", exc)
