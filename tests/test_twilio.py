"""Twilio TURN: the simulator's Tokens endpoint (per spec section 7), the real TURN relay
behind it (coturn), and the `whatsapp_call_twilio` plugin: mapping, order, caching, expiry,
failures (the call proceeds with STUN only, the warning is recorded) and doctor checks."""

import asyncio
import base64
import logging
import re
import socket
from email.utils import parsedate_to_datetime

import httpx
import pytest
import whatsapp_call_twilio as twilio_plugin
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
)
from aiortc.rtcicetransport import connection_kwargs
from whatsapp_call import plugins as plugin_mod
from whatsapp_call.media.ice import host_addresses
from whatsapp_call.models import CheckStatus
from whatsapp_call_sim.turn import TurnServer, stun_binding
from whatsapp_call_sim.twilio import TwilioSimulator

HAVE_COTURN = TurnServer.available()
NEED_COTURN = pytest.mark.skipif(
    not HAVE_COTURN,
    reason="coturn's turnserver is not installed (apt-get install -y coturn): no TURN relay to test",
)
TOKEN_KEYS = {
    "account_sid",
    "date_created",
    "date_updated",
    "ttl",
    "username",
    "password",
    "ice_servers",
}
# A real Twilio answer's ice_servers (spec section 7), shuffled: TCP/443 first.
TWILIO_LIKE = [
    {
        "url": "turn:global.turn.twilio.com:443?transport=tcp",
        "urls": "turn:global.turn.twilio.com:443?transport=tcp",
        "username": "u" * 64,
        "credential": "c" * 44,
    },
    {"url": "stun:global.stun.twilio.com:3478", "urls": "stun:global.stun.twilio.com:3478"},
    {
        "url": "turn:global.turn.twilio.com:3478?transport=udp",
        "urls": "turn:global.turn.twilio.com:3478?transport=udp",
        "username": "u" * 64,
        "credential": "c" * 44,
    },
    {
        "url": "turn:global.turn.twilio.com:3478?transport=tcp",  # legacy `url` only
        "username": "u" * 64,
        "credential": "c" * 44,
    },
]


@pytest.fixture(autouse=True)
async def _fresh_plugin_state():
    twilio_plugin.clear_cache()
    yield
    twilio_plugin.clear_cache()
    await twilio_plugin.aclose()


@pytest.fixture
async def sim():
    """A Twilio simulator handing out STUN only (fast; no coturn needed)."""
    simulator = TwilioSimulator(turn=False)
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
def twilio(register_plugin):
    register_plugin(twilio_plugin, name="twilio")
    return twilio_plugin


def _settings(make_settings, sim, **extra):
    options = {
        "twilioAccountSid": sim.account_sid,
        "twilioAuthToken": sim.auth_token,
        "twilioApiBaseUrl": sim.url,
        "twilioTtlSeconds": 600,
        **extra,
    }
    return make_settings(**options)


def _tokens_url(sim, sid=None):
    return f"{sim.url}/2010-04-01/Accounts/{sid or sim.account_sid}/Tokens.json"


async def _fetch_servers(settings):
    results = await plugin_mod.call_all("fetch_ice_servers", settings=settings)
    return [server for _, servers in results for server in servers]


# -- the simulator's endpoint ------------------------------------------------------------


async def test_token_answer_has_twilios_shape(sim):
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.post(
            _tokens_url(sim), data={"Ttl": "600"}, auth=(sim.account_sid, sim.auth_token)
        )
    assert response.status_code == 201
    body = response.json()
    assert set(body) == TOKEN_KEYS
    assert body["account_sid"] == sim.account_sid
    assert body["ttl"] == "600"  # a string, as Twilio sends it
    for key in ("date_created", "date_updated"):
        assert re.fullmatch(r"\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} \+0000", body[key])
        assert parsedate_to_datetime(body[key]).tzinfo is not None
    assert re.fullmatch(r"[0-9a-f]{64}", body["username"])  # Twilio's format without coturn
    assert len(base64.b64decode(body["password"])) == 32
    assert body["ice_servers"]
    for entry in body["ice_servers"]:
        assert isinstance(entry["urls"], str) and entry["url"] == entry["urls"]
    assert [e["urls"] for e in body["ice_servers"]] == [sim.stun_server.urls()["stun"]]
    assert sim.requests[-1].ttl == "600" and sim.requests[-1].status == 201


