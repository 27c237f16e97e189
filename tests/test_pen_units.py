"""Pen driver logic without processes: service selection, slot tables, control-socket parsing,
set-aside reasons, privileges and pid checks (those start one `sleep`), file modes, and the
runner's resilience in-process with a stand-in for pen (a script that sleeps)."""
import logging
import os
import pwd
import signal
import socket
import stat
import subprocess

import pytest

from services.applier import proc_identity
from services.applier.bindable import unbindable_reason
from services.applier.pen_control import Slot, parse_connections, parse_servers
from services.applier.pen_driver import (
    assign_slots, choose_servers, pen_services, render_table, table_matches)
from services.applier import pen_runner
from services.applier.pen_runner import (
    PenFiles, PenInstance, PenRunner, launch_argv, pen_argv, prepare_owned, read_instances, render_instances,
    signal_runner, write_cfg)
from services.common.model import Plan, ProxySettings, Service
from tests.helpers import free_port, wait_until


def service(port, protocol="udp", servers=(), name="svc"):
    return Service.from_dict({"name": name, "port": port, "protocol": protocol,
                              "servers": [{"ip": ip, "port": p, "weight": 100} for ip, p in servers]})


def test_udp_always_tcp_only_without_haproxy():
    services = (service(53, "udp"), service(80, "tcp"), service(53, "tcp"))
    assert [s.key for s in pen_services(Plan(services))] == ["53/udp"]
    assert [s.key for s in pen_services(Plan(services, ProxySettings(haproxy=False)))] == \
        ["53/tcp", "53/udp", "80/tcp"]


def test_more_servers_than_slots_keeps_the_first_and_warns():
    svc = service(53, servers=[("10.0.0.3", 1), ("10.0.0.1", 1), ("10.0.0.2", 1)])
    chosen, warnings = choose_servers(svc, 2)
    assert [s.ip for s in chosen] == ["10.0.0.1", "10.0.0.2"]
    assert len(warnings) == 1 and "10.0.0.3:1" in warnings[0] and "PEN_SERVERS is 2" in warnings[0]
    assert choose_servers(svc, 3)[1] == []


def test_servers_keep_their_slots_and_new_ones_fill_the_lowest_free():
    a, b, c = (Slot(f"10.0.0.{i}", 80, 10, 0) for i in (1, 2, 3))
    assert assign_slots({}, [a, b], 4) == [a, b, None, None]
    # b stays in slot 1 (with its new weight), a leaves, c takes the free slot 0
    b2 = Slot(b.ip, b.port, 99, 5)
    assert assign_slots({0: a, 1: b, 2: None}, [b2, c], 4) == [c, b2, None, None]
    # slots past the table size are ignored
    assert assign_slots({7: a}, [a], 2) == [a, None]


def test_render_table_and_match():
    a = Slot("10.0.0.1", 8053, 7, 3)
    text = render_table([None, a])
    assert text == ("server 0 address 0.0.0.0 port 0 max 0 weight 0\n"
                    "server 1 address 10.0.0.1 port 8053 max 3 weight 7\n")
    assert table_matches({0: None, 1: a}, [None, a])
    assert not table_matches({0: None, 1: a, 2: a}, [None, a])
    assert not table_matches({1: Slot("10.0.0.1", 8053, 8, 3)}, [None, a])


def test_parse_servers_output():
    text = ("0 addr (unknown address family 0 port 0 conn 0 max 0 hard 0 weight 0 prio 0 sx 0 rx 0\n"
            "1 addr 127.0.0.1 port 9 conn 2 max 5 hard 0 weight 3 prio 0 sx 0 rx 0\n"
            "2 addr 0.0.0.0 port 0 conn 0 max 0 hard 0 weight 0 prio 0 sx 0 rx 0\n"
            "3 addr ::1 port 7 conn 0 max 0 hard 0 weight 1 prio 0 sx 0 rx 0\n")
    assert parse_servers(text) == {0: None, 1: Slot("127.0.0.1", 9, 3, 5), 2: None, 3: Slot("::1", 7, 1, 0)}


def test_parse_connections_from_status_page():
    html = ("<h2>Active clients</h2><table><tr><td>0</td><td>127.0.0.1</td></tr></table>"
            "<h2>Active connections</h2>Number of connections: 100 max<p><table>\n"
            "<tr>\n<td bgcolor=\"#80f080\">connection</td>\n</tr>\n"
            "<tr>\n<td>0</td>\n<td>8</td>\n<td>9</td>\n<td>0</td>\n<td>0</td>\n<td>0</td>\n<td>1</td>\n</tr>\n"
            "<tr>\n<td>4</td>\n<td>8</td>\n<td>9</td>\n<td>0</td>\n<td>0</td>\n<td>0</td>\n<td>0</td>\n</tr>\n")
    assert parse_connections(html) == [(0, 1), (4, 0)]


