"""HaproxyDriver against a real HAProxy (master-worker, as `proxymatic haproxy` runs it)."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import urllib.request

import pytest

from services.applier import haproxy_driver, haproxy_launch, haproxy_render
from services.applier import haproxy_runtime as runtime
from services.applier.haproxy_driver import HaproxyDriver
from services.applier.haproxy_runtime import MasterCli, WorkerApi
from services.common.config import Settings
from services.common.model import Plan, ProxySettings, Server, Service
from tests.helpers import EchoBackend, HttpBackend, Load, TcpBackend, free_port, free_ports, tcp_ask, wait_until

pytestmark = pytest.mark.skipif(not os.path.exists(haproxy_launch.haproxy_binary()), reason="haproxy is not installed")


class HaproxyProcess:
    """`proxymatic haproxy` in a short temp run dir (unix socket paths must stay < 108 chars)."""

    def __init__(self, **settings):
        self.settings = Settings(run_dir=tempfile.mkdtemp(prefix="pm"), max_connections=200, **settings)
        self.paths = haproxy_launch.prepare(self.settings)
        self.master = MasterCli(self.paths.master_socket)
        self.process: subprocess.Popen | None = None

    def start(self) -> "HaproxyProcess":
        # HAProxy's output goes where supervisord puts it: the driver reads why a reload failed there.
        os.makedirs(os.path.join(self.settings.run_dir, "logs"), exist_ok=True)
        with open(os.path.join(self.settings.run_dir, "logs", "haproxy.log"), "ab") as output:
            self.process = subprocess.Popen(haproxy_launch.command(self.paths), stdout=output,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self.master.show_proc().worker, message="HAProxy worker up")
        return self

    def kill(self) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)
            wait_until(lambda: not group_alive(self.process.pid), message="HAProxy's workers gone")
            self.process = None

    def proc(self):
        return self.master.show_proc()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.settings.run_dir, ignore_errors=True)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def tcp_service(port, backends, weights=None, maxconn=None, **extra) -> Service:
    return Service.from_dict({"name": f"svc-{port}", "port": port, **extra, "servers": [
        {"ip": "127.0.0.1", "port": b.port, "weight": (weights or {}).get(b.name, 40),  # 10 on HAProxy's scale
         "maxconn": (maxconn or {}).get(b.name)} for b in backends]})


def make_plan(*services: Service) -> Plan:
    return Plan(tuple(services), ProxySettings(max_connections=200))


def serving(port: int, tries: int) -> set[str]:
    return {tcp_ask(port) for _ in range(tries)}


def assert_serving(port: int, names: set[str], tries: int = 100) -> None:
    """Every answer comes from `names`, and each of them answers at least once (with leastconn
    and other clients around, a fixed number of samples would not see all of them)."""
    seen: set[str] = set()
    for _ in range(tries):
        name = tcp_ask(port)
        assert name in names, f"{name} answered, expected only {sorted(names)}"
        seen.add(name)
        if seen == names:
            return
    assert seen == names


@pytest.fixture
def haproxy():
    process = HaproxyProcess().start()
    yield process
    process.cleanup()


@pytest.fixture
def backends():
    made = [TcpBackend(f"b{i}") for i in range(4)]
    yield made
    close_all(made)


def config_text(haproxy) -> str:
    with open(haproxy.paths.config) as handle:
        return handle.read()


def serving_b0(haproxy, backends) -> tuple[HaproxyDriver, int, str, int | None]:
    """A driver with one service on a fresh port, served by b0: (driver, port, the config file's
    text, the worker's pid)."""
    driver = HaproxyDriver(haproxy.settings)
    port = free_port()
    assert driver.apply(make_plan(tcp_service(port, backends[:1]))).ok
    return driver, port, config_text(haproxy), haproxy.proc().worker


def say(stream, line: bytes) -> bytes:
    """Send a line on an open connection to an EchoBackend (`conn.makefile("rwb")`): its answer."""
    stream.write(line)
    stream.flush()
    return stream.readline()


def close_all(servers) -> None:
    """Close in parallel: each socketserver shutdown waits for its poll interval."""
    threads = [threading.Thread(target=server.close) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_membership_churn_under_load_never_reloads_nor_fails(haproxy, backends):
    driver = HaproxyDriver(haproxy.settings)
    port = free_port()
    first = driver.apply(make_plan(tcp_service(port, backends[:1])))
    assert first.ok and first.action == "reload", first
    assert serving(port, 3) == {"b0"}
    before = haproxy.proc()

    load = Load(port)
    load.start()
    steps = [
        ({"b0", "b1"}, {}), ({"b1"}, {}), ({"b1", "b2", "b3"}, {}), ({"b1", "b2", "b3"}, {"b2": 200}),
        ({"b3"}, {}), ({"b0", "b3"}, {"b0": 1}), ({"b0", "b1", "b2", "b3"}, {}), ({"b2"}, {}),
        ({"b0"}, {}), ({"b1", "b2"}, {"b1": 50}), ({"b0", "b1", "b2", "b3"}, {"b3": 3}), ({"b0", "b3"}, {}),
    ]
    try:
        changes = 0
        for round_ in range(2):
            for names, weights in steps:
                chosen = [b for b in backends if b.name in names]
                maxconn = {"b0": 50 + round_} if round_ else {}
                result = driver.apply(make_plan(tcp_service(port, chosen, weights, maxconn)))
                assert result.ok and result.action in ("runtime", "none"), result
                changes += result.action == "runtime"
                assert_serving(port, names)
        assert changes >= 20
    finally:
        load.stop()
    after = haproxy.proc()
    assert load.failures == [] and load.ok > 0
    # No reload: same worker, same reload count.
    assert (after.workers, after.reloads) == (before.workers, before.reloads)
    # The file says what the runtime does: b0 and b3 in their slots.
    config = config_text(haproxy)
    assert f"127.0.0.1:{backends[0].port} weight 10 maxconn 51" in config
    assert f"127.0.0.1:{backends[3].port} weight 10" in config
    assert f"127.0.0.1:{backends[1].port}" not in config


def test_same_plan_again_is_a_cheap_no_op(haproxy, backends):
    driver = HaproxyDriver(haproxy.settings)
    plan = make_plan(tcp_service(free_port(), backends[:2]))
    assert driver.apply(plan).action == "reload"
    mtime = os.stat(haproxy.paths.config).st_mtime_ns
    again = driver.apply(plan)
    assert again.ok and again.action == "none"
    assert os.stat(haproxy.paths.config).st_mtime_ns == mtime


def test_new_service_reloads_and_established_connections_survive(haproxy, backends):
    echo = EchoBackend()
    driver = HaproxyDriver(haproxy.settings)
    echo_port, web_port = free_port(), free_port()
    echo_service = Service.from_dict({"name": "echo", "port": echo_port,
                                      "servers": [{"ip": "127.0.0.1", "port": echo.port, "weight": 1}]})
    assert driver.apply(make_plan(echo_service)).action == "reload"
    try:
        with socket.create_connection(("127.0.0.1", echo_port), timeout=5) as conn:
            stream = conn.makefile("rwb")
            assert say(stream, b"before\n") == b"before\n"
            worker = haproxy.proc().worker

            result = driver.apply(make_plan(echo_service, tcp_service(web_port, backends[:1])))
            assert result.ok and result.action == "reload", result
            assert haproxy.proc().worker != worker
            assert tcp_ask(web_port) == "b0"

            assert say(stream, b"after\n") == b"after\n"  # served by the old worker, until it closes
            assert worker in haproxy.proc().old_workers
    finally:
        echo.close()


def bogus_global_section(driver, monkeypatch):
    """Make the driver's renderings fail `haproxy -c` even without any service (a bad global
    section); returns the real renderer."""
    real_renderer = driver._renderer

    class Bogus:
        def update(self, plan, previous, set_aside=()):
            real = real_renderer.update(plan, previous, set_aside)
            bogus = "    master-worker\n    bogus_keyword 1\n"
            return real.replace(text=real.text.replace("    master-worker\n", bogus), skeleton_hash="bogus",
                           header=real.header.replace("    master-worker\n", bogus))

    monkeypatch.setattr(driver, "_renderer", Bogus())
    return real_renderer


def count_checks(monkeypatch) -> list:
    """Count the driver's runs of `haproxy -c` (they still run)."""
    calls = []
    real = haproxy_driver.check_config_alerts
    monkeypatch.setattr(haproxy_driver, "check_config_alerts", lambda *args: calls.append(args) or real(*args))
    return calls


def test_config_failing_validation_is_rejected_and_old_config_keeps_serving(haproxy, backends, monkeypatch):
    driver, port, good, worker = serving_b0(haproxy, backends)

    # A change HAProxy refuses even without any service (a bad global section; changes to slot
    # contents alone are typed values and skip `haproxy -c`, see test_render_refusal_is_rejected).
    real_renderer = bogus_global_section(driver, monkeypatch)
    result = driver.apply(make_plan(tcp_service(port, backends[1:2])))
    assert not result.ok and result.action == "rejected"
    assert "bogus_keyword" in result.errors[0] and "previous one keeps serving" in result.errors[0]
    assert serving(port, 3) == {"b0"}
    assert config_text(haproxy) == good
    assert haproxy.proc().worker == worker

    monkeypatch.setattr(driver, "_renderer", real_renderer)
    fixed = driver.apply(make_plan(tcp_service(port, backends[1:2])))
    assert fixed.ok and fixed.action == "runtime"
    assert serving(port, 3) == {"b1"}


def test_a_config_rejected_as_a_whole_is_not_validated_again_until_it_changes(haproxy, backends, monkeypatch,
                                                                              caplog):
    driver, port, good, worker = serving_b0(haproxy, backends)
    bogus_global_section(driver, monkeypatch)
    checks = count_checks(monkeypatch)
    plan = make_plan(tcp_service(port, backends[1:2]))
    with caplog.at_level("ERROR", logger="proxymatic.applier.haproxy"):
        result = driver.apply(plan)
        assert not result.ok and result.action == "rejected" and "bogus_keyword" in result.errors[0], result
        assert checks and len(caplog.records) == 1  # the config, then the config without any service
        checks.clear()
        caplog.clear()

        # the stage's resync of the same plan: the same answer, no haproxy -c, nothing logged
        again = driver.apply(plan)
        assert (again.ok, again.action, again.errors) == (False, "rejected", result.errors)
        assert checks == [] and caplog.records == []
        assert config_text(haproxy) == good and haproxy.proc().worker == worker

        # another rendering (one more service) is validated, and rejected (and logged) in turn
        other = make_plan(tcp_service(port, backends[1:2]), tcp_service(free_port(), backends[2:3]))
        rejected = driver.apply(other)
        assert rejected.action == "rejected" and checks and len(caplog.records) == 1, rejected
    assert serving(port, 3) == {"b0"}


def test_the_search_for_rejected_sections_is_bounded(haproxy, backends, monkeypatch):
    """Beyond its bound (runs of `haproxy -c`, seconds) the search gives up: the whole config is
    rejected as when no service is to blame, and the same rendering is not searched again."""
    driver, port, good, worker = serving_b0(haproxy, backends)
    others = free_ports(8)
    bad_section_for(monkeypatch, others[5], "bogus_keyword 1")
    monkeypatch.setattr(haproxy_driver, "blame_alerts", lambda *args: {})  # found by subsets only
    monkeypatch.setattr(haproxy_driver, "MAX_ISOLATION_CHECKS", 3)  # finding it takes 5 or more here
    checks = count_checks(monkeypatch)
    plan = make_plan(tcp_service(port, backends[1:2]), *(tcp_service(p, backends[2:3]) for p in others))
    result = driver.apply(plan)
    assert not result.ok and result.action == "rejected" and result.set_aside == {}, result
    assert "bogus_keyword" in result.errors[0] and "not found within 3 runs of haproxy -c" in result.errors[0]
    assert len(checks) == 1 + 3  # the config, then three subsets
    assert config_text(haproxy) == good and haproxy.proc().worker == worker and serving(port, 3) == {"b0"}
    assert not os.path.exists(haproxy.paths.subset_candidate)
    checks.clear()
    assert driver.apply(plan).errors == result.errors and checks == []

    # within the bound the same plan sets the service aside (a new driver: nothing remembered)
    monkeypatch.setattr(haproxy_driver, "MAX_ISOLATION_CHECKS", 40)
    fresh = HaproxyDriver(haproxy.settings).apply(plan)
    assert fresh.ok and list(fresh.set_aside) == [f"{others[5]}/tcp"], fresh
    assert serving(port, 3) == {"b1"}


def test_render_refusal_is_rejected(haproxy, backends):
    driver = HaproxyDriver(haproxy.settings)
    port = free_port()
    assert driver.apply(make_plan(tcp_service(port, backends[:1]))).ok
    service = tcp_service(port, backends[:1])
    # built directly, past the decoder's checks: the renderer checks again
    bad = service.with_servers([Server("127.0.0.1", backends[0].port, maxconn=2_000_000)])
    result = driver.apply(make_plan(bad))
    assert not result.ok and result.action == "rejected" and "maxconn" in result.errors[0]
    assert tcp_ask(port) == "b0"


def test_a_removed_server_is_drained_not_cut(haproxy, backends):
    """A task failing its health check leaves the plan: new connections go elsewhere at once,
    established ones finish (interface.md, rolling upgrades)."""
    echo = EchoBackend()
    driver = HaproxyDriver(haproxy.settings)
    port = free_port()

    def service(*servers):
        return Service.from_dict({"name": "echo", "port": port, "servers": [
            {"ip": "127.0.0.1", "port": p, "weight": 1} for p in servers]})

    assert driver.apply(make_plan(service(echo.port))).ok
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            stream = conn.makefile("rwb")
            assert say(stream, b"before\n") == b"before\n"
            result = driver.apply(make_plan(service(backends[0].port)))
            assert result.action == "runtime"
            assert serving(port, 5) == {"b0"}  # new connections: the remaining server only
            assert say(stream, b"after\n") == b"after\n"  # the established one still works
    finally:
        echo.close()


def squatter() -> socket.socket:
    """Another program's listener on a free port."""
    sock = socket.socket()
    sock.bind(("0.0.0.0", 0))
    sock.listen()
    return sock


def listens_on(haproxy, port: int) -> bool:
    return f"bind 0.0.0.0:{port}\n" in config_text(haproxy)


def test_a_taken_port_is_set_aside_and_every_other_change_applied(haproxy, backends, caplog):
    driver, port, _, worker = serving_b0(haproxy, backends)
    squat, fresh = squatter(), free_port()
    taken = squat.getsockname()[1]
    try:
        plan = make_plan(tcp_service(port, backends[1:2]), tcp_service(taken, backends[2:3]),
                         tcp_service(fresh, backends[3:4]))
        result = driver.apply(plan)
        assert result.ok and result.action == "reload" and result.errors == (), result
        assert result.set_aside == {f"{taken}/tcp": f"service svc-{taken} ({taken}/tcp): port {taken} "
                                                    "cannot be bound: [Errno 98] Address already in use"}
        assert serving(port, 3) == {"b1"} and tcp_ask(fresh) == "b3"
        assert not listens_on(haproxy, taken) and haproxy.proc().failed_reloads == 0

        # The applier's retry while the port is still taken: nothing reloaded, nothing logged again.
        caplog.clear()
        before = haproxy.proc()
        again = driver.apply(plan)
        assert again.ok and again.action == "none" and again.set_aside == result.set_aside, again
        assert haproxy.proc().reloads == before.reloads
        assert not [r for r in caplog.records if r.levelname == "WARNING"]

        # Membership of the others still changes at runtime.
        moved = make_plan(tcp_service(port, backends[:2]), tcp_service(taken, backends[2:3]),
                          tcp_service(fresh, backends[3:4]))
        changed = driver.apply(moved)
        assert changed.ok and changed.action == "runtime" and changed.set_aside == result.set_aside, changed
        assert_serving(port, {"b0", "b1"})
    finally:
        squat.close()
    freed = driver.apply(moved)  # the next retry: the port is free, the service is served
    assert freed.ok and freed.action == "reload" and freed.set_aside == {}, freed
    assert tcp_ask(taken) == "b2" and listens_on(haproxy, taken)
    assert haproxy.proc().master_pid == before.master_pid  # a reload, not a restart
    assert worker not in haproxy.proc().workers


def test_a_reload_failing_on_a_listener_sets_it_aside_and_reloads_without_it(haproxy, backends, monkeypatch):
    """The port is taken after the probe (here: the probe sees nothing): HAProxy's startup
    messages name the listener, the service is set aside and the rest reloaded."""
    driver, port, _, worker = serving_b0(haproxy, backends)
    reloads = haproxy.proc().reloads
    monkeypatch.setattr(haproxy_driver, "bind_error", lambda *args: None)
    squat, fresh = squatter(), free_port()
    taken = squat.getsockname()[1]
    try:
        result = driver.apply(make_plan(tcp_service(port, backends[1:2]), tcp_service(taken, backends[2:3]),
                                        tcp_service(fresh, backends[3:4])))
        assert result.ok and result.action == "reload", result
        assert list(result.set_aside) == [f"{taken}/tcp"]
        assert "[Errno 98] Address already in use" in result.set_aside[f"{taken}/tcp"]
        assert f"svc-{taken}" in result.set_aside[f"{taken}/tcp"]
        proc = haproxy.proc()
        assert proc.reloads == reloads + 2 and worker not in proc.workers  # one refused, one done
        assert serving(port, 3) == {"b1"} and tcp_ask(fresh) == "b3"
        assert not listens_on(haproxy, taken)
    finally:
        squat.close()


def test_membership_goes_out_before_a_reload_and_stays_when_nothing_explains_its_failure(
        haproxy, backends, monkeypatch):
    """A plan with a membership change and a new listener: the servers change through the
    runtime API before the reload. When the reload fails and neither a probe nor HAProxy's
    messages name a listener, it is rejected; the old worker serves on, with the new servers,
    and the file says so."""
    driver, port, _, worker = serving_b0(haproxy, backends)
    monkeypatch.setattr(haproxy_driver, "bind_error", lambda *args: None)
    os.unlink(driver._program_log.path)
    lines = []
    real_send = MasterCli._send_line
    monkeypatch.setattr(MasterCli, "_send_line", lambda self, line: lines.append(line) or real_send(self, line))
    squat = squatter()
    taken = squat.getsockname()[1]
    try:
        result = driver.apply(make_plan(tcp_service(port, backends[1:2]), tcp_service(taken, backends[2:3])))
        assert not result.ok and result.action == "rejected" and "reload failed" in result.errors[0]
        assert result.set_aside == {}
    finally:
        squat.close()
    changed = next(i for i, line in enumerate(lines) if f"set server svc_{port}_tcp_svc-{port}/s1 addr" in line)
    assert changed < lines.index("reload")
    assert haproxy.proc().worker == worker
    assert serving(port, 3) == {"b1"}
    config = config_text(haproxy)
    assert f"    server s1 127.0.0.1:{backends[1].port} weight 10\n" in config
    assert f"127.0.0.1:{backends[0].port}" not in config
    assert not listens_on(haproxy, taken)
    # The driver re-adopts the running worker: a membership change is runtime again.
    again = driver.apply(make_plan(tcp_service(port, backends[:2])))
    assert again.ok and again.action == "runtime", again
    assert_serving(port, {"b0", "b1"})


def test_haproxy_restarted_while_a_port_is_taken_starts_without_that_listener(haproxy, backends):
    """HAProxy restarted (by supervisord) from the file while another program took one of its
    ports would not start at all: `prepare` leaves that listener out, the driver sets it aside."""
    driver = HaproxyDriver(haproxy.settings)
    first, second = free_port(), free_port()
    plan = make_plan(tcp_service(first, backends[:1]), tcp_service(second, backends[1:2]))
    assert driver.apply(plan).ok
    haproxy.kill()

    def take_first() -> socket.socket:  # once the killed workers have let go of it
        sock = socket.socket()
        try:
            sock.bind(("0.0.0.0", first))
        except OSError:
            sock.close()
            raise
        sock.listen()
        return sock
    squat = wait_until(take_first, message=f"port {first} free after HAProxy was killed")
    try:
        assert haproxy_launch.drop_unbindable(haproxy.paths) == [f"port {first}: [Errno 98] Address already in use"]
        haproxy_launch.prepare(haproxy.settings)  # as `proxymatic haproxy` does: nothing more to drop
        assert not listens_on(haproxy, first) and listens_on(haproxy, second)
        haproxy.start()
        assert tcp_ask(second) == "b1"
        result = driver.apply(plan)
        assert result.ok and list(result.set_aside) == [f"{first}/tcp"], result
        assert tcp_ask(second) == "b1"
    finally:
        squat.close()
    freed = driver.apply(plan)
    assert freed.ok and freed.action == "reload" and freed.set_aside == {}, freed
    assert tcp_ask(first) == "b0" and tcp_ask(second) == "b1"


def bad_section_for(monkeypatch, port: int, line: str) -> None:
    """Make the renderer add `line` to the section of the service on `port`."""
    real = haproxy_render._render_section

    def rendering(service, slots, max_connections):
        text = real(service, slots, max_connections)
        return text + f"\n    {line}" if service.port == port else text
    monkeypatch.setattr(haproxy_render, "_render_section", rendering)


@pytest.mark.parametrize("by_lines", [True, False], ids=["alert-lines", "bisect"])
def test_a_section_haproxy_rejects_is_set_aside_and_the_rest_applied(haproxy, backends, monkeypatch, by_lines):
    driver, port, _, worker = serving_b0(haproxy, backends)
    others = free_ports(5)
    bad = others[2]
    bad_section_for(monkeypatch, bad, "bogus_keyword 1")
    if not by_lines:  # HAProxy's alerts pointing nowhere: found by validating subsets
        monkeypatch.setattr(haproxy_driver, "blame_alerts", lambda *args: {})
    plan = make_plan(tcp_service(port, backends[1:2]), *(tcp_service(p, backends[2:3]) for p in others))
    result = driver.apply(plan)
    assert result.ok and result.action == "reload", result
    assert list(result.set_aside) == [f"{bad}/tcp"]
    assert "HAProxy rejected its section" in result.set_aside[f"{bad}/tcp"]
    assert "bogus_keyword" in result.set_aside[f"{bad}/tcp"] and f"svc-{bad}" in result.set_aside[f"{bad}/tcp"]
    assert serving(port, 3) == {"b1"}
    assert {tcp_ask(p) for p in others if p != bad} == {"b2"}
    assert not listens_on(haproxy, bad) and "bogus_keyword" not in config_text(haproxy)
    assert not os.path.exists(haproxy.paths.subset_candidate)
    # A retry of the same plan does not validate the rejected section again.
    calls = []
    monkeypatch.setattr(haproxy_driver, "check_config_alerts", lambda *a: calls.append(a) or (True, []))
    again = driver.apply(plan)
    assert again.ok and again.action == "none" and again.set_aside == result.set_aside and calls == []


def test_workers_drop_root(haproxy):
    """As root, the workers run as the haproxy account (nobody without it); the master keeps
    root. The master CLI, the statistics socket and reloads work as before."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    expected = haproxy_launch.run_as()
    worker = haproxy.proc().worker

    def uid(pid: int) -> int:
        with open(f"/proc/{pid}/status") as handle:
            return int(next(line for line in handle if line.startswith("Uid:")).split()[1])
    assert uid(worker) == pwd.getpwnam(expected.user).pw_uid != 0
    assert uid(haproxy.proc().master_pid) == 0
    assert f"    user {expected.user}\n    group {expected.group}\n" in config_text(haproxy)


def test_haproxy_restarted_from_the_file_serves_the_same_backends(haproxy, backends):
    driver = HaproxyDriver(haproxy.settings)
    port = free_port()
    assert driver.apply(make_plan(tcp_service(port, backends[:1]))).action == "reload"
    plan = make_plan(tcp_service(port, backends[1:3]))
    assert driver.apply(plan).action == "runtime"  # the file was rewritten after the runtime change

    haproxy.kill()
    haproxy.start()  # as supervisord would: from the config on disk
    assert_serving(port, {"b1", "b2"})
    result = driver.apply(plan)  # a new worker: adopted, nothing to fix
    assert result.ok and result.action == "none", result
    assert haproxy.proc().reloads == 0


def test_restarted_applier_adopts_running_haproxy_without_reload(haproxy, backends):
    port = free_port()
    plan = make_plan(tcp_service(port, backends[:2], weights={"b1": 7}))
    assert HaproxyDriver(haproxy.settings).apply(make_plan(tcp_service(port, backends[:1]))).ok
    assert HaproxyDriver(haproxy.settings).apply(plan).action == "runtime"
    before = haproxy.proc()

    adopted = HaproxyDriver(haproxy.settings).apply(plan)
    assert adopted.ok and adopted.action == "none", adopted

    # Someone changed the runtime behind the applier's back: only the difference is fixed.
    haproxy.master.worker_command(before.worker, "set server svc_%d_tcp_svc-%d/s1 state maint" % (port, port))
    assert serving(port, 4) == {"b0"}
    fixed = HaproxyDriver(haproxy.settings).apply(plan)
    assert fixed.ok and fixed.action == "runtime" and fixed.details["changes"] == 1, fixed
    assert_serving(port, {"b0", "b1"})
    after = haproxy.proc()
    assert (after.workers, after.reloads) == (before.workers, before.reloads)


def test_http_mode_with_health_checks(haproxy):
    healthy, sick = HttpBackend("h1"), HttpBackend("h2")
    sick.healthy = False
    try:
        port = free_port()
        svc = Service.from_dict({"name": "web", "port": port, "mode": "http",
                                 "health_check": {"protocol": "http", "path": "/health", "interval_seconds": 1,
                                                  "fall": 1},
                                 "servers": [{"ip": "127.0.0.1", "port": b.port, "weight": 1}
                                             for b in (healthy, sick)]})
        result = HaproxyDriver(haproxy.settings).apply(make_plan(svc))
        assert result.ok, result

        def answers() -> set[str]:
            return {urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode().strip()
                    for _ in range(4)}
        wait_until(lambda: answers() == {"h1"}, message="the failing backend taken out by its health check")
    finally:
        close_all([healthy, sick])


def test_unreachable_haproxy_is_reported_not_raised():
    settings = Settings(run_dir=tempfile.mkdtemp(prefix="pm"))
    try:
        result = HaproxyDriver(settings).apply(make_plan())
        assert not result.ok and result.action == "none" and "not reachable" in result.errors[0]
    finally:
        shutil.rmtree(settings.run_dir, ignore_errors=True)


def test_statistics_page_on_the_stats_socket(haproxy):
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(haproxy.paths.stats_socket)
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n")[0]
    assert b"Statistics Report" in answer


def test_membership_change_is_one_round_trip_before_the_file_is_rewritten(haproxy, backends, monkeypatch):
    """Among many services, a change to one service's servers: `show proc` and every command go
    out on one CLI line, in one connection, before haproxy.cfg and slots.json are rewritten."""
    driver = HaproxyDriver(haproxy.settings)
    port, *ports = free_ports(21)
    others = [Service.from_dict({"name": f"other{i}", "port": p,
                                 "servers": [{"ip": "10.0.0.1", "port": 1000 + i, "weight": 1}]})
              for i, p in enumerate(ports)]
    assert driver.apply(make_plan(tcp_service(port, backends[:1]), *others)).action == "reload"

    events = []

    def recording(kind, real, method=False):
        if method:
            return lambda self, arg, *rest: events.append((kind, arg)) or real(self, arg, *rest)
        return lambda arg, *rest, **options: events.append((kind, arg)) or real(arg, *rest, **options)

    monkeypatch.setattr(MasterCli, "_send_line", recording("cli", MasterCli._send_line, method=True))
    monkeypatch.setattr(haproxy_driver, "write_atomic", recording("file", haproxy_driver.write_atomic))

    result = driver.apply(make_plan(tcp_service(port, backends[1:3]), *others))
    assert result.ok and result.action == "runtime", result
    assert [kind for kind, _ in events] == ["cli", "file", "file"], events
    line = events[0][1]
    assert line.startswith("prompt; show proc; @!") and "set server svc_%d_tcp_svc-%d/s1 addr 127.0.0.1" % (port, port) in line
    assert [path for _, path in events[1:]] == [haproxy.paths.config, haproxy.paths.state]
    assert_serving(port, {"b1", "b2"})
    assert f"127.0.0.1:{backends[2].port} weight 10" in config_text(haproxy)

    # The same plan again: one `show proc` (a restart behind our back would show there), nothing else.
    events.clear()
    again = driver.apply(make_plan(tcp_service(port, backends[1:3]), *others))
    assert again.ok and again.action == "none"
    assert events == [("cli", "show proc")]


def test_membership_change_right_after_haproxy_restarted_behind_our_back(haproxy, backends):
    """The `show proc` sent with the commands shows a new worker: the driver adopts it and sends
    the change to that worker, still without a reload."""
    driver = HaproxyDriver(haproxy.settings)
    port = free_port()
    assert driver.apply(make_plan(tcp_service(port, backends[:1]))).action == "reload"
    assert driver.apply(make_plan(tcp_service(port, backends[:2]))).action == "runtime"
    haproxy.kill()
    haproxy.start()  # from the file: b0 and b1
    result = driver.apply(make_plan(tcp_service(port, backends[1:4])))
    assert result.ok and result.action == "runtime", result
    assert result.details["worker_pid"] == haproxy.proc().worker
    assert_serving(port, {"b1", "b2", "b3"})
    assert haproxy.proc().reloads == 0


def test_batched_commands_get_one_answer_each(haproxy, backends):
    driver = HaproxyDriver(haproxy.settings)
    port = free_port()
    assert driver.apply(make_plan(tcp_service(port, backends[:1]))).ok
    worker = haproxy.proc().worker
    bid = f"svc_{port}_tcp_svc-{port}"
    api = WorkerApi(haproxy.master, worker)
    commands = [runtime.set_weight(bid, "s0", 5), runtime.set_weight(bid, "nope", 5),
                runtime.set_addr(bid, "s1", "127.0.0.1", backends[1].port), runtime.set_maxconn(bid, "s1", 3)]
    for max_line in (8192, 40):  # one line, or one line per command
        answers = haproxy.master.send_batch([f"@!{worker} {c.text}" for c in commands], max_line=max_line)
        assert len(answers) == 4 and answers[0].strip() == "" and "No such server" in answers[1]
        assert "port" in answers[2] and answers[3].strip() == ""
    proc, errors = api.run(commands, show_proc=True)
    assert proc.worker == worker
    assert len(errors) == 1 and "nope" in errors[0]

    # A worker that is gone ends the line: what ran is answered, the rest is not.
    answers = haproxy.master.send_batch([f"@!{worker} {commands[0].text}", "@!1 show info", f"@!{worker} help"])
    assert answers[0].strip() == "" and "Can't find the target PID" in answers[1] and answers[2] is None
    _, errors = WorkerApi(haproxy.master, 999999).run(commands[:2])
    assert errors[0] == "worker 999999 is gone" and "not run" in errors[1]
    with pytest.raises(ValueError):
        haproxy.master.send_batch(["show proc; reload"])
