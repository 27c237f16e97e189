"""Sources say which keys changed (Discovery.changed), and the collector compares only those:
a change of one app among hundreds costs the same as among a few."""
from __future__ import annotations

import queue
import threading

import pytest

from services.collector import main as collector_main
from services.collector.cache import SourceCache
from services.collector.changes import ChangeLog
from services.collector.main import SourceReport, SourceRunner, _publish
from services.collector.marathon import MarathonSource
from services.collector.source import Discovery, Source
from services.common.config import Settings
from services.common.model import Server, Service, SourceSnapshot
from services.common.wire import SnapshotSender
from tests.marathon_helpers import FAST, drive_until, sim  # noqa: F401 - the fixture

APPS = 300


def deploy(sim) -> None:  # noqa: F811
    for i in range(APPS):
        ports = [10000 + i, 20000 + i] if i == 150 else [10000 + i]
        sim.deploy_app(f"/shop/app{i}", network="BRIDGE", service_ports=ports, instances=2)


def marathon(sim) -> MarathonSource:  # noqa: F811
    return MarathonSource(Settings(marathon=sim.url), resolver=lambda host: "127.0.0.1", refresh_interval=3600,
                          **FAST)


class Recorder:
    def __init__(self):
        self.topics: list[str] = []

    def publish(self, topic: str, payload: dict) -> None:
        self.topics.append(topic)


def test_a_change_of_one_app_names_only_its_keys(sim):  # noqa: F811
    deploy(sim)
    source = marathon(sim)
    try:
        first = drive_until(source, lambda d: len(d.services) == APPS + 1)
        assert first.changed is None  # the first answer: nothing before it to compare with
        assert source.current() is first  # nothing new: the same answer
        sim.scale("/shop/app150", 3)
        scaled = drive_until(source, lambda d: d is not first and len(d.services[150].servers) == 3)
        assert scaled.changed == frozenset({"10150/tcp", "20150/tcp"})
        # unchanged services are the very same objects
        assert all(old is new for old, new in zip(first.services, scaled.services) if old.port not in (10150, 20150))
        (task, *_) = sim.task_ids("/shop/app7")
        sim.kill_task(task)
        killed = drive_until(source, lambda d: len([s for s in d.services if s.port == 10007][0].servers) == 1)
        assert killed.changed == frozenset({"10007/tcp"})
        sim.remove_app("/shop/app9")
        removed = drive_until(source, lambda d: all(s.port != 10009 for s in d.services))
        assert removed.changed == frozenset({"10009/tcp"})
    finally:
        source.close()


def test_the_collector_compares_and_publishes_only_the_keys_that_changed(sim, tmp_path, monkeypatch):  # noqa: F811
    deploy(sim)
    source = marathon(sim)
    compared: list[frozenset | None] = []
    real = ChangeLog.changes

    def changes(self, services, changed=None):
        compared.append(None if changed is None else frozenset(changed))
        return real(self, services, changed)

    monkeypatch.setattr(ChangeLog, "changes", changes)
    updates: queue.Queue = queue.Queue()
    runner = SourceRunner(source, 0.2, updates, threading.Event())
    publisher, cache, senders, summaries = Recorder(), SourceCache(str(tmp_path)), {}, {}
    try:
        def round_() -> SourceReport:
            runner._round()
            report = updates.get_nowait()
            _publish(report, publisher, cache, senders, summaries)
            return report

        report = round_()
        while len(report.snapshot.services) < APPS + 1:
            report = round_()
        assert len(publisher.topics) > APPS  # every key, then the summary
        sim.scale("/shop/app42", 4)
        before = len(publisher.topics)
        report = round_()
        while len([s for s in report.snapshot.services if s.port == 10042][0].servers) != 4:
            report = round_()
        assert report.changed == frozenset({"10042/tcp"}) and compared[-1] == frozenset({"10042/tcp"})
        assert publisher.topics[before:] == ["source.marathon:10042/tcp", "source.marathon"]
        assert summaries["marathon"]["services"] == APPS + 1
    finally:
        source.close()


class Scripted(Source):
    name = "file"

    def __init__(self, *answers: Discovery):
        self.answers = list(answers)

    def current(self) -> Discovery:
        return self.answers.pop(0)

    def wait_for_change(self, timeout, stop):
        pass


def service(port: int, ip: str = "10.0.0.1") -> Service:
    return Service.from_dict({"name": f"app{port}", "port": port, "servers": [{"ip": ip, "port": 80}]})


