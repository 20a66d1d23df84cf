"""HTTP plumbing for provider plugins: one pooled `httpx.AsyncClient` per event loop, explicit
timeouts, and a bounded retry policy (tenacity) that honours `Retry-After`.

Retry rules: 429, 5xx and failures to connect are retried with exponential backoff and full
jitter; other 4xx never are. A request that may already have been carried out by the provider
(a read timeout on a non-idempotent POST such as "place a call") is NOT retried, because a
second attempt could ring the user twice. The whole exchange, sleeps included, stays inside
`budget` seconds.

tenacity is imported on first use, not with this module: core does not depend on it (a
remote-only install has no provider plugin); a provider plugin using `send` declares it.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import ssl
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx

from .. import __version__
from ..errors import PluginError, ProviderError
from ..redact import scrub

if TYPE_CHECKING:
    from tenacity import RetryCallState

log = logging.getLogger(__name__)

_jitter = random.Random()  # the retry jitter's own generator; the global one is the app's


def _backoff(attempt: int) -> float:
    """Full-jitter exponential backoff before retry `attempt` + 1: uniform in
    [0, min(8 s, 0.25 s * 2^(attempt - 1))] (tenacity's `wait_random_exponential`, drawn
    from our own generator so retries never disturb the global `random` state)."""
    return _jitter.uniform(0, min(8.0, 0.25 * 2 ** (attempt - 1)))


USER_AGENT = f"whatsapp-call/{__version__}"
_tls: ssl.SSLContext | None = None


def tls_context() -> ssl.SSLContext:
    """One TLS context with httpx's defaults (certifi's CA bundle, or SSL_CERT_FILE /
    SSL_CERT_DIR) for every HTTP client of this process. httpx builds one per client (~50 ms
    holding the event loop); `calls.warmup.prepare_process` builds this one before any call."""
    global _tls
    if _tls is None:
        _tls = httpx.create_ssl_context()
    return _tls


@dataclass(frozen=True)
class HttpPolicy:
    """Per-request timeout (seconds), total time budget including retries, max attempts."""

    timeout: float = 10.0
    budget: float = 30.0
    attempts: int = 5


class ClientPool:
    """One `httpx.AsyncClient` per running event loop (connections are bound to a loop).

    The client is closed by `aclose()`, or automatically when its loop shuts down: it is held
    open by an async generator registered with the loop, and `asyncio.run` / `asyncio.Runner`
    close every such generator (`loop.shutdown_asyncgens`) before closing the loop.
    """

    def __init__(self) -> None:
        self._clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[httpx.AsyncClient, AsyncIterator[None]]
        ] = weakref.WeakKeyDictionary()

    async def get(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        entry = self._clients.get(loop)
        if entry is not None and not entry[0].is_closed:
            return entry[0]
        client = httpx.AsyncClient(
            verify=tls_context(),
            timeout=httpx.Timeout(10.0),
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=10),
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,
        )
        keeper = _hold_open(client)
        await keeper.__anext__()  # first iteration registers it with the loop
        self._clients[loop] = (client, keeper)
        return client

    async def aclose(self) -> None:
        """Close this loop's client (idempotent)."""
        entry = self._clients.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry[1].aclose()  # type: ignore[attr-defined]


async def _hold_open(client: httpx.AsyncClient) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await client.aclose()


class RateLimiter:
    """At most `rate` starts per `per` seconds (sliding window). Callers beyond it wait.

    The slot is reserved before the first await, so concurrent callers on one loop never
    overshoot; it uses only the monotonic clock, so it works across event loops too.
    """

    def __init__(self, rate: int, per: float = 1.0):
        self.rate = rate
        self.per = per
        self._starts: deque[float] = deque()

    async def acquire(self) -> None:
        now = time.monotonic()
        while self._starts and self._starts[0] <= now - self.per:
            self._starts.popleft()
        start = now
        if len(self._starts) >= self.rate:
            start = max(now, self._starts[-self.rate] + self.per)
        self._starts.append(start)
        if start > now:
            await asyncio.sleep(start - now)


