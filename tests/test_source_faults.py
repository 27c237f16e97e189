"""Discovery sources never die silently: a malformed event is dropped alone (with a warning,
counted) and the stream goes on; a stream that ends is reopened and resynced; a source whose
stream is down and that only polls is published `degraded` with the reason, `ok` again after.
Marathon (simulator) and registrator (scripted fake etcd) alike, unit and through the real
collector process."""
from __future__ import annotations

import json
import logging
import threading
import pytest
import zmq

from services.collector.marathon import MarathonSource
from services.collector.marathon.client import EventStream, parse_replicas
from services.collector.registrator import BadEvent, RegistratorSource
from services.collector.source import DroppedEvents
from services.common.config import Settings
from sim.marathon import MarathonSim
from sim.pipeline import Pipeline
from tests.helpers import wait_until
from tests.keyed_watch import KeyedWatch
from tests.marathon_helpers import FAST, servers, sim  # noqa: F401  (sim: a fixture)
from tests.test_registrator_protocol import FakeEtcd

APP = "/demo/web"
NEW_TASK = "demo_web.new-task-1"


# ---------------------------------------------------------------------------------------------
# Marathon: one malformed event of each kind is dropped alone

def status_update(sim: MarathonSim, **changes) -> dict:
    """A good status_update_event starting a new task of APP on 127.0.0.1:31999."""
    event = {"eventType": "status_update_event", "appId": APP, "taskId": NEW_TASK, "taskStatus": "TASK_RUNNING",
             "host": "127.0.0.1", "ports": [31999], "ipAddresses": [{"ipAddress": "127.0.0.1", "protocol": "IPv4"}],
             "version": sim.cluster.apps[APP].version, "slaveId": "agent-1"}
    event.update(changes)
    return event


BAD_EVENTS = {  # name -> (event type, the event's data given the sim)
    "taskStatus a list": ("status_update_event", lambda sim: status_update(sim, taskStatus=["TASK_RUNNING"])),
    "appId a number": ("status_update_event", lambda sim: status_update(sim, appId=5)),
    "taskId missing": ("status_update_event", lambda sim: {k: v for k, v in status_update(sim).items()
                                                            if k != "taskId"}),
    "ports a string": ("status_update_event", lambda sim: status_update(sim, ports="31999")),
    "port out of range": ("status_update_event", lambda sim: status_update(sim, ports=[70000])),
    "port a boolean": ("status_update_event", lambda sim: status_update(sim, ports=[True])),
    "host an object": ("status_update_event", lambda sim: status_update(sim, host={"name": "x"})),
    "ipAddresses a string": ("status_update_event", lambda sim: status_update(sim, ipAddresses="127.0.0.1")),
    "version a number": ("status_update_event", lambda sim: status_update(sim, version=3)),
    "data a list": ("status_update_event", lambda sim: [status_update(sim)]),
    "alive a string": ("health_status_changed_event",
                       lambda sim: {"appId": APP, "instanceId": "demo_web.marathon-x", "alive": "yes"}),
    "instanceId a list": ("health_status_changed_event",
                          lambda sim: {"appId": APP, "instanceId": ["x"], "alive": True}),
    "runSpecId a number": ("instance_health_changed_event",
                           lambda sim: {"runSpecId": 7, "instanceId": "demo_web.marathon-x", "healthy": False}),
    "condition an object": ("instance_changed_event",
                            lambda sim: {"runSpecId": APP, "instanceId": "demo_web.marathon-x",
                                         "condition": {"Killed": True}}),
    "instanceId missing": ("instance_changed_event", lambda sim: {"runSpecId": APP, "condition": "Killed"}),
    "failed check appId a list": ("failed_health_check_event", lambda sim: {"appId": [APP], "taskId": "x"}),
    "appDefinition a string": ("api_post_event", lambda sim: {"appDefinition": APP}),
    "appDefinition id a number": ("api_post_event", lambda sim: {"appDefinition": {"id": 12}}),
    "terminated appId null": ("app_terminated_event", lambda sim: {"appId": None}),
}


@pytest.fixture
def synced(sim):  # noqa: F811
    """A Marathon source synced with one task of APP, fed events by hand (no stream thread)."""
    sim.deploy_app(APP, service_ports=[10000], instances=1)
    source = MarathonSource(Settings(marathon=sim.url, refresh_interval=3600), events=False, **FAST)
    assert len(servers(source.current())) == 1
    yield source
    source.close()