async def test_default_ttl_is_a_day_and_bad_ttls_are_refused(sim):
    auth = (sim.account_sid, sim.auth_token)
    async with httpx.AsyncClient(timeout=5) as client:
        default = await client.post(_tokens_url(sim), auth=auth)
        assert default.status_code == 201 and default.json()["ttl"] == "86400"
        for bad in ("abc", "0", "86401", "-5", "1.5"):
            response = await client.post(_tokens_url(sim), data={"Ttl": bad}, auth=auth)
            assert response.status_code == 400, bad
            error = response.json()
            assert error["status"] == 400 and "Ttl" in error["message"]
            assert set(error) == {"code", "message", "more_info", "status"}


async def test_authentication_account_and_method(sim):
    async with httpx.AsyncClient(timeout=5) as client:
        missing = await client.post(_tokens_url(sim))
        wrong = await client.post(_tokens_url(sim), auth=(sim.account_sid, "not-the-token"))
        other_sid = "AC" + "0" * 32
        other = await client.post(
            _tokens_url(sim, other_sid), auth=(sim.account_sid, sim.auth_token)
        )
        get = await client.get(_tokens_url(sim), auth=(sim.account_sid, sim.auth_token))
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json() == {
            "code": 20003,
            "message": "Authenticate",
            "more_info": "https://www.twilio.com/docs/errors/20003",
            "status": 401,
        }
        assert response.headers["www-authenticate"].startswith("Basic")
    assert other.status_code == 404 and other.json()["code"] == 20404
    assert other_sid in other.json()["message"]
    assert get.status_code == 405


async def test_stun_only_simulator_answers_stun_and_says_so(caplog):
    simulator = TwilioSimulator(turn=False)
    await simulator.start()
    try:
        assert not simulator.relay_available
        port = simulator.stun_server.port
        mapped = await stun_binding("127.0.0.1", port, timeout=2)
        assert mapped[0] == "127.0.0.1" and mapped[1] != port
    finally:
        await simulator.stop()
    with caplog.at_level(logging.WARNING, logger="whatsapp_call_sim.twilio"):
        # Auto mode without coturn logs a plain warning (simulated by hiding turnserver).
        import whatsapp_call_sim.twilio as sim_mod

        original = sim_mod.TurnServer.available
        sim_mod.TurnServer.available = staticmethod(lambda: False)
        try:
            auto = TwilioSimulator()
            await auto.start()
            await auto.stop()
        finally:
            sim_mod.TurnServer.available = original
    assert "coturn" in caplog.text and "no TURN relay" in caplog.text


async def test_turn_required_without_coturn_is_an_error(monkeypatch):
    import whatsapp_call_sim.twilio as sim_mod

    monkeypatch.setattr(sim_mod.TurnServer, "available", staticmethod(lambda: False))
    with pytest.raises(RuntimeError, match="apt-get install coturn"):
        await TwilioSimulator(turn=True).start()


def test_account_sid_is_validated_and_token_not_in_repr():
    with pytest.raises(ValueError, match="32 hex"):
        TwilioSimulator(account_sid="ACnot-hex")
    simulator = TwilioSimulator(auth_token="very-secret-token-123")
    assert "very-secret-token-123" not in repr(simulator)


# -- the real relay (coturn) ---------------------------------------------------------------


async def _relay_only_connect(ice_server: RTCIceServer, timeout: float = 10.0):
    """Two aiortc peers that may use only relay candidates; returns the nominated pair's
    local candidate type of each side, after a data-channel round trip."""

    def config():
        return RTCConfiguration(
            iceServers=[ice_server], iceTransportPolicy=RTCIceTransportPolicy.RELAY
        )

    a, b = RTCPeerConnection(config()), RTCPeerConnection(config())
    try:
        channel = a.createDataChannel("probe")
        received = asyncio.get_running_loop().create_future()

        @b.on("datachannel")
        def _on_channel(remote):
            @remote.on("message")
            def _on_message(message):
                if not received.done():
                    received.set_result(message)

        @channel.on("open")
        def _on_open():
            channel.send("through the relay")

        async with asyncio.timeout(timeout):
            with host_addresses(["127.0.0.1"]):
                await a.setLocalDescription(await a.createOffer())
                await b.setRemoteDescription(a.localDescription)
                await b.setLocalDescription(await b.createAnswer())
            await a.setRemoteDescription(b.localDescription)
            assert " typ relay" in a.localDescription.sdp
            assert " typ host" not in a.localDescription.sdp
            assert await received == "through the relay"
        kinds = []
        for pc in (a, b):
            ice = pc.sctp.transport.transport
            pair = next(iter(ice._connection._nominated.values()))
            kinds.append(pair.local_candidate.type)
        return kinds
    finally:
        await a.close()
        await b.close()


