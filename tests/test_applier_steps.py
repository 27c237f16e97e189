"""The applier stage's loop as pure steps (loop_step.py) and the drivers rule (drivers.py):
no bus, no proxies, no clock (`now` is passed in)."""
from __future__ import annotations

import logging

from services.applier import loop_step as step
from services.applier.driver import DriverResult
from services.applier.drivers import DriverSet, drivers_for
from services.applier.loop_step import Apply, Flush, Hold, LoopState, Publish, Resume, RetryIn
from services.common.config import Settings
from services.common.model import ApplyResult, Plan, ProxySettings, Service


def plan(*ports: int, ready=("file",), changed_at: float = 0.0, **settings) -> Plan:
    services = tuple(Service.from_dict({"name": f"s{p}", "port": p, "servers": [{"ip": "10.0.0.1", "port": 80}]})
                     for p in ports)
    return Plan(services, ProxySettings(**settings), sources_ready=tuple(ready), changed_at=changed_at)


def result(p: Plan, action: str = "runtime", ok: bool = True, set_aside=None, driver_action: str | None = None):
    return ApplyResult(plan_hash=p.hash, ok=ok, action=action, errors=(),
                       details={"haproxy": {"ok": ok, "action": driver_action or action, "errors": [],
                                            "set_aside": set_aside or {}}})


def applied_state(p: Plan, now: float = 100.0, flushed: bool = False) -> LoopState:
    state, _ = step.applied(LoopState(), p, "new plan", result(p), now, 1000.0)
    return LoopState(**{**state.__dict__, "flush_at": None}) if flushed else state


def test_a_new_plan_is_applied_and_published():
    p = plan(8080)
    state, actions = step.tick(LoopState(), p, now=10.0)
    assert actions == (Apply(p, "new plan"),)
    state, actions = step.applied(state, p, "new plan", result(p), now=10.5, wall=1000.0)
    assert [type(a) for a in actions] == [Publish]
    assert state.current is p and state.last.plan_hash == p.hash
    assert state.next_resync == 10.5 + step.RESYNC_INTERVAL
    assert state.flush_at == 10.5 + step.FLUSH_QUIET and state.retry_at is None


def test_nothing_to_do_without_a_plan_or_a_due_timer():
    assert step.tick(LoopState(), None, now=5.0) == (LoopState(), ())
    state = applied_state(plan(8080), now=100.0)
    state = LoopState(**{**state.__dict__, "flush_at": None})
    assert step.tick(state, None, now=101.0) == (state, ())


def test_the_same_plan_again_is_not_applied():
    p = plan(8080)
    state = applied_state(p)
    again = plan(8080)  # equal content, a new object (new notes or sources)
    state2, actions = step.tick(state, again, now=100.01)
    assert actions == () and state2.current is again


def test_coalescing_only_the_newest_pending_plan_is_applied():
    # The loop keeps only the newest plan of those that arrived meanwhile (PlanFeed hands out
    # one); the step applies exactly it.
    newest = plan(8082)
    _, actions = step.tick(applied_state(plan(8080)), newest, now=100.01)
    assert actions == (Apply(newest, "new plan"),)


def test_files_are_flushed_after_a_quiet_period_but_no_later_than_flush_max():
    p = plan(8080)
    state = applied_state(p, now=100.0)
    # A plan arriving within the quiet time: no flush yet.
    _, actions = step.tick(state, plan(8081), now=100.0 + step.FLUSH_QUIET)
    assert Flush() not in actions
    # Quiet: flushed.
    state2, actions = step.tick(state, None, now=100.0 + step.FLUSH_QUIET)
    assert actions == (Flush(),) and state2.flush_at is None
    # A burst: each apply moves flush_at, but never past unflushed_since + FLUSH_MAX.
    t = 100.0
    for _ in range(40):
        t += 0.04
        q = plan(8080 + int(t * 100) % 50)
        state, _ = step.applied(state, q, "new plan", result(q), now=t, wall=0.0)
        assert state.flush_at <= 100.0 + step.FLUSH_MAX
    _, actions = step.tick(state, plan(9000), now=100.0 + step.FLUSH_MAX)
    assert actions[0] == Flush()


def test_resync_every_interval_and_timeouts():
    p = plan(8080)
    state = applied_state(p, now=100.0)
    assert abs(step.poll_timeout(state, 100.0) - step.FLUSH_QUIET) < 1e-9
    state = LoopState(**{**state.__dict__, "flush_at": None})
    assert step.poll_timeout(state, 100.0) == step.MAX_WAIT
    assert abs(step.poll_timeout(state, 100.0 + step.RESYNC_INTERVAL - 0.05) - 0.05) < 1e-9
    _, actions = step.tick(state, None, now=100.0 + step.RESYNC_INTERVAL)
    assert actions == (Apply(p, "resync"),)


