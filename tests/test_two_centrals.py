"""A node following two centrals (ROLE=node, PLANNER_BUS=tcp://c1:7100,tcp://c2:7100;
docs/roles.md): its applier applies the newest complete plan of the planners alive, the same
plan from both once, and goes on with one central when the other dies. Two planners stand in
for the centrals (Publisher + PlanSender on loopback tcp), the applier runs for real in a thread
with a driver that records what it applies."""
from __future__ import annotations

import shutil
import socket
import tempfile
import threading

import pytest
import zmq

from services.applier import main as applier
from services.applier.plan_feed import newest, same_content
from services.common.bus import Publisher, Subscriber
from services.common.config import Settings
from services.common.model import ApplyResult, Plan, ProxySettings, Service
from services.common.wire import PlanSender
from tests.helpers import RecordingDriver, free_port, wait_until

BEAT = 0.2  # the stand-in planners' heartbeat interval: dead after 3 missed (0.6 s)


def free_pair() -> int:
    """A port whose next port is free too (a tcp bus endpoint uses port and port+1)."""
    for _ in range(50):
        port = free_port()
        if port < 65000:
            try:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise AssertionError("no free pair of ports")


def plan(changed_at: float, *ports: int) -> Plan:
    return Plan(tuple(Service.from_dict({"name": f"s{port}", "port": port, "source": "file",
                                         "servers": [{"ip": "10.0.0.1", "port": 80}]}) for port in ports),
                ProxySettings(), sources_ready=("file",), inputs=(("file", "x"),), changed_at=changed_at)


class Central:
    """A planner on loopback tcp: publishes plans, heartbeats and answers snapshots when pumped."""

    def __init__(self, name: str, endpoint: str):
        self.name, self.endpoint = name, endpoint
        self.start()

    def start(self) -> None:
        settings = Settings(planner_bus=self.endpoint)
        self.publisher = Publisher(zmq.Context.instance(), f"planner@{self.name}", settings.bus("planner"),
                                   heartbeat_interval=BEAT)
        self.sender = PlanSender(self.publisher)
        self.alive = True

    def publish(self, p: Plan) -> None:
        self.sender.publish(p)

    def pump(self) -> None:
        if self.alive:
            self.publisher.heartbeat()
            self.publisher.serve_snapshots()

    def kill(self) -> None:
        self.alive = False
        self.publisher.close()


