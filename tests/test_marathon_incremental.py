"""Incremental builds: per-app fragments, per-port merges, cached Discoveries (pure and against
the simulator). The one-shot `build_services` is the reference every incremental result must
equal."""
from __future__ import annotations

import random

import pytest

from services.collector.marathon import MarathonSource
from services.collector.marathon.apps import parse_app
from services.collector.marathon.builder import ServiceBuilder, build_services
from services.common.config import Settings
from tests.helpers import wait_until
from tests.marathon_helpers import FAST, drive_until, servers, sim  # noqa: F401  (sim: a fixture)

PREFIX = "com.meltwater.proxymatic.port.0."
ADDRESSES = {"agent-1": "10.0.0.1", "agent-2": "10.0.0.2", "agent-3": "10.0.0.3"}


def resolve(host: str) -> str | None:
    return ADDRESSES.get(host)


def app(app_id: str, port: int, labels: dict | None = None, checks: int = 1, check: dict | None = None) -> dict:
    return {"id": app_id, "version": "v1", "networks": [{"mode": "host"}], "labels": labels or {},
            "portDefinitions": [{"port": port, "protocol": "tcp"}],
            "healthChecks": [check or {"protocol": "HTTP", "path": "/"}] * checks}


def task(task_id: str, host: str = "agent-1", port: int = 31000, alive: bool | None = True,
         state: str = "TASK_RUNNING") -> dict:
    result = {"id": task_id, "host": host, "ports": [port], "version": "v1", "state": state}
    if alive is not None:
        result["healthCheckResults"] = [{"alive": alive}]
    return result


class Cluster:
    """Apps and tasks as MarathonSource mirrors them, fed to a builder and to the reference."""

    def __init__(self) -> None:
        self.specs = {}
        self.tasks: dict[str, dict[str, dict]] = {}
        self.builder = ServiceBuilder()

    def deploy(self, definition: dict, *tasks: dict) -> None:
        spec = parse_app(definition)
        self.specs[spec.app_id] = spec
        self.tasks[spec.app_id] = {t["id"]: t for t in tasks}

    def pairs(self, app_id: str) -> list:
        return [(dict(t), self.specs[app_id]) for t in self.tasks.get(app_id, {}).values()]

    def update(self, *app_ids: str) -> list[bool]:
        built = []
        for app_id in app_ids:
            if app_id in self.specs:
                built.append(self.builder.update(app_id, self.pairs(app_id), resolve))
            else:
                built.append(self.builder.remove(app_id))
        return built

    def remove(self, app_id: str) -> None:
        del self.specs[app_id], self.tasks[app_id]
        self.update(app_id)

    def reference(self):
        pairs = [pair for app_id in self.specs for pair in self.pairs(app_id)]
        return build_services(pairs, resolve, self.builder.served())


def canary_cluster() -> Cluster:
    cluster = Cluster()
    cluster.deploy(app("/web", 1234, {PREFIX + "mode": "http"}), task("w1"), task("w2", "agent-2"))
    cluster.deploy(app("/web-canary", 9999, {PREFIX + "servicePort": "1234", PREFIX + "weight": "10"}),
                   task("c1", "agent-3", 31001))
    cluster.deploy(app("/other", 2000), task("o1", port=32000))
    cluster.update("/web", "/web-canary", "/other")
    return cluster


def addresses(services, port: int) -> list[tuple[str, int]]:
    for service in services:
        if service.port == port:
            return sorted((s.address, s.weight) for s in service.servers)
    return []


def test_change_to_one_app_rebuilds_only_its_fragment():
    cluster = canary_cluster()
    other = cluster.builder.fragment("/other")
    canary = cluster.builder.fragment("/web-canary")
    services, _ = cluster.builder.result()
    built = cluster.builder.stats["fragments_built"]
    cluster.tasks["/web"]["w2"]["healthCheckResults"] = [{"alive": False}]
    assert cluster.update("/web", "/web-canary", "/other") == [True, False, False]
    assert cluster.builder.stats["fragments_built"] == built + 1
    assert cluster.builder.fragment("/other") is other and cluster.builder.fragment("/web-canary") is canary
    new_services, _ = cluster.builder.result()
    assert new_services[1] is services[1]  # 2000/tcp: untouched, not even merged again
    assert addresses(new_services, 1234) == [("10.0.0.1:31000", 500), ("10.0.0.3:31001", 10)]


def test_unchanged_state_returns_the_same_result_objects():
    cluster = canary_cluster()
    first = cluster.builder.result()
    merged = cluster.builder.stats["ports_merged"]
    assert cluster.update("/web", "/web-canary", "/other") == [False, False, False]  # equal copies: reused
    second = cluster.builder.result()
    assert second[0] is first[0] and second[1] is first[1]
    assert cluster.builder.stats["ports_merged"] == merged


