"""Real Pen processes under the real runner: UDP and TCP traffic while backends move."""
from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile

import pytest

from services.applier.pen_control import PenControl
from services.applier.pen_driver import PenDriver
from services.applier.pen_runner import read_instances
from services.common.config import Settings
from services.common.model import Plan, ProxySettings, Service
from tests.helpers import TcpBackend, UdpEcho, free_port, tcp_ask, udp_ask, wait_until

pytestmark = pytest.mark.skipif(shutil.which("pen") is None, reason="pen is not installed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plan(port, servers, protocol="udp", haproxy=True, pen_servers=4):
    svc = Service.from_dict({"name": "echo", "port": port, "protocol": protocol,
                             "servers": [{"ip": "127.0.0.1", "port": p, "weight": 10} for p in servers]})
    return Plan((svc,), ProxySettings(haproxy=haproxy, pen_servers=pen_servers, pen_clients=64,
                                      max_connections=64))


@pytest.fixture
def run_dir():
    # unix socket paths are limited to 107 bytes: keep it short
    path = tempfile.mkdtemp(prefix="pm", dir="/tmp")  # private (0700), like a real run dir
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_runner(run_dir, stderr=None) -> subprocess.Popen:
    code = ("import sys, logging; logging.basicConfig(level=logging.INFO);"
            "from services.common.config import Settings; from services.applier import pen_runner;"
            "sys.exit(pen_runner.main(Settings(run_dir=sys.argv[1])))")
    proc = subprocess.Popen([sys.executable, "-c", code, run_dir], cwd=ROOT, stderr=stderr)
    pid_file = os.path.join(run_dir, "pen", "runner.pid")
    wait_until(lambda: open(pid_file).read().split()[0] == str(proc.pid), message="runner up")
    return proc


@pytest.fixture
def runner(run_dir):
    proc = start_runner(run_dir)
    yield proc
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


def pen_pid(run_dir, key):
    return PenControl(os.path.join(run_dir, "pen", f"{key}.ctl")).pid()


def process_user(pid: int) -> str:
    with open(f"/proc/{pid}/status") as status:
        uid = next(int(line.split()[1]) for line in status if line.startswith("Uid:"))
    return pwd.getpwuid(uid).pw_name


def test_udp_backends_move_without_restarting_pen(run_dir, runner):
    a, b, c = UdpEcho("A"), UdpEcho("B"), UdpEcho("C")
    port = free_port(socket.SOCK_DGRAM)
    key = f"{port}-udp"
    driver = PenDriver(Settings(run_dir=run_dir))
    try:
        first = driver.apply(plan(port, [a.port]))
        assert first.ok and first.action == "reload", first
        assert first.details["started"] == [key]
        assert udp_ask(port) == "A"
        pid = pen_pid(run_dir, key)
        if os.geteuid() == 0:  # pens never run as root, UDP ones included
            assert process_user(pid) == "nobody"
            # its files are private: the .cfg it reads is readable by its group only, the pid file
            # and status page are its own (the status page is read back for the flows closed below)
            pen_dir, nobody = os.path.join(run_dir, "pen"), pwd.getpwnam("nobody")
            modes = {suffix: os.stat(os.path.join(pen_dir, f"{key}.{suffix}")) for suffix in ("cfg", "pid", "html")}
            assert (stat.S_IMODE(modes["cfg"].st_mode), modes["cfg"].st_uid, modes["cfg"].st_gid) == \
                (0o640, 0, nobody.pw_gid)
            for suffix in ("pid", "html"):
                assert (stat.S_IMODE(modes[suffix].st_mode), modes[suffix].st_uid) == (0o600, nobody.pw_uid)
        sticky = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # one flow that lives across the move
        assert udp_ask(port, sticky) == "A"

        moved = driver.apply(plan(port, [b.port, c.port]))
        assert moved.ok and moved.action == "runtime", moved
        assert pen_pid(run_dir, key) == pid
        answers = {udp_ask(port) for _ in range(10)} | {udp_ask(port, sticky) for _ in range(3)}
        assert answers <= {"B", "C"} and answers, answers
        assert driver.apply(plan(port, [b.port, c.port])).action == "none"

        # a restarted applier adopts the running pen: nothing to do, same process
        again = PenDriver(Settings(run_dir=run_dir)).apply(plan(port, [b.port, c.port]))
        assert again.ok and again.action == "none", again
        assert pen_pid(run_dir, key) == pid

        # a pen that dies comes back with the current membership
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: pen_pid(run_dir, key) != pid, message="pen restarted")
        assert udp_ask(port) in {"B", "C"}

        # the service goes away: its pen stops
        gone = driver.apply(Plan((), ProxySettings()))
        assert gone.ok and gone.details["stopped"] == [key]
        wait_until(lambda: not os.path.exists(os.path.join(run_dir, "pen", f"{key}.ctl")), message="pen stopped")
        sticky.close()
    finally:
        for backend in (a, b, c):
            backend.close()


