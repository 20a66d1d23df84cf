"""The `whatsapp_call` agent tool: one definition (name, description, JSON schema, handler)
that every adapter (the MCP server, OpenClaw through MCP) serves unchanged.

The handler never raises for anything an agent can cause: a bad number, a number outside
`allowedNumbers`, a rate limit, a busy line or an unknown call id all come back as a result
with `is_error` set and a sentence the agent can act on. Results are written for a language
model: what happened, the call id to use next, and the transcript when there is one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..calls.orchestrator import CallInProgressError, ServiceBusyError
from ..config import Settings
from ..errors import BadInputError, ConfigError, WhatsAppCallError
from ..phone import parse_phone
from ..redact import scrub
from .backends import ENDED, CallBackend

log = logging.getLogger("whatsapp_call.agent")

TOOL_NAME = "whatsapp_call"
DEFAULT_WAIT_SECONDS = 120
MAX_WAIT_SECONDS = 1800
SETTLE_SECONDS = 5.0  # after placing without `wait`: let the permission check finish
HOUR = 3600.0
MAX_TRANSCRIPT_CHARS = 12000

TOOL_DESCRIPTION = (
    "Phone a person on WhatsApp and let an AI voice agent hold the conversation for you, "
    "then read what was said.\n"
    "Actions:\n"
    "- call: call `to` (international form, e.g. +14085551234). Put the purpose of the call "
    "and what to find out in `instructions`; `greeting` is the first sentence spoken. With "
    "wait=true the result comes when the call has ended (outcome and transcript), at most "
    "`wait_seconds` later; otherwise it returns once the call is placed, with its call id.\n"
    "- status: the state, outcome and transcript of `call_id` (wait=true waits for the end).\n"
    "- hangup: end `call_id` now.\n"
    "If the person has not yet allowed calls from this business, WhatsApp first sends them a "
    "permission request; the call is placed automatically once they accept. Only numbers "
    "the owner allowed may be called, and calls per hour are limited."
)

TOOL_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "action": {
            "type": "string",
            "enum": ["call", "status", "hangup"],
            "description": "call: place a call; status: how a call went; hangup: end it.",
        },
        "to": {
            "type": "string",
            "description": "call: the number to call, with country code, e.g. +14085551234.",
        },
        "greeting": {
            "type": "string",
            "maxLength": 2000,
            "description": "call: the first sentence the AI says when the person picks up.",
        },
        "instructions": {
            "type": "string",
            "maxLength": 20000,
            "description": "call: who the AI speaks for, the purpose of the call, what to "
            "find out or agree, and when to end the call.",
        },
        "voice": {
            "type": "string",
            "maxLength": 64,
            "description": "call: voice of the AI (e.g. marin, cedar); default from config.",
        },
        "language": {
            "type": "string",
            "maxLength": 32,
            "description": "call: language to speak, e.g. en, de, pt-BR; default from config.",
        },
        "wait": {
            "type": "boolean",
            "description": "call/status: return only when the call has ended (at most "
            "wait_seconds). Default false.",
        },
        "wait_seconds": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_WAIT_SECONDS,
            "description": f"With wait: the longest wait, in seconds (default "
            f"{DEFAULT_WAIT_SECONDS}). The call goes on after it; ask with status.",
        },
        "call_id": {
            "type": "string",
            "maxLength": 100,
            "description": "status/hangup: the call id a call action returned.",
        },
    },
    "required": ["action"],
    "additionalProperties": False,
}


class ToolArguments(BaseModel):
    """The same contract as TOOL_PARAMETERS, enforced (MCP clients do not all validate)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    action: Literal["call", "status", "hangup"]
    to: str | None = None
    greeting: str | None = Field(None, max_length=2000)
    instructions: str | None = Field(None, max_length=20000)
    voice: str | None = Field(None, max_length=64)
    language: str | None = Field(None, max_length=32)
    wait: bool = False
    wait_seconds: int | None = Field(None, ge=1, le=MAX_WAIT_SECONDS)
    call_id: str | None = Field(None, max_length=100)


@dataclass
class ToolResult:
    """What the agent gets back: `text` for the model, `data` (a compact call record) for
    clients that read structured results. `is_error` marks refusals and failures."""

    text: str
    is_error: bool = False
    data: dict[str, Any] | None = None


@dataclass(frozen=True)
class ToolDefinition:
    """Name, description, JSON schema and async handler: all an adapter needs."""

    name: str
    description: str
    parameters: dict[str, Any]
    handler: Callable[[dict[str, Any]], Awaitable[ToolResult]]