def test_canary_merge_stays_right_after_incremental_updates():
    cluster = canary_cluster()
    services, warnings = cluster.builder.result()
    (web,) = [s for s in services if s.port == 1234]
    assert (web.name, web.mode) == ("web", "http")
    # the canary scales up, then the owner loses every task: the canary alone keeps the port
    cluster.tasks["/web-canary"]["c2"] = task("c2", "agent-3", 31002)
    cluster.update("/web-canary")
    assert addresses(cluster.builder.result()[0], 1234) == [
        ("10.0.0.1:31000", 500), ("10.0.0.2:31000", 500), ("10.0.0.3:31001", 10), ("10.0.0.3:31002", 10)]
    cluster.tasks["/web"] = {}
    cluster.update("/web")
    services, warnings = cluster.builder.result()
    (web,) = [s for s in services if s.port == 1234]
    assert web.name == "web-canary" and web.mode == "tcp"  # attributes come from the apps still there
    assert (services, set(warnings)) == (cluster.reference().services, set(cluster.reference().warnings))


def test_removing_an_app_removes_its_servers_and_its_service():
    cluster = canary_cluster()
    cluster.remove("/web-canary")
    services, _ = cluster.builder.result()
    assert addresses(services, 1234) == [("10.0.0.1:31000", 500), ("10.0.0.2:31000", 500)]
    cluster.remove("/other")
    services, _ = cluster.builder.result()
    assert [s.port for s in services] == [1234]
    assert cluster.builder.fragment("/other") is None and "o1" not in cluster.builder.served()


def test_conflict_warnings_follow_incremental_updates():
    cluster = canary_cluster()
    cluster.deploy(app("/web-canary", 9999, {PREFIX + "servicePort": "1234", PREFIX + "mode": "tcp"}),
                   task("c1", "agent-3", 31001))
    cluster.update("/web-canary")
    assert any("disagree on mode" in w for w in cluster.builder.result()[1])
    cluster.remove("/web-canary")
    assert not any("disagree" in w for w in cluster.builder.result()[1])


def test_a_host_that_resolves_differently_rebuilds_the_fragment():
    cluster = canary_cluster()
    ADDRESSES["agent-2"] = "10.0.9.2"
    try:
        assert cluster.update("/web", "/other") == [True, False]
        assert ("10.0.9.2:31000", 500) in addresses(cluster.builder.result()[0], 1234)
    finally:
        ADDRESSES["agent-2"] = "10.0.0.2"


def test_health_memory_is_kept_per_app_across_rebuilds():
    cluster = Cluster()
    cluster.deploy(app("/web", 1234), task("w1"), task("w2", "agent-2"))
    cluster.update("/web")
    # a leader election: results vanish; the served tasks stay, a new one waits for its result
    cluster.deploy(app("/web", 1234), task("w1", alive=None), task("w2", "agent-2", alive=None),
                   task("w3", "agent-3", alive=None))
    cluster.update("/web")
    assert len(addresses(cluster.builder.result()[0], 1234)) == 2
    cluster.tasks["/web"]["w1"]["healthCheckResults"] = [{"alive": False}]
    cluster.update("/web")
    assert addresses(cluster.builder.result()[0], 1234) == [("10.0.0.2:31000", 500)]


def test_random_incremental_updates_equal_a_full_build():
    rng = random.Random(7)
    cluster = Cluster()
    app_ids = [f"/app{i}" for i in range(8)]
    counter = 0
    for step in range(400):
        app_id = rng.choice(app_ids)
        action = rng.random()
        if app_id not in cluster.specs or action < 0.05:
            port = 1000 + rng.randrange(4)  # few ports: canaries and conflicts
            labels = {PREFIX + "weight": str(rng.randint(1, 1000))}
            if rng.random() < 0.5:
                labels[PREFIX + "mode"] = rng.choice(["tcp", "http", "bogus"])
            check = rng.choice([None, {"protocol": "HTTP", "path": "/alt", "intervalSeconds": 5},
                                {"protocol": "TCP"}, {"protocol": "COMMAND"}, {"protocol": "HTTP", "path": "bad path"}])
            cluster.deploy(app(app_id, port, labels, checks=rng.randrange(2), check=check))
        elif action < 0.1:
            cluster.remove(app_id)
            continue
        elif action < 0.5 or not cluster.tasks[app_id]:
            counter += 1
            cluster.tasks[app_id][f"t{counter}"] = task(
                f"t{counter}", rng.choice(list(ADDRESSES) + ["nowhere"]), 31000 + rng.randrange(5),
                rng.choice([True, False, None]), rng.choice(["TASK_RUNNING", "TASK_RUNNING", "TASK_STAGING"]))
        elif action < 0.8:
            victim = rng.choice(list(cluster.tasks[app_id].values()))
            victim["healthCheckResults"] = [{"alive": rng.random() < 0.6}]
        else:
            del cluster.tasks[app_id][rng.choice(list(cluster.tasks[app_id]))]
        cluster.update(app_id)
        services, warnings = cluster.builder.result()
        reference = cluster.reference()
        assert services == reference.services, f"step {step}"
        assert set(warnings) == set(reference.warnings), f"step {step}"


