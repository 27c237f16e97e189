"""No partial plans, through real processes: a restarted planner waits for the collector's
whole snapshot before its first plan, and the applier keeps serving a plan while the plans
coming in lack one of its sources (restarted collector and planner, Marathon down, no saved
state), then applies as soon as the source reports again."""
from __future__ import annotations

import glob
import json
import os

import pytest
import zmq

from services.common.bus import Publisher
from services.common.config import Settings
from services.common.model import Service, SourceSnapshot
from services.common.wire import SnapshotSender
from sim.marathon import MarathonSim
from sim.pipeline import Pipeline
from tests.helpers import Load, TcpBackend, free_port, tcp_ask, wait_until
from tests.keyed_watch import KeyedWatch
from tests.test_haproxy_driver import pytestmark  # noqa: F401  (skip without haproxy)


def source_snapshot(source: str, port: int, ip: str) -> SourceSnapshot:
    service = Service.from_dict({"name": source, "port": port, "source": source,
                                 "servers": [{"ip": ip, "port": 80}]})
    return SourceSnapshot(source, "ok", (service,))


class Listener(KeyedWatch):
    """Every plan (rebuilt from its keys), every other message and the latest heartbeat per
    sender, on some stages' buses."""

    def __init__(self, settings: Settings, stages: tuple[str, ...], prefixes: list[str]):
        super().__init__([settings.bus(s) for s in stages], prefixes)

    def poll(self, timeout: float = 0.05) -> "Listener":
        super().poll(timeout)
        return self


def test_restarted_planner_waits_for_the_collectors_whole_snapshot():
    pipeline = Pipeline([], programs=("planner",))
    settings = Settings(run_dir=pipeline.run_dir)
    collector = Publisher(zmq.Context.instance(), "collector@t", settings.bus("collector"))
    marathon, file = SnapshotSender(collector, "marathon"), SnapshotSender(collector, "file")
    # The collector knows both sources; only its snapshot socket can tell a new planner so.
    marathon.publish(source_snapshot("marathon", 2000, "10.0.0.1"))
    file.publish(source_snapshot("file", 2001, "10.0.0.2"))
    listener = Listener(settings, ("planner",), ["plan"])
    flip = iter(range(3, 10_000))
    try:
        pipeline.start()
        # Slow to answer snapshots: live updates of the file source flow, the snapshot does not.
        wait_until(lambda: (file.publish(source_snapshot("file", 2001, f"10.0.0.{next(flip) % 250 + 3}")),
                            listener.poll().beats.get(f"planner@{settings.node}", {}).get("sources") == ["file"])[1],
                   timeout=30, message="the planner got a live update of one source")
        assert listener.beats[f"planner@{settings.node}"]["synced"] is False
        assert listener.plans == [] and listener.messages == []  # it would have been sent before that heartbeat
        wait_until(lambda: (collector.serve_snapshots(), listener.poll().plans)[1],
                   timeout=30, message="a plan once the snapshot is answered")
        plans = listener.plans
        assert plans[0].sources_ready == ("file", "marathon")
        assert [s.port for s in plans[0].services] == [2000, 2001]
    finally:
        listener.close()
        pipeline.cleanup()
        collector.close()


@pytest.fixture
def backends():
    made = {"file": TcpBackend("f"), "marathon": TcpBackend("m")}
    yield made
    for backend in made.values():
        backend.close()


def test_applier_holds_plans_lacking_a_source_until_it_reports(backends):
    sim = MarathonSim().start()
    file_port, marathon_port = free_port(), free_port()
    sim.deploy_app("/m", network="BRIDGE", service_ports=[marathon_port], instances=1, host="127.0.0.1",
                   host_ports=[[backends["marathon"].port]])
    pipeline = Pipeline(["--marathon", sim.url, "--status-endpoint", "", "--node-name", "n"], services_file=True)
    with open(pipeline.services_file, "w") as handle:
        json.dump({"services": [{"name": "f", "port": file_port,
                                 "servers": [{"host": "127.0.0.1", "port": backends["file"].port}]}]}, handle)
    settings = Settings(run_dir=pipeline.run_dir)
    listener = Listener(settings, ("collector", "planner", "applier"), ["plan", "applied."])
    load = Load(marathon_port)
    try:
        pipeline.start()
        wait_until(lambda: tcp_ask(file_port) == "f" and tcp_ask(marathon_port) == "m", timeout=60,
                   message="both sources served")
        load.start()
        # Collector and planner restart while Marathon is down, and the collector has no saved
        # state (a new container): the new planner only knows the file source.
        pipeline.kill("planner")
        pipeline.kill("collector")
        sim.stop()
        for saved in glob.glob(os.path.join(pipeline.run_dir, "state", "*")):
            os.remove(saved)
        pipeline.start("collector")
        wait_until(lambda: listener.poll().beats.get("collector@n", {}).get("sources", {})
                   .get("marathon", {}).get("error"), timeout=30, message="collector: Marathon down")
        pipeline.start("planner")
        held = wait_until(lambda: [r for r in listener.poll().payloads("applied.") if r["action"] == "held"],
                          timeout=30, message="a plan without Marathon held")[0]
        assert "marathon" in held["notes"][0] and held["details"]["held"]["missing_sources"] == ["marathon"]
        assert "held: it lacks source(s) marathon" in pipeline.log("applier")
        assert tcp_ask(marathon_port) == "m"

        sim.replicas[0].start()  # Marathon back: a complete plan, applied at once
        wait_until(lambda: any(p.sources_ready == ("file", "marathon") and p.hash == r["plan_hash"] and r["ok"]
                               for r in listener.poll().payloads("applied.") for p in listener.plans
                               if r is not held), timeout=60, message="the complete plan applied")
        assert tcp_ask(marathon_port) == "m" and tcp_ask(file_port) == "f"
    finally:
        if load.is_alive():
            load.stop()
        listener.close()
        pipeline.cleanup()
        sim.stop()
    assert load.failures == [] and load.ok > 0
    # No plan lacking Marathon was ever applied.
    sources = {p.hash: list(p.sources_ready) for p in listener.plans}
    applied = [r for r in listener.payloads("applied.") if r["action"] != "held"]
    assert applied and all("marathon" in sources.get(r["plan_hash"], ["marathon"]) for r in applied)