def feed(source: MarathonSource, event_type: str, data) -> None:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    source._on_event(event_type, raw)  # what the stream thread calls for every event


@pytest.mark.parametrize("case", sorted(BAD_EVENTS))
def test_a_malformed_event_is_dropped_with_a_warning_and_the_next_is_applied(sim, synced, case, caplog):  # noqa: F811
    event_type, make = BAD_EVENTS[case]
    before = servers(synced.current())
    requests_before = len(sim.api_requests())
    with caplog.at_level(logging.WARNING, logger="proxymatic.collector.marathon"):
        feed(synced, event_type, make(sim))
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 1 and event_type in dropped[0], dropped
    assert synced.stats["events_dropped"] == 1
    discovery = synced.current()
    assert servers(discovery) == before  # nothing of it applied
    assert any(w.startswith("event stream: 1 malformed events dropped") and event_type in w
               for w in discovery.warnings)
    feed(synced, "status_update_event", status_update(sim))
    assert servers(synced.current()) == sorted(before + ["127.0.0.1:31999"])
    assert len(sim.api_requests()) == requests_before  # the event carried it: no fetch needed
    assert synced.stats["events_dropped"] == 1


@pytest.mark.parametrize("data", [b"{not json", b"\xff\xfe garbage", b"null", b'"a string"'])
def test_undecodable_data_is_dropped_too(sim, synced, data, caplog):  # noqa: F811
    with caplog.at_level(logging.WARNING, logger="proxymatic.collector.marathon"):
        feed(synced, "status_update_event", data)
    assert synced.stats["events_dropped"] == 1
    assert any("status_update_event event dropped" in r.getMessage() for r in caplog.records)
    feed(synced, "status_update_event", status_update(sim))
    assert "127.0.0.1:31999" in servers(synced.current())


def test_a_bug_while_applying_an_event_drops_it_alone(sim, synced, monkeypatch, caplog):  # noqa: F811
    from services.collector.marathon import events
    handler = events._STEPS["status_update_event"]
    calls = []

    def apply_once_broken(state, event):
        calls.append(event)
        if len(calls) == 1:
            raise RuntimeError("bug")
        return handler.apply(state, event)

    monkeypatch.setitem(events._STEPS, "status_update_event", handler._replace(apply=apply_once_broken))
    with caplog.at_level(logging.WARNING, logger="proxymatic.collector.marathon"):
        feed(synced, "status_update_event", status_update(sim, taskId="demo_web.other"))
    assert synced.stats["events_dropped"] == 1
    assert any("RuntimeError: bug" in r.getMessage() for r in caplog.records)
    feed(synced, "status_update_event", status_update(sim))
    assert "127.0.0.1:31999" in servers(synced.current())


def test_the_stream_thread_survives_any_exception_and_reconnects(sim):  # noqa: F811
    """Even a handler that raises something unexpected never ends the thread: the stream
    is reopened (and the source resyncs on every connect)."""
    sim.deploy_app(APP, service_ports=[10000], instances=1)
    connects = []

    def broken_handler(event_type, data):
        raise RuntimeError("a bug in the handler")

    stream = EventStream(parse_replicas(sim.url), broken_handler, connects.append, watchdog=5,
                         connect_timeout=0.5, backoff_initial=0.05, backoff_max=0.2)
    stream.start()
    try:
        wait_until(lambda: connects, message="first connect")
        sim.scale(APP, 2)  # events: the handler raises
        wait_until(lambda: len(connects) >= 2, message="reconnected after the exception")
        assert stream._thread.is_alive() and stream.health().up
    finally:
        stream.close()
    assert not stream._thread.is_alive()


# ---------------------------------------------------------------------------------------------
# Marathon through the real collector process

class CollectorWatch:
    """The collector's published `source.marathon` snapshots, as they arrive (rebuilt from its
    keyed messages as the planner does; each in the SourceSnapshot's dict form)."""

    def __init__(self, run_dir: str):
        self.ctx = zmq.Context()
        self.watch = KeyedWatch([Settings(run_dir=run_dir).bus("collector")], ["source.marathon"], self.ctx)
        self.seen: list[dict] = []

    def latest(self) -> dict | None:
        before = len(self.watch.history)
        self.watch.poll(0.02)
        self.seen.extend(snapshot.to_dict() for snapshot in self.watch.history[before:])
        return self.seen[-1] if self.seen else None

    def servers(self) -> list[str]:
        latest = self.latest() or {"services": []}
        return sorted(f"{s['ip']}:{s['port']}" for service in latest["services"] if service["port"] == 10000
                      for s in service["servers"])

    def close(self) -> None:
        self.watch.close()
        self.ctx.term()


