"""What the status stage knows, and the /status verdict derived from it (pure, testable).

/status is the data plane's health: OK once the pipeline has delivered and applied a plan
(latched: a plan being applied or rejected later never flaps it) and while every proxy of this
node answers its probe. Control-plane faults (a stage hung or dead) and services the applier set
aside never fail it: the proxies keep serving the last good state. They show in the details.
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
    sources: dict[str, dict] = field(default_factory=dict)  # name -> {state, error, services, hash}
    plan_hash: str = ""
    plan_sources_ready: tuple[str, ...] = ()
    plan_notes: tuple[str, ...] = ()
    plan_counts: tuple[int, int] = (0, 0)  # services, servers in the newest plan (for /metrics)
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

    def converged(self, node: str) -> bool:
        result = self.applied.get(node)
        return (
            bool(self.plan_hash)
            and set(self.configured_sources) <= set(self.plan_sources_ready)
            and result is not None and result.ok and result.plan_hash == self.plan_hash
        )

    def serves_every_source(self, node: str) -> bool:
        """The applier says the proxies serve a plan with every configured source: what makes a
        status stage restarted after initialization OK at once, whatever the latest result
        (a held or rejected plan, a proxy restarting) says."""
        served = self.served_sources.get(node)
        return served is not None and set(self.configured_sources) <= set(served)

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
            return {
                "status": verdict,
                "node": node,
                "sources": {name: self.sources.get(name, {"state": "initializing"}) for name in self.configured_sources},
                "plan": {"hash": self.plan_hash, "sources_ready": list(self.plan_sources_ready),
                         "notes": list(self.plan_notes)},
                "applied": result.to_dict() if result else None,
                "converged": self.converged(node),
                "set_aside": set_aside,
                "proxies": {name: status.to_dict(now) for name, status in sorted(self.proxies.items())},
                "stages": {sender: liveness.to_dict() for sender, liveness in sorted(self.stages.items())},
                "heartbeats": {sender: round(age, 3) for sender, age in sorted(self.heartbeats.items())},
            }
