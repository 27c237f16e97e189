"""A stalled subscriber on the bus: what it costs its publisher, and whether it catches up.

A planner-sized publisher (a separate process publishing the plan of --services services with
3 servers each as a keyed state, PlanSender: per change the changed key and the summary
(`message_kb` is the summary's size); one server changes --rate times a second; heartbeats every
second; snapshots answered) feeds a healthy subscriber (the applier's part, in this process)
and a `proxymatic tap`. The tap is stopped with SIGSTOP for --stop seconds while the changes
flow, then continued. Reported: the publisher's RSS before, during (highest) and after the
stop; how many plans the healthy subscriber got meanwhile; and how long after SIGCONT the tap
printed the plan that was newest at SIGCONT. Changes pause (SIGUSR1 to the publisher) for the
last 2 s of the stop and resume once the tap has caught up, so that plan can only reach the tap
through the Clone pattern: it was dropped for the tap at the high-water mark, the heartbeat's
seq makes the tap ask for a snapshot.

    .venv/bin/python -m bench.bus_memory_bench [--services 1000] [--stop 60] [--rate 10] [--hwm N] [--json out.json]

`--hwm 10000` publishes with the old send high-water mark, for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import zmq

from services.common.bus import QUEUE_HWM, Endpoint, Publisher, Subscriber
from services.common.model import Plan, ProxySettings, Server, Service
from services.common.wire import PlanSender

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = re.compile(r" seq=(\d+) ")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmRSS:"))


def plan_of(services: list[Service]) -> Plan:
    return Plan(tuple(services), ProxySettings(), sources_ready=("marathon",))


def publish_forever(endpoint: str, count: int, rate: float, hwm: int) -> None:
    """The publisher process: a changing planner-sized plan, heartbeats, snapshots."""
    stop, paused = [], []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGUSR1, lambda *_: paused.pop() if paused else paused.append(1))
    publisher = Publisher(zmq.Context.instance(), "planner@bench", Endpoint.parse(endpoint), send_hwm=hwm)
    plans = PlanSender(publisher)
    services = [Service(f"app-{i}", 10000 + i, source="marathon",
                        servers=tuple(Server(f"10.{i // 250}.{i % 250}.{k + 1}", 31000 + k) for k in range(3)))
                for i in range(count)]
    change, next_change = 0, time.monotonic()
    while not stop:
        now = time.monotonic()
        if paused:
            next_change = now
        elif now >= next_change:
            index = change % count
            service = services[index]
            servers = list(service.servers)
            servers[0] = Server(servers[0].ip, 31000 + (change % 1000) + 3)
            services[index] = service.with_servers(servers)
            plans.publish(plan_of(services))
            # No catching up on a schedule missed (a busy machine): the rate is an upper bound.
            change, next_change = change + 1, max(next_change + 1 / rate, now)
        publisher.heartbeat({"stage": "bench"})
        publisher.serve_snapshots()
        time.sleep(min(0.01, max(0.0, next_change - time.monotonic())))
    publisher.close()


class Healthy:
    """The rest of the pipeline: a subscriber that keeps up, counting the plans it gets."""

    def __init__(self, endpoint: str):
        self.subscriber = Subscriber(zmq.Context.instance(), [Endpoint.parse(endpoint)], ["plan"])
        self.plans, self.last_seq, self.size = 0, 0, 0

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for message in self.subscriber.poll(min(0.1, max(0.0, deadline - time.monotonic()))):
                if message.topic == "plan":
                    self.plans += 1
                    self.last_seq = max(self.last_seq, message.seq)
                    self.size = self.size or len(json.dumps(message.payload))


def tap_seq(path: str) -> int:
    with open(path, errors="replace") as handle:
        return max((int(m.group(1)) for m in SEQ.finditer(handle.read())), default=0)


def run(args: argparse.Namespace) -> dict:
    work = tempfile.mkdtemp(prefix="pmbus")
    endpoint = f"ipc://{work}/planner.pub"
    publisher = subprocess.Popen([sys.executable, "-m", "bench.bus_memory_bench", "--publish", endpoint,
                                  "--services", str(args.services), "--rate", str(args.rate), "--hwm", str(args.hwm)],
                                 cwd=REPO, start_new_session=True)
    tap_out = os.path.join(work, "tap.out")
    with open(tap_out, "wb") as output:
        tap = subprocess.Popen([sys.executable, "-m", "services.cli", "tap", "--run-dir", work, "--bus", endpoint,
                                "--topic", "plan", "--no-heartbeats"], cwd=REPO, stdout=output,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    healthy = Healthy(endpoint)
    try:
        deadline = time.monotonic() + 60
        while tap_seq(tap_out) == 0 or healthy.plans == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("publisher, tap or subscriber did not start")
            healthy.pump(0.2)
        samples = {"before": [], "during": [], "after": []}
        for _ in range(int(args.settle)):
            healthy.pump(1.0)
            samples["before"].append(rss_mb(publisher.pid))
        os.kill(tap.pid, signal.SIGSTOP)
        plans_before_stop = healthy.plans
        for second in range(int(args.stop)):
            if second == int(args.stop) - 2:
                os.kill(publisher.pid, signal.SIGUSR1)  # pause the changes
            healthy.pump(1.0)
            samples["during"].append(rss_mb(publisher.pid))
        plans_during_stop = healthy.plans - plans_before_stop
        newest_at_sigcont = healthy.last_seq
        os.kill(tap.pid, signal.SIGCONT)
        continued = time.monotonic()
        catch_up = None
        while time.monotonic() - continued < max(30.0, args.settle):
            healthy.pump(0.1)
            if catch_up is None and tap_seq(tap_out) >= newest_at_sigcont:
                catch_up = time.monotonic() - continued
                os.kill(publisher.pid, signal.SIGUSR1)  # resume the changes
            if catch_up is not None and time.monotonic() - continued >= args.settle:
                break
        for _ in range(int(args.settle)):
            healthy.pump(1.0)
            samples["after"].append(rss_mb(publisher.pid))
        return {
            "services": args.services, "rate_per_s": args.rate, "send_hwm": args.hwm, "stop_s": args.stop,
            "message_kb": round(healthy.size / 1024), "publisher_rss_mb": {
                "before": round(max(samples["before"]), 1), "during_max": round(max(samples["during"]), 1),
                "during_end": round(samples["during"][-1], 1), "after": round(samples["after"][-1], 1)},
            "plans_to_healthy_subscriber_while_stopped": plans_during_stop,
            "newest_seq_at_sigcont": newest_at_sigcont,
            "tap_caught_up_s": None if catch_up is None else round(catch_up, 2),
            "tap_alive": tap.poll() is None,
        }
    finally:
        healthy.subscriber.close()
        for process in (tap, publisher):
            try:
                os.killpg(process.pid, signal.SIGCONT)
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--stop", type=float, default=60, help="seconds the tap stays stopped")
    parser.add_argument("--rate", type=float, default=10, help="plan changes per second")
    parser.add_argument("--settle", type=float, default=10, help="seconds measured before and after the stop")
    parser.add_argument("--hwm", type=int, default=QUEUE_HWM, help="the publisher's send high-water mark")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--publish", metavar="ENDPOINT", help=argparse.SUPPRESS)  # the publisher process
    args = parser.parse_args()
    if args.publish:
        publish_forever(args.publish, args.services, args.rate, args.hwm)
        return
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
