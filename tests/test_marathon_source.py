"""MarathonSource against the simulator: events, failover, reconnects, watchdog, bursts."""
from __future__ import annotations

import contextlib
import logging
import threading
import time

import pytest

from services.collector.marathon import MarathonSource
from services.collector.source import SourceError
from services.common.config import Settings
from services.common.model import HealthCheck
from sim.marathon import MarathonSim
from tests.helpers import free_port, wait_until
from tests.marathon_helpers import FAST, drive_until, servers, sim  # noqa: F401  (sim: a fixture)

@pytest.fixture
def make_source():
    sources = []

    def make(urls: str, refresh_interval: int = 3600, **kwargs) -> MarathonSource:
        source = MarathonSource(Settings(marathon=urls, refresh_interval=refresh_interval), **{**FAST, **kwargs})
        sources.append(source)
        return source

    yield make
    for source in sources:
        source.close()


def connected(source):
    """Wait for the stream, then absorb the resync it asks for."""
    source.current()  # the first call starts the stream, as the collector's does
    wait_until(lambda: source.stream is not None and source.stream.connected.is_set(), message="event stream")
    source.current()


def test_scale_up_and_down_via_events(sim, make_source):
    sim.deploy_app("/demo/web", service_ports=[10000], instances=1)
    source = make_source(sim.url)
    assert len(servers(source.current())) == 1
    connected(source)
    before = len(sim.api_requests())
    sim.scale("/demo/web", 3)
    drive_until(source, lambda d: len(servers(d)) == 3)
    sim.scale("/demo/web", 1)
    drive_until(source, lambda d: len(servers(d)) == 1)
    assert len(sim.api_requests()) - before <= 4  # events carry the change; at most a refetch per deployment
    assert source.stats["full_syncs"] <= 2


def test_kill_health_fail_and_recover(sim, make_source):
    sim.deploy_app("/demo/web", service_ports=[10000], instances=2, health_check=True)
    source = make_source(sim.url)
    connected(source)
    assert len(servers(source.current())) == 2
    first, second = sim.task_ids("/demo/web")
    sim.kill_task(first, finish=False)  # TASK_KILLING: out at once
    drive_until(source, lambda d: len(servers(d)) == 1)
    sim.finish_kill(first)
    sim.set_health(second, False)
    drive_until(source, lambda d: servers(d) == [])
    sim.set_health(second, True)
    drive_until(source, lambda d: len(servers(d)) == 1)


def test_marathon_health_check_is_also_the_proxy_check(sim, make_source):
    sim.deploy_app("/demo/web", service_ports=[10000], instances=1, health_check=True)  # MESOS_HTTP /health
    source = make_source(sim.url)
    connected(source)
    (service,) = source.current().services
    assert service.health_check == HealthCheck(protocol="http", path="/health", interval_seconds=10,
                                               timeout_seconds=5, fall=3)
    sim.update_app("/demo/web", health_check=False)  # a new config version: the check goes with it
    drive_until(source, lambda d: [s.health_check for s in d.services] == [None] and len(servers(d)) == 1)


def test_new_task_waits_for_its_first_health_result(sim, make_source):
    sim.deploy_app("/demo/web", service_ports=[10000], instances=1, health_check=True)
    source = make_source(sim.url)
    connected(source)
    (new,) = sim.scale("/demo/web", 2, healthy_on_start=False)
    discovery = drive_until(source, lambda d: source.stats["events_applied"] > 0)
    assert len(servers(discovery)) == 1
    sim.set_health(new, True)
    drive_until(source, lambda d: len(servers(d)) == 2)


