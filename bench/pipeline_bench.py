"""Event → traffic: from a discovery change to HAProxy routing accordingly, through the real
pipeline (collector, planner, applier as separate processes, a real HAProxy).

Marathon: the simulator flips one task's health (fail, then recover) in a cluster of APPS apps
with 5 tasks each. Registrator: one etcd key is deleted / set again. The clock stops when the
applier publishes that it applied the plan carrying the change (the message's own timestamp,
same host clock: HAProxy's runtime API has been told by then, and the benchmark process reading
messages late does not count); a sample of changes is also checked against HAProxy's own state.

    .venv/bin/python -m bench.pipeline_bench [--apps 100,1000] [--changes 200] [--registrator] [--breakdown]
        [--status] [--scrape-metrics SECONDS]

`--status` also runs the status stage (it follows the whole bus); `--scrape-metrics N` runs it and
GETs /metrics every N seconds while the changes are measured (Prometheus scrapes every 15 s by
default): what /metrics costs the pipeline shows as the difference from `--status` alone.
"""
from __future__ import annotations

import argparse
import collections
import os
import socket
import statistics
import threading
import time
import urllib.request
from dataclasses import dataclass

import zmq

from services.applier.haproxy_render import HaproxyPaths, backend_id
from services.common.bus import Endpoint, Subscriber
from services.common.keyed import split_topic
from services.common.model import Service
from services.common.wire import PLAN_PREFIX, PlanFollower
from sim.marathon import MarathonSim
from sim.pipeline import Pipeline
from tests.helpers import free_port, wait_until


def free_port_range(count: int, start: int = 20000) -> int:
    """First port of `count` consecutive TCP ports free on loopback and 0.0.0.0."""
    base = start
    while base + count < 60000:
        for port in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("0.0.0.0", port))
                except OSError:
                    base = port + 1
                    break
        else:
            return base
    raise RuntimeError("no free port range")


@dataclass(frozen=True)
class View:
    """A keyed state as a summary arrived that matched: the summary and the entries by key (a
    shallow copy of the follower's mirror, never a rebuilt Plan: the benchmark process must not
    take CPU from the pipeline it measures)."""

    summary: dict
    entries: dict

    @property
    def hash(self) -> str:
        return self.summary["hash"]

    def services(self) -> list[Service]:
        return [entry.service for entry in self.entries.values() if entry.service is not None]


class PlanView(PlanFollower):
    def build(self, mirror, summary: dict) -> View:
        return View(summary, dict(mirror.values))


