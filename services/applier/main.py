"""The applier stage: converges this node's proxies to the newest plan.

Subscribes to the plan on the planner's bus (a keyed state: one `plan:<port>/<protocol>` message
per changed service, then the `plan` summary; docs/bus.md), or on each central's (PLANNER_BUS may
list several on a node: the PlanFeed serves the newest complete plan of the planners alive,
docs/roles.md), and publishes, for every plan it
applies, an ApplyResult on `applied.<node>` (one entry per driver in `details`). A PlanFeed
(plan_feed.py) mirrors the keys and hands out the plan when a summary's hash matches the mirror;
when it does not (a key message lost), it asks for a snapshot (`Subscriber.resync`) and nothing
is applied meanwhile: never a partial plan. Plans queued while a plan is being applied are
coalesced: only the newest is built and applied.

A driver that cannot reach its proxy (not started yet, restarting) reports a not-ok result; the
stage publishes it and retries with exponential backoff, and never exits for it. A rejected plan
(config that fails validation) is not retried: the proxy keeps its last good config until the
next plan. Every RESYNC_INTERVAL the current plan is applied again, a cheap no-op unless a proxy
was restarted or changed behind the applier's back.

A plan that lacks a source the served plan had is held, not applied (completeness.py); a key
or summary that does not decode (or a summary whose hash does not match its content) is logged,
counted (`dropped` in the heartbeat) and dropped.
Heartbeats come from a thread of their own, so a driver blocked for seconds (a reload, `haproxy
-c`, a Pen start) never makes a live applier look dead.

The loop's decisions are the pure steps of loop_step.py (`tick`, `applied`, `poll_timeout`,
with `now` passed in); this module performs them. Which drivers run follows the plan's settings
(drivers.py: `drivers_for`, `DriverSet`), the same settings they render from; a node whose own
options disagree logs it once (the plan wins) and says so in `details.drivers` and its heartbeat
(`drivers`, `drivers_note`).

The heartbeat carries the stage's counters (docs/bus.md, "Counters in heartbeats"), which the
status stage turns into /metrics: `applies` ({proxy: {action: count}}: one per driver result of
every apply, resyncs and retries included, and `held` for every proxy each time a new plan is
held), `haproxy_reloads` (reloads HAProxy was asked for, failed ones included) and
`change_to_applied` (a LatencyHistogram of now - plan.changed_at, observed once per plan, at the
first apply that changed something). They restart at 0 only when this stage does. Beside them,
`plan_resyncs` counts the snapshots asked for because a plan summary disagreed with the keys.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import zmq

from services.applier.completeness import held_result, hold_note
from services.applier.driver import DriverResult, ProxyDriver
from services.applier.drivers import DriverSet
from services.applier.loop_step import (
    Apply, Flush, Hold, LoopState, Observe, Publish, Resume, RetryIn, applied, changed_something, poll_timeout, tick,
)
from services.applier.plan_feed import PlanFeed
from services.common.bus import HEARTBEAT_INTERVAL, Heartbeats, Publisher, Subscriber
from services.common.curve import BusSecurity
from services.common.config import Settings
from services.common.latency import LatencyHistogram
from services.common.model import ApplyResult, Plan
from services.common.wire import PLAN_PREFIX

log = logging.getLogger("proxymatic.applier")

# Most significant first: what one ApplyResult says when drivers did different things.
ACTIONS = ("rejected", "reload", "start", "runtime", "none")


def apply_plan(drivers: list[ProxyDriver], plan: Plan) -> ApplyResult:
    """Run every driver; a driver that raises is reported, never fatal."""
    results: list[DriverResult] = []
    for driver in drivers:
        name = getattr(driver, "name", type(driver).__name__)
        try:
            result = driver.apply(plan)
        except Exception as error:  # a driver bug must not stop the other proxies
            log.exception("applier: driver %s failed on plan %s", name, plan.hash)
            result = DriverResult(name, False, "none", errors=(f"{type(error).__name__}: {error}",))
        results.append(result)
    actions = {r.action for r in results} or {"none"}
    action = next((a for a in ACTIONS if a in actions), sorted(actions)[0])
    return ApplyResult(
        plan_hash=plan.hash,
        ok=all(r.ok for r in results),
        action=action,
        errors=tuple(f"{r.driver}: {e}" for r in results for e in (*r.errors, *r.set_aside.values())),
        details={r.driver: {"ok": r.ok, "action": r.action, "errors": list(r.errors),
                            "set_aside": dict(r.set_aside), **r.details}
                 for r in results},
    )


def flush(drivers: list[ProxyDriver]) -> None:
    """Let every driver write the files describing what it applied (off the path to traffic)."""
    for driver in drivers:
        try:
            driver.flush()
        except Exception:
            log.exception("applier: driver %s could not save its state", driver.name)


def result_payload(result: ApplyResult) -> dict:
    """The wire form of a result; a held plan's note also as `notes` (docs/bus.md)."""
    payload = result.to_dict()
    held = result.details.get("held") if result.action == "held" else None
    if held:
        payload["notes"] = [held["note"]]
    return payload


