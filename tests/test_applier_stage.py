"""The applier stage: plans in from a (fake) planner on the bus, results out, traffic through."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time

import pytest
import zmq

from services.applier import main as applier
from services.applier.driver import DriverResult, ProxyDriver
from services.applier.drivers import DriverSet
from services.applier.haproxy_driver import HaproxyDriver
from services.common.bus import SNAPSHOT_TIMEOUT, Publisher, Subscriber
from services.common.config import Settings
from services.common.latency import LatencyHistogram
from services.common.model import ApplyResult, Plan, ProxySettings, Service
from services.common.wire import PlanSender
from tests.helpers import RecordingDriver, TcpBackend, free_port, tcp_ask, wait_until
from tests.test_haproxy_driver import HaproxyProcess, pytestmark  # noqa: F401  (skip without haproxy)


class Stage:
    """main.run in a thread, a fake planner publishing plans, a subscriber collecting results."""

    def __init__(self, settings: Settings, drivers=None, heartbeat_interval: float = 1.0):
        self.settings = settings
        self.ctx = zmq.Context.instance()
        self.planner = Publisher(self.ctx, "planner@test", settings.bus("planner"), heartbeat_interval=0.2)
        self.plans = PlanSender(self.planner)  # one per publisher: a service gone is a tombstone
        self.results = Subscriber(self.ctx, [settings.bus("applier")], ["applied."])
        self.received: list[tuple[str, ApplyResult]] = []
        self.beats: list[dict] = []  # the applier's heartbeat payloads, oldest first
        self.stop = threading.Event()
        self.thread = threading.Thread(target=applier.run, args=(settings, self.stop),
                                       kwargs={"drivers": drivers, "heartbeat_interval": heartbeat_interval},
                                       daemon=True)
        self.thread.start()

    def publish(self, plan: Plan) -> None:
        self.plans.publish(plan)

    def result_for(self, plan: Plan, ok: bool = True, timeout: float = 15.0) -> ApplyResult:
        def poll():
            self.planner.heartbeat()
            self.planner.serve_snapshots()
            self._collect()
            for _topic, result in reversed(self.received):
                if result.plan_hash == plan.hash and result.ok == ok:
                    return result
            return None
        return wait_until(poll, timeout=timeout, message=f"applied result for plan {plan.hash} (ok={ok})")

    def _collect(self) -> None:
        for message in self.results.poll(0.05):
            if message.is_heartbeat:
                self.beats.append(message.payload)
            else:
                self.received.append((message.topic, ApplyResult.from_dict(message.payload)))

    def heartbeat(self, predicate, timeout: float = 15.0) -> dict:
        """The first heartbeat payload from now on that satisfies `predicate`."""
        self.beats.clear()

        def poll():
            self.planner.heartbeat()
            self.planner.serve_snapshots()
            self._collect()
            return next((beat for beat in self.beats if predicate(beat)), None)
        return wait_until(poll, timeout=timeout, message="a heartbeat")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        self.results.close()
        self.planner.close()


def make_plan(port: int, *backends: TcpBackend) -> Plan:
    svc = Service.from_dict({"name": "web", "port": port, "servers": [
        {"ip": "127.0.0.1", "port": b.port, "weight": 10} for b in backends]})
    return Plan((svc,), ProxySettings(max_connections=200))


def test_plan_is_applied_and_result_published(backends):
    haproxy = HaproxyProcess(node_name="n1").start()
    # as the stage makes it (drivers.make_driver): files written after the result is published
    stage = Stage(haproxy.settings, drivers=[HaproxyDriver(haproxy.settings, defer_writes=True)])
    try:
        port = free_port()
        first = make_plan(port, backends[0])
        stage.publish(first)
        result = stage.result_for(first)
        assert result.action == "reload" and result.details["haproxy"]["action"] == "reload"
        assert all(topic == "applied.n1" for topic, _ in stage.received)
        assert tcp_ask(port) == "a"

        second = make_plan(port, backends[1])
        stage.publish(second)
        assert stage.result_for(second).action == "runtime"
        assert tcp_ask(port) == "b"
        # the deferred write follows at once: the file on disk is what HAProxy runs
        wait_until(lambda: f"127.0.0.1:{backends[1].port} " in open(haproxy.paths.config).read(),
                   message="config file rewritten after the runtime change")
        # The heartbeat counts both applies and the one reload.
        beat = stage.heartbeat(lambda b: b["applies"].get("haproxy", {}).get("runtime"))
        assert beat["applies"] == {"haproxy": {"reload": 1, "runtime": 1}} and beat["haproxy_reloads"] == 1
    finally:
        stage.close()
        haproxy.cleanup()


def test_waits_for_haproxy_and_retries_until_it_is_up(backends):
    haproxy = HaproxyProcess(node_name="n1")  # not started yet
    stage = Stage(haproxy.settings, drivers=[HaproxyDriver(haproxy.settings)])
    try:
        plan = make_plan(free_port(), backends[0])
        stage.publish(plan)
        failed = stage.result_for(plan, ok=False)
        assert "not reachable" in failed.errors[0] and failed.errors[0].startswith("haproxy: ")
        assert stage.thread.is_alive()
        haproxy.start()
        assert stage.result_for(plan).ok
        assert tcp_ask(plan.services[0].port) == "a"
    finally:
        stage.close()
        haproxy.cleanup()


class SlowDriver(ProxyDriver):
    """Blocks on its first plan until released, and records what it was asked to apply."""

    name = "slow"

    def __init__(self):
        self.applied: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def apply(self, plan: Plan) -> DriverResult:
        self.applied.append(plan.hash)
        self.entered.set()
        self.release.wait(10)
        return DriverResult(self.name, True, "runtime")


class BrokenDriver(ProxyDriver):
    name = "broken"

    def apply(self, plan: Plan) -> DriverResult:
        raise RuntimeError("driver bug")


def test_queued_plans_are_coalesced_and_a_driver_bug_is_reported():
    settings = Settings(run_dir=tempfile.mkdtemp(prefix="pm"), node_name="n2")
    slow = SlowDriver()
    stage = Stage(settings, drivers=[slow, BrokenDriver()])
    observer = Subscriber(stage.ctx, [settings.bus("planner")], ["plan"])
    try:
        plans = [make_plan(1000 + i) for i in range(5)]
        stage.publish(plans[0])
        wait_until(lambda: (stage.planner.serve_snapshots(), slow.entered.is_set())[1],
                   message="first plan being applied")
        for plan in plans[1:]:
            stage.publish(plan)
        # The plans are on their way to the stage too once a second subscriber has the last one.
        wait_until(lambda: (stage.planner.serve_snapshots(),
                            any(m.payload.get("hash") == plans[-1].hash for m in observer.poll(0.05)))[1],
                   message="queued plans delivered")
        slow.release.set()
        last = stage.result_for(plans[-1], ok=False)
        assert slow.applied[0] == plans[0].hash and slow.applied[-1] == plans[-1].hash
        assert len(slow.applied) < len(plans)  # the plans queued meanwhile were skipped
        assert last.details["slow"]["ok"] and not last.details["broken"]["ok"]
        assert "broken: RuntimeError: driver bug" in last.errors
    finally:
        observer.close()
        stage.close()
        shutil.rmtree(settings.run_dir, ignore_errors=True)


def test_the_node_options_pick_the_drivers_until_the_first_plan():
    def names(**options):
        return [d.name for d in DriverSet(Settings(run_dir="/tmp/pm-unused", **options)).drivers]

    assert names() == ["haproxy", "pen"]
    assert names(haproxy=False) == ["pen"]
    assert names(vhost_domain="apps.test") == ["haproxy", "pen", "nginx"]


def test_heartbeats_go_on_while_a_driver_blocks():
    settings = Settings(run_dir=tempfile.mkdtemp(prefix="pm"), node_name="n3")
    slow = SlowDriver()
    stage = Stage(settings, drivers=[slow], heartbeat_interval=0.05)
    try:
        plan = make_plan(1000)
        stage.publish(plan)
        wait_until(lambda: (stage.planner.serve_snapshots(), slow.entered.is_set())[1], message="plan being applied")
        beats = []

        def heartbeats() -> bool:
            beats.extend(m for m in stage.results.poll(0.05) if m.is_heartbeat)
            return len(beats) >= 10

        # Many heartbeat intervals pass inside one apply; the status stage sees a live applier.
        wait_until(heartbeats, message="heartbeats during the apply")
        assert not slow.release.is_set() and stage.results.alive("applier@n3")
        assert beats[-1].payload["stage"] == "applier" and beats[-1].payload["dropped"] == 0
        # ... and how long the apply has been running, so a driver stuck for good is visible
        assert beats[-1].payload["busy_seconds"] > beats[0].payload["busy_seconds"] >= 0
        slow.release.set()
        assert stage.result_for(plan).ok
    finally:
        slow.release.set()
        stage.close()
        shutil.rmtree(settings.run_dir, ignore_errors=True)


def sourced_plan(ready: tuple[str, ...], **ports: int) -> Plan:
    services = tuple(Service.from_dict({"name": source, "port": port, "source": source,
                                        "servers": [{"ip": "10.0.0.1", "port": 80}]})
                     for source, port in sorted(ports.items(), key=lambda item: item[1]))
    return Plan(services, ProxySettings(), sources_ready=ready)


@pytest.fixture
def recording_stage():
    """An applier stage whose only driver records the plans it applies: (stage, driver)."""
    settings = Settings(run_dir=tempfile.mkdtemp(prefix="pm"), node_name="n4")
    driver = RecordingDriver()
    stage = Stage(settings, drivers=[driver])
    yield stage, driver
    stage.close()
    shutil.rmtree(settings.run_dir, ignore_errors=True)


def test_a_plan_lacking_a_source_is_held_until_that_source_reports(recording_stage):
    stage, driver = recording_stage
    full = sourced_plan(("file", "marathon"), file=3001, marathon=3000)
    stage.publish(full)
    stage.result_for(full)
    partial = sourced_plan(("file",), file=3002)
    stage.publish(partial)
    held = stage.result_for(partial, ok=False)
    assert held.action == "held" and held.details["held"]["missing_sources"] == ["marathon"]
    assert held.details["held"]["serving"] == full.hash and "lacks source(s) marathon" in held.details["held"]["note"]
    assert driver.applied == [full.hash]
    # Marathon reports again, with its services gone: really gone, applied.
    gone = sourced_plan(("file", "marathon"), file=3002)
    stage.publish(gone)
    assert stage.result_for(gone).action == "runtime"
    assert driver.applied == [full.hash, gone.hash]


def test_the_served_plan_coming_back_after_a_hold_is_published_again(recording_stage):
    """A hold ends with the very plan being served (the source is back with the same services):
    nothing to apply, but `applied.<node>` must no longer say `held`."""
    stage, driver = recording_stage
    full = sourced_plan(("file", "marathon"), file=3001, marathon=3000)
    stage.publish(full)
    stage.result_for(full)
    partial = sourced_plan(("file",), file=3001)
    stage.publish(partial)
    stage.result_for(partial, ok=False)
    stage.received.clear()
    stage.publish(full)
    again = stage.result_for(full)
    assert again.ok and again.action != "held"
    assert driver.applied == [full.hash]  # nothing re-applied
    assert stage.received[-1][1].plan_hash == full.hash


def test_missing_sources_compares_with_the_served_plan():
    from services.applier.completeness import missing_sources
    full = sourced_plan(("file", "marathon", "registrator"), file=1)
    assert missing_sources(None, sourced_plan(())) == ()
    assert missing_sources(full, sourced_plan(("file",))) == ("marathon", "registrator")
    assert missing_sources(full, sourced_plan(("file", "marathon", "registrator"))) == ()
    assert missing_sources(sourced_plan(("file",)), full) == ()
    assert applier.result_payload(applier.held_result(sourced_plan(("file",)), full, ("marathon",)))["notes"]


def test_heartbeat_counts_applies_and_change_to_applied_latency(recording_stage, caplog):
    stage, driver = recording_stage
    caplog.set_level(logging.INFO, logger="proxymatic.applier")
    base = sourced_plan(("file", "marathon"), file=3001, marathon=3000)
    first = Plan(base.services, base.settings, sources_ready=base.sources_ready, changed_at=time.time() - 0.5)
    stage.publish(first)
    stage.result_for(first)
    beat = stage.heartbeat(lambda b: b["applies"])
    assert beat["applies"] == {"recording": {"runtime": 1}} and beat["haproxy_reloads"] == 0
    latency = beat["change_to_applied"]
    assert latency["count"] == 1 and 0.5 <= latency["sum"] < 30
    assert LatencyHistogram.cumulative_buckets(latency)[0][-1] == ("+Inf", 1)
    # one line for the apply, with its fields for the JSON log
    record = next(r for r in caplog.records if getattr(r, "plan_hash", None) == first.hash)
    assert record.levelno == logging.INFO and record.actions == {"recording": "runtime"}
    assert 0.5 <= record.change_to_applied_seconds < 30 and "change to applied 0." in record.getMessage()

    # A held plan counts as held for every proxy; no latency (nothing was applied).
    partial = sourced_plan(("file",), file=3002)
    stage.publish(partial)
    stage.result_for(partial, ok=False)
    beat = stage.heartbeat(lambda b: b["applies"]["recording"].get("held"))
    assert beat["applies"] == {"recording": {"runtime": 1, "held": 1}} and beat["change_to_applied"]["count"] == 1

    # A plan without an origin time (changed_at 0) is applied and counted, not observed.
    unknown = sourced_plan(("file", "marathon"), file=3003)
    stage.publish(unknown)
    stage.result_for(unknown)
    beat = stage.heartbeat(lambda b: b["applies"]["recording"]["runtime"] == 2)
    assert beat["change_to_applied"]["count"] == 1
    record = next(r for r in caplog.records if getattr(r, "plan_hash", None) == unknown.hash)
    assert record.change_to_applied_seconds is None


def ports_plan(*ports: int) -> Plan:
    return Plan(tuple(Service.from_dict({"name": f"web{port}", "port": port, "servers": [{"ip": "10.0.0.1", "port": 80}]})
                      for port in ports), ProxySettings(), sources_ready=("file",))


def test_a_lost_key_message_makes_the_applier_resync_and_never_apply_a_partial_plan(recording_stage):
    """The summary of a plan arrives, one of its key messages does not: the applier's mirror
    disagrees with the summary's hash, so it applies nothing, asks for a snapshot and converges
    from it (no heartbeat here: the resync comes from the hash alone)."""
    stage, driver = recording_stage
    first = ports_plan(3001)
    stage.publish(first)
    stage.result_for(first)
    # No snapshot request of the applier's may still be on its way (one re-sent after
    # SNAPSHOT_TIMEOUT on a loaded machine): its answer would bring the lost key back before the
    # applier's own hash check, and this test is about that check.
    quiet_since = [time.monotonic()]

    def no_request_outstanding() -> bool:
        if stage.planner.serve_snapshots():
            quiet_since[0] = time.monotonic()
        stage._collect()
        return time.monotonic() - quiet_since[0] > SNAPSHOT_TIMEOUT + 0.5
    wait_until(no_request_outstanding, timeout=60, message="no snapshot request outstanding")
    served: list[int] = []

    def applied(plan: Plan):
        def poll():
            served.append(stage.planner.serve_snapshots())
            stage._collect()
            return any(r.plan_hash == plan.hash and r.ok for _t, r in stage.received)
        wait_until(poll, message=f"plan {plan.hash} applied")

    second = ports_plan(3001, 3002, 3003)
    real_send = stage.planner._send

    def lossy(frames: list[bytes]) -> None:  # the key 3002/tcp is lost on the way
        if frames[0] != b"plan:3002/tcp":
            real_send(frames)
    stage.planner._send = lossy
    try:
        stage.publish(second)
    finally:
        stage.planner._send = real_send
    served.clear()
    applied(second)
    assert sum(served) >= 1  # the plan came from a snapshot
    # Never the plan without 3002/tcp, nor anything else in between.
    assert driver.applied == [first.hash, second.hash]
    # at least one resync (under load a snapshot can cross a live summary and take a second round)
    assert stage.heartbeat(lambda b: b["plan"] == second.hash)["plan_resyncs"] >= 1

    # A summary whose hash matches no content at all (through a raw publisher): nothing applied,
    # and the next real plan is applied (the sender's tombstone for 3001/tcp included).
    bogus = {"schema": 2, "hash": "0" * 16, "services_hash": "1" * 16,
             "count": 9, "settings": ProxySettings().to_dict(), "inputs": {}, "sources_ready": ["file"],
             "notes": [], "changed_at": 0.0, "excluded": []}
    stage.planner.publish("plan", bogus)
    wait_until(lambda: (stage.planner.serve_snapshots(), stage._collect(),
                        stage.beats and stage.beats[-1]["plan_resyncs"] >= 2)[2], message="a second resync")
    third = ports_plan(3002, 3003)
    stage.publish(third)
    applied(third)
    assert driver.applied == [first.hash, second.hash, third.hash]


def test_the_plans_settings_pick_the_drivers(backends):
    """A node started with HAProxy off (`--no-haproxy`) under a planner whose plan has HAProxy:
    the plan wins, HAProxy's driver starts and serves TCP, a warning names both; a plan without
    HAProxy then hands TCP to Pen (HAProxy releases the port first)."""
    import signal

    from tests.test_pen_live import start_runner

    haproxy = HaproxyProcess(node_name="n5", haproxy=False).start()
    runner = start_runner(haproxy.settings.run_dir)
    stage = Stage(haproxy.settings)  # the drivers as the stage makes them (drivers.DriverSet)
    try:
        port = free_port()
        with_haproxy = make_plan(port, backends[0])
        assert with_haproxy.settings.haproxy
        stage.publish(with_haproxy)
        result = stage.result_for(with_haproxy)
        assert result.details["haproxy"]["action"] == "reload"
        assert "the plan wins" in result.details["drivers"]["note"]
        assert result.details["drivers"]["running"] == ["haproxy", "pen"]
        assert tcp_ask(port) == "a"
        beat = stage.heartbeat(lambda b: b.get("drivers") == ["haproxy", "pen"])
        assert "haproxy=True" in beat["drivers_note"]

        without = Plan(with_haproxy.services, ProxySettings(max_connections=200, haproxy=False, pen_servers=4,
                                                            pen_clients=64))
        stage.publish(without)
        result = stage.result_for(without)
        assert result.details["haproxy"]["action"] == "reload"  # applied once more: no service left
        assert "drivers" not in result.details  # the node's options agree with this plan
        wait_until(lambda: _answers(port) == "a", timeout=15, message="TCP served by Pen")
        assert os.path.exists(os.path.join(haproxy.settings.run_dir, "pen", f"{port}-tcp.cfg"))
        beat = stage.heartbeat(lambda b: b.get("drivers") == ["pen"])
        assert beat["drivers_note"] == ""
    finally:
        stage.close()
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=10)
        haproxy.cleanup()


def _answers(port: int) -> str | None:
    try:
        return tcp_ask(port)
    except OSError:
        return None
