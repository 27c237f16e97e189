"""The launcher's process lifecycle with the real product: nothing outlives the launcher (kill -9
included), two SIGTERMs leave nothing behind, one launcher per run dir, and a start after an
unclean stop cleans up and serves."""
from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest

from tests.helpers import TcpBackend, UdpEcho, free_port, tcp_ask, udp_ask, wait_until
from tests.launcher_helpers import Run, port_free, stale_files


@pytest.fixture
def backend():
    server = TcpBackend("a")
    yield server
    server.close()


@pytest.fixture
def run():
    r = Run()
    yield r
    r.close()


def tcp_service(run: Run, backend: TcpBackend) -> dict:
    run.tcp_port = free_port()
    return {"name": "web", "port": run.tcp_port, "servers": [{"host": "127.0.0.1", "port": backend.port}]}


def test_kill_9_of_the_launcher_takes_everything_down(backend):
    """HAProxy (TCP), a Pen (UDP) and nginx (virtual hosts) all go when the launcher is killed."""
    vhost_port = free_port()
    run = Run(vhost_domain="test.local", vhost_port=str(vhost_port))
    echo = UdpEcho("u")
    try:
        udp_port = free_port(socket.SOCK_DGRAM)
        run.write([tcp_service(run, backend),
                   {"name": "dns", "port": udp_port, "protocol": "udp",
                    "servers": [{"host": "127.0.0.1", "port": echo.port}]}])
        launcher = run.start()
        run.wait_ok()
        wait_until(lambda: tcp_ask(run.tcp_port) == "a", timeout=30, message="TCP through HAProxy")
        wait_until(lambda: udp_ask(udp_port) == "u", timeout=30, message="UDP through Pen")
        names = {open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0] for pid in run.processes()}
        assert any(b"haproxy" in n for n in names) and any(n.startswith(b"pen") for n in names), names
        assert any(b"nginx: worker" in n for n in names), names  # found through their master

        launcher.kill()
        launcher.wait()
        wait_until(lambda: not run.processes(), timeout=10, interval=0.1, message="no process of the run left")
        wait_until(lambda: port_free(run.tcp_port) and port_free(vhost_port) and port_free(run.status_port)
                   and port_free(udp_port, socket.SOCK_DGRAM), timeout=5, message="ports free again")
    finally:
        run.close()
        echo.close()


def test_two_sigterms_stop_everything_and_leave_no_stale_file(run, backend):
    run.write([tcp_service(run, backend)])
    launcher = run.start()
    run.wait_ok()
    wait_until(lambda: tcp_ask(run.tcp_port) == "a", timeout=30, message="traffic")
    assert os.path.exists(os.path.join(run.run_dir, "supervisor.sock"))
    launcher.send_signal(signal.SIGTERM)
    wait_until(lambda: run.status() == (503, "TERMINATING\n"), timeout=15, message="TERMINATING")
    assert tcp_ask(run.tcp_port) == "a"  # still forwarding
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) == 0
    assert not run.processes()
    assert stale_files(run.run_dir) == []
    assert not os.path.exists(os.path.join(run.run_dir, "terminating"))
    assert port_free(run.tcp_port) and port_free(run.status_port)


def test_a_second_launcher_on_the_same_run_dir_is_refused(run, backend):
    run.write([tcp_service(run, backend)])
    first = run.start()
    run.wait_ok()
    second = run.start(capture=True)
    assert second.wait(timeout=30) == 1
    error = second.stderr.read()
    assert "in use by another proxymatic" in error and f"pid {first.pid}" in error, error
    # The refused launcher touched nothing: the first one still serves.
    assert run.status() == (200, "OK\n") and first.poll() is None
    assert tcp_ask(run.tcp_port) == "a"


def test_a_start_after_an_unclean_stop_cleans_up_and_serves(run, backend):
    run.write([tcp_service(run, backend)])
    launcher = run.start()
    run.wait_ok()
    supervisord = int(open(os.path.join(run.run_dir, "supervisord.pid")).read())
    # The launcher and supervisord die at once, as in a node crash or an OOM kill of both.
    os.kill(supervisord, signal.SIGKILL)
    launcher.kill()
    launcher.wait()
    wait_until(lambda: not run.processes(), timeout=10, interval=0.1, message="no process of the run left")
    left = stale_files(run.run_dir)
    assert os.path.join(run.run_dir, "supervisor.sock") in left and \
        os.path.join(run.run_dir, "supervisord.pid") in left, left
    assert any("/bus/" in path for path in left), left

    again = run.start()
    run.wait_ok()
    wait_until(lambda: tcp_ask(run.tcp_port) == "a", timeout=30, message="traffic after the restart")
    assert run.pid("haproxy") > 0 and again.poll() is None
    assert int(open(os.path.join(run.run_dir, "supervisord.pid")).read()) != supervisord


def test_one_sigterm_with_a_shutdown_grace_stops_everything_after_it(backend):
    run = Run(shutdown_grace="3")
    try:
        run.write([tcp_service(run, backend)])
        launcher = run.start()
        run.wait_ok()
        launcher.send_signal(signal.SIGTERM)
        wait_until(lambda: run.status() == (503, "TERMINATING\n"), timeout=15, message="TERMINATING")
        assert tcp_ask(run.tcp_port) == "a"  # forwarding during the grace
        assert launcher.wait(timeout=60) == 0
        assert not run.processes() and stale_files(run.run_dir) == []
    finally:
        run.close()


def test_run_dir_modes_lock_and_stale_files(tmp_path):
    import stat as stat_module

    from services.run_dir import RunDirInUse, RunDirLock, prepare_run_dir, remove_stale_files

    def mode(path) -> int:
        return stat_module.S_IMODE(os.stat(path).st_mode)

    fresh, existing, shared = tmp_path / "fresh", tmp_path / "existing", tmp_path / "shared"
    prepare_run_dir(str(fresh), 0o700)
    existing.mkdir()
    existing.chmod(0o755)
    prepare_run_dir(str(existing), 0o700)
    assert mode(fresh) == mode(existing) == 0o700
    existing.chmod(0o500)
    prepare_run_dir(str(existing), 0o700)  # the exact mode, not just nothing more
    assert mode(existing) == 0o700
    shared.mkdir()
    shared.chmod(0o1777)
    prepare_run_dir(str(shared), 0o700)  # a /tmp-like directory is never locked down
    assert mode(shared) == 0o1777

    first, second = RunDirLock(str(fresh)), RunDirLock(str(fresh))
    first.acquire()
    with pytest.raises(RunDirInUse, match=f"pid {os.getpid()}"):
        second.acquire()
    first.release()
    second.acquire()  # free again once released
    second.release()

    (fresh / "bus").mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(fresh / "bus" / "x.pub"))
    listener.close()  # a socket file left behind, as after kill -9
    (fresh / "supervisord.pid").write_text("1\n")
    (fresh / "haproxy.cfg").write_text("keep me\n")
    removed = remove_stale_files(str(fresh))
    assert sorted(removed) == sorted([str(fresh / "bus" / "x.pub"), str(fresh / "supervisord.pid")])
    assert (fresh / "haproxy.cfg").exists()
