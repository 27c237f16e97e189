"""A dropped Marathon event stream: how long until a change made in the gap is routed.

1,000 apps x 5 tasks in the simulator, the real pipeline (collector, planner, applier, HAProxy
as processes, REFRESH_INTERVAL 3600 so no poll helps). Each round closes every event stream
and, under the simulator's lock (so no stream can see it), flips one task's health: only the
collector reopening its stream and resyncing can bring the change. Measured from just before
the drop (wall clock, same host):

  reconnect   the simulator answers the new /v2/events request
  collector   the collector publishes a snapshot with the change (the message's own timestamp)
  applied     the applier publishes that it applied the plan carrying it (HAProxy told)

Rounds are spaced so each stream has lived a while (a stream that lasted is reopened at once;
only repeated failures back off). Every round is also checked against HAProxy's own state.

    .venv/bin/python -m bench.stream_drop_bench [--apps 1000] [--drops 10]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import zmq

from bench.pipeline_bench import PlanView, View, backend_of, free_port_range, haproxy_addresses, servers_of
from services.common.bus import Endpoint, Subscriber
from services.common.keyed import split_topic
from services.common.wire import SnapshotFollower
from sim.marathon import MarathonSim
from sim.pipeline import Pipeline
from tests.helpers import wait_until

STREAM_AGE = 1.5  # seconds a stream lives before the next drop (longer than MIN_STREAM_LIFE)


class SourceView(SnapshotFollower):
    """The Marathon source's summary and entries by key (no SourceSnapshot rebuilt here)."""

    def build(self, mirror, summary: dict) -> View:
        return View(summary, dict(mirror.values))


class Watch:
    """When the collector published a snapshot, and the applier applied a plan, matching a
    predicate (the publishers' own timestamps), both followed as keyed states."""

    def __init__(self, run_dir: str):
        self.subscriber = Subscriber(zmq.Context.instance(), [
            Endpoint.parse(f"ipc://{run_dir}/bus/{stage}.pub") for stage in ("collector", "planner", "applier")],
            ["source.marathon", "plan", "applied."])
        self.followers = {"source.marathon": SourceView("source.marathon"), "plan": PlanView()}
        self.snapshots: list[tuple[float, View]] = []
        self.plans: dict[str, View] = {}
        self.applied: list[tuple[float, str]] = []

    def pump(self, timeout: float = 0.005) -> None:
        for message in self.subscriber.poll(timeout):
            if message.is_heartbeat:
                continue
            prefix, _key = split_topic(message.topic)
            follower = self.followers.get(prefix)
            if follower is not None:
                view = follower.absorb(message)
                if follower.needs_resync:
                    self.subscriber.resync(prefix)
                    follower.reset()
                if view is None:
                    continue
                if prefix == "plan":
                    self.plans[view.hash] = view
                else:
                    self.snapshots.append((message.ts, view))
            elif message.topic.startswith("applied.") and message.payload["ok"]:
                self.applied.append((message.ts, message.payload["plan_hash"]))

    def forget(self) -> None:
        self.snapshots.clear()
        self.applied.clear()

    def wait(self, snapshot_ok, plan_ok, timeout: float = 120.0) -> tuple[float, float]:
        """(collector publishing time, applier publishing time) of the first matches."""
        deadline = time.monotonic() + timeout
        collected = applied = None
        while time.monotonic() < deadline and (collected is None or applied is None):
            self.pump()
            if collected is None:
                collected = next((ts for ts, view in self.snapshots if snapshot_ok(view)), None)
            if applied is None:
                applied = next((ts for ts, plan_hash in self.applied
                                if plan_hash in self.plans and plan_ok(self.plans[plan_hash])), None)
        if collected is None or applied is None:
            raise RuntimeError("change never published/applied")
        return collected, applied


def summary(values: list[float]) -> dict:
    return {"median_ms": round(statistics.median(values) * 1000, 1), "max_ms": round(max(values) * 1000, 1)}


def run(apps: int, drops: int) -> dict:
    sim = MarathonSim().start()
    base = free_port_range(apps)
    for i in range(apps):
        sim.deploy_app(f"/bench/app{i}", network="BRIDGE", service_ports=[base + i], instances=5, health_check=True)
    pipeline = Pipeline(["--marathon", sim.url, "--status-endpoint", "", "-i", "3600"],
                        programs=("haproxy", "applier", "planner", "collector"))
    watch = Watch(pipeline.run_dir)
    replica = sim.replicas[0]
    probe = apps // 2
    probe_port, task = base + probe, sim.task_ids(f"/bench/app{probe}")[0]
    try:
        pipeline.start()
        watch.wait(lambda view: view.summary["count"] == apps,
                   lambda plan: plan.summary["count"] == apps and all(len(s.servers) == 5
                                                                      for s in plan.services()), timeout=300)
        probe_backend = backend_of(watch.plans[next(iter(watch.plans))], probe_port)
        rounds = {"reconnect": [], "collector": [], "applied": []}
        states: set[str] = set()
        for step in range(drops):
            wait_until(lambda: sim.stream_count() == 1 and time.time() - replica.stream_opens[-1] >= STREAM_AGE,
                       timeout=60, interval=0.05, message="a stream that has lived a while")
            alive = step % 2 == 1
            expected = 5 if alive else 4
            opens = len(replica.stream_opens)
            watch.pump(0)
            watch.forget()
            dropped = time.time()
            with sim.cluster.lock:  # the stream closes before the change: it never sees the events
                sim.drop_streams()
                sim.set_health(task, alive)

            def shows(view: View) -> bool:
                return len(servers_of(view, probe_port)) == expected

            collected, applied = watch.wait(shows, lambda plan: len(servers_of(plan, probe_port)) == expected)
            wait_until(lambda: len(replica.stream_opens) > opens, timeout=60, message="stream reopened")
            rounds["reconnect"].append(replica.stream_opens[opens] - dropped)
            rounds["collector"].append(collected - dropped)
            rounds["applied"].append(applied - dropped)
            states |= {view.summary["state"] for _, view in watch.snapshots}
            wait_until(lambda: len(haproxy_addresses(pipeline.run_dir, probe_backend)) == expected, timeout=10,
                       message="HAProxy's own state to agree")
        return {"apps": apps, "tasks": apps * 5, "drops": drops,
                **{name: summary(values) for name, values in rounds.items()},
                "states_published": sorted(states), "checked_against_haproxy": drops}
    finally:
        pipeline.cleanup()
        sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", type=int, default=1000)
    parser.add_argument("--drops", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps({"stream_drop": run(args.apps, args.drops)}), flush=True)


if __name__ == "__main__":
    main()