class BusWatch:
    """Follows the keyed plan and the applied messages: which plan hash holds which servers, and
    when each plan hash was applied."""

    def __init__(self, run_dir: str, breakdown: bool = False, until_plan: bool = False):
        self.until_plan = until_plan
        # The breakdown also follows the source summaries (their publishing times only).
        self.subscriber = Subscriber(zmq.Context.instance(), [
            Endpoint.parse(f"ipc://{run_dir}/bus/{stage}.pub") for stage in ("collector", "planner", "applier")],
            ["source.", "plan", "applied."] if breakdown else ["plan", "applied."])
        self.follower = PlanView()
        self.plans: dict[str, View] = {}
        self.applied: dict[str, float] = {}
        self.last_plan = ""
        self.resyncs = 0
        # wall-clock publishing times of the latest summaries, for the per-stage breakdown
        self.stamps: dict[str, float] = {}

    def pump(self, timeout: float = 0.001) -> None:
        for message in self.subscriber.poll(timeout):
            if message.is_heartbeat:
                continue
            prefix, key = split_topic(message.topic)
            if key is None:  # a stage's change ends with its summary
                self.stamps[prefix.split(".")[0]] = message.ts
            if prefix == PLAN_PREFIX:
                view = self.follower.absorb(message)
                if self.follower.needs_resync:
                    self.subscriber.resync(PLAN_PREFIX)
                    self.follower.reset()
                    self.resyncs += 1
                if view is not None:
                    self.plans[view.hash] = view
                    self.last_plan = view.hash
                    if self.until_plan:  # the planner's publishing time stops the clock
                        self.applied.setdefault(view.hash, message.ts)
            elif message.topic.startswith("applied.") and message.payload["ok"]:
                # The applier's own publishing time (same host clock): the benchmark process
                # receiving and decoding messages late must not count against the pipeline.
                self.applied.setdefault(message.payload["plan_hash"], message.ts)

    def wait_applied(self, predicate, timeout: float = 30.0) -> float:
        """Wall-clock time at which a plan satisfying `predicate` was applied (published)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump(0.005)
            for plan_hash, at in self.applied.items():
                plan = self.plans.get(plan_hash)
                if plan is not None and predicate(plan):
                    return at
        raise RuntimeError("change never applied")

    def forget(self) -> None:
        self.applied.clear()


class BusBytes(threading.Thread):
    """Bytes every stage publishes (raw SUB sockets on every topic; heartbeats apart), counted
    while `counting`: what a change costs the bus."""

    def __init__(self, run_dir: str, stages: tuple[str, ...] = ("collector", "planner", "applier")):
        super().__init__(daemon=True)
        self.endpoints = {stage: f"ipc://{run_dir}/bus/{stage}.pub" for stage in stages}
        self.counting = False
        self.bytes: collections.Counter = collections.Counter()
        self.messages: collections.Counter = collections.Counter()
        self.ready = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        ctx = zmq.Context.instance()
        sockets = {}
        poller = zmq.Poller()
        for stage, endpoint in self.endpoints.items():
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(endpoint)
            sockets[sub] = stage
            poller.register(sub, zmq.POLLIN)
        self.ready.set()
        try:
            while not self.done.is_set():
                for sub, _event in poller.poll(100):
                    stage = sockets[sub]
                    while True:
                        try:
                            frames = sub.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if self.counting and not frames[0].startswith(b"heartbeat."):
                            self.bytes[stage] += sum(len(frame) for frame in frames)
                            self.messages[stage] += 1
        finally:
            for sub in sockets:
                sub.close()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)


def servers_of(plan: View, port: int) -> set[tuple[str, int]]:
    entry = plan.entries.get(f"{port}/tcp")
    if entry is None or entry.service is None:
        return set()
    return {(s.ip, s.port) for s in entry.service.servers}


def backend_of(plan: View, port: int) -> str:
    """HAProxy's name for the TCP service on `port` in `plan` (svc_<port>_tcp_<name>)."""
    entry = plan.entries.get(f"{port}/tcp")
    if entry is None or entry.service is None:
        raise KeyError(f"no TCP service on port {port}")
    return backend_id(entry.service)


def all_listening(ports: range, deadline: float) -> float:
    """Monotonic time when every port accepts a connection on loopback (HAProxy serving them)."""
    pending = set(ports)
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} ports never listened")
        for port in sorted(pending):
            with socket.socket() as conn:
                conn.settimeout(0.5)
                try:
                    conn.connect(("127.0.0.1", port))
                except OSError:
                    continue
            pending.discard(port)
        if pending:
            time.sleep(0.05)
    return time.monotonic()


