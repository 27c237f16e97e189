"""The planner stage on the bus: snapshots in from a fake collector, plans out."""
import tempfile
import threading

import zmq

from services.common.bus import Publisher, Subscriber
from services.common.config import Settings
from services.common.model import Plan, Service, SourceSnapshot
from services.planner import main as planner
from tests.helpers import wait_until


def snapshot(servers: int) -> dict:
    service = Service.from_dict({"name": "web", "port": 1234, "servers": [
        {"ip": f"10.0.0.{i + 1}", "port": 80} for i in range(servers)]})
    return SourceSnapshot("file", "ok", (service,)).to_dict()


def test_bursts_are_coalesced_and_the_last_state_wins():
    settings = Settings(run_dir=tempfile.mkdtemp(prefix="pm"), services_file="/x", node_name="t")
    ctx = zmq.Context.instance()
    collector = Publisher(ctx, "collector@t", settings.bus("collector"), heartbeat_interval=0.1)
    plans = Subscriber(ctx, [settings.bus("planner")], ["plan"])
    stop = threading.Event()
    thread = threading.Thread(target=planner.run, args=(settings, stop), daemon=True)
    thread.start()
    received: list[Plan] = []

    def pump():
        collector.serve_snapshots()
        collector.heartbeat()
        received.extend(Plan.from_dict(m.payload) for m in plans.poll(0.02) if m.topic == "plan")
        return received

    try:
        collector.publish("source.file", snapshot(1))
        wait_until(lambda: pump(), message="first plan")
        received.clear()
        for servers in range(2, 52):  # 50 snapshots in a burst
            collector.publish("source.file", snapshot(servers))
        wait_until(lambda: pump() and len(received[-1].services[0].servers) == 51, message="last state planned")
        assert len(received) < 10, len(received)
        # Nothing new: nothing published.
        count = len(received)
        collector.publish("source.file", snapshot(51))
        for _ in range(10):
            pump()
        assert len(received) == count
    finally:
        stop.set()
        thread.join(5)
        plans.close()
        collector.close()


def test_first_plan_follows_a_collector_that_starts_late():
    """The planner's first snapshot request goes unanswered (no collector yet); it asks again
    on a new socket, and still plans once the collector is there."""
    settings = Settings(run_dir=tempfile.mkdtemp(prefix="pm"), services_file="/x", node_name="t")
    ctx = zmq.Context.instance()
    plans = Subscriber(ctx, [settings.bus("planner")], ["plan"])
    stop = threading.Event()
    thread = threading.Thread(target=planner.run, args=(settings, stop), daemon=True)
    thread.start()
    beats = []
    collector = None
    try:
        # Wait past the snapshot timeout (2 s) on the planner's own heartbeats, not a sleep.
        def heartbeats_seen() -> bool:
            beats.extend(m for m in plans.poll(0.1) if m.is_heartbeat)
            return len(beats) >= 4  # one a second

        wait_until(heartbeats_seen, timeout=30, message="planner heartbeats past the snapshot timeout")
        collector = Publisher(ctx, "collector@t", settings.bus("collector"), heartbeat_interval=0.1)
        collector.publish("source.file", snapshot(2))
        received = []

        def pump():
            collector.serve_snapshots()
            collector.heartbeat()
            received.extend(Plan.from_dict(m.payload) for m in plans.poll(0.02) if m.topic == "plan")
            return received

        wait_until(pump, timeout=30, message="a plan from the late collector")
        assert len(received[0].services[0].servers) == 2
    finally:
        stop.set()
        thread.join(5)
        plans.close()
        if collector is not None:
            collector.close()
