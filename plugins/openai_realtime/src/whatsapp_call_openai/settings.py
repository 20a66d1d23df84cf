"""The OpenAI plugin's own config keys (core already has openaiApiKey, openaiModel,
openaiRealtimeUrl, voice, voiceSpeed, voiceLanguage, voiceGreeting, voiceInstructions)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel


class OpenAISettings(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    openai_vad: Literal["server_vad", "semantic_vad"] = Field(
        "server_vad",
        description="Turn detection: server_vad (silence-based, predictable) or semantic_vad "
        "(waits for the caller to finish the thought; slower).",
    )
    openai_vad_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="server_vad sensitivity; raise to 0.6-0.7 on noisy lines."
    )
    openai_vad_silence_ms: int = Field(
        500, ge=100, le=5000, description="server_vad: silence that ends the caller's turn."
    )
    openai_vad_prefix_padding_ms: int = Field(
        300, ge=0, le=2000, description="server_vad: audio kept from before speech started."
    )
    openai_vad_eagerness: Literal["low", "medium", "high", "auto"] = Field(
        "auto", description="semantic_vad: how quickly the AI takes its turn."
    )
    openai_transcription_model: str | None = Field(
        "gpt-4o-mini-transcribe",
        description="Model that transcribes the caller (empty to turn transcripts off).",
    )
    openai_noise_reduction: Literal["near_field", "far_field", "off"] = Field(
        "near_field",
        description="Input noise reduction: near_field (phone at the ear), far_field (speaker), off.",
    )
    openai_reconnect_attempts: int = Field(
        5, ge=0, le=20, description="Reconnects tried when the Realtime socket drops mid-call."
    )
    openai_connect_timeout_seconds: float = Field(
        10.0, gt=0, le=120, description="Time allowed to connect and configure a session."
    )
    openai_tool_timeout_seconds: float = Field(
        20.0, gt=0, le=600, description="Time a function the AI calls may take."
    )

    @field_validator("openai_transcription_model")
    @classmethod
    def _blank_is_off(cls, value: str | None) -> str | None:
        return value.strip() or None if isinstance(value, str) else value
