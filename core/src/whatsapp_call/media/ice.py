"""Choose which local addresses WebRTC offers as ICE host candidates.

aioice gathers host candidates on every interface *except* loopback, which is right for a
server on the internet but wrong for two cases: tests and simulators on 127.0.0.1, and
multi-homed servers that must offer only their public interface. `ice_host_addresses`
(config `iceHostAddresses`) restricts gathering to the given addresses, loopback allowed.

The restriction is a context variable read by aioice's address lookup, so it applies to the
peer connections whose `setLocalDescription` runs inside `host_addresses(...)`, and to
no other: two calls in one process may use different settings.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
from collections.abc import Iterator, Sequence

import aioice.ice

from ..errors import ConfigError

_restriction: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "whatsapp_call_ice_host_addresses", default=None
)
_original_get_host_addresses = aioice.ice.get_host_addresses


def _get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    wanted = _restriction.get()
    if wanted is None:
        return _original_get_host_addresses(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
    out = []
    for addr in wanted:
        version = ipaddress.ip_address(addr).version
        if (version == 4 and use_ipv4) or (version == 6 and use_ipv6):
            out.append(addr)
    return out


aioice.ice.get_host_addresses = _get_host_addresses


def validate_addresses(addresses: Sequence[str]) -> tuple[str, ...]:
    out = []
    for addr in addresses:
        try:
            out.append(str(ipaddress.ip_address(addr)))
        except ValueError:
            raise ConfigError(
                f"iceHostAddresses: {addr!r} is not an IP address.",
                "List local interface addresses, e.g. [127.0.0.1] or [203.0.113.7].",
            ) from None
    return tuple(out)


@contextlib.contextmanager
def host_addresses(addresses: Sequence[str] | None) -> Iterator[None]:
    """Within this block, ICE gathering offers host candidates on `addresses` only
    (None = aioice's default: every interface but loopback)."""
    token = _restriction.set(None if addresses is None else validate_addresses(addresses))
    try:
        yield
    finally:
        _restriction.reset(token)
