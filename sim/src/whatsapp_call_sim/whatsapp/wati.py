"""WATI's front door: the Calling API of spec §3 and WATI's webhook payloads.

WATI is a BSP in front of Meta, so every request lands on the same network state as the
Graph routes. Envelope: `{code, message, result}`. Our rendering of failures (the spec
leaves Meta-code mapping open): request problems (auth, tenant, body, channel) use the HTTP
status as `code`; refusals from the WhatsApp side (no permission, limits, SDP) come back as
HTTP 200 with a non-200 `code` (Meta's HTTP status for that error) and Meta's text
`(#138006) ...` in `message`, which is why callers must check `code`, not only HTTP.

Webhooks come in two shapes (`SimConfig.wati_webhook_shape`):
* "per_event" (WATI's own voice service): POST {base}/permission, {base}/sdp-answer,
  {base}/call-status (RINGING, ACCEPTED, REJECTED, ENDED) and {base}/terminate.
* "single" (OpenClaw): everything to {base} with an `event` discriminator: `call.start`
  (the SDP answer, status "ringing"; later status "accepted"), `call.end` (status "rejected"
  or "ended") and `permission` (hasPermission).
With `wati_webhook_secret` set, each carries `X-Hub-Signature-256: sha256=<hex HMAC>`.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .meta import _bearer, take_api_fault
from .network import PermissionRequest, SimApiError, SimCall, UserState, WhatsAppNetwork
from .scenario import Faults, Scenario, SimConfig
from .webhooks import WebhookSender

BASE = "/{tenant}/api/v1/openapi/whatsapp/calls"
EVENT_PATHS = {
    "permission": "permission",
    "sdp-answer": "sdp-answer",
    "call-status": "call-status",
    "terminate": "terminate",
}


def envelope(
    code: int, message: str, result: Any = None, http_status: int = 200, **kw: Any
) -> JSONResponse:
    return JSONResponse(
        {"code": code, "message": message, "result": result}, status_code=http_status, **kw
    )


class _Refused(Exception):
    def __init__(self, http_status: int, message: str):
        self.http_status = http_status
        self.message = message
        super().__init__(message)


class WatiCalling:
    """The simulated WATI Calling API for one tenant, and its webhook sink."""

    def __init__(
        self, network: WhatsAppNetwork, sender: WebhookSender, config: SimConfig, faults: Faults
    ):
        self.network = network
        self.sender = sender
        self.config = config
        self.faults = faults
        network.sinks["wati"] = self

    def routes(self) -> list[Route]:
        return [
            Route(BASE + "/permissions/{waid}", self._guard(self.permissions), methods=["GET"]),
            Route(
                BASE + "/call-permission-request/{waid}",
                self._guard(self.permission_request),
                methods=["POST"],
            ),
            Route(
                BASE + "/outbound-call/{waid}", self._guard(self.outbound_call), methods=["POST"]
            ),
            Route(BASE + "/{call_id}/terminate", self._guard(self.terminate), methods=["POST"]),
        ]

    def _guard(
        self, handler: Callable[[Request], Awaitable[Any]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            fault = take_api_fault(self.faults)
            if fault == 429:
                return envelope(
                    429,
                    "Too many requests",
                    http_status=429,
                    headers={"Retry-After": str(self.faults.retry_after_s)},
                )
            if fault == 503:
                return envelope(503, "Service unavailable", http_status=503)
            if self.config.wati_require_auth:
                token = _bearer(request)
                if not token or not secrets.compare_digest(
                    token.encode(), self.config.wati_api_token.encode()
                ):
                    what = "missing" if not token else "invalid"
                    return envelope(401, f"Unauthorized: {what} Bearer token", http_status=401)
            tenant = request.path_params["tenant"]
            if tenant != self.config.wati_tenant_id:
                return envelope(404, f"Tenant {tenant} not found", http_status=404)
            channel = request.query_params.get("channelPhoneNumber")
            if (
                channel
                and "".join(ch for ch in channel if ch.isdigit())
                != self.config.display_phone_number
            ):
                return envelope(
                    400,
                    f"channelPhoneNumber {channel} is not a channel of this tenant",
                    http_status=400,
                )
            try:
                return envelope(200, "Success", await handler(request))
            except _Refused as exc:
                return envelope(exc.http_status, exc.message, http_status=exc.http_status)
            except SimApiError as exc:
                return envelope(exc.http_status, str(exc))

        return endpoint

    @staticmethod
    def _waid(request: Request) -> str:
        waid = request.path_params["waid"]
        if not waid.isascii() or not waid.isdigit():
            raise _Refused(400, f"waid must be digits with country code, no '+' ({waid!r})")
        return waid

    async def permissions(self, request: Request) -> dict[str, Any]:
        waid = self._waid(request)
        self.network.check_permission_rate()
        return self.network.permission_object(waid)

    async def permission_request(self, request: Request) -> None:
        self.network.request_permission("wati", self._waid(request), free_form=False)
        return None

    async def outbound_call(self, request: Request) -> dict[str, Any]:
        waid = self._waid(request)
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            raise _Refused(400, "The request body is not valid JSON") from None
        sdp = None
        if isinstance(body, dict):
            sdp = next((v for k, v in body.items() if k.lower() == "sdp"), None)
        if not isinstance(sdp, str) or not sdp:
            raise _Refused(400, 'Sdp is required: send {"Sdp": "<offer sdp>"}')
        call = self.network.connect("wati", waid, sdp)
        return {"callId": call.id}

    async def terminate(self, request: Request) -> None:
        call_id = request.path_params["call_id"]
        if call_id not in self.network.calls:
            raise _Refused(404, f"Call {call_id} not found")
        await self.network.terminate(call_id)
        return None

    # -- webhooks (EventSink) --------------------------------------------------------------

    def _send(self, kind: str, payload: dict[str, Any]) -> None:
        base = self.config.wati_webhook_url
        url = None
        if base is not None:
            url = (
                base
                if self.config.wati_webhook_shape == "single"
                else base.rstrip("/") + "/" + EVENT_PATHS[kind]
            )
        self.sender.send("wati", kind, url, payload, self.config.wati_webhook_secret)

    def _single(self) -> bool:
        return self.config.wati_webhook_shape == "single"

    def _call_fields(self, call: SimCall) -> dict[str, Any]:
        return {
            "callId": call.id,
            "tenantId": self.config.wati_tenant_id,
            "businessNumber": self.config.display_phone_number,
            "contact": {"ContactName": call.scenario.name, "ContactNumber": call.wa_id},
        }

    def call_connect(self, call: SimCall) -> None:
        if self._single():
            payload = {"event": "call.start", **self._call_fields(call), "status": "ringing"}
            payload.update({"sdp": call.answer_sdp, "hasPermission": None})
            self._send("sdp-answer", payload)
        else:
            self._send("sdp-answer", {"callId": call.id, "sdp": call.answer_sdp})

    def call_status(self, call: SimCall, status: str) -> None:
        if not self._single():
            self._send("call-status", {"callId": call.id, "status": status})
        elif status == "ACCEPTED":
            self._send(
                "call-status",
                {"event": "call.start", **self._call_fields(call), "status": "accepted"},
            )
        elif status == "REJECTED":
            self._send(
                "call-status",
                {"event": "call.end", **self._call_fields(call), "status": "rejected"},
            )
        # single shape, RINGING: already said by the call.start that carried the answer.

    def call_terminate(self, call: SimCall) -> None:
        if self._single():
            if call.end_reason != "rejected":  # a rejected call's call.end was already sent
                self._send(
                    "terminate", {"event": "call.end", **self._call_fields(call), "status": "ended"}
                )
            return
        self._send("call-status", {"callId": call.id, "status": "ENDED"})
        self._send("terminate", self._call_fields(call))

    def permission_reply(
        self, user: UserState, request: PermissionRequest, accepted: bool, scenario: Scenario
    ) -> None:
        payload: dict[str, Any] = {
            "waid": user.wa_id,
            "channelPhoneNumber": self.config.display_phone_number,
            "hasPermission": accepted,
            "status": "granted" if accepted else "denied",
            "tenantId": self.config.wati_tenant_id,
        }
        if self._single():
            payload = {"event": "permission", **payload}
        self._send("permission", payload)

    def permission_undeliverable(self, user: UserState, request: PermissionRequest) -> None:
        """WATI documents no webhook for an undeliverable request: the user simply never answers."""
