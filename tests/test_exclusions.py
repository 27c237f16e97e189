"""Excluded entries (docs/bus.md): every task or entry a source saw but does not serve is in
its snapshot with a reason and a code, the planner adds its own and passes them all on in the
plan; changed_at and the counters ride along. Units, the collector and planner stages on the
bus, and the real collector + planner processes on the Marathon simulator."""
from __future__ import annotations

import json
import os
import queue
import tempfile
import threading

import pytest
import zmq

from services.collector import main as collector_main
from services.collector.cache import SourceCache
from services.collector.exclusions import ExcludedCheck
from services.collector.file_source import FileSource
from services.collector.main import SourceReport, SourceRunner, _publish
from services.collector.marathon import MarathonSource
from services.collector.marathon.apps import parse_app
from services.collector.marathon.builder import ServiceBuilder, build_services
from services.collector.registrator import RegistratorSource
from services.collector.registrator_parse import parse_tree
from services.collector.source import Discovery, Source
from services.common.bus import Endpoint, Message, Publisher, Subscriber
from services.common.config import Settings
from services.common.model import Excluded, Plan, Server, Service, SourceSnapshot
from services.common.wire import SnapshotFollower, SnapshotSender, source_prefix
from services.planner import main as planner
from services.planner.policy import make_plan
from sim.pipeline import Pipeline
from tests.helpers import free_port, wait_until
from tests.keyed_watch import KeyedWatch
from tests.marathon_helpers import FAST, drive_until, servers, sim  # noqa: F401  (sim: a fixture)

LABEL = "com.meltwater.proxymatic.port.0."
ADDRESSES = {"10.0.0.7": "10.0.0.7", "10.0.0.8": "10.0.0.8", "10.0.0.9": "10.0.0.9", "10.0.0.10": "10.0.0.10"}


def resolve(host: str) -> str | None:
    return ADDRESSES.get(host)


def app(app_id: str = "/shop/web", labels: dict | None = None, health: bool = True, version: str = "v1") -> dict:
    return {"id": app_id, "version": version, "labels": labels or {},
            "container": {"type": "DOCKER", "docker": {"network": "BRIDGE", "portMappings": [
                {"containerPort": 8080, "hostPort": 0, "servicePort": 1234, "protocol": "tcp"}]}},
            "healthChecks": [{"protocol": "HTTP", "path": "/health", "portIndex": 0}] if health else []}


def task(number: int, host: str = "10.0.0.7", state: str = "TASK_RUNNING", alive: bool | None = True,
         **extra) -> dict:
    body = {"id": f"shop_web.{number}", "appId": "/shop/web", "host": host, "ports": [31000 + number],
            "state": state, "version": "v1", **extra}
    if alive is not None:
        body.setdefault("healthCheckResults", [{"alive": alive}])
    return body


def by_code(excluded) -> dict[str, list[Excluded]]:
    found: dict[str, list[Excluded]] = {}
    for entry in excluded:
        found.setdefault(entry.code, []).append(entry)
    return found


# ---------------------------------------------------------------------------------------------
# Marathon: the rules (pure)

