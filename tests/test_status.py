import pytest

from services.common.bus import Message
from services.applier.plan_feed import PlanFeed
from services.common.model import ApplyResult, ModelError, Plan, ProxySettings, Service
from services.common.wire import PlanSender
from services.status.main import absorb, follow_plan
from services.status.state import INITIALIZING, OK, TERMINATING, PipelineState


def test_ok_needs_every_source_and_the_latest_plan_applied():
    state = PipelineState(configured_sources=("marathon", "file"))
    assert state.verdict("n1", False) == INITIALIZING
    state.plan_hash, state.plan_sources_ready = "p1", ("file",)
    state.applied["n1"] = ApplyResult("p1", True, "reload")
    assert state.verdict("n1", False) == INITIALIZING  # marathon has not delivered
    state.plan_sources_ready = ("file", "marathon")
    state.applied["n1"] = ApplyResult("p0", True, "reload")
    assert state.verdict("n1", False) == INITIALIZING  # an older plan was applied
    state.applied["n1"] = ApplyResult("p1", False, "rejected")
    assert state.verdict("n1", False) == INITIALIZING
    state.applied["other-node"] = ApplyResult("p1", True, "reload")
    assert state.verdict("n1", False) == INITIALIZING  # another node's applier does not count
    state.applied["n1"] = ApplyResult("p1", True, "reload")
    assert state.verdict("n1", False) == OK


def test_ok_is_latched_and_terminating_wins():
    state = PipelineState(configured_sources=("file",), plan_hash="p1", plan_sources_ready=("file",))
    state.applied["n1"] = ApplyResult("p1", True, "runtime")
    assert state.verdict("n1", False) == OK
    state.plan_hash = "p2"  # being applied right now: no flapping
    assert state.verdict("n1", False) == OK
    assert state.details("n1", False)["converged"] is False
    assert state.verdict("n1", True) == TERMINATING


def test_a_restarted_status_stage_believes_the_appliers_heartbeat():
    """The latch died with the old status process; the applier says its proxies serve a plan
    with every source, so a held or rejected latest result does not make the node INITIALIZING."""
    state = PipelineState(configured_sources=("marathon", "file"), plan_hash="p2",
                          plan_sources_ready=("file",))
    state.applied["n1"] = ApplyResult("p2", False, "held")
    state.served_sources["n1"] = ("file",)
    assert state.verdict("n1", False) == INITIALIZING  # what it serves lacks marathon
    state.served_sources["n1"] = ("file", "marathon")
    assert state.verdict("n1", False) == OK


def heard(topic: str, payload: dict, sender: str = "applier@n1") -> Message:
    return Message(topic, 1, 0.0, sender, "e", payload)


@pytest.mark.parametrize("payload", [
    {"plan_hash": "p1", "ok": True, "action": "none", "details": {"pen": 5}},
    {"plan_hash": "p1", "ok": True, "action": "none", "details": {"pen": {"set_aside": ["10053/udp"]}}},
    {"plan_hash": "p1", "ok": True, "action": "none", "errors": [{"x": 1}]},
    "not an object",
])
def test_a_malformed_applied_result_is_dropped_and_breaks_nothing(payload):
    state = PipelineState(configured_sources=("file",), plan_hash="p1", plan_sources_ready=("file",))
    good = {"plan_hash": "p1", "ok": True, "action": "runtime",
            "details": {"pen": {"ok": True, "set_aside": {"10053/udp": "service dns: port taken"}}}}
    absorb(state, {}, heard("applied.n1", good))
    with pytest.raises((ValueError, ModelError)):
        absorb(state, {}, heard("applied.n1", payload))
    assert state.applied["n1"].details["pen"]["set_aside"] == {"10053/udp": "service dns: port taken"}
    assert state.details("n1", False)["set_aside"] == {"pen": {"10053/udp": "service dns: port taken"}}


class StandIn:
    """A publisher (what PlanSender sends, as Messages) and a subscriber (what the feed drops
    and resyncs) without sockets."""

    def __init__(self):
        self.sent: list[Message] = []
        self.dropped: list[str] = []
        self.resyncs: list[str] = []

    def publish(self, topic: str, payload: dict) -> Message:
        self.sent.append(Message(topic, len(self.sent) + 1, 0.0, "planner@n1", "e", payload))
        return self.sent[-1]

    def take(self) -> list[Message]:
        sent, self.sent = self.sent, []
        return sent

    def drop(self, message: Message, reason: str) -> None:
        self.dropped.append(reason)

    def resync(self, prefix: str) -> None:
        self.resyncs.append(prefix)


def plan_of(*servers: int) -> Plan:
    return Plan(tuple(Service.from_dict({"name": f"s{port}", "port": port, "servers": [
        {"ip": "10.0.0.1", "port": 80 + i} for i in range(count)]}) for port, count in
        zip((1000, 2000, 3000), servers)), ProxySettings(), sources_ready=("file",))


def test_the_plan_is_rebuilt_from_its_keys_and_a_malformed_plan_or_heartbeat_is_dropped():
    state, bus = PipelineState(configured_sources=("file",)), StandIn()
    plans, sender = PlanFeed(bus, "status"), PlanSender(bus)
    sender.publish(plan_of(2, 1))
    follow_plan(state, plans, bus.take())
    assert (state.plan_hash, state.plan_sources_ready, state.plan_counts) == (plan_of(2, 1).hash, ("file",), (2, 3))
    assert state.plan == plan_of(2, 1)
    sender.publish(plan_of(2, 3, 1))  # one key changed, one new: two key messages and the summary
    assert len(sent := bus.take()) == 3
    follow_plan(state, plans, sent)
    assert state.plan == plan_of(2, 3, 1) and state.plan_counts == (3, 6)

    # Malformed: dropped and counted by the subscriber; the plan stays.
    follow_plan(state, plans, [heard("plan", {"hash": "p1", "sources_ready": "file"}, "planner@n1"),
                               heard("plan:1000/tcp", {"schema": 2, "service": 5}, "planner@n1")])
    assert len(bus.dropped) == 2 and "unknown schema" in bus.dropped[0]
    assert state.plan == plan_of(2, 3, 1) and not bus.resyncs
    # A summary the keys do not add up to (a key message lost): a resync, the plan stays.
    sender.publish(plan_of(1, 3, 1))
    follow_plan(state, plans, [m for m in bus.take() if m.topic != "plan:1000/tcp"])
    assert bus.resyncs == ["plan"] and state.plan == plan_of(2, 3, 1)

    with pytest.raises(ValueError):
        absorb(state, {}, heard("heartbeat.applier@n1", {"stage": "applier", "served_sources": 7}))
    assert state.served_sources == {}


def test_before_any_plan():
    state = PipelineState(configured_sources=("file",))
    assert state.plan is None and (state.plan_hash, state.plan_sources_ready, state.plan_counts) == ("", (), (0, 0))
