"""A Marathon password never leaves the processes that need it: not in any command line, config
file, log, bus message or /status/details; the run dir and what is written in it are private."""
from __future__ import annotations

import os
import stat
import subprocess

import pytest

from services.common.redact import redact
from sim.marathon import MarathonSim
from tests.helpers import free_port, wait_until
from tests.launcher_helpers import BIN, Run, http_get

PASSWORD = "Zq7-secret-pw"


@pytest.fixture
def marathon():
    sim = MarathonSim(auth=("proxy", PASSWORD)).start()
    sim.deploy_app("/shop/web", network="BRIDGE", service_ports=[free_port()], instances=2)
    yield sim
    sim.stop()


def read(path: str) -> bytes:
    with open(path, "rb") as source:
        return source.read()


def test_the_marathon_password_appears_nowhere(marathon):
    assert PASSWORD in marathon.url
    # A second replica that refuses connections: its errors (which quote the URL) must be redacted.
    unreachable = f"http://proxy:{PASSWORD}@127.0.0.1:{free_port()}"
    run = Run()
    try:
        run.write([])
        # Given as a flag, so the launcher's own command line has it (README: prefer the
        # environment); every program it starts must get it some other way.
        launcher = run.start("-m", f"{marathon.url},{unreachable}")
        run.wait_ok(timeout=90)
        wait_until(lambda: run.details()["sources"]["marathon"].get("services"), timeout=30,
                   message="marathon services in the details")
        processes = run.processes()
        assert len(processes) >= 8, processes

        # Command lines: `ps -ww` of every process on the machine, and the run's own ones.
        ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
        others = [line for line in ps.splitlines() if line.split()[0] != str(launcher.pid)]
        assert len(others) < len(ps.splitlines()) and not [line for line in others if PASSWORD in line]
        processes.discard(launcher.pid)
        for pid in processes:
            assert PASSWORD.encode() not in read(f"/proc/{pid}/cmdline")
        # HAProxy, nginx and Pen do not even have it in their environment.
        for pid in processes:
            name = read(f"/proc/{pid}/cmdline").split(b"\0")[0]
            if name.endswith((b"haproxy", b"pen")):
                assert PASSWORD.encode() not in read(f"/proc/{pid}/environ"), name

        # The bus, heartbeats included (the collector's carry each source's state and error).
        tap = subprocess.run([os.path.join(BIN, "proxymatic"), "tap", "--run-dir", run.run_dir, "--json",
                              "--count", "30"], capture_output=True, text=True, timeout=60)
        assert tap.returncode == 0 and '"source.marathon"' in tap.stdout, tap.stderr[-2000:]
        assert PASSWORD not in tap.stdout + tap.stderr

        # /status/details, once the unreachable replica has surely been tried and reported.
        code, details = http_get(run.url("/status/details"))
        assert code == 200 and "marathon" in details and PASSWORD not in details

        # Every file written in the run dir: supervisord.conf, logs, configs, state.
        files = [os.path.join(d, f) for d, _, names in os.walk(run.run_dir) for f in names
                 if stat.S_ISREG(os.lstat(os.path.join(d, f)).st_mode)]
        assert os.path.join(run.run_dir, "supervisord.conf") in files
        assert any(f.endswith("collector.log") for f in files)
        leaking = [f for f in files if PASSWORD.encode() in read(f)]
        assert leaking == []
        collector_log = read(os.path.join(run.run_dir, "logs", "collector.log")).decode()
        assert "127.0.0.1" in collector_log  # the log does talk about the replicas, redacted
    finally:
        run.close()


def test_the_run_dir_and_its_files_are_private(tmp_path):
    run = Run()
    try:
        run.write([])
        run.start()
        run.wait_ok(timeout=90)
        assert stat.S_IMODE(os.stat(run.run_dir).st_mode) == 0o700
        private = ["supervisord.conf", "haproxy/haproxy.cfg", "state/file.json", "pen/instances.json"]
        for name in private:
            mode = stat.S_IMODE(os.stat(os.path.join(run.run_dir, name)).st_mode)
            assert mode & 0o077 == 0, f"{name} is {oct(mode)}"
        # Nothing in it is writable by others (`find RUN_DIR -perm /o+w`).
        found = subprocess.run(["find", run.run_dir, "-perm", "/o+w", "!", "-type", "l"],
                               capture_output=True, text=True, check=True).stdout.split()
        assert found == []
    finally:
        run.close()


@pytest.mark.parametrize("text, shown", [
    ("GET http://u:pw@m1:8080/v2/apps failed", "GET http://u:***@m1:8080/v2/apps failed"),
    ("http://u:p@ss@h", "http://u:***@h"),  # an unencoded @ in the password
    ("etcd://user:pa/ss@host:2379/services", "etcd://user:***@host:2379/services"),  # and a /
    ("http://a:b@h1:8080,http://c:d@h2:8080/", "http://a:***@h1:8080,http://c:***@h2:8080/"),
    ("'http://u:pw@h' refused", "'http://u:***@h' refused"),
    ("http://m1:8080/ and http://user@h/", "http://m1:8080/ and http://user@h/"),  # nothing secret
])
def test_redact_hides_every_password(text, shown):
    assert redact(text) == shown
