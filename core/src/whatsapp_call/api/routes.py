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
from .ratelimit import ApiRateLimiter
from .records import full_record

MAX_BODY = 64 * 1024
SSE_HEARTBEAT_SECONDS = 15.0


class CallCreate(BaseModel):
    """Body of `POST /v1/calls`."""

    model_config = ConfigDict(extra="forbid")

    to: str = Field(
        description="The callee, in international form, e.g. +14085551234.",
        examples=["+14085551234"],
    )
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

    limiter = ApiRateLimiter()

    def guarded(handler: Any, query: frozenset[str] = frozenset()) -> Any:
        """Bearer token first; then unknown query parameters are refused (a misspelt filter
        must not silently list everything); then our errors become JSON answers."""

        async def endpoint(request: Request) -> Response:
            refused = limiter.refuse(request)
            if refused is not None:
                return refused
            if not _authorized(request, token):
                response = _error(
                    401,
                    "Missing or wrong bearer token.",
                    "Send Authorization: Bearer <serviceToken>.",
                )
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
            unknown = sorted(set(request.query_params) - query)
            if unknown:
                names = ", ".join(repr(name) for name in unknown)
                return _error(
                    422,
                    f"Unknown query parameter(s): {names}.",
                    f"This route takes {', '.join(sorted(query)) or 'no query parameters'}.",
                    fields=[
                        {"field": n, "message": "not a parameter of this route"} for n in unknown
                    ],
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
        except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8/16/32
            raise BadInputError(
                f"The body is not valid JSON: {exc}", "Send a JSON object, UTF-8 encoded."
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
                last_state = current.state.value
                yield _sse(
                    "state",
                    {"type": "state", "state": last_state, "call": current.to_dict()},
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
                # One pending read at a time, waited for with a timeout rather than cancelled
                # by it: cancelling an async generator's __anext__ finalises the generator,
                # which would end the stream at the first keep-alive.
                iterator = updates.__aiter__()
                pending: asyncio.Future[dict[str, Any]] | None = None
                try:
                    while True:
                        if pending is None:
                            pending = asyncio.ensure_future(anext(iterator))
                        done, _ = await asyncio.wait({pending}, timeout=SSE_HEARTBEAT_SECONDS)
                        if not done:
                            yield b": keep-alive\n\n"
                            continue
                        finished, pending = pending, None
                        try:
                            update = finished.result()
                        except StopAsyncIteration:
                            return
                        if update.get("type") == "state":
                            if update.get("state") == last_state:
                                continue  # already sent as the first event's snapshot
                            last_state = update.get("state")
                        yield _sse(update.get("type", "update"), update)
                        if update.get("type") == "state" and update.get("state") == "ended":
                            return
                finally:
                    if pending is not None:
                        pending.cancel()

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
        Route("/v1/calls", guarded(list_calls, frozenset({"state", "limit"})), methods=["GET"]),
        Route("/v1/calls/{call_id}", guarded(get_call), methods=["GET"]),
        Route("/v1/calls/{call_id}/hangup", guarded(hangup), methods=["POST"]),
        Route("/v1/calls/{call_id}/events", guarded(events), methods=["GET"]),
        Route("/v1/permissions/{to}", guarded(permission), methods=["GET"]),
        Route("/v1/permissions/{to}/request", guarded(request_permission), methods=["POST"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


def _nullable(kind: str, **extra: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **extra}


def _schemas() -> dict[str, Any]:
    """Response schemas: the exact shape of what the routes return (checked by the tests
    against the running service with schemathesis)."""
    from ..models import PermissionRequestOutcome, PermissionStatus
    from ..store.base import EndReason

    time = {"type": "string", "format": "date-time"}
    maybe_time = _nullable("string", format="date-time")
    text = _nullable("string")
    call = {
        "id": {"type": "string", "description": "Our call id (call_…)."},
        "to_e164": {"type": "string", "description": "The callee, E.164."},
        "provider": {"type": "string", "description": "meta or wati."},
        "state": {"type": "string", "enum": [s.value for s in CallState]},
        "provider_call_id": text,
        "end_reason": {"type": ["string", "null"], "enum": [*[r.value for r in EndReason], None]},
        "end_detail": text,
        "greeting": text,
        "instructions": text,
        "voice": text,
        "language": text,
        "metadata": {"type": "object"},
        "metrics": {"type": "object", "description": "Set-up phases, audio and turn figures."},
        "idempotency_key": text,
        "worker": text,
        "created_at": time,
        "updated_at": time,
        "ended_at": maybe_time,
    }
    summary = {"type": "object", "properties": call, "required": list(call)}
    record = {
        "type": "object",
        "description": "A call with its history (events), transcript and metrics.",
        "properties": {
            **call,
            "duration_seconds": _nullable("number"),
            "events": {"type": "array", "items": {"$ref": "#/components/schemas/CallEvent"}},
            "transcript": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/TranscriptLine"},
            },
        },
        "required": [*call, "duration_seconds", "events", "transcript"],
    }
    return {
        "CallCreate": CallCreate.model_json_schema(),
        "CallSummary": summary,
        "CallRecord": record,
        "CallList": {
            "type": "object",
            "properties": {
                "calls": {"type": "array", "items": {"$ref": "#/components/schemas/CallSummary"}}
            },
            "required": ["calls"],
        },
        "CallEvent": {
            "type": "object",
            "properties": {
                "call_id": {"type": "string"},
                "seq": {"type": "integer", "minimum": 1},
                "at": time,
                "type": {"type": "string"},
                "data": {"type": "object"},
            },
            "required": ["call_id", "seq", "at", "type", "data"],
        },
        "TranscriptLine": {
            "type": "object",
            "properties": {
                "at": time,
                "role": {"type": "string", "enum": ["assistant", "user"]},
                "text": {"type": "string"},
            },
            "required": ["at", "role", "text"],
        },
        "SseEvent": {
            "type": "object",
            "description": "One Server-Sent Event. `event` is state, transcript, event (a "
            "step of the call, e.g. offer_sent) or media; `data` is a JSON object with the "
            "same `type`. Comment lines (`: keep-alive`) come every 15 s of silence.",
            "properties": {
                "event": {"type": "string"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {
                        "type": "object",
                        "properties": {
                            "type": {"type": "string"},
                            "state": {"type": "string", "enum": [s.value for s in CallState]},
                            "end_reason": text,
                            "detail": text,
                            "role": {"type": "string"},
                            "text": {"type": "string"},
                            "at": time,
                            "call": {"$ref": "#/components/schemas/CallSummary"},
                        },
                        "required": ["type"],
                    },
                },
            },
            "required": ["event", "data"],
        },
        "Permission": {
            "type": "object",
            "properties": {
                "to": {"type": "string"},
                "status": {"type": "string", "enum": [s.value for s in PermissionStatus]},
                "permanent": {"type": "boolean"},
                "expires_at": maybe_time,
                "can_request": {"type": "boolean"},
                "can_call": {"type": "boolean"},
                "next_request_at": maybe_time,
                "next_call_at": maybe_time,
                "detail": {"type": "string"},
            },
            "required": ["to", "status", "permanent", "can_request", "can_call", "detail"],
        },
        "PermissionRequest": {
            "type": "object",
            "properties": {
                "to": {"type": "string"},
                "outcome": {"type": "string", "enum": [o.value for o in PermissionRequestOutcome]},
                "message_id": text,
                "retry_at": maybe_time,
                "detail": {"type": "string"},
            },
            "required": ["to", "outcome", "detail"],
        },
        "Error": {
            "type": "object",
            "properties": {
                "error": {
                    "type": "object",
                    "properties": {
                        "message": {"type": "string"},
                        "hint": {"type": "string"},
                        "fields": {
                            "type": "array",
                            "description": "422 for a body: each invalid field and why.",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "field": {"type": "string"},
                                    "message": {"type": "string"},
                                },
                                "required": ["field", "message"],
                            },
                        },
                        "call_id": {
                            "type": "string",
                            "description": "409: the call already in progress.",
                        },
                    },
                    "required": ["message"],
                }
            },
            "required": ["error"],
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of `/v1`, from the same pydantic models the routes use."""

    def ref(name: str) -> dict[str, Any]:
        return _json({"$ref": f"#/components/schemas/{name}"})

    def error(description: str) -> dict[str, Any]:
        return {"description": description, "content": ref("Error")}

    unauthorized = error("Missing or wrong bearer token")
    too_many = {
        "description": "Too many requests from this client (see api/ratelimit.py)",
        "headers": {
            "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
        },
        "content": ref("Error"),
    }
    call_id = {"name": "call_id", "in": "path", "required": True, "schema": {"type": "string"}}
    to = {
        "name": "to",
        "in": "path",
        "required": True,
        "description": "The user's number, international form, e.g. +14085551234.",
        "schema": {"type": "string"},
    }
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "whatsapp-call service API",
            "version": "1",
            "description": "Place WhatsApp calls that an AI voice agent holds, and follow them. "
            "Every route needs Authorization: Bearer <serviceToken>.",
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/calls": {
                "post": {
                    "operationId": "placeCall",
                    "summary": "Place a call (permission is checked and requested as needed).",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "description": "A retry with the same key returns the same call.",
                            "schema": {"type": "string"},
                        }
                    ],
                    "requestBody": {"required": True, "content": ref("CallCreate")},
                    "responses": {
                        "202": {"description": "The call record", "content": ref("CallRecord")},
                        "401": unauthorized,
                        "409": error("A call to this number is in progress"),
                        "422": error("Invalid body or number"),
                        "503": error("At capacity (maxConcurrentCalls) or shutting down"),
                    },
                },
                "get": {
                    "operationId": "listCalls",
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
                        "200": {"description": "Calls", "content": ref("CallList")},
                        "401": unauthorized,
                        "422": error("Bad query"),
                    },
                },
            },
            "/v1/calls/{call_id}": {
                "get": {
                    "operationId": "getCall",
                    "summary": "One call's full record with transcript.",
                    "parameters": [call_id],
                    "responses": {
                        "200": {"description": "The call record", "content": ref("CallRecord")},
                        "401": unauthorized,
                        "404": error("No such call"),
                    },
                }
            },
            "/v1/calls/{call_id}/hangup": {
                "post": {
                    "operationId": "hangupCall",
                    "summary": "Hang up a call.",
                    "parameters": [call_id],
                    "responses": {
                        "200": {"description": "The ended call", "content": ref("CallRecord")},
                        "401": unauthorized,
                        "404": error("No such call"),
                    },
                }
            },
            "/v1/calls/{call_id}/events": {
                "get": {
                    "operationId": "callEvents",
                    "summary": "Live state changes and transcript lines (Server-Sent Events); "
                    "the first event is the current state, the stream ends after `ended`.",
                    "parameters": [call_id],
                    "responses": {
                        "200": {
                            "description": "An SSE stream",
                            "content": {
                                "text/event-stream": {
                                    "schema": {"$ref": "#/components/schemas/SseEvent"}
                                }
                            },
                        },
                        "401": unauthorized,
                        "404": error("No such call"),
                    },
                }
            },
            "/v1/permissions/{to}": {
                "get": {
                    "operationId": "checkPermission",
                    "summary": "Whether the user allows calls, and what can be done now.",
                    "parameters": [to],
                    "responses": {
                        "200": {"description": "Permission state", "content": ref("Permission")},
                        "401": unauthorized,
                        "422": error("Bad number"),
                        "502": error("Provider error"),
                    },
                }
            },
            "/v1/permissions/{to}/request": {
                "post": {
                    "operationId": "requestPermission",
                    "summary": "Send WhatsApp's call-permission request.",
                    "parameters": [to],
                    "responses": {
                        "202": {
                            "description": "Request outcome",
                            "content": ref("PermissionRequest"),
                        },
                        "401": unauthorized,
                        "422": error("Bad number"),
                        "502": error("Provider error"),
                    },
                }
            },
        },
    }
    for operations in document["paths"].values():  # the rate limit applies to every route
        for operation in operations.values():
            operation["responses"]["429"] = too_many
    return document


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}
