"""`proxymatic plan`: one read of every source, the plan and the rendered configs; no process
started, nothing written, bounded in time, exit 1 with the reason when a source fails."""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from services.common.config import add_options, settings_from
from services.common.model import Plan
from services.dry_run import add_arguments, dry_run
from tests.etcd_server import etcd_server, unique_prefix  # noqa: F401  (a fixture)
from tests.helpers import free_port
from tests.marathon_helpers import sim  # noqa: F401  (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVICES = {"services": [
    {"name": "web", "port": 11234, "mode": "http",
     "servers": [{"host": "10.0.0.1", "port": 8080, "weight": 1000}, {"host": "10.0.0.2", "port": 8080}]},
    {"name": "dns", "port": 15353, "protocol": "udp", "servers": [{"host": "10.0.0.3", "port": 53}]},
    {"name": "hostnet", "port": 14000, "host_network": True, "servers": [{"host": "10.0.0.4", "port": 14000}]},
]}


def run_plan(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "plan", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PATH": os.environ.get("PATH", "/usr/bin:/bin")})


@pytest.fixture
def services_file(tmp_path):
    path = tmp_path / "services.json"
    path.write_text(json.dumps(SERVICES))
    return str(path)


def listing(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path) for f in files)


def test_services_file_plan_and_configs(tmp_path, services_file):
    run_dir = tmp_path / "run"
    before = listing(tmp_path)
    result = run_plan("--services-file", services_file, "--run-dir", str(run_dir), "--vhost-domain", "example.com",
                      "--vhost-port", "18080")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "11234/tcp web (mode http, from file): 10.0.0.1:8080 weight 1000, 10.0.0.2:8080 weight 500" in out
    assert "15353/udp dns" in out
    assert "uses host networking" in out  # the planner's note
    # HAProxy: the TCP service with its servers in slots; Pen: the UDP one; nginx: the vhost
    assert f"HAProxy: {run_dir}/haproxy/haproxy.cfg" in out and "bind 0.0.0.0:11234" in out
    assert "server s0 10.0.0.1:8080 weight 256" in out
    assert "-U 15353" in out and "server 0 address 10.0.0.3 port 53" in out
    assert "server_name web.example.com;" in out and "listen 18080" in out
    # nothing written: no run dir, nothing else new next to it
    assert not run_dir.exists()
    assert listing(tmp_path) == before


def test_json_is_the_plan_alone(tmp_path, services_file):
    result = run_plan("--services-file", services_file, "--run-dir", str(tmp_path / "run"), "--json")
    assert result.returncode == 0, result.stderr
    plan = Plan.from_dict(json.loads(result.stdout))
    assert [s.key for s in plan.services] == ["11234/tcp", "15353/udp"]
    assert plan.sources_ready == ("file",)
    assert json.loads(result.stdout)["hash"] == plan.hash
    assert not (tmp_path / "run").exists()


def namespace(*argv: str) -> tuple:
    parser = argparse.ArgumentParser()
    add_options(parser)
    add_arguments(parser)
    args = parser.parse_args(list(argv))
    return settings_from(args, {}), args


def test_starts_no_process_and_writes_nothing(tmp_path, services_file, monkeypatch, capsys):
    """In this process, with every way of starting a program made to fail."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"proxymatic plan started a process: {args!r:.200}")
    for module, name in ((subprocess, "Popen"), (os, "fork"), (os, "execv"), (os, "execve"), (os, "posix_spawn"),
                         (os, "system")):
        monkeypatch.setattr(module, name, refuse)
    real_open = open

    def watched_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise AssertionError(f"proxymatic plan opened {file!r} for writing")
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr("builtins.open", watched_open)
    settings, args = namespace("--services-file", services_file, "--run-dir", str(tmp_path / "run"),
                               "--vhost-domain", "example.com", "--vhost-port", "18080")
    threads = threading.active_count()
    assert dry_run(settings, args) == 0
    assert "listen svc_11234" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()
    assert threading.active_count() <= threads + 0  # the source threads are done


def test_marathon(sim, tmp_path):  # noqa: F811
    sim.deploy_app("/shop/web", service_ports=[12000], instances=2)
    run_dir = tmp_path / "run"
    result = run_plan("--marathon", sim.url, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert "12000/tcp web.shop" in result.stdout
    assert result.stdout.count("server s") >= 2 and "bind 0.0.0.0:12000" in result.stdout
    assert "sources ready: marathon" in result.stdout
    # one read: the apps once, no event stream
    assert sim.replicas[0].stream_count() == 0
    assert not run_dir.exists()


def test_registrator_and_file_together(etcd_server, tmp_path, services_file):  # noqa: F811
    prefix = unique_prefix("plan")
    etcd_server.client().write(f"{prefix}/api/h1:api.0:13000", "127.0.0.1:31001")
    result = run_plan("--registrator", etcd_server.url(prefix), "--services-file", services_file, "--run-dir",
                      str(tmp_path / "run"), "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["sources_ready"] == ["file", "registrator"]
    by_key = {s["port"]: s for s in plan["services"]}
    assert [f"{s['ip']}:{s['port']}" for s in by_key[13000]["servers"]] == ["127.0.0.1:31001"]
    assert 11234 in by_key
    assert not (tmp_path / "run").exists()


def test_a_source_that_cannot_be_read_is_exit_1_with_the_reason(tmp_path, services_file):
    missing = run_plan("--services-file", str(tmp_path / "nope.json"), "--run-dir", str(tmp_path / "run"))
    assert missing.returncode == 1 and missing.stdout == ""
    assert "source file" in missing.stderr and "nope.json" in missing.stderr
    port = free_port()  # nothing listens there
    started = time.monotonic()
    down = run_plan("--marathon", f"http://user:s3cret@127.0.0.1:{port}", "--services-file", services_file,
                    "--run-dir", str(tmp_path / "run"))
    assert down.returncode == 1 and "source marathon" in down.stderr
    assert "s3cret" not in down.stderr + down.stdout
    assert time.monotonic() - started < 30
    etcd_down = run_plan("--registrator", f"etcd://127.0.0.1:{free_port()}/services", "--run-dir",
                         str(tmp_path / "run"), "--timeout", "3")
    assert etcd_down.returncode == 1 and "source registrator" in etcd_down.stderr
    assert not (tmp_path / "run").exists()


def test_a_hung_marathon_times_out(tmp_path):
    """A Marathon that accepts connections and never answers: exit 1 after --timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])  # kept open, never answered
            except OSError:
                continue
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        result = run_plan("--marathon", f"http://127.0.0.1:{listener.getsockname()[1]}", "--run-dir",
                          str(tmp_path / "run"), "--timeout", "2")
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()
    assert result.returncode == 1, result.stdout
    assert "source marathon" in result.stderr
    assert elapsed < 15  # 2 s of reading plus the interpreter's start
    assert accepted  # it did try
