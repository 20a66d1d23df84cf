"""Call persistence. `open_store(settings)` picks the store; callers see only `CallStore`.

Today the only store is SQLite in `stateDir`. A shared store (e.g. PostgreSQL for several
service instances) plugs in by URL scheme through `STORE_FACTORIES`, without touching callers.
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


# URL scheme -> factory(url, retention). A PostgreSQL store adds "postgresql" here.
STORE_FACTORIES: dict[str, Callable[[str, timedelta | None], CallStore]] = {
    "sqlite": _sqlite_from_url,
}


def open_store(
    settings: Settings, *, url: str | None = None, retention: timedelta | None = None
) -> CallStore:
    """The store the settings ask for, not yet opened (`await store.open()` checks it now;
    otherwise it opens on first use). `url` (or a future `storeUrl` option) selects another
    store by scheme; unset means SQLite in `settings.state_dir`. `retention` (or a future
    `storeRetentionDays` option) purges ended calls older than that.
    """
    url = url or getattr(settings, "store_url", None)
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
    "PurgeResult",
    "SqliteCallStore",
    "StoreCorruptError",
    "StoreError",
    "StoreUnavailableError",
    "StoredEvent",
    "TranscriptLine",
    "open_store",
]
