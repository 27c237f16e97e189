"""`GET /metrics`: Prometheus text built from the stages' heartbeats (docs/bus.md, "Counters in
heartbeats"), through the real pipeline, and on hand-made states (malformed heartbeats)."""
from __future__ import annotations

import os
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.applier import haproxy_launch
from services.common.config import Settings
from services.common.latency import LatencyHistogram
from services.common.model import Plan, ProxySettings, Service
from services.status.metrics import render_metrics
from services.status.state import PipelineState
from sim.pipeline import Pipeline
from tests.helpers import TcpBackend, free_port, services_entry, tcp_ask, wait_until, write_services
from tests.launcher_helpers import http_get, processes_of

NODE = "m1"
FAMILIES = {  # family name (as the parser gives it) -> type
    "proxymatic_source_up": "gauge",
    "proxymatic_source_events": "counter",
    "proxymatic_source_errors": "counter",
    "proxymatic_plans_published": "counter",
    "proxymatic_services": "gauge",
    "proxymatic_servers": "gauge",
    "proxymatic_applies": "counter",
    "proxymatic_haproxy_reloads": "counter",
    "proxymatic_plan_resyncs": "counter",
    "proxymatic_change_to_applied_seconds": "histogram",
    "proxymatic_stage_heartbeat_age_seconds": "gauge",
    "proxymatic_planner_last_heard_seconds": "gauge",
    "proxymatic_plan_age_seconds": "gauge",
}


