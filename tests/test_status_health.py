"""/status as the data plane's health: probe bookkeeping, the verdict, and the prober against
real unix sockets that stop answering."""
from __future__ import annotations

import socket
import threading

import pytest

from services.applier.haproxy_render import HaproxyPaths
from services.applier.pen_runner import PenFiles
from services.common.bus import Message
from services.common.config import Settings
from services.common.model import ApplyResult
from services.status.health import CONFIRM_AFTER, STALE_AFTER, Prober, ProbeStatus, first_status, merge
from services.status.main import absorb
from services.status.probes import NotAnswering, ProbeTargets, haproxy_probe, pen_keys, pen_probe, tcp_probe
from services.status.state import INITIALIZING, OK, TERMINATING, PipelineState, StageLiveness
from tests.helpers import FakeUnixServer, wait_until


def converged_state() -> PipelineState:
    state = PipelineState(configured_sources=("file",), plan_hash="p1", plan_sources_ready=("file",))
    state.applied["n1"] = ApplyResult("p1", True, "reload")
    return state


def test_a_failure_counts_once_confirmed_and_recovery_is_immediate():
    status = first_status(False, "refused", started=100.0)
    assert status.problem(100.0 + CONFIRM_AFTER / 2) is None  # a reload blip is not an outage
    assert status.problem(100.0 + CONFIRM_AFTER) == "refused"
    status = status.after(False, "timed out", started=101.0)
    assert status.failing_since == 100.0 and status.problem(101.0 + CONFIRM_AFTER / 2) == "timed out"
    status = status.after(True, "", started=102.0)
    assert status.problem(102.5) is None and status.failing_since is None


def test_an_unprobed_proxy_goes_stale():
    status = first_status(True, "", started=10.0)
    assert status.problem(10.0 + STALE_AFTER - 0.1) is None
    assert "not probed" in status.problem(10.0 + STALE_AFTER + 1)


def test_merge_drops_proxies_no_longer_probed():
    previous = {"pen 1-udp": first_status(False, "x", 1.0), "haproxy": first_status(True, "", 1.0)}
    merged = merge(previous, {"haproxy": "gone"}, 2.0)
    assert set(merged) == {"haproxy"} and merged["haproxy"].failing_since == 2.0


def test_verdict_names_the_proxy_that_stopped_answering():
    state = converged_state()
    state.proxies = {"haproxy": ProbeStatus(True, "", checked_at=50.0)}
    assert state.verdict("n1", False, now=50.5) == OK
    state.proxies = {"haproxy": ProbeStatus(False, "connection refused", checked_at=52.0, failing_since=50.0),
                     "pen 9000-udp": ProbeStatus(True, "", checked_at=52.0)}
    verdict = state.verdict("n1", False, now=52.5)
    assert verdict == "UNAVAILABLE: haproxy not answering: connection refused"
    assert state.details("n1", False, now=52.5)["proxies"]["haproxy"]["ok"] is False
    state.proxies["haproxy"] = ProbeStatus(True, "", checked_at=53.0)
    assert state.verdict("n1", False, now=53.2) == OK  # not latched any more
    assert state.verdict("n1", True, now=53.2) == TERMINATING


def test_a_down_proxy_before_initialization_still_says_initializing():
    state = PipelineState(configured_sources=("file",))
    state.proxies = {"haproxy": ProbeStatus(False, "refused", checked_at=5.0, failing_since=1.0)}
    assert state.verdict("n1", False, now=5.0) == INITIALIZING


def test_set_aside_services_and_dead_stages_show_but_never_fail_status():
    state = PipelineState(configured_sources=("file",), plan_hash="p1", plan_sources_ready=("file",))
    state.applied["n1"] = ApplyResult(
        "p1", True, "reload", errors=("haproxy: 8080/tcp: port in use",),
        details={"haproxy": {"ok": True, "set_aside": {"8080/tcp": "port 8080 in use"}},
                 "pen": {"ok": True, "instances": ["53-udp"], "set_aside": {}}})
    state.stages = {"planner@n1": StageLiveness(False, 12.5, 4242)}
    assert state.verdict("n1", False) == OK
    details = state.details("n1", False)
    assert details["set_aside"] == {"haproxy": {"8080/tcp": "port 8080 in use"}}
    assert details["stages"]["planner@n1"] == {"alive": False, "seconds_since_heard": 12.5, "pid": 4242}


