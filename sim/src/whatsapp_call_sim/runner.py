"""Run every simulator at once and point the product at them.

`SimulatorSet` starts, in the current event loop, the WhatsApp simulator (Meta Graph + WATI),
the OpenAI Realtime simulator and the Twilio simulator (with its TURN server), each on
127.0.0.1 and a free port. It picks the port the service will listen on, tells the WhatsApp
simulator to deliver webhooks there, and writes a ready-to-use config file (mode 600) with
fresh random credentials that match the simulators:

    async with SimulatorSet(provider="meta", state_dir=tmp) as sims:
        settings = load_settings(sims.config_path)   # then call/serve as usual
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("whatsapp_call_sim.runner")

PROVIDERS = ("meta", "wati")
HOST = "127.0.0.1"

# Named callee behaviours for `whatsapp-call sim --scenario NAME`: fields of the WhatsApp
# simulator's `Scenario` (a JSON object of those fields is accepted too).
SCENARIOS: dict[str, dict[str, Any]] = {
    "accept": {},
    "reject": {"answer": "reject"},
    "no_answer": {"answer": "no_answer"},
    "hangup": {"hangup_after_s": 10.0},
    "permission_request": {"permission": "grant_on_request"},
    "permission_denied": {"permission": "deny_on_request"},
    "permission_ignored": {"permission": "ignore_request"},
    "no_whatsapp": {"has_whatsapp": False},
    "signalling_only": {"media": False},
}


def free_tcp_port(host: str = HOST) -> int:
    """A currently free TCP port on `host` (for the service, which binds it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def build_scenario(scenario: Any) -> Any:
    """A WhatsApp-simulator `Scenario` from a preset name, a JSON text, a dict or a Scenario."""
    from whatsapp_call.errors import BadInputError

    from .whatsapp import Scenario

    if scenario is None or isinstance(scenario, Scenario):
        return scenario or Scenario()
    if isinstance(scenario, str):
        text = scenario.strip()
        if text.startswith("{"):
            try:
                scenario = json.loads(text)
            except json.JSONDecodeError as exc:
                raise BadInputError(
                    f"--scenario is not valid JSON: {exc}",
                    'Give a preset name or a JSON object such as {"answer": "reject"}.',
                ) from None
        elif text in SCENARIOS:
            scenario = SCENARIOS[text]
        else:
            raise BadInputError(
                f"Unknown scenario {text!r}.",
                f"Use one of: {', '.join(SCENARIOS)}; or a JSON object of Scenario fields.",
            )
    return Scenario.from_dict(dict(scenario))


def write_private_yaml(path: Path, data: dict[str, Any], header: str = "") -> None:
    """Write YAML readable by the owner only (it holds credentials), replacing `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(header)
        yaml.safe_dump(data, handle, sort_keys=False)


class SimulatorSet:
    """Every simulator, started together, plus the config file that uses them.

    After `start()` (or entering `async with`): `config_path`, `urls` (whatsapp, realtime,
    twilio, turn, webhook, service), `whatsapp`, `realtime`, `twilio` (the simulator
    objects), `listen_port`, and `options` (the config block, secrets included).
    `state_dir=None` uses a temporary directory, removed by `stop()`.
    """

    def __init__(
        self,
        provider: str = "meta",
        *,
        state_dir: str | Path | None = None,
        config_path: str | Path | None = None,
        scenario: Any = None,
        listen_port: int | None = None,
        turn: bool | None = None,
        host: str = HOST,
    ):
        if provider not in PROVIDERS:
            from whatsapp_call.errors import BadInputError

            raise BadInputError(
                f"Unknown provider {provider!r} for the simulators.", "Use meta or wati."
            )
        self.provider = provider
        self.host = host
        self._state_dir_arg = Path(state_dir).expanduser() if state_dir is not None else None
        self._config_path_arg = Path(config_path).expanduser() if config_path else None
        self._scenario_arg = scenario
        self._listen_port_arg = listen_port
        self._turn = turn
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.state_dir: Path | None = None
        self.config_path: Path | None = None
        self.listen_port: int | None = None
        self.whatsapp: Any = None
        self.realtime: Any = None
        self.twilio: Any = None
        self.urls: dict[str, str] = {}
        self.options: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"SimulatorSet(provider={self.provider!r}, config_path={self.config_path!s})"

    async def __aenter__(self) -> SimulatorSet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> SimulatorSet:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _start(self) -> None:
        # Imported here: engineers A and D own these modules, and `sim` must load fast.
        from .openai_realtime import RealtimeSimulator
        from .twilio import TwilioSimulator
        from .whatsapp import SimConfig, WhatsAppSimulator

        if self._state_dir_arg is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="whatsapp-call-sim-")
            self.state_dir = Path(self._tmp.name)
        else:
            self.state_dir = self._state_dir_arg
            self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self._config_path_arg or self.state_dir / "whatsapp-call.sim.yaml"
        self.listen_port = self._listen_port_arg or free_tcp_port(self.host)
        service = f"http://{self.host}:{self.listen_port}"
        webhook = f"{service}/webhooks/{self.provider}"

        token = secrets.token_urlsafe
        creds = {
            "meta_access_token": "EAAsim" + token(24),
            "meta_app_secret": secrets.token_hex(16),
            "meta_verify_token": token(16),
            "wati_api_token": token(32),
            "wati_webhook_secret": token(24),
            "openai_api_key": "sk-sim-" + token(24),
            "twilio_auth_token": secrets.token_hex(16),
            "service_token": token(24),
        }
        sim_config = SimConfig(
            meta_access_token=creds["meta_access_token"],
            meta_app_secret=creds["meta_app_secret"],
            meta_verify_token=creds["meta_verify_token"],
            meta_webhook_url=f"{service}/webhooks/meta",
            wati_api_token=creds["wati_api_token"],
            wati_webhook_url=f"{service}/webhooks/wati",
            wati_webhook_secret=creds["wati_webhook_secret"],
            default_scenario=build_scenario(self._scenario_arg),
            user_host_addresses=(self.host,),
        )
        self.whatsapp = WhatsAppSimulator(sim_config)
        whatsapp_url = await self.whatsapp.start(host=self.host, port=0)
        self.realtime = RealtimeSimulator(api_key=creds["openai_api_key"])
        realtime_url = await self.realtime.start(host=self.host, port=0)
        account_sid = "AC" + secrets.token_hex(16)
        self.twilio = TwilioSimulator(account_sid, creds["twilio_auth_token"], turn=self._turn)
        twilio_url = await self.twilio.start(host=self.host, port=0)

        turn = self.twilio.turn_server or self.twilio.stun_server
        self.urls = {
            "whatsapp": whatsapp_url,
            "realtime": realtime_url,
            "twilio": twilio_url,
            "turn": (
                turn.urls()["turn_udp"] if self.twilio.relay_available else turn.urls()["stun"]
            ),
            "webhook": webhook,
            "service": service,
        }
        provider_keys: dict[str, Any] = (
            {
                "metaPhoneNumberId": sim_config.phone_number_id,
                "metaAccessToken": creds["meta_access_token"],
                "metaAppSecret": creds["meta_app_secret"],
                "metaVerifyToken": creds["meta_verify_token"],
                "metaGraphBaseUrl": whatsapp_url,
            }
            if self.provider == "meta"
            else {
                "watiTenantId": sim_config.wati_tenant_id,
                "watiApiToken": creds["wati_api_token"],
                "watiBaseUrl": whatsapp_url,
                "watiWebhookSecret": creds["wati_webhook_secret"],
            }
        )
        self.options = {
            "provider": self.provider,
            **provider_keys,
            "voiceBackend": "openai",
            "openaiApiKey": creds["openai_api_key"],
            "openaiRealtimeUrl": realtime_url,
            "twilioAccountSid": account_sid,
            "twilioAuthToken": creds["twilio_auth_token"],
            "twilioApiBaseUrl": twilio_url,
            "webhookUrl": webhook,
            "listenHost": self.host,
            "listenPort": self.listen_port,
            "iceHostAddresses": [self.host],
            "stunServers": [],
            "stateDir": str(self.state_dir),
            "serviceToken": creds["service_token"],
        }
        header = (
            "# Written by `whatsapp-call sim`: points whatsapp-call at local simulators.\n"
            "# Valid only while those simulators run; the credentials are random per run.\n"
        )
        write_private_yaml(self.config_path, {"channels": {"whatsappcall": self.options}}, header)
        relay = (
            "TURN relay via coturn"
            if self.twilio.relay_available
            else "STUN only, no TURN relay (coturn not installed)"
        )
        log.info(
            "simulators up: whatsapp %s, realtime %s, twilio %s (%s); config %s",
            whatsapp_url,
            realtime_url,
            twilio_url,
            relay,
            self.config_path,
        )

    async def stop(self) -> None:
        """Stop every simulator that started (calls in progress end); idempotent."""
        for name in ("whatsapp", "realtime", "twilio"):
            sim = getattr(self, name)
            if sim is None:
                continue
            setattr(self, name, None)
            try:
                await sim.stop()
            except Exception:  # keep stopping the others; say which one failed
                log.exception("stopping the %s simulator failed", name)
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None


def describe(sims: SimulatorSet) -> str:
    """What `whatsapp-call sim` prints once everything runs."""
    relay = (
        f"TURN relay {sims.urls['turn']} (coturn)"
        if sims.twilio is not None and sims.twilio.relay_available
        else f"STUN only at {sims.urls['turn']}: no TURN relay (apt-get install coturn)"
    )
    config = sims.config_path
    return "\n".join(
        [
            f"Simulators running for provider {sims.provider} (Ctrl-C to stop):",
            f"  WhatsApp (Meta Graph + WATI)  {sims.urls['whatsapp']}",
            f"  OpenAI Realtime               {sims.urls['realtime']}",
            f"  Twilio API                    {sims.urls['twilio']}  ({relay})",
            f"  webhooks are delivered to     {sims.urls['webhook']}",
            f"Config written to {config} (mode 600; valid while this runs).",
            "Next, in another terminal:",
            f"  whatsapp-call -c {config} call +14085551234    # one call, in-process",
            f"  whatsapp-call -c {config} serve                # or run the service",
        ]
    )


async def run_until_stopped(
    stop: asyncio.Event,
    *,
    provider: str = "meta",
    scenario: Any = "accept",
    config_out: str | Path | None = None,
    state_dir: str | Path | None = None,
    listen_port: int | None = None,
    turn: bool | None = None,
    as_json: bool = False,
    echo: Callable[[str], Any] = print,
) -> None:
    """Start a `SimulatorSet`, print its URLs, and run until `stop` is set."""
    build_scenario(scenario)  # a bad --scenario fails before anything starts
    async with SimulatorSet(
        provider,
        state_dir=state_dir,
        config_path=config_out,
        scenario=scenario,
        listen_port=listen_port,
        turn=turn,
    ) as sims:
        if as_json:
            ready = {"config_path": str(sims.config_path), "provider": provider, **sims.urls}
            ready["relay"] = bool(sims.twilio.relay_available)
            echo(json.dumps(ready))
        else:
            echo(describe(sims))
        await stop.wait()
        echo("Stopping the simulators…")
    echo("Stopped.")


def run_until_signal(**options: Any) -> None:
    """`run_until_stopped` until SIGINT or SIGTERM, for the `sim` command.

    The event loop runs in a worker thread while the main thread owns the signals: uvicorn
    (>= 0.29) takes SIGINT/SIGTERM over whenever a server runs in the main thread and raises
    them again when it stops, which races when one process runs several servers.
    """
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    failure: list[BaseException] = []

    def on_signal(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(stop.set)

    def worker() -> None:
        try:
            loop.run_until_complete(run_until_stopped(stop, **options))
        except BaseException as exc:  # re-raised in the main thread
            failure.append(exc)
        finally:
            loop.close()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        thread = threading.Thread(target=worker, name="whatsapp-call-sim")
        thread.start()
        while thread.is_alive():
            thread.join(0.2)  # a timed join lets the main thread run the signal handlers
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        raise failure[0]