class Scrape:
    """One /metrics answer: family name -> type, and (sample name, labels) -> value."""

    def __init__(self, text: str):
        self.types: dict[str, str] = {}
        self.values: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.values[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def get(self, name: str, **labels: str) -> float | None:
        return self.values.get((name, frozenset(labels.items())))

    def series(self, name: str) -> dict[frozenset, float]:
        return {labels: value for (sample, labels), value in self.values.items() if sample == name}

    def counters(self) -> dict[tuple[str, frozenset], float]:
        """Every sample of a counter or histogram family (what must never go down)."""
        return {key: value for key, value in self.values.items()
                if any(key[0].startswith(name) for name, kind in self.types.items() if kind in ("counter", "histogram"))}


def state_with(payloads: dict, **fields) -> PipelineState:
    state = PipelineState(configured_sources=("file", "marathon"))
    state.heartbeat_payloads = payloads
    for name, value in fields.items():
        setattr(state, name, value)
    return state


def scrape_state(state: PipelineState, node: str = NODE) -> Scrape:
    return Scrape(render_metrics(state, Settings(node_name=node)).decode())


# -- on hand-made states ------------------------------------------------------------------------

def test_every_family_is_there_before_anything_was_heard():
    scraped = scrape_state(state_with({}))
    assert scraped.types == FAMILIES
    # every configured source, even before the collector was heard; counters nobody reported
    # are left out, not 0 (a status stage restarted must never look like a counter reset)
    assert scraped.series("proxymatic_source_up") == {
        frozenset({("source", "file")}): 0.0, frozenset({("source", "marathon")}): 0.0}
    assert not scraped.series("proxymatic_applies_total") and not scraped.series("proxymatic_plans_published_total")
    assert not scraped.series("proxymatic_services")


def test_values_come_from_the_heartbeats_and_the_plan():
    latency = LatencyHistogram()
    for seconds in (0.003, 0.03, 0.04, 7.0):
        latency.observe(seconds)
    service = Service.from_dict({"name": "web", "port": 1234, "servers": [
        {"ip": "10.0.0.1", "port": 80}, {"ip": "10.0.0.2", "port": 80}]})
    udp = Service.from_dict({"name": "dns", "port": 53, "protocol": "udp", "servers": [{"ip": "10.0.0.3", "port": 53}]})
    state = state_with({
        "collector@c": {"stage": "collector", "sources": {
            "file": {"state": "ok", "events": {"change": 3, "poll": 2}, "errors": 1},
            "marathon": {"state": "degraded", "events": {"status_update_event": 7}, "errors": 4}}},
        "planner@c": {"stage": "planner", "plans_published": 9},
        f"applier@{NODE}": {"stage": "applier", "applies": {"haproxy": {"reload": 1, "runtime": 5}, "pen": {"none": 6}},
                            "haproxy_reloads": 2, "plan_resyncs": 1, "change_to_applied": latency.to_dict()},
        "applier@other": {"stage": "applier", "applies": {"haproxy": {"reload": 100}}, "haproxy_reloads": 100},
    }, sources={"file": {"state": "ok"}, "marathon": {"state": "degraded"}},
        plan=Plan((udp, service), ProxySettings(), changed_at=time.time() - 30),
        heartbeats={f"applier@{NODE}": 0.25, "planner@c": 1.5, "planner@c2": 12.0})
    scraped = scrape_state(state)
    assert scraped.get("proxymatic_source_up", source="file") == 1 and scraped.get("proxymatic_source_up", source="marathon") == 0
    assert scraped.get("proxymatic_source_events_total", source="marathon", type="status_update_event") == 7
    assert scraped.get("proxymatic_source_events_total", source="file", type="change") == 3
    assert scraped.get("proxymatic_source_errors_total", source="marathon") == 4
    assert scraped.get("proxymatic_plans_published_total") == 9
    assert scraped.get("proxymatic_services") == 2 and scraped.get("proxymatic_servers") == 3
    # this node's applier only
    assert scraped.series("proxymatic_applies_total") == {
        frozenset({("proxy", "haproxy"), ("action", "reload")}): 1, frozenset({("proxy", "haproxy"), ("action", "runtime")}): 5,
        frozenset({("proxy", "pen"), ("action", "none")}): 6}
    assert scraped.get("proxymatic_haproxy_reloads_total") == 2 and scraped.get("proxymatic_plan_resyncs_total") == 1
    assert scraped.get("proxymatic_change_to_applied_seconds_count") == 4
    assert scraped.get("proxymatic_change_to_applied_seconds_sum") == pytest.approx(7.073)
    assert scraped.get("proxymatic_change_to_applied_seconds_bucket", le="0.005") == 1
    assert scraped.get("proxymatic_change_to_applied_seconds_bucket", le="0.05") == 3
    assert scraped.get("proxymatic_change_to_applied_seconds_bucket", le="+Inf") == 4
    assert scraped.get("proxymatic_stage_heartbeat_age_seconds", stage="planner@c") == 1.5
    # each planner (on a node, each central) and the age of the newest plan (docs/roles.md)
    assert scraped.series("proxymatic_planner_last_heard_seconds") == {
        frozenset({("planner", "planner@c")}): 1.5, frozenset({("planner", "planner@c2")}): 12.0}
    assert 29 <= scraped.get("proxymatic_plan_age_seconds") < 60


@pytest.mark.parametrize("applier", [
    {"stage": "applier", "applies": "many", "haproxy_reloads": "2", "change_to_applied": [1, 2]},
    {"stage": "applier", "applies": {"haproxy": {"reload": -1, "runtime": True, "none": float("nan")}, "pen": [1]},
     "haproxy_reloads": None, "change_to_applied": {"buckets": [[0.1, 3], ["+Inf", 2]], "sum": 1.0}},
    {"stage": "applier", "applies": {"": {"x": 1}, "haproxy": {"x" * 500: 1}},
     "change_to_applied": {"buckets": [[0.1, 1]], "sum": 1.0, "count": 1}},
    {"stage": "applier", "change_to_applied": {"buckets": [["+Inf", 1]], "sum": "1"}},
    "not an object",
])
def test_malformed_heartbeat_values_are_skipped(applier):
    state = state_with({f"applier@{NODE}": applier, "collector@c": {"stage": "collector", "sources": {
        "file": {"events": {"poll": "x", "change": 2}, "errors": -3}, "marathon": "x"}},
        "planner@c": {"stage": "planner", "plans_published": [1]}},
        sources={"file": "not a summary"}, heartbeats={"applier@m1": "soon"})
    scraped = scrape_state(state)
    assert scraped.types == FAMILIES
    assert not scraped.series("proxymatic_applies_total") and not scraped.series("proxymatic_haproxy_reloads_total")
    assert not scraped.series("proxymatic_change_to_applied_seconds_count")
    assert scraped.series("proxymatic_source_events_total") == {frozenset({("source", "file"), ("type", "change")}): 2}
    assert not scraped.series("proxymatic_source_errors_total") and not scraped.series("proxymatic_plans_published_total")
    assert scraped.get("proxymatic_source_up", source="file") == 0


# -- through the pipeline -----------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists(haproxy_launch.haproxy_binary()), reason="haproxy is not installed")
def test_metrics_through_the_pipeline_survive_a_restart_of_the_status_stage():
    backends = [TcpBackend(f"b{i}") for i in range(3)]
    port, status = free_port(), free_port()
    pipeline = Pipeline(["--status-endpoint", f"127.0.0.1:{status}", "--node-name", NODE], services_file=True,
                        programs=("haproxy", "pen", "applier", "planner", "collector", "status"))
    write_services(pipeline.services_file, [services_entry("shop.web", port, backends[0])])

    def scrape() -> Scrape:
        code, text = http_get(f"http://127.0.0.1:{status}/metrics")
        assert code == 200, (code, text[:200])
        return Scrape(text)

    def scraped_when(predicate, message: str, timeout: float = 30.0) -> Scrape:
        def attempt():
            scraped = scrape()
            return scraped if predicate(scraped) else None
        return wait_until(attempt, timeout=timeout, interval=0.1, message=message)

    try:
        pipeline.start()
        wait_until(lambda: tcp_ask(port) == "b0", timeout=30, message="the service served")
        def heard(s: Scrape) -> set[str]:
            return {dict(labels)["stage"] for labels in s.series("proxymatic_stage_heartbeat_age_seconds")}

        # Each stage's counters arrive with its own heartbeat (once a second): waited for, each.
        first = scraped_when(lambda s: s.get("proxymatic_applies_total", proxy="haproxy", action="reload")
                             and s.get("proxymatic_services") == 1 and s.get("proxymatic_servers") == 1
                             and s.get("proxymatic_source_up", source="file") == 1
                             and s.get("proxymatic_haproxy_reloads_total")
                             and (s.get("proxymatic_plans_published_total") or 0) >= 1
                             and any(("source", "file") in labels for labels in s.series("proxymatic_source_events_total"))
                             and heard(s) >= {f"collector@{NODE}", f"planner@{NODE}", f"applier@{NODE}"},
                             "the first plan in /metrics")
        assert first.types == FAMILIES
        assert all(0 <= age < 5 for age in first.series("proxymatic_stage_heartbeat_age_seconds").values())
        assert sum(v for labels, v in first.series("proxymatic_source_events_total").items()
                   if ("source", "file") in labels) >= 1
        assert first.get("proxymatic_source_errors_total", source="file") == 0

        # A membership change: one more runtime apply, one more change→applied observation.
        write_services(pipeline.services_file, [services_entry("shop.web", port, backends[0], backends[1])])
        runtime_before = first.get("proxymatic_applies_total", proxy="haproxy", action="runtime") or 0
        observed_before = first.get("proxymatic_change_to_applied_seconds_count") or 0
        second = scraped_when(
            lambda s: (s.get("proxymatic_applies_total", proxy="haproxy", action="runtime") or 0) > runtime_before
            and (s.get("proxymatic_change_to_applied_seconds_count") or 0) > observed_before
            and s.get("proxymatic_servers") == 2
            and s.get("proxymatic_plans_published_total") > first.get("proxymatic_plans_published_total"),
            "the membership change in /metrics")
        count = second.get("proxymatic_change_to_applied_seconds_count")
        assert 0 < second.get("proxymatic_change_to_applied_seconds_sum") < 30 * count  # seconds, not ms nor epochs
        assert second.get("proxymatic_change_to_applied_seconds_bucket", le="+Inf") == count
        assert second.get("proxymatic_haproxy_reloads_total") == first.get("proxymatic_haproxy_reloads_total")

        # The status stage killed and restarted: the counters come back from the heartbeats, the
        # same or higher, never from 0.
        before = second.counters()
        pipeline.kill("status")
        pipeline.start("status")
        after = scraped_when(lambda s: all(key in s.counters() for key in before), "every counter back after the restart")
        lower = {key: (value, after.counters()[key]) for key, value in before.items() if after.counters()[key] < value}
        assert not lower, lower
        assert after.get("proxymatic_services") == 1 and after.get("proxymatic_servers") == 2

        pipeline.stop()
        wait_until(lambda: not processes_of(pipeline.run_dir), timeout=15, message="every process of the run gone")
    finally:
        pipeline.cleanup()
        for backend in backends:
            backend.close()
