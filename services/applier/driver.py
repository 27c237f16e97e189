"""The interface between the applier stage and one proxy program (HAProxy, Pen, nginx).

A driver converges its proxy to the part of a plan it owns. It never raises for bad data:
whatever it cannot apply is reported in the result and the proxy keeps its last good state.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from services.common.model import Plan


@dataclass(frozen=True)
class DriverResult:
    driver: str
    ok: bool
    # "none": nothing to do; "runtime": changed live without reload; "reload": config reloaded;
    # "rejected": the rendered config failed validation, the last good one is still serving.
    action: str
    errors: tuple[str, ...] = ()
    details: dict = field(default_factory=dict)
    # Services this proxy could not take (port in use, block rejected), service key
    # ("port/protocol") -> reason naming the service, the port and the OS or proxy error.
    # Everything else in the plan was applied: `ok` speaks for the rest. The applier retries
    # a plan with set-aside services every few seconds, so a freed port is served without a restart.
    set_aside: dict[str, str] = field(default_factory=dict)


class ProxyDriver(ABC):
    name: str

    @abstractmethod
    def apply(self, plan: Plan) -> DriverResult:
        """Converge the proxy to `plan`. Safe to call repeatedly with the same plan (cheap no-op)."""

    def flush(self) -> None:
        """Persist what the last apply changed, after its result was published (optional)."""

    def close(self) -> None:
        """Release sockets; the proxy process itself keeps running (it belongs to supervisord)."""
