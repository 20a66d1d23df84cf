"""Meta's front door: the Graph API routes of spec §1 and the Meta webhook envelopes.

Requests are validated the way Graph does it (error 100 with `error_data.details`), refusals
use the Graph error envelope with the HTTP status of the spec's §1.11 table, and webhooks are
the WABA envelope (`object`/`entry`/`changes`) signed with the app secret.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import phonenumbers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .network import (
    PermissionRequest,
    SimApiError,
    SimCall,
    UserState,
    WhatsAppNetwork,
    new_wamid,
)
from .scenario import Faults, Scenario, SimConfig
from .webhooks import WebhookSender

VERSION = re.compile(r"^v\d+\.\d+$")
SETTINGS_ENUMS = {
    "status": ("ENABLED", "DISABLED"),
    "call_icon_visibility": ("DEFAULT", "DISABLE_ALL"),
    "callback_permission_status": ("ENABLED", "DISABLED"),
}
SETTINGS_KEYS = {*SETTINGS_ENUMS, "call_icons", "call_hours", "sip"}


def graph_error(
    code: int,
    message: str,
    http_status: int,
    *,
    details: str | None = None,
    error_type: str = "OAuthException",
    headers: dict[str, str] | None = None,
    transient: bool = False,
) -> JSONResponse:
    """The standard Graph error envelope (spec §1.1)."""
    error: dict[str, Any] = {"message": message, "type": error_type, "code": code}
    if details is not None:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details}
    if transient:
        error["is_transient"] = True
    error["fbtrace_id"] = "A" + base64.urlsafe_b64encode(secrets.token_bytes(15)).decode()
    return JSONResponse({"error": error}, status_code=http_status, headers=headers)


def _api_error(exc: SimApiError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return graph_error(
        exc.code,
        f"(#{exc.code}) {exc.title}",
        exc.http_status,
        details=exc.details,
        headers=headers,
    )


def _invalid(details: str) -> SimApiError:
    return SimApiError(100, details)


def _digits(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.isascii() or not value.isdigit():
        raise _invalid(
            f"{field} must be the user's number as digits with country code, no '+' ({value!r})"
        )
    return value


def _now() -> str:
    return str(int(time.time()))


class MetaGraph:
    """The simulated Graph API for one business phone number, and its webhook sink."""

    def __init__(
        self,
        network: WhatsAppNetwork,
        sender: WebhookSender,
        config: SimConfig,
        faults: Faults,
    ):
        self.network = network
        self.sender = sender
        self.config = config
        self.faults = faults
        network.sinks["meta"] = self

    # -- routes -----------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route("/{version}/{pnid}/calls", self._guard(self.calls), methods=["POST"]),
            Route(
                "/{version}/{pnid}/call_permissions",
                self._guard(self.call_permissions),
                methods=["GET"],
            ),
            Route("/{version}/{pnid}/messages", self._guard(self.messages), methods=["POST"]),
            Route(
                "/{version}/{pnid}/settings", self._guard(self.settings), methods=["GET", "POST"]
            ),
            Route("/{version}/{pnid}", self._guard(self.phone_number), methods=["GET"]),
        ]

    def _guard(
        self, handler: Callable[[Request], Awaitable[Any]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            version = request.path_params["version"]
            if not VERSION.match(version):
                return graph_error(
                    2500, f"Unknown path components: /{version}", 400, error_type="OAuthException"
                )
            fault = take_api_fault(self.faults)
            if fault == 429:
                return graph_error(
                    4,
                    "(#4) Application request limit reached",
                    429,
                    headers={"Retry-After": str(self.faults.retry_after_s)},
                    transient=True,
                )
            if fault == 503:
                return graph_error(2, "Service temporarily unavailable", 503, transient=True)
            token = _bearer(request) or request.query_params.get("access_token")
            if not token:
                return graph_error(
                    2500,
                    "An active access token must be used to query information about the current user.",
                    400,
                )
            if not secrets.compare_digest(token.encode(), self.config.meta_access_token.encode()):
                return graph_error(
                    190, "Invalid OAuth access token - Cannot parse access token", 401
                )
            pnid = request.path_params["pnid"]
            if pnid != self.config.phone_number_id:
                return graph_error(
                    100,
                    f"Unsupported {request.method.lower()} request. Object with ID '{pnid}' does not exist, "
                    "cannot be loaded due to missing permissions, or does not support this operation.",
                    400,
                    error_type="GraphMethodException",
                )
            try:
                result = await handler(request)
            except SimApiError as exc:
                return _api_error(exc)
            return result if isinstance(result, Response) else JSONResponse(result)

        return endpoint

    async def _body(self, request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            raise _invalid("The request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _invalid("The request body must be a JSON object")
        if body.get("messaging_product") != "whatsapp":
            raise _invalid('messaging_product is required and must be "whatsapp"')
        return body

    async def calls(self, request: Request) -> dict[str, Any]:
        body = await self._body(request)
        action = body.get("action")
        if action == "connect":
            to = _digits(body.get("to"), "to")
            session = body.get("session")
            if not isinstance(session, dict):
                hint = (
                    "; the legacy connection.webrtc form is not supported"
                    if "connection" in body
                    else ""
                )
                raise _invalid("session {sdp_type, sdp} is required for connect" + hint)
            if session.get("sdp_type") != "offer":
                raise _invalid(
                    f'session.sdp_type must be "offer" for connect (got {session.get("sdp_type")!r})'
                )
            opaque = body.get("biz_opaque_callback_data")
            if opaque is not None and (not isinstance(opaque, str) or len(opaque) > 512):
                raise _invalid(
                    "biz_opaque_callback_data must be a string of at most 512 characters"
                )
            call = self.network.connect("meta", to, session.get("sdp"), opaque)
            return {"messaging_product": "whatsapp", "calls": [{"id": call.id}]}
        if action in ("terminate", "pre_accept", "accept", "reject"):
            call_id = body.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _invalid(f"call_id is required for {action}")
            if action in ("pre_accept", "accept"):
                session = body.get("session")
                if not isinstance(session, dict) or session.get("sdp_type") != "answer":
                    got = session.get("sdp_type") if isinstance(session, dict) else None
                    raise _invalid(f'session.sdp_type must be "answer" for {action} (got {got!r})')
                if not isinstance(session.get("sdp"), str) or not session["sdp"]:
                    raise _invalid(f"session.sdp is required for {action}")
            if action == "terminate":
                await self.network.terminate(call_id)
                return {"messaging_product": "whatsapp", "success": True}
            call = self.network.find_call(call_id)
            raise _invalid(
                f"{action} is only valid for user-initiated calls; {call.id} is business-initiated"
            )
        raise _invalid(
            f"action must be one of connect, terminate, pre_accept, accept, reject (got {action!r})"
        )

    async def call_permissions(self, request: Request) -> dict[str, Any]:
        wa_id = request.query_params.get("user_wa_id")
        if not wa_id:
            raise _invalid("user_wa_id is required")
        _digits(wa_id, "user_wa_id")
        self.network.check_permission_rate()
        return self.network.permission_object(wa_id)

    async def messages(self, request: Request) -> dict[str, Any]:
        body = await self._body(request)
        to = body.get("to")
        digits = re.sub(r"\D", "", to) if isinstance(to, str) else ""
        if not digits:
            raise _invalid(f"to must be the recipient's phone number ({to!r})")
        if body.get("recipient_type", "individual") != "individual":
            raise _invalid('recipient_type must be "individual"')
        kind = body.get("type", "text")
        if kind == "interactive":
            message_id = self._interactive(body, digits)
        elif kind == "template":
            message_id = self._template(body, digits)
        elif kind == "text":
            text = body.get("text")
            if (
                not isinstance(text, dict)
                or not isinstance(text.get("body"), str)
                or not text["body"]
            ):
                raise _invalid("text.body is required")
            if not self.network.scenario_for(digits).service_window_open:
                raise SimApiError(
                    131047, "More than 24 hours have passed since the customer last replied"
                )
            message_id = new_wamid()
        else:
            raise _invalid(
                f"message type {kind!r} is not supported by the simulator (text, interactive, template)"
            )
        return {
            "messaging_product": "whatsapp",
            "contacts": [{"input": to, "wa_id": digits}],
            "messages": [{"id": message_id}],
        }

    def _interactive(self, body: dict[str, Any], wa_id: str) -> str:
        interactive = body.get("interactive")
        if not isinstance(interactive, dict) or not interactive.get("type"):
            raise _invalid("interactive.type is required")
        if interactive["type"] != "call_permission_request":
            if not self.network.scenario_for(wa_id).service_window_open:
                raise SimApiError(
                    131047, "More than 24 hours have passed since the customer last replied"
                )
            return new_wamid()
        action = interactive.get("action")
        if not isinstance(action, dict) or action.get("name") != "call_permission_request":
            raise _invalid('interactive.action.name must be "call_permission_request"')
        for part in ("header", "footer"):
            if part in interactive:
                raise _invalid(f"interactive.{part} is not supported for call_permission_request")
        text = interactive.get("body")
        if text is not None and (
            not isinstance(text, dict) or not isinstance(text.get("text"), str)
        ):
            raise _invalid('interactive.body must be {"text": "..."}')
        return self.network.request_permission("meta", wa_id, free_form=True).id

    def _template(self, body: dict[str, Any], wa_id: str) -> str:
        template = body.get("template")
        if not isinstance(template, dict) or not isinstance(template.get("name"), str):
            raise _invalid("template.name is required")
        language = template.get("language")
        if not isinstance(language, dict) or not isinstance(language.get("code"), str):
            raise _invalid("template.language.code is required")
        components = template.get("components") or []
        carries = template["name"] in self.config.permission_templates or any(
            isinstance(c, dict) and str(c.get("type", "")).lower() == "call_permission_request"
            for c in components
        )
        if not carries:
            raise SimApiError(
                132001,
                f"Template {template['name']!r} ({language['code']}) does not exist; the simulator "
                f"knows: {', '.join(self.config.permission_templates) or 'none'}",
            )
        return self.network.request_permission("meta", wa_id, free_form=False).id

    async def settings(self, request: Request) -> dict[str, Any]:
        current = self.network.calling_settings
        if request.method == "GET":
            return {"calling": dict(current)}
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            raise _invalid("The request body is not valid JSON") from None
        calling = body.get("calling") if isinstance(body, dict) else None
        if not isinstance(calling, dict):
            raise _invalid("calling is required")
        unknown = sorted(set(calling) - SETTINGS_KEYS)
        if unknown:
            raise _invalid(f"Unknown calling setting(s): {', '.join(unknown)}")
        for key, allowed in SETTINGS_ENUMS.items():
            if key in calling and calling[key] not in allowed:
                raise _invalid(f"calling.{key} must be one of {', '.join(allowed)}")
        current.update(calling)
        return {"success": True}

    async def phone_number(self, request: Request) -> dict[str, Any]:
        number = self.config.display_phone_number
        try:
            display = phonenumbers.format_number(
                phonenumbers.parse("+" + number), phonenumbers.PhoneNumberFormat.INTERNATIONAL
            )
        except phonenumbers.NumberParseException:
            display = number
        obj = {
            "verified_name": self.config.verified_name,
            "code_verification_status": "VERIFIED",
            "display_phone_number": display,
            "quality_rating": "GREEN",
            "platform_type": "CLOUD_API",
            "throughput": {"level": "STANDARD"},
            "id": self.config.phone_number_id,
        }
        fields = request.query_params.get("fields")
        if fields:
            wanted = {f.strip() for f in fields.split(",")} | {"id"}
            obj = {k: v for k, v in obj.items() if k in wanted}
        return obj

    # -- webhooks (EventSink) --------------------------------------------------------------

    def _send(self, kind: str, field: str, value: dict[str, Any]) -> None:
        payload = {
            "object": "whatsapp_business_account",
            "entry": [{"id": self.config.waba_id, "changes": [{"field": field, "value": value}]}],
        }
        self.sender.send(
            "meta", kind, self.config.meta_webhook_url, payload, self.config.meta_app_secret
        )

    def _value(self) -> dict[str, Any]:
        return {
            "messaging_product": "whatsapp",
            "metadata": {
                "display_phone_number": self.config.display_phone_number,
                "phone_number_id": self.config.phone_number_id,
            },
        }

    def _call_item(self, call: SimCall, event: str) -> dict[str, Any]:
        item: dict[str, Any] = {
            "id": call.id,
            "to": call.wa_id,
            "from": self.config.display_phone_number,
            "event": event,
            "timestamp": _now(),
            "direction": "BUSINESS_INITIATED",
        }
        if call.biz_opaque_callback_data is not None:
            item["biz_opaque_callback_data"] = call.biz_opaque_callback_data
        return item

    def call_connect(self, call: SimCall) -> None:
        value = self._value()
        if self.config.meta_connect_includes_contacts:
            value["contacts"] = [{"profile": {"name": call.scenario.name}, "wa_id": call.wa_id}]
        item = self._call_item(call, "connect")
        item["session"] = {"sdp_type": "answer", "sdp": call.answer_sdp}
        value["calls"] = [item]
        self._send("calls.connect", "calls", value)

    def call_status(self, call: SimCall, status: str) -> None:
        item: dict[str, Any] = {
            "id": call.id,
            "type": "call",
            "status": status,
            "timestamp": _now(),
            "recipient_id": call.wa_id,
        }
        if call.biz_opaque_callback_data is not None:
            item["biz_opaque_callback_data"] = call.biz_opaque_callback_data
        value = self._value()
        value["statuses"] = [item]
        self._send(f"statuses.{status}", "calls", value)

    def call_terminate(self, call: SimCall) -> None:
        item = self._call_item(call, "terminate")
        item["status"] = call.status
        if call.start_time is not None and call.end_time is not None:
            item["start_time"] = str(int(call.start_time))
            item["end_time"] = str(int(call.end_time))
            item["duration"] = call.duration
        value = self._value()
        value["calls"] = [item]
        if call.errors:
            value["errors"] = call.errors
        self._send("calls.terminate", "calls", value)

    def permission_reply(
        self, user: UserState, request: PermissionRequest, accepted: bool, scenario: Scenario
    ) -> None:
        reply: dict[str, Any] = {"response": "accept" if accepted else "reject"}
        reply["is_permanent"] = accepted and user.permission == "permanent"
        if accepted and user.permission == "temporary":
            reply["expiration_timestamp"] = user.expiration_time
        reply["response_source"] = "user_action"
        value = self._value()
        value["contacts"] = [{"profile": {"name": scenario.name}, "wa_id": user.wa_id}]
        value["messages"] = [
            {
                "from": user.wa_id,
                "id": new_wamid(),
                "timestamp": _now(),
                "type": "interactive",
                "context": {"from": self.config.display_phone_number, "id": request.id},
                "interactive": {"type": "call_permission_reply", "call_permission_reply": reply},
            }
        ]
        self._send("messages.call_permission_reply", "messages", value)

    def permission_undeliverable(self, user: UserState, request: PermissionRequest) -> None:
        value = self._value()
        value["statuses"] = [
            {
                "id": request.id,
                "status": "failed",
                "timestamp": _now(),
                "recipient_id": user.wa_id,
                "errors": [
                    {
                        "code": 131026,
                        "title": "Message undeliverable",
                        "message": "Message undeliverable",
                        "error_data": {
                            "details": "The recipient cannot receive this message (not on WhatsApp "
                            "or the client is too old for call permission requests)"
                        },
                    }
                ],
            }
        ]
        self._send("statuses.failed", "messages", value)


def _bearer(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def take_api_fault(faults: Faults) -> int | None:
    """Consume one injected API failure, if any: 429 first, then 503."""
    if faults.api_429_count > 0:
        faults.api_429_count -= 1
        return 429
    if faults.api_503_count > 0:
        faults.api_503_count -= 1
        return 503
    return None
