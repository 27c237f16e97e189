"""`GET /metrics`: Prometheus text format, built with prometheus-client from what the stages
report in their heartbeats (see docs/bus.md, "Counters in heartbeats").

Every counter comes from the stage that counts it, never from the status stage: a restarted
status stage shows the same values again one heartbeat later, and a counter it has not heard of
yet is left out rather than shown as 0 (which Prometheus would take for a reset). The status
stage adds only what it knows itself: the newest plan's size and age, the sources' states and
how long ago each stage (and each planner: on a node, each central's) was heard.

A heartbeat value that is not what docs/bus.md says (wrong type, negative, a histogram that is
not one) is skipped, never an error: /metrics always answers. Each scrape builds its families
from one copy of the state, taken under the state's lock, in a registry of its own.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from prometheus_client.core import (
    CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from services.common.config import Settings
from services.common.latency import LatencyHistogram
from services.status.state import PipelineState

log = logging.getLogger("proxymatic.status")

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
# Bounds against a hostile or broken heartbeat: label values are short strings, and one
# heartbeat cannot make a scrape huge.
MAX_LABEL = 200
MAX_SERIES = 1000


@dataclass(frozen=True)
class _View:
    """What one scrape reads, copied under the state's lock (the payloads themselves are never
    changed once absorbed: a heartbeat replaces its sender's payload)."""

    node: str
    configured_sources: tuple[str, ...]
    sources: dict[str, Any]
    payloads: dict[str, Any]
    ages: dict[str, float]
    plan_counts: tuple[int, int] | None  # services, servers; None before the first plan
    plan_age: float | None = None  # seconds since the newest plan's newest change; None: unknown

    @classmethod
    def of(cls, state: PipelineState, settings: Settings) -> "_View":
        with state.lock:
            return cls(settings.node, tuple(state.configured_sources), dict(state.sources),
                       dict(state.heartbeat_payloads), dict(state.heartbeats),
                       state.plan_counts if state.plan is not None else None,
                       state.plan_age() if state.plan is not None else None)

    def stage_payloads(self, stage: str) -> list[dict]:
        """The newest heartbeat payload of every sender of `stage`, by sender name."""
        return [payload for sender, payload in sorted(self.payloads.items())
                if isinstance(payload, dict) and payload.get("stage") == stage
                and isinstance(sender, str) and sender.startswith(stage + "@")]

    @property
    def applier(self) -> dict | None:
        """This node's applier's newest heartbeat (other nodes' appliers are theirs to report)."""
        payload = self.payloads.get(f"applier@{self.node}")
        return payload if isinstance(payload, dict) else None


def _count(value: Any) -> float | None:
    """A counter's value from a heartbeat: a finite number >= 0, else None (skipped)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def _label(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= MAX_LABEL else None


def _items(value: Any) -> list[tuple[str, Any]]:
    """A heartbeat object's entries with usable keys, bounded; [] for anything but an object."""
    if not isinstance(value, dict):
        return []
    out = [(key, item) for key, item in value.items() if _label(key) is not None]
    return sorted(out)[:MAX_SERIES]