def test_changed_is_trusted_only_after_the_answer_before_it_was_seen(tmp_path):
    services = tuple(service(1000 + i) for i in range(50))
    moved = services[:10] + (service(1010, "10.0.0.2"),) + services[11:]
    gone = moved[:20] + moved[21:]
    updates: queue.Queue = queue.Queue()
    saved = Discovery(services[:5])  # a restart: the saved state is not what the source answered
    runner = SourceRunner(Scripted(Discovery(services, changed=frozenset({"1000/tcp"})),
                                   Discovery(moved, changed=frozenset({"1010/tcp"})),
                                   Discovery(gone, changed=frozenset({"1020/tcp"}))),
                          60, updates, threading.Event(), saved)
    found = []
    for _ in range(3):
        runner._round()
        found.append(updates.get_nowait())
    # the first `changed` is ignored (the change log held the saved state): every key compared
    assert found[0].changed is None
    assert [r.changed for r in found[1:]] == [frozenset({"1010/tcp"}), frozenset({"1020/tcp"})]
    assert runner._changes.by_key() == {s.key: s for s in gone}


def test_change_log_with_changed_keys_equals_comparing_everything():
    services = tuple(service(1000 + i) for i in range(30))
    steps = [
        (services[:3] + (service(1003, "10.0.0.9"),) + services[4:], {"1003/tcp"}),
        (services[:3] + (service(1003, "10.0.0.9"),) + services[4:29], {"1029/tcp"}),
        ((service(999),) + services[:3] + (service(1003, "10.0.0.9"),) + services[4:29], {"999/tcp", "1003/tcp"}),
    ]
    everything, only = ChangeLog("file", collector_main.log, services), ChangeLog("file", collector_main.log, services)
    everything.changes(services), only.changes(services)
    for now, keys in steps:
        assert sorted(only.changes(now, keys)) == sorted(everything.changes(now))
    assert only.by_key() == {s.key: s for s in steps[-1][0]}


def test_publish_with_changed_keys_sends_the_same_as_without(tmp_path):
    services = [service(2000 + i) for i in range(100)]
    changed = services[40].with_servers([Server("10.0.0.3", 80)])
    with_keys, without = Recorder(), Recorder()
    for publisher, hint in ((with_keys, True), (without, False)):
        senders, summaries = {}, {}
        cache = SourceCache(str(tmp_path / str(hint)))
        for now, keys in ((services, None), ([*services[:40], changed, *services[41:]], frozenset({"2040/tcp"}))):
            snapshot = SourceSnapshot("file", "ok", tuple(now), changed_at=1.0)
            by_key = {s.key: s for s in now} if hint and keys else None
            _publish(SourceReport(snapshot, live=True, changed=keys if hint else None, by_key=by_key), publisher,
                     cache, senders, summaries)
    assert with_keys.topics == without.topics
    assert with_keys.topics[-2:] == ["source.file:2040/tcp", "source.file"]


def test_after_a_failed_publish_the_next_one_compares_every_key(tmp_path, monkeypatch):
    services = [service(3000 + i) for i in range(20)]
    asked: list = []
    real = SnapshotSender.publish

    def publish_spy(self, snapshot, if_changed=False, changed=None, **extra):
        asked.append(changed)
        if fail:
            raise OSError("bus down")
        return real(self, snapshot, if_changed, changed=changed, **extra)

    monkeypatch.setattr(SnapshotSender, "publish", publish_spy)
    publisher, cache, senders, summaries, stale = Recorder(), SourceCache(str(tmp_path)), {}, {}, set()

    def publish(now, keys):
        snapshot = SourceSnapshot("file", "ok", tuple(now), changed_at=1.0)
        _publish(SourceReport(snapshot, live=True, changed=keys), publisher, cache, senders, summaries, stale)

    fail = False
    publish(services, None)
    first = services[:5] + [services[5].with_servers([Server("10.0.0.4", 80)])] + services[6:]
    fail = True
    with pytest.raises(OSError):
        publish(first, frozenset({"3005/tcp"}))
    assert stale == {"file"}
    fail = False
    second = first[:7] + [services[7].with_servers([Server("10.0.0.5", 80)])] + first[8:]
    publish(second, frozenset({"3007/tcp"}))  # says nothing of 3005: every key is compared
    third = second[:9] + [services[9].with_servers([Server("10.0.0.6", 80)])] + second[10:]
    publish(third, frozenset({"3009/tcp"}))
    assert asked == [None, frozenset({"3005/tcp"}), None, frozenset({"3009/tcp"})] and stale == set()
    assert publisher.topics[-2:] == ["source.file:3009/tcp", "source.file"]
