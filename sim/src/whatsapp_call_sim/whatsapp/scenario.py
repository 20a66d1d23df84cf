"""What a simulated callee does, and the simulator's knobs: limits, timings, faults.

A `Scenario` is set per callee number (`WhatsAppSimulator.set_scenario` or
`PUT /_sim/scenarios/{wa_id}`); numbers without one use `SimConfig.default_scenario`.
Every Meta limit from the spec (§1.12) is a field of `Limits`, because Meta has changed
them over time and the product must cope with any value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from whatsapp_call.errors import BadInputError

ANSWERS = ("accept", "reject", "no_answer")
PERMISSIONS = ("granted", "grant_on_request", "deny_on_request", "ignore_request", "none")


@dataclass(frozen=True)
class Scenario:
    """One callee's behaviour.

    answer: "accept" | "reject" | "no_answer" (rings until the ring timeout).
    answer_delay_s: ringing time before the user accepts or rejects.
    hangup_after_s: the user hangs up this long after accepting (None: never by timer).
    permission: "granted" (already allowed), "grant_on_request", "deny_on_request",
        "ignore_request" (never answers a request), "none" (no permission, and the
        user's client cannot show a request: Meta reports error 131026 asynchronously).
    permanent: a grant is "Always allow" (permanent) instead of 7 days (temporary).
    permission_reply_delay_s: how long the user takes to answer a permission request.
    has_whatsapp: False = the number is not on WhatsApp (connect fails with 138001).
    service_window_open: False = no 24 h customer-service window, so a free-form
        interactive permission request fails with 131047 (a template still works).
    ring_timeout_s: overrides `Limits.ring_timeout_s` for "no_answer".
    media: True = a real `SimulatedUser` (aiortc) answers; False = a canned answer SDP and
        no media (fast signalling-only tests, as the spec's §2 allows).
    user_script: opaque; passed to `SimulatedUser(script=...)`.
    name: the WhatsApp profile name shown in webhook `contacts`.
    """

    answer: str = "accept"
    answer_delay_s: float = 0.2
    hangup_after_s: float | None = None
    permission: str = "granted"
    permanent: bool = False
    permission_reply_delay_s: float = 0.1
    has_whatsapp: bool = True
    service_window_open: bool = True
    ring_timeout_s: float | None = None
    media: bool = True
    user_script: Any = None
    name: str = "Sim User"

    def __post_init__(self) -> None:
        if self.answer not in ANSWERS:
            raise BadInputError(
                f"Scenario answer {self.answer!r} is not one of {', '.join(ANSWERS)}.",
                "Use answer='accept', 'reject' or 'no_answer'.",
            )
        if self.permission not in PERMISSIONS:
            raise BadInputError(
                f"Scenario permission {self.permission!r} is not one of {', '.join(PERMISSIONS)}.",
                "Use one of: " + ", ".join(PERMISSIONS) + ".",
            )
        for name in ("answer_delay_s", "permission_reply_delay_s"):
            if getattr(self, name) < 0:
                raise BadInputError(f"Scenario {name} is negative.", f"Give {name} >= 0.")

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Scenario | None = None) -> Scenario:
        """A scenario from JSON (the control endpoint): unknown keys are an error, missing
        keys keep `base`'s values."""
        if not isinstance(data, dict):
            raise BadInputError(
                "A scenario must be a JSON object.", 'Send e.g. {"answer": "reject"}.'
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInputError(
                f"Unknown scenario field(s): {', '.join(unknown)}.",
                "Known fields: " + ", ".join(sorted(known)) + ".",
            )
        return dataclasses.replace(base or cls(), **data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Limits:
    """Meta's limits and timers (spec §1.4, §1.5, §1.12, §1.13, §2); all configurable."""

    connected_calls_per_24h: int = 10  # 138012
    permission_requests_per_24h: int = 1  # 138009
    permission_requests_per_7d: int = 2  # 138009
    permission_checks_per_second: int = 5  # 613
    concurrent_calls: int = 1000  # 138002
    temporary_permission_s: int = 7 * 24 * 3600
    missed_calls_before_revoke: int = 4  # consecutive rejected/unanswered calls
    ring_timeout_s: float = 45.0  # undocumented (~30-60 s)
    connect_timeout_s: float = 20.0  # media not up by then: terminate FAILED 138007
    connect_delay_s: float = 0.05  # POST connect -> connect webhook (d1)
    ringing_delay_s: float = 0.05  # connect webhook -> RINGING (d2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Limits | None = None) -> Limits:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known) if isinstance(data, dict) else ["<not an object>"]
        if unknown:
            raise BadInputError(
                f"Unknown limit field(s): {', '.join(unknown)}.",
                "Known fields: " + ", ".join(sorted(known)) + ".",
            )
        return dataclasses.replace(base or cls(), **data)


@dataclass
class Faults:
    """Fault switches for webhook delivery and the APIs (per simulator, and `PUT /_sim/faults`).

    bad_signature: sign webhooks with a wrong key. duplicate_delivery: send each webhook
    twice. out_of_order: swap each webhook with the next one. delay_s: wait this long before
    each delivery. api_429_count / api_503_count: the next N API requests are answered 429
    (with Retry-After: retry_after_s) / 503.
    """

    bad_signature: bool = False
    duplicate_delivery: bool = False
    out_of_order: bool = False
    delay_s: float = 0.0
    api_429_count: int = 0
    api_503_count: int = 0
    retry_after_s: int = 1

    def update(self, data: dict[str, Any]) -> None:
        known = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(data) - set(known)) if isinstance(data, dict) else ["<not an object>"]
        if unknown:
            raise BadInputError(
                f"Unknown fault switch(es): {', '.join(unknown)}.",
                "Known switches: " + ", ".join(sorted(known)) + ".",
            )
        for key, value in data.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SimConfig:
    """Everything has a working default, so `WhatsAppSimulator()` runs as is."""

    phone_number_id: str = "1234567890"
    meta_access_token: str = field(default="sim-meta-token", repr=False)  # noqa: S105 - public sim token
    meta_app_secret: str = field(default="sim-app-secret", repr=False)  # noqa: S105 - public sim token
    meta_verify_token: str = field(default="sim-verify-token", repr=False)  # noqa: S105 - public sim token
    meta_webhook_url: str | None = None  # where Meta-style webhooks are POSTed
    wati_tenant_id: str = "1000"
    wati_api_token: str = field(default="sim-wati-token", repr=False)  # noqa: S105 - public sim token
    wati_webhook_url: str | None = None  # base URL for WATI webhooks
    wati_webhook_secret: str | None = field(
        default=None, repr=False
    )  # set: WATI webhooks carry X-Hub-Signature-256
    default_scenario: Scenario = Scenario()
    # Extras (all optional):
    display_phone_number: str = "13175551399"  # the business number (digits)
    waba_id: str = "366634483210360"  # the `entry[].id` of Meta webhooks
    verified_name: str = "Sim Business"
    limits: Limits = Limits()
    wati_webhook_shape: str = "per_event"  # "per_event" (astra) | "single" (OpenClaw `event`)
    wati_require_auth: bool = True  # spec §3.1: real clients omit it; switch off to allow that
    meta_connect_includes_contacts: bool = True  # spec §1.9: `contacts` may be absent
    permission_templates: tuple[str, ...] = ("call_permission_request",)
    user_host_addresses: tuple[str, ...] = ("127.0.0.1",)  # SimulatedUser's ICE candidates
    webhook_retry_delays_s: tuple[float, ...] = (0.0, 0.5, 2.0)  # retries after a failure
    webhook_timeout_s: float = 5.0
    calling_enabled: bool = True  # initial settings.calling.status
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        if self.wati_webhook_shape not in ("per_event", "single"):
            raise BadInputError(
                f"wati_webhook_shape {self.wati_webhook_shape!r} is not 'per_event' or 'single'.",
                "Use 'per_event' (one URL per event) or 'single' (one URL, `event` field).",
            )