def test_every_marathon_task_not_served_says_why_and_the_rest_is_served():
    spec = parse_app(app(labels={LABEL + "weight": "heavy", LABEL + "mode": "smtp"}))
    tasks = [
        task(1),  # served
        task(2, host="10.0.0.8", alive=False, healthCheckResults=[
            {"alive": False, "consecutiveFailures": 3, "lastFailureCause": "ConnectException: Connection refused"}]),
        task(3, host="10.0.0.9", alive=None),  # no result yet, never served
        task(4, host="10.0.0.10", state="TASK_KILLING"),
        task(5, host="gone.example"),  # does not resolve
    ]
    result = build_services([(t, spec) for t in tasks], resolve)
    (service,) = result.services
    assert [(s.address, s.weight) for s in service.servers] == [("10.0.0.7:31001", 500)]  # label ignored, served
    codes = by_code(result.excluded)
    assert sorted(codes) == ["health_failing", "health_unknown", "invalid_label", "not_running", "unresolvable"]
    assert codes["health_failing"] == [Excluded(
        source="marathon", code="health_failing",
        reason="health check failing (3 consecutive failures, last: 'ConnectException: Connection refused')",
        app="/shop/web", task="shop_web.2", service="web.shop", key="1234/tcp", address="10.0.0.8:31002")]
    (unknown,) = codes["health_unknown"]
    assert (unknown.task, unknown.address, unknown.key) == ("shop_web.3", "10.0.0.9:31003", "1234/tcp")
    (killing,) = codes["not_running"]
    assert killing.task == "shop_web.4" and "TASK_KILLING" in killing.reason
    (unresolvable,) = codes["unresolvable"]
    assert unresolvable.task == "shop_web.5" and "gone.example" in unresolvable.reason
    assert unresolvable.address == "gone.example:31005"
    labels = sorted(codes["invalid_label"], key=lambda e: e.reason)
    assert [(e.app, e.service, e.key, e.task) for e in labels] == [("/shop/web", "web.shop", "1234/tcp", "")] * 2
    assert f"label {LABEL}mode='smtp' ignored (expected tcp or http)" == labels[0].reason
    assert f"label {LABEL}weight='heavy' ignored" in labels[1].reason
    # the warnings are as they were
    assert any("label com.meltwater.proxymatic.port.0.weight='heavy' ignored" in w for w in result.warnings)
    # and the whole list is valid on the bus
    snapshot = SourceSnapshot("marathon", "ok", result.services, excluded=result.excluded)
    assert SourceSnapshot.from_dict(json.loads(json.dumps(snapshot.to_dict()))).excluded == result.excluded


def test_a_task_served_before_keeps_being_served_while_its_health_is_unknown():
    spec = parse_app(app())
    result = build_services([(task(1, alive=None), spec)], resolve, previously_served=frozenset({"shop_web.1"}))
    assert servers(result, 1234) == ["10.0.0.7:31001"]
    assert result.excluded == ()


def test_apps_and_ports_that_cannot_be_used_are_bad_data():
    unnamed = parse_app({**app(app_id="/---"), "id": "/---"})
    assert unnamed.name is None
    bad_port = parse_app({**app(app_id="/shop/dns"), "container": {"type": "DOCKER", "docker": {
        "network": "BRIDGE", "portMappings": [{"containerPort": 53, "servicePort": 5353, "protocol": "sctp"}]}}})
    result = build_services([({**task(1), "appId": "/---"}, unnamed), ({**task(2), "appId": "/shop/dns"}, bad_port)],
                            resolve)
    assert result.services == ()
    codes = by_code(result.excluded)
    assert list(codes) == ["bad_data"]
    reasons = {e.app: e.reason for e in codes["bad_data"]}
    assert reasons == {"/---": "app id gives no valid service name; app skipped",
                       "/shop/dns": "port 0 has protocol 'sctp'; port skipped"}


def test_incremental_exclusions_equal_a_build_from_scratch_and_are_reused_unchanged():
    spec = parse_app(app(labels={LABEL + "maxconn": "-1"}))
    builder = ServiceBuilder()
    pairs = [(task(1), spec), (task(2, host="10.0.0.8", alive=False), spec)]
    builder.update("/shop/web", pairs, resolve)
    builder.result()
    first = builder.excluded()
    assert first == build_services(pairs, resolve).excluded
    assert {e.code for e in first} == {"health_failing", "invalid_label"}
    builder.update("/shop/web", [(dict(t), s) for t, s in pairs], resolve)  # same inputs: nothing rebuilt
    builder.result()
    assert builder.excluded() is first
    healed = [(task(1), spec), (task(2, host="10.0.0.8", alive=True), spec)]
    builder.update("/shop/web", healed, resolve)
    builder.result()
    assert [e.code for e in builder.excluded()] == ["invalid_label"]
    assert builder.excluded() == build_services(healed, resolve).excluded
    builder.remove("/shop/web")
    builder.result()
    assert builder.excluded() == ()


# ---------------------------------------------------------------------------------------------
# Marathon: the source on the simulator