@pytest.fixture
def collector():
    """Start a collector process on a Marathon URL with REFRESH_INTERVAL 3600: only events
    (and the resync after a stream (re)connect) can bring a change within a test."""
    started: list[tuple[Pipeline, CollectorWatch]] = []

    def start(url: str) -> tuple[Pipeline, CollectorWatch]:
        pipeline = Pipeline(["--marathon", url, "--refresh-interval", "3600"], programs=("collector",)).start()
        watch = CollectorWatch(pipeline.run_dir)
        started.append((pipeline, watch))
        return pipeline, watch

    yield start
    for pipeline, watch in started:
        watch.close()
        pipeline.cleanup()


def full_syncs(sim: MarathonSim) -> int:  # noqa: F811
    return sum(1 for path in sim.api_requests() if "embed=apps.tasks" in path)


def start_synced(sim: MarathonSim, collector) -> tuple[Pipeline, CollectorWatch]:  # noqa: F811
    """A collector on `sim` whose stream is open and whose resync after opening it is done.
    The stream is held back until the first full sync is in, so exactly one resync follows."""
    sim.refuse_streams(503)
    pipeline, watch = collector(sim.url)
    wait_until(lambda: watch.servers(), timeout=30, message="first snapshot")
    syncs = full_syncs(sim)
    sim.refuse_streams(None)
    wait_until(lambda: full_syncs(sim) > syncs and sim.stream_count() == 1 and watch.latest()["state"] == "ok",
               timeout=30, message="stream open and resynced")
    watch.seen.clear()
    return pipeline, watch


def test_collector_picks_up_a_new_task_from_events_right_after_a_malformed_event(sim, collector):  # noqa: F811
    sim.deploy_app(APP, service_ports=[10000], instances=1)
    pipeline, watch = start_synced(sim, collector)
    syncs = full_syncs(sim)
    sim.emit_raw('event: status_update_event\ndata: {"appId": "/demo/web", "taskId": 5, '
                 '"taskStatus": ["TASK_RUNNING"], "ports": "80"}\n\n')
    sim.emit_raw('event: instance_changed_event\ndata: {"runSpecId": "/demo/web", "instanceId": "x", '
                 '"condition": {"a": 1}}\n\n')
    sim.scale(APP, 2)
    wait_until(lambda: len(watch.servers()) == 2, timeout=30, message="the new task published")
    # The warning shows the first drop at once, the second once its few seconds have passed
    # (DroppedEvents: a flood of bad events is not a flood of full snapshots).
    latest = wait_until(lambda: (p := watch.latest()) and any("2 malformed events dropped" in w
                                                              for w in p["warnings"]) and p,
                        timeout=30, message="the warning counting both drops")
    assert latest["state"] == "ok"
    assert full_syncs(sim) == syncs  # the event stream delivered it, not a poll or a resync
    log = pipeline.log("collector")
    assert "status_update_event event dropped" in log and "instance_changed_event event dropped" in log


def test_collector_reopens_a_dropped_stream_and_resyncs_the_change_made_in_the_gap(sim, collector):  # noqa: F811
    sim.deploy_app(APP, service_ports=[10000], instances=1)
    pipeline, watch = start_synced(sim, collector)
    syncs = full_syncs(sim)
    with sim.cluster.lock:  # the stream closes before the change: only a resync can bring it
        sim.drop_streams()
        sim.scale(APP, 3)
    wait_until(lambda: len(watch.servers()) == 3, timeout=30, message="the change made in the gap")
    assert full_syncs(sim) == syncs + 1  # the resync after reopening brought it
    wait_until(lambda: sim.stream_count() == 1, message="stream open again")
    assert [p["state"] for p in watch.seen] == ["ok"] * len(watch.seen)  # reopened at once: never degraded