def test_leader_election_keeps_served_tasks(sim, make_source):
    sim.deploy_app("/demo/web", service_ports=[10000], instances=2, health_check=True)
    source = make_source(sim.url)
    connected(source)
    assert len(servers(source.current())) == 2
    sim.leader_election()  # results vanish, streams drop: reconnect + full resync
    wait_until(lambda: source.stream.connects >= 2, message="reconnect")
    discovery = drive_until(source, lambda d: source.stats["full_syncs"] >= 3)
    assert len(servers(discovery)) == 2
    # a task that starts now has never passed: not served until Marathon says so
    (new,) = sim.scale("/demo/web", 3, healthy_on_start=False)
    source.current()
    assert len(servers(source.current())) == 2
    # a served task leaves when Marathon says it failed
    sim.set_health(sim.task_ids("/demo/web")[0], False)
    drive_until(source, lambda d: len(servers(d)) == 1)


@pytest.mark.parametrize("fault", ["down", "503", "hang", "malformed"])
def test_replica_failover(sim, make_source, fault):
    second = sim.add_replica()
    sim.deploy_app("/demo/web", service_ports=[10000], instances=2)
    first = sim.replicas[0]
    if fault == "down":
        first.stop()
    else:
        first.fault = fault
    source = make_source(sim.urls)
    assert len(servers(source.current())) == 2
    assert second.api_requests()
    connected(source)
    sim.scale("/demo/web", 3)
    drive_until(source, lambda d: len(servers(d)) == 3)


def test_no_replica_answers_raises_source_error(make_source):
    source = make_source(f"http://127.0.0.1:{free_port()},http://127.0.0.1:{free_port()}", events=False)
    with pytest.raises(SourceError):
        source.current()


def test_stream_drop_reconnects_and_resyncs(sim, make_source):
    sim.deploy_app("/demo/web", service_ports=[10000], instances=1)
    source = make_source(sim.url)
    connected(source)
    syncs = source.stats["full_syncs"]
    sim.drop_streams()
    wait_until(lambda: source.stream.connects >= 2, message="reconnect")
    drive_until(source, lambda d: source.stats["full_syncs"] > syncs)
    sim.scale("/demo/web", 2)
    drive_until(source, lambda d: len(servers(d)) == 2)


def test_stalled_stream_is_detected_by_the_watchdog(sim, make_source):
    sim.deploy_app("/demo/web", service_ports=[10000], instances=1)
    source = make_source(sim.url, watchdog=0.5)
    connected(source)
    sim.stall_streams(True)
    sim.scale("/demo/web", 2)  # lost in the stalled stream
    wait_until(lambda: source.stream.reconnects_by_watchdog >= 1, message="watchdog")
    sim.stall_streams(False)
    drive_until(source, lambda d: len(servers(d)) == 2)  # the resync after reconnect finds it


def test_burst_of_100_events_costs_at_most_two_requests(sim, make_source):
    sim.deploy_app("/demo/web", service_ports=[10000], instances=1, health_check=True)
    source = make_source(sim.url)
    connected(source)
    events_before = sim.cluster.events_emitted
    before = len(sim.api_requests())
    sim.scale("/demo/web", 51)  # 50 tasks: >= 100 status/instance/health events + deployment events
    assert sim.cluster.events_emitted - events_before >= 100
    drive_until(source, lambda d: len(servers(d)) == 51)
    wait_until(lambda: source.stats["events"] >= 100, message="events")
    source.current()
    assert len(sim.api_requests()) - before <= 2


def test_polling_alone_works(sim, make_source):
    sim.deploy_app("/demo/web", service_ports=[10000], instances=1)
    source = make_source(sim.url, refresh_interval=1, events=False)
    assert len(servers(source.current())) == 1
    sim.scale("/demo/web", 2)
    stop = threading.Event()
    source.wait_for_change(5, stop)  # returns at the refresh interval
    assert len(servers(source.current())) == 2
    assert source.stream is None


def test_wait_for_change_honours_stop(sim, make_source):
    source = make_source(sim.url)
    source.current()
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    source.wait_for_change(30, stop)
    assert time.monotonic() - started < 5


