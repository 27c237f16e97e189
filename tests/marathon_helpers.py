"""Shared by the MarathonSource tests and bench/marathon_bench.py: the simulator fixture, fast
source timings, and driving a source the way the collector does."""
from __future__ import annotations

import threading
import time

import pytest

from sim.marathon import MarathonSim

FAST = dict(watchdog=1.0, request_timeout=0.5, connect_timeout=0.5, backoff_initial=0.05, backoff_max=0.2,
            coalesce=0.02)


@pytest.fixture
def sim():
    sim = MarathonSim().start()
    yield sim
    sim.stop()


def servers(discovery, port: int = 10000) -> list[str]:
    """The sorted addresses of the servers of the service on `port` ([] when there is none)."""
    for service in discovery.services:
        if service.port == port:
            return sorted(s.address for s in service.servers)
    return []


def drive_until(source, predicate, timeout: float = 5.0, stop: threading.Event | None = None,
                wait: float = 0.5):
    """Drive the source like the collector does (`wait_for_change(wait)` then `current()`) until
    `predicate(discovery)` holds: that discovery."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        source.wait_for_change(wait, stop)
        discovery = source.current()
        if predicate(discovery):
            return discovery
    raise AssertionError("discovery never matched")