def test_collector_says_degraded_while_the_stream_is_refused_and_ok_after(collector):
    sim = MarathonSim(auth=("admin", "s3cret")).start()  # noqa: F811
    try:
        sim.deploy_app(APP, service_ports=[10000], instances=1)
        pipeline, watch = collector(sim.url)
        wait_until(lambda: len(watch.servers()) == 1, timeout=30, message="first snapshot")
        wait_until(lambda: sim.stream_count() == 1, timeout=30, message="stream open")
        sim.refuse_streams(503)
        degraded = wait_until(lambda: (p := watch.latest()) and p["state"] == "degraded" and p, timeout=30,
                              message="degraded")
        assert degraded["error"].startswith("event stream down since ")
        assert "HTTP 503" in degraded["error"] and "polling every 3600s" in degraded["error"]
        assert len(degraded["services"]) == 1  # still current: polling works
        sim.scale(APP, 2)  # made while the stream is down
        sim.refuse_streams(None)
        wait_until(lambda: (p := watch.latest()) and p["state"] == "ok" and len(watch.servers()) == 2,
                   timeout=60, message="ok again, with the change resynced")
        assert watch.latest()["error"] == ""
        published = json.dumps(watch.seen)
        assert "s3cret" not in published and "s3cret" not in pipeline.log("collector")
    finally:
        sim.stop()


# ---------------------------------------------------------------------------------------------
# registrator: bad watch events and garbage answers

REGISTRATOR_BAD_EVENTS = {
    "not an object": [1, 2],
    "action a number": {"action": 3, "node": {"key": "/services/web/h:web.1:80", "value": "10.0.0.2:1"}},
    "node a list": {"action": "set", "node": ["/services/web/h:web.1:80"]},
    "key a number": {"action": "set", "node": {"key": 12, "value": "10.0.0.2:1"}},
    "modifiedIndex a string": {"action": "set", "node": {"key": "/services/web/h:web.1:80", "value": "10.0.0.2:1",
                                                          "modifiedIndex": "57"}},
}


def fake_source(fake: FakeEtcd) -> RegistratorSource:
    return RegistratorSource(Settings(registrator=f"etcd://127.0.0.1:{fake.port}/services"), watch_timeout=10,
                             backoff_start=0.05, backoff_max=0.2)


def backends(source: RegistratorSource) -> list[str]:
    return sorted(f"{s.ip}:{s.port}" for service in source.current().services for s in service.servers)


@pytest.mark.parametrize("case", sorted(REGISTRATOR_BAD_EVENTS))
def test_registrator_refuses_a_malformed_event_and_changes_nothing(case):
    fake = FakeEtcd([])
    source = fake_source(fake)
    try:
        before = backends(source)
        with pytest.raises(BadEvent):
            source.apply_event(REGISTRATOR_BAD_EVENTS[case])
        assert backends(source) == before == ["10.0.0.1:1"]
    finally:
        source.close()
        fake.close()


def test_registrator_value_of_the_wrong_shape_skips_that_key_with_a_warning():
    fake = FakeEtcd([])
    source = fake_source(fake)
    try:
        assert backends(source) == ["10.0.0.1:1"]  # the full read done first
        source.apply_event({"action": "set", "node": {"key": "/services/web/h:web.1:80", "value": ["10.0.0.2:1"],
                                                      "modifiedIndex": 57}})
        discovery = source.current()
        assert backends(source) == ["10.0.0.1:1"]
        assert any("h:web.1:80" in w and "not a string" in w for w in discovery.warnings)
    finally:
        source.close()
        fake.close()


@pytest.mark.parametrize("garbage", [b"{not json", b'{"action": "set", "node": [1]}', b'[]',
                                     b'{"action": "set", "node": {"key": 5}}'])
def test_registrator_drops_a_garbage_watch_answer_and_the_watch_goes_on(garbage, caplog):
    good = {"action": "set", "node": {"key": "/services/web/h:web.1:80", "value": "10.0.0.2:1",
                                      "modifiedIndex": 57}}
    fake = FakeEtcd([(200, garbage), (200, json.dumps(good).encode())])
    source = fake_source(fake)
    try:
        with caplog.at_level(logging.WARNING, logger="proxymatic.collector.registrator"):
            source.current()
            wait_until(lambda: backends(source) == ["10.0.0.1:1", "10.0.0.2:1"], message="the good event applied")
        assert source.stats["events_dropped"] == 1
        assert any("watch event dropped" in r.getMessage() for r in caplog.records)
        discovery = source.current()
        assert any(w.startswith("etcd watch: 1 malformed events dropped") for w in discovery.warnings)
        assert discovery.degraded == ""  # one bad answer: the watch goes on, not degraded
        assert source.error == ""
    finally:
        source.close()
        fake.close()