def test_tcp_through_pen_without_haproxy_and_slot_limit(run_dir, runner):
    one, two, three = TcpBackend("one"), TcpBackend("two"), TcpBackend("three")
    port = free_port()
    driver = PenDriver(Settings(run_dir=run_dir))
    try:
        assert driver.apply(plan(port, [one.port], protocol="tcp")).action == "none"  # HAProxy's job
        result = driver.apply(plan(port, [one.port], protocol="tcp", haproxy=False))
        assert result.ok and result.action == "reload", result
        assert tcp_ask(port) == "one"
        if os.geteuid() == 0:  # pens never run as root
            assert process_user(pen_pid(run_dir, f"{port}-tcp")) == "nobody"

        moved = driver.apply(plan(port, [two.port], protocol="tcp", haproxy=False))
        assert moved.action == "runtime"
        assert tcp_ask(port) == "two"

        # three servers, one slot: the first in plan order (lowest port) is used, the rest reported
        ports = sorted([one.port, two.port, three.port])
        names = {one.port: "one", two.port: "two", three.port: "three"}
        limited = driver.apply(plan(port, ports, protocol="tcp", haproxy=False, pen_servers=1))
        assert limited.ok and limited.action == "reload" and len(limited.details["warnings"]) == 1, limited
        assert {tcp_ask(port) for _ in range(4)} == {names[ports[0]]}
    finally:
        for backend in (one, two, three):
            backend.close()


def test_a_restarted_runner_adopts_running_pens(run_dir):
    backend = UdpEcho("A")
    port = free_port(socket.SOCK_DGRAM)
    key = f"{port}-udp"
    first = start_runner(run_dir)
    second = None
    try:
        assert PenDriver(Settings(run_dir=run_dir)).apply(plan(port, [backend.port])).ok
        pid = pen_pid(run_dir, key)
        first.kill()  # no cleanup: the pen outlives it
        first.wait()
        second = start_runner(run_dir)
        assert pen_pid(run_dir, key) == pid and udp_ask(port) == "A"
        second.send_signal(signal.SIGTERM)  # stopping the runner stops the pens it adopted too
        second.wait(timeout=10)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), message="adopted pen stopped")
    finally:
        for proc in (first, second):
            if proc and proc.poll() is None:
                proc.kill()
                proc.wait()
        backend.close()


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "Z"


def service(name, port, protocol, backend_ports):
    return Service.from_dict({"name": name, "port": port, "protocol": protocol,
                              "servers": [{"ip": "127.0.0.1", "port": p, "weight": 10} for p in backend_ports]})


