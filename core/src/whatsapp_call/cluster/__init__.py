"""Several service instances working as one: the Redis event bus that routes a call's events
to the instance holding its media and tracks call ownership (`RedisEventBus`). The shared
call store is the PostgreSQL one (`whatsapp_call.store.PostgresCallStore`).

Needs the `cluster` extra (`pip install 'whatsapp-call[cluster]'`); the client libraries are
imported only when a bus or store connects.
"""

from .bus import BusError, BusUnavailableError, OwnedCall, RedisEventBus

__all__ = ["BusError", "BusUnavailableError", "OwnedCall", "RedisEventBus"]