def test_instances_file_round_trip_and_argv(tmp_path):
    files = PenFiles(str(tmp_path))
    instances = [PenInstance(53, "udp", 4, 100, 200), PenInstance(80, "tcp", 4, 100, 200)]
    (tmp_path / "instances.json").write_text(render_instances(instances))
    assert read_instances(files.instances) == {"53-udp": instances[0], "80-tcp": instances[1]}
    argv = pen_argv(instances[0], files)
    assert argv[0] == "pen" and argv[-1] == "53" and "-U" in argv and "-f" in argv
    assert argv[argv.index("-C") + 1] == str(tmp_path / "sock" / "53-udp.ctl")  # files.control: a symlink to it
    assert argv[argv.index("-F") + 1] == str(tmp_path / "53-udp.cfg")
    assert argv[argv.index("-c") + 1] == "100" and argv[argv.index("-x") + 1] == "200"
    assert "-U" not in pen_argv(instances[1], files)


def test_pen_driver_refuses_an_address_that_is_not_one(tmp_path):
    from services.applier.pen_driver import PenDriver
    from services.common.config import Settings
    from services.common.model import Server
    bad = Service(name="x", port=53, protocol="udp", servers=(Server(ip="1.2.3.4 port 1", port=5, weight=1),))
    result = PenDriver(Settings(run_dir=str(tmp_path))).apply(Plan((bad,)))
    assert not result.ok and result.action == "rejected"
    assert not (tmp_path / "pen" / "instances.json").exists()


def test_pens_start_as_their_user_with_only_the_low_ports_capability():
    files = PenFiles("/run/pm/pen")
    udp, tcp = PenInstance(53, "udp", 4, 100, 200), PenInstance(80, "tcp", 4, 100, 200)
    argv = pen_argv(udp, files, user="nobody")
    assert "-u" not in argv  # Pen's own -u switches too late for UDP (see launch_argv)
    # its files through the pen directory's descriptor it inherits: the run dir is private
    assert argv[argv.index("-C") + 1] == "/proc/self/fd/200/sock/53-udp.ctl"
    assert argv[argv.index("-F") + 1] == "/proc/self/fd/200/53-udp.cfg"
    launch = launch_argv(argv, "nobody")
    nobody = pwd.getpwnam("nobody")
    assert launch[:launch.index("pen")] == [
        "setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", "--no-new-privs",
        "--inh-caps=-all,+net_bind_service", "--ambient-caps=+net_bind_service"]
    assert launch[launch.index("pen"):] == argv
    # the fallback (the user cannot reach the run dir): root, which needs -u to allow -C
    assert pen_argv(tcp, files, user="root")[-3:] == ["-u", "root", "80"]
    assert launch_argv(pen_argv(tcp, files, user="root"), "root")[0] == "pen"
    assert "-u" not in pen_argv(tcp, files) and launch_argv(pen_argv(tcp, files), None)[0] == "pen"


def test_set_aside_reason_names_service_port_and_error():
    svc = service(10053, name="dns")
    assert unbindable_reason(svc, "[Errno 98] Address already in use") == \
        "service dns (10053/udp): port 10053 cannot be bound: [Errno 98] Address already in use"


def test_a_pid_is_signalled_only_while_it_is_the_recorded_process():
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        recorded = proc_identity.identity(sleeper.pid)
        assert proc_identity.same_process(recorded) == sleeper.pid
        assert proc_identity.same_process(f"{sleeper.pid} 1") is None  # same pid, another start time
        assert proc_identity.same_process("not a pid") is None
        # Popen returns once the child called exec (vfork): its command line may show a moment later
        wait_until(lambda: proc_identity.cmdline(sleeper.pid) == ["sleep", "60"], message="sleep's command line")
        assert proc_identity.executes(sleeper.pid, "sleep") and not proc_identity.executes(sleeper.pid, "pen")
        # a check that fails sends nothing
        assert not proc_identity.signal_verified(sleeper.pid, signal.SIGTERM, lambda pid: False)
        assert sleeper.poll() is None
        assert proc_identity.signal_verified(sleeper.pid, signal.SIGTERM,
                                             lambda pid: proc_identity.executes(pid, "sleep"))
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_an_ipv6_zone_never_reaches_pen():
    from services.common.model import Server
    for ip in ("fe80::1%eth0", "fe80::1%\nserver 1 address 10.6.6.6"):
        with pytest.raises(ValueError):
            Slot.of(Server(ip=ip, port=80, weight=1))
    assert Slot.of(Server(ip="fe80::1", port=80, weight=1)).ip == "fe80::1"