def test_ports_held_by_other_programs_set_aside_only_their_services(run_dir, runner, caplog):
    dns, echo, db = UdpEcho("dns"), UdpEcho("echo"), TcpBackend("db")
    udp_squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_squatter.bind(("127.0.0.1", 0))
    tcp_squatter = socket.socket()
    tcp_squatter.bind(("127.0.0.1", 0))
    tcp_squatter.listen(1)
    held_udp, held_tcp = udp_squatter.getsockname()[1], tcp_squatter.getsockname()[1]
    free = free_port(socket.SOCK_DGRAM)
    services = Plan((service("dns", held_udp, "udp", [dns.port]), service("echo", free, "udp", [echo.port]),
                     service("db", held_tcp, "tcp", [db.port])),
                    ProxySettings(haproxy=False, pen_servers=4, pen_clients=64, max_connections=64))
    driver = PenDriver(Settings(run_dir=run_dir))
    caplog.set_level(logging.INFO, logger="proxymatic.applier.pen")
    try:
        first = driver.apply(services)
        assert first.ok and first.details["instances"] == [f"{free}-udp"], first
        assert sorted(first.set_aside) == sorted([f"{held_udp}/udp", f"{held_tcp}/tcp"])
        reason = first.set_aside[f"{held_udp}/udp"]
        assert reason == f"service dns ({held_udp}/udp): port {held_udp} cannot be bound: " \
                         "[Errno 98] Address already in use", reason
        assert "service db" in first.set_aside[f"{held_tcp}/tcp"]
        assert udp_ask(free) == "echo"
        served = pen_pid(run_dir, f"{free}-udp")

        # the applier's retries while the ports stay taken: nothing happens, no new warning
        for _ in range(3):
            again = driver.apply(services)
            assert again.ok and again.action == "none" and again.set_aside == first.set_aside, again
        warned = [r for r in caplog.records if "set aside" in r.getMessage()]
        assert len(warned) == 2, [r.getMessage() for r in warned]  # one per service, at the first apply

        # a port freed: that service starts on the next retry, nothing else restarts
        udp_squatter.close()
        freed = driver.apply(services)
        assert freed.ok and freed.action == "reload" and freed.details["started"] == [f"{held_udp}-udp"], freed
        assert list(freed.set_aside) == [f"{held_tcp}/tcp"]
        assert udp_ask(held_udp) == "dns" and udp_ask(free) == "echo"
        tcp_squatter.close()
        assert driver.apply(services).set_aside == {}
        assert tcp_ask(held_tcp) == "db"
        assert pen_pid(run_dir, f"{free}-udp") == served
    finally:
        udp_squatter.close()
        tcp_squatter.close()
        for backend in (dns, echo, db):
            backend.close()


def test_a_port_taken_between_the_probe_and_the_start_is_set_aside_too(run_dir, runner, monkeypatch):
    from services.applier import pen_driver
    echo = UdpEcho("echo")
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    squatter.bind(("127.0.0.1", 0))
    held = squatter.getsockname()[1]
    real_probe = pen_driver.bind_error
    probes = []

    def free_at_first(host, port, protocol):
        probes.append(port)  # the probe before the start misses the squatter (it came just after)
        return None if probes.count(port) == 1 else real_probe(host, port, protocol)

    monkeypatch.setattr(pen_driver, "bind_error", free_at_first)
    driver = PenDriver(Settings(run_dir=run_dir), start_timeout=1.5)
    try:
        result = driver.apply(Plan((service("dns", held, "udp", [echo.port]),),
                                   ProxySettings(pen_servers=4, pen_clients=64, max_connections=64)))
        assert result.ok and result.details["instances"] == [] and result.details["started"] == [], result
        assert result.set_aside == {f"{held}/udp": f"service dns ({held}/udp): port {held} cannot be bound: "
                                                   "[Errno 98] Address already in use"}
        assert read_instances(os.path.join(run_dir, "pen", "instances.json")) == {}  # the runner stops trying
    finally:
        squatter.close()
        echo.close()


def runner_log(path: str, text: str) -> int:
    with open(path, encoding="utf-8", errors="replace") as log:
        return log.read().count(text)


