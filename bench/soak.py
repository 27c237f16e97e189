"""Soak: the real launcher under supervisord, client load, discovery churn and kill -9, for minutes.

`proxymatic` (the launcher: supervisord running HAProxy, Pen, nginx, collector, planner,
applier and status) runs in a temp run dir with three sources at once: the Marathon simulator
(in this process), a real etcd with registrator keys, and a services file. Real backends answer
behind every service. For --minutes:

* client load, one thread per path, each request on a new connection:
  HAProxy → file service `web` (HTTP mode, HAProxy health checks), HAProxy → Marathon app,
  HAProxy → registrator service (TCP mode), nginx vhost `web.soak.local` → HAProxy → `web`,
  UDP datagrams through Pen → the file service `dns`; plus GET /status every 0.5 s;
* discovery churn about every second (seeded): Marathon scale and health flips, etcd writes and
  deletes of registrator keys, services-file edits (servers added, removed, re-weighted, HTTP
  health checks failing and recovering). At least two servers of every service stay healthy
  (for `web`: UP in HAProxy's own view, read from its runtime API), so failures measure the
  proxies, not an emptied backend;
* every 20-40 s a `kill -9` of a stage (collector, planner, applier, status) or a proxy (the
  HAProxy master, the current HAProxy worker, a Pen instance, the nginx master); supervisord
  (or, for a Pen instance, the Pen runner) restarts it. The soak notes when the killed part
  serves again.

A failed request is "in flight on a killed proxy" when it failed on a path through the proxy
killed, between the kill and one second after that proxy served again; every other failure is
"other" and is listed. RSS and open fds of every long-lived process are sampled every 10 s.

    .venv/bin/python -m bench.soak [--minutes 10] [--seed 1] [--out FILE]

Not part of `make test` or `make bench`.
"""
from __future__ import annotations

import argparse
import collections
import http.client
import itertools
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import zmq

from bench.churn_bench import classify
from services.applier.haproxy_render import HaproxyPaths, key_of_backend
from services.applier.haproxy_runtime import MasterCli, WorkerApi
from services.common.bus import Endpoint, Subscriber
from sim.backends import HttpBackend, UdpEcho
from sim.marathon import MarathonSim
from tests.etcd_server import EtcdServer
from tests.helpers import free_port

DOMAIN = "soak.local"
PROXYMATIC = os.path.join(os.path.dirname(sys.executable), "proxymatic")
STAGES = ("collector", "planner", "applier", "status")
KILL_TARGETS = (*STAGES, "haproxy-master", "haproxy-worker", "pen", "nginx-master")
# which load paths go through which killed proxy
AFFECTS = {
    "haproxy": ("haproxy→web", "haproxy→marathon", "haproxy→registrator", "nginx→web"),
    "nginx": ("nginx→web",),
    "pen": ("pen udp→dns",),
    "status": ("/status",),
}
# /status answers 503 naming HAProxy while HAProxy is down (by design): expected during its restart
AFFECTS["haproxy"] = (*AFFECTS["haproxy"], "/status")
AFTER_BACK = 1.0  # seconds after a killed proxy serves again that its failures still count as in flight
SRV_RUNNING = 2


def now() -> float:
    return time.monotonic()


# ------------------------------------------------------------------------------------------
# processes


def proc_table() -> dict[int, tuple[int, str, int]]:
    """pid -> (ppid, command line, start time in clock ticks)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
            table[int(entry)] = (int(fields[1]), cmdline, int(fields[19]))
        except (OSError, ValueError, IndexError):
            continue
    return table


def run_dir_of(pid: int) -> str | None:
    """RUN_DIR in a process's environment (the launcher passes settings to its programs there,
    not on the command line)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            for item in handle.read().split(b"\0"):
                if item.startswith(b"RUN_DIR="):
                    return item[len(b"RUN_DIR="):].decode(errors="replace")
    except OSError:
        pass
    return None


def rss_and_fds(pid: int) -> tuple[int, int] | None:
    """(VmRSS in kB, open file descriptors) or None when the process is gone."""
    try:
        rss = 0
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None


def alive(pid: int, start: int | None = None) -> bool:
    entry = proc_table_one(pid)
    return entry is not None and (start is None or entry[2] == start)