MALFORMED = ['{"instances": [{"port": 1}]}', "[1]", '{"instances": [5]}', '{"instances": 5}', '"text"',
             '{"instances": [{"port": 53, "proto": "udp", "servers": 4}]}',
             '{"instances": [{"port": "53", "protocol": "udp", "slots": 4, "clients": 1, "max_connections": 1}]}',
             '{"instances": [{"port": 53, "protocol": "sctp", "slots": 4, "clients": 1, "max_connections": 1}]}',
             "not json", b"\xff\xfe"]


def write_file(path, content):
    with open(path, "wb") as out:
        out.write(content if isinstance(content, bytes) else content.encode())


@pytest.mark.parametrize("content", MALFORMED)
def test_every_malformed_instance_file_is_a_value_error(tmp_path, content):
    write_file(tmp_path / "instances.json", content)
    with pytest.raises(ValueError):
        read_instances(str(tmp_path / "instances.json"))


@pytest.mark.parametrize("content", MALFORMED)
def test_the_driver_rewrites_a_malformed_instance_file(tmp_path, content):
    from services.applier.pen_driver import PenDriver
    from services.common.config import Settings
    driver = PenDriver(Settings(run_dir=str(tmp_path)), start_timeout=0.1)
    write_file(driver.files.instances, content)
    port = free_port(socket.SOCK_DGRAM)
    driver.apply(Plan((service(port),)))  # no runner here: not ok, but no exception
    assert list(read_instances(driver.files.instances)) == [f"{port}-udp"]


@pytest.fixture
def runner(tmp_path, monkeypatch):
    """A runner in this process; its "pen" is a script that sleeps (stopped at the end)."""
    fake = tmp_path / "fakepen"
    fake.write_text("#!/bin/sh\nexec sleep 300\n")
    fake.chmod(0o755)
    monkeypatch.setattr(pen_runner, "pen_user", lambda: None)  # no setpriv, no fd 200 in pytest
    runner = PenRunner(PenFiles(str(tmp_path / "pen")), binary=str(fake), poll_interval=0.01)
    yield runner
    runner.stop_all()


def want(runner, *instances):
    write_file(runner.files.instances, render_instances(list(instances)))
    runner.load()
    runner.reconcile()


def running(runner) -> dict[str, int]:
    return {key: pen.pid for key, pen in runner.pens.items() if pen.running()}


A, B = PenInstance(10053, "udp", 4, 10, 10), PenInstance(10054, "udp", 4, 10, 10)


def test_a_bad_instance_file_keeps_the_running_pens_as_they_are(runner, caplog):
    want(runner, A, B)
    pids = running(runner)
    assert sorted(pids) == [A.key, B.key]
    caplog.set_level(logging.INFO, logger="proxymatic.pen")
    for content in MALFORMED:
        write_file(runner.files.instances, content)
        for _ in range(2):  # the runner re-reads every second: one error per reason, not per read
            runner.load()
            runner.reconcile()
        assert running(runner) == pids and set(runner.desired) == {A.key, B.key}
    refused = [r for r in caplog.records if "cannot read the instance file" in r.getMessage()]
    assert len(refused) == len(MALFORMED), [r.getMessage() for r in refused]
    want(runner, A)  # readable again: applied
    assert running(runner) == {A.key: pids[A.key]}


