"""Zero failed requests: load through HAProxy and the nginx vhost while backends churn.

The real pipeline (file source → collector → planner → applier → HAProxy + nginx + Pen) runs
in a temp dir. Load threads keep HTTP requests going through HAProxy (`127.0.0.1:<port>`) and
through nginx (`Host: web.bench.local`), while the services file changes CHANGES times in a
row: servers added, removed, re-weighted, and health checks failing/recovering. Each change is
waited for on the bus (`applied.<node>` with the new plan hash), and the applier's actions per
proxy are counted from those same messages.

Failures must measure the proxies, not a backend the benchmark emptied itself: before a server
is taken down (its health check failed, or removed from the file), HAProxy's own view is read
from its runtime API (`show servers state` through the master CLI) and at least two *other*
servers must be UP there (and healthy in the benchmark's view). A server that just recovered
stays DOWN in HAProxy until `rise` checks pass, so the benchmark waits for it (up to
--up-deadline seconds; after that the change becomes a re-weight and is counted as given up;
when fewer than two other servers are healthy even in the benchmark's view, the take-down is
refused at once and becomes a re-weight too).

Every failed request is recorded with its HTTP status, who answered it (HAProxy's "no server"
503, nginx's own page, a connection error), the change in progress, and how many servers
HAProxy had UP at that moment (a monitor thread polls HAProxy's view every 100 ms).

    .venv/bin/python -m bench.churn_bench [--changes 200] [--threads 2] [--seed 7] [--json FILE]
"""
from __future__ import annotations

import argparse
import bisect
import collections
import http.client
import json
import os
import random
import threading
import time

import zmq

from services.applier.haproxy_render import HaproxyPaths, key_of_backend
from services.applier.haproxy_runtime import MasterCli, WorkerApi
from services.common.bus import Endpoint, Subscriber
from sim.backends import HttpBackend
from sim.pipeline import Pipeline
from tests.helpers import free_port, wait_until

DOMAIN = "bench.local"
MIN_UP = 2  # servers HAProxy must keep UP besides the one taken down
SRV_RUNNING = 2  # srv_op_state of `show servers state`


def classify(status: int, body: bytes, headers: http.client.HTTPMessage | None = None) -> str:
    """Who answered a failed request: HAProxy's own error page, nginx's, or a backend."""
    if b"No server is available" in body:
        return f"HTTP {status} (HAProxy: no server UP)"
    if headers is not None and headers.get("X-Backend"):
        return f"HTTP {status} (backend {headers.get('X-Backend')})"
    if b"nginx" in body:
        return f"HTTP {status} (nginx page)"
    if b"haproxy" in body.lower() or b"<h1>" in body:
        return f"HTTP {status} (HAProxy page)"
    text = body[:40].decode(errors="replace").strip().replace("\n", " ")
    return f"HTTP {status} {text}" if text else f"HTTP {status}"


class HaproxyView:
    """HAProxy's own idea of one backend, through the master CLI (the current worker)."""

    def __init__(self, run_dir: str, port: int):
        self.master = MasterCli(HaproxyPaths.for_run_dir(run_dir).master_socket, timeout=3)
        self.key = f"{port}/tcp"

    def up(self) -> set[tuple[str, int]]:
        """ip:port of the servers HAProxy routes to now: RUNNING and not in maintenance."""
        proc = self.master.show_proc()
        states = WorkerApi(self.master, proc.worker).servers_state()
        return {(s.ip, s.port) for (b, _), s in states.items()
                if key_of_backend(b) == self.key and s.operational_state == SRV_RUNNING and not s.in_maintenance}

    def reloads(self) -> int:
        return self.master.show_proc().reloads


class Monitor(threading.Thread):
    """Polls HAProxy's view every `interval` s: (monotonic time, servers UP) at each change."""

    def __init__(self, view: HaproxyView, interval: float = 0.1):
        super().__init__(daemon=True)
        self.view, self.interval = view, interval
        self.times: list[float] = []
        self.counts: list[int] = []
        self.errors = 0
        self.min_up: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                count = len(self.view.up())
            except Exception:  # noqa: BLE001 - HAProxy busy/reloading: note it, keep polling
                self.errors += 1
                continue
            self.min_up = count if self.min_up is None else min(self.min_up, count)
            if not self.counts or self.counts[-1] != count:
                self.times.append(time.monotonic())
                self.counts.append(count)

    def up_at(self, at: float) -> int | None:
        index = bisect.bisect_right(self.times, at) - 1
        return self.counts[index] if index >= 0 else None