# -- allowed numbers ----------------------------------------------------------------------------


class NumberPolicy:
    """`allowedNumbers`: E.164 numbers (any spelling parse_phone understands) or patterns
    where `*` stands for any digits ("+49*", "+1408555*"; "*" alone allows every number).
    Unset means the owner has not decided yet: the tool then calls nobody."""

    def __init__(self, entries: list[str] | None):
        self.configured = entries is not None
        self.entries = list(entries or [])
        self._exact: set[str] = set()
        self._patterns: list[re.Pattern[str]] = []
        for entry in self.entries:
            text = str(entry).strip()
            if "*" in text:
                compact = re.sub(r"[\s().-]", "", text)
                if compact.startswith("00"):
                    compact = "+" + compact[2:]
                if not re.fullmatch(r"\+?[0-9*]+", compact):
                    raise ConfigError(
                        f"allowedNumbers entry {text!r} is not a number pattern.",
                        'Use digits and * only, e.g. "+49*" or "+1408555*"; "*" allows any number.',
                    )
                if compact != "*" and not compact.startswith("+"):
                    compact = "+" + compact
                regex = "".join(r"\d*" if c == "*" else re.escape(c) for c in compact)
                self._patterns.append(re.compile(r"\+?" + regex if compact == "*" else regex))
            else:
                try:
                    self._exact.add(parse_phone(text).e164)
                except BadInputError as exc:
                    raise ConfigError(
                        f"allowedNumbers entry {text!r} is not a phone number: {exc.message}",
                        'Write it in international form, e.g. "+14085551234", or as a pattern '
                        'like "+49*".',
                    ) from None

    def allows(self, e164: str) -> bool:
        return e164 in self._exact or any(p.fullmatch(e164) for p in self._patterns)


# -- rate limits --------------------------------------------------------------------------------


