"""Hostile and unlucky webhooks against the running service while calls are live: bad or
missing signatures, replays, duplicates, out-of-order and unknown-call events, events after
the call ended, malformed JSON, a wrong content type, a 10 MB body, a slow-loris body, and a
burst of 1,000 webhooks within about a second. The live calls must complete as usual, every
state is entered once, and no event is lost (counted in the store).
"""

from __future__ import annotations

import asyncio
import re
import time
from urllib.parse import urlsplit

import httpx
import pytest
import whatsapp_call_meta
import whatsapp_call_openai
from reliability_support import (
    WA_ID,
    assert_consistent,
    event_types,
    meta_signature,
    meta_status_body,
    running,
    states_of,
    wait_until,
)
from whatsapp_call.calls.orchestrator import CallRequest
from whatsapp_call_sim.whatsapp import Scenario

pytestmark = pytest.mark.slow
pytest_plugins = ["reliability_plugin"]

FLOOD = 1000
FLOOD_CONNECTIONS = 50  # the burst is bounded: at most this many sockets at once


@pytest.fixture
def providers(register_plugin):
    for plugin in (whatsapp_call_meta, whatsapp_call_openai):
        register_plugin(plugin)


def webhook_handler(runtime):
    """The service's webhook handler (to shorten its slow-loris timeout for this test)."""
    return runtime.server._server.config.app.state.webhooks


async def slow_loris(url: str, seconds: float) -> int:
    """POST a body that trickles in one byte every 0.2 s; returns the HTTP status."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n".encode()
        )
        await writer.drain()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                writer.write(b" ")
                await writer.drain()
            except ConnectionError:
                break
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 0.2)
                return int(head.split()[1])
            except TimeoutError:
                continue
        head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
        return int(head.split()[1])
    finally:
        writer.close()


async def post_huge(url: str, body: bytes, signature: str) -> int:
    """POST a body far over the limit: headers, then the start of the body. Returns the
    status the server answers with."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"X-Hub-Signature-256: {signature}\r\n\r\n".encode()
        )
        # The first 64 KB: a server that reads on would wait for the rest; one that
        # refuses on Content-Length answers now (sending all 10 MB into a closed socket
        # would only make the kernel reset the connection before the answer is read).
        writer.write(body[: 64 * 1024])
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
        return int(head.split()[1])
    finally:
        writer.close()


