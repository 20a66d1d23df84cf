"""Remote (hosted) mode: a client of a whatsapp-call service's `/v1` API.

With `serviceUrl` set, the CLI and the agent tool use this instead of running calls here: no
WebRTC, no webhook server, nothing of the `server` extra is imported, so a client-only
install (`pip install whatsapp-call`) is enough.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx

from .config import Settings
from .errors import BadInputError, ConfigError, WhatsAppCallError
from .redact import scrub


def _seg(value: str) -> str:
    """One URL path segment: a call id or number typed by a user cannot reach another route."""
    return quote(value, safe="+")


class ServiceError(WhatsAppCallError):
    """The remote service refused or failed a request. `status` is the HTTP status."""

    def __init__(self, message: str, hint: str | None = None, status: int = 0, body: Any = None):
        self.status = status
        self.body = body
        super().__init__(message, hint)


class ServiceClient:
    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> ServiceClient:
        if settings.service_url is None:
            raise ConfigError("serviceUrl is not set.", "Set serviceUrl to use a remote service.")
        return cls(settings.service_url, settings.secret("service_token"))

    async def __aenter__(self) -> ServiceClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceError(
                f"Cannot reach the whatsapp-call service at {self.base_url}: {type(exc).__name__}.",
                "Check serviceUrl, and that `whatsapp-call serve` runs there.",
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            error = (body or {}).get("error", {}) if isinstance(body, dict) else {}
            message = error.get("message") or f"HTTP {response.status_code}"
            hint = error.get("hint")
            if response.status_code == 401:
                hint = "Set serviceToken to the token the service was started with."
            if response.status_code == 422:
                raise BadInputError(scrub(message), hint)
            raise ServiceError(
                f"The service answered {response.status_code}: {scrub(message)}",
                hint,
                status=response.status_code,
                body=body,
            )
        if body is None:
            raise ServiceError(
                f"The service at {self.base_url} answered something that is not JSON.",
                "Check that serviceUrl points at a whatsapp-call service.",
            )
        return body

    async def place_call(
        self, to: str, *, idempotency_key: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"to": to, **{k: v for k, v in fields.items() if v is not None}}
        return await self._request("POST", "/v1/calls", json=body, headers=headers)

    async def get_call(self, call_id: str) -> dict[str, Any]:
        return await self._request("GET", f"/v1/calls/{_seg(call_id)}")

    async def list_calls(self, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        return (await self._request("GET", "/v1/calls", params=params))["calls"]

    async def hangup(self, call_id: str) -> dict[str, Any]:
        return await self._request("POST", f"/v1/calls/{_seg(call_id)}/hangup")

    async def check_permission(self, to: str) -> dict[str, Any]:
        return await self._request("GET", f"/v1/permissions/{_seg(to)}")

    async def request_permission(self, to: str) -> dict[str, Any]:
        return await self._request("POST", f"/v1/permissions/{_seg(to)}/request")

    async def events(self, call_id: str) -> AsyncIterator[dict[str, Any]]:
        """The call's live updates (Server-Sent Events) until it ends."""
        try:
            async with self._http.stream(
                "GET",
                f"/v1/calls/{_seg(call_id)}/events",
                timeout=httpx.Timeout(60.0, connect=10.0),
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise ServiceError(
                        f"The service answered {response.status_code} for the event stream.",
                        status=response.status_code,
                    )
                data: list[str] = []
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif line == "" and data:
                        yield json.loads("\n".join(data))
                        data = []
        except httpx.HTTPError as exc:
            raise ServiceError(
                f"The event stream from {self.base_url} broke: {type(exc).__name__}.",
                "The call goes on at the service; check it with: whatsapp-call calls ID",
            ) from None
