"""Call persistence. `open_store(settings)` picks the store; callers see only `CallStore`.

SQLite in `stateDir` by default (one machine); PostgreSQL (`databaseUrl`, or a store URL with
scheme `postgresql://`) for several service instances sharing their calls. Stores plug in by
URL scheme through `STORE_FACTORIES`, without touching callers.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError
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
)
from .postgres import PostgresCallStore
from .sqlite import SqliteCallStore

if TYPE_CHECKING:
    from ..config import Settings


def _sqlite_from_url(url: str, retention: timedelta | None) -> CallStore:
    path = unquote(urlsplit(url).path)
    if not path:
        raise ConfigError(
            f"Store URL {url!r} names no directory.",
            "Write it as sqlite:///absolute/path/to/state-dir, or leave it unset to use stateDir.",
        )
    return SqliteCallStore(Path(path), retention=retention)


def _postgres_from_url(url: str, retention: timedelta | None) -> CallStore:
    # Its driver (asyncpg, the optional `cluster` extra) is imported only on connecting.
    return PostgresCallStore(url, retention=retention)


# URL scheme -> factory(url, retention).
STORE_FACTORIES: dict[str, Callable[[str, timedelta | None], CallStore]] = {
    "sqlite": _sqlite_from_url,
    "postgresql": _postgres_from_url,
    "postgres": _postgres_from_url,
}


def open_store(
    settings: Settings, *, url: str | None = None, retention: timedelta | None = None
) -> CallStore:
    """The store the settings ask for, not yet opened (`await store.open()` checks it now;
    otherwise it opens on first use). `url` (or the `databaseUrl` / `storeUrl` options)
    selects another store by scheme, e.g. `postgresql://…`; unset means SQLite in
    `settings.state_dir`. `retention` (or a `storeRetentionDays` option) purges ended calls
    older than that.
    """
    url = url or getattr(settings, "database_url", None) or getattr(settings, "store_url", None)
    if hasattr(url, "get_secret_value"):  # a URL with a password may be kept as a SecretStr
        url = url.get_secret_value()
    if retention is None:
        days = getattr(settings, "store_retention_days", None)
        retention = timedelta(days=days) if days else None
    if not url:
        return SqliteCallStore(settings.state_dir, retention=retention)
    scheme = urlsplit(url).scheme.split("+", 1)[0].lower()
    factory = STORE_FACTORIES.get(scheme)
    if factory is None:
        raise ConfigError(
            f"No call store for URL scheme {scheme or '(none)'!r}.",
            f"Supported: {', '.join(sorted(STORE_FACTORIES))}; leave the store URL unset "
            "to use SQLite in stateDir.",
        )
    return factory(url, retention)


__all__ = [
    "STORE_FACTORIES",
    "UPDATABLE_FIELDS",
    "CallNotFoundError",
    "CallRecord",
    "CallState",
    "CallStore",
    "DuplicateCallError",
    "EndReason",
    "PostgresCallStore",
    "PurgeResult",
    "SqliteCallStore",
    "StoreCorruptError",
    "StoreError",
    "StoreUnavailableError",
    "StoredEvent",
    "TranscriptLine",
    "open_store",
]