class Node:
    """The applier of a node following both centrals, in a thread."""

    def __init__(self, centrals: list[Central]):
        self.run_dir = tempfile.mkdtemp(prefix="pm2c")
        self.centrals = centrals
        self.settings = Settings(run_dir=self.run_dir, node_name="n1", role="node",
                                 planner_bus=",".join(c.endpoint for c in centrals))
        self.driver = RecordingDriver()
        self.stop = threading.Event()
        self.results = Subscriber(zmq.Context.instance(), [self.settings.bus("applier")], ["applied."])
        self.received: list[ApplyResult] = []
        self.beat: dict = {}
        self.thread = threading.Thread(target=applier.run, args=(self.settings, self.stop),
                                       kwargs={"drivers": [self.driver], "heartbeat_interval": BEAT}, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        for central in self.centrals:
            central.pump()
        for message in self.results.poll(0.05):
            if message.is_heartbeat:
                self.beat = message.payload
            else:
                self.received.append(ApplyResult.from_dict(message.payload))

    def wait(self, predicate, what: str, timeout: float = 20.0):
        def poll():
            self._pump()
            return predicate()
        return wait_until(poll, timeout=timeout, message=what)

    def applied(self, p: Plan) -> None:
        self.wait(lambda: any(r.plan_hash == p.hash and r.ok for r in self.received), f"plan {p.hash} applied")

    def heard(self, central: Central, p: Plan) -> None:
        """The applier's heartbeat says it holds `p` as `central`'s newest complete plan."""
        self.wait(lambda: (self.beat.get("planners") or {}).get(f"planner@{central.name}", {}).get("plan") == p.hash,
                  f"{central.name}'s plan {p.hash} received")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        self.results.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture
def cluster():
    c1 = Central("c1", f"tcp://127.0.0.1:{free_pair()}")
    c2 = Central("c2", f"tcp://127.0.0.1:{free_pair()}")
    node = Node([c1, c2])
    yield c1, c2, node
    node.close()
    for central in (c1, c2):
        if central.alive:
            central.kill()


def test_the_same_plan_from_both_centrals_is_applied_once(cluster):
    c1, c2, node = cluster
    first = plan(100.0, 1000)
    c1.publish(first)
    node.applied(first)
    c2.publish(plan(100.5, 1000))  # the same plan, learnt half a second later by the other central
    node.heard(c2, first)
    second = plan(101.0, 1000, 1001)
    c2.publish(second)
    node.applied(second)
    c1.publish(plan(101.2, 1000, 1001))
    node.heard(c1, second)
    third = plan(102.0, 1002)
    c1.publish(third)
    node.applied(third)
    assert node.driver.applied == [first.hash, second.hash, third.hash]


def test_the_newest_plan_wins_when_the_centrals_differ(cluster):
    c1, c2, node = cluster
    newer, older = plan(200.0, 2000), plan(100.0, 2001)
    c1.publish(newer)
    node.applied(newer)  # first, so that the older plan can only come second (no race between them)
    c2.publish(older)
    node.heard(c2, older)
    assert node.driver.applied == [newer.hash]
    newest_yet = plan(300.0, 2002)
    c2.publish(newest_yet)
    node.applied(newest_yet)
    late = plan(250.0, 2003)  # c1's next plan is older than c2's: not applied
    c1.publish(late)
    node.heard(c1, late)
    assert node.driver.applied == [newer.hash, newest_yet.hash]


def test_one_central_killed_the_other_goes_on(cluster):
    c1, c2, node = cluster
    first = plan(100.0, 3000)
    c1.publish(first)
    c2.publish(plan(100.1, 3000))
    node.heard(c1, first)
    node.heard(c2, first)
    node.applied(first)
    c1.kill()
    node.wait(lambda: not node.beat["planners"]["planner@c1"]["alive"], "c1 taken for dead")
    assert node.beat["planners"]["planner@c2"]["alive"]
    second = plan(101.0, 3000, 3001)
    c2.publish(second)
    node.applied(second)
    assert node.driver.applied == [first.hash, second.hash]


def test_a_dead_centrals_plan_gives_way_to_the_live_ones(cluster):
    """c1's plan is the newest; c1 dies: the node serves c2's plan (what the central alive says)."""
    c1, c2, node = cluster
    ones, twos = plan(200.0, 4000), plan(150.0, 4000, 4001)
    c1.publish(ones)
    node.applied(ones)  # first, so that c2's older plan can only come second (no race between them)
    c2.publish(twos)
    node.heard(c2, twos)
    c1.kill()
    node.applied(twos)
    assert node.driver.applied == [ones.hash, twos.hash]


def test_a_change_made_while_the_only_central_was_down_is_applied_when_it_returns():
    """One central stops; the node keeps its plan (nothing applied meanwhile); the central comes
    back (a new epoch, same endpoint) with a changed plan: the node asks it for a snapshot and
    converges."""
    central = Central("c1", f"tcp://127.0.0.1:{free_pair()}")
    node = Node([central])
    try:
        before = plan(100.0, 5000)
        central.publish(before)
        node.applied(before)
        central.kill()
        node.wait(lambda: not node.beat["planners"]["planner@c1"]["alive"], "c1 taken for dead")
        assert node.driver.applied == [before.hash]
        central.start()  # a new process: new epoch, nothing published live to the node yet
        after = plan(50.0, 5000, 5001)  # older by the clock: what the central alive says wins
        central.publish(after)
        node.applied(after)
        assert node.driver.applied == [before.hash, after.hash]
    finally:
        node.close()
        if central.alive:
            central.kill()


def test_newest_and_same_content():
    a, b = plan(1.0, 1), plan(1.0, 2)
    assert newest([a, b]) == max(a, b, key=lambda p: p.hash)  # a tie: the greater hash
    assert newest([plan(2.0, 1), b]).changed_at == 2.0 and newest([]) is None
    assert same_content(a, plan(5.0, 1)) and not same_content(a, b) and not same_content(None, a)
