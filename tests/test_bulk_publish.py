"""A bulk change of a keyed state (the planner's first plan at a cold start, a collector's first
snapshot) crosses the bus without loss: its key messages go to the publisher's snapshots only
and the summary, marked `catch_up`, makes each live subscriber take that state's snapshot
(docs/bus.md, Bulk changes). Thousands of keys published while the subscriber reads nothing
(sent live, they would overflow its QUEUE_HWM): the subscriber rebuilds the state with no
resync."""
import zmq

from services.common.bus import BULK_KEYS, QUEUE_HWM, Endpoint, Publisher
from services.common.model import Plan, ProxySettings, Server, Service, SourceSnapshot
from services.common.wire import PlanSender, SnapshotSender
from tests.helpers import wait_until
from tests.keyed_watch import KeyedWatch

KEYS = 3 * QUEUE_HWM  # three times what a subscriber's queue holds


def services(count: int, servers: int = 3, first_port: int = 10000) -> tuple[Service, ...]:
    return tuple(Service(f"s{port}", port).with_servers(
        Server(f"10.0.{n}.{port % 250 + 1}", 8000 + n) for n in range(servers))
        for port in range(first_port, first_port + count))


class Bus:
    """A publisher, and a watch on it that is subscribed and live (its first snapshot done and
    a live message received) before the test publishes its bulk."""

    def __init__(self, tmp_path, prefix: str):
        self.ctx = zmq.Context()
        endpoint = Endpoint.parse(f"ipc://{tmp_path}/p.pub")
        self.publisher = Publisher(self.ctx, "planner@t", endpoint)
        self.watch = KeyedWatch([endpoint], [prefix], self.ctx)

    def pump(self) -> KeyedWatch:
        self.publisher.serve_snapshots()
        return self.watch.poll(0.02)

    def live(self, publish, seen) -> None:
        """`publish()` until `seen()` says the watch got it after its first snapshot."""
        wait_until(lambda: self.pump() and self.watch.subscriber.snapshot_complete(), message="first snapshot")
        publish()
        wait_until(lambda: self.pump() and seen(), message="a live message")

    def close(self) -> None:
        self.watch.close()
        self.publisher.close()
        self.ctx.term()


def test_a_cold_start_plan_of_thousands_of_keys_arrives_without_a_resync(tmp_path):
    bus = Bus(tmp_path, "plan")
    sender = PlanSender(bus.publisher)
    try:
        bus.live(lambda: sender.publish(Plan(services(2), ProxySettings())),
                 lambda: bus.watch.plan is not None and len(bus.watch.plan.services) == 2)
        big = Plan(services(KEYS), ProxySettings())
        report = sender.publish(big)  # nothing read meanwhile: live, most of it would be lost
        assert len(report.changed) == KEYS - 2 > BULK_KEYS
        # A change right after it, before the subscriber has read anything: held while the
        # state catches up, applied after the snapshot.
        changed = Plan(services(1, servers=2) + big.services[1:], ProxySettings())
        assert sender.publish(changed).changed == (big.services[0].key,)
        plan = wait_until(lambda: bus.pump().plan is not None and bus.watch.plan.hash == changed.hash
                          and bus.watch.plan, timeout=30, message="the whole plan")
        assert plan.services == changed.services
        assert bus.watch.resyncs == 0 and bus.watch.errors == []
        assert bus.watch.subscriber.catch_ups == 1  # a snapshot of the plan, not a resync
        # and no plan was ever built from part of it
        assert all(len(p.services) in (2, KEYS) for p in bus.watch.plans)
    finally:
        bus.close()


def test_a_small_change_still_goes_live(tmp_path):
    bus = Bus(tmp_path, "plan")
    sender = PlanSender(bus.publisher)
    try:
        bus.live(lambda: sender.publish(Plan(services(BULK_KEYS), ProxySettings())),
                 lambda: bus.watch.plan is not None and len(bus.watch.plan.services) == BULK_KEYS)
        assert bus.watch.subscriber.catch_ups == 0 and bus.watch.resyncs == 0
    finally:
        bus.close()


def test_a_collectors_first_snapshot_of_thousands_of_keys_arrives_without_a_resync(tmp_path):
    bus = Bus(tmp_path, "source.")
    sender = SnapshotSender(bus.publisher, "marathon")
    try:
        bus.live(lambda: sender.publish(SourceSnapshot("marathon", "initializing", ())),
                 lambda: "marathon" in bus.watch.snapshots)
        snapshot = SourceSnapshot("marathon", "ok", services(KEYS))
        sender.publish(snapshot)
        got = wait_until(lambda: bus.pump().snapshots["marathon"].state == "ok" and bus.watch.snapshots["marathon"],
                         timeout=30, message="the whole source")
        assert got.services == snapshot.services and got.hash == snapshot.hash
        assert bus.watch.resyncs == 0 and bus.watch.subscriber.catch_ups == 1
    finally:
        bus.close()
