"""The service API (`/v1`): what remote mode, the agent tool and MCP drive calls through.

`records` is plain Python (the CLI uses it in remote mode too); `routes` needs starlette,
which only the `server` extra installs, so it is imported on first use, never here: a
client-only install (`pip install whatsapp-call`) must be able to import this package.
"""

from typing import Any

from .records import full_record, summary_line

__all__ = ["api_routes", "full_record", "openapi_document", "summary_line"]


def __getattr__(name: str) -> Any:
    if name in ("api_routes", "openapi_document"):
        from . import routes

        return getattr(routes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
