"""A per-client rate limit for the service API: a token bucket per client address.

The API places phone calls on someone's account; even with the bearer token a runaway
agent loop, or a stranger guessing tokens, must not be able to hammer it. Each client
address may make `burst` requests at once and `rate` per second after that; beyond it the
answer is 429 with `Retry-After`. Checked before the token, so guessing is slowed as well.
"""

from __future__ import annotations

import math
import time

from starlette.requests import Request
from starlette.responses import JSONResponse

RATE_PER_SECOND = 20.0
BURST = 60
MAX_CLIENTS = 10_000  # buckets kept; the fullest (idle) ones are forgotten first


class ApiRateLimiter:
    def __init__(self, rate: float = RATE_PER_SECOND, burst: int = BURST):
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)

    def retry_after(self, client: str, now: float | None = None) -> float | None:
        """Take one request from `client`'s bucket: None if allowed, else seconds to wait."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_CLIENTS:
            self._forget_idle(now)
        return None

    def refuse(self, request: Request) -> JSONResponse | None:
        """The 429 answer for `request`, or None when it may go on."""
        client = request.client.host if request.client else "unknown"
        wait = self.retry_after(client)
        if wait is None:
            return None
        seconds = max(1, math.ceil(wait))
        return JSONResponse(
            {
                "error": {
                    "message": "Too many requests to the service API from this client.",
                    "hint": f"Slow down: at most {self.rate:g} requests per second "
                    f"(bursts of {self.burst}); retry after {seconds} s.",
                }
            },
            status_code=429,
            headers={"Retry-After": str(seconds)},
        )

    def _forget_idle(self, now: float) -> None:
        full = [
            key
            for key, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.rate >= self.burst
        ]
        for key in full[: max(1, len(self._buckets) - MAX_CLIENTS)]:
            del self._buckets[key]