def test_task_of_an_older_version_uses_that_version(sim, make_source):
    labels = {"com.meltwater.proxymatic.port.0.weight": "100"}
    sim.deploy_app("/demo/web", service_ports=[10000], instances=1, labels=labels)
    source = make_source(sim.url, events=False)
    old_task = sim.task_ids("/demo/web")[0]
    # a new config version, but keep the old task running (as during a rolling upgrade)
    with sim.cluster.lock:
        kept = sim.cluster.tasks[old_task]
        sim.update_app("/demo/web", labels={})
        kept.state = "TASK_RUNNING"
        sim.cluster.tasks[old_task] = kept
    discovery = source.current()
    (service,) = discovery.services
    assert sorted(s.weight for s in service.servers) == [100, 500]
    assert any("/versions/" in p for p in sim.api_requests())
    requests_before = len(sim.api_requests())
    source.refresh_interval = 0  # force full resyncs: the version comes from the cache
    source.current()
    assert not any("/versions/" in p for p in sim.api_requests()[requests_before:])


def test_basic_auth_and_password_never_logged(make_source, caplog):
    with MarathonSim(auth=("admin", "hunter2")) as sim:
        sim.deploy_app("/demo/web", service_ports=[10000])
        down = f"http://admin:hunter2@127.0.0.1:{free_port()}"
        caplog.set_level(logging.DEBUG)
        source = make_source(f"{down},{sim.url}")
        assert len(servers(source.current())) == 1
        connected(source)
        wrong = make_source(sim.url.replace("hunter2", "wrong"), events=False)
        with pytest.raises(SourceError) as error:
            wrong.current()
        assert "401" in str(error.value) and "wrong" not in str(error.value)
    assert "hunter2" not in caplog.text
    assert "admin:***@" in caplog.text


def test_malformed_events_and_hostile_labels_never_crash(sim, make_source):
    hostile = {"com.meltwater.proxymatic.port.0.weight": "1\n000", "com.meltwater.proxymatic.port.0.maxconn": "9" * 50,
               "com.meltwater.proxymatic.port.0.mode": "http server", "com.meltwater.proxymatic.port.0.timeout.client": -1}
    sim.deploy_app("/demo/web", service_ports=[10000], instances=1, labels=hostile)
    source = make_source(sim.url)
    connected(source)
    discovery = source.current()
    assert len(servers(discovery)) == 1
    assert sum("/demo/web" in w for w in discovery.warnings) == 4
    sim.emit_raw("event: status_update_event\ndata: {not json\n\n")
    sim.emit_raw('data: {"eventType": "status_update_event", "appId": 5, "taskId": null}\n\n')
    sim.emit_raw('event: health_status_changed_event\ndata: [1, 2]\n\n: comment\n\n')
    sim.emit_raw("event: deployment_info\ndata: " + "x" * 200000 + "\n\n")
    sim.scale("/demo/web", 2)
    drive_until(source, lambda d: len(servers(d)) == 2)
    assert source.stream.connected.is_set()


def test_outage_backoff_is_not_a_hot_loop_and_recovery_ends_it(sim, make_source):
    sim.deploy_app("/demo/web", service_ports=[10000], instances=1)
    source = make_source(sim.url)
    connected(source)
    replica = sim.replicas[0]
    replica.stop()
    source.refresh_interval = 0  # the poll is due: current() must ask Marathon
    with pytest.raises(SourceError):
        source.current()
    source.refresh_interval = 3600
    stop = threading.Event()
    # The collector's backoff: only news ends a wait early (the stream going down is news once:
    # the source turns degraded), so a second of waits of 0.3 s is a handful of returns, not a
    # hot loop.
    returns, until = 0, time.monotonic() + 1.0
    while time.monotonic() < until:
        source.wait_for_change(0.3, stop)
        returns += 1
        with contextlib.suppress(SourceError):
            source.current()
    assert returns <= 6
    replica.start()  # same port: the stream reconnects, which ends the backoff early
    source.wait_for_change(10, stop)
    assert len(servers(source.current())) == 1
