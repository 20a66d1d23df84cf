"""The service API (`/v1`): what remote mode, the agent tool and MCP drive calls through."""

from .records import full_record, summary_line
from .routes import api_routes, openapi_document

__all__ = ["api_routes", "full_record", "openapi_document", "summary_line"]
