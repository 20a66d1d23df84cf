"""The PostgreSQL call store: one database shared by every service instance.

Behaves exactly as the SQLite store (same `CallStore` contract), but safe between machines:
state changes lock the call's row (`SELECT … FOR UPDATE`), event sequence numbers come from a
per-call counter bumped in the same statement that appends the event, and webhook dedupe is one
`INSERT … ON CONFLICT DO NOTHING` on a primary key. All tables live in one PostgreSQL schema
(`whatsapp_call` unless the URL says `?schema=…`), whose version is kept in `store_info`;
creation and upgrades run under an advisory lock so instances starting together agree.

The pool (asyncpg) keeps connections open; a broken connection is replaced on next use, so a
database restart costs the operations in flight (reported as `StoreUnavailableError`), not the
process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ConfigError
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

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("whatsapp_call.store")

APPLICATION = "whatsapp-call"
SCHEMA_VERSION = 1
DEFAULT_SCHEMA = "whatsapp_call"
DEFAULT_POOL_MAX_SIZE = 10
CONNECT_TIMEOUT_SECONDS = 10.0
CLOSE_TIMEOUT_SECONDS = 10.0
# Same as the SQLite store: dedupe keys outlive Meta's retry window (36 h), then go.
WEBHOOK_KEY_TTL = timedelta(days=7)
HOUSEKEEPING_INTERVAL_SECONDS = 3600.0

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# `@.` is replaced by the quoted schema name (kept out of str.format: SQL has braces).
_SCHEMA_V1 = [
    """
    CREATE TABLE @.calls (
        n                bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
        id               text PRIMARY KEY,
        to_e164          text NOT NULL,
        provider         text NOT NULL,
        state            text NOT NULL,
        provider_call_id text,
        end_reason       text,
        end_detail       text,
        greeting         text,
        instructions     text,
        voice            text,
        language         text,
        metadata         jsonb NOT NULL DEFAULT '{}',
        metrics          jsonb NOT NULL DEFAULT '{}',
        idempotency_key  text UNIQUE,
        worker           text,
        created_at       timestamptz NOT NULL,
        updated_at       timestamptz NOT NULL,
        ended_at         timestamptz,
        last_seq         integer NOT NULL DEFAULT 0
    )
    """,
    "CREATE INDEX calls_provider_call ON @.calls (provider, provider_call_id)",
    "CREATE INDEX calls_callee ON @.calls (to_e164, created_at)",
    "CREATE INDEX calls_state ON @.calls (state, created_at)",
    "CREATE INDEX calls_created ON @.calls (created_at)",
    "CREATE INDEX calls_ended ON @.calls (ended_at) WHERE ended_at IS NOT NULL",
    """
    CREATE TABLE @.events (
        call_id text NOT NULL REFERENCES @.calls (id) ON DELETE CASCADE,
        seq     integer NOT NULL,
        at      timestamptz NOT NULL,
        type    text NOT NULL,
        data    jsonb NOT NULL DEFAULT '{}',
        PRIMARY KEY (call_id, seq)
    )
    """,
    """
    CREATE TABLE @.transcripts (
        id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        call_id text NOT NULL REFERENCES @.calls (id) ON DELETE CASCADE,
        at      timestamptz NOT NULL,
        role    text NOT NULL,
        text    text NOT NULL
    )
    """,
    "CREATE INDEX transcripts_call ON @.transcripts (call_id, at)",
    """
    CREATE TABLE @.webhook_keys (
        key         text PRIMARY KEY,
        received_at timestamptz NOT NULL
    )
    """,
    "CREATE INDEX webhook_keys_received ON @.webhook_keys (received_at)",
]

# MIGRATIONS[n] upgrades version n-1 to n (statement lists). Version 1 is created whole.
MIGRATIONS: dict[int, list[str]] = {}

_STORE_INFO = """
CREATE TABLE @.store_info (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    application text NOT NULL,
    version     integer NOT NULL,
    updated_at  timestamptz NOT NULL
)
"""

_COLS = ", ".join(_CALL_COLUMNS)
_SELECT_CALL = f"SELECT {_COLS} FROM @.calls"


def _aware(value: datetime) -> datetime:
    """Naive means UTC, as in the SQLite store."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _json(value: Any) -> str:
    return json.dumps(value or {}, separators=(",", ":"), default=str)