def test_marathon_source_shows_a_task_without_a_health_result_then_serves_it(sim):  # noqa: F811
    port = free_port()
    sim.deploy_app("/shop/web", service_ports=[port], instances=1, health_check=True)
    source = MarathonSource(Settings(marathon=sim.url, refresh_interval=3600), **FAST)
    try:
        source.current()
        wait_until(lambda: source.stream is not None and source.stream.connected.is_set(), message="event stream")
        source.current()  # the resync the stream's connect asks for
        assert source.cause == "resync"
        (new,) = sim.scale("/shop/web", 2, healthy_on_start=False)
        discovery = drive_until(source, lambda d: any(e.task == new for e in d.excluded))
        (waiting,) = discovery.excluded
        assert (waiting.code, waiting.key, waiting.app) == ("health_unknown", f"{port}/tcp", "/shop/web")
        assert len(servers(discovery, port)) == 1
        assert source.received_at > 0 and "status_update_event" in source.cause
        sim.set_health(new, False)
        discovery = drive_until(source, lambda d: [e.code for e in d.excluded] == ["health_failing"])
        assert discovery.excluded[0].task == new
        sim.set_health(new, True)
        discovery = drive_until(source, lambda d: len(servers(d, port)) == 2)
        assert discovery.excluded == ()
        assert "health_status_changed_event" in source.cause
        events = source.counters.events()
        assert events.get("status_update_event", 0) >= 1 and events.get("health_status_changed_event", 0) >= 2
        assert events.get("poll", 0) >= 1 and source.counters.errors == 0
    finally:
        source.close()


# ---------------------------------------------------------------------------------------------
# registrator and the services file

def test_registrator_entries_not_served_say_why():
    prefix = "/services"
    node = {"key": prefix, "dir": True, "nodes": [
        {"key": f"{prefix}/web", "dir": True, "nodes": [
            {"key": f"{prefix}/web/h1:web.0:80", "value": "10.0.0.7:31001"},
            {"key": f"{prefix}/web/h2:web.1:80", "value": "nohost.example:31002"},
            {"key": f"{prefix}/web/h3:web.2:80", "value": "10.0.0.9:99999"}]},
        {"key": f"{prefix}/bad name", "dir": True, "nodes": [
            {"key": f"{prefix}/bad name/h1:x.0:81", "value": "10.0.0.7:1"}]}]}

    def lookup(host: str) -> str:
        raise OSError(f"{host} does not resolve")

    excluded: dict = {}
    entries, warnings = parse_tree(prefix, node, lookup, excluded)
    assert set(entries) == {f"{prefix}/web/h1:web.0:80"} and set(excluded) == set(warnings)
    unresolvable = excluded[f"{prefix}/web/h2:web.1:80"]
    assert (unresolvable.code, unresolvable.app, unresolvable.service, unresolvable.key, unresolvable.address) == (
        "unresolvable", "web", "web", "80/tcp", "nohost.example:31002")
    assert unresolvable.task == f"{prefix}/web/h2:web.1:80" and "nohost.example" in unresolvable.reason
    bad_port = excluded[f"{prefix}/web/h3:web.2:80"]
    assert (bad_port.code, bad_port.key) == ("bad_data", "80/tcp") and "99999" in bad_port.reason
    assert excluded[f"{prefix}/bad name/h1:x.0:81"].code == "bad_data"


def test_registrator_source_keeps_its_exclusions_with_its_entries():
    def lookup(host: str) -> str:
        if host != "good.example":
            raise OSError(f"{host} does not resolve")
        return "10.0.0.8"

    source = RegistratorSource(Settings(registrator="etcd://127.0.0.1:1/services", refresh_interval=60),
                               resolve=lookup)
    try:
        source._replace_all({}, {}, 1)  # synced, empty (no etcd needed for the rest)
        source.apply_event({"action": "set", "node": {"key": "/services/web/h1:web.0:80", "value": "10.0.0.7:31001"}})
        source.apply_event({"action": "set", "node": {"key": "/services/web/h2:web.1:80", "value": "bad.example:1"}})
        source.apply_event({"action": "set", "node": {"key": "/services/api/h1:api.0:80", "value": "10.0.0.9:31003"}})
        discovery = source.last_known()
        assert {e.code for e in discovery.excluded} == {"unresolvable", "port_taken"}
        taken = next(e for e in discovery.excluded if e.code == "port_taken")
        assert (taken.app, taken.key, taken.address) == ("web", "80/tcp", "10.0.0.7:31001")
        assert "'api'" in taken.reason
        # the host resolves now: the entry is served and its exclusion gone
        source.apply_event({"action": "set", "node": {"key": "/services/web/h2:web.1:80", "value": "good.example:1"}})
        source.apply_event({"action": "delete", "node": {"key": "/services/api/h1:api.0:80"}})
        discovery = source.last_known()
        assert discovery.excluded == ()
        assert [s.address for s in discovery.services[0].servers] == ["10.0.0.7:31001", "10.0.0.8:1"]
    finally:
        source.close()


