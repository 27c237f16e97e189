"""The applier stage's loop as pure steps: no bus, no drivers, no clock (`now` is passed in).

`tick(state, pending, now)` decides, when the loop wakes up (a plan arrived, a timer is due),
what to do: write the drivers' files (`Flush`, once plans stopped coming for FLUSH_QUIET, at
most FLUSH_MAX after the change), hold a plan that lacks a source (`Hold`), publish the last
result again (`Publish`, when a held plan's sources are back and it changes nothing), or apply a
plan (`Apply`: a new one, a retry after a failure or a set-aside service, the periodic resync).
Plans that came meanwhile were coalesced before: `pending` is only the newest.
`applied(state, plan, reason, result, now, wall)` decides what follows an apply: publish the
result or not, the change→applied latency to observe, when to flush, retry and resync.
`poll_timeout(state, now)` is how long the loop may wait for a message. main.run performs the
actions.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from services.applier.completeness import missing_sources
from services.common.backoff import Backoff
from services.common.model import ApplyResult, Plan

RETRY_MIN = 0.5
RETRY_MAX = 5.0  # a retry is one connect() to a unix socket: cheap
RESYNC_INTERVAL = 15.0
# Files describing the applied state are written once plans stop coming for FLUSH_QUIET
# seconds (at most FLUSH_MAX after the change): a burst of changes is not a burst of fsyncs,
# and writing never delays the next change.
FLUSH_QUIET = 0.05
FLUSH_MAX = 1.0
MAX_WAIT = 0.2  # the loop wakes up at least this often (the stop event)
# Driver actions that changed what a proxy serves (what change_to_applied measures).
CHANGING_ACTIONS = frozenset({"reload", "start", "runtime"})

_BACKOFF = Backoff(RETRY_MIN, RETRY_MAX)  # only its pure `after` is used


def driver_details(result: ApplyResult):
    """The per-driver entries of a result's details (not `held`, `drivers`)."""
    return [d for d in result.details.values() if isinstance(d, dict) and "action" in d and "ok" in d]


def should_retry(result: ApplyResult) -> bool:
    """Failures other than a rejected config are transient (a proxy not up yet); a set-aside
    service is retried too (its port may be freed)."""
    return any((not d.get("ok") and d.get("action") != "rejected") or d.get("set_aside")
               for d in driver_details(result))


def changed_something(result: ApplyResult) -> bool:
    return any(d.get("action") in CHANGING_ACTIONS for d in driver_details(result))


@dataclass(frozen=True)
class LoopState:
    current: Plan | None = None  # the plan the proxies were last converged to (or tried)
    held: Plan | None = None  # the newest plan held back for lacking a source of `current`
    last: ApplyResult | None = None
    observed: str = ""  # the hash of the last plan whose change→applied latency was observed
    retry_at: float | None = None
    failures: int = 0  # retries scheduled in a row (the backoff)
    next_resync: float = float("inf")
    flush_at: float | None = None  # when the drivers' files are due
    unflushed_since: float = 0.0


@dataclass(frozen=True)
class Flush:
    """Let every driver write the files describing what it applied."""


@dataclass(frozen=True)
class Hold:
    """`plan` lacks the sources `missing` that `current` had: publish a held result (first time
    for this plan only: `announce`)."""

    plan: Plan
    current: Plan
    missing: tuple[str, ...]
    announce: bool


@dataclass(frozen=True)
class Resume:
    """A plan with every source again, after one was held (for the log)."""

    plan: Plan


@dataclass(frozen=True)
class Publish:
    """Publish `result` (and log it with `reason`, `latency` when `log`)."""

    result: ApplyResult
    reason: str = ""
    latency: float | None = None
    log: bool = False


@dataclass(frozen=True)
class Apply:
    plan: Plan
    reason: str  # "new plan", "retry", "resync"


@dataclass(frozen=True)
class Observe:
    """One change→applied latency, in seconds."""

    seconds: float


@dataclass(frozen=True)
class RetryIn:
    """A retry was scheduled in `delay` seconds; `quiet` once the backoff is at its cap."""

    plan: Plan
    delay: float
    quiet: bool


def poll_timeout(state: LoopState, now: float) -> float:
    """How long the loop may wait for a message before a timer is due."""
    return min(MAX_WAIT, max(0.0, state.next_resync - now),
               max(0.0, state.retry_at - now) if state.retry_at is not None else MAX_WAIT,
               max(0.0, state.flush_at - now) if state.flush_at is not None else MAX_WAIT)


def tick(state: LoopState, pending: Plan | None, now: float) -> tuple[LoopState, tuple]:
    """The loop woke up at `now` with `pending` (the newest plan not applied yet, or None)."""
    actions: list = []
    if state.flush_at is not None and now >= state.flush_at and \
            (pending is None or now - state.unflushed_since >= FLUSH_MAX):
        state = replace(state, flush_at=None)
        actions.append(Flush())
    current = state.current
    if pending is not None:
        plan = pending
        missing = missing_sources(current, plan)
        if missing and current is not None:
            # The same services under fewer sources is no change: nothing to hold.
            if plan.hash != current.hash:
                announce = state.held is None or state.held.hash != plan.hash
                actions.append(Hold(plan, current, tuple(missing), announce))
                state = replace(state, held=plan)
            return state, tuple(actions)
        resumed = state.held is not None
        if resumed:
            actions.append(Resume(plan))
        state = replace(state, held=None)
        last = state.last
        if last is not None and plan.hash == last.plan_hash and not should_retry(last):
            state = replace(state, current=plan)  # the same plan again (new notes or sources): nothing to do
            if resumed:  # the held result was the last word on applied.<node>: replace it
                actions.append(Publish(last))
            return state, tuple(actions)
        actions.append(Apply(plan, "new plan"))
    elif current is not None and state.retry_at is not None and now >= state.retry_at:
        actions.append(Apply(current, "retry"))
    elif current is not None and now >= state.next_resync:
        actions.append(Apply(current, "resync"))
    return state, tuple(actions)


def applied(state: LoopState, plan: Plan, reason: str, result: ApplyResult, now: float,
            wall: float) -> tuple[LoopState, tuple]:
    """`plan` was applied (for `reason`) with `result`; `now` is the monotonic clock after the
    apply, `wall` the wall clock (plans carry their change's wall-clock time)."""
    actions: list = []
    observed, latency = state.observed, None
    if changed_something(result) and plan.hash != observed:
        observed = plan.hash
        if plan.changed_at > 0:
            latency = wall - plan.changed_at
            actions.append(Observe(latency))
    last = state.last
    changed = last is None or (result.plan_hash, result.ok, result.errors) != (last.plan_hash, last.ok, last.errors)
    if reason == "new plan" or changed or result.action != "none":
        actions.append(Publish(result, reason, latency, log=True))
    unflushed_since = now if state.flush_at is None else state.unflushed_since
    flush_at = min(now + FLUSH_QUIET, unflushed_since + FLUSH_MAX)
    if should_retry(result):
        # At the backoff's cap (a service waiting for its port, a proxy down for long) the
        # retries are quiet: the drivers log each reason once, not every 5 s.
        failures = state.failures + 1
        delay = _BACKOFF.after(failures)
        actions.append(RetryIn(plan, delay, quiet=delay >= RETRY_MAX))
        retry_at: float | None = now + delay
    else:
        failures, retry_at = 0, None
    return LoopState(current=plan, held=state.held, last=result, observed=observed, retry_at=retry_at,
                     failures=failures, next_resync=now + RESYNC_INTERVAL, flush_at=flush_at,
                     unflushed_since=unflushed_since), tuple(actions)