def _row_to_call(row: Any) -> CallRecord:
    return CallRecord(**{name: row[name] for name in _CALL_COLUMNS})


class PostgresCallStore(CallStore):
    """`CallStore` in a PostgreSQL database, shared by any number of service instances.

    `url`: `postgresql://user:password@host:port/database`, plus libpq-style options asyncpg
    understands (`sslmode=require`, …) and two of ours: `schema` (default `whatsapp_call`)
    and `pool_max_size` (connections per process, default 10).
    `retention`: ended calls older than this are purged at open and hourly (None keeps them).
    """

    def __init__(
        self,
        url: str,
        *,
        retention: timedelta | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    ):
        self.retention = retention
        self.connect_timeout = connect_timeout
        self._dsn, self.schema, self.pool_max_size, self._password, self.location = _parse_url(url)
        self.server = self.location.split("@", 1)[-1].rsplit("/", 1)[0]  # host:port
        self._q = f'"{self.schema}".'
        self._pool: asyncpg.Pool | None = None
        self._open_lock = asyncio.Lock()
        self._closed = False
        self._last_housekeeping = 0.0
        self._housekeeping_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"PostgresCallStore({self.location!r}, schema={self.schema!r})"

    # -- plumbing ---------------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql.replace("@.", self._q)

    def _scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    def _unavailable(self, reason: str, hint: str | None = None) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"The PostgreSQL call store at {self.location} cannot be used: {self._scrub(reason)}.",
            hint
            or f"Check that PostgreSQL at {self.server} is running and reachable from this "
            "machine (host, port, firewall), then retry; or fix databaseUrl.",
        )

    def _translate(self, exc: BaseException) -> StoreError:
        """A driver or network error as a StoreError that names the server and the fix."""
        import asyncpg

        text = self._scrub(str(exc).strip() or type(exc).__name__).rstrip(".")
        user, database = self.location.split("@", 1)[0], self.location.rsplit("/", 1)[-1]
        if isinstance(
            exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
        ):
            return self._unavailable(
                f"the server refused the credentials ({text})",
                f"Check the user ({user}) and password in databaseUrl, and that pg_hba.conf "
                "lets this machine log in with them.",
            )
        if isinstance(exc, asyncpg.InvalidCatalogNameError):
            return self._unavailable(
                f"the database does not exist ({text})",
                f"Create it (e.g. `createdb -h {self.server.rsplit(':', 1)[0]} -p "
                f"{self.server.rsplit(':', 1)[-1]} -U {user} {database}`) or name an "
                "existing database in databaseUrl.",
            )
        if isinstance(exc, asyncpg.InsufficientPrivilegeError):
            return self._unavailable(
                f"permission denied ({text})",
                f"Let {user} create and use schema {self.schema!r}: `GRANT CREATE ON DATABASE "
                f"{database} TO {user}`, or have an administrator create the schema owned by "
                f"{user}.",
            )
        if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
            return self._unavailable(
                f"the server is read-only ({text})",
                "Point databaseUrl at the primary server, not a standby or read replica.",
            )
        if isinstance(exc, asyncpg.TooManyConnectionsError):
            return self._unavailable(
                f"the server has no free connection ({text})",
                "Raise max_connections on the server, or lower pool_max_size in databaseUrl.",
            )
        if isinstance(exc, asyncpg.DiskFullError | asyncpg.InsufficientResourcesError):
            return self._unavailable(
                f"the server is out of resources ({text})",
                "Free disk space or memory on the database server.",
            )
        lost = isinstance(exc, asyncpg.InterfaceError) and "closed" in text
        if lost or isinstance(
            exc,
            OSError
            | TimeoutError
            | asyncpg.PostgresConnectionError
            | asyncpg.OperatorInterventionError
            | asyncpg.exceptions.InternalClientError,
        ):
            return self._unavailable(f"{type(exc).__name__}: {text}")
        return StoreError(
            f"The PostgreSQL call store at {self.location} failed: {text}.",
            "Check the database server's log; report it if it happens again.",
        )

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection (opening the store on first use)."""
        pool = await self._ensure_open()
        async with self._conn_of(pool) as conn:
            yield conn

    # -- opening ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and create or upgrade the schema now, so a bad databaseUrl is reported at
        start-up rather than on the first call."""
        await self._ensure_open()

    async def _ensure_open(self) -> asyncpg.Pool:
        if self._closed:
            raise StoreError(
                f"The call store {self.location} is closed.",
                "This is a bug in the caller: it used the store after close().",
            )
        if self._pool is not None:
            return self._pool
        async with self._open_lock:
            if self._pool is None:
                pool = await self._create_pool()
                try:
                    await self._prepare(pool)
                except BaseException:
                    pool.terminate()
                    raise
                if self._closed:  # closed while we were connecting
                    pool.terminate()
                    raise StoreError(f"The call store {self.location} is closed.")
                self._pool = pool
        return self._pool

    async def _create_pool(self) -> asyncpg.Pool:
        try:
            import asyncpg
        except ImportError as exc:
            raise ConfigError(
                "databaseUrl names PostgreSQL, but the asyncpg driver is not installed.",
                "Install the cluster extra: pip install 'whatsapp-call[cluster]'.",
            ) from exc

        async def init(conn: asyncpg.Connection) -> None:
            await conn.set_type_codec(
                "jsonb", schema="pg_catalog", encoder=_json, decoder=json.loads, format="text"
            )

        try:
            return await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self.pool_max_size,
                timeout=self.connect_timeout,
                init=init,
                server_settings={"application_name": APPLICATION},
            )
        except (
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.exceptions.InternalClientError,
            OSError,
            TimeoutError,
        ) as exc:
            raise self._translate(exc) from None

    async def _read_info(self, conn: asyncpg.Connection) -> tuple[str | None, int | None, int]:
        """(application, version, number of tables) of our schema; None/None when unmarked."""
        tables = await conn.fetchval(
            "SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = $1", self.schema
        )
        info = await conn.fetchval("SELECT to_regclass($1)", f'"{self.schema}".store_info')
        if info is None:
            return None, None, tables
        row = await conn.fetchrow(self._sql("SELECT application, version FROM @.store_info"))
        return (None, None, tables) if row is None else (row[0], row[1], tables)

    def _check_identity(self, application: str | None, version: int | None, tables: int) -> None:
        where = f"schema {self.schema!r} of {self.location}"
        if (application is None and tables) or (
            application is not None and application != APPLICATION
        ):
            raise StoreCorruptError(
                f"The {where} holds tables of another application; it was left untouched.",
                "Give whatsapp-call a schema of its own: add ?schema=<name> to databaseUrl, "
                "or use another database.",
            )
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(
                f"The call store in {where} has schema version {version}, newer than this "
                f"whatsapp-call understands ({SCHEMA_VERSION}).",
                "Upgrade every whatsapp-call instance sharing this database to the newest "
                "version (or point databaseUrl elsewhere).",
            )

    async def _prepare(self, pool: asyncpg.Pool) -> None:
        async with self._conn_of(pool) as conn:
            application, version, tables = await self._read_info(conn)
            self._check_identity(application, version, tables)
            if version != SCHEMA_VERSION:
                await self._migrate(conn)
            await self._housekeeping(conn)

    @contextlib.asynccontextmanager
    async def _conn_of(self, pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
        """A connection of `pool`; driver and network errors come out as StoreErrors."""
        import asyncpg

        try:
            async with pool.acquire(timeout=self.connect_timeout) as conn:
                yield conn
        except StoreError:
            raise
        except (
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.exceptions.InternalClientError,
            OSError,
            TimeoutError,
        ) as exc:
            raise self._translate(exc) from None

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        """Create or upgrade the schema, one instance at a time (advisory lock)."""
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"{APPLICATION} store {self.schema}"
            )
            # Another instance may have done it while we waited for the lock.
            application, version, tables = await self._read_info(conn)
            self._check_identity(application, version, tables)
            exists = await conn.fetchval(
                "SELECT true FROM pg_catalog.pg_namespace WHERE nspname = $1", self.schema
            )
            if not exists:
                await conn.execute(f'CREATE SCHEMA "{self.schema}"')
            if version is None:
                await conn.execute(self._sql(_STORE_INFO))
                for statement in _SCHEMA_V1:
                    await conn.execute(self._sql(statement))
                await conn.execute(
                    self._sql(
                        "INSERT INTO @.store_info (application, version, updated_at) "
                        "VALUES ($1, 1, $2)"
                    ),
                    APPLICATION,
                    utcnow(),
                )
                version = 1
                log.info("created the call store schema %r in %s", self.schema, self.location)
            while version < SCHEMA_VERSION:
                version += 1
                for statement in MIGRATIONS[version]:
                    await conn.execute(self._sql(statement))
                await conn.execute(
                    self._sql("UPDATE @.store_info SET version = $1, updated_at = $2"),
                    version,
                    utcnow(),
                )
                log.info("upgraded the call store schema %r to version %d", self.schema, version)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        task, self._housekeeping_task = self._housekeeping_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_SECONDS)
        except (TimeoutError, Exception) as exc:  # stuck queries or a dead server
            log.warning("call store pool did not close cleanly (%s); terminating it", exc)
            pool.terminate()

    # -- housekeeping -----------------------------------------------------------------------

    def _maybe_housekeeping(self) -> None:
        """Start the hourly purge in the background (never delays the caller)."""
        now = time.monotonic()
        if now - self._last_housekeeping < HOUSEKEEPING_INTERVAL_SECONDS or self._closed:
            return
        if self._housekeeping_task is not None and not self._housekeeping_task.done():
            return
        self._last_housekeeping = now

        async def run() -> None:
            try:
                async with self._conn() as conn:
                    await self._housekeeping(conn)
            except StoreError as exc:
                log.warning("call store housekeeping failed: %s", exc)

        self._housekeeping_task = asyncio.get_running_loop().create_task(run())

    async def _housekeeping(self, conn: asyncpg.Connection) -> None:
        self._last_housekeeping = time.monotonic()
        now = utcnow()
        call_cutoff = None if self.retention is None else now - self.retention
        result = await self._purge(conn, call_cutoff, now - WEBHOOK_KEY_TTL)
        if result != PurgeResult():
            log.info("call store retention purge: %s", result)

    async def _purge(
        self, conn: asyncpg.Connection, call_cutoff: datetime | None, key_cutoff: datetime
    ) -> PurgeResult:
        calls = events = transcripts = 0
        async with conn.transaction():
            if call_cutoff is not None:
                ids = [
                    row[0]
                    for row in await conn.fetch(
                        self._sql(
                            "SELECT id FROM @.calls WHERE state = 'ended' AND ended_at < $1 "
                            "FOR UPDATE"
                        ),
                        _aware(call_cutoff),
                    )
                ]
                if ids:
                    events = _count(
                        await conn.execute(
                            self._sql("DELETE FROM @.events WHERE call_id = ANY($1::text[])"), ids
                        )
                    )
                    transcripts = _count(
                        await conn.execute(
                            self._sql("DELETE FROM @.transcripts WHERE call_id = ANY($1::text[])"),
                            ids,
                        )
                    )
                    calls = _count(
                        await conn.execute(
                            self._sql("DELETE FROM @.calls WHERE id = ANY($1::text[])"), ids
                        )
                    )
            keys = _count(
                await conn.execute(
                    self._sql("DELETE FROM @.webhook_keys WHERE received_at < $1"),
                    _aware(key_cutoff),
                )
            )
        return PurgeResult(calls=calls, events=events, transcripts=transcripts, webhook_keys=keys)

    # -- CallStore --------------------------------------------------------------------------

    def _not_found(self, call_id: str) -> CallNotFoundError:
        return CallNotFoundError(
            f"No call with id {call_id!r}.", "List calls with: whatsapp-call calls"
        )

    async def create_call(self, record: CallRecord) -> CallRecord:
        import asyncpg

        values = [getattr(record, name) for name in _CALL_COLUMNS]
        values[_CALL_COLUMNS.index("state")] = record.state.value
        if record.end_reason is not None:
            values[_CALL_COLUMNS.index("end_reason")] = record.end_reason.value
        for name in ("created_at", "updated_at", "ended_at"):
            value = getattr(record, name)
            values[_CALL_COLUMNS.index(name)] = None if value is None else _aware(value)
        placeholders = ", ".join(f"${i}" for i in range(1, len(_CALL_COLUMNS) + 1))
        insert = self._sql(f"INSERT INTO @.calls ({_COLS}, last_seq) VALUES ({placeholders}, 1)")
        first_event = self._sql(
            "INSERT INTO @.events (call_id, seq, at, type, data) VALUES ($1, 1, $2, 'state', $3)"
        )
        async with self._conn() as conn:
            for _attempt in range(3):
                try:
                    async with conn.transaction():
                        await conn.execute(insert, *values)
                        await conn.execute(
                            first_event,
                            record.id,
                            _aware(record.created_at),
                            {"from": None, "to": record.state.value},
                        )
                except asyncpg.UniqueViolationError:
                    existing = await conn.fetchval(
                        self._sql(
                            "SELECT id FROM @.calls WHERE id = $1 OR "
                            "(idempotency_key IS NOT NULL AND idempotency_key = $2) "
                            "ORDER BY id = $1 DESC LIMIT 1"
                        ),
                        record.id,
                        record.idempotency_key,
                    )
                    if existing is None:
                        continue  # the other insert rolled back meanwhile: try again
                    what = (
                        f"id {record.id!r}"
                        if existing == record.id
                        else f"idempotency key {record.idempotency_key!r}"
                    )
                    raise DuplicateCallError(
                        f"A call with {what} exists already: {existing}.",
                        existing_id=existing,
                        hint="Look it up with: whatsapp-call status " + existing,
                    ) from None
                else:
                    self._maybe_housekeeping()
                    return record
        raise StoreError(
            f"Could not insert call {record.id}: it kept conflicting with inserts that were "
            "rolled back.",
            "Retry the request.",
        )

    async def get_call(self, call_id: str) -> CallRecord | None:
        return await self._one(_SELECT_CALL + " WHERE id = $1", call_id)

    async def _one(self, sql: str, *args: Any) -> CallRecord | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(self._sql(sql), *args)
        return None if row is None else _row_to_call(row)

    async def _many(self, sql: str, *args: Any) -> list[CallRecord]:
        async with self._conn() as conn:
            rows = await conn.fetch(self._sql(sql), *args)
        return [_row_to_call(row) for row in rows]

    async def find_by_provider_call_id(
        self, provider: str, provider_call_id: str
    ) -> CallRecord | None:
        return await self._one(
            _SELECT_CALL + " WHERE provider = $1 AND provider_call_id = $2 "
            "ORDER BY created_at DESC, n DESC LIMIT 1",
            provider,
            provider_call_id,
        )

    async def find_by_idempotency_key(self, key: str) -> CallRecord | None:
        return await self._one(_SELECT_CALL + " WHERE idempotency_key = $1", key)

    async def find_active_by_callee(self, to_e164: str) -> CallRecord | None:
        return await self._one(
            _SELECT_CALL + " WHERE to_e164 = $1 AND state <> 'ended' "
            "ORDER BY created_at DESC, n DESC LIMIT 1",
            to_e164,
        )

    async def list_calls(
        self, state: CallState | str | None = None, limit: int = 50
    ) -> list[CallRecord]:
        if state is None:
            return await self._many(
                _SELECT_CALL + " ORDER BY created_at DESC, n DESC LIMIT $1", limit
            )
        return await self._many(
            _SELECT_CALL + " WHERE state = $1 ORDER BY created_at DESC, n DESC LIMIT $2",
            CallState(state).value,
            limit,
        )

    async def update_call(self, call_id: str, **fields: Any) -> CallRecord:
        unknown = set(fields) - UPDATABLE_FIELDS
        if unknown:
            raise ValueError(
                f"update_call cannot change {', '.join(sorted(unknown))}; state, end reason "
                "and timestamps change only through transition()."
            )
        names = list(fields)  # validated against UPDATABLE_FIELDS: safe to name in SQL
        assignments = [f"{name} = ${i}" for i, name in enumerate(names, start=3)]
        sql = self._sql(
            f"UPDATE @.calls SET updated_at = $2{''.join(', ' + a for a in assignments)} "
            f"WHERE id = $1 RETURNING {_COLS}"
        )
        async with self._conn() as conn:
            row = await conn.fetchrow(sql, call_id, utcnow(), *(fields[n] for n in names))
        if row is None:
            raise self._not_found(call_id)
        return _row_to_call(row)

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

        async with self._conn() as conn, conn.transaction():
            # The row lock serialises transitions of one call across every instance.
            current = await conn.fetchval(
                self._sql("SELECT state FROM @.calls WHERE id = $1 FOR UPDATE"), call_id
            )
            if current is None:
                raise self._not_found(call_id)
            if current == CallState.ENDED.value or current == new_state.value:
                return False
            now = utcnow()
            if reason is not None:
                seq = await conn.fetchval(
                    self._sql(
                        "UPDATE @.calls SET state = $2, end_reason = $3, "
                        "end_detail = coalesce($4, end_detail), ended_at = $5, updated_at = $5, "
                        "last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq"
                    ),
                    call_id,
                    new_state.value,
                    reason.value,
                    detail,
                    now,
                )
            else:
                seq = await conn.fetchval(
                    self._sql(
                        "UPDATE @.calls SET state = $2, updated_at = $3, last_seq = last_seq + 1 "
                        "WHERE id = $1 RETURNING last_seq"
                    ),
                    call_id,
                    new_state.value,
                    now,
                )
            event["from"] = current
            await conn.execute(
                self._sql(
                    "INSERT INTO @.events (call_id, seq, at, type, data) "
                    "VALUES ($1, $2, $3, 'state', $4)"
                ),
                call_id,
                seq,
                now,
                event,
            )
            return True

    async def add_event(
        self,
        call_id: str,
        type: str,
        data: dict[str, Any] | None = None,
        *,
        at: datetime | None = None,
    ) -> int:
        # One statement: bumping the call's counter locks its row, so concurrent appends
        # (from any instance) get distinct, gap-free sequence numbers.
        async with self._conn() as conn:
            seq = await conn.fetchval(
                self._sql(
                    "WITH bumped AS (UPDATE @.calls SET last_seq = last_seq + 1 WHERE id = $1 "
                    "RETURNING id, last_seq) "
                    "INSERT INTO @.events (call_id, seq, at, type, data) "
                    "SELECT id, last_seq, $2, $3, $4 FROM bumped RETURNING seq"
                ),
                call_id,
                _aware(at or utcnow()),
                type,
                data or {},
            )
        if seq is None:
            raise self._not_found(call_id)
        return seq

    async def add_transcript(
        self, call_id: str, role: str, text: str, *, at: datetime | None = None
    ) -> None:
        async with self._conn() as conn:
            status = await conn.execute(
                self._sql(
                    "INSERT INTO @.transcripts (call_id, at, role, text) "
                    "SELECT id, $2, $3, $4 FROM @.calls WHERE id = $1"
                ),
                call_id,
                _aware(at or utcnow()),
                role,
                text,
            )
        if _count(status) == 0:
            raise self._not_found(call_id)

    async def set_metrics(
        self, call_id: str, metrics: dict[str, Any], *, merge: bool = True
    ) -> dict[str, Any]:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                self._sql(
                    "UPDATE @.calls SET "
                    "metrics = CASE WHEN $3 THEN metrics || $2::jsonb ELSE $2::jsonb END, "
                    "updated_at = $4 WHERE id = $1 RETURNING metrics"
                ),
                call_id,
                metrics,
                merge,
                utcnow(),
            )
        if row is None:
            raise self._not_found(call_id)
        return row[0]

    async def get_events(self, call_id: str) -> list[StoredEvent]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                self._sql(
                    "SELECT seq, at, type, data FROM @.events WHERE call_id = $1 ORDER BY seq"
                ),
                call_id,
            )
        return [StoredEvent(call_id, r["seq"], r["at"], r["type"], r["data"]) for r in rows]

    async def get_transcript(self, call_id: str) -> list[TranscriptLine]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                self._sql(
                    "SELECT at, role, text FROM @.transcripts WHERE call_id = $1 ORDER BY at, id"
                ),
                call_id,
            )
        return [TranscriptLine(call_id, r["at"], r["role"], r["text"]) for r in rows]

    async def non_final_calls(self) -> list[CallRecord]:
        return await self._many(_SELECT_CALL + " WHERE state <> 'ended' ORDER BY created_at, n")

    async def count_by_state(self) -> dict[str, int]:
        async with self._conn() as conn:
            rows = await conn.fetch(self._sql("SELECT state, count(*) FROM @.calls GROUP BY state"))
        counts = {state.value: 0 for state in CallState}
        for state, count in rows:
            counts[state] = count
        return counts

    async def mark_webhook_processed(self, key: str) -> bool:
        # The primary key decides between concurrent instances: exactly one insert wins.
        async with self._conn() as conn:
            status = await conn.execute(
                self._sql(
                    "INSERT INTO @.webhook_keys (key, received_at) VALUES ($1, $2) "
                    "ON CONFLICT (key) DO NOTHING"
                ),
                key,
                utcnow(),
            )
        self._maybe_housekeeping()
        return _count(status) == 1

    async def purge(self, older_than: timedelta | datetime) -> PurgeResult:
        cutoff = utcnow() - older_than if isinstance(older_than, timedelta) else older_than
        async with self._conn() as conn:
            return await self._purge(conn, cutoff, cutoff)


