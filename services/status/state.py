"""What the status stage knows, and the /status verdict derived from it (pure, testable)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from services.common.model import ApplyResult

OK, INITIALIZING, TERMINATING = "OK", "INITIALIZING", "TERMINATING"


@dataclass
class PipelineState:
    """Latest facts heard on the bus. Updated by the bus thread, read by HTTP handlers."""

    configured_sources: tuple[str, ...]
    sources: dict[str, dict] = field(default_factory=dict)  # name -> {state, error, services, hash}
    plan_hash: str = ""
    plan_sources_ready: tuple[str, ...] = ()
    plan_notes: tuple[str, ...] = ()
    applied: dict[str, ApplyResult] = field(default_factory=dict)  # node -> last result
    heartbeats: dict[str, float] = field(default_factory=dict)  # sender -> seconds since heard
    # Latched: once the pipeline has converged, a later plan being applied (milliseconds) or a
    # rejected plan (old config still serving) must not flap /status and drain this node.
    initialized_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def converged(self, node: str) -> bool:
        result = self.applied.get(node)
        return (
            bool(self.plan_hash)
            and set(self.configured_sources) <= set(self.plan_sources_ready)
            and result is not None and result.ok and result.plan_hash == self.plan_hash
        )

    def verdict(self, node: str, terminating: bool) -> str:
        if terminating:
            return TERMINATING
        with self.lock:
            if self.initialized_at is None and self.converged(node):
                self.initialized_at = time.time()
            return OK if self.initialized_at is not None else INITIALIZING

    def details(self, node: str, terminating: bool) -> dict:
        verdict = self.verdict(node, terminating)
        with self.lock:
            result = self.applied.get(node)
            return {
                "status": verdict,
                "node": node,
                "sources": {name: self.sources.get(name, {"state": "initializing"}) for name in self.configured_sources},
                "plan": {"hash": self.plan_hash, "sources_ready": list(self.plan_sources_ready),
                         "notes": list(self.plan_notes)},
                "applied": result.to_dict() if result else None,
                "converged": self.converged(node),
                "heartbeats": {sender: round(age, 3) for sender, age in sorted(self.heartbeats.items())},
            }
