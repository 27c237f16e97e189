"""The whole product under supervisord: `proxymatic --services-file ...` with a real HAProxy."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import pytest

from tests import launcher_helpers
from tests.helpers import Load, TcpBackend, free_port, tcp_ask, wait_until
from tests.launcher_helpers import Run

BIN = os.path.dirname(sys.executable)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class Stack:
    def __init__(self):
        self.run_dir = tempfile.mkdtemp(prefix="pme")
        self.services_file = os.path.join(self.run_dir, "services.json")
        self.service_port = free_port()
        self.status_port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [os.path.join(BIN, "proxymatic"), "--services-file", self.services_file, "--run-dir", self.run_dir,
             "--status-endpoint", f"127.0.0.1:{self.status_port}"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def write(self, backends: list[TcpBackend], **service) -> None:
        document = {"services": [{"name": "web", "port": self.service_port, **service,
                                  "servers": [{"host": "127.0.0.1", "port": b.port} for b in backends]}]}
        self.write_text(json.dumps(document))

    def write_text(self, text: str) -> None:
        temporary = self.services_file + ".tmp"
        with open(temporary, "w") as handle:
            handle.write(text)
        os.replace(temporary, self.services_file)

    def status(self) -> tuple[int, str]:
        return http_get(f"http://127.0.0.1:{self.status_port}/status")

    def details(self) -> dict:
        return json.loads(http_get(f"http://127.0.0.1:{self.status_port}/status/details")[1])

    def supervisorctl(self, *args: str) -> str:
        return subprocess.run([os.path.join(BIN, "supervisorctl"), "-c", os.path.join(self.run_dir, "supervisord.conf"),
                               *args], capture_output=True, text=True, timeout=30).stdout.strip()

    def pid(self, program: str) -> int:
        return int(self.supervisorctl("pid", program) or 0)

    def serving(self) -> set[str]:
        return {tcp_ask(self.service_port) for _ in range(8)}

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture
def stack():
    s = Stack()
    backends = {name: TcpBackend(name) for name in ("a", "b", "c")}
    s.backends = backends
    yield s
    s.stop()
    for backend in backends.values():
        backend.close()


def test_pipeline_serves_follows_survives_and_drains(stack):
    a, b, c = stack.backends["a"], stack.backends["b"], stack.backends["c"]
    stack.start()
    # No file yet: the source has never delivered, so the node is not ready.
    assert wait_until(lambda: stack.status() == (503, "INITIALIZING\n"), timeout=30, message="INITIALIZING")
    stack.write([a, b])
    wait_until(lambda: stack.status()[0] == 200, timeout=30, message="/status OK")
    assert stack.status() == (200, "OK\n")
    wait_until(lambda: stack.serving() == {"a", "b"}, message="traffic to a and b")
    # The HAProxy statistics share the status endpoint.
    code, csv = http_get(f"http://127.0.0.1:{stack.status_port}/;csv")
    assert code == 200 and f"svc_{stack.service_port}_tcp" in csv

    # Editing the file moves traffic.
    stack.write([b, c])
    wait_until(lambda: stack.serving() == {"b", "c"}, message="traffic to b and c")

    # A malformed file is reported and changes nothing.
    stack.write_text('{"services": [{"name": "bad name\\n", "port": 1}]}')
    wait_until(lambda: stack.details()["sources"]["file"]["state"] == "degraded", message="degraded file source")
    assert "name" in stack.details()["sources"]["file"]["error"]
    assert stack.serving() == {"b", "c"}
    assert stack.status()[0] == 200

    # kill -9 of every stage: supervisord restarts it, traffic never fails, the pipeline converges.
    load = Load(stack.service_port)
    load.start()
    try:
        backends_in_turn = [[a, b], [a, c], [c], [a, b, c]]
        for stage, servers in zip(("collector", "planner", "applier", "status"), backends_in_turn):
            old = stack.pid(stage)
            assert old > 0
            os.kill(old, signal.SIGKILL)
            wait_until(lambda: stack.pid(stage) not in (0, old), timeout=30, message=f"{stage} restarted")
            stack.write(servers)
            expected = {x.name for x in servers}
            wait_until(lambda: stack.serving() == expected, timeout=30, message=f"convergence after {stage} restart")
        wait_until(lambda: stack.status()[0] == 200, message="status OK after restarts")
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert load.ok > 50

    # The bus can be tapped: every stage's snapshot (the service's key and the summary from the
    # collector and the planner, the applier's result).
    tap = subprocess.run([os.path.join(BIN, "proxymatic"), "tap", "--run-dir", stack.run_dir, "--no-heartbeats",
                          "--count", "5"], capture_output=True, text=True, timeout=30)
    assert tap.returncode == 0
    topics = {line.split()[1] for line in tap.stdout.splitlines()}
    assert {"source.file", f"source.file:{stack.service_port}/tcp", "plan", f"plan:{stack.service_port}/tcp"} <= topics
    assert any(t.startswith("applied.") for t in topics)

    # SIGTERM: TERMINATING while still forwarding; a second SIGTERM stops.
    stack.process.send_signal(signal.SIGTERM)
    wait_until(lambda: stack.status() == (503, "TERMINATING\n"), message="TERMINATING")
    assert stack.serving() == {"a", "b", "c"}
    stack.process.send_signal(signal.SIGTERM)
    assert stack.process.wait(timeout=40) == 0


def test_status_follows_the_proxies_not_the_control_plane():
    """/status fails within seconds of HAProxy not answering and recovers with it; a dead stage
    only shows in the details; HEAD /status answers the same status without a body."""
    run = Run()
    backend = TcpBackend("a")
    try:
        port = free_port()
        run.write([{"name": "web", "port": port, "servers": [{"host": "127.0.0.1", "port": backend.port}]}])
        run.start()
        run.wait_ok(timeout=90)
        head = urllib.request.urlopen(urllib.request.Request(run.url("/status"), method="HEAD"), timeout=3)
        assert head.status == 200 and head.read() == b"" and head.headers["Content-Length"] == "3"
        # A reload (the service was just added) may fail a probe or two: that is no outage.
        details = wait_until(lambda: (d := run.details())["proxies"].get("haproxy", {}).get("ok") and d,
                             timeout=15, message="HAProxy probed OK")
        # A stage first heard through a snapshot has no pid until its next heartbeat.
        stages = wait_until(lambda: (st := run.details()["stages"]) and
                            all(stage["alive"] and stage["pid"] for stage in st.values()) and st,
                            timeout=15, message="every stage alive with its pid")
        assert {"collector", "planner", "applier", "status"} <= {name.split("@")[0] for name in stages}

        # The data plane: HAProxy stopped -> 503 naming it; started again -> OK.
        assert "stopped" in run.supervisorctl("stop", "haproxy")
        code, body = wait_until(lambda: (s := run.status())[0] == 503 and s, timeout=10, message="503")
        assert body.startswith("UNAVAILABLE: haproxy not answering:"), body
        assert launcher_helpers.http_get(run.url("/status"), "HEAD") == (503, "")
        assert "started" in run.supervisorctl("start", "haproxy")
        run.wait_ok(timeout=30)
        wait_until(lambda: tcp_ask(port) == "a", timeout=30, message="traffic again")

        # The control plane: a stopped applier fails nothing, and shows.
        applier_pid = run.pid("applier")
        assert "stopped" in run.supervisorctl("stop", "applier")
        stage = wait_until(lambda: next((v for k, v in run.details()["stages"].items()
                                         if k.startswith("applier@") and not v["alive"]), None),
                           timeout=15, message="applier reported dead")
        assert stage["pid"] == applier_pid and stage["seconds_since_heard"] >= 2
        assert run.status() == (200, "OK\n")
        assert tcp_ask(port) == "a"
    finally:
        run.close()
        backend.close()