async def test_hostile_webhooks_during_a_live_call_change_nothing(
    providers, make_settings, tmp_path, reliability
):
    async with running("meta", make_settings, tmp_path, Scenario(hangup_after_s=6)) as (
        sims,
        runtime,
    ):
        url = sims.urls["webhook"]
        secret = sims.options["metaAppSecret"]
        webhook_handler(runtime).body_read_timeout = 1.0
        record = await runtime.service.place_call(CallRequest(to="+" + WA_ID))

        async def answered() -> bool:
            return (await runtime.store.get_call(record.id)).state.value == "in_progress"

        await wait_until(answered, 15, "the call to be answered")
        provider_id = (await runtime.store.get_call(record.id)).provider_call_id
        connect = next(d for d in sims.whatsapp.deliveries if d.kind == "calls.connect")

        def signed(body: bytes, **headers: str) -> dict:
            return {
                "content": body,
                "headers": {
                    "Content-Type": "application/json",
                    "X-Hub-Signature-256": meta_signature(body, secret),
                    **headers,
                },
            }

        ringing = meta_status_body(provider_id, "RINGING", call_id=record.id)
        late_reject = meta_status_body(provider_id, "REJECTED", call_id=record.id)
        unknown = meta_status_body("wacid.UNKNOWN", "ACCEPTED", call_id=None)
        huge = (
            b'{"object":"whatsapp_business_account","entry":[' + b" " * (10 * 1024 * 1024) + b"]}"
        )
        battery = {
            "missing_signature": (
                {"content": ringing, "headers": {"Content-Type": "application/json"}},
                {403},
            ),
            "bad_signature": (
                signed(ringing) | {"headers": {"X-Hub-Signature-256": "sha256=" + "0" * 64}},
                {403},
            ),
            "replayed_connect": (signed(connect.body), {200}),
            "duplicate_status": (signed(ringing), {200}),
            "out_of_order_reject": (signed(late_reject), {200}),
            "unknown_call": (signed(unknown), {200}),
            "malformed_json": (
                signed(b'{"object": "whatsapp_business_account", "entry": [}'),
                {400},
            ),
            "wrong_content_type": (
                signed(ringing, **{"Content-Type": "text/plain"}),
                {200, 400, 415},
            ),
        }
        answers = {}
        async with httpx.AsyncClient(timeout=10) as client:
            for name, (request, expected) in battery.items():
                reliability.fault(f"webhook.{name}")
                response = await client.post(url, **request)
                answers[name] = (response.status_code, expected)
        reliability.fault("webhook.ten_megabytes")
        too_large = await post_huge(url, huge, meta_signature(huge, secret))
        reliability.fault("webhook.slow_loris")
        loris = await slow_loris(url, seconds=5)
        async with httpx.AsyncClient(timeout=5) as client:
            health = (await client.get(sims.urls["service"] + "/healthz")).status_code
        ended = await runtime.service.wait(record.id, timeout=30)
        # After the end: replays of the terminate and of ACCEPTED are answered 200 (so the
        # provider stops retrying) and change nothing.
        await sims.whatsapp.drain_webhooks(10)
        await asyncio.sleep(0.3)
        before = len(await runtime.store.get_events(record.id))
        terminate = next(d for d in sims.whatsapp.deliveries if d.kind == "calls.terminate")
        accepted = next(d for d in sims.whatsapp.deliveries if d.kind == "statuses.ACCEPTED")
        reliability.fault("webhook.after_end")
        async with httpx.AsyncClient(timeout=10) as client:
            after = [
                (await client.post(url, **signed(terminate.body))).status_code,
                (await client.post(url, **signed(accepted.body))).status_code,
            ]
        await asyncio.sleep(0.5)
        unchanged = len(await runtime.store.get_events(record.id)) == before
        final = await runtime.store.get_call(record.id)
        states = await states_of(runtime, record.id)
        types = await event_types(runtime, record.id)
        sim_call = sims.whatsapp.calls[provider_id]
        async with httpx.AsyncClient(timeout=5) as client:
            metrics = (await client.get(sims.urls["service"] + "/metrics")).text

    for name, (status, expected) in answers.items():
        assert status in expected, (name, status, expected)
    assert loris == 408
    assert too_large == 413
    assert health == 200
    assert_consistent(ended, states)
    assert ended.end_reason == "completed", ended.end_detail
    assert sim_call.terminated_by == "user"  # the user hung up; nothing cut the call short
    assert "ignored_event" in types  # the out-of-order REJECTED after ACCEPTED
    assert after == [200, 200] and unchanged
    assert (final.end_reason, final.end_detail) == (ended.end_reason, ended.end_detail)
    assert "terminated_unknown_provider_call" not in types
    assert not re.search(r'status="5\d\d"', metrics)
    for name in [*battery, "ten_megabytes", "slow_loris", "after_end"]:
        reliability.survived(f"webhook.{name}")


async def _count(runtime, call_id: str, kind: str, at_least: int) -> bool:
    return (await event_types(runtime, call_id)).count(kind) >= at_least


async def flooded_recorded(runtime, call_id: str) -> int:
    """Late webhooks recorded from the flood (REJECTED statuses). The simulator's own terminate
    for the rejected call may also land after the call ended: that one is not counted."""
    events = await runtime.store.get_events(call_id)
    return sum(1 for e in events if e.type == "late_webhook" and e.data.get("event") == "rejected")