def _count(status: str) -> int:
    """Rows affected, from a command tag such as 'INSERT 0 1' or 'DELETE 3'."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except (ValueError, IndexError):
        return 0


def _parse_url(url: str) -> tuple[str, str, int, str | None, str]:
    """(dsn for asyncpg, schema, pool size, password, redacted location) from a store URL.

    Our own options are taken out of the query string (asyncpg would send unknown ones to the
    server as settings). The location (`user@host:port/database`) is safe to print.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(
            f"The database URL is malformed ({exc}).",
            "Write it as postgresql://user:password@host:5432/database.",
        ) from None
    scheme = parts.scheme.split("+", 1)[0].lower()
    if scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            f"{scheme!r} is not a PostgreSQL URL scheme.",
            "Write it as postgresql://user:password@host:5432/database.",
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = DEFAULT_SCHEMA
    pool_max_size = DEFAULT_POOL_MAX_SIZE
    rest = []
    for key, value in query:
        if key == "schema":
            schema = value
        elif key == "pool_max_size":
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(
                    f"pool_max_size={value!r} in the database URL is not a positive number.",
                    "Write e.g. ?pool_max_size=10, or leave it out.",
                )
            pool_max_size = int(value)
        else:
            rest.append((key, value))
    if not _SCHEMA_NAME.match(schema):
        raise ConfigError(
            f"schema={schema!r} in the database URL is not a plain PostgreSQL name.",
            "Use lower-case letters, digits and underscores (e.g. ?schema=whatsapp_call).",
        )
    dsn = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(rest), parts.fragment))
    host = parts.hostname or dict(rest).get("host") or "localhost"
    user = parts.username or "(default user)"
    database = parts.path.lstrip("/") or user
    location = f"{user}@{host}:{port or 5432}/{database}"
    password = parts.password
    return dsn, schema, pool_max_size, password or None, location
