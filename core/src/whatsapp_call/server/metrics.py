"""Prometheus metrics of one service instance, served at GET /metrics.

Each `Metrics` has its own `CollectorRegistry` (not prometheus_client's global one), so tests
and several apps in one process never clash. Label values are kept to small fixed sets: a
provider name from the internet never becomes a label (see `webhook_provider_label`).

Media counters (`MEDIA_COUNTERS`: late / dropped outbound frames, underruns, inbound lost /
concealed frames) are read from the calls' own playout and receive objects when scraped, so
nothing is added to the per-frame path.

In `serve --workers N` the calls run in the workers, so the front's own call metrics stay at
zero. Its `refresh()` (awaited by the /metrics route) reads every worker's /metrics, and the
front reports every call family (states, created / ended, set-up and turn histograms, media)
as the total over its workers, under the names and labels one process uses, plus per-worker
call counts. Webhook families stay the front's own: webhooks reach only the front.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ..store.base import CallState

# Voice timings: 50 ms (a fast turn) .. 10 s (a slow call set-up); +Inf catches the rest.
SETUP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0)
TURN_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

LIVE_STATES = tuple(state.value for state in CallState if state != CallState.ENDED)

# Media counters, summed over this process's calls (ended ones included): the name without
# the `whatsapp_call_` prefix and `_total` suffix, and its help text.
MEDIA_COUNTERS = {
    "playout_frames": "Outbound 20 ms audio frames sent to callers.",
    "playout_late_frames": "Outbound frames sent more than half a frame late (event loop behind).",
    "playout_dropped_frames": "Outbound frames skipped to catch up after falling behind.",
    "playout_underruns": "Times the AI's audio ran dry mid-reply (held back, then padded).",
    "inbound_frames": "Inbound audio frames decoded from callers.",
    "inbound_lost_frames": "Inbound packets given up on: not there by their playout time.",
    "inbound_concealed_frames": "Inbound frames synthesised (Opus PLC/FEC) for lost packets.",
    "inbound_fec_recovered_frames": "Of those, frames rebuilt from the caller's in-band FEC.",
    "inbound_unread_frames": "Inbound frames dropped because the bridge did not read them.",
}
MEDIA_CALLS = "whatsapp_call_media_calls"


def media_counts(playout: Any, media: Any) -> dict[str, int]:
    """One call's `MEDIA_COUNTERS`, read from its PlayoutTrack and CallMedia. Cheap (no
    percentiles), as it runs on the media loop."""
    inbound = getattr(media, "inbound_counts", dict)()
    return {
        "playout_frames": getattr(playout, "frames", 0),
        "playout_late_frames": getattr(playout, "late_frames", 0),
        "playout_dropped_frames": getattr(playout, "dropped_frames", 0),
        "playout_underruns": getattr(playout, "underruns", 0),
        "inbound_frames": inbound.get("frames", 0),
        "inbound_lost_frames": inbound.get("lost", 0),
        "inbound_concealed_frames": inbound.get("concealed", 0),
        "inbound_fec_recovered_frames": inbound.get("fec_recovered", 0),
        "inbound_unread_frames": inbound.get("dropped_unread", 0),
    }


# {family name: {(sample name, sorted labels): value}}
Samples = dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]


def read_worker_metrics(text: str, families: Collection[str]) -> tuple[Samples, Samples]:
    """From a worker's /metrics text, the samples of `families`: (counters and histograms,
    gauges). `_created` timestamps are left out: they cannot be added up."""
    counts: Samples = {}
    gauges: Samples = {}
    for family in text_string_to_metric_families(text):
        if family.name not in families:
            continue
        into = gauges if family.type == "gauge" else counts
        into[family.name] = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for s in family.samples
            if not s.name.endswith("_created")
        }
    return counts, gauges


class WorkerMetrics:
    """What the front last read from one worker's /metrics. A restarted worker counts from
    zero again: what its previous lives counted is kept in `base`, so totals never go down."""

    def __init__(self) -> None:
        self.base: Samples = {}  # counters and histograms of earlier processes
        self.counts: Samples = {}  # and of the current one, as last read
        self.gauges: Samples = {}  # empty while the worker does not answer
        self.up = False
        self.restarts = 0

    def update(self, restarts: int, read: tuple[Samples, Samples] | None) -> None:
        """`read` None: the worker did not answer (its last counts stay in the totals)."""
        if restarts != self.restarts:  # a new process: its counters start from zero
            _add(self.base, self.counts)
            self.counts = {}
            self.restarts = restarts
        self.up = read is not None
        if read is None:
            self.gauges = {}
            return
        self.counts, self.gauges = read

    def gauge(self, family: str) -> float:
        """A gauge family's samples added up (e.g. all its `state` labels)."""
        return sum(self.gauges.get(family, {}).values())


def _add(into: Samples, samples: Samples) -> None:
    for family, values in samples.items():
        totals = into.setdefault(family, {})
        for key, value in values.items():
            totals[key] = totals.get(key, 0) + value