class RateLimiter:
    """Sliding one-hour windows: at most `per_number` calls to one number and `total` calls
    in all, counting the calls this tool placed (in this process)."""

    def __init__(
        self,
        per_number: int,
        total: int,
        *,
        window: float = HOUR,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.per_number = per_number
        self.total = total
        self.window = window
        self.clock = clock
        self._all: deque[float] = deque()
        self._by_number: dict[str, deque[float]] = {}

    def _prune(self, now: float) -> None:
        cutoff = now - self.window
        while self._all and self._all[0] <= cutoff:
            self._all.popleft()
        for number in list(self._by_number):
            times = self._by_number[number]
            while times and times[0] <= cutoff:
                times.popleft()
            if not times:
                del self._by_number[number]

    def refusal(self, e164: str) -> str | None:
        """Why a call to `e164` may not be placed now, or None when it may."""
        now = self.clock()
        self._prune(now)
        mine = self._by_number.get(e164, deque())
        if len(mine) >= self.per_number:
            return (
                f"Refused: rate limit: {len(mine)} calls to {e164} in the last hour "
                f"(toolCallsPerNumberPerHour = {self.per_number}). The next call to this "
                f"number is possible in {_human(mine[0] + self.window - now)}."
            )
        if len(self._all) >= self.total:
            return (
                f"Refused: rate limit: {len(self._all)} calls in the last hour "
                f"(toolCallsPerHour = {self.total}). The next call is possible in "
                f"{_human(self._all[0] + self.window - now)}."
            )
        return None

    def record(self, e164: str) -> None:
        now = self.clock()
        self._all.append(now)
        self._by_number.setdefault(e164, deque()).append(now)


# -- the tool -----------------------------------------------------------------------------------


@dataclass
class WhatsAppCallTool:
    """The handler behind `whatsapp_call`, bound to a backend and the settings."""

    backend: CallBackend
    settings: Settings
    max_wait_seconds: float = MAX_WAIT_SECONDS
    settle_seconds: float = SETTLE_SECONDS
    clock: Callable[[], float] = time.monotonic
    policy: NumberPolicy = field(init=False)
    limiter: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.policy = NumberPolicy(self.settings.allowed_numbers)
        self.limiter = RateLimiter(
            self.settings.tool_calls_per_number_per_hour,
            self.settings.tool_calls_per_hour,
            clock=self.clock,
        )
        self._place_lock = asyncio.Lock()

    @property
    def definition(self) -> ToolDefinition:
        return ToolDefinition(TOOL_NAME, TOOL_DESCRIPTION, TOOL_PARAMETERS, self.run)

    async def run(self, arguments: dict[str, Any] | None) -> ToolResult:
        """Handle one tool call. Never raises for bad input or a refused call."""
        try:
            args = ToolArguments.model_validate(arguments or {})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}"
                for e in exc.errors()
            )
            return ToolResult(f"Bad input: {problems}.", is_error=True)
        try:
            if args.action == "call":
                return await self._call(args)
            if not args.call_id:
                return ToolResult(
                    f"Bad input: action {args.action} needs call_id (the id a call action "
                    "returned, e.g. call_…).",
                    is_error=True,
                )
            if args.action == "status":
                if args.wait:
                    record = await self.backend.wait(args.call_id, self._wait_seconds(args))
                else:
                    record = await self.backend.get(args.call_id)
                return self._result(record, waited=args.wait)
            record = await self.backend.hangup(args.call_id)
            return self._result(record)
        except BadInputError as exc:
            return ToolResult(_error_text("Bad input", exc), is_error=True)
        except CallInProgressError as exc:
            text = f"Busy: {scrub(exc.message)}"
            if exc.call_id:
                text += (
                    f" Ask for it with action status and call_id {exc.call_id}, or end it "
                    "with action hangup."
                )
            return ToolResult(text, is_error=True)
        except ServiceBusyError as exc:
            return ToolResult(_error_text("Busy", exc), is_error=True)
        except WhatsAppCallError as exc:
            return ToolResult(_error_text("Failed", exc), is_error=True)
        except Exception:  # a bug must reach the log, not the agent as a traceback
            log.exception("whatsapp_call tool failed on action %s", args.action)
            return ToolResult(
                "Failed: internal error in whatsapp-call (details are in its log). The call, "
                "if one was placed, may still go on: check with action status.",
                is_error=True,
            )

    def _wait_seconds(self, args: ToolArguments) -> float:
        return float(min(args.wait_seconds or DEFAULT_WAIT_SECONDS, self.max_wait_seconds))

    async def _call(self, args: ToolArguments) -> ToolResult:
        if not args.to:
            return ToolResult(
                "Bad input: action call needs `to`, the number to call with its country "
                "code, e.g. +14085551234.",
                is_error=True,
            )
        to = parse_phone(args.to).e164
        if not self.policy.configured:
            return ToolResult(
                f"Refused: no number may be called yet, because allowedNumbers is not set. "
                f"Ask the user to add {to} (or a pattern like +49*) to allowedNumbers in the "
                "whatsapp-call configuration.",
                is_error=True,
            )
        if not self.policy.allows(to):
            return ToolResult(
                f"Refused: {to} is not in allowedNumbers. Only numbers the user allowed may "
                "be called; ask the user to add it to allowedNumbers in the whatsapp-call "
                "configuration if this call is wanted.",
                is_error=True,
            )
        async with self._place_lock:  # check and count atomically
            refusal = self.limiter.refusal(to)
            if refusal:
                return ToolResult(refusal, is_error=True)
            record = await self.backend.place(
                to,
                greeting=args.greeting,
                instructions=args.instructions,
                voice=args.voice,
                language=args.language,
                metadata={"source": "agent_tool"},
            )
            self.limiter.record(to)
        call_id = record["id"]
        if args.wait:
            record = await self.backend.wait(
                call_id, self._wait_seconds(args), until=(ENDED, "permission_requested")
            )
            return self._result(record, waited=True)
        # Let the permission check finish, so the agent learns whether the person must first
        # allow calls; the call goes on either way.
        record = await self.backend.wait(
            call_id,
            self.settle_seconds,
            until=(ENDED, "permission_requested", "offering", "ringing", "in_progress"),
        )
        return self._result(record)

    def _result(self, record: dict[str, Any], *, waited: bool = False) -> ToolResult:
        # Outcomes such as "rejected" are answers, not tool errors; a failed call is one.
        failed = record.get("state") == ENDED and record.get("end_reason") == "failed"
        return ToolResult(describe_record(record, waited=waited), failed, compact_record(record))


# -- wording ------------------------------------------------------------------------------------

ROLE_NAMES = {"assistant": "AI", "user": "User"}


def _error_text(kind: str, exc: WhatsAppCallError) -> str:
    text = f"{kind}: {scrub(exc.message)}"
    if exc.hint:
        text += f" Fix: {scrub(exc.hint)}"
    return text