def test_a_failure_for_one_instance_touches_only_that_instance(runner, monkeypatch, caplog):
    real_write_cfg, real_argv = pen_runner.write_cfg, pen_runner.pen_argv

    def refused_for_a(path, text):
        if os.path.basename(path).startswith(A.key):
            raise PermissionError(13, "Permission denied", path)
        return real_write_cfg(path, text)

    monkeypatch.setattr(pen_runner, "write_cfg", refused_for_a)
    want(runner, A, B)
    assert list(running(runner)) == [B.key]
    assert runner.pens[A.key].process is None and runner.pens[A.key].restart_at > 0  # retried after its backoff

    # an unexpected exception for one instance: logged once, that instance only
    def broken_for_a(instance, *args, **kwargs):
        if instance == A:
            raise RuntimeError("a bug")
        return real_argv(instance, *args, **kwargs)

    monkeypatch.setattr(pen_runner, "pen_argv", broken_for_a)
    runner.stop_all()
    caplog.set_level(logging.DEBUG, logger="proxymatic.pen")
    for _ in range(3):
        runner.reconcile()
    assert list(running(runner)) == [B.key]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "a bug" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in errors]

    # B's files cannot all be removed when it goes (its status page is a directory): B stops, the
    # error is logged, nothing else happens
    b_pid = running(runner)[B.key]
    os.unlink(runner.files.file(B.key, "html"))
    os.mkdir(runner.files.file(B.key, "html"))
    want(runner, A)
    assert B.key not in runner.pens and not os.path.exists(f"/proc/{b_pid}/cmdline") or _zombie_or_gone(b_pid)
    assert not os.path.lexists(runner.files.control(B.key))
    assert any("cannot remove" in r.getMessage() for r in caplog.records)


def _zombie_or_gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as status:
            return status.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def run_keeping_signal_handlers(runner) -> int:
    """`runner.run()` in the test process: the signal handlers it installs are put back after."""
    handlers = {signum: signal.getsignal(signum)
                for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
    try:
        return runner.run()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_the_runner_loop_survives_an_exception(runner, monkeypatch, caplog):
    events = []

    def reconcile():
        events.append("reconcile")
        if len(events) == 1:
            raise RuntimeError("a bug")
        runner._stopping = True  # the second turn ran: stop as on SIGTERM

    monkeypatch.setattr(runner, "reconcile", reconcile)
    monkeypatch.setattr(runner, "stop_all", lambda: events.append("stop_all"))
    assert run_keeping_signal_handlers(runner) == 0
    assert events == ["reconcile", "reconcile", "stop_all"]  # the pens were not stopped for the bug
    assert any("reconciling failed" in r.getMessage() for r in caplog.records)


def test_a_runner_told_to_stop_at_once_still_takes_over_the_pens_it_stops(runner, monkeypatch):
    """A SIGTERM right after start (runner.pid written): the first turn still runs, so the pens a
    previous runner left are adopted and then stopped, not left running (it raced before)."""
    events = []
    monkeypatch.setattr(runner, "reconcile", lambda: events.append("reconcile"))
    monkeypatch.setattr(runner, "stop_all", lambda: events.append("stop_all"))
    runner._stopping = True  # as if SIGTERM came at once
    assert run_keeping_signal_handlers(runner) == 0
    assert events == ["reconcile", "stop_all"]


def test_pen_files_are_private(tmp_path):
    cfg = tmp_path / "53-udp.cfg"
    root = os.geteuid() == 0
    nobody = pwd.getpwnam("nobody")

    def check_cfg():
        status = os.stat(cfg)
        if root:  # pens run as nobody and read it: the group's read bit, nothing for others
            assert (stat.S_IMODE(status.st_mode), status.st_uid, status.st_gid) == (0o640, 0, nobody.pw_gid)
        else:
            assert stat.S_IMODE(status.st_mode) == 0o600

    assert write_cfg(str(cfg), "server 0 address 0.0.0.0 port 0 max 0 weight 0\n")
    check_cfg()
    os.chmod(cfg, 0o644)  # as an older version left it
    if root:
        os.chown(cfg, 0, 0)
    assert not write_cfg(str(cfg), "server 0 address 0.0.0.0 port 0 max 0 weight 0\n")
    check_cfg()
    assert write_cfg(str(cfg), "") and cfg.read_text() == ""
    check_cfg()
    # the pid file and status page: the pen's own, nobody else's
    pid_file = tmp_path / "53-udp.pid"
    prepare_owned(str(pid_file), "nobody" if root else None)
    status = os.stat(pid_file)
    assert stat.S_IMODE(status.st_mode) == 0o600
    assert status.st_uid == (nobody.pw_uid if root else os.geteuid())


def test_signal_runner_only_signals_the_recorded_runner(tmp_path):
    files = PenFiles(str(tmp_path))
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert not signal_runner(files)  # no runner.pid
        (tmp_path / "runner.pid").write_text(f"{sleeper.pid} 1\n")  # the pid, another start time
        assert not signal_runner(files)
        assert sleeper.poll() is None
        (tmp_path / "runner.pid").write_text(proc_identity.identity(sleeper.pid) + "\n")
        assert signal_runner(files)
        assert sleeper.wait(timeout=10) == -signal.SIGHUP
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