def test_a_malformed_instance_file_or_a_failed_cleanup_keeps_the_pens_running(run_dir):
    one, two = UdpEcho("one"), UdpEcho("two")
    first, second = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    log_path = os.path.join(run_dir, "runner.log")
    with open(log_path, "w") as log:
        runner = start_runner(run_dir, stderr=log)
    instances = os.path.join(run_dir, "pen", "instances.json")
    settings = ProxySettings(pen_servers=4, pen_clients=64, max_connections=64)
    both = Plan((service("one", first, "udp", [one.port]), service("two", second, "udp", [two.port])), settings)
    driver = PenDriver(Settings(run_dir=run_dir))
    try:
        assert driver.apply(both).ok
        pids = {port: pen_pid(run_dir, f"{port}-udp") for port in (first, second)}
        good = open(instances).read()
        # entries the runner cannot use (KeyError, AttributeError, TypeError before): it keeps
        # every pen as it is and says why, once per reason
        for number, bad in enumerate(['{"instances": [{"port": 1}]}', "[1]", '{"instances": [5]}'], 1):
            with open(instances + ".tmp", "w") as out:
                out.write(bad)
            os.replace(instances + ".tmp", instances)
            runner.send_signal(signal.SIGHUP)
            wait_until(lambda: runner_log(log_path, "cannot read the instance file") == number,
                       message=f"the runner refuses {bad}")
            assert runner.poll() is None
            assert {port: pen_pid(run_dir, f"{port}-udp") for port in pids} == pids
            assert udp_ask(first) == "one" and udp_ask(second) == "two"
        with open(instances + ".tmp", "w") as out:
            out.write(good)
        os.replace(instances + ".tmp", instances)
        runner.send_signal(signal.SIGHUP)
        wait_until(lambda: runner_log(log_path, "instance file is readable again"), message="file read again")

        # a pen whose files cannot all be removed when it goes (its status page replaced by a
        # directory): that pen stops, the other one and the runner are untouched
        html = os.path.join(run_dir, "pen", f"{second}-udp.html")
        os.unlink(html)
        os.mkdir(html)
        only_one = Plan((service("one", first, "udp", [one.port]),), settings)
        assert driver.apply(only_one).ok
        wait_until(lambda: runner_log(log_path, f"cannot remove {html}"), message="the failed removal logged")
        assert not os.path.lexists(os.path.join(run_dir, "pen", f"{second}-udp.ctl"))
        assert runner.poll() is None and pen_pid(run_dir, f"{first}-udp") == pids[first]
        assert udp_ask(first) == "one"
        # and the runner goes on: the service comes back
        os.rmdir(html)
        assert driver.apply(both).ok and udp_ask(second) == "two"
        assert pen_pid(run_dir, f"{first}-udp") == pids[first]
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=10)
        one.close()
        two.close()


def test_a_pen_whose_port_is_taken_while_it_is_down_is_set_aside_until_the_port_is_free(run_dir, runner):
    echo = UdpEcho("echo")
    port = free_port(socket.SOCK_DGRAM)
    key = f"{port}-udp"
    wanted = plan(port, [echo.port])
    driver = PenDriver(Settings(run_dir=run_dir))
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert driver.apply(wanted).ok and udp_ask(port) == "echo"
        # the pen dies and another program takes its port before the runner restarts it (the
        # runner is held meanwhile); then the runner crash-loops on it
        runner.send_signal(signal.SIGSTOP)
        try:
            os.kill(pen_pid(run_dir, key), signal.SIGKILL)
            wait_until(lambda: squatter.bind(("127.0.0.1", port)) is None, message="the port taken")
        finally:
            runner.send_signal(signal.SIGCONT)
        # the applier's resync: the same plan, nothing changed in it
        result = driver.apply(wanted)
        assert result.ok and result.details["instances"] == [], result
        assert result.set_aside == {f"{port}/udp": f"service echo ({port}/udp): port {port} cannot be bound: "
                                                   "[Errno 98] Address already in use"}
        instances = os.path.join(run_dir, "pen", "instances.json")
        assert read_instances(instances) == {}  # the runner stops retrying it
        wait_until(lambda: not os.path.lexists(os.path.join(run_dir, "pen", f"{key}.ctl")),
                   message="the runner gave it up")
        again = driver.apply(wanted)  # retries while the port stays taken: set aside, nothing else
        assert again.ok and again.action == "none" and again.set_aside == result.set_aside, again

        squatter.close()
        freed = driver.apply(wanted)
        assert freed.ok and freed.action == "reload" and freed.details["started"] == [key], freed
        assert freed.set_aside == {} and udp_ask(port) == "echo"
    finally:
        squatter.close()
        echo.close()