class _Retryable(Exception):
    """An attempt failed in a way the same request may survive; carries the final error."""

    def __init__(self, error: ProviderError, retry_after: float | None = None):
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds from now (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _tenacity() -> Any:
    try:
        import tenacity
    except ImportError:
        raise PluginError(
            "The provider HTTP helpers need tenacity, which is not installed.",
            "Install it (pip install tenacity) and list it in your provider plugin's dependencies.",
        ) from None
    return tenacity


async def send(
    pool: ClientPool,
    method: str,
    url: str,
    *,
    provider: str,
    what: str,
    policy: HttpPolicy,
    error_from_response: Callable[[httpx.Response], ProviderError],
    label: str | None = None,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    json: Any = None,
    idempotent: bool = False,
) -> httpx.Response:
    """Send one request with the retry policy. Returns a 2xx/3xx response; raises ProviderError.

    `what` names the operation for messages ("check call permission"), `label` the provider
    as users know it ("Meta"; default `provider`); `error_from_response` turns a failed
    response into the provider's error (with its codes and hint).
    """
    tenacity = _tenacity()
    client = await pool.get()
    timeout = httpx.Timeout(policy.timeout)
    shown = label or provider
    attempts = 0

    async def attempt() -> httpx.Response:
        nonlocal attempts
        attempts += 1
        try:
            response = await client.request(
                method, url, headers=headers, params=params, json=json, timeout=timeout
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise _Retryable(_transport_error(provider, shown, what, url, exc, sent=False)) from exc
        except httpx.TransportError as exc:
            error = _transport_error(provider, shown, what, url, exc, sent=True)
            if idempotent:
                raise _Retryable(error) from exc
            raise error from exc
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retryable(
                error_from_response(response),
                parse_retry_after(response.headers.get("retry-after")),
            )
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    def wait(retry_state: RetryCallState) -> float:
        delay = _backoff(retry_state.attempt_number)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return exc.retry_after
        return delay

    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(_Retryable),
        stop=tenacity.stop_after_attempt(policy.attempts)
        | tenacity.stop_before_delay(policy.budget),
        wait=wait,
        reraise=True,
        before_sleep=lambda state: log.info(
            "%s: %s failed (attempt %d), retrying in %.1f s",
            provider,
            what,
            state.attempt_number,
            state.upcoming_sleep,
        ),
    )
    try:
        return await retrying(attempt)
    except _Retryable as exc:
        error = exc.error
        if attempts > 1:
            error = type(error)(
                f"{error.message} (gave up after {attempts} attempts)",
                error.hint,
                provider=error.provider,
                code=error.code,
                http_status=error.http_status,
                details=error.details,
                retryable=error.retryable,
            )
        raise error from None


def _transport_error(
    provider: str, label: str, what: str, url: str, exc: httpx.TransportError, *, sent: bool
) -> ProviderError:
    host = httpx.URL(url).host
    kind = type(exc).__name__
    detail = scrub(str(exc)) or kind
    if isinstance(exc, httpx.TimeoutException):
        message = f"{label}: could not {what}: timed out talking to {host} ({kind})."
    else:
        message = f"{label}: could not {what}: no connection to {host} ({detail})."
    hint = "Check the network and the API base URL in your config; try again later."
    if sent and isinstance(exc, httpx.ReadTimeout):
        hint = (
            "The request reached the provider but got no answer in time; it may have been "
            "carried out. Check before repeating it."
        )
    return ProviderError(message, hint, provider=provider, retryable=True)


def json_object(
    response: httpx.Response, *, provider: str, label: str, what: str, hint: str
) -> dict[str, Any]:
    """A successful response's JSON object; anything else (an HTML error page from a wrong
    base URL, a bare list) is a ProviderError naming what came back, with `hint`."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        snippet = scrub(response.text.strip().replace("\n", " "))[:120]
        raise ProviderError(
            f"{label}: could not {what}: the answer (HTTP {response.status_code}) is not a JSON "
            f"object: {snippet!r}.",
            hint,
            provider=provider,
            http_status=response.status_code,
        )
    return data


def unexpected_answer(
    data: Any, missing: str, *, provider: str, label: str, what: str, hint: str
) -> ProviderError:
    """The error for an answer that lacks a field we need (`missing`, e.g. "calls[0].id")."""
    shown = scrub(json.dumps(data, default=str)[:200])
    return ProviderError(
        f"{label}: could not {what}: the answer has no {missing}: {shown}.",
        hint,
        provider=provider,
    )
