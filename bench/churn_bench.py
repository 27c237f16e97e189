"""Zero failed requests: load through HAProxy and the nginx vhost while backends churn.

The real pipeline (file source → collector → planner → applier → HAProxy + nginx + Pen) runs
in a temp dir. Load threads keep HTTP requests going through HAProxy (`127.0.0.1:<port>`) and
through nginx (`Host: web.bench.local`), while the services file changes CHANGES times in a
row: servers added, removed, re-weighted, and health checks failing/recovering. Each change is
waited for on the bus (`applied.<node>` with the new plan hash), and the applier's actions per
proxy are counted from those same messages.

    .venv/bin/python -m bench.churn_bench [--changes 200] [--threads 4]
"""
from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import threading
import time

import zmq

from services.common.bus import Endpoint, Subscriber
from sim.backends import HttpBackend
from sim.pipeline import Pipeline
from tests.helpers import free_port, wait_until

DOMAIN = "bench.local"


class Load:
    def __init__(self, port: int, host_header: str | None, threads: int):
        self.port, self.host_header = port, host_header
        self.sent = self.failed = 0
        self.errors: collections.Counter = collections.Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def start(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def run(self) -> None:
        while not self.stop.is_set():
            ok, error = False, ""
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/", headers={"Host": self.host_header} if self.host_header else {})
                response = conn.getresponse()
                body = response.read()
                ok = response.status == 200 and body.startswith(b"b")
                error = "" if ok else f"HTTP {response.status}"
                conn.close()
            except OSError as exc:
                error = type(exc).__name__
            with self.lock:
                self.sent += 1
                if not ok:
                    self.failed += 1
                    self.errors[error] += 1

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def nginx_answers(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    conn.request("GET", "/", headers={"Host": f"web.{DOMAIN}"})
    return conn.getresponse().status == 200


def write_services(path: str, port: int, servers: dict[str, tuple[HttpBackend, int]]) -> None:
    document = {"services": [{
        "name": "web", "port": port, "mode": "http",
        "health_check": {"protocol": "http", "path": "/health", "interval_seconds": 1, "timeout_seconds": 1, "fall": 1},
        "servers": [{"host": "127.0.0.1", "port": b.port, "weight": w} for b, w in servers.values()]}]}
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(document, handle)
    os.replace(temporary, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2, help="load threads per proxy")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    backends = [HttpBackend(f"b{i}") for i in range(8)]
    service_port, vhost_port = free_port(), free_port()
    pipeline = Pipeline(["--status-endpoint", "", "--vhost-domain", DOMAIN,
                         "--vhost-port", str(vhost_port), "--node-name", "bench"],
                        programs=("haproxy", "pen", "nginx", "applier", "planner", "collector"), services_file=True)
    services_file = pipeline.services_file
    active = {b.name: (b, 500) for b in backends[:3]}
    write_services(services_file, service_port, active)
    ctx = zmq.Context.instance()
    applied = Subscriber(ctx, [Endpoint.parse(f"ipc://{pipeline.run_dir}/bus/applier.pub"),
                               Endpoint.parse(f"ipc://{pipeline.run_dir}/bus/planner.pub")], ["applied.", "plan"])
    actions: collections.Counter = collections.Counter()
    state = {"plan": "", "applied": ""}

    def pump() -> None:
        for message in applied.poll(0.05):
            if message.topic == "plan":
                state["plan"] = message.payload["hash"]
            elif message.topic.startswith("applied."):
                state["applied"] = message.payload["plan_hash"] if message.payload["ok"] else ""
                if counting:
                    for driver, detail in message.payload.get("details", {}).items():
                        if isinstance(detail, dict):
                            actions[(driver, detail.get("action"))] += 1

    def converged() -> bool:
        pump()
        return bool(state["plan"]) and state["plan"] == state["applied"]

    counting = False
    pipeline.start()
    try:
        wait_until(converged, timeout=60, message="first plan applied")
        wait_until(lambda: nginx_answers(vhost_port), timeout=30, message="the vhost to answer")
        haproxy_load = Load(service_port, None, args.threads).start()
        nginx_load = Load(vhost_port, f"web.{DOMAIN}", args.threads).start()
        counting = True
        kinds: collections.Counter = collections.Counter()
        started = time.monotonic()
        weights = (100, 300, 500, 700, 1000)
        for step in range(args.changes):
            kind = rng.choice(["add", "remove", "weight", "health"])
            idle = [b for b in backends if b.name not in active]
            if kind == "health":
                # Not a discovery change: HAProxy's own check drains the backend. Never all at once.
                # HAProxy needs `rise` checks to take a recovered server back: keep two others
                # healthy so a failure measures the proxy, not an empty backend.
                target = rng.choice([b for b, _ in active.values()])
                others = [b for b, _ in active.values() if b.healthy and b is not target]
                target.healthy = True if not target.healthy else len(others) < 2
                kinds[kind] += 1
                continue
            if kind == "add" and idle:
                backend = rng.choice(idle)
                active[backend.name] = (backend, rng.choice(weights))
            elif kind == "remove" and len(active) > 2:
                # keep at least one healthy server: otherwise failures would be expected, not measured
                removable = [n for n in sorted(active)
                             if sum(b.healthy for m, (b, _) in active.items() if m != n) >= 2]
                if not removable:
                    continue
                del active[rng.choice(removable)]
            else:
                kind = "weight"
                name = rng.choice(sorted(active))
                backend, weight = active[name]
                active[name] = (backend, rng.choice([w for w in weights if w != weight]))
            kinds[kind] += 1
            previous = state["applied"]
            write_services(services_file, service_port, active)
            wait_until(lambda: converged() and state["applied"] != previous, timeout=30,
                       message=f"change {step} applied")
        elapsed = time.monotonic() - started
        haproxy_load.finish()
        nginx_load.finish()
        pump()
    finally:
        pipeline.cleanup()
        for backend in backends:
            backend.close()
    print(f"changes: {args.changes} in {elapsed:.1f}s ({dict(kinds)})")
    print(f"through HAProxy: {haproxy_load.sent} requests, {haproxy_load.failed} failed {dict(haproxy_load.errors)}")
    print(f"through nginx:   {nginx_load.sent} requests, {nginx_load.failed} failed {dict(nginx_load.errors)}")
    print("applier actions per proxy:", {f"{d}:{a}": n for (d, a), n in sorted(actions.items())})


if __name__ == "__main__":
    main()
