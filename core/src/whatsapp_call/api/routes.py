"""The service API (`/v1`), served by `whatsapp-call serve` next to the webhooks.

Remote mode, the agent tool and the MCP server drive calls through it. Every route needs
`Authorization: Bearer <serviceToken>` (compared in constant time); without a configured
token the service only listens on loopback (the runtime refuses anything else).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import BadInputError, WhatsAppCallError
from ..phone import parse_phone
from ..redact import scrub
from ..store.base import CallState
from .records import full_record

MAX_BODY = 64 * 1024
SSE_HEARTBEAT_SECONDS = 15.0


class CallCreate(BaseModel):
    """Body of `POST /v1/calls`."""

    model_config = ConfigDict(extra="forbid")

    to: str = Field(description="The callee, in international form, e.g. +14085551234.")
    greeting: str | None = Field(None, max_length=2000, description="What the AI says first.")
    instructions: str | None = Field(None, max_length=20000, description="Instructions for the AI.")
    voice: str | None = Field(None, max_length=64, description="Voice of the AI.")
    language: str | None = Field(None, max_length=32, description="Language, e.g. en or pt-BR.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Kept with the call record.")


def _error(status: int, message: str, hint: str | None = None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"error": {"message": scrub(message)}}
    if hint:
        body["error"]["hint"] = scrub(hint)
    body["error"].update(extra)
    return JSONResponse(body, status_code=status)


def _authorized(request: Request, token: str | None) -> bool:
    if token is None:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        value.strip().encode(), token.encode()
    )


def api_routes(service: Any) -> list[Route]:
    """The `/v1` routes bound to a `CallService`."""
    from ..calls.orchestrator import CallInProgressError, CallRequest, ServiceBusyError

    settings = service.settings
    token = settings.secret("service_token")
    store = service.store

    def guarded(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            if not _authorized(request, token):
                return _error(
                    401,
                    "Missing or wrong bearer token.",
                    "Send Authorization: Bearer <serviceToken>.",
                )
            try:
                return await handler(request)
            except BadInputError as exc:
                return _error(422, exc.message, exc.hint)
            except ServiceBusyError as exc:
                return _error(503, exc.message, exc.hint)
            except CallInProgressError as exc:
                return _error(409, exc.message, exc.hint, call_id=exc.call_id)
            except WhatsAppCallError as exc:
                return _error(502, exc.message, exc.hint)

        return endpoint

    async def read_json(request: Request) -> Any:
        body = await request.body()
        if len(body) > MAX_BODY:
            raise BadInputError(
                "The request body is too large.", f"Keep it under {MAX_BODY} bytes."
            )
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as exc:
            raise BadInputError(
                f"The body is not valid JSON: {exc}", "Send a JSON object."
            ) from None

    async def create_call(request: Request) -> Response:
        try:
            body = CallCreate.model_validate(await read_json(request))
        except ValidationError as exc:
            fields = [
                {"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]}
                for e in exc.errors()
            ]
            names = ", ".join(f["field"] for f in fields)
            return _error(
                422, f"Invalid request body: {names}.", "See the fields listed.", fields=fields
            )
        record = await service.place_call(
            CallRequest(
                to=body.to,
                greeting=body.greeting,
                instructions=body.instructions,
                voice=body.voice,
                language=body.language,
                metadata=body.metadata,
                idempotency_key=request.headers.get("idempotency-key") or None,
            )
        )
        return JSONResponse(await full_record(store, record), status_code=202)

    async def get_call(request: Request) -> Response:
        record = await store.get_call(request.path_params["call_id"])
        if record is None:
            return _error(404, "No such call.", "List calls with GET /v1/calls.")
        return JSONResponse(await full_record(store, record))

    async def list_calls(request: Request) -> Response:
        state = request.query_params.get("state") or None
        if state is not None and state not in {s.value for s in CallState}:
            raise BadInputError(
                f"Unknown state {state!r}.", f"One of: {', '.join(s.value for s in CallState)}."
            )
        try:
            limit = int(request.query_params.get("limit", "50"))
        except ValueError:
            raise BadInputError("limit must be a number.", "E.g. ?limit=20.") from None
        if not 1 <= limit <= 500:
            raise BadInputError("limit must be between 1 and 500.", "E.g. ?limit=20.")
        records = await store.list_calls(state=state, limit=limit)
        return JSONResponse({"calls": [r.to_dict() for r in records]})

    async def hangup(request: Request) -> Response:
        call_id = request.path_params["call_id"]
        if await store.get_call(call_id) is None:
            return _error(404, "No such call.", "List calls with GET /v1/calls.")
        record = await service.hangup(call_id)
        return JSONResponse(await full_record(store, record))

    async def events(request: Request) -> Response:
        call_id = request.path_params["call_id"]
        record = await store.get_call(call_id)
        if record is None:
            return _error(404, "No such call.", "List calls with GET /v1/calls.")

        async def stream() -> AsyncIterator[bytes]:
            async with service.live.subscribe(call_id) as updates:
                current = await store.get_call(call_id)
                yield _sse(
                    "state",
                    {"type": "state", "state": current.state.value, "call": current.to_dict()},
                )
                for line in await store.get_transcript(call_id):
                    yield _sse(
                        "transcript",
                        {
                            "type": "transcript",
                            "role": line.role,
                            "text": line.text,
                            "at": line.at.isoformat(),
                        },
                    )
                if current.is_final:
                    return
                iterator = updates.__aiter__()
                while True:
                    try:
                        update = await asyncio.wait_for(iterator.__anext__(), SSE_HEARTBEAT_SECONDS)
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    except StopAsyncIteration:
                        return
                    yield _sse(update.get("type", "update"), update)
                    if update.get("type") == "state" and update.get("state") == "ended":
                        return

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def permission(request: Request) -> Response:
        to = parse_phone(request.path_params["to"])
        state = await service.check_permission(to.e164)
        return JSONResponse(
            {
                "to": to.e164,
                "status": state.status.value,
                "permanent": state.permanent,
                "expires_at": state.expires_at.isoformat() if state.expires_at else None,
                "can_request": state.can_request,
                "can_call": state.can_call,
                "next_request_at": state.next_request_at.isoformat()
                if state.next_request_at
                else None,
                "next_call_at": state.next_call_at.isoformat() if state.next_call_at else None,
                "detail": state.detail,
            }
        )

    async def request_permission(request: Request) -> Response:
        to = parse_phone(request.path_params["to"])
        result = await service.request_permission(to.e164)
        return JSONResponse(
            {
                "to": to.e164,
                "outcome": result.outcome.value,
                "message_id": result.message_id,
                "retry_at": result.retry_at.isoformat() if result.retry_at else None,
                "detail": result.detail,
            },
            status_code=202,
        )

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document())

    return [
        Route("/v1/calls", guarded(create_call), methods=["POST"]),
        Route("/v1/calls", guarded(list_calls), methods=["GET"]),
        Route("/v1/calls/{call_id}", guarded(get_call), methods=["GET"]),
        Route("/v1/calls/{call_id}/hangup", guarded(hangup), methods=["POST"]),
        Route("/v1/calls/{call_id}/events", guarded(events), methods=["GET"]),
        Route("/v1/permissions/{to}", guarded(permission), methods=["GET"]),
        Route("/v1/permissions/{to}/request", guarded(request_permission), methods=["POST"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of `/v1`, from the same pydantic models the routes use."""
    error = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {"message": {"type": "string"}, "hint": {"type": "string"}},
                "required": ["message"],
            }
        },
    }
    record = {"type": "object", "description": "A call record (see the README: call records)."}
    unauthorized = {"description": "Missing or wrong bearer token", "content": _json(error)}
    call_id = {"name": "call_id", "in": "path", "required": True, "schema": {"type": "string"}}
    to = {"name": "to", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "whatsapp-call service API", "version": "1"},
        "components": {
            "schemas": {"CallCreate": CallCreate.model_json_schema(), "Error": error},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/calls": {
                "post": {
                    "summary": "Place a call (permission is checked and requested as needed).",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": _json({"$ref": "#/components/schemas/CallCreate"}),
                    },
                    "responses": {
                        "202": {"description": "The call record", "content": _json(record)},
                        "401": unauthorized,
                        "409": {
                            "description": "A call to this number is in progress",
                            "content": _json(error),
                        },
                        "422": {"description": "Invalid body", "content": _json(error)},
                        "503": {"description": "At capacity", "content": _json(error)},
                    },
                },
                "get": {
                    "summary": "List calls, newest first.",
                    "parameters": [
                        {
                            "name": "state",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": [s.value for s in CallState]},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                        },
                    ],
                    "responses": {
                        "200": {"description": "Calls", "content": _json({"type": "object"})},
                        "401": unauthorized,
                        "422": {"description": "Bad query", "content": _json(error)},
                    },
                },
            },
            "/v1/calls/{call_id}": {
                "get": {
                    "summary": "One call's full record with transcript.",
                    "parameters": [call_id],
                    "responses": {
                        "200": {"description": "The call record", "content": _json(record)},
                        "401": unauthorized,
                        "404": {"description": "No such call", "content": _json(error)},
                    },
                }
            },
            "/v1/calls/{call_id}/hangup": {
                "post": {
                    "summary": "Hang up a call.",
                    "parameters": [call_id],
                    "responses": {
                        "200": {"description": "The ended call", "content": _json(record)},
                        "401": unauthorized,
                        "404": {"description": "No such call", "content": _json(error)},
                    },
                }
            },
            "/v1/calls/{call_id}/events": {
                "get": {
                    "summary": "Live state changes and transcript lines (Server-Sent Events).",
                    "parameters": [call_id],
                    "responses": {
                        "200": {
                            "description": "An SSE stream",
                            "content": {"text/event-stream": {}},
                        },
                        "401": unauthorized,
                        "404": {"description": "No such call", "content": _json(error)},
                    },
                }
            },
            "/v1/permissions/{to}": {
                "get": {
                    "summary": "Whether the user allows calls.",
                    "parameters": [to],
                    "responses": {
                        "200": {
                            "description": "Permission state",
                            "content": _json({"type": "object"}),
                        },
                        "401": unauthorized,
                        "422": {"description": "Bad number", "content": _json(error)},
                        "502": {"description": "Provider error", "content": _json(error)},
                    },
                }
            },
            "/v1/permissions/{to}/request": {
                "post": {
                    "summary": "Send WhatsApp's call-permission request.",
                    "parameters": [to],
                    "responses": {
                        "202": {
                            "description": "Request outcome",
                            "content": _json({"type": "object"}),
                        },
                        "401": unauthorized,
                        "422": {"description": "Bad number", "content": _json(error)},
                        "502": {"description": "Provider error", "content": _json(error)},
                    },
                }
            },
        },
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}