def write(path: str, services: list) -> None:
    with open(path + ".tmp", "w") as handle:
        json.dump({"services": services}, handle)
    os.replace(path + ".tmp", path)


def test_a_rejected_services_file_names_the_entry_and_its_source_counts(tmp_path):
    path = str(tmp_path / "services.json")
    good = {"name": "web", "port": 1234, "servers": [{"host": "127.0.0.1", "port": 8080}]}
    write(path, [good])
    source = FileSource(path)
    updates: queue.Queue = queue.Queue()
    runner = SourceRunner(source, 60, updates, threading.Event())
    source.wait_for_change = lambda timeout, stop: None  # noqa: E731 - a round never waits here

    runner._round()
    first = updates.get_nowait().snapshot
    assert (first.state, first.excluded) == ("ok", ())
    write(path, [good, {"name": "api", "port": "1235", "servers": [{"host": "api.example", "port": 80}]}])
    runner._round()
    rejected = updates.get_nowait().snapshot
    assert rejected.state == "degraded" and rejected.services == first.services
    (entry,) = rejected.excluded
    assert (entry.source, entry.code, entry.app, entry.service, entry.key) == ("file", "bad_data", "api", "api",
                                                                             "1235/tcp")
    assert "servers[0].ip must be an IP address" in entry.reason and "rejected" in entry.reason
    assert rejected.changed_at == first.changed_at > 0  # the services did not change
    write(path, [good, {"name": "api", "port": 1235, "servers": []}])
    runner._round()
    fixed = updates.get_nowait().snapshot
    assert (fixed.state, fixed.excluded, len(fixed.services)) == ("ok", (), 2)
    assert fixed.changed_at >= rejected.changed_at
    assert source.counters.snapshot() == {"events": {"poll": 1, "file_change": 2}, "errors": 1}


# ---------------------------------------------------------------------------------------------
# the collector: checks, changed_at, publishing

WEB = Service.from_dict({"name": "web", "port": 1234, "servers": [{"ip": "10.0.0.1", "port": 80}]})
WAITING = Excluded(source="file", code="health_unknown", reason="no health check result yet", app="web",
                   key="1234/tcp", address="10.0.0.2:80")


class Scripted(Source):
    """Answers from a script, each with the time it says it received it."""

    name = "file"

    def __init__(self, *answers: tuple[float, Discovery]):
        self.answers = list(answers)

    def current(self) -> Discovery:
        self.received_at, answer = self.answers.pop(0)
        return answer

    def wait_for_change(self, timeout, stop):
        pass


class FakePublisher:
    """Records what a collector publishes, and follows it as the planner would."""

    def __init__(self, source: str = "file"):
        self.sent: list[tuple[str, dict]] = []
        self.follower = SnapshotFollower(source_prefix(source))
        self.snapshots: list[SourceSnapshot] = []

    def publish(self, topic: str, payload: dict) -> None:
        self.sent.append((topic, payload))
        built = self.follower.absorb(Message(topic, len(self.sent), 0.0, "collector@t", "e", payload))
        assert not self.follower.needs_resync
        if built is not None:
            self.snapshots.append(built)


def test_changed_at_moves_with_the_services_only_and_an_exclusion_alone_is_published(tmp_path):
    moved = Service.from_dict({"name": "web", "port": 1234, "servers": [{"ip": "10.0.0.3", "port": 80}]})
    source = Scripted((100.0, Discovery((WEB,), excluded=(WAITING,))), (200.0, Discovery((WEB,))),
                      (300.0, Discovery((moved,))))
    updates: queue.Queue = queue.Queue()
    runner = SourceRunner(source, 60, updates, threading.Event())
    publisher, cache, channels, summaries = FakePublisher(), SourceCache(str(tmp_path)), {}, {}
    for _ in range(3):
        runner._round()
        _publish(updates.get_nowait(), publisher, cache, channels, summaries)
    assert [(s.changed_at, [e.code for e in s.excluded]) for s in publisher.snapshots] == [
        (100.0, ["health_unknown"]), (100.0, []), (300.0, [])]
    assert [s.services for s in publisher.snapshots] == [(WEB,), (WEB,), (moved,)]
    # each change is the key that changed, then the summary
    assert [topic for topic, _ in publisher.sent] == ["source.file:1234/tcp", "source.file"] * 3
    assert summaries["file"] == {"state": "ok", "error": "", "services": 1, "hash": moved.digest, "warnings": []}
    # the same answer again: nothing new on the bus
    source.answers.append((400.0, Discovery((moved,))))
    runner._round()
    _publish(updates.get_nowait(), publisher, cache, channels, summaries)
    assert len(publisher.sent) == 6


