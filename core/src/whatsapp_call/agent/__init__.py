"""The `whatsapp_call` agent tool and the adapters that serve it (MCP over stdio and HTTP;
OpenClaw through its MCP server registry), plus the interactive setup.

One tool definition (`tool.py`) over one small backend interface (`backends.py`): calls run
in this process (`LocalBackend`) or at a remote service (`RemoteBackend`).
"""

from .backends import CallBackend, LocalBackend, RemoteBackend
from .tool import (
    TOOL_DESCRIPTION,
    TOOL_NAME,
    TOOL_PARAMETERS,
    ToolDefinition,
    ToolResult,
    WhatsAppCallTool,
    describe_record,
    whatsapp_call_tool,
)

__all__ = [
    "TOOL_DESCRIPTION",
    "TOOL_NAME",
    "TOOL_PARAMETERS",
    "CallBackend",
    "LocalBackend",
    "RemoteBackend",
    "ToolDefinition",
    "ToolResult",
    "WhatsAppCallTool",
    "describe_record",
    "whatsapp_call_tool",
]
