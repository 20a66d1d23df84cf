"""Prometheus metrics of one service instance, served at GET /metrics.

Each `Metrics` has its own `CollectorRegistry` (not prometheus_client's global one), so tests
and several apps in one process never clash. Label values are kept to small fixed sets: a
provider name from the internet never becomes a label (see `webhook_provider_label`).
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..store.base import CallState

# Voice timings: 50 ms (a fast turn) .. 10 s (a slow call set-up); +Inf catches the rest.
SETUP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0)
TURN_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

LIVE_STATES = tuple(state.value for state in CallState if state != CallState.ENDED)


class Metrics:
    """The counters the orchestrator and the webhook server update.

    `whatsapp_call_calls{state}` counts calls *not ended*, per state; ended calls are counted
    by `whatsapp_call_calls_ended_total{reason}`. Call `call_state_changed(None, new)` for a
    new call, `call_state_changed(old, new)` on every transition (also to "ended"), and
    `call_ended(reason)` once when a call ends.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = Gauge(
            "whatsapp_call_calls", "Calls not ended yet, by state.", ["state"], registry=r
        )
        self.calls_created = Counter("whatsapp_call_calls_created", "Calls created.", registry=r)
        self.calls_ended = Counter(
            "whatsapp_call_calls_ended", "Calls ended, by end reason.", ["reason"], registry=r
        )
        self.setup_seconds = Histogram(
            "whatsapp_call_setup_seconds",
            "Time from sending the offer to two-way media.",
            buckets=SETUP_BUCKETS,
            registry=r,
        )
        self.turn_latency_seconds = Histogram(
            "whatsapp_call_turn_latency_seconds",
            "Per turn: end of the caller's speech to the first AI audio sent.",
            buckets=TURN_BUCKETS,
            registry=r,
        )
        self.webhooks_received = Counter(
            "whatsapp_call_webhooks_received",
            "Webhook requests received, by provider.",
            ["provider"],
            registry=r,
        )
        self.webhooks_rejected = Counter(
            "whatsapp_call_webhooks_rejected",
            "Webhook requests refused, by provider and reason.",
            ["provider", "reason"],
            registry=r,
        )
        self.webhook_events = Counter(
            "whatsapp_call_webhook_events",
            "New (not duplicate) webhook events handed to the orchestrator, by provider.",
            ["provider"],
            registry=r,
        )
        self.events_deduplicated = Counter(
            "whatsapp_call_webhook_events_deduplicated",
            "Webhook events dropped as duplicate deliveries, by provider.",
            ["provider"],
            registry=r,
        )
        self._live: dict[str, int] = dict.fromkeys(LIVE_STATES, 0)
        for state in LIVE_STATES:
            self.calls.labels(state=state).set(0)

    # -- calls -------------------------------------------------------------------------------

    def call_state_changed(self, old: CallState | str | None, new: CallState | str) -> None:
        if old is None:
            self.calls_created.inc()
        else:
            self._add(CallState(old).value, -1)
        self._add(CallState(new).value, +1)

    def call_ended(self, reason: str) -> None:
        self.calls_ended.labels(reason=str(reason)).inc()

    def _add(self, state: str, delta: int) -> None:
        if state in self._live:
            self._live[state] = max(0, self._live[state] + delta)
            self.calls.labels(state=state).set(self._live[state])

    def seed_from_store(self, counts_by_state: Mapping[str, int]) -> None:
        """Start the state gauges from the store's counts (after a restart)."""
        for state in LIVE_STATES:
            self._live[state] = int(counts_by_state.get(state, 0))
            self.calls.labels(state=state).set(self._live[state])

    @property
    def active_calls(self) -> int:
        return sum(self._live.values())

    def observe_setup_seconds(self, seconds: float) -> None:
        self.setup_seconds.observe(seconds)

    def observe_turn_latency_seconds(self, seconds: float) -> None:
        self.turn_latency_seconds.observe(seconds)

    # -- webhooks ----------------------------------------------------------------------------

    def webhook_received(self, provider: str) -> None:
        self.webhooks_received.labels(provider=provider).inc()

    def webhook_rejected(self, provider: str, reason: str) -> None:
        self.webhooks_rejected.labels(provider=provider, reason=reason).inc()

    def webhook_event(self, provider: str, count: int = 1) -> None:
        if count:
            self.webhook_events.labels(provider=provider).inc(count)

    def event_deduplicated(self, provider: str) -> None:
        self.events_deduplicated.labels(provider=provider).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
