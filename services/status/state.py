"""What the status stage knows, and the /status verdict derived from it (pure, testable).

/status is the data plane's health: OK once the pipeline has delivered and applied a plan
(latched: a plan being applied or rejected later never flaps it) and while every proxy of this
node answers its probe. Control-plane faults (a stage hung or dead) and services the applier set
aside never fail it: the proxies keep serving the last good state. They show in the details.

By ROLE (docs/roles.md): a `node` hears no collector (the sources it needs are those of the
plan's inputs, every one ready) and no planner may be reachable for a while (a central gone: the
node keeps serving its last plan, OK, with `planner unreachable` in the details' `warnings`); a
`central` has no applier and no proxy: it is OK once its plan has every configured source.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from services.common.model import ApplyResult, Plan
from services.status.health import CONFIRM_AFTER, STALE_AFTER, ProbeStatus

log = logging.getLogger("proxymatic.status")

OK, INITIALIZING, TERMINATING, UNAVAILABLE = "OK", "INITIALIZING", "TERMINATING", "UNAVAILABLE"


@dataclass(frozen=True)
class StageLiveness:
    """One stage as its heartbeats tell it."""

    alive: bool
    seconds_since_heard: float
    pid: int | None
    busy_seconds: float | None = None  # the applier: how long its current apply has been running

    def to_dict(self) -> dict:
        out = {"alive": self.alive, "seconds_since_heard": round(self.seconds_since_heard, 3), "pid": self.pid}
        if self.busy_seconds is not None:
            out["busy_seconds"] = self.busy_seconds
        return out


@dataclass
class PipelineState:
    """Latest facts heard on the bus and from the probes. Updated by the bus and prober threads,
    read by HTTP handlers."""

    configured_sources: tuple[str, ...]
    role: str = "all"  # ROLE: all, central or node (what this status stage judges)
    sources: dict[str, dict] = field(default_factory=dict)  # name -> {state, error, services, hash}
    plan_hash: str = ""
    plan_sources_ready: tuple[str, ...] = ()
    plan_notes: tuple[str, ...] = ()
    plan_counts: tuple[int, int] = (0, 0)  # services, servers in the newest plan (for /metrics)
    plan_inputs: tuple[str, ...] = ()  # the sources the newest plan's planner has (a node needs them all)
    plan_changed_at: float = 0.0  # the newest plan's `changed_at` (its age: /status/details, /metrics)
    # sender -> its newest heartbeat payload (the stages' counters for /metrics)
    heartbeat_payloads: dict[str, dict] = field(default_factory=dict)
    applied: dict[str, ApplyResult] = field(default_factory=dict)  # node -> last result
    applied_at: dict[str, float] = field(default_factory=dict)  # node -> when it published that result
    # node -> sources of the newest plan its applier applied ok (from the applier's heartbeat)
    served_sources: dict[str, tuple[str, ...]] = field(default_factory=dict)
    heartbeats: dict[str, float] = field(default_factory=dict)  # sender -> seconds since heard
    stages: dict[str, StageLiveness] = field(default_factory=dict)  # sender -> liveness
    busy: dict[str, float] = field(default_factory=dict)  # sender -> busy_seconds from its heartbeat
    proxies: dict[str, ProbeStatus] = field(default_factory=dict)  # "haproxy", "pen <key>", "nginx"
    # Latched: once the pipeline has converged, a later plan being applied (milliseconds) or a
    # rejected plan (old config still serving) must not flap /status and drain this node.
    initialized_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # The newest plan, rebuilt from the plan's key messages by the bus thread's PlanFeed (only
    # the services that changed cross the bus); set through `plan`, which keeps the fields above.
    _plan: Plan | None = field(default=None, init=False, repr=False)

    @property
    def plan(self) -> Plan | None:
        """The newest plan (read with the lock held); None before the first."""
        return self._plan

    @plan.setter
    def plan(self, plan: Plan) -> None:
        self._plan = plan
        self.plan_hash, self.plan_sources_ready, self.plan_notes = plan.hash, plan.sources_ready, plan.notes
        self.plan_counts = (len(plan.services), sum(len(s.servers) for s in plan.services))
        self.plan_inputs = tuple(name for name, _hash in plan.inputs)
        self.plan_changed_at = plan.changed_at

    def required_sources(self) -> tuple[str, ...]:
        """The sources a plan must have ready: this node's configured ones, or on a `node`
        (which configures none) every source the central's planner has."""
        return self.plan_inputs if self.role == "node" else self.configured_sources

    def planned(self) -> bool:
        """A plan with every required source has been heard."""
        return bool(self.plan_hash) and set(self.required_sources()) <= set(self.plan_sources_ready)

    def converged(self, node: str) -> bool:
        if self.role == "central":  # no applier: its plan is what it delivers
            return self.planned()
        result = self.applied.get(node)
        return self.planned() and result is not None and result.ok and result.plan_hash == self.plan_hash

    def serves_every_source(self, node: str) -> bool:
        """The applier says the proxies serve a plan with every configured source: what makes a
        status stage restarted after initialization OK at once, whatever the latest result
        (a held or rejected plan, a proxy restarting) says. A node (no sources of its own) needs
        its applier to serve a plan with sources, and every source of the newest plan heard."""
        served = self.served_sources.get(node)
        if served is None or self.role == "central":
            return False
        if self.role == "node":
            return bool(served) and set(self.plan_inputs) <= set(served)
        return set(self.configured_sources) <= set(served)

    def planners(self) -> dict[str, StageLiveness]:
        """The planners heard (`planner@<node>`: on a node, each central's), by sender."""
        return {sender: liveness for sender, liveness in self.stages.items() if sender.startswith("planner@")}

    def warnings(self, now_wall: float | None = None) -> list[str]:
        """What an operator should know that does not fail /status (call with the lock held):
        no planner reachable on a stage that serves traffic (the proxies keep the last plan)."""
        if self.role == "central":
            return []
        planners = self.planners()
        if any(liveness.alive for liveness in planners.values()):
            return []
        heard = ", ".join(f"{sender} last heard {liveness.seconds_since_heard:.0f}s ago"
                          for sender, liveness in sorted(planners.items())) or "no planner heard yet"
        age = self.plan_age(now_wall)
        serving = f"; serving the plan of {age:.0f}s ago" if age is not None else ""
        return [f"planner unreachable: {heard}{serving}"]

    def plan_age(self, now_wall: float | None = None) -> float | None:
        """Seconds since the newest change in the newest plan heard (None: no plan, or no time)."""
        if not self.plan_hash or self.plan_changed_at <= 0:
            return None
        return max(0.0, (time.time() if now_wall is None else now_wall) - self.plan_changed_at)

    def proxy_problems(self, now: float | None = None) -> list[str]:
        """`<proxy> not answering: <why>` for every proxy down now (call with the lock held)."""
        now = time.monotonic() if now is None else now
        problems = []
        for name, status in sorted(self.proxies.items()):
            why = status.problem(now, CONFIRM_AFTER, STALE_AFTER)
            if why is not None:
                problems.append(f"{name} not answering: {why}")
        return problems

    def verdict(self, node: str, terminating: bool, now: float | None = None) -> str:
        if terminating:
            return TERMINATING
        with self.lock:
            if self.initialized_at is None and (self.converged(node) or self.serves_every_source(node)):
                self.initialized_at = time.time()
            if self.initialized_at is None:
                return INITIALIZING
            problems = self.proxy_problems(now)
            return f"{UNAVAILABLE}: {'; '.join(problems)}" if problems else OK

    def details(self, node: str, terminating: bool, now: float | None = None) -> dict:
        verdict = self.verdict(node, terminating, now)
        now = time.monotonic() if now is None else now
        with self.lock:
            result = self.applied.get(node)
            set_aside = {driver: dict(d.get("set_aside") or {})
                         for driver, d in (result.details if result else {}).items() if d.get("set_aside")}
            age = self.plan_age()
            planners = self.planners()
            return {
                "status": verdict,
                "node": node,
                "role": self.role,
                "sources": {name: self.sources.get(name, {"state": "initializing"}) for name in self.configured_sources},
                "plan": {"hash": self.plan_hash, "sources_ready": list(self.plan_sources_ready),
                         "notes": list(self.plan_notes), "changed_at": self.plan_changed_at or None,
                         "age_seconds": round(age, 3) if age is not None else None},
                "planners": {sender: liveness.to_dict() for sender, liveness in sorted(planners.items())},
                "planner_reachable": any(liveness.alive for liveness in planners.values()),
                "warnings": self.warnings(),
                "applied": result.to_dict() if result else None,
                "converged": self.converged(node),
                "set_aside": set_aside,
                "proxies": {name: status.to_dict(now) for name, status in sorted(self.proxies.items())},
                "stages": {sender: liveness.to_dict() for sender, liveness in sorted(self.stages.items())},
                "heartbeats": {sender: round(age, 3) for sender, age in sorted(self.heartbeats.items())},
            }