def test_registrator_is_degraded_while_its_watch_keeps_breaking_then_ok():
    # Long polls that break (connection reset) while full reads work: the source only polls.
    good = {"action": "set", "node": {"key": "/services/web/h:web.1:80", "value": "10.0.0.2:1",
                                      "modifiedIndex": 57}}
    fake = FakeEtcd([])
    source = fake_source(fake)
    breaking = threading.Event()
    breaking.set()
    real_watch = source._watch

    def watch():
        if breaking.is_set():
            raise ConnectionResetError("connection reset by peer")
        return real_watch()

    source._watch = watch
    try:
        source.current()
        reason = wait_until(lambda: source.current().degraded, message="degraded")
        assert reason.startswith("etcd watch down since ") and "reading everything every" in reason
        assert "connection reset by peer" in reason
        assert backends(source) == ["10.0.0.1:1"]  # still served, from the full reads
        fake.watch_answers.append((200, json.dumps(good).encode()))
        breaking.clear()
        wait_until(lambda: not source.current().degraded and len(backends(source)) == 2, message="ok again")
    finally:
        source.close()
        fake.close()


def test_registrator_malformed_events_in_a_row_never_make_it_degraded():
    """A malformed event is not a broken watch (the long poll worked): however many come in a
    row, the source stays `ok` (with the warning); each is followed by a full read."""
    fake = FakeEtcd([(200, b"garbage"), (200, b"[]"), (200, b'{"action": "set", "node": [1]}'),
                     (200, b"{not json")])
    source = fake_source(fake)
    try:
        source.current()
        wait_until(lambda: source.stats["events_dropped"] == 4 and source.stats["full_reads"] >= 5,
                   message="four drops, each followed by a full read")
        discovery = source.current()
        assert discovery.degraded == "" and source.error == ""
        assert backends(source) == ["10.0.0.1:1"]
        assert any(w.startswith("etcd watch: ") and "malformed events dropped" in w for w in discovery.warnings)
    finally:
        source.close()
        fake.close()


# ---------------------------------------------------------------------------------------------
# credentials in Marathon URLs

@pytest.mark.parametrize("url", ["http://admin:s3cret@m1:8080", "http://admin:s3c@ret@m1:8080",
                                 "http://admin:s3cret/x@m1:8080", "http://admin:s3cret:x@m1:8080",
                                 "ftp://admin:s3cret@m1:8080", "http://admin:s3cret@:8080"])
def test_no_password_in_a_replica_display_or_a_url_error(url):
    try:
        shown = [replica.display for replica in parse_replicas(url)]
    except ValueError as error:
        shown = [str(error)]
    assert shown and not any("s3c" in text or "ret" in text.replace("***", "") for text in shown), shown


def test_streams_that_keep_ending_at_once_back_off_and_say_degraded(sim):  # noqa: F811
    sim.deploy_app(APP, service_ports=[10000], instances=1)
    source = MarathonSource(Settings(marathon=sim.url, refresh_interval=3600), **FAST)
    stop = threading.Event()
    try:
        source.current()
        wait_until(lambda: source.stream.connected.is_set(), message="stream open")
        sim.replicas[0].close_streams = True  # answered 200, then closed at once, every time
        sim.drop_streams()
        degraded = wait_until(lambda: source.current().degraded, message="degraded")
        assert degraded.startswith("event stream down since ") and "event stream closed" in degraded
        sim.replicas[0].close_streams = False
        sim.scale(APP, 2)  # made while no stream stays open: the resync after reopening brings it
        wait_until(lambda: (source.wait_for_change(0.2, stop), source.current())[1].degraded == ""
                   and len(servers(source.current())) == 2, message="ok again with the change")
    finally:
        stop.set()
        source.close()


def test_registrator_a_bug_while_applying_a_watch_event_drops_it_and_the_watch_goes_on(monkeypatch):
    events = [{"action": "set", "node": {"key": f"/services/web/h:web.{n}:80", "value": f"10.0.0.{n + 1}:1",
                                         "modifiedIndex": 50 + n}} for n in (1, 2)]
    fake = FakeEtcd([(200, json.dumps(event).encode()) for event in events])
    source = fake_source(fake)
    real_apply, calls = source.apply_event, []

    def apply_once_broken(event):
        calls.append(event)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        real_apply(event)

    monkeypatch.setattr(source, "apply_event", apply_once_broken)
    try:
        wait_until(lambda: backends(source) == ["10.0.0.1:1", "10.0.0.3:1"], message="the next event applied")
        assert source.stats["events_dropped"] == 1 and source.stats["full_reads"] == 2  # resynced after it
        assert source._thread.is_alive()
    finally:
        source.close()
        fake.close()


