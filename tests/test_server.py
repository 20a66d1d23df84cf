"""The HTTP server on a real uvicorn (127.0.0.1) with httpx: webhooks through a fake provider
plugin that checks an HMAC header (the plugin seam), dedupe, body limits, slow bodies, a
burst of 1,000 deliveries, /healthz and /metrics."""

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
from dataclasses import dataclass, field

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from whatsapp_call import __version__, hookimpl
from whatsapp_call.errors import WebhookRejected
from whatsapp_call.models import CallEvent, CallEventType, WebhookResult
from whatsapp_call.server import Metrics, create_app
from whatsapp_call.serving import serve_asgi
from whatsapp_call.store import CallRecord, SqliteCallStore

SECRET = "fake-app-secret-1234"
VERIFY = "fake-verify-token-5678"


class FakeProvider:
    """A provider plugin: verifies HMAC-SHA256 of the raw body, then parses a tiny format."""

    def __init__(self):
        self.requests = []

    @hookimpl
    def provider_names(self):
        return ["meta", "wati"]

    @hookimpl
    def parse_webhook(self, provider, request, settings):
        if provider not in ("meta", "wati"):
            return None
        self.requests.append((provider, request))
        if request.method == "GET":
            query = request.query
            if query.get("hub.mode") == "subscribe" and hmac.compare_digest(
                query.get("hub.verify_token", ""), VERIFY
            ):
                return WebhookResult(body=query["hub.challenge"])
            raise WebhookRejected("Verify token mismatch.", 403)
        expected = "sha256=" + hmac.new(SECRET.encode(), request.body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("x-hub-signature-256", ""), expected):
            raise WebhookRejected(
                "X-Hub-Signature-256 does not match the body.", 403, hint="Check the app secret."
            )
        payload = json.loads(request.body)
        return WebhookResult(
            events=[
                CallEvent(
                    type=CallEventType(e["type"]),
                    provider=provider,
                    dedupe_key=e["key"],
                    provider_call_id=e.get("call"),
                )
                for e in payload["events"]
            ]
        )


def signed(payload, secret=SECRET):
    body = json.dumps(payload).encode()
    sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return body, {"x-hub-signature-256": sig, "content-type": "application/json"}


def event_payload(*keys, type="ringing"):
    return {"events": [{"type": type, "key": k, "call": "wacid." + k} for k in keys]}


@dataclass
class Running:
    url: str
    store: SqliteCallStore
    metrics: Metrics
    plugin: FakeProvider
    client: httpx.AsyncClient
    batches: list = field(default_factory=list)
    fail_next: bool = False
    handler: object = None
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def keys(self):
        return [e.dedupe_key for batch in self.batches for e in batch]

    async def post(self, path, payload, secret=SECRET):
        body, headers = signed(payload, secret)
        return await self.client.post(self.url + path, content=body, headers=headers)

    async def wait_for_events(self, count, timeout=5.0):
        async with asyncio.timeout(timeout), self.arrived:
            await self.arrived.wait_for(lambda: len(self.keys) >= count)

    def sample(self, name, **labels):
        text = self.metrics.render().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0


@pytest.fixture
async def start(tmp_path, register_plugin, make_settings):
    """`await start(**create_app_options, settings=...)` runs one app on 127.0.0.1."""
    plugin = FakeProvider()
    register_plugin(plugin, name="fake-provider")
    async with contextlib.AsyncExitStack() as stack:
        started = 0

        async def run(settings=None, **options):
            nonlocal started
            started += 1
            store = SqliteCallStore(tmp_path / f"state{started}")
            await store.open()
            stack.push_async_callback(store.close)
            metrics = Metrics()
            client = await stack.enter_async_context(httpx.AsyncClient(timeout=10))
            running = Running("", store, metrics, plugin, client)

            async def on_events(events):
                if running.fail_next:
                    running.fail_next = False
                    raise RuntimeError("orchestrator exploded")
                running.batches.append(events)
                async with running.arrived:
                    running.arrived.notify_all()

            app = create_app(
                settings or make_settings(provider="meta"),
                store,
                on_events=on_events,
                metrics=metrics,
                **options,
            )
            running.handler = app.state.webhooks
            running.url = await stack.enter_async_context(serve_asgi(app))
            return running

        yield run


