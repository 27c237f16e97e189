"""/status by ROLE (docs/roles.md): a node is judged without a collector and stays OK with no
planner reachable (saying so in the details), a central without an applier or a proxy; the
status stage follows the publishers its role has."""
from __future__ import annotations

import time

from services.common.config import Settings
from services.common.model import ApplyResult, Plan, ProxySettings, Service
from services.status.main import upstreams
from services.status.state import INITIALIZING, OK, PipelineState, StageLiveness


def plan(ready: tuple[str, ...], inputs: tuple[str, ...] = ("file",), age: float = 40.0) -> Plan:
    service = Service.from_dict({"name": "web", "port": 1234, "servers": [{"ip": "10.0.0.1", "port": 80}]})
    return Plan((service,), ProxySettings(), inputs=tuple((name, "0" * 16) for name in inputs), sources_ready=ready,
                changed_at=time.time() - age)


def node_state(p: Plan, planners: dict[str, bool]) -> PipelineState:
    state = PipelineState(configured_sources=(), role="node")
    state.plan = p
    state.applied["n1"] = ApplyResult(plan_hash=p.hash, ok=True, action="runtime")
    state.stages = {sender: StageLiveness(alive, 0.5 if alive else 42.0, 1) for sender, alive in planners.items()}
    state.stages["applier@n1"] = StageLiveness(True, 0.1, 2)
    return state


def test_a_node_needs_no_collector_and_every_source_of_the_centrals_plan():
    assert node_state(plan(("file",)), {"planner@c1": True}).verdict("n1", False) == OK
    state = node_state(plan(("file",), inputs=("file", "marathon")), {"planner@c1": True})
    assert state.verdict("n1", False) == INITIALIZING  # the central's Marathon has not delivered yet
    details = node_state(plan(("file",)), {"planner@c1": True}).details("n1", False)
    assert details["role"] == "node" and details["sources"] == {} and details["warnings"] == []
    assert details["planner_reachable"] and details["planners"]["planner@c1"]["alive"]


def test_a_node_whose_central_is_gone_stays_ok_and_says_so():
    state = node_state(plan(("file",), age=40), {"planner@c1": False, "planner@c2": False})
    assert state.verdict("n1", False) == OK
    details = state.details("n1", False)
    assert details["status"] == OK and details["planner_reachable"] is False
    assert details["planners"]["planner@c1"] == {"alive": False, "seconds_since_heard": 42.0, "pid": 1}
    [warning] = details["warnings"]
    assert warning.startswith("planner unreachable: planner@c1 last heard 42s ago, planner@c2 last heard 42s ago")
    assert "serving the plan of 4" in warning and 39 <= details["plan"]["age_seconds"] < 60
    # one central of two alive: reachable, no warning
    assert node_state(plan(("file",)), {"planner@c1": False, "planner@c2": True}).details("n1", False)["warnings"] == []


def test_a_node_that_never_heard_a_planner():
    state = PipelineState(configured_sources=(), role="node")
    assert state.verdict("n1", False) == INITIALIZING
    assert state.details("n1", False)["warnings"] == ["planner unreachable: no planner heard yet"]


def test_a_restarted_status_stage_on_a_node_learns_from_the_applier():
    state = PipelineState(configured_sources=(), role="node")
    state.served_sources["n1"] = ()
    assert state.verdict("n1", False) == INITIALIZING  # its applier serves nothing yet
    state.served_sources["n1"] = ("file",)
    assert state.verdict("n1", False) == OK


def test_a_central_needs_no_applier():
    state = PipelineState(configured_sources=("file",), role="central")
    assert state.verdict("c1", False) == INITIALIZING
    state.plan = plan(())
    assert state.verdict("c1", False) == INITIALIZING  # the file has not delivered
    state.plan = plan(("file",))
    state.stages = {"planner@c1": StageLiveness(True, 0.2, 3)}
    assert state.verdict("c1", False) == OK
    details = state.details("c1", False)
    assert details["converged"] and details["warnings"] == [] and details["applied"] is None
    state.stages = {}  # its own planner dead: a central has no proxy to keep; still no node warning
    assert state.details("c1", False)["warnings"] == []


def test_status_follows_what_the_role_runs():
    run_dir = "/r"
    everything = upstreams(Settings(run_dir=run_dir))
    assert [e.pub for e in everything] == ["ipc:///r/bus/collector.pub", "ipc:///r/bus/planner.pub",
                                           "ipc:///r/bus/applier.pub"]
    central = upstreams(Settings(run_dir=run_dir, role="central", planner_bus="tcp://0.0.0.0:7100"))
    assert [e.pub for e in central] == ["ipc:///r/bus/collector.pub", "tcp://0.0.0.0:7100"]
    node = upstreams(Settings(run_dir=run_dir, role="node", planner_bus="tcp://c1:7100,tcp://c2:7100"))
    assert [e.pub for e in node] == ["tcp://c1:7100", "tcp://c2:7100", "ipc:///r/bus/applier.pub"]