@NEED_COTURN
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_two_aiortc_peers_connect_through_the_relay_with_plugin_servers(
    twilio, make_settings, transport
):
    simulator = TwilioSimulator(turn=True)
    await simulator.start()
    try:
        settings = _settings(make_settings, simulator, twilioTurnTransport=transport)
        servers = await _fetch_servers(settings)
        turn = next(s for s in servers if s.urls[0].startswith("turn:"))
        assert turn.urls[0].endswith(f"transport={transport}")
        # What aiortc will use from the whole (ordered) list: the first TURN is ours.
        rtc = [RTCIceServer(list(s.urls), s.username, s.credential) for s in servers]
        assert connection_kwargs(rtc)["turn_transport"] == transport
        kinds = await _relay_only_connect(
            RTCIceServer(list(turn.urls), turn.username, turn.credential)
        )
        assert kinds == ["relay", "relay"]
    finally:
        await simulator.stop()


@NEED_COTURN
async def test_relay_refuses_wrong_credentials():
    simulator = TwilioSimulator(turn=True)
    await simulator.start()
    try:
        url = simulator.turn_server.urls()["turn_udp"]
        username, _ = simulator.turn_server.credentials(600)
        pc = RTCPeerConnection(
            RTCConfiguration(
                iceServers=[RTCIceServer(url, username, "d3Jvbmc=")],
                iceTransportPolicy=RTCIceTransportPolicy.RELAY,
            )
        )
        pc.createDataChannel("x")
        try:
            async with asyncio.timeout(10):
                with host_addresses(["127.0.0.1"]):
                    await pc.setLocalDescription(await pc.createOffer())
            assert " typ relay" not in pc.localDescription.sdp
        finally:
            await pc.close()
    finally:
        await simulator.stop()


# -- the plugin ------------------------------------------------------------------------------


async def test_plugin_maps_and_orders_twilio_servers(twilio, make_settings, sim):
    sim.ice_servers_override = TWILIO_LIKE
    servers = await _fetch_servers(_settings(make_settings, sim))
    assert [s.urls[0] for s in servers] == [
        "turn:global.turn.twilio.com:3478?transport=udp",
        "turn:global.turn.twilio.com:443?transport=tcp",
        "turn:global.turn.twilio.com:3478?transport=tcp",
        "stun:global.stun.twilio.com:3478",
    ]
    assert [s.priority for s in servers] == [20, 30, 30, 60]
    assert all(s.source == "twilio" for s in servers)
    assert all(s.username == "u" * 64 and s.credential == "c" * 44 for s in servers[:3])
    assert servers[3].username is None and servers[3].credential is None
    assert "c" * 44 not in repr(servers)
    kwargs = connection_kwargs(
        [RTCIceServer(list(s.urls), s.username, s.credential) for s in servers]
    )
    assert kwargs["turn_server"] == ("global.turn.twilio.com", 3478)
    assert kwargs["turn_transport"] == "udp"
    assert kwargs["stun_server"] == ("global.stun.twilio.com", 3478)
    assert sim.requests[-1].ttl == "600"  # twilioTtlSeconds is sent as Ttl


async def test_plugin_tcp_preference_puts_tcp_443_first(twilio, make_settings, sim):
    sim.ice_servers_override = TWILIO_LIKE
    servers = await _fetch_servers(_settings(make_settings, sim, twilioTurnTransport="tcp"))
    assert [s.urls[0] for s in servers][:3] == [
        "turn:global.turn.twilio.com:443?transport=tcp",
        "turn:global.turn.twilio.com:3478?transport=tcp",
        "turn:global.turn.twilio.com:3478?transport=udp",
    ]


async def test_plugin_caches_per_account_until_80_percent_of_ttl(
    twilio, make_settings, sim, monkeypatch
):
    now = [1000.0]
    monkeypatch.setattr(twilio_plugin, "_clock", lambda: now[0])
    settings = _settings(make_settings, sim)
    first = await _fetch_servers(settings)
    assert await _fetch_servers(settings) == first
    assert len(sim.requests) == 1
    now[0] += 0.79 * 600
    await _fetch_servers(settings)
    assert len(sim.requests) == 1
    now[0] += 0.02 * 600  # past 80% of the 600 s TTL: a new token
    await _fetch_servers(settings)
    assert len(sim.requests) == 2

    other = TwilioSimulator(account_sid="AC" + "ab" * 16, auth_token="other-token", turn=False)
    await other.start()
    try:
        await _fetch_servers(_settings(make_settings, other))
        assert len(other.requests) == 1 and len(sim.requests) == 2
    finally:
        await other.stop()


async def test_concurrent_calls_share_one_token_request(twilio, make_settings, sim):
    sim.delay_seconds = 0.2
    settings = _settings(make_settings, sim)
    async with asyncio.timeout(10):
        results = await asyncio.gather(*(_fetch_servers(settings) for _ in range(5)))
    assert all(r == results[0] and r for r in results)
    assert len(sim.requests) == 1