async def test_valid_webhook_is_dispatched_once_and_duplicates_are_not(start):
    srv = await start()
    response = await srv.post("/webhooks/meta", event_payload("a:RINGING"))
    assert response.status_code == 200
    await srv.wait_for_events(1)
    [[event]] = srv.batches
    assert (event.type, event.provider, event.provider_call_id) == (
        CallEventType.RINGING,
        "meta",
        "wacid.a:RINGING",
    )
    again = await srv.post("/webhooks/meta", event_payload("a:RINGING"))
    assert again.status_code == 200
    # A mixed delivery: only the new event goes on.
    mixed = await srv.post("/webhooks/meta", event_payload("a:RINGING", "a:ACCEPTED"))
    assert mixed.status_code == 200
    await srv.wait_for_events(2)
    await asyncio.sleep(0.05)
    assert srv.keys == ["a:RINGING", "a:ACCEPTED"]
    assert srv.sample("whatsapp_call_webhook_events_deduplicated_total", provider="meta") == 2
    assert srv.sample("whatsapp_call_webhooks_received_total", provider="meta") == 3
    assert not await srv.store.mark_webhook_processed("a:ACCEPTED")  # it was recorded


async def test_bad_signature_is_refused_and_changes_nothing(start, caplog):
    srv = await start()
    caplog.set_level(logging.DEBUG)
    response = await srv.post("/webhooks/meta", event_payload("b:RINGING"), secret="wrong")
    assert response.status_code == 403
    assert "X-Hub-Signature-256" in response.text
    unsigned = await srv.client.post(srv.url + "/webhooks/meta", content=b'{"events": []}')
    assert unsigned.status_code == 403
    await asyncio.sleep(0.05)
    assert srv.batches == []
    assert await srv.store.mark_webhook_processed("b:RINGING")  # never recorded before
    assert (
        srv.sample("whatsapp_call_webhooks_rejected_total", provider="meta", reason="forbidden")
        == 2
    )
    assert SECRET not in response.text and SECRET not in caplog.text


async def test_meta_handshake_wati_subpaths_and_routing(start):
    srv = await start()
    ok = await srv.client.get(
        srv.url + "/webhooks/meta",
        params={"hub.mode": "subscribe", "hub.challenge": "1158201444", "hub.verify_token": VERIFY},
    )
    assert (ok.status_code, ok.text) == (200, "1158201444")
    bad = await srv.client.get(
        srv.url + "/webhooks/meta",
        params={"hub.mode": "subscribe", "hub.challenge": "1", "hub.verify_token": "nope"},
    )
    assert bad.status_code == 403

    answer = await srv.post(
        "/webhooks/wati/outbound/sdp-answer", event_payload("w1", type="answer")
    )
    root = await srv.post("/webhooks/wati", event_payload("w2"))
    assert answer.status_code == root.status_code == 200
    paths = [(p, r.path) for p, r in srv.plugin.requests if r.method == "POST"]
    assert paths == [("wati", "/outbound/sdp-answer"), ("wati", "")]
    await srv.wait_for_events(2)

    unknown = await srv.post("/webhooks/acme", event_payload("x"))
    assert unknown.status_code == 404 and "'acme'" in unknown.text
    assert srv.sample("whatsapp_call_webhooks_rejected_total", provider="unknown") == 1
    assert (await srv.client.put(srv.url + "/webhooks/meta")).status_code == 405
    assert (await srv.client.delete(srv.url + "/healthz")).status_code == 405
    assert (await srv.client.get(srv.url + "/nowhere")).status_code == 404


async def test_webhook_url_path_routes_to_the_configured_provider(start, make_settings):
    settings = make_settings(provider="meta", webhookUrl="https://calls.example.com/hooks/wa/")
    srv = await start(settings=settings)
    response = await srv.post("/hooks/wa", event_payload("c1"))
    sub = await srv.post("/hooks/wa/extra", event_payload("c2"))
    assert response.status_code == sub.status_code == 200
    assert [(p, r.path) for p, r in srv.plugin.requests] == [("meta", ""), ("meta", "/extra")]
    generic = await srv.post("/webhooks/meta", event_payload("c3"))
    assert generic.status_code == 200
    await srv.wait_for_events(3)