def test_changed_health_check_definition_rebuilds_the_service():
    cluster = canary_cluster()
    services, _ = cluster.builder.result()
    (web,) = [s for s in services if s.port == 1234]
    assert web.health_check.protocol == "http" and web.health_check.path == "/"
    other = cluster.builder.fragment("/other")
    # a new definition of the canary (same tasks, same version string): its check changed
    cluster.deploy(app("/web-canary", 9999, {PREFIX + "servicePort": "1234", PREFIX + "weight": "10"},
                       check={"protocol": "HTTP", "path": "/ready"}), *cluster.tasks["/web-canary"].values())
    assert cluster.update("/web-canary", "/other") == [True, False]
    assert cluster.builder.fragment("/other") is other
    services, warnings = cluster.builder.result()
    (web,) = [s for s in services if s.port == 1234]
    assert web.health_check.path == "/" and any("disagree on health check" in w for w in warnings)
    # the canary drops its checks: the proxy checks nobody on that port
    cluster.deploy(app("/web-canary", 9999, {PREFIX + "servicePort": "1234", PREFIX + "weight": "10"}, checks=0),
                   *cluster.tasks["/web-canary"].values())
    cluster.update("/web-canary")
    services, warnings = cluster.builder.result()
    (web,) = [s for s in services if s.port == 1234]
    assert web.health_check is None and not any("disagree" in w for w in warnings)
    assert services == cluster.reference().services


# --- against the simulator ------------------------------------------------------------------

@pytest.fixture
def source(sim):
    source = MarathonSource(Settings(marathon=sim.url, refresh_interval=3600), **FAST)
    yield source
    source.close()


def connected(source):
    """Wait until the stream has connected and asked for its resync, then absorb the resync."""
    source.current()
    wait_until(lambda: source.stream is not None and source._last_event > 0, message="event stream")
    source.current()


def test_source_unchanged_current_is_the_cached_discovery(sim, source):
    sim.deploy_app("/demo/web", service_ports=[10000], instances=2)
    connected(source)
    first = source.current()
    requests, built = len(sim.api_requests()), source.builder.stats["fragments_built"]
    assert source.current() is first
    assert len(sim.api_requests()) == requests and source.builder.stats["fragments_built"] == built


def test_source_event_rebuilds_only_the_app_it_names(sim, source):
    for i in range(3):
        sim.deploy_app(f"/demo/app{i}", service_ports=[10000 + i], instances=2, health_check=True)
    connected(source)
    before = {i: source.builder.fragment(f"/demo/app{i}") for i in range(3)}
    requests = len(sim.api_requests())
    sim.set_health(sim.task_ids("/demo/app1")[0], False)
    discovery = drive_until(source, lambda d: len(servers(d, 10001)) == 1)
    assert source.builder.fragment("/demo/app0") is before[0] and source.builder.fragment("/demo/app2") is before[2]
    assert source.builder.fragment("/demo/app1") is not before[1]
    assert len(servers(discovery, 10000)) == 2 and len(servers(discovery, 10002)) == 2
    assert len(sim.api_requests()) == requests  # the events carried the change


def test_source_canary_and_removal(sim, source):
    sim.deploy_app("/demo/web", service_ports=[10000], instances=2, health_check=True)
    sim.deploy_app("/demo/web-canary", service_ports=[10050], instances=1, health_check=True,
                   labels={PREFIX + "servicePort": "10000", PREFIX + "weight": "10"})
    connected(source)
    assert len(servers(source.current(), 10000)) == 3
    sim.set_health(sim.task_ids("/demo/web")[0], False)
    discovery = drive_until(source, lambda d: len(servers(d, 10000)) == 2)
    (service,) = [s for s in discovery.services if s.port == 10000]
    assert service.name == "web.demo" and sorted(s.weight for s in service.servers) == [10, 500]
    sim.remove_app("/demo/web-canary")
    discovery = drive_until(source, lambda d: len(servers(d, 10000)) == 1)
    assert [s.weight for s in discovery.services[0].servers] == [500]
    assert source.builder.fragment("/demo/web-canary") is None
    sim.remove_app("/demo/web")
    drive_until(source, lambda d: d.services == ())


def test_full_resync_reuses_the_fragments_of_unchanged_apps(sim, source):
    for i in range(3):
        sim.deploy_app(f"/demo/app{i}", service_ports=[10000 + i], instances=2)
    connected(source)
    first = source.current()
    fragments = {i: source.builder.fragment(f"/demo/app{i}") for i in range(3)}
    syncs, built = source.stats["full_syncs"], source.builder.stats["fragments_built"]
    source.refresh_interval = 0  # the poll is due: a full resync
    assert source.current() is first
    source.refresh_interval = 3600
    assert source.stats["full_syncs"] == syncs + 1 and source.builder.stats["fragments_built"] == built
    assert all(source.builder.fragment(f"/demo/app{i}") is fragments[i] for i in range(3))