class Load:
    def __init__(self, port: int, host_header: str | None, threads: int, phase: dict):
        self.port, self.host_header, self.phase = port, host_header, phase
        self.sent = self.failed = 0
        self.errors: collections.Counter = collections.Counter()
        self.failures: list[tuple[float, str, str]] = []  # (monotonic, error, phase)
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
                error = "" if ok else classify(response.status, body, response.headers)
                conn.close()
            except OSError as exc:
                error = type(exc).__name__
            with self.lock:
                self.sent += 1
                if not ok:
                    self.failed += 1
                    self.errors[error] += 1
                    self.failures.append((time.monotonic(), error, self.phase["now"]))

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def nginx_answers(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    conn.request("GET", "/", headers={"Host": f"web.{DOMAIN}"})
    return conn.getresponse().status == 200


def children(pid: int) -> list[str]:
    """Command lines of the processes whose parent is `pid`."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    out.append(handle.read().replace(b"\0", b" ").decode(errors="replace").strip())
        except (OSError, ValueError, IndexError):
            continue
    return out


def nginx_settled(run_dir: str, port: int, streak: int = 20) -> bool:
    """The vhost answers `streak` times in a row and no old nginx worker (one that still had the
    config without the vhost) is shutting down: after a reload, nginx's old workers keep
    accepting connections for a moment and answer them with the old config (the default
    server's 503)."""
    try:
        with open(os.path.join(run_dir, "nginx", "nginx.pid")) as handle:
            master = int(handle.read().strip())
    except (OSError, ValueError):
        return False
    workers = children(master)
    if not workers or any("shutting down" in w for w in workers):
        return False
    return all(nginx_answers(port) for _ in range(streak))


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
    parser.add_argument("--up-deadline", type=float, default=15.0,
                        help="seconds to wait for HAProxy to have enough servers UP before a take-down")
    parser.add_argument("--json", help="also write the results as JSON to this file")
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
    phase = {"now": "start"}
    view = HaproxyView(pipeline.run_dir, service_port)

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

    waits: list[float] = []
    gave_up = refused = 0

    def others_up(target: HttpBackend) -> int:
        """Servers besides `target` that HAProxy has UP and that stay healthy here."""
        up = view.up()
        return sum(1 for b, _ in active.values() if b is not target and b.healthy and ("127.0.0.1", b.port) in up)

    def may_take_down(target: HttpBackend) -> bool:
        """Wait (pumping the bus) until HAProxy has MIN_UP other servers UP; False at the deadline,
        or at once when fewer than MIN_UP others are healthy here (waiting could not help)."""
        nonlocal refused, gave_up
        if sum(1 for b, _ in active.values() if b is not target and b.healthy) < MIN_UP:
            refused += 1
            return False
        started = time.monotonic()
        deadline = started + args.up_deadline
        attempts = 0
        while True:
            attempts += 1
            try:
                if others_up(target) >= MIN_UP:
                    if attempts > 1:  # only the times it had to wait count as waits
                        waits.append(time.monotonic() - started)
                    return True
            except Exception:  # noqa: BLE001 - HAProxy reloading: ask again
                pass
            if time.monotonic() > deadline:
                waits.append(time.monotonic() - started)
                gave_up += 1
                try:
                    up = sorted(p for _, p in view.up())
                except Exception:  # noqa: BLE001
                    up = "?"
                print(f"gave up taking {target.name} down: HAProxy UP {up}, healthy here "
                      f"{sorted(b.port for b, _ in active.values() if b.healthy)}", flush=True)
                return False
            pump()

    counting = False
    monitor = Monitor(view)
    elapsed = 0.0
    pipeline.start()
    try:
        wait_until(converged, timeout=60, message="first plan applied")
        wait_until(lambda: nginx_settled(pipeline.run_dir, vhost_port), timeout=30, interval=0.1,
                   message="the vhost to answer, nginx's old workers gone")
        wait_until(lambda: len(view.up()) >= 3, timeout=30, message="HAProxy to have the 3 servers UP")
        reloads_before = view.reloads()
        monitor.start()
        phase["now"] = "before-first-change"
        haproxy_load = Load(service_port, None, args.threads, phase).start()
        nginx_load = Load(vhost_port, f"web.{DOMAIN}", args.threads, phase).start()
        counting = True
        kinds: collections.Counter = collections.Counter()
        started = time.monotonic()
        weights = (100, 300, 500, 700, 1000)
        for step in range(args.changes):
            kind = rng.choice(["add", "remove", "weight", "health"])
            idle = [b for b in backends if b.name not in active]
            if kind == "health":
                # Not a discovery change: HAProxy's own check drains the backend (or takes it back
                # after `rise` checks).
                target = rng.choice([b for b, _ in active.values()])
                if not target.healthy:
                    phase["now"] = f"health-recover {target.name}"
                    target.healthy = True
                    kinds["health-recover"] += 1
                    continue
                phase["now"] = f"wait-up before health-fail {target.name}"
                if may_take_down(target):
                    phase["now"] = f"health-fail {target.name}"
                    target.healthy = False
                    kinds["health-fail"] += 1
                    continue
                kind = "weight"
            if kind == "add":
                if idle:
                    backend = rng.choice(idle)
                    phase["now"] = f"add {backend.name}"
                    active[backend.name] = (backend, rng.choice(weights))
                else:
                    kind = "weight"
            elif kind == "remove":
                if len(active) > 2:
                    name = rng.choice(sorted(active))
                    phase["now"] = f"wait-up before remove {name}"
                    if may_take_down(active[name][0]):
                        phase["now"] = f"remove {name}"
                        del active[name]
                    else:
                        kind = "weight"
                else:
                    kind = "weight"
            if kind == "weight":
                name = rng.choice(sorted(active))
                backend, weight = active[name]
                phase["now"] = f"weight {name}"
                active[name] = (backend, rng.choice([w for w in weights if w != weight]))
            kinds[kind] += 1
            previous = state["applied"]
            write_services(services_file, service_port, active)
            wait_until(lambda: converged() and state["applied"] != previous, timeout=30,
                       message=f"change {step} applied")
        elapsed = time.monotonic() - started
        phase["now"] = "end"
        haproxy_load.finish()
        nginx_load.finish()
        monitor.stop.set()
        monitor.join()
        reloads_after = view.reloads()
        pump()
    finally:
        monitor.stop.set()
        pipeline.cleanup()
        for backend in backends:
            backend.close()

    def breakdown(load: Load) -> dict:
        by = collections.Counter()
        for at, error, where in load.failures:
            by[f"{error} | during: {where.split(' ')[0]} | HAProxy UP then: {monitor.up_at(at)}"] += 1
        return dict(by)

    result = {
        "changes": args.changes, "seconds": round(elapsed, 1), "kinds": dict(kinds),
        "take_down_waits": {"count": len(waits), "total_s": round(sum(waits), 1),
                            "max_s": round(max(waits, default=0.0), 2), "gave_up": gave_up,
                            "refused": refused},
        "haproxy": {"sent": haproxy_load.sent, "failed": haproxy_load.failed, "errors": dict(haproxy_load.errors),
                    "failures": breakdown(haproxy_load)},
        "nginx": {"sent": nginx_load.sent, "failed": nginx_load.failed, "errors": dict(nginx_load.errors),
                  "failures": breakdown(nginx_load)},
        "haproxy_reloads": reloads_after - reloads_before,
        "nginx_reloads": actions[("nginx", "reload")],
        "haproxy_min_up_seen": monitor.min_up, "monitor_errors": monitor.errors,
        "applier_actions": {f"{d}:{a}": n for (d, a), n in sorted(actions.items())},
    }
    print(f"changes: {args.changes} in {elapsed:.1f}s ({dict(kinds)})")
    print(f"waited for HAProxy before a take-down: {len(waits)} times, {sum(waits):.1f}s in all, "
          f"max {max(waits, default=0.0):.2f}s, gave up after {args.up_deadline:.0f}s {gave_up}; "
          f"take-downs refused (fewer than {MIN_UP} other healthy servers) {refused}")
    for name, load in (("HAProxy", haproxy_load), ("nginx", nginx_load)):
        print(f"through {name + ':':8} {load.sent} requests, {load.failed} failed {dict(load.errors)}")
        for line, count in sorted(result[name.lower()]["failures"].items()):
            print(f"    {count:5} × {line}")
    print(f"HAProxy reloads (HAProxy's own counter): {result['haproxy_reloads']}; nginx reloads: {result['nginx_reloads']}")
    print(f"fewest servers UP in HAProxy's view (polled every 100 ms): {monitor.min_up}")
    print("applier actions per proxy:", result["applier_actions"])
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