def haproxy_addresses(run_dir: str, backend: str) -> set[str]:
    """What HAProxy itself routes to (ready slots), via its runtime API."""
    paths = HaproxyPaths.for_run_dir(run_dir)
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(paths.admin_socket)
        conn.sendall(f"show servers state {backend}\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    ready = set()
    for line in data.decode().splitlines():
        fields = line.split()
        # be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state ... srv_port at 18
        if len(fields) > 18 and fields[1] == backend and fields[6] == "0":
            ready.add(f"{fields[4]}:{fields[18]}")
    return ready


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident memory of one process now, in MB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            kb = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return 0.0
    return round(kb / 1024, 1)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class MetricsScraper(threading.Thread):
    """GET /metrics every `interval` seconds until stopped, as Prometheus would (the answer is
    read whole, not parsed: parsing is the scraper's cost, not the pipeline's)."""

    def __init__(self, url: str, interval: float):
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.done = threading.Event()
        self.times: list[float] = []
        self.size = 0
        self.failures = 0

    def run(self) -> None:
        while not self.done.wait(self.interval):
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    self.size = len(response.read())
                self.times.append((time.monotonic() - started) * 1000)
            except OSError:
                self.failures += 1

    def stop(self) -> dict:
        self.done.set()
        self.join(timeout=10)
        return {"scrapes": len(self.times), "failed": self.failures, "bytes": self.size,
                "median_ms": round(statistics.median(self.times), 1) if self.times else None,
                "max_ms": round(max(self.times), 1) if self.times else None}


def marathon_run(apps: int, changes: int, breakdown: bool = False, status: bool = False,
                 scrape_every: float = 0.0, until_plan: bool = False, tasks: int = 5) -> dict:
    """`until_plan`: no applier nor HAProxy; the clock stops when the planner publishes the plan
    (for sizes whose HAProxy config needs more file descriptors than the machine allows)."""
    sim = MarathonSim().start()
    base = free_port_range(apps)
    for i in range(apps):
        sim.deploy_app(f"/bench/app{i}", network="BRIDGE", service_ports=[base + i], instances=tasks,
                       health_check=True)
    status = status or scrape_every > 0
    status_port = free_port() if status else 0
    pipeline = Pipeline(["--marathon", sim.url, "--status-endpoint", f"127.0.0.1:{status_port}" if status else "",
                         "-i", "3600"],
                        programs=(*(() if until_plan else ("haproxy", "applier")), "planner", "collector",
                                  *(("status",) if status else ())))
    watch = BusWatch(pipeline.run_dir, breakdown, until_plan)
    counter = BusBytes(pipeline.run_dir, ("collector", "planner") if until_plan else ("collector", "planner", "applier"))
    counter.start()
    counter.ready.wait(10)
    scraper = MetricsScraper(f"http://127.0.0.1:{status_port}/metrics", scrape_every) if scrape_every > 0 else None
    scraped: dict = {}
    try:
        started = time.monotonic()
        pipeline.start()
        watch.wait_applied(lambda plan: plan.summary["count"] == apps and all(
            len(s.servers) == tasks for s in plan.services()), timeout=600)
        initial = time.monotonic() - started
        # Cold start: from starting the pipeline to every service's listener accepting connections.
        cold_start = None if until_plan else all_listening(range(base, base + apps), time.monotonic() + 300) - started
        probe_port = base + apps // 2
        probe_backend = None if until_plan else backend_of(watch.plans[watch.last_plan], probe_port)
        task = sim.task_ids(f"/bench/app{apps // 2}")[0]
        if scraper is not None:
            wait_until(lambda: b"proxymatic_applies_total{" in urllib.request.urlopen(
                scraper.url, timeout=5).read(), timeout=30, message="/metrics with the applier's counters")
            scraper.start()
        samples = []
        hops: dict[str, list[float]] = {"source": [], "plan": [], **({} if until_plan else {"applied": []})}
        verified = 0
        stages = ("collector", "planner", *(() if until_plan else ("applier",)), *(("status",) if status else ()))
        cpu_before = {name: cpu_seconds(pipeline.processes[name].pid) for name in stages}
        watch.pump(0.2)
        measured_from = time.monotonic()
        counter.counting = True
        for step in range(changes):
            alive = step % 2 == 1
            watch.forget()
            flipped_wall = time.time()
            sim.set_health(task, alive)
            at = watch.wait_applied(lambda plan: (len(servers_of(plan, probe_port)) == tasks) == alive)
            samples.append((at - flipped_wall) * 1000)
            for hop in hops:  # when each stage published its part, from the publisher's clock
                hops[hop].append((watch.stamps.get(hop, flipped_wall) - flipped_wall) * 1000)
            if step % 50 == 0 and not until_plan:
                expected = tasks if alive else tasks - 1
                wait_until(lambda: len(haproxy_addresses(pipeline.run_dir, probe_backend)) == expected, timeout=5,
                           message="HAProxy's own state to agree")
                verified += 1
        time.sleep(0.2)  # the last change's messages still on their way to the counter
        counter.counting = False
        if scraper is not None:
            scraped = {"metrics": {"every_s": scrape_every, **scraper.stop()}}
        scraped["bus_bytes_per_change"] = round(sum(counter.bytes.values()) / changes)
        scraped["bus_bytes_per_change_by_stage"] = {stage: round(n / changes) for stage, n in counter.bytes.items()}
        scraped["bus_messages_per_change"] = round(sum(counter.messages.values()) / changes, 1)
        # CPU each stage spent while the changes were measured (what the status stage and its
        # /metrics cost shows here directly, whatever else the machine runs)
        scraped["measured_s"] = round(time.monotonic() - measured_from, 1)
        scraped["cpu_s"] = {name: round(cpu_seconds(pipeline.processes[name].pid) - cpu_before[name], 2)
                            for name in stages}
        scraped["rss_mb"] = {name: rss_mb(pipeline.processes[name].pid) for name in stages}
        return {"apps": apps, "tasks": apps * tasks, "changes": changes, "initial_sync_s": round(initial, 2),
                "cold_start_all_listening_s": None if cold_start is None else round(cold_start, 2),
                "clock_stops_at": "plan published" if until_plan else "applied", "resyncs_seen": watch.resyncs,
                "status_stage": status, **scraped,
                "p50_ms": round(statistics.median(samples), 1), "p99_ms": round(percentile(samples, 0.99), 1),
                "max_ms": round(max(samples), 1), "checked_against_haproxy": verified,
                **({"median_published_at_ms": {hop: round(statistics.median(v), 1) for hop, v in hops.items()}}
                   if breakdown else {})}
    finally:
        if scraper is not None and scraper.is_alive():
            scraper.stop()
        counter.stop()
        pipeline.cleanup()
        sim.stop()


def registrator_run(changes: int) -> dict:
    from tests.etcd_server import EtcdServer
    etcd = EtcdServer().start()
    base = free_port_range(100, 40000)
    client = etcd.client()
    for i in range(100):
        for j in range(5):
            client.write(f"/services/svc{i}@{base + i}/h{j}:c{j}:80", f"10.1.{i}.{j + 1}:8080")
    pipeline = Pipeline(["--registrator", etcd.url("/services"), "--status-endpoint", "", "-i", "3600"],
                        programs=("haproxy", "applier", "planner", "collector"))
    watch = BusWatch(pipeline.run_dir)
    try:
        pipeline.start()
        watch.wait_applied(lambda plan: plan.summary["count"] == 100, timeout=120)
        probe_port, key = base + 50, f"/services/svc50@{base + 50}/h0:c0:80"
        samples = []
        for step in range(changes):
            present = step % 2 == 1
            watch.forget()
            changed = time.time()
            if present:
                client.write(key, "10.1.50.1:8080")
            else:
                client.delete(key)
            at = watch.wait_applied(lambda plan: (len(servers_of(plan, probe_port)) == 5) == present)
            samples.append((at - changed) * 1000)
        return {"entries": 500, "changes": changes, "p50_ms": round(statistics.median(samples), 1),
                "p99_ms": round(percentile(samples, 0.99), 1), "max_ms": round(max(samples), 1)}
    finally:
        pipeline.cleanup()
        etcd.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", default="100,1000")
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--registrator", action="store_true", help="also measure etcd change → traffic")
    parser.add_argument("--breakdown", action="store_true", help="also report when each stage published")
    parser.add_argument("--status", action="store_true", help="also run the status stage (Marathon runs)")
    parser.add_argument("--tasks", type=int, default=5,
                        help="tasks per app (the simulator's host ports run out past ~34,000 tasks)")
    parser.add_argument("--until-plan", action="store_true",
                        help="no applier nor HAProxy: stop the clock when the plan is published (10,000 apps "
                             "need more file descriptors for HAProxy than this machine allows)")
    parser.add_argument("--scrape-metrics", type=float, default=0.0, metavar="SECONDS",
                        help="run the status stage and GET /metrics every SECONDS during the measurement")
    args = parser.parse_args()
    for apps in (int(a) for a in args.apps.split(",") if a):
        print("marathon event → plan published:" if args.until_plan else "marathon event → applied:",
              marathon_run(apps, args.changes, args.breakdown, args.status, args.scrape_metrics, args.until_plan,
                           args.tasks),
              flush=True)
    if args.registrator:
        print("registrator change → applied:", registrator_run(args.changes), flush=True)


if __name__ == "__main__":
    main()