def test_a_change_costs_one_key_whatever_the_number_of_services(tmp_path):
    """Keyed states: one service changed among 1,000 is one key message and the summary; a
    service gone is a tombstone; a restarted collector (a new channel) sends every key."""
    services = [Service.from_dict({"name": f"app{i}", "port": 10000 + i, "servers": [{"ip": "10.0.0.1", "port": 80}]})
                for i in range(1000)]
    publisher, cache, channels, summaries = FakePublisher(), SourceCache(str(tmp_path)), {}, {}

    def publish(services_now) -> list[str]:
        before = len(publisher.sent)
        snapshot = SourceSnapshot("file", "ok", tuple(services_now), changed_at=1.0)
        _publish(SourceReport(snapshot, live=True), publisher, cache, channels, summaries)
        return [topic for topic, _ in publisher.sent[before:]]

    assert len(publish(services)) == 1001
    changed = services[500].with_servers([Server("10.0.0.2", 80)])
    assert publish([*services[:500], changed, *services[501:]]) == ["source.file:10500/tcp", "source.file"]
    assert publish([*services[:500], changed, *services[501:999]]) == ["source.file:10999/tcp", "source.file"]
    assert publisher.sent[-2][1] == {"deleted": True}
    latest = publisher.snapshots[-1]
    assert len(latest.services) == 999 and changed in latest.services and latest.hash == summaries["file"]["hash"]


def test_hostile_exclusions_are_made_safe_before_the_bus():
    hostile = Excluded(source="file", code="bad_data", reason="two\nlines http://admin:s3cret@m1:8080/x",
                       app="a" * 5000, task="t\r", key="1234/tcp")
    check = ExcludedCheck("file")
    (safe,) = [e for e in check((hostile, WAITING)) if e.code == "bad_data"]
    assert "\n" not in safe.reason and "s3cret" not in safe.reason and len(safe.app) <= 1024
    snapshot = SourceSnapshot("file", "ok", (WEB,), excluded=check((hostile, WAITING)))
    decoded = SourceSnapshot.from_dict(json.loads(json.dumps(snapshot.to_dict())))
    assert len(decoded.excluded) == 2
    entries = (hostile, WAITING)
    assert check(entries) is check(entries)  # the same tuple in: no work, the same tuple out


def test_collector_heartbeat_counts_events_and_errors(tmp_path):
    path = str(tmp_path / "services.json")
    write(path, [{"name": "web", "port": 1234, "servers": []}])
    settings = Settings(run_dir=str(tmp_path / "run"), services_file=path, node_name="t")
    source = FileSource(path, poll_interval=0.02)
    stop = threading.Event()
    thread = threading.Thread(target=collector_main.run, args=(settings, stop, [source]), daemon=True)
    ctx = zmq.Context()
    beats = Subscriber(ctx, [settings.bus("collector")], ["heartbeat."])
    latest: dict = {}

    def counters() -> dict:
        for message in beats.poll(0.05):
            if message.is_heartbeat:
                latest.update(message.payload["sources"]["file"])
        return latest

    try:
        thread.start()
        wait_until(lambda: counters().get("events", {}).get("poll") == 1, timeout=30, message="the first read counted")
        with open(path, "w") as handle:
            handle.write("{not json")
        wait_until(lambda: counters().get("errors", 0) >= 1, timeout=30, message="the failed read counted")
        write(path, [{"name": "web", "port": 1234, "servers": []}])
        wait_until(lambda: counters().get("state") == "ok" and counters()["events"].get("file_change", 0) >= 2,
                   timeout=30, message="the changes counted")
        assert counters()["errors"] >= 1 and counters()["services"] == 1
    finally:
        stop.set()
        thread.join(10)
        beats.close()
        ctx.term()


