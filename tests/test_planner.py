from services.common.config import Settings
from services.common.model import Service, SourceSnapshot
from services.common.model import proxy_weight
from services.planner.policy import divide_maxconn, make_plan


def svc(name, port, source, servers=(("10.0.0.1", 80, 500, None),), **extra):
    return Service.from_dict({"name": name, "port": port, "source": source, **extra,
                              "servers": [{"ip": ip, "port": p, "weight": w, "maxconn": m} for ip, p, w, m in servers]})


def snap(source, *services, state="ok"):
    return SourceSnapshot(source, state, services)


def test_proxy_weight_scaling_keeps_proportions():
    assert proxy_weight(1000) == 256
    assert proxy_weight(500) == 128
    assert abs(proxy_weight(500) / proxy_weight(100) - 5) < 0.1
    assert proxy_weight(1) == 1  # never 0: that would drain the server
    assert proxy_weight(0) == 0


def test_plan_keeps_the_users_weight():
    plan = make_plan({"file": snap("file", svc("web", 1234, "file", servers=(("10.0.0.1", 80, 1000, None),)))},
                     Settings())
    [server] = plan.services[0].servers
    assert (server.weight, server.proxy_weight) == (1000, 256)


def test_maxconn_divided_by_group_size_rounding_up():
    assert divide_maxconn(10, 3) == 4
    assert divide_maxconn(1, 5) == 1
    assert divide_maxconn(None, 3) is None


def test_precedence_marathon_over_registrator_over_file():
    plan = make_plan({
        "file": snap("file", svc("f", 1000, "file"), svc("only-file", 1001, "file")),
        "registrator": snap("registrator", svc("r", 1000, "registrator")),
        "marathon": snap("marathon", svc("m", 1000, "marathon")),
    }, Settings(status_endpoint=""))
    by_port = {s.port: s for s in plan.services}
    assert by_port[1000].name == "m" and by_port[1001].name == "only-file"
    assert sum("claimed by marathon" in n for n in plan.notes) == 2


def test_tcp_and_udp_on_one_port_are_different_services():
    plan = make_plan({"file": snap("file", svc("a", 53, "file"), svc("b", 53, "file", protocol="udp"))},
                     Settings(status_endpoint=""))
    assert [s.key for s in plan.services] == ["53/tcp", "53/udp"]


def test_expose_host_filter():
    snapshots = {"marathon": snap("marathon", svc("h", 2000, "marathon", host_network=True))}
    assert make_plan(snapshots, Settings(status_endpoint="")).services == ()
    assert len(make_plan(snapshots, Settings(status_endpoint="", expose_host=True)).services) == 1


def test_reserved_ports_never_given_to_a_service():
    plan = make_plan({"file": snap("file", svc("s", 9090, "file"), svc("v", 80, "file"))},
                     Settings(status_endpoint="0.0.0.0:9090", vhost_domain="example.com", vhost_port=80))
    assert plan.services == ()
    assert any("STATUS_ENDPOINT" in n for n in plan.notes) and any("VHOST_PORT" in n for n in plan.notes)


def test_policies_applied_to_servers():
    plan = make_plan({"file": snap("file", svc("s", 3000, "file", servers=[("10.0.0.1", 80, 1000, 10)]))},
                     Settings(status_endpoint="", group_size=2))
    server = plan.services[0].servers[0]
    assert (server.weight, server.proxy_weight, server.maxconn) == (1000, 256, 5)


def test_plan_is_deterministic_and_tracks_ready_sources():
    snapshots = {"file": snap("file", svc("s", 3000, "file")), "marathon": snap("marathon", state="initializing")}
    a, b = make_plan(snapshots, Settings()), make_plan(dict(reversed(list(snapshots.items()))), Settings())
    assert a.hash == b.hash and a.to_dict() == b.to_dict()
    assert a.sources_ready == ("file",)


def test_degraded_source_still_contributes_last_good_state():
    plan = make_plan({"file": snap("file", svc("s", 3000, "file"), state="degraded")}, Settings())
    assert [s.port for s in plan.services] == [3000] and plan.sources_ready == ("file",)


