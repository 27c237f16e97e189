"""A PlanFollower rebuilds exactly the plan a PlanSender published, change after change, whatever
changed (servers, services added or removed, excluded entries with and without keys, settings),
and also after a resync (its mirror forgotten, the whole state again)."""
import json
import random

from services.common.bus import Message
from services.common.model import Excluded, Plan, ProxySettings, Server, Service
from services.common.wire import PlanFollower, PlanSender


class RecordingPublisher:
    """Stands in for bus.Publisher: the messages, round-tripped through JSON as on the wire."""

    def __init__(self):
        self.sent: list[Message] = []
        self.seq = 0

    def publish(self, topic: str, payload: dict) -> Message:
        self.seq += 1
        message = Message(topic, self.seq, 0.0, "planner@test", "e1", json.loads(json.dumps(payload)))
        self.sent.append(message)
        return message

    def take(self) -> list[Message]:
        sent, self.sent = self.sent, []
        return sent


def random_plan(rng: random.Random, ports: list[int]) -> Plan:
    # with_servers sorts them, as decoding does: the same service gives the same digest
    services = tuple(Service(f"s{port}", port).with_servers(
        Server(f"10.0.0.{rng.randint(1, 3)}", 8000 + rng.randint(0, 2), weight=rng.choice((64, 128))) for _ in range(2))
        for port in sorted(rng.sample(ports, rng.randint(0, len(ports)))))
    excluded = tuple(Excluded("marathon", "health_failing", f"reason {rng.randint(0, 2)}",
                              key=f"{rng.choice(ports)}/tcp", task=f"t{n}") for n in range(rng.randint(0, 3)))
    if rng.random() < 0.3:
        excluded += (Excluded("marathon", "bad_data", "app has no ports", app="/x"),)
    settings = ProxySettings(max_connections=rng.choice((100, 200)))
    return Plan(services, settings, excluded=tuple(sorted(excluded, key=lambda e: (e.key, e.app, e.task, e.code))))


def assert_same(built: Plan, plan: Plan) -> None:
    assert built.services == plan.services and built.hash == plan.hash
    assert set(built.excluded) == set(plan.excluded) and len(built.excluded) == len(plan.excluded)


def test_the_follower_rebuilds_every_published_plan():
    rng = random.Random(7)
    ports = list(range(1000, 1012))
    publisher = RecordingPublisher()
    sender, follower = PlanSender(publisher), PlanFollower()
    previous: Plan | None = None
    for step in range(300):
        plan = random_plan(rng, ports) if previous is None or step % 10 == 0 else mutated(rng, previous)
        sender.publish(plan)
        built = None
        for message in publisher.take():
            built = follower.absorb(message) or built
        assert built is not None and not follower.needs_resync, step
        assert_same(built, plan)
        previous = plan
        if step % 37 == 36:  # a resync: the mirror forgotten, the whole state sent again
            follower.reset()
            rebuilt = None
            for message in snapshot_of(plan):
                rebuilt = follower.absorb(message) or rebuilt
            assert rebuilt is not None, step
            assert_same(rebuilt, plan)


def snapshot_of(plan: Plan) -> list[Message]:
    """What a snapshot answer holds: every key's newest message, then the summary."""
    fresh = RecordingPublisher()
    PlanSender(fresh).publish(plan)
    return fresh.take()


def mutated(rng: random.Random, plan: Plan) -> Plan:
    """One server's weight changed in one service (the common change: served in place)."""
    if not plan.services:
        return plan
    index = rng.randrange(len(plan.services))
    service = plan.services[index]
    servers = (Server(service.servers[0].ip, service.servers[0].port, weight=rng.choice((32, 64, 128, 256))),
               *service.servers[1:])
    services = plan.services[:index] + (service.with_servers(servers),) + plan.services[index + 1:]
    return Plan(services, plan.settings, excluded=plan.excluded)


def random_source(rng: random.Random, ports: list[int], previous: dict[str, Service]) -> dict[str, Service]:
    services = dict(previous)
    for _ in range(rng.randint(1, 3)):
        port = rng.choice(ports)
        key = f"{port}/tcp"
        if key in services and rng.random() < 0.3:
            del services[key]
        else:
            services[key] = Service(f"s{port}", port, source="marathon").with_servers(
                Server(f"10.0.0.{rng.randint(1, 3)}", 8000 + n) for n in range(rng.randint(1, 2)))
    return services


def test_one_follower_for_sources_and_plans_rebuilds_every_source_snapshot():
    """The planner's SourceFollower (services by key, the keys changed) and the SnapshotFollower
    (services in key order) are the same KeyedFollower as the PlanFollower: each rebuilds exactly
    what a SnapshotSender published, excluded-only keys and keyless entries included, resyncs
    included; a sender told which keys changed publishes the same messages as one that compares
    all of them."""
    from services.common.model import SourceSnapshot
    from services.common.wire import SnapshotFollower, SnapshotSender, SourceFollower, source_prefix

    rng = random.Random(3)
    ports = list(range(2000, 2010))
    hinted_bus, full_bus = RecordingPublisher(), RecordingPublisher()
    hinted, full = SnapshotSender(hinted_bus, "marathon"), SnapshotSender(full_bus, "marathon")
    ordered, by_key = SnapshotFollower(source_prefix("marathon")), SourceFollower("source.marathon")
    services: dict[str, Service] = {}
    for step in range(300):
        before = services
        services = random_source(rng, ports, services)
        excluded = tuple(Excluded("marathon", "health_failing", "failing", key=f"{rng.choice(ports)}/tcp", task=f"t{n}")
                         for n in range(rng.randint(0, 2)))
        if rng.random() < 0.3:
            excluded += (Excluded("marathon", "bad_data", "app has no ports", app="/x"),)
        snapshot = SourceSnapshot("marathon", "ok", tuple(services.values()), excluded=excluded)
        changed = {key for key in before.keys() | services.keys() if before.get(key) is not services.get(key)}
        report = hinted.publish(snapshot, changed=changed)
        expected = full.publish(snapshot)
        assert (report.changed, report.gone, report.hash) == (expected.changed, expected.gone, expected.hash), step
        messages = hinted_bus.take()
        assert [(m.topic, m.payload) for m in messages] == [(m.topic, m.payload) for m in full_bus.take()]
        if step % 41 == 40:  # a resync: the mirrors forgotten, the whole state again
            ordered.reset()
            by_key.reset()
            fresh = RecordingPublisher()
            SnapshotSender(fresh, "marathon").publish(snapshot)
            messages = fresh.take()
        built = update = None
        for message in messages:
            built = ordered.absorb(message) or built
            update = by_key.absorb(message) or update
        assert built is not None and update is not None and not ordered.needs_resync, step
        assert built.services == tuple(sorted(services.values(), key=lambda s: (s.port, s.protocol)))
        assert built.hash == snapshot.hash == update.hash and built.excluded == update.snapshot.excluded
        assert sorted(built.excluded, key=repr) == sorted(excluded, key=repr)
        assert update.by_key == services
        moved = {key for key in changed if before.get(key) != services.get(key)}
        assert update.changed is None or moved <= update.changed, step
