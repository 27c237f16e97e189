"""Exponential backoff: the one helper every retry loop uses (collector runners, the applier,
the etcd reader, Marathon's event stream)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays from `initial`, doubled after each failure up to `maximum`; `reset()` after a
    success. `next()` gives the delay to wait now."""

    initial: float
    maximum: float
    current: float = field(init=False)

    def __post_init__(self) -> None:
        self.current = self.initial

    def next(self) -> float:
        delay = self.current
        self.current = min(self.current * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.current = self.initial

    def after(self, failures: int) -> float:
        """The delay after `failures` failures in a row (1: `initial`), for loops that count them."""
        return min(self.initial * 2 ** max(0, failures - 1), self.maximum)