def proc_table_one(pid: int) -> tuple[int, str, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        if fields[0] == "Z":
            return None
        return int(fields[1]), cmdline, int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


class Roles:
    """Finds the long-lived processes of one proxymatic instance by their place in the tree."""

    def __init__(self, launcher_pid: int, run_dir: str, etcd_pid: int | None):
        self.launcher_pid, self.run_dir, self.etcd_pid = launcher_pid, run_dir, etcd_pid
        self.nginx_workers_seen: dict[int, int] = {}  # pid -> start time: orphans to clean up

    def find(self) -> dict[str, list[int]]:
        table = proc_table()
        kids: dict[int, list[int]] = collections.defaultdict(list)
        for pid, (ppid, _, _) in table.items():
            kids[ppid].append(pid)
        roles: dict[str, list[int]] = collections.defaultdict(list)
        roles["soak (sim, backends, clients)"].append(os.getpid())
        if self.etcd_pid and self.etcd_pid in table:
            roles["etcd"].append(self.etcd_pid)
        if self.launcher_pid in table:
            roles["launcher"].append(self.launcher_pid)
        for sup in kids.get(self.launcher_pid, []):
            if "supervisord" not in table[sup][1]:
                continue
            roles["supervisord"].append(sup)
            for child in kids.get(sup, []):
                cmd = table[child][1]
                if cmd.startswith("/usr/sbin/haproxy") or cmd.startswith("haproxy "):
                    roles["haproxy master"].append(child)
                    roles["haproxy worker"] += sorted(kids.get(child, []))
                elif cmd.startswith("nginx: master"):
                    roles["nginx master"].append(child)
                    for worker in kids.get(child, []):
                        roles["nginx worker"].append(worker)
                        self.nginx_workers_seen[worker] = table[worker][2]
                else:
                    for name in (*STAGES, "pen"):
                        if f"services.cli {name} " in cmd + " ":
                            roles["pen runner" if name == "pen" else name].append(child)
        runners = set(roles.get("pen runner", []))
        for pid, (ppid, cmd, _) in table.items():
            # a pen instance: started by our runner (through setpriv, which execs it), or one
            # that outlived a runner and names our run dir (argv or RUN_DIR in its environment)
            if os.path.basename(cmd.split(" ", 1)[0]) == "pen" and (
                    ppid in runners or self.run_dir in cmd or run_dir_of(pid) == self.run_dir):
                roles["pen instance"].append(pid)
        return dict(roles)

    def ours(self, pid: int, cmd: str, start: int) -> bool:
        """Part of this instance: naming the run dir on its command line or in its environment
        (RUN_DIR), or an nginx worker seen under one of its masters."""
        if pid == os.getpid():
            return False
        return self.run_dir in cmd or pid == self.launcher_pid or run_dir_of(pid) == self.run_dir or (
            self.nginx_workers_seen.get(pid) == start and cmd.startswith("nginx"))

    def leftovers(self) -> list[str]:
        """Processes of this instance still alive."""
        return [f"{pid} (ppid {ppid}) {cmd[:120]}" for pid, (ppid, cmd, start) in proc_table().items()
                if self.ours(pid, cmd, start)]

    def kill_leftovers(self) -> None:
        for pid, (ppid, cmd, start) in proc_table().items():
            if self.ours(pid, cmd, start):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# ------------------------------------------------------------------------------------------
# load


class Path(threading.Thread):
    """One load path: a thread sending requests one after the other; every failure is kept."""

    def __init__(self, name: str, ask, pause: float):
        super().__init__(daemon=True, name=name)
        self.label, self.ask, self.pause = name, ask, pause
        self.sent = 0
        self.failures: list[tuple[float, float, str]] = []  # (sent, failed, error)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            sent = now()
            try:
                error = self.ask()
            except (OSError, http.client.HTTPException) as exc:
                error = type(exc).__name__
            except Exception as exc:  # noqa: BLE001 - a bug here must show, not kill the path
                error = f"client error {type(exc).__name__}: {exc}"
            self.sent += 1
            if error:
                self.failures.append((sent, now(), error))
            if self.pause:
                self.halt.wait(self.pause)


def http_ask(port: int, host: str | None, prefix: bytes, path: str = "/"):
    def ask() -> str:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", path, headers={"Host": host} if host else {})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status == 200 and body.startswith(prefix):
            return ""
        if response.status == 200:
            return f"wrong answer {body[:20]!r}"
        return classify(response.status, body, response.headers)
    return ask


def udp_ask(port: int):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    counter = itertools.count()

    def ask() -> str:
        seq = str(next(counter)).encode()
        sock.sendto(b"q" + seq, ("127.0.0.1", port))
        deadline = now() + 1.0
        while True:
            sock.settimeout(max(0.01, deadline - now()))
            try:
                data, _ = sock.recvfrom(2048)
            except socket.timeout:
                return "UDP timeout (1 s)"
            except ConnectionRefusedError:
                return "UDP refused (ICMP)"
            if data.endswith(b":q" + seq):
                return "" if data.startswith(b"u") else f"wrong answer {data[:20]!r}"
            # a late answer to an earlier datagram: keep waiting for ours
    return ask


# ------------------------------------------------------------------------------------------
# the soak


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.churn_rng = random.Random(args.seed)
        self.kill_rng = random.Random(args.seed * 7919 + 1)
        self.run_dir = tempfile.mkdtemp(prefix="pmsoak")
        self.services_file = os.path.join(self.run_dir, "services.json")
        self.ports = {name: free_port() for name in ("web", "marathon", "registrator", "vhost", "status")}
        self.ports["dns"] = free_port(socket.SOCK_DGRAM)
        self.events: list[dict] = []  # kills
        self.churn: collections.Counter = collections.Counter()
        self.churn_log: list[tuple[float, str]] = []  # (time, what) of every churn step
        self.actions: collections.Counter = collections.Counter()
        self.seen_applied: set[tuple[str, str, int]] = set()
        self.reload_log: list[tuple[float, str]] = []  # (monotonic time, driver) of applier reloads
        self.wall_offset = time.time() - time.monotonic()
        self.haproxy_reloads: dict[int, int] = {}  # master pid -> highest reload count seen
        self.haproxy_reload_base: dict[int, int] = {}  # the first master's count when the load began
        self.samples: dict[str, dict[int, list[tuple[float, int, int]]]] = collections.defaultdict(dict)
        self.first_sample: dict[str, list[tuple[int, int, int]]] = {}
        self.last_sample: dict[str, list[tuple[int, int, int]]] = {}
        self.interventions: list[str] = []
        self.notes: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.launcher: subprocess.Popen | None = None
        self.etcd: EtcdServer | None = None
        self.sim: MarathonSim | None = None
        self.backends: list = []
        self.paths: list[Path] = []

    # -- setup --------------------------------------------------------------------------
    def start(self) -> None:
        self.web_backends = [HttpBackend(f"f{i}") for i in range(6)]
        self.marathon_backends = [HttpBackend(f"m{i}") for i in range(6)]
        self.reg_backends = [HttpBackend(f"r{i}") for i in range(5)]
        self.udp_backends = [UdpEcho(f"u{i}") for i in range(4)]
        self.backends = self.web_backends + self.marathon_backends + self.reg_backends + self.udp_backends
        self.web_active = {b.name: (b, 500) for b in self.web_backends[:3]}
        self.udp_active = {b.name: b for b in self.udp_backends[:2]}
        self.write_services()

        self.sim = MarathonSim().start()
        self.sim.cluster._port_counter = itertools.cycle([b.port for b in self.marathon_backends])
        self.marathon_app = "/soak/mweb"
        self.sim.deploy_app(self.marathon_app, network="BRIDGE", service_ports=[self.ports["marathon"]],
                            instances=3, health_check=True,
                            labels={"com.meltwater.proxymatic.port.0.mode": "http"})

        self.etcd = EtcdServer().start()
        self.etcd_client = self.etcd.client()
        self.reg_prefix = f"/services/reg@{self.ports['registrator']}"
        self.reg_keys: dict[str, HttpBackend] = {}
        for i in range(3):
            self.reg_write(i, self.reg_backends[i])

        os.makedirs(os.path.join(self.run_dir, "run"), exist_ok=True)
        self.pm_dir = os.path.join(self.run_dir, "run")
        command = [PROXYMATIC, "--run-dir", self.pm_dir, "--services-file", self.services_file,
                   "--marathon", self.sim.url, "--registrator", self.etcd.url("/services"),
                   "--vhost-domain", DOMAIN, "--vhost-port", str(self.ports["vhost"]),
                   "--status-endpoint", f"127.0.0.1:{self.ports['status']}", "--node-name", "soak"]
        self.launcher_log = open(os.path.join(self.run_dir, "launcher.log"), "ab")
        self.launcher = subprocess.Popen(command, stdout=self.launcher_log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.roles = Roles(self.launcher.pid, self.pm_dir, self.etcd.process.pid if self.etcd.process else None)
        self.master = MasterCli(HaproxyPaths.for_run_dir(self.pm_dir).master_socket, timeout=3)
        self.udp_probe = udp_ask(self.ports["dns"])
        probe = http_ask(self.ports["status"], None, b"OK", "/status")

        def status_probe() -> str:
            try:
                return probe()
            except (OSError, http.client.HTTPException) as exc:
                return type(exc).__name__
        self.status_probe = status_probe
        self.bus = Subscriber(zmq.Context.instance(), [Endpoint.parse(f"ipc://{self.pm_dir}/bus/applier.pub")],
                              ["applied."])
        self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        asks = {
            "status": http_ask(self.ports["status"], None, b"OK", "/status"),
            "web": http_ask(self.ports["web"], None, b"f"),
            "marathon": http_ask(self.ports["marathon"], None, b"m"),
            "registrator": http_ask(self.ports["registrator"], None, b"r"),
            "vhost": http_ask(self.ports["vhost"], f"web.{DOMAIN}", b"f"),
            "dns": udp_ask(self.ports["dns"]),
        }
        deadline = now() + timeout
        pending = dict(asks)
        while pending:
            if now() > deadline:
                raise RuntimeError(f"not ready after {timeout:.0f}s: {sorted(pending)} "
                                   f"(logs in {self.pm_dir}/logs)")
            if self.launcher.poll() is not None:
                raise RuntimeError(f"the launcher exited with {self.launcher.returncode}")
            for name, ask in list(pending.items()):
                try:
                    if ask() == "":
                        del pending[name]
                except (OSError, http.client.HTTPException):
                    pass
            time.sleep(0.2)
        # nginx reloaded to add the vhosts: its old workers answer with the old config until they
        # are gone, and a restarting HAProxy is not serving yet. Wait for a clean streak.
        settle_deadline = now() + 60
        streak = 0
        while streak < 20 and now() < settle_deadline:
            roles = self.roles.find()
            table = proc_table()
            shutting = any("shutting down" in table.get(w, (0, "", 0))[1] for w in roles.get("nginx worker", []))
            try:
                ok = not shutting and all(ask() == "" for ask in asks.values())
            except (OSError, http.client.HTTPException):
                ok = False
            streak = streak + 1 if ok else 0
            time.sleep(0.05)

    # -- discovery ----------------------------------------------------------------------
    def write_services(self) -> None:
        document = {"services": [
            {"name": "web", "port": self.ports["web"], "mode": "http",
             "health_check": {"protocol": "http", "path": "/health", "interval_seconds": 1,
                              "timeout_seconds": 1, "fall": 1},
             "servers": [{"host": "127.0.0.1", "port": b.port, "weight": w} for b, w in self.web_active.values()]},
            {"name": "dns", "port": self.ports["dns"], "protocol": "udp",
             "servers": [{"host": "127.0.0.1", "port": b.port} for b in self.udp_active.values()]},
        ]}
        temporary = self.services_file + ".tmp"
        with open(temporary, "w") as handle:
            json.dump(document, handle)
        os.replace(temporary, self.services_file)

    def reg_write(self, index: int, backend: HttpBackend) -> None:
        key = f"{self.reg_prefix}/h{index}:reg{index}:80"
        self.etcd_client.write(key, f"127.0.0.1:{backend.port}")
        self.reg_keys[key] = backend

    def haproxy_up(self) -> set[int]:
        proc = self.master.show_proc()
        states = WorkerApi(self.master, proc.worker).servers_state()
        key = f"{self.ports['web']}/tcp"
        return {s.port for (b, _), s in states.items()
                if key_of_backend(b) == key and s.operational_state == SRV_RUNNING and not s.in_maintenance}

    def web_may_take_down(self, target: HttpBackend) -> bool:
        others = [b for b, _ in self.web_active.values() if b is not target and b.healthy]
        if len(others) < 2:
            return False
        try:
            up = self.haproxy_up()
        except Exception:  # noqa: BLE001 - HAProxy restarting: no take-down now
            return False
        return sum(b.port in up for b in others) >= 2

    def churn_once(self) -> None:
        rng = self.churn_rng
        kind = rng.choice(["marathon-scale", "marathon-health", "etcd", "file-web", "file-web", "file-udp"])
        if kind == "marathon-scale":
            with self.sim.cluster.lock:
                tasks = sorted((t for t in self.sim.cluster.tasks.values() if t.app_id == self.marathon_app),
                               key=lambda t: t.staged_at)
            target = rng.randint(2, 5)
            kept = tasks[:target]
            if len({t.ports[0] for t in kept if t.alive}) < 2:
                self.churn["marathon-scale skipped"] += 1
                return
            self.sim.scale(self.marathon_app, target)
            self.churn["marathon-scale"] += 1
        elif kind == "marathon-health":
            with self.sim.cluster.lock:
                tasks = [t for t in self.sim.cluster.tasks.values() if t.app_id == self.marathon_app]
            task = rng.choice(tasks)
            if not task.alive:
                self.sim.set_health(task.id, True)
                self.churn["marathon-health recover"] += 1
            elif len({t.ports[0] for t in tasks if t.alive and t is not task and t.ports[0] != task.ports[0]}) >= 2:
                self.sim.set_health(task.id, False)
                self.churn["marathon-health fail"] += 1
            else:
                sick = [t for t in tasks if not t.alive]
                if sick:  # nothing can fail now: recover one instead
                    self.sim.set_health(rng.choice(sick).id, True)
                    self.churn["marathon-health recover"] += 1
                else:
                    self.churn["marathon-health skipped"] += 1
        elif kind == "etcd":
            if rng.random() < 0.5 and len(self.reg_keys) < 5:
                free = [i for i in range(5) if f"{self.reg_prefix}/h{i}:reg{i}:80" not in self.reg_keys]
                index = rng.choice(free)
                self.reg_write(index, self.reg_backends[index])
                self.churn["etcd write"] += 1
            elif len(self.reg_keys) > 2:
                key = rng.choice(sorted(self.reg_keys))
                self.etcd_client.delete(key)
                del self.reg_keys[key]
                self.churn["etcd delete"] += 1
            else:
                key = rng.choice(sorted(self.reg_keys))
                self.etcd_client.write(key, f"127.0.0.1:{self.reg_keys[key].port}")  # same value again
                self.churn["etcd rewrite"] += 1
        elif kind == "file-web":
            action = rng.choice(["add", "remove", "weight", "health"])
            if action == "health":
                target = rng.choice([b for b, _ in self.web_active.values()])
                if not target.healthy:
                    target.healthy = True
                    self.churn["file-web health recover"] += 1
                elif self.web_may_take_down(target):
                    target.healthy = False
                    self.churn["file-web health fail"] += 1
                else:
                    sick = [b for b, _ in self.web_active.values() if not b.healthy]
                    if sick:  # nothing can fail now: recover one instead
                        rng.choice(sick).healthy = True
                        self.churn["file-web health recover"] += 1
                    else:
                        self.churn["file-web health skipped"] += 1
                return
            idle = [b for b in self.web_backends if b.name not in self.web_active]
            if action == "add" and idle:
                backend = rng.choice(idle)
                self.web_active[backend.name] = (backend, rng.choice((100, 300, 500, 700, 1000)))
            elif action == "remove" and len(self.web_active) > 2:
                name = rng.choice(sorted(self.web_active))
                if not self.web_may_take_down(self.web_active[name][0]):
                    self.churn["file-web remove skipped"] += 1
                    return
                del self.web_active[name]
            else:
                action = "weight"
                name = rng.choice(sorted(self.web_active))
                backend, weight = self.web_active[name]
                self.web_active[name] = (backend, rng.choice([w for w in (100, 300, 500, 700, 1000) if w != weight]))
            self.write_services()
            self.churn[f"file-web {action}"] += 1
        else:
            idle = [b for b in self.udp_backends if b.name not in self.udp_active]
            if idle and (len(self.udp_active) <= 2 or rng.random() < 0.5):
                backend = rng.choice(idle)
                self.udp_active[backend.name] = backend
                action = "add"
            else:
                del self.udp_active[rng.choice(sorted(self.udp_active))]
                action = "remove"
            self.write_services()
            self.churn[f"file-udp {action}"] += 1

    # -- kills --------------------------------------------------------------------------
    def pick_pid(self, target: str) -> int | None:
        roles = self.roles.find()
        if target in STAGES:
            pids = roles.get(target, [])
        elif target == "haproxy-master":
            pids = roles.get("haproxy master", [])
        elif target == "haproxy-worker":
            try:
                worker = self.master.show_proc().worker
            except Exception:  # noqa: BLE001
                worker = None
            pids = [worker] if worker else []
        elif target == "pen":
            pids = roles.get("pen instance", [])
        else:
            pids = roles.get("nginx master", [])
        return pids[0] if len(pids) == 1 else (sorted(pids)[-1] if pids else None)

    def serving(self, target: str, killed: int) -> bool:
        """Is the killed part back (a new process doing its job)?"""
        roles = self.roles.find()
        if target == "status":  # back when /status answers OK again
            pids = roles.get(target, [])
            return bool(pids) and killed not in pids and self.status_probe() == ""
        if target in STAGES:
            pids = roles.get(target, [])
            return bool(pids) and killed not in pids
        if target.startswith("haproxy"):
            try:
                info = self.master.show_proc()
            except Exception:  # noqa: BLE001
                return False
            if info.worker is None or info.worker == killed or info.master_pid == killed:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.ports["web"]), timeout=1):
                    return True
            except OSError:
                return False
        if target == "pen":
            pids = roles.get("pen instance", [])
            return bool(pids) and killed not in pids and self.udp_probe() == ""
        masters = roles.get("nginx master", [])
        return bool(masters) and killed not in masters and bool(roles.get("nginx worker")) and \
            http_ask(self.ports["vhost"], None, b"OK", "/_status")() == ""

    def killer(self, started: float, end: float) -> None:
        at = started + self.kill_rng.uniform(20, 40)
        while not self.stop.is_set():
            target = self.kill_rng.choice(KILL_TARGETS)
            # no kill in the last 20 s: its restart must be seen before the load stops
            if self.stop.wait(max(0.0, at - now())) or now() >= end - 20:
                return
            try:
                self.kill_one(target)
            except Exception:  # noqa: BLE001 - keep soaking, but say so
                self.notes.append(f"kill of {target} failed: {traceback.format_exc(limit=2)}")
            at += self.kill_rng.uniform(20, 40)

    def kill_one(self, target: str) -> None:
        pid = self.pick_pid(target)
        if pid is None:
            self.events.append({"target": target, "pid": None, "at": now(), "back": None,
                                "note": "nothing to kill (not running at that moment)"})
            return
        orphans = {}
        if target == "nginx-master":
            table = proc_table()
            orphans = {p: e[2] for p, e in table.items() if e[0] == pid}
        if target.startswith("haproxy"):
            self.count_haproxy_reloads()  # the master about to go: its last count
        event = {"target": target, "pid": pid, "at": now(), "back": None, "note": ""}
        with self.lock:
            self.events.append(event)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            event["note"] = "already gone"
        deadline = event["at"] + 90
        intervened = False
        while now() < deadline and not self.stop.is_set():
            if self.serving(target, pid):
                event["back"] = now()
                break
            if target == "nginx-master" and not intervened and now() - event["at"] > 10:
                left = [p for p, start in orphans.items() if alive(p, start)]
                if left:
                    # nginx workers outlive a killed master and keep the vhost port: the new
                    # master cannot bind it. Say so, and clear the way for the rest of the soak.
                    intervened = True
                    for p in left:
                        try:
                            os.kill(p, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    text = (f"nginx master {pid} killed: its {len(left)} workers lived on (ppid 1, still "
                            f"serving the old config) and the new master could not bind the port for "
                            f"{now() - event['at']:.0f}s; the soak killed the orphaned workers")
                    event["note"] = "orphaned workers kept the port; soak killed them"
                    self.interventions.append(text)
            time.sleep(0.1)
        if event["back"] is None:
            event["note"] = (event["note"] + "; " if event["note"] else "") + "not serving again within 90 s"

    # -- sampling -----------------------------------------------------------------------
    def sample(self) -> None:
        roles = self.roles.find()
        snapshot: dict[str, list[tuple[int, int, int]]] = {}
        for role, pids in roles.items():
            for pid in pids:
                measured = rss_and_fds(pid)
                if measured is None:
                    continue
                snapshot.setdefault(role, []).append((pid, *measured))
                self.samples[role].setdefault(pid, []).append((now(), *measured))
        if not self.first_sample:
            self.first_sample = snapshot
        self.last_sample = snapshot
        self.count_haproxy_reloads()

    def count_haproxy_reloads(self) -> None:
        try:
            info = self.master.show_proc()
        except Exception:  # noqa: BLE001 - restarting
            return
        with self.lock:
            self.haproxy_reloads[info.master_pid] = max(self.haproxy_reloads.get(info.master_pid, 0), info.reloads)

    def pump_bus(self) -> None:
        for message in self.bus.poll(0):
            if not message.topic.startswith("applied."):
                continue
            key = (message.sender, message.epoch, message.seq)
            if key in self.seen_applied:
                continue
            self.seen_applied.add(key)
            for driver, detail in message.payload.get("details", {}).items():
                if isinstance(detail, dict):
                    self.actions[(driver, detail.get("action"))] += 1
                    if detail.get("action") == "reload":
                        self.reload_log.append((message.ts - self.wall_offset, driver))

    # -- run ----------------------------------------------------------------------------
    def run(self) -> dict:
        pause = self.args.pause
        self.paths = [
            Path("haproxy→web", http_ask(self.ports["web"], None, b"f"), pause),
            Path("haproxy→marathon", http_ask(self.ports["marathon"], None, b"m"), pause),
            Path("haproxy→registrator", http_ask(self.ports["registrator"], None, b"r"), pause),
            Path("nginx→web", http_ask(self.ports["vhost"], f"web.{DOMAIN}", b"f"), pause),
            Path("pen udp→dns", udp_ask(self.ports["dns"]), pause),
            Path("/status", http_ask(self.ports["status"], None, b"OK", "/status"), 0.5),
        ]
        self.sample()
        self.haproxy_reload_base = dict(self.haproxy_reloads)
        self.pump_bus()
        self.actions.clear()
        self.reload_log.clear()
        started = now()
        end = started + self.args.minutes * 60
        for path in self.paths:
            path.start()
        killer = threading.Thread(target=self.killer, args=(started, end), daemon=True)
        killer.start()
        next_churn = started + self.churn_rng.uniform(0.5, 1.5)
        next_sample = started + 10
        next_report = started + 60
        while now() < end:
            self.pump_bus()
            if now() >= next_churn:
                before = collections.Counter(self.churn)
                try:
                    self.churn_once()
                except Exception as exc:  # noqa: BLE001 - an etcd/Marathon hiccup: count it
                    self.churn[f"churn error {type(exc).__name__}"] += 1
                self.churn_log += [(now(), k) for k in (self.churn - before)]
                next_churn += self.churn_rng.uniform(0.5, 1.5)
            if now() >= next_sample:
                self.sample()
                next_sample += 10
            if now() >= next_report:
                sent = sum(p.sent for p in self.paths)
                failed = sum(len(p.failures) for p in self.paths)
                print(f"  {now() - started:5.0f}s: {sent} requests, {failed} failed, {len(self.events)} kills, "
                      f"{sum(self.churn.values())} churn steps", flush=True)
                next_report += 60
            time.sleep(0.02)
        self.stop.set()
        killer.join(timeout=100)
        for path in self.paths:
            path.halt.set()
        for path in self.paths:
            path.join(timeout=10)
        self.sample()
        time.sleep(0.5)
        self.pump_bus()
        return {"seconds": now() - started, "started": started}

    def shutdown(self) -> list[str]:
        """Stop the launcher (SIGINT: supervisord stops every program), then make sure nothing of
        this instance is left; returns what had to be killed."""
        forced: list[str] = []
        if self.launcher is not None and self.launcher.poll() is None:
            self.launcher.send_signal(signal.SIGINT)
            try:
                self.launcher.wait(timeout=60)
            except subprocess.TimeoutExpired:
                forced.append(f"launcher {self.launcher.pid} did not stop within 60 s")
                self.launcher.kill()
                self.launcher.wait()
        if self.launcher is not None:
            deadline = now() + 10
            while self.roles.leftovers() and now() < deadline:
                time.sleep(0.2)
            forced += self.roles.leftovers()
            self.roles.kill_leftovers()
            time.sleep(0.5)
            forced += [f"STILL ALIVE: {x}" for x in self.roles.leftovers()]
        if self.sim is not None:
            self.sim.stop()
        if self.etcd is not None:
            self.etcd.close()
        for backend in self.backends:
            backend.close()
        return forced


# ------------------------------------------------------------------------------------------
# summary


def kb(value: int) -> str:
    return f"{value / 1024:.1f} MB"


def summary(soak: Soak, timing: dict, forced: list[str], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"{timing['seconds'] / 60:.1f} minutes, seed {soak.args.seed}; "
             f"{sum(soak.churn.values())} churn steps, {len(soak.events)} kills.", ""]
    # traffic
    lines += ["| path | requests | failed | in flight on a killed proxy (kill → 1 s after it serves again) | other | errors |",
              "| --- | --- | --- | --- | --- | --- |"]
    other_failures: list[tuple[float, str, str]] = []
    for path in soak.paths:
        during = 0
        for sent, at, error in path.failures:
            hit = False
            for event in soak.events:
                if event["pid"] is None:
                    continue
                proxy = event["target"].split("-")[0]
                if path.label not in AFFECTS.get(proxy, ()):
                    continue
                back = event["back"] or (timing["started"] + timing["seconds"] + 1)
                if sent <= back + AFTER_BACK and at >= event["at"] - 0.05:
                    hit = True
                    break
            if hit:
                during += 1
            else:
                other_failures.append((sent, path.label, error))
        errors = collections.Counter(error for _, _, error in path.failures)
        text = ", ".join(f"{e}: {n}" for e, n in errors.most_common(5)) or "-"
        lines.append(f"| {path.label} | {path.sent:,} | {len(path.failures):,} | {during:,} | "
                     f"{len(path.failures) - during:,} | {text} |")
    lines += ["", "`/status` is polled every 0.5 s; its failures count as in flight while the status stage or HAProxy "
              "(/status then answers 503 naming HAProxy, by design) restarts.", ""]
    # kills
    lines += ["| killed | times | at (s from start) | back serving after (median / max) | notes |",
              "| --- | --- | --- | --- | --- |"]
    by_target: dict[str, list[dict]] = collections.defaultdict(list)
    for event in soak.events:
        by_target[event["target"]].append(event)
    for target in KILL_TARGETS:
        events = by_target.get(target, [])
        if not events:
            continue
        backs = [e["back"] - e["at"] for e in events if e["back"]]
        notes = sorted({e["note"] for e in events if e["note"]})
        timing_text = f"{statistics.median(backs):.1f} s / {max(backs):.1f} s" if backs else "-"
        times = ", ".join(f"{e['at'] - timing['started']:.0f}" for e in events)
        lines.append(f"| {target} | {len(events)} | {times} | {timing_text} | {'; '.join(notes) or '-'} |")
    lines += ["", "Back serving: a stage when its new process runs (status: when /status answers 200 OK again), "
              "HAProxy when a new worker accepts on a service port, Pen when a new instance answers a datagram, "
              "nginx when a new master with workers answers `/_status`."]
    # reloads and churn
    haproxy_reloads = sum(n - soak.haproxy_reload_base.get(m, 0) for m, n in soak.haproxy_reloads.items())
    lines += ["", f"Reloads: HAProxy {haproxy_reloads} (its own `show proc` counter, summed over "
              f"{len(soak.haproxy_reloads)} masters, startup excluded), nginx {soak.actions[('nginx', 'reload')]}, "
              f"Pen {soak.actions[('pen', 'reload')]} (applier `reload` actions). Applier actions: "
              + ", ".join(f"{d}:{a} {n}" for (d, a), n in sorted(soak.actions.items())) + ".", "",
              "Applier reloads during the load: " + (", ".join(
                  f"{driver} at {t - timing['started']:.1f}s"
                  + "".join(f" ({e['target']} killed at {e['at'] - timing['started']:.1f}s)"
                            for e in soak.events if 0 <= t - e["at"] < 30)
                  for t, driver in soak.reload_log) or "none") + ".", "",
              "Churn: " + ", ".join(f"{k} {n}" for k, n in sorted(soak.churn.items())) + ".", ""]
    # resources
    lines += ["| process | pid, RSS, fds at start | pid, RSS, fds at end | longest-lived pid: RSS, fds first → last (over) |",
              "| --- | --- | --- | --- |"]
    for role in sorted(set(soak.first_sample) | set(soak.last_sample)):
        def fmt(entries):
            if not entries:
                return "-"
            if len(entries) == 1:
                pid, rss, fds = entries[0]
                return f"{pid}: {kb(rss)}, {fds}"
            return f"{len(entries)} pids: {kb(sum(e[1] for e in entries))}, {sum(e[2] for e in entries)} (sum)"
        series = soak.samples.get(role, {})
        longest = max(series.items(), key=lambda item: item[1][-1][0] - item[1][0][0], default=None)
        if longest:
            pid, points = longest
            life = f"{pid}: {kb(points[0][1])} → {kb(points[-1][1])}, {points[0][2]} → {points[-1][2]} " \
                   f"({(points[-1][0] - points[0][0]) / 60:.1f} min)"
        else:
            life = "-"
        lines.append(f"| {role} | {fmt(soak.first_sample.get(role))} | {fmt(soak.last_sample.get(role))} | {life} |")
    if other_failures:
        lines += ["", f"Failures outside a killed proxy's restart ({len(other_failures)}; first 30, time from the start, "
                  "the kills/churn around them):", ""]
        for at, label, error in sorted(other_failures)[:30]:  # `at`: when the request was sent
            near = [f"{e['target']} killed at {e['at'] - timing['started']:.1f}s" for e in soak.events
                    if abs(e["at"] - at) < 10]
            near += [f"{what} at {t - timing['started']:.1f}s" for t, what in soak.churn_log if -0.2 <= at - t < 1.5]
            lines.append(f"- sent at {at - timing['started']:.2f}s {label}: {error}" + (f" ({'; '.join(near)})" if near else ""))
    if soak.interventions:
        lines += ["", "Soak interventions:", ""] + [f"- {text}" for text in soak.interventions]
    if soak.notes:
        lines += ["", "Notes:", ""] + [f"- {text}" for text in soak.notes]
    lines += ["", "Processes left after the launcher stopped: "
              + ("none" if not forced else "; ".join(forced))]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pause", type=float, default=0.01, help="seconds between two requests of one load path")
    parser.add_argument("--out", help="also write the summary (markdown) to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) afterwards")
    args = parser.parse_args()
    if not os.path.exists(PROXYMATIC):
        print(f"no launcher at {PROXYMATIC} (make install)", file=sys.stderr)
        return 2
    command = " ".join([".venv/bin/python -m bench.soak", *sys.argv[1:]])
    soak = Soak(args)
    interrupted = False
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    timing = None
    try:
        print(f"soak: run dir {soak.run_dir}, {args.minutes} min, seed {args.seed}", flush=True)
        soak.start()
        print("soak: everything answers; load, churn and kills start", flush=True)
        timing = soak.run()
    except KeyboardInterrupt:
        interrupted = True
        soak.stop.set()
        for path in soak.paths:
            path.halt.set()
    except BaseException:
        args.keep = True  # the logs say why
        print(f"soak: failed; logs kept in {soak.run_dir}", file=sys.stderr)
        soak.stop.set()
        for path in soak.paths:
            path.halt.set()
        raise
    finally:
        forced = soak.shutdown()
        signal.signal(signal.SIGTERM, previous)
        if not args.keep:
            shutil.rmtree(soak.run_dir, ignore_errors=True)
    if timing is None:
        print("soak: interrupted before the load started" if interrupted else "soak: failed to start")
        return 1
    text = summary(soak, timing, forced, command)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