def _human(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def talk_seconds(record: dict[str, Any]) -> float | None:
    """From the person picking up (the `in_progress` state event) to the end."""
    answered = next(
        (
            _parse_time(e.get("at"))
            for e in record.get("events") or []
            if e.get("type") == "state" and (e.get("data") or {}).get("to") == "in_progress"
        ),
        None,
    )
    ended = _parse_time(record.get("ended_at"))
    if answered is None:
        return None
    if ended is None:
        ended = datetime.now(answered.tzinfo)
    return max(0.0, (ended - answered).total_seconds())


def transcript_text(record: dict[str, Any], limit: int = MAX_TRANSCRIPT_CHARS) -> str:
    """ "AI: … / User: …", the oldest lines dropped first when it is too long."""
    lines = [
        f"{ROLE_NAMES.get(line.get('role', ''), line.get('role', '?'))}: {line.get('text', '')}"
        for line in record.get("transcript") or []
        if (line.get("text") or "").strip()
    ]
    dropped = 0
    while lines and sum(len(x) + 3 for x in lines) > limit:
        lines.pop(0)
        dropped += 1
    text = " / ".join(lines)
    return (f"({dropped} earlier lines left out) " if dropped else "") + text


def describe_record(record: dict[str, Any], *, waited: bool = False) -> str:
    """One paragraph an agent can act on: what happened, and what to do next."""
    call_id = record.get("id", "?")
    to = record.get("to_e164", "?")
    state = record.get("state")
    detail = record.get("end_detail")
    transcript = transcript_text(record)
    ref = f"Call id {call_id} to {to}."
    if state == ENDED:
        reason = record.get("end_reason")
        talk = talk_seconds(record)
        if reason == "completed":
            text = "Completed" + (f", {_human(talk)}." if talk is not None else ".")
        elif reason == "rejected":
            text = "Rejected by the user."
        elif reason == "no_answer":
            text = "No answer" + (f": {detail}." if detail else ".")
        elif reason == "busy":
            text = "Busy: the user is on another call. Try again later."
        elif reason == "permission_denied":
            text = "Permission denied: the user has not allowed calls from this business" + (
                f" ({detail})." if detail else "."
            )
        elif reason == "permission_pending_expired":
            text = "The user did not accept the call-permission request in time" + (
                f" ({detail})." if detail else "."
            )
        elif reason == "cancelled":
            text = "Cancelled" + (f": {detail}." if detail else ".")
        else:
            text = "Failed" + (f": {detail}." if detail else ".")
        text += " " + ref
        if transcript:
            text += f" Transcript: {transcript}"
        elif reason == "completed":
            text += " Nothing was said."
        return scrub(text)
    if state == "permission_requested":
        text = (
            "Permission requested: the user must accept on WhatsApp; the call will be placed "
            f"automatically. {ref} Check later with action status."
        )
    elif state in ("created", "checking_permission"):
        text = f"Call placed: checking whether the user allows calls. {ref}"
    elif state == "offering":
        text = f"Calling: connecting the call. {ref}"
    elif state == "ringing":
        text = f"Ringing. {ref}"
    elif state == "in_progress":
        talk = talk_seconds(record)
        text = "In progress: the conversation is live" + (
            f" ({_human(talk)} so far). " if talk is not None else ". "
        )
        text += ref
        if transcript:
            text += f" Transcript so far: {transcript}"
    else:
        text = f"State {state}. {ref}"
    if state == "permission_requested":
        return scrub(text)
    if waited:
        text += " The wait time is over but the call goes on; ask again with action status."
    else:
        text += " Use action status with this call id to follow it."
    return scrub(text)


def compact_record(record: dict[str, Any]) -> dict[str, Any]:
    """The parts of the call record an agent needs (no event log, no metrics)."""
    return {
        "id": record.get("id"),
        "to": record.get("to_e164"),
        "state": record.get("state"),
        "end_reason": record.get("end_reason"),
        "end_detail": record.get("end_detail"),
        "duration_seconds": record.get("duration_seconds"),
        "talk_seconds": talk_seconds(record),
        "transcript": [
            {"role": line.get("role"), "text": line.get("text"), "at": line.get("at")}
            for line in record.get("transcript") or []
        ],
    }


def whatsapp_call_tool(backend: CallBackend, settings: Settings, **options: Any) -> ToolDefinition:
    """The tool definition bound to `backend` (LocalBackend or RemoteBackend)."""
    return WhatsAppCallTool(backend, settings, **options).definition
