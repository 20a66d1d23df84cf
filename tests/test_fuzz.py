"""Bad input, tried in bulk: every config key with wrong types and empty values, unknown
keys, phone numbers in every malformed shape (parser and API), CLI arguments, arbitrary
JSON bodies for the API, and a hypothesis fuzz of the webhook HTTP endpoint on a real
socket (no 500s, the server stays alive). Parser-level properties of the webhook parsers and
the SDP rewriting live next to their code (test_meta_plugin, test_wati_plugin, test_media).
"""

from __future__ import annotations

import asyncio
import json
import threading
from urllib.parse import quote

import httpx
import pytest
import whatsapp_call_meta
import whatsapp_call_openai
import whatsapp_call_wati
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import closed_port_url, meta_signature
from whatsapp_call import plugins
from whatsapp_call.api import api_routes
from whatsapp_call.calls.orchestrator import CallService
from whatsapp_call.cli import cli
from whatsapp_call.config import CORE_KEYS, Settings, settings_from_dict
from whatsapp_call.errors import BadInputError, ConfigError
from whatsapp_call.phone import parse_phone
from whatsapp_call.server import create_app
from whatsapp_call.server.metrics import Metrics
from whatsapp_call.serving import AsgiServer
from whatsapp_call.store import open_store

pytest_plugins = ["reliability_plugin"]

WRONG_VALUES = [
    {},
    [],
    ["x", 1],
    {"nested": {"deep": [1]}},
    10**30,
    -1,
    0,
    3.5,
    True,
    "",
    "   ",
    "not a value",
    "💥" * 20,
    "x" * 10_000,
    None,
]
MALFORMED_NUMBERS = [
    "",
    " ",
    "+",
    "++14155550123",
    "abc",
    "+1",
    "+1 415",
    "+1415555012a",
    "+1 (415) 555-01234567890123",
    "00",
    "+0000000000",
    "+999 1234567",
    "0",
    "4155550123",
    "+1\n4155550123",
    "+1\x004155550123",
    "+" + "9" * 40,
    "📞+14155550123",
    "+١٤١٥٥٥٥٠١٢٣",
    "+1-415-555-0123; DROP TABLE calls",
    "+44 20 7946 0958 ext. 99999999",
    "javascript:alert(1)",
    "../../etc/passwd",
]


@pytest.fixture
def registered(register_plugin):
    for plugin in (whatsapp_call_meta, whatsapp_call_wati, whatsapp_call_openai):
        register_plugin(plugin)


def plugin_models():
    return [m for _, m in plugins.call_all_sync("settings_model")]


def test_every_config_key_with_wrong_types_and_empty_values(registered, reliability):
    """Each value either validates or raises ConfigError naming the key: never anything
    else, never a secret value in the message."""
    keys = sorted(CORE_KEYS | {k for m in plugin_models() for k in _aliases(m)})
    tried = crashes = 0
    unnamed = []
    for key in keys:
        for value in WRONG_VALUES:
            tried += 1
            try:
                settings_from_dict({key: value}, plugin_models=plugin_models())
            except ConfigError as exc:
                if key not in str(exc) and _snake(key) not in str(exc):
                    unnamed.append((key, value, str(exc)[:200]))
            except Exception as exc:  # a crash: what this test exists to find
                crashes += 1
                unnamed.append((key, repr(value)[:40], f"CRASH {type(exc).__name__}: {exc}"))
    reliability.bad_inputs("config_values", tried=tried, crashes=crashes)
    assert crashes == 0 and not unnamed, unnamed[:10]


def _aliases(model) -> set[str]:
    from pydantic.alias_generators import to_camel

    return {to_camel(name) for name in model.model_fields}


def _snake(camel: str) -> str:
    import re

    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=30),
        st.integers() | st.text(max_size=5),
        min_size=1,
        max_size=3,
    )
)
def test_unknown_keys_are_named(raw):
    # Python field names (snake_case) are accepted too, on purpose (populate_by_name).
    known = CORE_KEYS | set(Settings.model_fields) | {"appSecret", "verifyToken"}
    unknown = [k for k in raw if k not in known]
    if not unknown:
        return
    try:
        settings_from_dict(dict(raw))
    except ConfigError as exc:
        assert any(repr(k) in str(exc) for k in unknown) or "Invalid configuration" in str(exc)
    else:
        raise AssertionError(f"unknown keys accepted: {unknown}")


