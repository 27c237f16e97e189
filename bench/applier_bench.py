"""CPU per membership change in the HAProxy driver, without HAProxy.

1,000 services × 5 servers; 200 changes of one server each (added, removed or re-weighted),
each applied through HaproxyDriver.apply (the decision step, the incremental renderer and the
runtime commands) against a fake master CLI that answers every command with success. Deferred
writes, as in the applier stage: `flush` (haproxy.cfg and slots.json) is timed apart, once per
`--flush-every` changes (the stage flushes once plans stop coming for 50 ms).

    .venv/bin/python -m bench.applier_bench [--services 1000] [--servers 5] [--changes 200]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

from services.applier.haproxy_driver import HaproxyDriver
from services.applier.haproxy_runtime import MasterCli, ProcInfo
from services.common.config import Settings
from services.common.model import Plan, ProxySettings, Server, Service

WORKER = 4242
SHOW_PROC = f"#<PID> <type> <reloads> <uptime> <version>\n1 master 0 0d00h00m01s 2.6\n# workers\n{WORKER} worker 0 0d00h00m01s 2.6\n"


class FakeMaster(MasterCli):
    """Answers `show proc` with one steady worker and every runtime command with success."""

    def __init__(self):
        super().__init__("/nonexistent")
        self.lines = 0

    def show_proc(self) -> ProcInfo:
        return ProcInfo(1, 0, 0, (WORKER,))

    def send_batch(self, commands, max_line=0):
        self.lines += 1
        return [SHOW_PROC if c == "show proc" else "" for c in commands]


def plan_of(services: dict[int, Service]) -> Plan:
    return Plan(tuple(services[p] for p in sorted(services)), ProxySettings())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--servers", type=int, default=5)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--flush-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as run_dir:
        settings = Settings(run_dir=run_dir)
        os.makedirs(os.path.join(run_dir, "haproxy"))
        driver = HaproxyDriver(settings, defer_writes=True)
        master = FakeMaster()
        driver.master = master
        services = {}
        for i in range(args.services):
            port = 10000 + i
            servers = tuple(Server(f"10.0.{i // 250}.{i % 250 + 1}", 31000 + j) for j in range(args.servers))
            services[port] = Service(f"app{i}", port, servers=servers)
        # Seed: the first plan as if HAProxy had been reloaded with it.
        first = plan_of(services)
        rendering = driver._renderer.update(first, {}, ())
        driver._worker, driver._trusted = WORKER, True
        driver._slots = dict(rendering.slots)
        driver._config_text = rendering.text
        driver._skeleton_hash = rendering.skeleton_hash
        apply_ms, flush_ms = [], []
        kinds = {"add": 0, "remove": 0, "weight": 0}
        for n in range(args.changes):
            port = 10000 + rng.randrange(args.services)
            service = services[port]
            kind = rng.choice(("add", "remove", "weight")) if len(service.servers) > 1 else "add"
            kinds[kind] += 1
            servers = list(service.servers)
            if kind == "add":
                servers.append(Server(f"10.9.{n // 250}.{n % 250 + 1}", 32000 + n))
            elif kind == "remove":
                servers.pop(rng.randrange(len(servers)))
            else:
                index = rng.randrange(len(servers))
                old = servers[index]
                servers[index] = Server(old.ip, old.port, old.hostname, 1 + (old.weight + 250) % 1000, old.maxconn)
            services[port] = service.with_servers(servers)
            plan = plan_of(services)
            start = time.process_time()
            result = driver.apply(plan)
            apply_ms.append((time.process_time() - start) * 1000)
            assert result.ok and result.action == "runtime", result
            if (n + 1) % args.flush_every == 0:
                start = time.process_time()
                driver.flush()
                flush_ms.append((time.process_time() - start) * 1000)
        apply_ms.sort()
        print(f"{args.services} services x {args.servers} servers, {args.changes} changes {kinds}")
        print(f"apply CPU ms/change: mean {statistics.mean(apply_ms):.3f}  p50 {apply_ms[len(apply_ms) // 2]:.3f}  "
              f"p99 {apply_ms[int(len(apply_ms) * 0.99) - 1]:.3f}")
        if flush_ms:
            print(f"flush CPU ms (haproxy.cfg + slots.json, every {args.flush_every} changes): "
                  f"mean {statistics.mean(flush_ms):.3f}")


if __name__ == "__main__":
    main()
