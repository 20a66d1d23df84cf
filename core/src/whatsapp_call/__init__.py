"""whatsapp-call: let an AI agent phone a person on WhatsApp and hold a live voice conversation.

Plugins implement the hooks in `whatsapp_call.hookspecs`, marked with `hookimpl`.
"""

from importlib.metadata import PackageNotFoundError, version

from pluggy import HookimplMarker

hookimpl = HookimplMarker("whatsapp_call")

try:
    __version__ = version("whatsapp-call")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = ["hookimpl", "__version__"]
