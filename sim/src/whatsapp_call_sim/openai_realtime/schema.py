"""Validation of Realtime events against the `openai` SDK's own generated models.

Used by the tests (and available to anyone extending the simulator) so that neither the
simulator nor our client can drift from the real API. Needs the `openai` package, which is a
development dependency, so it is imported lazily.

The SDK models accept unknown keys; `strict` makes unknown keys anywhere in the event an
error, except the read-only session fields the server adds (`id`, `object`, `expires_at`),
which the SDK's session *request* model, used for `session.created`, does not list.
"""

from __future__ import annotations

import typing
from functools import lru_cache
from typing import Any

SERVER_SESSION_EXTRAS = {"id", "object", "expires_at"}


class SchemaError(ValueError):
    """An event the real API would not send or accept."""


def _by_type(union: Any) -> dict[str, type]:
    members = typing.get_args(typing.get_args(union)[0])  # strip Annotated, then Union
    return {
        literal: cls
        for cls in members
        for literal in typing.get_args(cls.model_fields["type"].annotation)
    }


@lru_cache(maxsize=1)
def _unions() -> tuple[dict[str, type], dict[str, type]]:
    try:
        from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("schema validation needs the openai package: pip install openai") from exc
    return _by_type(RealtimeServerEvent), _by_type(RealtimeClientEvent)


def _extras(model: Any, path: str, out: list[str]) -> None:
    from pydantic import BaseModel

    if isinstance(model, BaseModel):
        for key in model.model_extra or {}:
            if not (path.endswith(".session") and key in SERVER_SESSION_EXTRAS):
                out.append(f"{path}.{key}")
        for name in type(model).model_fields:
            _extras(getattr(model, name), f"{path}.{name}", out)
    elif isinstance(model, list | tuple):
        for i, item in enumerate(model):
            _extras(item, f"{path}[{i}]", out)


def _validate(table: dict[str, type], event: dict[str, Any], side: str, strict: bool) -> Any:
    kind = event.get("type")
    cls = table.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise SchemaError(f"{side} event type {kind!r} does not exist in the GA Realtime API")
    try:
        model = cls.model_validate(event)
    except Exception as exc:
        raise SchemaError(f"invalid {side} event {kind}: {exc}") from exc
    if strict:
        unknown: list[str] = []
        _extras(model, "event", unknown)
        if unknown:
            raise SchemaError(f"{side} event {kind} has fields the SDK does not know: {unknown}")
    return model


def validate_server_event(event: dict[str, Any], *, strict: bool = True) -> Any:
    """The SDK model of a server event; raises `SchemaError` if the API would not send it."""
    return _validate(_unions()[0], event, "server", strict)


def validate_client_event(event: dict[str, Any], *, strict: bool = True) -> Any:
    """The SDK model of a client event; raises `SchemaError` if the API would refuse it."""
    return _validate(_unions()[1], event, "client", strict)


def server_event_types() -> set[str]:
    return set(_unions()[0])


def client_event_types() -> set[str]:
    return set(_unions()[1])