@dataclass
class Health:
    """What the heartbeat thread reports; written by the stage loop, read by that thread."""

    plan: str = ""
    ok: bool = False
    held: str = ""
    # The sources of the newest plan applied ok: a status stage restarted later learns from it
    # that this node's proxies already serve a complete plan (its own latch died with it).
    served_sources: tuple[str, ...] = ()
    # When the apply under way began (monotonic), else None: the heartbeat thread keeps beating
    # while the loop is inside a driver, so a driver stuck for good shows as a growing number.
    busy_since: float | None = None
    subscriber: Subscriber | None = None
    plans: PlanFeed | None = None  # its `resyncs`: snapshots asked for because a summary disagreed
    driver_set: DriverSet | None = None  # the drivers the plan's settings ask for (drivers.py)
    # The counters (see the module's docstring), written by the loop under `counters_lock`.
    applies: dict[str, dict[str, int]] = field(default_factory=dict)
    haproxy_reloads: int = 0
    retired_reloads: int = 0  # reloads of HAProxy drivers stopped since (a plan without HAProxy)
    change_to_applied: LatencyHistogram = field(default_factory=LatencyHistogram)
    counters_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, result: ApplyResult, drivers: list[ProxyDriver]) -> None:
        """One apply's driver results, and the drivers' reload counts."""
        reloads = self.retired_reloads + sum(int(getattr(d, "reloads", 0)) for d in drivers if d.name == "haproxy")
        with self.counters_lock:
            for name, detail in result.details.items():
                action = detail.get("action") if isinstance(detail, dict) else None
                if isinstance(action, str):
                    per_proxy = self.applies.setdefault(name, {})
                    per_proxy[action] = per_proxy.get(action, 0) + 1
            self.haproxy_reloads = reloads

    def retire(self, driver: ProxyDriver) -> None:
        """A driver is stopped: its reloads stay counted."""
        if driver.name == "haproxy":
            with self.counters_lock:
                self.retired_reloads += int(getattr(driver, "reloads", 0))

    def count_held(self, drivers: list[ProxyDriver]) -> None:
        with self.counters_lock:
            for driver in drivers:
                per_proxy = self.applies.setdefault(driver.name, {})
                per_proxy["held"] = per_proxy.get("held", 0) + 1

    def observe(self, seconds: float) -> None:
        with self.counters_lock:
            self.change_to_applied.observe(seconds)

    def planners(self) -> dict[str, dict]:
        """Each planner followed (several on a node with two centrals): the hash and change time
        of its newest complete plan, and whether it is alive (docs/roles.md)."""
        if self.plans is None:
            return {}
        now = time.monotonic()
        return {planner.sender: {"plan": planner.plan.hash if planner.plan is not None else "",
                                 "changed_at": planner.plan.changed_at if planner.plan is not None else 0.0,
                                 "alive": planner.alive(now)}
                for planner in list(self.plans.planners.values())}

    def payload(self) -> dict:
        busy_since = self.busy_since
        with self.counters_lock:
            counters = {"applies": {name: dict(actions) for name, actions in self.applies.items()},
                        "haproxy_reloads": self.haproxy_reloads,
                        "change_to_applied": self.change_to_applied.to_dict()}
        return {"stage": "applier", "plan": self.plan, "ok": self.ok, "held": self.held,
                "served_sources": list(self.served_sources),
                "busy_seconds": round(time.monotonic() - busy_since, 1) if busy_since is not None else 0.0,
                "dropped": self.subscriber.dropped if self.subscriber else 0,
                "plan_resyncs": self.plans.resyncs if self.plans else 0, **counters,
                "planners": self.planners(),
                **({"drivers": [d.name for d in self.driver_set.drivers], "drivers_note": self.driver_set.note}
                   if self.driver_set is not None else {})}


def log_result(plan: Plan, reason: str, result: ApplyResult, latency: float | None) -> None:
    """One line per published result; an apply that changed something carries the plan, the
    action per proxy and the change→applied seconds as fields too (for LOG_FORMAT=json)."""
    entries = {name: d for name, d in result.details.items() if isinstance(d, dict) and "action" in d and "ok" in d}
    summary = ", ".join(f"{name} {d['action']}{'' if d['ok'] else ' FAILED'}" for name, d in entries.items())
    errors = "; " + "; ".join(result.errors) if result.errors else ""
    level = logging.INFO if result.ok else logging.WARNING
    if not changed_something(result):
        log.log(level, "applier: plan %s (%s): %s%s", plan.hash, reason, summary or "no drivers", errors)
        return
    took = "unknown" if latency is None else f"{latency:.3f}s"
    log.log(level, "applier: plan %s (%s): %s; change to applied %s%s", plan.hash, reason, summary, took, errors,
            extra={"plan_hash": plan.hash, "reason": reason,
                   "actions": {name: d["action"] for name, d in entries.items()},
                   "change_to_applied_seconds": None if latency is None else round(latency, 6)})