def test_malformed_phone_numbers_are_refused_with_a_fix(reliability):
    tried = crashes = 0
    accepted = []
    for raw in MALFORMED_NUMBERS:
        tried += 1
        try:
            accepted.append((raw, parse_phone(raw).e164))
        except BadInputError as exc:
            assert exc.hint, raw
        except Exception:
            crashes += 1
    reliability.bad_inputs("phone_numbers", tried=tried, crashes=crashes)
    assert crashes == 0
    # Only shapes a person would mean as a number may pass, in E.164.
    assert all(e164.startswith("+") and e164[1:].isdigit() for _, e164 in accepted), accepted


class ThreadedService:
    """The webhook server + /v1 API on a real socket, in its own event-loop thread, so a
    synchronous hypothesis test can fire requests at it."""

    def __init__(self, settings):
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.events: list = []

    def __enter__(self) -> ThreadedService:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    async def _start(self) -> None:
        self.store = open_store(self.settings)
        await self.store.open()
        self.service = CallService(self.settings, self.store)

        async def on_events(events):
            self.events.extend(events)

        app = create_app(
            self.settings,
            self.store,
            on_events=on_events,
            metrics=Metrics(),
            extra_routes=api_routes(self.service),
            body_read_timeout=2.0,
        )
        self.server = AsgiServer(app)
        self.url = await self.server.start()

    async def _stop(self) -> None:
        await self.service.shutdown(5)
        await self.server.stop()
        await self.store.close()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


APP_SECRET = "fuzz-app-secret-0123456789"
WATI_SECRET = "fuzz-wati-secret-0123456789"


@pytest.fixture
def service(registered, make_settings, tmp_path):
    settings = make_settings(
        provider="meta",
        metaGraphBaseUrl=closed_port_url(),  # nothing leaves 127.0.0.1
        metaRetryBudgetSeconds=1,
        metaPhoneNumberId="1234567890",
        metaAccessToken="EAAfuzz0123456789",
        metaAppSecret=APP_SECRET,
        metaVerifyToken="fuzz-verify-token",
        watiWebhookSecret=WATI_SECRET,
        openaiApiKey="sk-fuzz-0123456789",
        serviceToken="fuzz-service-token-0123456789",
        stateDir=str(tmp_path),
    )
    with ThreadedService(settings) as running:
        yield running


json_leaves = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
meta_shaped = st.fixed_dictionaries(
    {
        "object": st.sampled_from(["whatsapp_business_account", "page", ""]),
        "entry": st.lists(
            st.fixed_dictionaries(
                {
                    "id": st.text(max_size=8),
                    "changes": st.lists(
                        st.fixed_dictionaries(
                            {
                                "field": st.sampled_from(["calls", "messages", "x"]),
                                "value": st.dictionaries(
                                    st.sampled_from(
                                        ["calls", "statuses", "messages", "metadata", "errors"]
                                    ),
                                    json_values,
                                    max_size=3,
                                ),
                            }
                        ),
                        max_size=2,
                    ),
                }
            ),
            max_size=2,
        ),
    }
)
bodies = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | meta_shaped.map(lambda v: json.dumps(v).encode())
)
paths = st.sampled_from(
    ["/webhooks/meta", "/webhooks/wati", "/webhooks/wati/callStatus", "/webhooks/wati/x/y"]
) | st.text(alphabet="abcxyz/._-%", max_size=20).map(lambda t: "/webhooks/" + t)
content_types = st.sampled_from(
    [
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "",
        "application/json; charset=latin-1",
    ]
)


@st.composite
def webhook_requests(draw):
    body = draw(bodies)
    headers = {"Content-Type": draw(content_types)}
    signing = draw(st.sampled_from(["meta", "wati", "garbage", "none"]))
    if signing == "meta":
        headers["X-Hub-Signature-256"] = meta_signature(body, APP_SECRET)
    elif signing == "wati":
        headers["X-Hub-Signature-256"] = meta_signature(body, WATI_SECRET)
    elif signing == "garbage":
        headers["X-Hub-Signature-256"] = draw(
            st.text(alphabet="sha256=0123456789abcdef", max_size=80)
        )
    query = draw(
        st.dictionaries(
            st.sampled_from(["hub.mode", "hub.verify_token", "hub.challenge", "x"]),
            st.text(alphabet="abc123 ", max_size=10),
            max_size=3,
        )
    )
    return draw(st.sampled_from(["POST", "POST", "GET", "PUT"])), draw(paths), query, headers, body