# ---------------------------------------------------------------------------------------------
# a flood of malformed events is not a flood of full snapshots

class Clock:
    """A clock that only moves when told to."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_dropped_events_log_each_drop_and_change_the_warning_at_most_once_per_interval(caplog):
    clock = Clock()
    dropped = DroppedEvents("event stream", logging.getLogger("proxymatic.test"), interval=5.0, log_burst=3,
                            clock=clock)
    with caplog.at_level(logging.WARNING, logger="proxymatic.test"):
        assert dropped.drop("a: bad 1") is True  # the first drop shows at once
        assert dropped.note == "event stream: 1 malformed events dropped (last: a: bad 1)"
        assert [dropped.drop(f"a: bad {n}") for n in range(2, 11)] == [False] * 9
        assert dropped.note.startswith("event stream: 1 ") and dropped.refresh() is False and dropped.pending()
        assert [r.getMessage() for r in caplog.records] == [
            "event stream: malformed event dropped: a: bad 1", "event stream: malformed event dropped: a: bad 2",
            "event stream: malformed event dropped: a: bad 3"]  # the rest waits for the summary line
        clock.now += 5.0
        assert dropped.refresh() is True and not dropped.pending()
        assert dropped.note == "event stream: 10 malformed events dropped (last: a: bad 10)"
        assert caplog.records[-1].getMessage() == ("event stream: 7 more malformed events dropped "
                                                   "(not logged one by one; 10 in all)")
        assert dropped.refresh() is False and dropped.count == 10


def test_a_flood_of_malformed_marathon_events_changes_the_snapshot_once_per_interval(sim, synced, caplog):  # noqa: F811
    clock = Clock()
    synced._dropped.clock = clock
    first = synced.current()
    with caplog.at_level(logging.WARNING, logger="proxymatic.collector.marathon"):
        feed(synced, "status_update_event", {"taskStatus": ["x"]})
        noted = synced.current()
        assert noted is not first and noted.warnings[0].startswith("event stream: 1 malformed events dropped")
        for _ in range(199):
            feed(synced, "status_update_event", {"taskStatus": ["x"]})
            assert synced.current() is noted  # the same answer: the collector publishes nothing
    assert synced.stats["events_dropped"] == 200
    assert sum("event dropped" in r.getMessage() for r in caplog.records) == 20  # the rest summed up later
    clock.now += 60
    assert wakes_by_itself(synced)  # the pending warning woke the waiter (the collector) up by itself
    later = synced.current()
    assert later.warnings[0].startswith("event stream: 200 malformed events dropped (last: status_update_event: ")
    assert later.services == noted.services


def wakes_by_itself(source) -> bool:
    """Whether `source.wait_for_change` (as the collector calls it, an hour's timeout) returns
    on its own within 30 s."""
    stop = threading.Event()
    waiter = threading.Thread(target=source.wait_for_change, args=(3600, stop), daemon=True)
    waiter.start()
    waiter.join(30)
    woke = not waiter.is_alive()
    stop.set()
    waiter.join(10)
    return woke


def test_a_flood_of_malformed_registrator_events_changes_the_snapshot_once_per_interval():
    fake = FakeEtcd([])
    source = fake_source(fake)
    clock = Clock()
    source._dropped.clock = clock
    try:
        source.current()
        source._drop_event(BadEvent("node is not an object"))
        noted = source.current()
        version = source._version
        assert noted.warnings[0] == "etcd watch: 1 malformed events dropped (last: node is not an object)"
        for _ in range(199):
            source._drop_event(BadEvent("node is not an object"))
        assert source._version == version and source.current() is noted
        assert source.stats["events_dropped"] == 200
        clock.now += 60
        assert wakes_by_itself(source)  # the pending warning woke the waiter (the collector) up by itself
        assert source.current().warnings[0].startswith("etcd watch: 200 malformed events dropped")
    finally:
        source.close()
        fake.close()