# ---------------------------------------------------------------------------------------------
# the planner

def test_planner_exclusions_name_what_won_and_carry_the_sources():
    def service(name, port, source, host_network=False):
        return Service.from_dict({"name": name, "port": port, "source": source, "host_network": host_network,
                                  "servers": [{"ip": "10.0.0.1", "port": 80}, {"ip": "10.0.0.2", "port": 80}]})

    snapshots = {
        "marathon": SourceSnapshot("marathon", "ok", (service("web.shop", 1234, "marathon"),
                                                      service("agent", 31000, "marathon", host_network=True)),
                                   excluded=(Excluded(source="marathon", code="health_failing", reason="health check failing",
                                                      app="/shop/web", task="t1", service="web.shop", key="1234/tcp",
                                                      address="10.0.0.3:80"),), changed_at=1000.0),
        "file": SourceSnapshot("file", "ok", (service("intruder", 1234, "file"), service("stats", 9090, "file")),
                               changed_at=2000.0),
    }
    plan = make_plan(snapshots, Settings(status_endpoint="0.0.0.0:9090", services_file="/x"))
    assert [s.name for s in plan.services] == ["web.shop"]
    codes = by_code(plan.excluded)
    assert sorted(codes) == ["health_failing", "host_network", "port_taken", "reserved_port"]
    (taken,) = codes["port_taken"]
    assert (taken.source, taken.service, taken.key) == ("planner", "intruder", "1234/tcp")
    assert "marathon service 'web.shop'" in taken.reason
    (host,) = codes["host_network"]
    assert (host.service, host.key) == ("agent", "31000/tcp") and "EXPOSE_HOST" in host.reason
    assert codes["reserved_port"][0].key == "9090/tcp"
    assert plan.changed_at == 2000.0
    assert len(plan.notes) == 3  # the notes as they were
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))).excluded == plan.excluded


def test_planner_publishes_when_only_exclusions_change_never_for_changed_at_alone():
    settings = Settings(run_dir=tempfile.mkdtemp(prefix="pm"), services_file="/x", node_name="t")
    ctx = zmq.Context.instance()
    collector = Publisher(ctx, "collector@t", settings.bus("collector"), heartbeat_interval=0.1)
    sender = SnapshotSender(collector, "file")
    watch = KeyedWatch([settings.bus("planner")], ["plan", "heartbeat.planner"], ctx)
    stop = threading.Event()
    thread = threading.Thread(target=planner.run, args=(settings, stop), kwargs={"heartbeat_interval": 0.1},
                              daemon=True)
    thread.start()
    received = watch.plans

    def pump():
        collector.serve_snapshots()
        collector.heartbeat()
        watch.poll(0.02)
        return received

    def beat() -> dict:
        return watch.beats.get("planner@t", {})

    def snapshot(excluded=(), changed_at=10.0):
        return SourceSnapshot("file", "ok", (WEB,), excluded=excluded, changed_at=changed_at)

    try:
        sender.publish(snapshot())
        wait_until(pump, message="first plan")
        assert received[-1].changed_at == 10.0 and received[-1].excluded == ()
        sender.publish(snapshot(excluded=(WAITING,)))
        wait_until(lambda: pump() and received[-1].excluded == (WAITING,), message="a plan for the exclusion alone")
        assert len({p.hash for p in received}) == 1
        count = len(received)
        sender.publish(snapshot(excluded=(WAITING,), changed_at=20.0))  # when, not what
        sender.publish(snapshot())  # a marker: this one is published
        wait_until(lambda: pump() and received[-1].excluded == (), message="the marker plan")
        assert len(received) == count + 1
        wait_until(lambda: pump() is not None and beat().get("plans_published") == len(received),
                   message="plans_published in the heartbeat")
        assert watch.resyncs == 0 and beat()["resyncs"] == 0 and watch.errors == []
    finally:
        stop.set()
        thread.join(5)
        watch.close()
        collector.close()


# ---------------------------------------------------------------------------------------------
# the real collector and planner processes on the Marathon simulator