async def flood(url: str, bodies: list[bytes], secret: str) -> tuple[list[int], float, float]:
    """Offer every body (signed) at once: HTTP/1.1-pipelined over at most FLOOD_CONNECTIONS
    sockets, all requests written before any answer is read. Returns the statuses, the
    seconds until every request was written, and the seconds until every one was answered."""
    parts = urlsplit(url)
    requests = [
        (
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"X-Hub-Signature-256: {meta_signature(body, secret)}\r\n\r\n"
        ).encode()
        + body
        for body in bodies
    ]
    statuses: list[int] = []
    written: list[float] = []
    started = time.monotonic()

    async def worker(mine: list[bytes]) -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            writer.write(b"".join(mine))
            await writer.drain()
            written.append(time.monotonic() - started)
            for _ in mine:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length:\s*(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                statuses.append(int(head.split()[1]))
        finally:
            writer.close()

    async with asyncio.timeout(60):
        await asyncio.gather(
            *(worker(requests[i::FLOOD_CONNECTIONS]) for i in range(FLOOD_CONNECTIONS))
        )
    return statuses, max(written), time.monotonic() - started


async def test_a_burst_of_1000_webhooks_while_calls_are_live_loses_nothing(
    providers, make_settings, tmp_path, reliability
):
    """1,000 distinct, validly signed events for an ended call arrive in a burst while three
    calls are live: every one is recorded exactly once, and the live calls complete."""
    reliability.fault("webhook.flood")
    live_numbers = ["+14155550131", "+14155550132", "+14155550133"]
    async with running("meta", make_settings, tmp_path, Scenario(hangup_after_s=6)) as (
        sims,
        runtime,
    ):
        sims.whatsapp.set_scenario("14155550130", Scenario(answer="reject"))
        target = await runtime.service.place_call(CallRequest(to="+14155550130"))
        target = await runtime.service.wait(target.id, timeout=20)
        live = [await runtime.service.place_call(CallRequest(to=n)) for n in live_numbers]

        async def all_answered() -> bool:
            calls = [await runtime.store.get_call(c.id) for c in live]
            return all(c.state.value == "in_progress" for c in calls)

        await wait_until(all_answered, 20, "three live calls")
        bodies = [
            meta_status_body(f"wacid.flood{i:04d}", "REJECTED", call_id=target.id)
            for i in range(FLOOD)
        ]
        statuses, offered, seconds = await flood(
            sims.urls["webhook"], bodies, sims.options["metaAppSecret"]
        )
        ended = [await runtime.service.wait(c.id, timeout=40) for c in live]
        await wait_until(
            lambda: _count(runtime, target.id, "late_webhook", FLOOD), 20, "every flooded event"
        )
        recorded = await flooded_recorded(runtime, target.id)
        live_states = [await states_of(runtime, c.id) for c in live]
        # A second identical burst is all duplicates: nothing more is recorded.
        again, _, _ = await flood(sims.urls["webhook"], bodies[:100], sims.options["metaAppSecret"])
        await asyncio.sleep(0.5)
        recorded_after = await flooded_recorded(runtime, target.id)
        rung = {
            n: [c for c in sims.whatsapp.calls.values() if c.wa_id == n[1:]] for n in live_numbers
        }

    assert statuses.count(200) == FLOOD, sorted(set(statuses))
    assert recorded == FLOOD and recorded_after == FLOOD
    assert set(again) == {200}
    for record, states in zip(ended, live_states, strict=True):
        assert_consistent(record, states)
        assert record.end_reason == "completed", record.end_detail
    assert all(len(calls) == 1 for calls in rung.values()), rung
    reliability.flood(
        sent=FLOOD, lost=FLOOD - recorded, seconds=seconds, live_calls=len(live), offered=offered
    )
    print(
        f"\n{FLOOD} webhooks offered in {offered:.2f} s, all answered in {seconds:.2f} s "
        f"over {FLOOD_CONNECTIONS} sockets; {recorded} recorded"
    )
    reliability.survived("webhook.flood")