def test_fuzz_webhook_endpoint_never_500s_and_stays_up(service, reliability):
    seen: dict[int, int] = {}
    with httpx.Client(base_url=service.url, timeout=10) as client:

        @settings(
            max_examples=400,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            database=None,
        )
        @given(webhook_requests())
        def one(request):
            method, path, query, headers, body = request
            response = client.request(method, path, params=query, headers=headers, content=body)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (method, path, headers, body[:200], response.text)

        try:
            one()
        finally:
            tried = sum(seen.values())
            crashes = sum(n for status, n in seen.items() if status >= 500)
            reliability.bad_inputs("webhook_http_fuzz", tried=tried, crashes=crashes)
        alive = client.get("/healthz").status_code
    assert alive == 200
    assert sum(seen.values()) >= 100
    assert any(200 <= s < 300 for s in seen), seen  # valid signed bodies got through too


def test_fuzz_api_bodies_and_numbers_never_500(service, reliability):
    token = {"Authorization": "Bearer fuzz-service-token-0123456789"}
    seen: dict[int, int] = {}
    with httpx.Client(base_url=service.url, timeout=10, headers=token) as client:
        for raw in MALFORMED_NUMBERS:
            try:
                parse_phone(raw)
            except BadInputError:
                refused = {422, 429}, {422, 429}
            else:  # a lenient shape the parser accepts: it goes on to the (absent) provider
                refused = {202, 409, 429}, {502, 429}
            path = "/v1/permissions/" + quote(raw, safe="")
            checked = client.get(path).status_code
            placed = client.post("/v1/calls", json={"to": raw}).status_code
            for status in (checked, placed):
                seen[status] = seen.get(status, 0) + 1
            assert placed in refused[0] and checked in {404, *refused[1]}, (raw, placed, checked)

        @settings(
            max_examples=150,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            database=None,
        )
        @given(
            json_values
            | st.fixed_dictionaries(
                {"to": st.text(max_size=30)},
                optional={"greeting": json_values, "metadata": json_values},
            )
        )
        def one(body):
            response = client.post("/v1/calls", content=json.dumps(body).encode())
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500 or response.status_code == 503, response.text

        try:
            one()
        finally:
            reliability.bad_inputs(
                "api_bodies",
                tried=sum(seen.values()),
                crashes=seen.get(500, 0),  # 502 = the provider is unreachable, 503 = busy
            )
        assert client.get("/healthz").status_code == 200


BAD_ARGV = [
    ["nonexistent-command"],
    ["call"],
    ["call", "not-a-number"],
    ["call", "+1415"],
    ["call", "+14155550123", "--bogus-option"],
    ["calls", "--limit", "abc"],
    ["calls", "--limit", "-5"],
    ["calls", "no-such-call-id"],
    ["serve", "--port", "70000"],
    ["serve", "--workers", "zero"],
    ["permission"],
    ["permission", "check"],
    ["permission", "check", "xyz"],
    ["permission", "request", "+1"],
    ["config", "show", "--json", "extra"],
    ["config", "init", "--provider", "nobody"],
    ["sim", "--scenario", "{not json"],
    ["sim", "--scenario", "no-such-preset"],
    ["sim", "--provider", "skype"],
    ["demo", "--provider", "skype"],
    ["-c"],
    ["-c", "/nonexistent/config.yaml", "call", "+14155550123"],
    ["--openclaw", "/nonexistent.json", "doctor"],
    ["\x00"],
    ["call", "+1" + "9" * 5000],
]


def test_bad_cli_arguments_are_clean_errors(tmp_path, monkeypatch, reliability):
    monkeypatch.chdir(tmp_path)  # no ./whatsapp-call.yaml from the tree
    monkeypatch.delenv("WHATSAPP_CALL_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    runner = CliRunner()
    crashes = []
    for argv in BAD_ARGV:
        result = runner.invoke(cli, argv, catch_exceptions=True)
        output = result.output or ""
        crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
        if crashed or "Traceback" in output or result.exit_code == 0:
            crashes.append((argv, result.exit_code, repr(result.exception), output[-300:]))
    reliability.bad_inputs("cli_arguments", tried=len(BAD_ARGV), crashes=len(crashes))
    assert not crashes, crashes
