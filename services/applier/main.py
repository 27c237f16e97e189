"""The applier stage: converges this node's proxies to the newest plan.

Subscribes to the plan on the planner's bus (a keyed state: one `plan:<port>/<protocol>` message
per changed service, then the `plan` summary; docs/bus.md) and publishes, for every plan it
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

from services.applier.completeness import held_result, hold_note, missing_sources
from services.applier.driver import DriverResult, ProxyDriver
from services.applier.haproxy_driver import HaproxyDriver
from services.applier.nginx_driver import NginxDriver
from services.applier.pen_driver import PenDriver
from services.applier.plan_feed import PlanFeed
from services.common.backoff import Backoff
from services.common.bus import HEARTBEAT_INTERVAL, Heartbeats, Publisher, Subscriber
from services.common.config import Settings
from services.common.latency import LatencyHistogram
from services.common.model import ApplyResult, Plan
from services.common.wire import PLAN_PREFIX

log = logging.getLogger("proxymatic.applier")

RETRY_MIN = 0.5
RETRY_MAX = 5.0  # a retry is one connect() to a unix socket: cheap
RESYNC_INTERVAL = 15.0
# Files describing the applied state are written once plans stop coming for FLUSH_QUIET
# seconds (at most FLUSH_MAX after the change): a burst of changes is not a burst of fsyncs,
# and writing never delays the next change.
FLUSH_QUIET = 0.05
FLUSH_MAX = 1.0
# Most significant first: what one ApplyResult says when drivers did different things.
ACTIONS = ("rejected", "reload", "start", "runtime", "none")
# Driver actions that changed what a proxy serves (what change_to_applied measures).
CHANGING_ACTIONS = frozenset({"reload", "start", "runtime"})

def build_drivers(settings: Settings) -> list[ProxyDriver]:
    """The drivers of this node: HAProxy when HAPROXY, Pen always (UDP, and TCP without
    HAProxy), nginx with VHOST_DOMAIN."""
    drivers: list[ProxyDriver] = []
    if settings.haproxy:
        drivers.append(HaproxyDriver(settings, defer_writes=True))
    drivers.append(PenDriver(settings))
    if settings.vhost_domain:
        drivers.append(NginxDriver(settings))
    return drivers


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


def should_retry(result: ApplyResult) -> bool:
    """Failures other than a rejected config are transient (a proxy not up yet); a set-aside
    service is retried too (its port may be freed)."""
    return any((not d.get("ok") and d.get("action") != "rejected") or d.get("set_aside")
               for d in result.details.values())


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
    # The counters (see the module's docstring), written by the loop under `counters_lock`.
    applies: dict[str, dict[str, int]] = field(default_factory=dict)
    haproxy_reloads: int = 0
    change_to_applied: LatencyHistogram = field(default_factory=LatencyHistogram)
    counters_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, result: ApplyResult, drivers: list[ProxyDriver]) -> None:
        """One apply's driver results, and the drivers' reload counts."""
        reloads = sum(int(getattr(d, "reloads", 0)) for d in drivers if d.name == "haproxy")
        with self.counters_lock:
            for name, detail in result.details.items():
                action = detail.get("action") if isinstance(detail, dict) else None
                if isinstance(action, str):
                    per_proxy = self.applies.setdefault(name, {})
                    per_proxy[action] = per_proxy.get(action, 0) + 1
            self.haproxy_reloads = reloads

    def count_held(self, drivers: list[ProxyDriver]) -> None:
        with self.counters_lock:
            for driver in drivers:
                per_proxy = self.applies.setdefault(driver.name, {})
                per_proxy["held"] = per_proxy.get("held", 0) + 1

    def observe(self, seconds: float) -> None:
        with self.counters_lock:
            self.change_to_applied.observe(seconds)

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
                "plan_resyncs": self.plans.resyncs if self.plans else 0, **counters}


def changed_something(result: ApplyResult) -> bool:
    return any(isinstance(d, dict) and d.get("action") in CHANGING_ACTIONS for d in result.details.values())


def log_result(plan: Plan, reason: str, result: ApplyResult, latency: float | None) -> None:
    """One line per published result; an apply that changed something carries the plan, the
    action per proxy and the change→applied seconds as fields too (for LOG_FORMAT=json)."""
    summary = ", ".join(f"{name} {d['action']}{'' if d['ok'] else ' FAILED'}"
                        for name, d in result.details.items())
    errors = "; " + "; ".join(result.errors) if result.errors else ""
    level = logging.INFO if result.ok else logging.WARNING
    if not changed_something(result):
        log.log(level, "applier: plan %s (%s): %s%s", plan.hash, reason, summary or "no drivers", errors)
        return
    took = "unknown" if latency is None else f"{latency:.3f}s"
    log.log(level, "applier: plan %s (%s): %s; change to applied %s%s", plan.hash, reason, summary, took, errors,
            extra={"plan_hash": plan.hash, "reason": reason,
                   "actions": {name: d["action"] for name, d in result.details.items()},
                   "change_to_applied_seconds": None if latency is None else round(latency, 6)})


def run(settings: Settings, stop: threading.Event, drivers: list[ProxyDriver] | None = None,
        heartbeat_interval: float = HEARTBEAT_INTERVAL) -> None:
    ctx = zmq.Context.instance()
    drivers = build_drivers(settings) if drivers is None else drivers
    topic = f"applied.{settings.node}"
    publisher = Publisher(ctx, f"applier@{settings.node}", settings.bus("applier"), heartbeat_interval)
    subscriber = Subscriber(ctx, [settings.bus("planner")], [PLAN_PREFIX])
    plans = PlanFeed(subscriber, "applier")
    health = Health(subscriber=subscriber, plans=plans)
    heartbeats = Heartbeats(publisher, health.payload).start()
    log.info("applier: plans from %s, results on %s as %s, drivers: %s", settings.bus("planner").pub,
             settings.bus("applier").pub, topic, ", ".join(d.name for d in drivers) or "none")

    pending: Plan | None = None  # the newest plan not applied yet
    current: Plan | None = None  # the plan the proxies were last converged to (or tried)
    held: Plan | None = None  # the newest plan held back for lacking a source of `current`
    last: ApplyResult | None = None
    observed = ""  # the hash of the last plan whose change→applied latency was observed
    retry_at: float | None = None
    backoff = Backoff(RETRY_MIN, RETRY_MAX)
    next_resync = float("inf")
    flush_at: float | None = None  # when the drivers' files are due (see FLUSH_QUIET)
    unflushed_since = 0.0
    try:
        while not stop.is_set():
            now = time.monotonic()
            timeout = min(0.2, max(0.0, next_resync - now),
                          max(0.0, retry_at - now) if retry_at is not None else 0.2,
                          max(0.0, flush_at - now) if flush_at is not None else 0.2)
            ready = dict(subscriber.poller(publisher.snapshot).poll(int(timeout * 1000)))
            if publisher.snapshot in ready:
                publisher.serve_snapshots()
            pending = plans.feed(subscriber.drain(ready)) or pending

            now = time.monotonic()
            if flush_at is not None and now >= flush_at and (pending is None or now - unflushed_since >= FLUSH_MAX):
                flush_at = None
                flush(drivers)
            reason = ""
            if pending is not None:
                plan, pending = pending, None
                missing = missing_sources(current, plan)
                if missing and current is not None:
                    # The same services under fewer sources is no change: nothing to hold.
                    if plan.hash != current.hash:
                        if held is None or held.hash != plan.hash:
                            log.warning("applier: %s", hold_note(plan, current, missing))
                            publisher.publish(topic, result_payload(held_result(plan, current, missing)))
                            health.count_held(drivers)
                        held, health.held = plan, plan.hash
                    continue
                resumed = held is not None
                if resumed:
                    log.info("applier: plan %s has every source again; applying it", plan.hash)
                held, health.held = None, ""
                if last is not None and plan.hash == last.plan_hash and not should_retry(last):
                    current = plan  # the same plan again (new notes or sources): nothing to do
                    if resumed:  # the held result was the last word on applied.<node>: replace it
                        publisher.publish(topic, last.to_dict())
                    continue
                reason = "new plan"
            elif current is not None and retry_at is not None and now >= retry_at:
                plan, reason = current, "retry"
            elif current is not None and now >= next_resync:
                plan, reason = current, "resync"
            else:
                continue

            health.busy_since = time.monotonic()
            try:
                result = apply_plan(drivers, plan)
            finally:
                health.busy_since = None
            current = plan
            latency = None
            if changed_something(result) and plan.hash != observed:
                observed = plan.hash
                if plan.changed_at > 0:
                    latency = time.time() - plan.changed_at
                    health.observe(latency)
            health.count(result, drivers)
            changed = last is None or (result.plan_hash, result.ok, result.errors) != \
                (last.plan_hash, last.ok, last.errors)
            if reason == "new plan" or changed or result.action != "none":
                publisher.publish(topic, result.to_dict())
                log_result(plan, reason, result, latency)
            last = result
            health.plan, health.ok = result.plan_hash, result.ok
            if result.ok:
                health.served_sources = plan.sources_ready
            heartbeats.beat_now()
            now = time.monotonic()
            if flush_at is None:
                unflushed_since = now
            flush_at = min(now + FLUSH_QUIET, unflushed_since + FLUSH_MAX)
            if should_retry(result):
                # At the backoff's cap (a service waiting for its port, a proxy down for long) the
                # retries go to debug: the drivers log each reason once, not every 5 s.
                quiet = backoff.at_maximum
                delay = backoff.next()
                retry_at = time.monotonic() + delay
                (log.debug if quiet else log.info)("applier: retrying plan %s in %.1fs", plan.hash, delay)
            else:
                retry_at = None
                backoff.reset()
            next_resync = time.monotonic() + RESYNC_INTERVAL
    finally:
        heartbeats.stop()
        flush(drivers)
        for driver in drivers:
            try:
                driver.close()
            except Exception:
                log.exception("applier: closing driver %s", driver.name)
        subscriber.close()
        publisher.close()
