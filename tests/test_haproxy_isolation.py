"""Per-service isolation in HAProxy through the real pipeline: a port another program holds sets
one service aside; every other service is served, changed and added as if it were not there,
and the set-aside service is served once its port is free, without restarting anything."""
from __future__ import annotations

import os
import socket
import urllib.request

import pytest
import zmq

from services.applier import haproxy_launch
from services.applier.haproxy_runtime import MasterCli
from services.common.bus import Subscriber
from services.common.config import Settings
from services.common.model import ApplyResult
from sim.pipeline import Pipeline
from tests.helpers import Load, TcpBackend, free_port, services_entry, tcp_ask, wait_until, write_services

pytestmark = pytest.mark.skipif(not os.path.exists(haproxy_launch.haproxy_binary()), reason="haproxy is not installed")

NODE = "n1"


class AppliedResults:
    """Every `applied.<node>` result the applier publishes, in order."""

    def __init__(self, run_dir: str):
        self.ctx = zmq.Context()
        self.subscriber = Subscriber(self.ctx, [Settings(run_dir=run_dir).bus("applier")], [f"applied.{NODE}"])
        self.seen: list[ApplyResult] = []

    def until(self, predicate, message: str, timeout: float = 30.0) -> ApplyResult:
        def poll():
            for msg in self.subscriber.poll(0.1):
                if msg.topic == f"applied.{NODE}":
                    self.seen.append(ApplyResult.from_dict(msg.payload))
            return next((r for r in reversed(self.seen) if predicate(r)), None)
        return wait_until(poll, timeout=timeout, message=message)

    def close(self) -> None:
        self.subscriber.close()
        self.ctx.term()


def answers(port: int, tries: int = 20) -> set[str]:
    return {tcp_ask(port) for _ in range(tries)}


def test_a_squatted_port_sets_one_service_aside_and_never_stops_the_others():
    backends = [TcpBackend(f"b{i}") for i in range(4)]
    squatter = socket.socket()
    squatter.bind(("0.0.0.0", 0))
    squatter.listen()
    squatted = squatter.getsockname()[1]
    good, later, status = free_port(), free_port(), free_port()
    pipeline = Pipeline(["--status-endpoint", f"127.0.0.1:{status}", "--node-name", NODE], services_file=True,
                        programs=("haproxy", "pen", "applier", "planner", "collector", "status"))
    write_services(pipeline.services_file, [services_entry("good", good, backends[0]), services_entry("squatted", squatted, backends[2])])
    results = AppliedResults(pipeline.run_dir)
    load = Load(good)
    try:
        pipeline.start()
        wait_until(lambda: tcp_ask(good) == "b0", timeout=30, message="good served")
        load.start()

        # The result names the service set aside, its port and the OS error; the rest is ok.
        reason = (f"service squatted ({squatted}/tcp): port {squatted} cannot be bound: "
                  "[Errno 98] Address already in use")
        result = results.until(lambda r: any(reason in e for e in r.errors), "squatted reported as set aside")
        assert result.ok and result.details["haproxy"]["set_aside"] == {f"{squatted}/tcp": reason}
        master = MasterCli(os.path.join(pipeline.run_dir, "haproxy", "master.sock"))

        def show_proc():  # the master CLI is briefly away while HAProxy re-executes for a reload
            return wait_until(master.show_proc, message="HAProxy's master CLI")
        proc = show_proc()

        # Retries while the port stays taken reload nothing and log nothing again.
        retries = pipeline.log("applier").count("applier: retrying plan")
        wait_until(lambda: pipeline.log("applier").count("applier: retrying plan") >= retries + 2, timeout=30,
                   message="two more retries of the plan")
        assert show_proc().reloads == proc.reloads
        assert pipeline.log("applier").count(f"haproxy: set aside service squatted ({squatted}/tcp)") == 1

        # A membership change to good is applied (at runtime).
        write_services(pipeline.services_file, [services_entry("good", good, backends[0], backends[1]),
                                                services_entry("squatted", squatted, backends[2])])
        wait_until(lambda: answers(good) == {"b0", "b1"}, timeout=30, message="good served by b0 and b1")

        # A service added afterwards gets its listener.
        write_services(pipeline.services_file, [services_entry("good", good, backends[0], backends[1]),
                                                services_entry("squatted", squatted, backends[2]),
                                                services_entry("later", later, backends[3])])
        wait_until(lambda: tcp_ask(later) == "b3", timeout=30, message="the added service served")
        assert results.until(lambda r: r.details["haproxy"]["set_aside"] == {f"{squatted}/tcp": reason},
                             "squatted still set aside").ok

        # The port is freed: squatted is served by a reload, nothing restarted.
        pids = {name: process.pid for name, process in pipeline.processes.items()}
        master_pid = show_proc().master_pid
        squatter.close()
        wait_until(lambda: tcp_ask(squatted) == "b2", timeout=20, message="squatted served once its port is free")
        final = results.until(lambda r: r.ok and not r.errors, "a result without anything set aside")
        assert final.details["haproxy"]["set_aside"] == {}
        assert show_proc().master_pid == master_pid
        assert {name: process.pid for name, process in pipeline.processes.items()} == pids
        assert all(process.poll() is None for process in pipeline.processes.values())
        assert answers(good) == {"b0", "b1"} and tcp_ask(later) == "b3"
        # HAProxy's workers run without root; the status stage still gets their statistics page.
        page = urllib.request.urlopen(f"http://127.0.0.1:{status}/", timeout=5).read().decode()
        assert f"svc_{good}_tcp" in page and f"svc_{squatted}_tcp" in page
    finally:
        load.stop()
        squatter.close()
        results.close()
        pipeline.cleanup()
        for backend in backends:
            backend.close()
    assert load.ok > 0, "no request was sent"
    assert load.failures == [], load.failures[:5]