async def raw_exchange(url, data: bytes, timeout=5.0) -> bytes:
    """Send raw bytes on a fresh connection (then keep it open) and return the response head."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


POST_HEAD = b"POST /webhooks/meta HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


async def test_oversized_bodies_are_refused_with_413_before_reading_them(start):
    srv = await start()
    # Declared too large: refused at once, without waiting for (or reading) the body.
    head = await raw_exchange(srv.url, POST_HEAD + b"Content-Length: 65537\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"connection: close" in head.lower()

    # Chunked (no Content-Length): counted while streaming, refused past 64 KiB.
    chunk = b"y" * 16384
    framed = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5))
    head = await raw_exchange(srv.url, POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + framed)
    assert head.startswith(b"HTTP/1.1 413")

    assert srv.plugin.requests == []  # the plugin never saw either body
    assert srv.sample("whatsapp_call_webhooks_rejected_total", reason="too_large") == 2
    # A body just under the limit is fine.
    fits = {"events": [], "pad": "x" * (64 * 1024 - 100)}
    assert (await srv.post("/webhooks/meta", fits)).status_code == 200


async def test_slow_body_times_out(start):
    srv = await start(body_read_timeout=0.3)
    head = await raw_exchange(srv.url, POST_HEAD + b"Content-Length: 1000\r\n\r\n{")
    assert head.startswith(b"HTTP/1.1 408")
    assert srv.sample("whatsapp_call_webhooks_rejected_total", reason="timeout") == 1
    assert srv.plugin.requests == []


async def test_on_events_failure_is_logged_and_the_server_goes_on(start, caplog):
    srv = await start()
    srv.fail_next = True
    assert (await srv.post("/webhooks/meta", event_payload("boom"))).status_code == 200
    await srv.handler.drain(timeout=5)
    assert "on_events failed" in caplog.text and "boom" in caplog.text
    assert (await srv.post("/webhooks/meta", event_payload("next"))).status_code == 200
    await srv.wait_for_events(1)
    assert srv.keys == ["next"]


async def test_store_failure_answers_503_so_the_provider_retries(start):
    srv = await start()
    await srv.store.close()
    response = await srv.post("/webhooks/meta", event_payload("d1"))
    assert response.status_code == 503
    health = await srv.client.get(srv.url + "/healthz")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    await asyncio.sleep(0.05)
    assert srv.batches == []


@pytest.mark.slow
async def test_burst_of_1000_webhooks_each_event_processed_exactly_once(start):
    srv = await start()
    unique = [f"wacid.{i}:ACCEPTED" for i in range(800)]
    deliveries = unique + random.Random(7).sample(unique, 200)  # 200 duplicate deliveries
    random.Random(8).shuffle(deliveries)
    # 32 senders at once, each on its own keep-alive connection. (One httpx pool with
    # hundreds of queued requests would measure httpcore's pool bookkeeping, not the server.)
    responses = []

    async def sender(keys):
        async with httpx.AsyncClient(timeout=20) as client:
            for key in keys:
                body, headers = signed(event_payload(key, type="accepted"))
                url = srv.url + "/webhooks/meta"
                responses.append(await client.post(url, content=body, headers=headers))

    async with asyncio.timeout(60):
        await asyncio.gather(*(sender(deliveries[i::32]) for i in range(32)))
    assert len(responses) == 1000
    assert {r.status_code for r in responses} == {200}
    await srv.wait_for_events(800, timeout=10)
    await asyncio.sleep(0.1)
    assert len(srv.keys) == 800 and set(srv.keys) == set(unique)
    assert srv.sample("whatsapp_call_webhook_events_deduplicated_total", provider="meta") == 200
    assert srv.sample("whatsapp_call_webhooks_received_total", provider="meta") == 1000


async def test_healthz_and_metrics(start):
    srv = await start()
    record = await srv.store.create_call(CallRecord(to_e164="+14085551234", provider="meta"))
    await srv.store.transition(record.id, "ringing")
    ended = await srv.store.create_call(CallRecord(to_e164="+14085551235", provider="meta"))
    await srv.store.transition(ended.id, "ended", end_reason="completed")

    srv.metrics.call_state_changed(None, "created")
    srv.metrics.call_state_changed("created", "ringing")  # still ringing
    srv.metrics.call_state_changed(None, "created")
    srv.metrics.call_state_changed("created", "offering")
    srv.metrics.call_state_changed("offering", "ended")
    srv.metrics.call_ended("rejected")
    srv.metrics.observe_setup_seconds(1.2)
    srv.metrics.observe_turn_latency_seconds(0.42)
    await srv.post("/webhooks/meta", event_payload("m1"))
    await srv.post("/webhooks/meta", event_payload("m1"))
    await srv.post("/webhooks/meta", event_payload("m2"), secret="bad")

    health = await srv.client.get(srv.url + "/healthz")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["version"] == __version__
    assert body["calls_active"] == 1 and body["uptime_seconds"] >= 0

    response = await srv.client.get(srv.url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert {
        "whatsapp_call_calls",
        "whatsapp_call_calls_ended",
        "whatsapp_call_setup_seconds",
        "whatsapp_call_turn_latency_seconds",
        "whatsapp_call_webhooks_received",
        "whatsapp_call_webhooks_rejected",
        "whatsapp_call_webhook_events_deduplicated",
    } <= set(families)

    def value(family, name, **labels):
        [sample] = [
            s
            for s in families[family].samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        return sample.value

    assert value("whatsapp_call_calls", "whatsapp_call_calls", state="ringing") == 1
    assert value("whatsapp_call_calls", "whatsapp_call_calls", state="offering") == 0
    assert "ended" not in {s.labels["state"] for s in families["whatsapp_call_calls"].samples}
    assert (
        value("whatsapp_call_calls_ended", "whatsapp_call_calls_ended_total", reason="rejected")
        == 1
    )
    assert value("whatsapp_call_calls_created", "whatsapp_call_calls_created_total") == 2
    assert (
        value(
            "whatsapp_call_webhooks_received",
            "whatsapp_call_webhooks_received_total",
            provider="meta",
        )
        == 3
    )
    assert (
        value(
            "whatsapp_call_webhooks_rejected",
            "whatsapp_call_webhooks_rejected_total",
            provider="meta",
            reason="forbidden",
        )
        == 1
    )
    assert (
        value(
            "whatsapp_call_webhook_events_deduplicated",
            "whatsapp_call_webhook_events_deduplicated_total",
            provider="meta",
        )
        == 1
    )
    assert value("whatsapp_call_setup_seconds", "whatsapp_call_setup_seconds_count") == 1
    assert (
        value(
            "whatsapp_call_turn_latency_seconds",
            "whatsapp_call_turn_latency_seconds_bucket",
            le="0.5",
        )
        == 1
    )
    assert srv.metrics.active_calls == 1


def test_two_metrics_instances_do_not_clash():
    a, b = Metrics(), Metrics()  # each has its own registry: no "Duplicated timeseries"
    a.webhook_received("meta")

    def received(metrics):
        families = text_string_to_metric_families(metrics.render().decode())
        return [
            s.value
            for f in families
            for s in f.samples
            if s.name == "whatsapp_call_webhooks_received_total"
        ]

    assert received(a) == [1.0]
    assert received(b) == []


async def test_shutdown_waits_for_dispatched_events(tmp_path, register_plugin, make_settings):
    register_plugin(FakeProvider(), name="fake-provider")
    store = SqliteCallStore(tmp_path / "state")
    handled = []

    async def slow_on_events(events):
        await asyncio.sleep(0.3)
        handled.extend(e.dedupe_key for e in events)

    app = create_app(
        make_settings(provider="meta"), store, on_events=slow_on_events, metrics=Metrics()
    )
    try:
        async with serve_asgi(app) as url, httpx.AsyncClient(timeout=5) as client:
            body, headers = signed(event_payload("late"))
            response = await client.post(url + "/webhooks/meta", content=body, headers=headers)
            assert response.status_code == 200 and handled == []  # answered before handling
        assert handled == ["late"]  # the server's shutdown waited for it
    finally:
        await store.close()
