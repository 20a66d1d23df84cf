"""The call record as users see it: one JSON object with the call, its history, transcript
and metrics. The CLI's `--json`, `calls ID`, the service API and the agent tool all use it."""

from __future__ import annotations

from typing import Any

from ..store.base import CallRecord, CallStore


async def full_record(store: CallStore, record: CallRecord) -> dict[str, Any]:
    out = record.to_dict()
    out["duration_seconds"] = record.duration_seconds
    out["events"] = [e.to_dict() for e in await store.get_events(record.id)]
    out["transcript"] = [
        {"at": line.at.isoformat(), "role": line.role, "text": line.text}
        for line in await store.get_transcript(record.id)
    ]
    return out


def summary_line(record: dict[str, Any]) -> str:
    """One line a person (or an agent) can act on."""
    state = record["state"]
    if state != "ended":
        return f"{record['id']} to {record['to_e164']}: {state.replace('_', ' ')}"
    reason = record.get("end_reason") or "ended"
    text = f"{record['id']} to {record['to_e164']}: {reason.replace('_', ' ')}"
    duration = record.get("duration_seconds")
    if duration is not None:
        text += f" after {format_duration(duration)}"
    if record.get("end_detail"):
        text += f" ({record['end_detail']})"
    return text


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    return f"{seconds // 60} min {seconds % 60} s"
