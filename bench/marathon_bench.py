"""Marathon discovery benchmark: event -> Discovery latency, requests per event burst, full
resync cost. Prints results; run from the repository root:

    .venv/bin/python -m bench.marathon_bench [--changes 200] [--sizes 100,1000] [--resync-tasks 10000]

Latency is measured the way the collector drives a source: trigger a change in the simulator,
then `wait_for_change` + `current()` until the Discovery shows it (this includes the settle: the
stream must be quiet for 2 ms before `wait_for_change` returns). The simulator runs in the same
process for the latency part (it shares the GIL with the source, so figures are pessimistic) and
in a subprocess for the resync part (so the peak RSS is the source's own). Also reported: the
fragments rebuilt per change, the cost of `current()` when nothing changed, and for the burst
the requests, the `current()` calls that rebuilt something and the time until it all shows.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from services.collector.marathon import MarathonSource
from services.common.config import Settings
from sim.marathon import MarathonSim
from tests.helpers import free_port, wait_until
from tests.marathon_helpers import drive_until


def servers_on(discovery, port: int) -> int:
    for service in discovery.services:
        if service.port == port:
            return len(service.servers)
    return 0


def latency_run(apps: int, changes: int) -> dict:
    sim = MarathonSim().start()
    for i in range(apps):
        sim.deploy_app(f"/bench/app{i}", network="BRIDGE", service_ports=[10000 + i], instances=5, health_check=True)
    source = MarathonSource(Settings(marathon=sim.url, refresh_interval=3600))
    stop = threading.Event()
    try:
        started = time.monotonic()
        source.current()
        initial = time.monotonic() - started
        wait_until(lambda: source.stream is not None and source.stream.connected.is_set())
        source.current()
        latencies = []
        requests_before = len(sim.api_requests())
        built_before = source.builder.stats["fragments_built"]
        for n in range(changes):
            i = (n * 7) % apps
            app_id, port = f"/bench/app{i}", 10000 + i
            task_id = sim.task_ids(app_id)[0]
            alive = sim.task(task_id).alive
            expected = 4 if alive else 5
            t0 = time.perf_counter()
            sim.set_health(task_id, not alive)
            drive_until(source, lambda d: servers_on(d, port) == expected, timeout=10.0, stop=stop, wait=1.0)
            latencies.append(time.perf_counter() - t0)
        change_requests = len(sim.api_requests()) - requests_before
        fragments_per_change = (source.builder.stats["fragments_built"] - built_before) / changes
        source.current()
        calls = 1000
        t0 = time.perf_counter()
        for _ in range(calls):
            source.current()
        unchanged_us = (time.perf_counter() - t0) / calls * 1e6
        # a burst: scale one app by 25 tasks (5 events each) plus deployment events
        events_before, requests_before = sim.cluster.events_emitted, len(sim.api_requests())
        events_after_connect = source.stats["events"]
        target = servers_on(source.current(), 10000) + 25
        rebuilds = [0]
        current = source.current

        def counting_current():
            built = source.builder.stats["fragments_built"]
            discovery = current()
            rebuilds[0] += source.builder.stats["fragments_built"] > built
            return discovery

        source.current = counting_current
        t0 = time.perf_counter()
        sim.scale("/bench/app0", len(sim.task_ids("/bench/app0")) + 25)
        burst_events = sim.cluster.events_emitted - events_before
        drive_until(source, lambda d: servers_on(d, 10000) == target, timeout=10.0, stop=stop, wait=1.0)
        burst_ms = (time.perf_counter() - t0) * 1000
        wait_until(lambda: source.stats["events"] >= events_after_connect + burst_events, timeout=10)
        source.wait_for_change(0.2, stop)
        source.current()  # whatever was still in flight
        source.current = current
        burst_requests = len(sim.api_requests()) - requests_before
        latencies.sort()
        return {"apps": apps, "tasks": apps * 5, "initial_sync_s": round(initial, 3), "changes": changes,
                "p50_ms": round(statistics.median(latencies) * 1000, 1),
                "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1),
                "max_ms": round(latencies[-1] * 1000, 1),
                "requests_for_changes": change_requests, "fragments_per_change": round(fragments_per_change, 2),
                "unchanged_current_us": round(unchanged_us, 1),
                "burst_events": burst_events, "burst_requests": burst_requests, "burst_rebuilds": rebuilds[0],
                "burst_ms": round(burst_ms, 1)}
    finally:
        stop.set()
        source.close()
        sim.stop()


def resync_run(tasks: int) -> dict:
    apps = max(1, tasks // 5)
    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump([{"id": f"/bench/app{i}", "network": "BRIDGE", "service_ports": [10000 + i % 50000],
                    "instances": 5, "health_check": True} for i in range(apps)], handle)
    process = subprocess.Popen([sys.executable, "-m", "sim.marathon", "--port", str(port), "--apps-file", handle.name],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import requests
        wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/v2/apps", timeout=30).json()["apps"].__len__() == apps,
                   timeout=300, interval=0.5)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        source = MarathonSource(Settings(marathon=f"http://127.0.0.1:{port}", refresh_interval=3600), events=False)
        timings = []
        for _ in range(3):
            source.refresh_interval = 0  # every current() is a full resync
            started = time.perf_counter()
            discovery = source.current()
            timings.append(time.perf_counter() - started)
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        source.close()
        return {"tasks": apps * 5, "apps": apps, "services": len(discovery.services),
                "resync_s": [round(t, 3) for t in timings], "requests_per_resync": 1,
                "peak_rss_mb": round(rss_after / 1024, 1), "rss_growth_mb": round((rss_after - rss_before) / 1024, 1)}
    finally:
        process.terminate()
        process.wait(10)
        os.unlink(handle.name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--resync-tasks", type=int, default=10000)
    args = parser.parse_args()
    for size in (int(s) for s in args.sizes.split(",") if s):
        print(json.dumps({"latency": latency_run(size, args.changes)}), flush=True)
    if args.resync_tasks:
        print(json.dumps({"resync": resync_run(args.resync_tasks)}), flush=True)


if __name__ == "__main__":
    main()
