"""The planner stage on the bus: keyed source snapshots in from a fake collector, keyed plans
out (docs/bus.md, Keyed states)."""
import tempfile
import threading
import time

import zmq

from services.common.bus import SNAPSHOT_TIMEOUT, Message, Publisher
from services.common.config import Settings
from services.common.model import Service, SourceSnapshot
from services.common.wire import SnapshotSender
from services.planner import main as planner
from tests.helpers import wait_until
from tests.keyed_watch import KeyedWatch


def web(servers: int, port: int = 1234) -> Service:
    return Service.from_dict({"name": f"web{port}", "port": port, "servers": [
        {"ip": f"10.0.0.{i + 1}", "port": 80} for i in range(servers)]})


def snapshot(servers: int) -> SourceSnapshot:
    return SourceSnapshot("file", "ok", (web(servers),))


class Stage:
    """The planner in a thread, a stand-in collector publishing keyed snapshots, and a watch on
    the plans."""

    def __init__(self, beat: float = 0.1):
        self.settings = Settings(run_dir=tempfile.mkdtemp(prefix="pm"), services_file="/x", node_name="t")
        self.ctx = zmq.Context.instance()
        self.beat = beat
        self.collector: Publisher | None = None
        self.last_snapshot_served = 0.0
        self.sender: SnapshotSender | None = None
        self.watch = KeyedWatch([self.settings.bus("planner")], ["plan"], self.ctx)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=planner.run, args=(self.settings, self.stop),
                                       kwargs={"heartbeat_interval": beat}, daemon=True)
        self.thread.start()

    def start_collector(self) -> SnapshotSender:
        self.collector = Publisher(self.ctx, "collector@t", self.settings.bus("collector"), heartbeat_interval=self.beat)
        self.sender = SnapshotSender(self.collector, "file")
        return self.sender

    @property
    def plans(self):
        return self.watch.plans

    def pump(self):
        if self.collector is not None:
            if self.collector.serve_snapshots():
                self.last_snapshot_served = time.monotonic()
            self.collector.heartbeat()
        self.watch.poll(0.02)
        return self.plans

    def planner_beat(self) -> dict:
        return self.watch.beats.get("planner@t", {})

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.watch.close()
        if self.collector is not None:
            self.collector.close()


def test_bursts_are_coalesced_and_the_last_state_wins():
    stage = Stage()
    sender = stage.start_collector()
    try:
        sender.publish(snapshot(1))
        wait_until(stage.pump, message="first plan")
        stage.plans.clear()
        for servers in range(2, 52):  # 50 snapshots in a burst
            sender.publish(snapshot(servers))
        wait_until(lambda: stage.pump() and len(stage.plans[-1].services[0].servers) == 51,
                   message="last state planned")
        assert len(stage.plans) < 10, len(stage.plans)
        # Nothing new: nothing published.
        count = len(stage.plans)
        sender.publish(snapshot(51))
        for _ in range(10):
            stage.pump()
        assert len(stage.plans) == count
        assert stage.watch.resyncs == 0 and stage.watch.errors == []
    finally:
        stage.close()


def test_first_plan_follows_a_collector_that_starts_late():
    """The planner's first snapshot request goes unanswered (no collector yet); it asks again
    on a new socket, and still plans once the collector is there."""
    stage = Stage(beat=1.0)
    try:
        # Wait past the snapshot timeout (2 s) on the planner's own heartbeats, not a sleep.
        beats = []

        def heartbeats_seen() -> bool:
            before = stage.planner_beat()
            stage.pump()
            if stage.planner_beat() is not before:
                beats.append(stage.planner_beat())
            return len(beats) >= 4  # one a second

        wait_until(heartbeats_seen, timeout=30, message="planner heartbeats past the snapshot timeout")
        stage.start_collector().publish(snapshot(2))
        wait_until(stage.pump, timeout=30, message="a plan from the late collector")
        assert len(stage.plans[0].services[0].servers) == 2
    finally:
        stage.close()


class LosesKeys:
    """A publisher whose key messages get lost on the way while `losing` (they are still its
    newest messages, in its snapshot answers): what a subscriber sees when a message is dropped."""

    def __init__(self, publisher: Publisher):
        self.publisher = publisher
        self.losing = False

    def publish(self, topic: str, payload: dict) -> Message:
        if not (self.losing and ":" in topic):
            return self.publisher.publish(topic, payload)
        publisher = self.publisher
        with publisher._lock:
            publisher.seq += 1
            message = Message(topic, publisher.seq, time.time(), publisher.sender, publisher.epoch, payload)
            publisher._last[topic] = message
        return message


def test_a_planner_whose_mirror_disagrees_resyncs_and_converges():
    stage = Stage(beat=5.0)  # no heartbeat shows the gap in time: the summary's hash must
    stage.start_collector()
    lossy = LosesKeys(stage.collector)
    sender = SnapshotSender(lossy, "file")
    try:
        sender.publish(SourceSnapshot("file", "ok", (web(1), web(1, 2000))))
        wait_until(lambda: stage.pump() and len(stage.plans[-1].services) == 2, message="first plan")
        # No snapshot request of the planner's may still be on its way (a request re-sent after
        # SNAPSHOT_TIMEOUT on a loaded machine): its answer would bring the lost key back before
        # the planner's own check, and this test is about that check.
        wait_until(lambda: stage.pump() is not None
                   and time.monotonic() - stage.last_snapshot_served > SNAPSHOT_TIMEOUT + 0.5,
                   timeout=60, message="no snapshot request outstanding")
        lossy.losing = True
        sender.publish(SourceSnapshot("file", "ok", (web(3), web(1, 2000))))  # the 1234/tcp key is lost
        lossy.losing = False
        plan = wait_until(lambda: stage.pump() and len(stage.plans[-1].services[0].servers) == 3
                          and stage.plans[-1], timeout=30, message="the lost key recovered by a resync")
        assert [len(s.servers) for s in plan.services] == [3, 1]
        assert plan.inputs == (("file", SourceSnapshot("file", "ok", (web(3), web(1, 2000))).hash),)
        # at least one: under load a snapshot can cross a live summary and take a second round
        wait_until(lambda: stage.pump() is not None and stage.planner_beat().get("resyncs", 0) >= 1, timeout=30,
                   message="the resync counted in the planner's heartbeat")
        # and no plan was ever made from the disagreeing mirror
        assert all([len(s.servers) for s in p.services] in ([1, 1], [3, 1]) for p in stage.plans)
    finally:
        stage.close()


def test_a_collector_restarted_with_fewer_keys_leaves_no_stale_key_in_the_plan():
    stage = Stage()
    sender = stage.start_collector()
    try:
        sender.publish(SourceSnapshot("file", "ok", (web(1), web(1, 2000), web(1, 3000))))
        wait_until(lambda: stage.pump() and len(stage.plans[-1].services) == 3, message="first plan")
        stage.collector.close()
        stage.collector = None
        # The same sender name, a new process (epoch): it knows one service only.
        sender = stage.start_collector()
        sender.publish(SourceSnapshot("file", "ok", (web(2, 3000),)))
        plan = wait_until(lambda: stage.pump() and [s.port for s in stage.plans[-1].services] == [3000]
                          and stage.plans[-1], timeout=30, message="a plan with the new collector's key alone")
        assert len(plan.services[0].servers) == 2 and plan.hash == stage.watch.summaries["plan"]["hash"]
        wait_until(lambda: stage.pump() is not None and stage.planner_beat().get("resyncs", 0) >= 1, timeout=30,
                   message="the planner resynced the source")
    finally:
        stage.close()