class PipelineCollector:
    """A prometheus-client collector over one view of the pipeline's state."""

    def __init__(self, view: _View):
        self.view = view

    def collect(self) -> Iterator[Metric]:
        for build in (self._sources, self._source_events, self._source_errors, self._plans_published,
                      self._plan_size, self._applies, self._haproxy_reloads, self._plan_resyncs, self._change_to_applied,
                      self._heartbeat_ages, self._planners_heard, self._plan_age):
            try:
                yield from build()
            except Exception:  # a bug here must not cost the other families (nor the answer)
                log.exception("status: /metrics: %s failed", build.__name__)

    # -- collector ----------------------------------------------------------------------------

    def _sources(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("proxymatic_source_up",
                               "1 when the discovery source is ok, 0 when degraded or initializing.",
                               labels=["source"])
        names = list(self.view.configured_sources) + sorted(
            name for name in self.view.sources if _label(name) is not None and name not in self.view.configured_sources)
        for name in names[:MAX_SERIES]:
            summary = self.view.sources.get(name)
            state = summary.get("state") if isinstance(summary, dict) else None
            up.add_metric([name], 1.0 if state == "ok" else 0.0)
        yield up

    def _collector_sources(self) -> list[tuple[str, dict]]:
        out = []
        for payload in self.view.stage_payloads("collector"):
            out += [(name, summary) for name, summary in _items(payload.get("sources")) if isinstance(summary, dict)]
        return out

    def _source_events(self) -> Iterable[Metric]:
        family = CounterMetricFamily("proxymatic_source_events_total",
                                     "Events (and poll answers) each discovery source received, by type.",
                                     labels=["source", "type"])
        totals: dict[tuple[str, str], float] = {}
        for name, summary in self._collector_sources():
            for kind, value in _items(summary.get("events")):
                count = _count(value)
                if count is not None and len(totals) < MAX_SERIES:
                    totals[(name, kind)] = totals.get((name, kind), 0.0) + count
        for labels, value in sorted(totals.items()):
            family.add_metric(list(labels), value)
        yield family

    def _source_errors(self) -> Iterable[Metric]:
        family = CounterMetricFamily("proxymatic_source_errors_total",
                                     "Failures of each discovery source (requests, streams, bad data).",
                                     labels=["source"])
        totals: dict[str, float] = {}
        for name, summary in self._collector_sources():
            count = _count(summary.get("errors"))
            if count is not None:
                totals[name] = totals.get(name, 0.0) + count
        for name, value in sorted(totals.items()):
            family.add_metric([name], value)
        yield family

    # -- planner ------------------------------------------------------------------------------

    def _plans_published(self) -> Iterable[Metric]:
        family = CounterMetricFamily("proxymatic_plans_published_total", "Plans the planner published.")
        counts = [c for p in self.view.stage_payloads("planner") if (c := _count(p.get("plans_published"))) is not None]
        if counts:
            family.add_metric([], sum(counts))
        yield family

    def _plan_size(self) -> Iterable[Metric]:
        services = GaugeMetricFamily("proxymatic_services", "Services in the newest plan.")
        servers = GaugeMetricFamily("proxymatic_servers", "Servers (backends) in the newest plan.")
        if self.view.plan_counts is not None:
            services.add_metric([], float(self.view.plan_counts[0]))
            servers.add_metric([], float(self.view.plan_counts[1]))
        yield services
        yield servers

    # -- applier (this node's) ----------------------------------------------------------------

    def _applies(self) -> Iterable[Metric]:
        family = CounterMetricFamily("proxymatic_applies_total",
                                     "Plans applied by this node's applier, by proxy and what the proxy did.",
                                     labels=["proxy", "action"])
        applier = self.view.applier
        series = 0
        for proxy, actions in _items(applier.get("applies") if applier else None):
            for action, value in _items(actions):
                count = _count(value)
                if count is not None and series < MAX_SERIES:
                    family.add_metric([proxy, action], count)
                    series += 1
        yield family

    def _haproxy_reloads(self) -> Iterable[Metric]:
        yield self._applier_counter("proxymatic_haproxy_reloads_total", "haproxy_reloads",
                                    "HAProxy reloads this node's applier asked for (failed ones included).")

    def _plan_resyncs(self) -> Iterable[Metric]:
        yield self._applier_counter("proxymatic_plan_resyncs_total", "plan_resyncs",
                                    "Snapshots of the plan this node's applier asked for because a plan summary "
                                    "disagreed with the services it had received (a message lost).")

    def _applier_counter(self, name: str, field: str, help_text: str) -> Metric:
        """One counter of this node's applier's heartbeat (left out until heard, see above)."""
        family = CounterMetricFamily(name, help_text)
        applier = self.view.applier
        count = _count(applier.get(field)) if applier else None
        if count is not None:
            family.add_metric([], count)
        return family

    def _change_to_applied(self) -> Iterable[Metric]:
        name = "proxymatic_change_to_applied_seconds"
        help_text = "From a discovery source learning of a change to this node's proxies serving it."
        applier = self.view.applier
        data = applier.get("change_to_applied") if applier else None
        if data is None:
            yield HistogramMetricFamily(name, help_text)
            return
        try:
            buckets, total = LatencyHistogram.cumulative_buckets(data)
        except ValueError as error:
            log.debug("status: /metrics: skipping the applier's change_to_applied: %s", error)
            yield HistogramMetricFamily(name, help_text)
            return
        if not math.isfinite(total) or total < 0 or len(buckets) > 100:
            yield HistogramMetricFamily(name, help_text)
            return
        yield HistogramMetricFamily(name, help_text, buckets=[(le, float(count)) for le, count in buckets],
                                    sum_value=total)

    # -- status -------------------------------------------------------------------------------

    def _heartbeat_ages(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("proxymatic_stage_heartbeat_age_seconds",
                                   "Seconds since each stage (<stage>@<node>) was last heard on the bus.",
                                   labels=["stage"])
        for sender, age in sorted(self.view.ages.items())[:MAX_SERIES]:
            seconds = _count(age)
            if _label(sender) is not None and seconds is not None:
                family.add_metric([sender], seconds)
        yield family


    def _planners_heard(self) -> Iterable[Metric]:
        """On a node, each central's planner: how long ago it was heard (a central gone shows
        as a growing value while the node keeps serving its last plan)."""
        family = GaugeMetricFamily("proxymatic_planner_last_heard_seconds",
                                   "Seconds since each planner (planner@<node>: a central) was last heard on the bus.",
                                   labels=["planner"])
        for sender, age in sorted(self.view.ages.items())[:MAX_SERIES]:
            seconds = _count(age)
            if _label(sender) is not None and sender.startswith("planner@") and seconds is not None:
                family.add_metric([sender], seconds)
        yield family

    def _plan_age(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("proxymatic_plan_age_seconds",
                                   "Seconds since the newest change in the newest plan heard (the plan served once "
                                   "applied); it grows while no planner is reachable or nothing changes.")
        seconds = _count(self.view.plan_age)
        if seconds is not None:
            family.add_metric([], seconds)
        yield family


def render_metrics(state: PipelineState, settings: Settings) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(_View.of(state, settings)))
    return generate_latest(registry)
