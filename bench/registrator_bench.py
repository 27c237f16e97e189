"""Benchmark the registrator source against a real etcd (started here, on free ports).

1. Change latency: a writer thread changes one key (set a new entry or delete one), the
   collector-like loop is blocked in `wait_for_change`; measured from just before the PUT/DELETE
   until `wait_for_change` returned and `current()` reflects the change. p50/p90/p99/max over
   --changes changes, at two sizes of the existing state.
2. Full read of --entries entries: a new source's first `current()` (GET + parse + build
   services), and the same split into HTTP GET and parsing.

Run: .venv/bin/python bench/registrator_bench.py [--changes 300] [--entries 10000]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from services.collector.registrator import RegistratorSource  # noqa: E402
from tests.registrator_payloads import parse_response  # noqa: E402
from services.common.config import Settings  # noqa: E402
from tests.etcd_server import EtcdServer  # noqa: E402


def populate(server: EtcdServer, prefix: str, count: int, per_service: int = 20, threads: int = 4) -> None:
    def work(part: int) -> None:
        session = requests.Session()
        for i in range(part, count, threads):
            service, instance = divmod(i, per_service)
            key = f"{prefix}/svc{service}/host{instance}:svc{service}.{instance}:{10000 + service}"
            value = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:{31000 + instance}"
            session.put(f"{server.base_url}/v2/keys{key}", data={"value": value}).raise_for_status()

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def change_latency(server: EtcdServer, prefix: str, changes: int) -> list[float]:
    source = RegistratorSource(Settings(registrator=server.url(prefix), refresh_interval=3600))
    session = requests.Session()
    stop = threading.Event()
    latencies: list[float] = []
    try:
        source.current()
        go, started = threading.Event(), [0.0]
        job: list[tuple[str, str | None]] = []

        def writer() -> None:
            while go.wait() and not stop.is_set():
                go.clear()
                key, value = job[0]
                started[0] = time.perf_counter()
                url = f"{server.base_url}/v2/keys{key}"
                (session.put(url, data={"value": value}) if value else session.delete(url)).raise_for_status()

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        for i in range(changes):
            key = f"{prefix}/bench/h:bench{i // 2}:7000"
            adding = i % 2 == 0
            job[:] = [(key, "127.0.0.1:40000" if adding else None)]
            source.current()  # the collector's "I have seen this state"
            go.set()
            while True:
                source.wait_for_change(5, stop)
                services = source.current().services
                present = any(s.port == 7000 and s.servers for s in services)
                if present == adding:
                    break
            latencies.append(time.perf_counter() - started[0])
    finally:
        stop.set()
        go.set()
        source.close()
    return latencies


def report_latency(label: str, latencies: list[float]) -> None:
    ms = [x * 1000 for x in latencies]
    print(f"  {label}: n={len(ms)} p50={percentile(ms, .5):.2f} ms  p90={percentile(ms, .9):.2f} ms  "
          f"p99={percentile(ms, .99):.2f} ms  max={max(ms):.2f} ms  mean={statistics.mean(ms):.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=300)
    parser.add_argument("--entries", type=int, default=10000)
    args = parser.parse_args()
    print(f"command: {' '.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"cpus: {os.cpu_count()}, etcd: {os.popen('etcd --version').readline().strip()}")
    with EtcdServer() as server:
        print("change -> wait_for_change returned + current() reflects it:")
        populate(server, "/small", 100)
        report_latency("state of 100 entries", change_latency(server, "/small", args.changes))
        populate(server, "/medium", 2000)
        report_latency("state of 2000 entries", change_latency(server, "/medium", args.changes))

        t0 = time.perf_counter()
        populate(server, "/large", args.entries)
        print(f"full read of {args.entries} entries ({args.entries // 20} services x 20), "
              f"populated in {time.perf_counter() - t0:.1f} s:")
        for run in range(3):
            t0 = time.perf_counter()
            source = RegistratorSource(Settings(registrator=server.url("/large"), refresh_interval=3600),
                                       initial_timeout=60)
            discovery = source.current()
            elapsed = time.perf_counter() - t0
            source.close()
            servers = sum(len(s.servers) for s in discovery.services)
            assert servers == args.entries, servers
            print(f"  run {run + 1}: first current() of a new source: {elapsed * 1000:.0f} ms "
                  f"({len(discovery.services)} services, {servers} servers)")
        t0 = time.perf_counter()
        body = requests.get(f"{server.base_url}/v2/keys/large?recursive=true").content
        get_time = time.perf_counter() - t0
        t0 = time.perf_counter()
        services, _ = parse_response("/large", json.loads(body))
        parse_time = time.perf_counter() - t0
        print(f"  split: HTTP GET {get_time * 1000:.0f} ms ({len(body) / 1e6:.1f} MB), "
              f"JSON + parse + group {parse_time * 1000:.0f} ms")


if __name__ == "__main__":
    main()
