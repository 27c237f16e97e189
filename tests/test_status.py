from services.common.model import ApplyResult
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
