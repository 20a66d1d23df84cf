"""Webhook delivery as Meta and WATI do it: signed raw bytes, in order, retried, with faults.

One sequential sender per simulator keeps the order of events (connect before RINGING)
unless the out-of-order fault asks otherwise. The signature is computed over the exact
bytes sent (spec §1.10), so a receiver that re-serialises JSON will fail, as with Meta.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from whatsapp_call.errors import WebhookRejected

from .scenario import Faults

log = logging.getLogger("whatsapp_call_sim.whatsapp")

SIGNATURE_HEADER = "X-Hub-Signature-256"
OUT_OF_ORDER_WAIT_S = 0.5  # how long a held webhook waits for a later one to overtake it


def sign(body: bytes, secret: str) -> str:
    """The `X-Hub-Signature-256` value: `sha256=` + hex HMAC-SHA256(secret, raw body)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def check_signature(body: bytes, header: str | None, secret: str) -> bool:
    """Constant-time check of a `X-Hub-Signature-256` header against the raw body."""
    if not header or not header.startswith("sha256="):
        return False
    return hmac.compare_digest(header, sign(body, secret))


@dataclass
class Delivery:
    """One webhook as sent (or attempted); kept for tests and `GET /_sim/webhooks`."""

    provider: str  # "meta" | "wati"
    kind: str  # e.g. "calls.connect", "statuses.RINGING", "permission"
    url: str | None
    payload: dict[str, Any]
    body: bytes = b""
    attempts: list[dict[str, Any]] = field(default_factory=list)  # {"at", "status"|"error"}
    delivered: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "kind": self.kind,
            "url": self.url,
            "payload": self.payload,
            "attempts": self.attempts,
            "delivered": self.delivered,
        }


class WebhookSender:
    """Queues webhooks and POSTs them one at a time, applying the fault switches."""

    def __init__(self, faults: Faults, retry_delays_s: tuple[float, ...], timeout_s: float):
        self.faults = faults
        self.retry_delays_s = retry_delays_s
        self.timeout_s = timeout_s
        self.deliveries: list[Delivery] = []
        self._queue: asyncio.Queue[tuple[Delivery, str | None]] = asyncio.Queue()
        self._client: httpx.AsyncClient | None = None
        self._worker: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.timeout_s)
        self._worker = asyncio.create_task(self._run(), name="whatsapp-sim-webhooks")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def send(
        self, provider: str, kind: str, url: str | None, payload: dict[str, Any], secret: str | None
    ) -> Delivery:
        """Queue one webhook; `secret` None = unsigned. Without a URL it is only recorded."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        delivery = Delivery(provider, kind, url, payload, body)
        self.deliveries.append(delivery)
        if url is None:
            log.debug("no %s webhook URL configured; %s recorded only", provider, kind)
            return delivery
        self._idle.clear()
        self._queue.put_nowait((delivery, secret))
        return delivery

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until every queued webhook has been sent (for tests and orderly shutdown)."""
        async with asyncio.timeout(timeout):
            await self._idle.wait()

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            if self.faults.out_of_order:
                # Hold this one until the next is queued and send that one first.
                try:
                    async with asyncio.timeout(OUT_OF_ORDER_WAIT_S):
                        following = await self._queue.get()
                    await self._post(*following)
                except TimeoutError:
                    pass
            await self._post(*item)
            if self._queue.empty():
                self._idle.set()

    async def _post(self, delivery: Delivery, secret: str | None) -> None:
        if self.faults.delay_s > 0:
            await asyncio.sleep(self.faults.delay_s)
        copies = 2 if self.faults.duplicate_delivery else 1
        for _ in range(copies):
            await self._post_once(delivery, secret)

    async def _post_once(self, delivery: Delivery, secret: str | None) -> None:
        assert self._client is not None and delivery.url is not None
        headers = {"Content-Type": "application/json", "User-Agent": "facebookexternalua"}
        if secret is not None:
            key = secret if not self.faults.bad_signature else secrets.token_hex(16)
            headers[SIGNATURE_HEADER] = sign(delivery.body, key)
        for delay in (None, *self.retry_delays_s):
            if delay is not None:
                await asyncio.sleep(delay)
            attempt: dict[str, Any] = {"at": time.time()}
            delivery.attempts.append(attempt)
            try:
                response = await self._client.post(
                    delivery.url, content=delivery.body, headers=headers
                )
            except httpx.HTTPError as exc:
                attempt["error"] = type(exc).__name__
                log.info(
                    "%s webhook %s to %s failed: %s",
                    delivery.provider,
                    delivery.kind,
                    delivery.url,
                    type(exc).__name__,
                )
                continue
            attempt["status"] = response.status_code
            if response.is_success:
                delivery.delivered = True
                return
            log.info(
                "%s webhook %s answered HTTP %s",
                delivery.provider,
                delivery.kind,
                response.status_code,
            )


async def verify_webhook(
    url: str,
    verify_token: str,
    *,
    challenge: str | None = None,
    client: httpx.AsyncClient | None = None,
    timeout: float = 5.0,
) -> str:
    """Meta's subscription handshake (spec §1.10) against a webhook URL.

    GETs `?hub.mode=subscribe&hub.verify_token=…&hub.challenge=…` and checks that the
    endpoint answers 200 with exactly the challenge. Returns the challenge; raises
    WebhookRejected (status_code = the endpoint's HTTP status) otherwise.
    """
    challenge = challenge or str(secrets.randbelow(10**12))
    params = {"hub.mode": "subscribe", "hub.verify_token": verify_token, "hub.challenge": challenge}
    owned = client is None
    client = client or httpx.AsyncClient(timeout=timeout)
    try:
        response = await client.get(url, params=params)
    except httpx.HTTPError as exc:
        raise WebhookRejected(
            f"Webhook verification: could not reach {url} ({type(exc).__name__}).",
            502,
            "Start the service and check the webhook URL.",
        ) from None
    finally:
        if owned:
            await client.aclose()
    if response.status_code != 200:
        raise WebhookRejected(
            f"Webhook verification: {url} answered HTTP {response.status_code}.",
            response.status_code,
            "Check that the service's verify token equals the one configured at Meta.",
        )
    if response.text != challenge:
        raise WebhookRejected(
            f"Webhook verification: {url} did not echo hub.challenge as plain text.",
            response.status_code,
            "Answer the GET with the hub.challenge value as the whole body.",
        )
    return challenge
