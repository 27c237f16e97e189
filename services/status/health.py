"""The proxies' health as /status sees it: results of periodic probes, kept per proxy.

The prober thread runs every probe about once a second, all in parallel, off the HTTP handlers
(they only read the results). A proxy counts as not answering once its probes have failed for
CONFIRM_AFTER seconds (a HAProxy reload or a Pen restart is a blip, not an outage), or when it
was not probed for STALE_AFTER seconds (the prober itself is stuck: we can no longer vouch).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

from services.common.model import ApplyResult
from services.status.probes import Probe

log = logging.getLogger("proxymatic.status.health")

PROBE_INTERVAL = 1.0
CONFIRM_AFTER = 2.0
STALE_AFTER = 4.0


@dataclass(frozen=True)
class ProbeStatus:
    ok: bool
    error: str
    checked_at: float  # time.monotonic() when the latest probe started
    failing_since: float | None = None  # start of the first failed probe of the current streak

    def after(self, ok: bool, error: str, started: float) -> "ProbeStatus":
        """This status updated with a new probe outcome."""
        failing_since = None if ok else (self.failing_since if self.failing_since is not None else started)
        return ProbeStatus(ok, error, started, failing_since)

    def problem(self, now: float, confirm_after: float = CONFIRM_AFTER,
                stale_after: float = STALE_AFTER) -> str | None:
        """Why this proxy counts as down now, or None."""
        if now - self.checked_at > stale_after:
            return f"not probed for {now - self.checked_at:.0f}s"
        if not self.ok and self.failing_since is not None and now - self.failing_since >= confirm_after:
            return self.error
        return None

    def to_dict(self, now: float) -> dict:
        return {"ok": self.ok, "error": self.error or None,
                "seconds_since_probe": round(now - self.checked_at, 3),
                "failing_for": None if self.failing_since is None else round(now - self.failing_since, 3)}


def first_status(ok: bool, error: str, started: float) -> ProbeStatus:
    return ProbeStatus(ok, error, started, None if ok else started)


def run_probes(probes: dict[str, Probe], executor: ThreadPoolExecutor, deadline: float) -> dict[str, str]:
    """Run every probe in parallel: name -> "" when it answered, else the reason."""
    futures = {name: executor.submit(probe) for name, probe in probes.items()}
    wait(futures.values(), timeout=deadline)
    outcome: dict[str, str] = {}
    for name, future in futures.items():
        if not future.done():
            outcome[name] = f"no answer within {deadline:.0f}s"
        elif future.exception() is not None:
            error = future.exception()
            outcome[name] = str(error) or type(error).__name__
        else:
            outcome[name] = ""
    return outcome


def merge(previous: dict[str, ProbeStatus], outcome: dict[str, str], started: float) -> dict[str, ProbeStatus]:
    """The new statuses: proxies no longer probed are dropped, the others updated."""
    merged = {}
    for name, error in outcome.items():
        ok = not error
        merged[name] = previous[name].after(ok, error, started) if name in previous else \
            first_status(ok, error, started)
    return merged


@dataclass
class Prober:
    """Probes what `targets(applied)` names every `interval` seconds and stores the statuses via
    `publish` (called with the new name -> ProbeStatus map)."""

    targets: Callable[[ApplyResult | None], dict[str, Probe]]
    applied: Callable[[], ApplyResult | None]
    publish: Callable[[dict[str, ProbeStatus]], None]
    interval: float = PROBE_INTERVAL
    timeout: float = 1.0

    def run(self, stop: threading.Event) -> None:
        statuses: dict[str, ProbeStatus] = {}
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="status-probe") as executor:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    outcome = run_probes(self.targets(self.applied()), executor, self.timeout + 1.0)
                    statuses = merge(statuses, outcome, started)
                    self.publish(statuses)
                except Exception:  # a bug here must not end the probing: it would go stale
                    log.exception("status: probing the proxies failed")
                stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
