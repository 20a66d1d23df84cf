"""The simulated OpenAI Realtime server (GA WebSocket interface). See `server.py`."""

from .schema import SchemaError, validate_client_event, validate_server_event
from .server import (
    MODELS,
    VOICES,
    Faults,
    RealtimeSimulator,
    Reply,
    ResponseRequest,
    SimSession,
    default_responder,
)
from .speech import ASSISTANT_CLIPS, GREETING, UNINTELLIGIBLE, recognise, speech_for
from .vad import EnergyVad

__all__ = [
    "ASSISTANT_CLIPS",
    "GREETING",
    "MODELS",
    "UNINTELLIGIBLE",
    "VOICES",
    "EnergyVad",
    "Faults",
    "RealtimeSimulator",
    "Reply",
    "ResponseRequest",
    "SchemaError",
    "SimSession",
    "default_responder",
    "recognise",
    "speech_for",
    "validate_client_event",
    "validate_server_event",
]