async def test_rejected_credentials_give_no_servers_and_a_recorded_warning(
    twilio, make_settings, sim, caplog
):
    settings = _settings(make_settings, sim, twilioAuthToken="wrong-token-value-42")
    with caplog.at_level(logging.WARNING, logger="whatsapp_call_twilio"):
        assert await _fetch_servers(settings) == []
    warning = twilio.last_error(settings)
    assert twilio.last_error() == warning  # the most recent fetch, as the orchestrator asks
    assert "rejected the credentials" in warning and "20003" in warning
    assert "STUN only" in warning
    assert "wrong-token-value-42" not in warning + caplog.text
    assert "rejected the credentials" in caplog.text
    assert len(sim.requests) == 1  # a 401 is not retried


async def test_server_errors_are_retried_once_then_give_up(twilio, make_settings, sim):
    settings = _settings(make_settings, sim)
    sim.fail_next(500)
    assert await _fetch_servers(settings)  # the retry succeeded
    assert [r.status for r in sim.requests] == [500, 201]
    assert twilio.last_error(settings) is None

    twilio.clear_cache()
    sim.requests.clear()
    sim.fail_next(503, times=2)
    assert await _fetch_servers(settings) == []
    assert [r.status for r in sim.requests] == [503, 503]
    assert "HTTP 503" in twilio.last_error(settings)

    assert await _fetch_servers(settings)  # Twilio is back: the warning is cleared
    assert twilio.last_error(settings) is None and twilio.last_error() is None


async def test_connection_refused_and_timeout_give_no_servers(twilio, make_settings, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = make_settings(
        twilioAccountSid="AC" + "1" * 32,
        twilioAuthToken="some-token-value",
        twilioApiBaseUrl=f"http://127.0.0.1:{port}",
    )
    async with asyncio.timeout(10):
        assert await _fetch_servers(settings) == []
    assert "Cannot reach Twilio" in twilio.last_error(settings)

    monkeypatch.setattr(twilio_plugin, "TIMEOUT", httpx.Timeout(0.3))
    await twilio_plugin.aclose()  # the next client uses the short timeout
    slow = TwilioSimulator(turn=False)
    await slow.start()
    try:
        slow.delay_seconds = 1.0
        async with asyncio.timeout(10):
            assert await _fetch_servers(_settings(make_settings, slow)) == []
        assert "did not answer" in twilio.last_error(_settings(make_settings, slow))
    finally:
        await slow.stop()


async def test_unconfigured_contributes_nothing_and_half_configured_warns(twilio, make_settings):
    assert await plugin_mod.call_all("fetch_ice_servers", settings=make_settings()) == []
    half = make_settings(twilioAccountSid="AC" + "2" * 32)
    assert await _fetch_servers(half) == []
    assert "twilioAuthToken is not set" in twilio.last_error(half)
    bad_sid = make_settings(twilioAccountSid="SK" + "2" * 32, twilioAuthToken="tok-value")
    assert await _fetch_servers(bad_sid) == []
    assert "not an Account SID" in twilio.last_error(bad_sid)


async def test_doctor_checks(twilio, make_settings, sim):
    async def checks(settings):
        results = await plugin_mod.call_all("doctor_checks", settings=settings)
        return [c for _, cs in results for c in cs]

    (unset,) = await checks(make_settings())
    assert unset.status == CheckStatus.WARN and "STUN only" in unset.message

    sim.ice_servers_override = TWILIO_LIKE
    (good,) = await checks(_settings(make_settings, sim))
    assert good.status == CheckStatus.OK and "accepted" in good.message
    assert "transport=udp" in good.message
    assert good.message.count("…") == 1 and sim.account_sid not in good.message
    await checks(_settings(make_settings, sim))
    assert len(sim.requests) == 2  # a live request each time: doctor never uses the cache

    sim.ice_servers_override = None  # this simulator hands out STUN only
    (stun_only,) = await checks(_settings(make_settings, sim))
    assert stun_only.status == CheckStatus.WARN and "no TURN server" in stun_only.message

    (bad,) = await checks(_settings(make_settings, sim, twilioAuthToken="bad-token-value-99"))
    assert bad.status == CheckStatus.FAIL and "rejected" in bad.message
    assert "twilioAuthToken" in bad.hint and "bad-token-value-99" not in bad.message + bad.hint

    (half,) = await checks(make_settings(twilioAuthToken="only-the-token"))
    assert half.status == CheckStatus.FAIL and "twilioAccountSid" in half.message
