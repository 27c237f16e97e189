"""A cumulative latency histogram kept by a stage and carried in its heartbeat.

The applier observes change→applied latencies here; the status stage turns the heartbeat's copy
into `proxymatic_change_to_applied_seconds` (a Prometheus histogram). The counts live in the
stage that observed them, so a restarted status stage shows them again at the next heartbeat.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

# Upper bounds in seconds (Prometheus `le`); +Inf is implicit. From a few milliseconds (a runtime
# API change) to tens of seconds (a source that only polls).
BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class LatencyHistogram:
    """Counts per bucket (not cumulative), their sum and count. Only the owning stage's loop
    writes it; the heartbeat thread reads `to_dict()` (plain values, copied)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))  # last: > BUCKETS[-1]
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        if not math.isfinite(seconds):
            return
        seconds = max(0.0, seconds)  # clocks of two hosts may disagree by a little
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def to_dict(self) -> dict:
        """`{"buckets": [[le, cumulative count], ...], "sum": s, "count": n}`, +Inf last as "+Inf"."""
        cumulative, running = [], 0
        for bound, count in zip((*BUCKETS, math.inf), self.counts):
            running += count
            cumulative.append(["+Inf" if bound == math.inf else bound, running])
        return {"buckets": cumulative, "sum": self.total, "count": self.count}

    @staticmethod
    def cumulative_buckets(data: Any) -> tuple[list[tuple[str, int]], float]:
        """A heartbeat's histogram as (Prometheus buckets [(le, cumulative)], sum); ValueError
        when it is not one `to_dict()` could have written."""
        if not isinstance(data, dict):
            raise ValueError("histogram must be an object")
        buckets, total = data.get("buckets"), data.get("sum")
        if not isinstance(buckets, list) or not buckets or isinstance(total, bool) or not isinstance(total, (int, float)):
            raise ValueError("histogram needs buckets and sum")
        out: list[tuple[str, int]] = []
        previous = 0
        for item in buckets:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], int)
                    and not isinstance(item[1], bool) and item[1] >= previous):
                raise ValueError(f"bad histogram bucket {item!r:.60}")
            bound = item[0]
            if bound != "+Inf" and (isinstance(bound, bool) or not isinstance(bound, (int, float))):
                raise ValueError(f"bad histogram bound {bound!r:.60}")
            out.append((bound if bound == "+Inf" else repr(float(bound)), item[1]))
            previous = item[1]
        if out[-1][0] != "+Inf":
            raise ValueError("histogram must end with +Inf")
        return out, float(total)
