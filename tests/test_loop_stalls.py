"""Guards against event-loop stalls at call set-up and call end (bench/loop_stalls.py measures
them): one-time work is done before the first call, the start-up heap is out of the garbage
collector's full passes, and TLS contexts are built once per process (the HTTP clients' at
start-up, the Realtime WebSocket's off the loop). No timings are asserted."""

import subprocess
import sys
import textwrap
import threading

import pytest
import whatsapp_call_openai
from whatsapp_call import plugins as plugin_mod
from whatsapp_call.calls import orchestrator
from whatsapp_call.calls.orchestrator import CallService
from whatsapp_call.errors import VoiceBackendError
from whatsapp_call.models import Call
from whatsapp_call.phone import parse_phone
from whatsapp_call.store import open_store
from whatsapp_call_openai import session as openai_session


def test_prepare_process_imports_what_a_first_call_would_and_freezes_the_heap():
    """In a fresh interpreter: the modules a first call used to import on the loop are loaded,
    the HTTP clients' TLS context is built, the start-up heap is frozen, and a second call
    does nothing."""
    script = textwrap.dedent(
        """
        import gc, sys
        from whatsapp_call.calls import warmup
        lazy = ["httpcore", "numpy.ma", "cryptography.hazmat.backends.openssl",
                "cryptography.hazmat.primitives.serialization"]
        assert not [m for m in lazy if m in sys.modules], [m for m in lazy if m in sys.modules]
        warmup.prepare_process()
        assert all(m in sys.modules for m in lazy), [m for m in lazy if m not in sys.modules]
        from whatsapp_call.providers import http
        assert http._tls is not None  # the provider clients' shared TLS context is built
        frozen = gc.get_freeze_count()
        assert frozen > 10_000, frozen
        gc.unfreeze()
        warmup.prepare_process()  # once per process
        assert gc.get_freeze_count() == 0
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


async def test_call_service_start_prepares_the_process(monkeypatch, make_settings, tmp_path):
    calls = []
    monkeypatch.setattr(orchestrator, "prepare_process", lambda: calls.append(1))
    settings = make_settings(stateDir=str(tmp_path))
    store = open_store(settings)
    await store.open()
    try:
        await CallService(settings, store).start()
    finally:
        await store.close()
    assert calls == [1]


@pytest.mark.parametrize("scheme", ["wss", "ws"])
async def test_realtime_websocket_shares_one_tls_context_built_off_the_loop(
    scheme, monkeypatch, register_plugin, make_settings
):
    """Left to websockets, every wss:// connection builds its own TLS context on the loop
    (~50 ms loading the CA store, at every call set-up)."""
    register_plugin(whatsapp_call_openai, name="openai")
    monkeypatch.setattr(openai_session, "_tls", None)
    built_in = []
    real = openai_session.ssl.create_default_context

    def create_default_context():
        built_in.append(threading.get_ident())
        return real()

    monkeypatch.setattr(openai_session.ssl, "create_default_context", create_default_context)
    seen = []

    async def connect(url, **kwargs):
        seen.append(kwargs.get("ssl"))
        raise OSError("refused (test)")

    monkeypatch.setattr(openai_session, "connect", connect)
    settings = make_settings(
        openaiApiKey="sk-test-key-123", openaiRealtimeUrl=f"{scheme}://127.0.0.1:9/v1/realtime"
    )
    for _ in range(2):
        call = Call(to=parse_phone("+14085551234"))
        session = await plugin_mod.call_first("open_voice_session", call=call, settings=settings)
        with pytest.raises(VoiceBackendError):
            await session.start()
    if scheme == "ws":
        assert seen == [None, None] and built_in == []
        return
    assert seen[0] is not None and seen[0] is seen[1]
    assert seen[0].verify_mode.name == "CERT_REQUIRED" and seen[0].check_hostname
    assert len(built_in) == 1 and built_in[0] != threading.get_ident()


async def test_provider_http_clients_share_the_process_tls_context(monkeypatch):
    """httpx builds a TLS context per client unless given one (~50 ms on the loop)."""
    import httpx
    import whatsapp_call_twilio
    from whatsapp_call.providers.http import ClientPool, tls_context

    verify = []
    real = httpx.AsyncClient

    def client(**kwargs):
        verify.append(kwargs.get("verify"))
        return real(**kwargs)

    monkeypatch.setattr(httpx, "AsyncClient", client)
    monkeypatch.setattr(whatsapp_call_twilio, "_client", None)
    pool = ClientPool()
    try:
        await pool.get()
        whatsapp_call_twilio._get_client()
    finally:
        await pool.aclose()
        await whatsapp_call_twilio.aclose()
    assert verify == [tls_context(), tls_context()]
