"""Many nodes (issue 11): one central feeding N nodes on separate hosts (network namespaces).

The hosts, keys and processes are tests/test_multinode.py's Cluster (tests/netns.py): `c1` runs
`proxymatic --role central` on a services file, `n1..nN` run `proxymatic --role node
--planner-bus tcp://c1:7100` with CURVE keys from `proxymatic keygen`, the backends live in
`b1`. A load thread per node connects to 127.0.0.1:<servicePort> inside the node's namespace
(through its HAProxy) every --interval seconds for the whole run, counting answers and failures.

Two figures, both end to end (file written -> traffic through the node's HAProxy reaching the
new backend; each change adds a fresh backend and drops the oldest, 2 servers served):

- a change reaching every node: CHANGES changes in a row, the time until the last node's load
  got an answer from the new backend;
- convergence after the central returns: RESTARTS times, the central SIGKILLed (launcher,
  supervisord and its stages), a change written while it is down, the central started again:
  the time from its start until every node's traffic reaches the new backend (the central's
  processes starting, the collector reading the file, the planner's first plan, every node's
  applier resyncing from it and applying).

The sampling adds up to 2 x --interval to each figure (the new backend answers every second
request). Each change waits a random 0-0.25 s first (--seed), so the file source's 0.25 s poll
is met at every phase; the central's part (file -> plan published, from the planner's own
timestamp on its `plan` summary, heard by a CURVE subscriber with a node's key) is reported
apart from the nodes' part (plan published -> every node's traffic on the new backend).

Needs root and `ip netns`; everything is removed at the end, on SIGTERM too (and by the next run
if this one is SIGKILLed).

    .venv/bin/python -m bench.multinode_bench [--nodes 3] [--changes 20] [--restarts 3] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time

import orjson
import zmq
import zmq.auth

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import netns  # noqa: E402
from tests.test_multinode import Cluster, curve_landed  # noqa: E402


class PlanWatcher:
    """The central's live `plan` summaries, as a node hears them (a CURVE client with a node's
    key, from the root namespace through the bridge): when (wall clock, the planner's own `ts`)
    each plan was published, to split a change's time into central and nodes."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.published: list[float] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="plan-watcher")
        self.thread.start()

    def _run(self) -> None:
        ctx = zmq.Context()
        try:
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            if self.cluster.curve:
                sub.curve_publickey, sub.curve_secretkey = zmq.auth.load_certificate(self.cluster.key("n1", True))
                sub.curve_serverkey = zmq.auth.load_certificate(self.cluster.key("central"))[0]
            sub.setsockopt(zmq.SUBSCRIBE, b"plan")
            sub.connect(self.cluster.planner_endpoint("c1"))
            while not self.stopping.is_set():
                if sub.poll(200):
                    topic, body = sub.recv_multipart()
                    if topic == b"plan":  # the summary: the plan is whole from here
                        self.published.append(float(orjson.loads(body)["ts"]))
        finally:
            ctx.destroy(linger=0)

    def first_after(self, wall: float) -> float | None:
        return next((ts for ts in self.published if ts >= wall), None)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)