def run(settings: Settings, stop: threading.Event, drivers: list[ProxyDriver] | None = None,
        heartbeat_interval: float = HEARTBEAT_INTERVAL) -> None:
    """The stage: the pure steps of loop_step.py decide, this loop performs (bus, drivers, clock).
    `drivers`: a fixed list (tests); by default the plan's settings decide (drivers.DriverSet)."""
    ctx = zmq.Context.instance()
    driver_set = DriverSet(settings) if drivers is None else None
    fixed = drivers

    def current_drivers() -> list[ProxyDriver]:
        return driver_set.drivers if driver_set is not None else list(fixed or [])

    topic = f"applied.{settings.node}"
    publisher = Publisher(ctx, f"applier@{settings.node}", settings.bus("applier"), heartbeat_interval,
                          security=BusSecurity.from_settings(settings))
    subscriber = Subscriber(ctx, list(settings.buses("planner")), [PLAN_PREFIX],
                            security=BusSecurity.from_settings(settings))
    plans = PlanFeed(subscriber, "applier")
    health = Health(subscriber=subscriber, plans=plans, driver_set=driver_set)
    heartbeats = Heartbeats(publisher, health.payload).start()
    log.info("applier: plans from %s, results on %s as %s, drivers: %s",
             ", ".join(endpoint.pub for endpoint in settings.buses("planner")),
             settings.bus("applier").pub, topic, ", ".join(d.name for d in current_drivers()) or "none")

    state = LoopState()
    pending: Plan | None = None  # the newest plan not applied yet
    try:
        while not stop.is_set():
            ready = dict(subscriber.poller(publisher.snapshot).poll(int(poll_timeout(state, time.monotonic()) * 1000)))
            if publisher.snapshot in ready:
                publisher.serve_snapshots()
            pending = plans.feed(subscriber.drain(ready)) or pending

            state, actions = tick(state, pending, time.monotonic())
            pending = None
            for action in actions:
                if isinstance(action, Flush):
                    flush(current_drivers())
                elif isinstance(action, Hold):
                    if action.announce:
                        log.warning("applier: %s", hold_note(action.plan, action.current, action.missing))
                        publisher.publish(topic, result_payload(held_result(action.plan, action.current,
                                                                            action.missing)))
                        health.count_held(current_drivers())
                elif isinstance(action, Resume):
                    log.info("applier: plan %s has every source again; applying it", action.plan.hash)
                elif isinstance(action, Publish):
                    publisher.publish(topic, action.result.to_dict())
                elif isinstance(action, Apply):
                    state = _apply(action, state, driver_set, fixed, health, publisher, topic, heartbeats)
            health.held = state.held.hash if state.held is not None else ""
    finally:
        heartbeats.stop()
        flush(current_drivers())
        for driver in current_drivers():
            try:
                driver.close()
            except Exception:
                log.exception("applier: closing driver %s", driver.name)
        subscriber.close()
        publisher.close()


def _apply(action: Apply, state: LoopState, driver_set: DriverSet | None, fixed: list[ProxyDriver] | None,
           health: "Health", publisher: Publisher, topic: str, heartbeats: Heartbeats) -> LoopState:
    """Perform one Apply: run the drivers, then what loop_step.applied decides."""
    plan = action.plan
    drivers = driver_set.for_plan(plan) if driver_set is not None else list(fixed or [])
    health.busy_since = time.monotonic()
    try:
        result = apply_plan(drivers, plan)
    finally:
        health.busy_since = None
    health.count(result, drivers)
    if driver_set is not None:
        if driver_set.note:
            result = ApplyResult(plan_hash=result.plan_hash, ok=result.ok, action=result.action, errors=result.errors,
                                 details={**result.details, "drivers": driver_set.details()})
        for leaving in driver_set.retire():
            health.retire(leaving)
            try:
                leaving.flush()
                leaving.close()
            except Exception:
                log.exception("applier: closing driver %s", leaving.name)
    state, actions = applied(state, plan, action.reason, result, time.monotonic(), time.time())
    for follow in actions:
        if isinstance(follow, Observe):
            health.observe(follow.seconds)
        elif isinstance(follow, Publish):
            publisher.publish(topic, follow.result.to_dict())
            log_result(plan, follow.reason, follow.result, follow.latency)
        elif isinstance(follow, RetryIn):
            (log.debug if follow.quiet else log.info)("applier: retrying plan %s in %.1fs", plan.hash, follow.delay)
    health.plan, health.ok = result.plan_hash, result.ok
    if result.ok:
        health.served_sources = plan.sources_ready
    heartbeats.beat_now()
    return state