def test_unhealthy_task_and_bad_label_reach_the_plan_while_the_rest_is_served(sim):  # noqa: F811
    port = free_port()
    sim.deploy_app("/shop/web", network="BRIDGE", service_ports=[port], instances=3, health_check=True,
                   labels={LABEL + "weight": "heavy"})
    first, second, third = sim.task_ids("/shop/web")
    pipeline = Pipeline(["--marathon", sim.url, "--status-endpoint", ""], programs=("planner", "collector"))
    ctx = zmq.Context()
    watch = KeyedWatch([Endpoint.parse(f"ipc://{pipeline.run_dir}/bus/{stage}.pub")
                        for stage in ("collector", "planner")], ["plan", "heartbeat."], ctx)

    def newest(key: str):
        watch.poll(0.05)
        if key == "plan":
            return watch.plan
        return next((beat for beat in watch.beats.values() if beat.get("stage") == key), None)

    try:
        pipeline.start()
        wait_until(lambda: (plan := newest("plan")) and plan.services and len(plan.services[0].servers) == 3,
                   timeout=60, message="every task served")
        sim.set_health(second, False)

        def unhealthy_excluded():
            plan = newest("plan")
            return plan and any(e.code == "health_failing" and e.task == second for e in plan.excluded) and plan

        plan = wait_until(unhealthy_excluded, timeout=30, message="the failing task in plan.excluded")
        (service,) = plan.services
        assert service.name == "web.shop" and len(service.servers) == 2  # the rest is served
        assert {s.weight for s in service.servers} == {500}  # the default: the bad label ignored
        failing = next(e for e in plan.excluded if e.code == "health_failing")
        assert (failing.source, failing.app, failing.service, failing.key) == ("marathon", "/shop/web", "web.shop",
                                                                               f"{port}/tcp")
        assert failing.address.endswith(f":{sim.task(second).ports[0]}")
        (label,) = [e for e in plan.excluded if e.code == "invalid_label"]
        assert (label.app, label.key) == ("/shop/web", f"{port}/tcp")
        assert f"{LABEL}weight='heavy'" in label.reason
        assert plan.changed_at > 0
        # the counters on the heartbeats
        wait_until(lambda: (beat := newest("collector")) and
                   beat["sources"]["marathon"]["events"].get("failed_health_check_event", 0) >= 1,
                   timeout=30, message="events counted on the collector's heartbeat")
        wait_until(lambda: (beat := newest("planner")) and beat["plans_published"] >= 2, timeout=30,
                   message="plans counted on the planner's heartbeat")
        # and the change in the collector's log, with its cause
        log_text = pipeline.log("collector")
        assert f"source marathon: service {port}/tcp (web.shop) -127.0.0.1:{sim.task(second).ports[0]}" in log_text
    finally:
        watch.close()
        ctx.term()
        pipeline.cleanup()


def test_the_planners_excluded_decoder_gives_what_a_full_decode_gives_and_refuses_the_same():
    import random

    from services.common.model import ModelError, excluded_from_list, excluded_to_list
    from services.common.model import ExcludedDecoder

    rng = random.Random(9)
    pool = [Excluded(source="marathon", code=rng.choice(["health_failing", "not_running", "bad_data"]),
                     reason=f"reason {n % 7}", app=f"/a/app{n % 40}", task=f"t{n}", key=f"{10000 + n % 50}/tcp",
                     address=f"10.0.0.{n % 200}:80") for n in range(300)]
    decoder = ExcludedDecoder()
    current = sorted(rng.sample(pool, 100), key=lambda e: (e.key, e.app, e.task))
    for _ in range(60):
        edit = rng.choice(["insert", "remove", "change", "same"])
        if edit == "insert":
            current.insert(rng.randrange(len(current) + 1), rng.choice(pool))
        elif edit == "remove" and current:
            current.pop(rng.randrange(len(current)))
        elif edit == "change" and current:
            at = rng.randrange(len(current))
            current[at] = Excluded(**{**current[at].to_dict(), "reason": f"changed {rng.random()}"})
        raw = json.loads(json.dumps(excluded_to_list(current)))  # fresh objects, as off the bus
        assert decoder.decode(raw) == excluded_from_list(json.loads(json.dumps(raw))) == tuple(current)
    good = excluded_to_list(current)
    for bad in ({"x": 1}, [*good[:3], {**good[0], "code": "nope"}], [*good[:3], {**good[0], "reason": ["a"]}],
                [*good[:3], "text"], [good[0]] * 2001):
        with pytest.raises(ModelError):
            excluded_from_list(bad)
        with pytest.raises(ModelError):
            decoder.decode(bad)