def test_a_failed_apply_is_retried_with_backoff_and_quiet_at_the_cap():
    p = plan(8080)
    state, _ = step.tick(LoopState(), p, now=0.0)
    delays, quiet = [], []
    now = 0.0
    for _ in range(7):
        state, actions = step.applied(state, p, "retry", result(p, action="none", ok=False), now=now, wall=0.0)
        retry = next(a for a in actions if isinstance(a, RetryIn))
        delays.append(retry.delay)
        quiet.append(retry.quiet)
        assert state.retry_at == now + retry.delay
        _, due = step.tick(state, None, now=state.retry_at)
        assert Apply(p, "retry") in due
        now = state.retry_at
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert quiet == [False, False, False, False, True, True, True]
    # Success resets the backoff.
    state, actions = step.applied(state, p, "retry", result(p), now=now, wall=0.0)
    assert state.retry_at is None and state.failures == 0 and not any(isinstance(a, RetryIn) for a in actions)


def test_a_rejected_plan_is_not_retried_but_a_set_aside_service_is():
    p = plan(8080)
    state, actions = step.applied(LoopState(), p, "new plan", result(p, action="rejected", ok=False), 1.0, 0.0)
    assert state.retry_at is None
    state, actions = step.applied(LoopState(), p, "new plan", result(p, set_aside={"8080/tcp": "taken"}), 1.0, 0.0)
    assert state.retry_at == 1.5


def test_a_resync_that_changes_nothing_is_not_published():
    p = plan(8080)
    state = applied_state(p)
    _, actions = step.applied(state, p, "resync", result(p, action="none"), now=120.0, wall=0.0)
    assert not any(isinstance(a, Publish) for a in actions)
    # ... but one that had to fix something is.
    _, actions = step.applied(state, p, "resync", result(p, action="runtime"), now=120.0, wall=0.0)
    assert any(isinstance(a, Publish) for a in actions)


def test_change_to_applied_is_observed_once_per_plan():
    p = plan(8080, changed_at=990.0)
    state, actions = step.applied(LoopState(), p, "new plan", result(p), now=1.0, wall=1000.0)
    assert step.Observe(10.0) in actions
    _, actions = step.applied(state, p, "resync", result(p), now=20.0, wall=1010.0)
    assert not any(isinstance(a, step.Observe) for a in actions)


def test_a_plan_lacking_a_source_is_held_once_then_resumed():
    full = plan(3000, 3001, ready=("file", "marathon"))
    state = applied_state(full, flushed=True)
    partial = plan(3001, ready=("file",))
    state, actions = step.tick(state, partial, now=101.0)
    assert actions == (Hold(partial, full, ("marathon",), announce=True),) and state.held is partial
    state, actions = step.tick(state, partial, now=102.0)
    assert actions == (Hold(partial, full, ("marathon",), announce=False),)
    # The same services under fewer sources is no change: nothing held.
    same = Plan(full.services, full.settings, sources_ready=("file",))
    assert step.tick(applied_state(full, flushed=True), same, now=101.0)[1] == ()
    # Back with every source, and the same plan as served: the last result is published again.
    state, actions = step.tick(state, full, now=103.0)
    assert actions == (Resume(full), Publish(state.last)) and state.held is None


# -- drivers from the plan's settings ---------------------------------------------------------


class FakeDriver:
    def __init__(self, name: str):
        self.name, self.closed, self.reloads = name, False, 0

    def apply(self, p):
        return DriverResult(self.name, True, "none")

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_drivers_for_is_the_one_rule():
    assert drivers_for(ProxySettings()) == ("haproxy", "pen")
    assert drivers_for(ProxySettings(haproxy=False)) == ("pen",)
    assert drivers_for(ProxySettings(vhost_domain="apps.test")) == ("haproxy", "pen", "nginx")
    assert drivers_for(Settings(run_dir="/tmp/pm-unused", haproxy=False)) == ("pen",)


def test_the_plan_starts_and_stops_drivers_and_a_disagreement_is_warned_once(caplog):
    made = []

    def factory(name, settings):
        made.append(FakeDriver(name))
        return made[-1]

    drivers = DriverSet(Settings(run_dir="/tmp/pm-unused", haproxy=False), factory)
    assert [d.name for d in drivers.drivers] == ["pen"]
    with caplog.at_level(logging.WARNING, logger="proxymatic.applier"):
        got = drivers.for_plan(plan(8080, haproxy=True))
        drivers.for_plan(plan(8081, haproxy=True))
    assert [d.name for d in got] == ["haproxy", "pen"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ask for drivers pen" in warnings[0] and "haproxy=True" in warnings[0]
    assert "the plan wins" in drivers.details()["note"]
    # The plan drops HAProxy again: applied once more (it releases its ports), then closed.
    haproxy = next(d for d in made if d.name == "haproxy")
    got = drivers.for_plan(plan(8080, haproxy=False))
    assert [d.name for d in got] == ["haproxy", "pen"]  # HAProxy first: its ports free before Pen binds
    assert drivers.retire() == [haproxy]
    assert [d.name for d in drivers.drivers] == ["pen"] and drivers.note == ""
    # nginx follows the vhost domain.
    assert [d.name for d in drivers.for_plan(plan(8080, haproxy=False, vhost_domain="apps.test"))] == ["pen", "nginx"]