def test_pen_probes_follow_the_applied_plan_minus_set_aside():
    result = ApplyResult("p", True, "reload", details={
        "pen": {"instances": ["53-udp", "54-udp"], "set_aside": {"54/udp": "port in use"}}})
    assert pen_keys(result) == ["53-udp"]
    assert pen_keys(None) == []
    settings = Settings(run_dir="/tmp/x", haproxy=True, vhost_domain="example.com", vhost_port=8088)
    assert set(ProbeTargets(settings).probes(result)) == {"haproxy", "pen 53-udp", "nginx"}
    assert set(ProbeTargets(Settings(run_dir="/tmp/x", haproxy=False)).probes(None)) == set()
    # Once the applier says which drivers run (the plan decides them), those are probed.
    planned = ApplyResult("p", True, "reload", details={**result.details, "drivers": {"running": ["haproxy", "pen"]}})
    assert set(ProbeTargets(Settings(run_dir="/tmp/x", haproxy=False)).probes(planned)) == {"haproxy", "pen 53-udp"}
    assert set(ProbeTargets(settings).probes(ApplyResult("p", True, "none", details={"drivers": {"running": ["pen"]}}))) \
        == set()


def test_prober_reports_a_pen_that_stops_answering_and_recovers(tmp_path):
    files = PenFiles(str(tmp_path))
    pen = FakeUnixServer(files.control("53-udp"), "1234\n")
    state = converged_state()
    published: list[dict] = []

    def publish(statuses: dict) -> None:
        with state.lock:
            state.proxies = dict(statuses)
        published.append(statuses)

    prober = Prober(lambda applied: {"pen 53-udp": pen_probe(files, "53-udp", 0.3)}, lambda: None, publish,
                    interval=0.1, timeout=0.3)
    stop = threading.Event()
    thread = threading.Thread(target=prober.run, args=(stop,))
    thread.start()
    try:
        wait_until(lambda: state.verdict("n1", False) == OK and published, message="pen answering")
        pen.hung.set()  # accepts, never answers: the bounded timeout turns it into a failure
        verdict = wait_until(lambda: (v := state.verdict("n1", False)) != OK and v, timeout=10, message="hung pen")
        assert verdict.startswith("UNAVAILABLE: pen 53-udp not answering:") and "timed out" in verdict
        pen.hung.clear()
        wait_until(lambda: state.verdict("n1", False) == OK, timeout=10, message="pen recovered")
        pen.close()  # gone: connection refused / no such file
        verdict = wait_until(lambda: (v := state.verdict("n1", False)) != OK and v, timeout=10, message="dead pen")
        assert verdict.startswith("UNAVAILABLE: pen 53-udp not answering:")
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_bus_messages_feed_the_state_and_odd_ones_raise_for_the_caller_to_skip():
    state, pids = PipelineState(configured_sources=("file",)), {}
    absorb(state, pids, Message("heartbeat.applier@n1", 3, 0.0, "applier@n1", "e", {"pid": 77, "stage": "applier"}))
    absorb(state, pids, Message("applied.n1", 4, 0.0, "applier@n1", "e", {"plan_hash": "p1", "ok": True}))
    assert pids == {"applier@n1": 77} and state.applied["n1"].plan_hash == "p1"
    with pytest.raises(ValueError):
        absorb(state, pids, Message("applied.n1", 5, 0.0, "applier@n1", "e", ["not", "a", "dict"]))
    assert state.applied["n1"].plan_hash == "p1"


def test_haproxy_probe_wants_a_master_with_a_worker(tmp_path):
    paths = HaproxyPaths(str(tmp_path))
    probe = haproxy_probe(paths, timeout=0.5)
    with pytest.raises(NotAnswering, match="No such file.*admin socket: .*No such file"):
        probe()  # no socket at all
    master = FakeUnixServer(paths.master_socket, "#<PID> <type> <reloads>\n10 master 0 0d 2.6\n# workers\n11 worker 0 0d 2.6\n")
    try:
        probe()
    finally:
        master.close()  # removes the socket file too
    master = FakeUnixServer(paths.master_socket, "#<PID> <type> <reloads>\n10 master 0 0d 2.6\n# workers\n")
    try:
        with pytest.raises(NotAnswering, match="no worker"):
            probe()
    finally:
        master.close()
    # The master re-executing (its CLI socket gone) while the worker answers on the admin socket.
    worker = FakeUnixServer(paths.admin_socket, "Name: HAProxy\nVersion: 2.6\nPid: 11\n")
    try:
        probe()
    finally:
        worker.close()


def test_tcp_probe_needs_a_listener():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    tcp_probe(port, 0.5)()
    listener.close()
    with pytest.raises(OSError):
        tcp_probe(port, 0.5)()