def test_a_restarted_collector_saying_initializing_does_not_wipe_a_source():
    from services.planner.policy import absorb
    known = snap("marathon", svc("m", 1000, "marathon"))
    kept = absorb(known, SourceSnapshot("marathon", "initializing", (), error="connection refused"))
    assert kept.state == "degraded" and kept.services == known.services and kept.error == "connection refused"
    assert absorb(None, snap("marathon", state="initializing")).state == "initializing"
    fresh = snap("marathon", svc("m", 1001, "marathon"))
    assert absorb(known, fresh) is fresh


class FollowingPublisher:
    """Follows what a PlanSender publishes, as the applier would (PlanFollower)."""

    def __init__(self):
        from services.common.wire import PlanFollower

        self.follower, self.plans, self.seq = PlanFollower(), [], 0

    def publish(self, topic: str, payload: dict) -> None:
        from services.common.bus import Message

        self.seq += 1
        plan = self.follower.absorb(Message(topic, self.seq, 0.0, "planner@t", "e", payload))
        assert not self.follower.needs_resync
        if plan is not None:
            self.plans.append(plan)


def test_the_incremental_plan_builder_gives_what_make_plan_gives():
    """The planner stage's PlanBuilder, fed random changes one source at a time (with and
    without the changed keys), gives make_plan's plan every time: services (in key order),
    notes in make_plan's order, excluded entries, hash, inputs."""
    import random

    from services.common.model import Excluded
    from services.common.wire import PlanSender
    from services.planner.policy import PlanBuilder

    rng = random.Random(11)
    settings = Settings(status_endpoint="0.0.0.0:9090", services_file="/x", group_size=2)
    builder = PlanBuilder(settings)
    keyed_bus, full_bus = FollowingPublisher(), FollowingPublisher()
    keyed, full = PlanSender(keyed_bus), PlanSender(full_bus)
    current: dict[str, dict[str, Service]] = {"marathon": {}, "registrator": {}, "file": {}}
    snapshots: dict[str, SourceSnapshot] = {}
    ports = [80, 9090, *range(10000, 10012)]
    for step in range(300):
        source = rng.choice(list(current))
        services = current[source]
        before = dict(services)
        for _ in range(rng.randint(1, 3)):
            port = rng.choice(ports)
            key = f"{port}/tcp"
            if key in services and rng.random() < 0.3:
                del services[key]
            else:
                services[key] = svc(f"{source[0]}{port}-{step}", port, source, host_network=rng.random() < 0.1,
                                    servers=[(f"10.0.0.{rng.randint(1, 9)}", 80, rng.choice([1, 500, 1000]), 10)])
        excluded = tuple(Excluded(source=source, code="health_failing", reason="failing", key=key, task=f"t{step}")
                         for key in list(services)[:rng.randint(0, 2)])
        # in key order, as a snapshot decoded from the bus was (make_plan's notes follow that order)
        ordered = tuple(sorted(services.values(), key=lambda s: (s.port, s.protocol)))
        snapshot = SourceSnapshot(source, rng.choice(["ok", "ok", "degraded"]), ordered,
                                  excluded=excluded, changed_at=float(step))
        snapshots[source] = snapshot
        changed = None if rng.random() < 0.3 else {k for k in before.keys() | services.keys()
                                                   if before.get(k) is not services.get(k)}
        builder.update(snapshot, dict(services), changed, snapshot.hash)
        if rng.random() < 0.5:
            continue
        expected, got = make_plan(snapshots, settings), builder.plan()
        # the plan on the bus: the changed keys alone (as the stage publishes it) give the same
        # key messages as comparing every key, and a follower rebuilds the same plan
        by_changed = keyed.publish(got, builder.planned, builder.unpublished)
        builder.unpublished = set()
        by_all = full.publish(got)
        assert (by_changed.changed, by_changed.gone, by_changed.hash) == (by_all.changed, by_all.gone, by_all.hash)
        assert keyed_bus.plans[-1] == full_bus.plans[-1] and keyed_bus.plans[-1].hash == expected.hash
        assert sorted(got.services, key=lambda s: (s.port, s.protocol)) == list(expected.services)
        assert (got.notes, got.excluded, got.inputs, got.sources_ready, got.changed_at, got.settings) == (
            expected.notes, expected.excluded, expected.inputs, expected.sources_ready, expected.changed_at,
            expected.settings)
        assert builder.hash == got.hash == expected.hash
