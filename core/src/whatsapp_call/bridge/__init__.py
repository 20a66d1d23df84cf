"""The audio bridge between a call's WebRTC audio (48 kHz Opus via aiortc) and a voice session."""

from .bridge import AudioBridge
from .playout import PlayoutTrack

__all__ = ["AudioBridge", "PlayoutTrack"]
