"""The `whatsapp_call` agent tool: argument checks, allowedNumbers, the rate limits, the
wording of results, and both backends' waiting (LocalBackend over a real CallService and
SQLite store, with a scripted provider plugin; RemoteBackend is covered in test_mcp.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from whatsapp_call import hookimpl
from whatsapp_call.agent import TOOL_NAME, TOOL_PARAMETERS, LocalBackend, WhatsAppCallTool
from whatsapp_call.agent.tool import (
    NumberPolicy,
    RateLimiter,
    ToolArguments,
    describe_record,
    whatsapp_call_tool,
)
from whatsapp_call.calls.orchestrator import CallInProgressError, CallService, ServiceBusyError
from whatsapp_call.errors import BadInputError, ConfigError
from whatsapp_call.models import (
    CallEvent,
    CallEventType,
    PermissionRequestOutcome,
    PermissionRequestResult,
    PermissionState,
    PermissionStatus,
)
from whatsapp_call.store import open_store

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


def _record(state: str, **extra: Any) -> dict[str, Any]:
    record = {
        "id": "call_abc",
        "to_e164": "+14085551234",
        "state": state,
        "end_reason": None,
        "end_detail": None,
        "duration_seconds": None,
        "created_at": T0.isoformat(),
        "ended_at": None,
        "events": [],
        "transcript": [],
        "metrics": {},
    }
    record.update(extra)
    return record


def _completed() -> dict[str, Any]:
    answered = T0 + timedelta(seconds=8)
    return _record(
        "ended",
        end_reason="completed",
        end_detail="the call ended",
        duration_seconds=138.0,
        ended_at=(answered + timedelta(seconds=130)).isoformat(),
        events=[
            {"type": "state", "at": T0.isoformat(), "data": {"from": None, "to": "created"}},
            {
                "type": "state",
                "at": answered.isoformat(),
                "data": {"from": "ringing", "to": "in_progress"},
            },
        ],
        transcript=[
            {"at": answered.isoformat(), "role": "assistant", "text": "Hi, this is Ada."},
            {"at": answered.isoformat(), "role": "user", "text": "Tuesday works."},
        ],
    )


class FakeBackend:
    """Scripted backend: `place` returns `placed`; `wait`/`get` return the next scripted
    record. Records every call so tests can check what the tool asked for."""

    def __init__(self, *records: dict[str, Any], place_error: Exception | None = None):
        self.records = list(records)
        self.place_error = place_error
        self.calls: list[tuple[str, Any]] = []

    def _next(self) -> dict[str, Any]:
        return self.records.pop(0) if len(self.records) > 1 else self.records[0]

    async def place(self, to: str, **fields: Any) -> dict[str, Any]:
        self.calls.append(("place", {"to": to, **fields}))
        if self.place_error is not None:
            raise self.place_error
        return _record("created", to_e164=to)

    async def get(self, call_id: str) -> dict[str, Any]:
        self.calls.append(("get", call_id))
        if call_id != "call_abc":
            raise BadInputError(f"There is no call {call_id!r}.", "Use the id call returned.")
        return self._next()

    async def wait(self, call_id: str, timeout: float, *, until=("ended",)) -> dict[str, Any]:
        self.calls.append(("wait", {"call_id": call_id, "timeout": timeout, "until": until}))
        return self._next()

    async def hangup(self, call_id: str) -> dict[str, Any]:
        self.calls.append(("hangup", call_id))
        return self._next()


def _tool(make_settings, backend, **options):
    options.setdefault("allowedNumbers", ["+14085551234", "+49*"])
    return WhatsAppCallTool(backend, make_settings(**options))


# -- definition and arguments -------------------------------------------------------------------


def test_definition_is_one_schema_for_every_adapter(make_settings):
    tool = whatsapp_call_tool(FakeBackend(_completed()), make_settings())
    assert tool.name == TOOL_NAME == "whatsapp_call"
    assert tool.parameters is TOOL_PARAMETERS
    assert tool.parameters["required"] == ["action"]
    assert set(tool.parameters["properties"]) == set(ToolArguments.model_fields)
    assert tool.parameters["properties"]["action"]["enum"] == ["call", "status", "hangup"]
    assert "permission" in tool.description


@pytest.mark.parametrize(
    "arguments, expected",
    [
        ({}, "action"),
        ({"action": "dial"}, "action"),
        ({"action": "call", "to": "+14085551234", "colour": "red"}, "colour"),
        ({"action": "call"}, "needs `to`"),
        ({"action": "status"}, "needs call_id"),
        ({"action": "call", "to": "+14085551234", "wait_seconds": 0}, "wait_seconds"),
        ({"action": "call", "to": "12"}, "Bad input"),
        ({"action": "call", "to": "not a number"}, "international form"),
    ],
)
async def test_bad_input_is_a_clear_tool_error(make_settings, arguments, expected):
    backend = FakeBackend(_completed())
    result = await _tool(make_settings, backend).run(arguments)
    assert result.is_error
    assert expected in result.text
    assert "Traceback" not in result.text
    assert not [c for c in backend.calls if c[0] == "place"]


# -- allowed numbers ----------------------------------------------------------------------------


def test_number_policy_exact_and_patterns():
    policy = NumberPolicy(["+1 (408) 555-1234", "0049 30*", "+44*"])
    assert policy.allows("+14085551234")
    assert not policy.allows("+14085551235")
    assert policy.allows("+493012345678")
    assert not policy.allows("+498912345678")
    assert policy.allows("+442071234567")
    assert NumberPolicy(["*"]).allows("+819012345678")
    assert not NumberPolicy([]).allows("+14085551234")
    with pytest.raises(ConfigError, match="not a number pattern"):
        NumberPolicy(["+49-abc*"])
    with pytest.raises(ConfigError, match="not a phone number"):
        NumberPolicy(["12345"])


async def test_numbers_outside_allowed_numbers_are_refused(make_settings):
    backend = FakeBackend(_completed())
    tool = _tool(make_settings, backend)
    result = await tool.run({"action": "call", "to": "+33 6 12 34 56 78"})
    assert result.is_error
    assert result.text.startswith("Refused: +33612345678 is not in allowedNumbers.")
    result = await tool.run({"action": "call", "to": "+49 30 1234567"})
    assert not result.is_error
    assert backend.calls[0] == (
        "place",
        {
            "to": "+49301234567",
            "greeting": None,
            "instructions": None,
            "voice": None,
            "language": None,
            "metadata": {"source": "agent_tool"},
        },
    )


async def test_unset_allowed_numbers_calls_nobody(make_settings):
    backend = FakeBackend(_completed())
    tool = WhatsAppCallTool(backend, make_settings())
    result = await tool.run({"action": "call", "to": "+14085551234"})
    assert result.is_error
    assert "allowedNumbers is not set" in result.text
    assert backend.calls == []


# -- rate limits --------------------------------------------------------------------------------


def test_rate_limiter_slides_over_the_hour():
    now = [1000.0]
    limiter = RateLimiter(per_number=2, total=3, clock=lambda: now[0])
    for _ in range(2):
        assert limiter.refusal("+14085551234") is None
        limiter.record("+14085551234")
        now[0] += 60
    refusal = limiter.refusal("+14085551234")
    assert "toolCallsPerNumberPerHour = 2" in refusal
    assert "58 min" in refusal  # the first call leaves the window 58 min from now
    assert limiter.refusal("+493012345678") is None
    limiter.record("+493012345678")
    assert "toolCallsPerHour = 3" in limiter.refusal("+442071234567")
    now[0] = 1000.0 + 3600.5  # the first call has left the window
    assert limiter.refusal("+14085551234") is None
    assert limiter.refusal("+442071234567") is None


async def test_tool_counts_only_calls_it_placed(make_settings):
    backend = FakeBackend(_record("permission_requested"))
    tool = _tool(make_settings, backend, toolCallsPerNumberPerHour=1, toolCallsPerHour=5)
    busy = FakeBackend(_completed(), place_error=ServiceBusyError("Full.", "Retry later."))
    tool_busy = _tool(make_settings, busy, toolCallsPerNumberPerHour=1)
    assert (await tool_busy.run({"action": "call", "to": "+14085551234"})).is_error
    assert tool_busy.limiter.refusal("+14085551234") is None  # a refused placement is not counted
    first = await tool.run({"action": "call", "to": "+14085551234"})
    assert not first.is_error
    second = await tool.run({"action": "call", "to": "+14085551234"})
    assert second.is_error and "rate limit" in second.text
    assert [c[0] for c in backend.calls].count("place") == 1


# -- results --------------------------------------------------------------------------------------


async def test_call_with_wait_reports_outcome_and_transcript(make_settings):
    backend = FakeBackend(_completed())
    result = await _tool(make_settings, backend).run(
        {
            "action": "call",
            "to": "+14085551234",
            "instructions": "Book a table for two on Tuesday.",
            "wait": True,
            "wait_seconds": 90,
        }
    )
    assert not result.is_error
    assert result.text.startswith("Completed, 2 min 10 s.")
    assert "Transcript: AI: Hi, this is Ada. / User: Tuesday works." in result.text
    assert result.data["talk_seconds"] == 130.0
    assert result.data["transcript"][1] == {
        "role": "user",
        "text": "Tuesday works.",
        "at": (T0 + timedelta(seconds=8)).isoformat(),
    }
    wait = next(c[1] for c in backend.calls if c[0] == "wait")
    assert wait["timeout"] == 90 and set(wait["until"]) == {"ended", "permission_requested"}


async def test_wait_is_bounded_by_the_tools_maximum(make_settings):
    backend = FakeBackend(_record("ringing"))
    tool = WhatsAppCallTool(backend, make_settings(allowedNumbers=["*"]), max_wait_seconds=30)
    result = await tool.run(
        {"action": "call", "to": "+14085551234", "wait": True, "wait_seconds": 1800}
    )
    assert next(c[1] for c in backend.calls if c[0] == "wait")["timeout"] == 30
    assert result.text.startswith("Ringing. Call id call_abc")
    assert "wait time is over" in result.text


async def test_call_without_wait_reports_permission_request(make_settings):
    backend = FakeBackend(_record("permission_requested"))
    result = await _tool(make_settings, backend).run({"action": "call", "to": "+14085551234"})
    assert not result.is_error
    assert result.text == (
        "Permission requested: the user must accept on WhatsApp; the call will be placed "
        "automatically. Call id call_abc to +14085551234. Check later with action status."
    )


@pytest.mark.parametrize(
    "record, text, is_error",
    [
        (_record("ended", end_reason="rejected"), "Rejected by the user.", False),
        (
            _record("ended", end_reason="no_answer", end_detail="nobody answered within 60 s"),
            "No answer: nobody answered within 60 s.",
            False,
        ),
        (
            _record("ended", end_reason="failed", end_detail="media failed: ICE"),
            "Failed: media failed: ICE.",
            True,
        ),
        (
            _record("ended", end_reason="permission_denied", end_detail="declined"),
            "Permission denied: the user has not allowed calls from this business (declined).",
            False,
        ),
        (_record("ended", end_reason="busy"), "Busy: the user is on another call.", False),
        (_record("checking_permission"), "Call placed: checking whether the user", False),
    ],
)
async def test_status_words(make_settings, record, text, is_error):
    result = await _tool(make_settings, FakeBackend(record)).run(
        {"action": "status", "call_id": "call_abc"}
    )
    assert result.text.startswith(text)
    assert "Call id call_abc to +14085551234." in result.text
    assert result.is_error is is_error


async def test_status_of_unknown_call_and_hangup(make_settings):
    backend = FakeBackend(_record("ended", end_reason="cancelled", end_detail="hung up on request"))
    tool = _tool(make_settings, backend)
    unknown = await tool.run({"action": "status", "call_id": "call_nope"})
    assert unknown.is_error and unknown.text.startswith("Bad input: There is no call 'call_nope'.")
    hung = await tool.run({"action": "hangup", "call_id": "call_abc"})
    assert hung.text.startswith("Cancelled: hung up on request.")
    assert ("hangup", "call_abc") in backend.calls


async def test_busy_number_names_the_call_in_progress(make_settings):
    error = CallInProgressError("A call to +14085551234 is in progress.", "call_old", "Wait.")
    result = await _tool(make_settings, FakeBackend(_completed(), place_error=error)).run(
        {"action": "call", "to": "+14085551234"}
    )
    assert result.is_error
    assert "call_id call_old" in result.text


def test_long_transcripts_keep_the_latest_lines():
    record = _completed()
    record["transcript"] = [
        {"role": "user", "text": f"line {i} " + "x" * 100, "at": T0.isoformat()} for i in range(300)
    ]
    text = describe_record(record)
    assert "line 299" in text and "line 0 " not in text
    assert "earlier lines left out" in text
    assert len(text) < 13000


# -- LocalBackend over a real CallService ---------------------------------------------------------


class AskingProvider:
    """A provider where the callee has not allowed calls yet: a request is sent."""

    @hookimpl
    async def check_permission(self, call, settings):
        return PermissionState(status=PermissionStatus.NOT_GRANTED, can_request=True)

    @hookimpl
    async def request_permission(self, call, settings):
        return PermissionRequestResult(PermissionRequestOutcome.SENT, message_id="wamid.1")


@pytest.fixture
async def service(make_settings, register_plugin, tmp_path):
    register_plugin(AskingProvider(), name="asking-provider")
    settings = make_settings(
        provider="meta",
        metaPhoneNumberId="106540352242922",
        metaAccessToken="EAAG-test-token",
        openaiApiKey="sk-test-key",
        stateDir=str(tmp_path / "state"),
        allowedNumbers=["+14085551234"],
    )
    store = open_store(settings)
    await store.open()
    service = CallService(settings, store)
    try:
        yield service
    finally:
        await service.shutdown(timeout=5)
        await store.close()


async def test_local_backend_permission_request_then_hangup(service):
    tool = WhatsAppCallTool(LocalBackend(service), service.settings)
    async with asyncio.timeout(10):
        placed = await tool.run({"action": "call", "to": "+1 408 555 1234"})
        assert placed.text.startswith("Permission requested: the user must accept on WhatsApp")
        call_id = placed.data["id"]
        status = await tool.run({"action": "status", "call_id": call_id})
        assert status.data["state"] == "permission_requested"
        hung = await tool.run({"action": "hangup", "call_id": call_id})
    assert hung.data["state"] == "ended"
    assert hung.data["end_reason"] == "cancelled"
    assert hung.text.startswith("Cancelled: cancelled (hangup) while waiting for permission.")


async def test_local_backend_wait_sees_the_user_decline(service):
    backend = LocalBackend(service)
    tool = WhatsAppCallTool(backend, service.settings)
    async with asyncio.timeout(10):
        placed = await tool.run({"action": "call", "to": "+14085551234"})
        call_id = placed.data["id"]
        waiting = asyncio.create_task(
            tool.run({"action": "status", "call_id": call_id, "wait": True, "wait_seconds": 8})
        )
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await service.handle_events(
            [
                CallEvent(
                    type=CallEventType.PERMISSION_REPLY,
                    provider="meta",
                    dedupe_key="reply-1",
                    wa_id="14085551234",
                    permission_granted=False,
                )
            ]
        )
        result = await waiting
    assert result.data["end_reason"] == "permission_denied"
    assert result.text.startswith("Permission denied: the user has not allowed calls")


async def test_local_backend_wait_times_out_without_raising(service):
    backend = LocalBackend(service)
    placed = await backend.place("+14085551234")
    async with asyncio.timeout(5):
        record = await backend.wait(placed["id"], 0.2)
    assert record["state"] == "permission_requested"
    with pytest.raises(BadInputError, match="no call"):
        await backend.wait("call_missing", 0.1)


async def test_an_unexpected_error_is_not_a_traceback(make_settings, caplog):
    class Broken(FakeBackend):
        async def get(self, call_id):
            raise KeyError("state")

    result = await _tool(make_settings, Broken(_completed())).run(
        {"action": "status", "call_id": "call_abc"}
    )
    assert result.is_error
    assert result.text.startswith("Failed: internal error in whatsapp-call")
    assert "KeyError" in caplog.text  # logged for the operator