class _CallCollector(Collector):
    """The call families at scrape time: this process's own, or in the front of
    `serve --workers N`, the totals over its workers (see the module docstring)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        own = m.call_registry.collect()
        if not m.workers:
            yield from own
            return
        counts: Samples = {}
        gauges: Samples = {}
        for w in m.workers.values():
            _add(counts, w.base)
            _add(counts, w.counts)
            _add(gauges, w.gauges)
        for family in own:
            # The front runs no call: its own gauges (zero: it only reconciles dead workers' calls)
            # are left out; its own counts (calls it reconciled) are added to the workers'.
            gauge = family.type == "gauge"
            theirs = dict((gauges if gauge else counts).get(family.name, {}))
            total = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if s.name.endswith("_created"):  # when the front's series began
                    total.add_sample(s.name, s.labels, s.value)
                    continue
                mine = 0 if gauge else s.value
                total.add_sample(s.name, s.labels, mine + theirs.pop(key, 0))
            for (name, labels), value in theirs.items():  # label values only workers have
                total.add_sample(name, dict(labels), value)
            yield total
        yield from self._per_worker()

    def _per_worker(self) -> Iterator[Metric]:
        calls = GaugeMetricFamily(
            "whatsapp_call_worker_calls", "Calls not ended, per media worker.", labels=["worker"]
        )
        up = GaugeMetricFamily(
            "whatsapp_call_worker_up", "1 when the media worker answered.", labels=["worker"]
        )
        restarts = CounterMetricFamily(
            "whatsapp_call_worker_restarts", "Media worker restarts.", labels=["worker"]
        )
        for worker_id, w in sorted(self.metrics.workers.items()):
            calls.add_metric([worker_id], w.gauge("whatsapp_call_calls"))
            up.add_metric([worker_id], 1 if w.up else 0)
            restarts.add_metric([worker_id], w.restarts)
        yield from (calls, up, restarts)


class _MediaCollector(Collector):
    """This process's media families at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        totals = self.metrics.media_totals()
        for name, help_text in MEDIA_COUNTERS.items():
            yield CounterMetricFamily(f"whatsapp_call_{name}", help_text, value=totals[name])
        yield GaugeMetricFamily(
            MEDIA_CALLS,
            "Calls with live media in this process (or its workers).",
            value=self.metrics.media_calls,
        )


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
        # the call families live in a registry of their own, which `_CallCollector` renders
        # as they are, or in the front added to its workers'
        self.call_registry = CollectorRegistry(auto_describe=True)
        self._live: dict[str, int] = dict.fromkeys(LIVE_STATES, 0)
        self._media: dict[str, tuple[Any, Any]] = {}  # live calls' (playout, media)
        self._media_ended: dict[str, float] = dict.fromkeys(MEDIA_COUNTERS, 0)
        self.workers: dict[str, WorkerMetrics] = {}  # the front's record of its workers
        self._refreshers: list[Callable[[], Awaitable[None]]] = []
        r = self.call_registry
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
        r.register(_MediaCollector(self))
        self.call_families = frozenset(family.name for family in r.collect())
        for state in LIVE_STATES:
            self.calls.labels(state=state).set(0)
        r = self.registry
        r.register(_CallCollector(self))
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

    @property
    def active_calls(self) -> int:
        return sum(self._live.values())

    def observe_setup_seconds(self, seconds: float) -> None:
        self.setup_seconds.observe(seconds)

    def observe_turn_latency_seconds(self, seconds: float) -> None:
        self.turn_latency_seconds.observe(seconds)

    # -- media -------------------------------------------------------------------------------

    def media_started(self, call_id: str, playout: Any, media: Any) -> None:
        """A call's media objects exist: count them from now on."""
        self._media[call_id] = (playout, media)

    def media_ended(self, call_id: str) -> None:
        """The call is over: keep its final counts, let go of its objects."""
        objects = self._media.pop(call_id, None)
        if objects is not None:
            for name, value in media_counts(*objects).items():
                self._media_ended[name] += value

    @property
    def media_calls(self) -> int:
        return len(self._media)

    def media_totals(self) -> dict[str, float]:
        """`MEDIA_COUNTERS` over this process's calls, ended and live."""
        totals = dict(self._media_ended)
        for playout, media in self._media.values():
            for name, value in media_counts(playout, media).items():
                totals[name] += value
        return totals

    # -- workers (the front of `serve --workers N`) --------------------------------------------

    def read_worker(self, worker_id: str, restarts: int, text: str | None) -> None:
        """Take in one worker's /metrics `text` (None: it did not answer). `restarts`, how
        often the worker was restarted, tells a new process (counting from zero) apart.
        ValueError if `text` is not the Prometheus text format."""
        read = None if text is None else read_worker_metrics(text, self.call_families)
        self.workers.setdefault(worker_id, WorkerMetrics()).update(restarts, read)

    def add_refresher(self, refresh: Callable[[], Awaitable[None]]) -> None:
        """`refresh()` is awaited before each render (the front reads its workers there)."""
        self._refreshers.append(refresh)

    async def refresh(self) -> None:
        for refresh in self._refreshers:
            await refresh()

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