def newest_plan_published(cluster: Cluster, timeout: float = 5.0) -> float | None:
    """The planner's timestamp on its newest `plan` summary, from its snapshot socket (a
    restarted planner's first plan goes out before a subscriber has reconnected)."""
    from services.common.bus import SNAPSHOT_REQUEST
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        if cluster.curve:
            dealer.curve_publickey, dealer.curve_secretkey = zmq.auth.load_certificate(cluster.key("n1", True))
            dealer.curve_serverkey = zmq.auth.load_certificate(cluster.key("central"))[0]
        host, port = cluster.planner_endpoint("c1").rsplit(":", 1)
        dealer.connect(f"{host}:{int(port) + 1}")
        dealer.send_multipart([SNAPSHOT_REQUEST, b"plan"])
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and dealer.poll(left * 1000):
            frames = dealer.recv_multipart()
            if frames[0] == b"plan":
                return float(orjson.loads(frames[1])["ts"])
        return None
    finally:
        ctx.destroy(linger=0)


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return (f"median {statistics.median(ordered) * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms, "
            f"max {ordered[-1] * 1000:.0f} ms (n={len(ordered)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between a node's requests")
    parser.add_argument("--seed", type=int, default=11, help="seeds the pauses before each change")
    parser.add_argument("--json", help="write the figures to this file as JSON")
    args = parser.parse_args()
    if not 1 <= args.nodes <= 40 or not 0 <= args.changes <= 500 or not 0 <= args.restarts <= 20:
        parser.error("--nodes 1..40, --changes 0..500, --restarts 0..20")
    reason = netns.skip_reason()
    if reason:
        print(f"multinode_bench: cannot run: {reason}", file=sys.stderr)
        return 2
    rounds = args.changes + args.restarts + 1
    backends = {f"s{i}": 8100 + i for i in range(rounds)}
    cluster = Cluster(nodes=args.nodes, centrals=1, curve=curve_landed(), two_centrals=False,
                      backends=backends, load_interval=args.interval)
    served = ["s0"]
    counter = iter(range(1, rounds))

    def change() -> tuple[str, float, float]:
        new = f"s{next(counter)}"
        served[:] = served[-1:] + [new]
        wall = time.time()
        return new, cluster.write_services(*served), wall

    changes: list[float] = []
    to_plan: list[float] = []     # file written -> the central published the plan
    plan_to_nodes: list[float] = []  # plan published -> every node's traffic on the new backend
    restarts: list[float] = []
    restart_to_plan: list[float] = []
    restart_plan_to_nodes: list[float] = []
    gone: list[float] = []
    watcher = None
    try:
        cluster.create()
        began = time.monotonic()
        cluster.bring_up("s0")
        print(f"{args.nodes} nodes up and serving in {time.monotonic() - began:.1f} s "
              f"(CURVE {'on' if cluster.curve else 'off'})", flush=True)
        watcher = PlanWatcher(cluster)
        pauses = random.Random(args.seed)
        for _ in range(args.changes):
            # A random pause first: a change right after the previous one converged would always
            # meet the file source's poll (0.25 s) at the same phase.
            time.sleep(pauses.uniform(0, 0.25))
            new, since, wall = change()
            total = cluster.wait_everywhere(new, since)
            changes.append(total)
            published = watcher.first_after(wall)
            if published is not None:
                to_plan.append(published - wall)
                plan_to_nodes.append(total - (published - wall))
        print(f"change -> every node:           {summary(changes)}", flush=True)
        print(f"  file -> plan published:       {summary(to_plan)}  (the file source polls every 0.25 s)", flush=True)
        print(f"  plan published -> every node: {summary(plan_to_nodes)}", flush=True)
        for _ in range(args.restarts):
            gone.append(cluster.kill("c1"))
            new, _written, _wall = change()
            since, wall = time.monotonic(), time.time()
            cluster.start_central("c1")
            restarts.append(cluster.wait_everywhere(new, since, timeout=120))
            published = newest_plan_published(cluster)
            if published is not None and published >= wall:
                restart_to_plan.append(published - wall)
                restart_plan_to_nodes.append(restarts[-1] - (published - wall))
        print(f"central back -> every node:     {summary(restarts)}", flush=True)
        print(f"  start -> first plan:          {summary(restart_to_plan)}", flush=True)
        print(f"  first plan -> every node:     {summary(restart_plan_to_nodes)}", flush=True)
        print(f"central gone after SIGKILL:     {summary(gone)}", flush=True)
        for load in cluster.loads.values():
            load.stop()
        requests = sum(load.ok for load in cluster.loads.values())
        failures = sum(len(load.failures) for load in cluster.loads.values())
        print(f"nodes {args.nodes}, requests {requests}, failed {failures}", flush=True)
        for node, load in cluster.loads.items():
            if load.failures:
                print(f"  {node}: {len(load.failures)} failed, first: {load.failures[:3]}")
        figures = {
            "nodes": args.nodes, "curve": cluster.curve, "requests": requests, "failures": failures,
            "per_node": {n: {"requests": load.ok, "failures": len(load.failures)} for n, load in cluster.loads.items()},
            "start_to_every_node_ok_s": cluster.figures.get("start_to_every_node_ok_s"),
            "change_to_every_node_s": [round(x, 4) for x in changes],
            "file_to_plan_published_s": [round(x, 4) for x in to_plan],
            "plan_published_to_every_node_s": [round(x, 4) for x in plan_to_nodes],
            "central_restart_to_every_node_s": [round(x, 4) for x in restarts],
            "central_restart_to_first_plan_s": [round(x, 4) for x in restart_to_plan],
            "central_first_plan_to_every_node_s": [round(x, 4) for x in restart_plan_to_nodes],
            "central_gone_after_sigkill_s": [round(x, 3) for x in gone],
        }
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(figures, handle, indent=2)
        return 0 if failures == 0 else 1
    finally:
        if watcher:
            watcher.stop()
        problems = cluster.close()
        if problems:
            print(f"multinode_bench: teardown: {problems}", file=sys.stderr)


if __name__ == "__main__":
    with netns.sigterm_interrupts():  # `kill`/`timeout` still remove the namespaces
        code = main()
    sys.exit(code)
