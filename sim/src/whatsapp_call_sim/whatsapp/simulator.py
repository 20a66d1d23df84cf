"""The WhatsApp simulator process: Meta Graph + WATI routes + a control API, one ASGI app.

    sim = WhatsAppSimulator(SimConfig(meta_webhook_url=...))
    base = await sim.start()          # use as metaGraphBaseUrl and watiBaseUrl
    sim.set_scenario("14085551234", Scenario(answer="reject"))
    ...
    await sim.stop()                  # cancels every timer and call, closes every user

Control API (no auth; the simulator binds 127.0.0.1 by default):
GET /_sim/calls, GET /_sim/calls/{id}, POST /_sim/calls/{id}/hangup,
GET|PUT|DELETE /_sim/scenarios/{wa_id}, GET /_sim/scenarios, GET|PUT /_sim/faults,
GET|PUT /_sim/limits, GET /_sim/webhooks, POST /_sim/verify-webhook.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from whatsapp_call.errors import BadInputError, WebhookRejected
from whatsapp_call.serving import AsgiServer

from .meta import MetaGraph
from .network import SimApiError, SimCall, WhatsAppNetwork
from .scenario import Faults, Limits, Scenario, SimConfig
from .wati import WatiCalling
from .webhooks import Delivery, WebhookSender, verify_webhook

log = logging.getLogger("whatsapp_call_sim.whatsapp")


class WhatsAppSimulator:
    """Meta's Graph API and WATI's Calling API over one simulated WhatsApp network."""

    def __init__(self, config: SimConfig | None = None):
        self.config = config or SimConfig()
        self.faults: Faults = self.config.faults
        self.network = WhatsAppNetwork(self.config)
        self.sender = WebhookSender(
            self.faults, self.config.webhook_retry_delays_s, self.config.webhook_timeout_s
        )
        self.meta = MetaGraph(self.network, self.sender, self.config, self.faults)
        self.wati = WatiCalling(self.network, self.sender, self.config, self.faults)
        self.app = Starlette(
            routes=[
                Mount("/_sim", routes=self._control_routes()),
                *self.wati.routes(),
                *self.meta.routes(),
            ]
        )
        self._server: AsgiServer | None = None
        self.url: str | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 = any free port); returns the base URL."""
        self.sender.start()
        self._server = AsgiServer(self.app, host, port)
        self.url = await self._server.start()
        log.info("WhatsApp simulator (Meta + WATI) listening on %s", self.url)
        return self.url

    async def stop(self) -> None:
        """Stop serving, end every call without further webhooks, close every user."""
        if self._server is not None:
            await self._server.stop()
            self._server = None
        await self.network.close()
        await self.sender.stop()

    async def __aenter__(self) -> WhatsAppSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- control from code ---------------------------------------------------------------

    @property
    def calls(self) -> dict[str, SimCall]:
        return self.network.calls

    @property
    def deliveries(self) -> list[Delivery]:
        """Every webhook sent (or recorded without a URL), oldest first."""
        return self.sender.deliveries

    def set_scenario(self, wa_id: str, scenario: Scenario) -> None:
        """What `wa_id` does from now on; resets that user's permission state and counters."""
        self.network.set_scenario(wa_id, scenario)

    def set_faults(self, **switches: Any) -> None:
        """E.g. `sim.set_faults(bad_signature=True, api_429_count=2)`."""
        self.faults.update(switches)

    def set_limits(self, **limits: Any) -> None:
        self.network.limits = Limits.from_dict(limits, self.network.limits)

    async def hangup(self, call_id: str) -> SimCall:
        """The callee hangs up (the terminate webhook follows)."""
        return await self.network.hangup(call_id)

    async def drain_webhooks(self, timeout: float = 10.0) -> None:
        """Wait until every queued webhook has been delivered (or given up on)."""
        await self.sender.drain(timeout)

    async def verify_meta_webhook(self, url: str | None = None) -> str:
        """Meta's GET handshake against the configured (or given) webhook URL."""
        target = url or self.config.meta_webhook_url
        if not target:
            raise BadInputError(
                "No Meta webhook URL to verify.", "Set SimConfig.meta_webhook_url or pass url=."
            )
        return await verify_webhook(target, self.config.meta_verify_token)

    # -- control over HTTP ---------------------------------------------------------------

    def _control_routes(self) -> list[Route]:
        return [
            Route("/calls", self._get_calls, methods=["GET"]),
            Route("/calls/{call_id}", self._get_call, methods=["GET"]),
            Route("/calls/{call_id}/hangup", self._hangup, methods=["POST"]),
            Route("/scenarios", self._get_scenarios, methods=["GET"]),
            Route("/scenarios/{wa_id}", self._scenario, methods=["GET", "PUT", "DELETE"]),
            Route("/faults", self._faults, methods=["GET", "PUT"]),
            Route("/limits", self._limits, methods=["GET", "PUT"]),
            Route("/webhooks", self._webhooks, methods=["GET"]),
            Route("/verify-webhook", self._verify, methods=["POST"]),
        ]

    @staticmethod
    async def _json(request: Request) -> Any:
        try:
            return json.loads(await request.body() or b"{}")
        except ValueError:
            raise BadInputError(
                "The request body is not valid JSON.", "Send a JSON object."
            ) from None

    @staticmethod
    def _error(exc: Exception, status: int = 400) -> JSONResponse:
        body = {"error": getattr(exc, "message", str(exc))}
        if getattr(exc, "hint", None):
            body["hint"] = exc.hint  # type: ignore[attr-defined]
        return JSONResponse(body, status_code=status)

    async def _get_calls(self, request: Request) -> JSONResponse:
        return JSONResponse({"calls": [c.to_dict() for c in self.network.calls.values()]})

    async def _get_call(self, request: Request) -> JSONResponse:
        call = self.network.calls.get(request.path_params["call_id"])
        if call is None:
            return JSONResponse({"error": "no such call"}, status_code=404)
        return JSONResponse(call.to_dict())

    async def _hangup(self, request: Request) -> JSONResponse:
        try:
            call = await self.network.hangup(request.path_params["call_id"])
        except SimApiError:
            return JSONResponse({"error": "no such call"}, status_code=404)
        return JSONResponse(call.to_dict())

    async def _get_scenarios(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "default": self.config.default_scenario.to_dict(),
                "scenarios": {k: v.to_dict() for k, v in self.network.scenarios.items()},
            }
        )

    async def _scenario(self, request: Request) -> JSONResponse:
        wa_id = request.path_params["wa_id"]
        if request.method == "PUT":
            try:
                scenario = Scenario.from_dict(
                    await self._json(request), self.config.default_scenario
                )
            except (BadInputError, TypeError) as exc:
                return self._error(exc)
            self.set_scenario(wa_id, scenario)
        elif request.method == "DELETE":
            self.network.scenarios.pop(wa_id, None)
            self.network.users.pop(wa_id, None)
        return JSONResponse(
            {"wa_id": wa_id, "scenario": self.network.scenario_for(wa_id).to_dict()}
        )

    async def _faults(self, request: Request) -> JSONResponse:
        if request.method == "PUT":
            try:
                self.faults.update(await self._json(request))
            except BadInputError as exc:
                return self._error(exc)
        return JSONResponse(self.faults.to_dict())

    async def _limits(self, request: Request) -> JSONResponse:
        if request.method == "PUT":
            try:
                self.set_limits(**await self._json(request))
            except (BadInputError, TypeError) as exc:
                return self._error(exc)
        return JSONResponse(self.network.limits.__dict__)

    async def _webhooks(self, request: Request) -> JSONResponse:
        return JSONResponse({"webhooks": [d.to_dict() for d in self.sender.deliveries]})

    async def _verify(self, request: Request) -> JSONResponse:
        try:
            body = await self._json(request)
            challenge = await self.verify_meta_webhook(
                body.get("url") if isinstance(body, dict) else None
            )
        except BadInputError as exc:
            return self._error(exc)
        except WebhookRejected as exc:
            return JSONResponse(
                {"verified": False, "error": exc.message, "hint": exc.hint}, status_code=502
            )
        return JSONResponse({"verified": True, "challenge": challenge})
