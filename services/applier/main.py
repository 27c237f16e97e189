"""The applier stage: converges this node's proxies to the newest plan.

Subscribes to topic `plan` on the planner's bus and publishes, for every plan it applies, an
ApplyResult on `applied.<node>` (one entry per driver in `details`). Plans queued while a plan is
being applied are coalesced: only the newest is applied.

A driver that cannot reach its proxy (not started yet, restarting) reports a not-ok result; the
stage publishes it and retries with exponential backoff, and never exits for it. A rejected plan
(config that fails validation) is not retried: the proxy keeps its last good config until the
next plan. Every RESYNC_INTERVAL the current plan is applied again, a cheap no-op unless a proxy
was restarted or changed behind the applier's back.
"""
from __future__ import annotations

import logging
import threading
import time

import zmq

from services.applier.driver import DriverResult, ProxyDriver
from services.applier.haproxy_driver import HaproxyDriver
from services.applier.nginx_driver import NginxDriver
from services.applier.pen_driver import PenDriver
from services.common.bus import Publisher, Subscriber
from services.common.config import Settings
from services.common.model import ApplyResult, ModelError, Plan, ServiceDecoder

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


def run(settings: Settings, stop: threading.Event, drivers: list[ProxyDriver] | None = None) -> None:
    ctx = zmq.Context.instance()
    drivers = build_drivers(settings) if drivers is None else drivers
    topic = f"applied.{settings.node}"
    publisher = Publisher(ctx, f"applier@{settings.node}", settings.bus("applier"))
    subscriber = Subscriber(ctx, [settings.bus("planner")], ["plan"])
    poller = zmq.Poller()
    for socket in subscriber.sockets():
        poller.register(socket, zmq.POLLIN)
    poller.register(publisher.snapshot, zmq.POLLIN)
    log.info("applier: plans from %s, results on %s as %s, drivers: %s", settings.bus("planner").pub,
             settings.bus("applier").pub, topic, ", ".join(d.name for d in drivers) or "none")

    decoder = ServiceDecoder()
    pending: Plan | None = None  # the newest plan not applied yet
    current: Plan | None = None  # the plan the proxies were last converged to (or tried)
    last: ApplyResult | None = None
    retry_at: float | None = None
    backoff = RETRY_MIN
    next_resync = float("inf")
    flush_at: float | None = None  # when the drivers' files are due (see FLUSH_QUIET)
    unflushed_since = 0.0
    try:
        while not stop.is_set():
            publisher.heartbeat({"stage": "applier", "plan": last.plan_hash if last else "",
                                 "ok": bool(last and last.ok)})
            now = time.monotonic()
            timeout = min(publisher.seconds_to_heartbeat(), 0.2, max(0.0, next_resync - now),
                          max(0.0, retry_at - now) if retry_at is not None else 0.2,
                          max(0.0, flush_at - now) if flush_at is not None else 0.2)
            ready = dict(poller.poll(int(timeout * 1000)))
            if publisher.snapshot in ready:
                publisher.serve_snapshots()
            plans = [m for m in subscriber.drain(ready) if m.topic == "plan"]
            if plans:
                newest = plans[-1]  # older queued plans are obsolete: decode only the newest
                try:
                    pending = Plan.from_dict(newest.payload, decoder)
                except ModelError as error:
                    log.error("applier: rejected plan from %s: %s", newest.sender, error)

            now = time.monotonic()
            if flush_at is not None and now >= flush_at and (pending is None or now - unflushed_since >= FLUSH_MAX):
                flush_at = None
                flush(drivers)
            reason = ""
            if pending is not None:
                plan, pending = pending, None
                if last is not None and plan.hash == last.plan_hash and not should_retry(last):
                    current = plan  # the same plan again (new notes or sources): nothing to do
                    continue
                reason = "new plan"
            elif current is not None and retry_at is not None and now >= retry_at:
                plan, reason = current, "retry"
            elif current is not None and now >= next_resync:
                plan, reason = current, "resync"
            else:
                continue

            result = apply_plan(drivers, plan)
            current = plan
            changed = last is None or (result.plan_hash, result.ok, result.errors) != \
                (last.plan_hash, last.ok, last.errors)
            if reason == "new plan" or changed or result.action != "none":
                publisher.publish(topic, result.to_dict())
                summary = ", ".join(f"{name} {d['action']}{'' if d['ok'] else ' FAILED'}"
                                    for name, d in result.details.items())
                (log.info if result.ok else log.warning)(
                    "applier: plan %s (%s): %s%s", plan.hash, reason, summary or "no drivers",
                    "; " + "; ".join(result.errors) if result.errors else "")
            last = result
            now = time.monotonic()
            if flush_at is None:
                unflushed_since = now
            flush_at = min(now + FLUSH_QUIET, unflushed_since + FLUSH_MAX)
            if should_retry(result):
                retry_at = time.monotonic() + backoff
                log.info("applier: retrying plan %s in %.1fs", plan.hash, backoff)
                backoff = min(backoff * 2, RETRY_MAX)
            else:
                retry_at, backoff = None, RETRY_MIN
            next_resync = time.monotonic() + RESYNC_INTERVAL
    finally:
        flush(drivers)
        for driver in drivers:
            try:
                driver.close()
            except Exception:
                log.exception("applier: closing driver %s", driver.name)
        subscriber.close()
        publisher.close()
