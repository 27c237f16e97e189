"""A real etcd (v2 API enabled) for tests: free ports, temp data dir, health wait, restart.

    with EtcdServer() as etcd:          # or the `etcd_server` fixture (module scope)
        etcd.client().write("/services/web/h:web.0:80", "10.0.0.1:8080")
        etcd.stop(); etcd.start()       # restart keeping the data dir and the ports

The server is tuned to start fast (short heartbeat/election timeouts, single member) and is
stopped with SIGTERM, then SIGKILL after a grace period. Use `url(prefix)` for an
`etcd://host:port/prefix` REGISTRATOR_URL.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Iterator

import pytest
import requests

from tests.helpers import free_port, wait_until

ETCD_BINARY = shutil.which("etcd") or "/usr/bin/etcd"


class EtcdServer:
    def __init__(self, data_dir: str | None = None, startup_timeout: float = 20.0):
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="etcd-test-")
        self.client_port = free_port()
        self.peer_port = free_port()
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self._log = None

    # -- addresses -----------------------------------------------------------------------
    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.host_port}"

    def url(self, prefix: str = "/services") -> str:
        """The REGISTRATOR_URL form: etcd://127.0.0.1:<port>/<prefix>."""
        return f"etcd://{self.host_port}/{prefix.strip('/')}"

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "EtcdServer":
        if self.running:
            return self
        peer = f"http://127.0.0.1:{self.peer_port}"
        command = [
            ETCD_BINARY, "--enable-v2",
            "--name", "test",
            "--data-dir", os.path.join(self.data_dir, "data"),
            "--listen-client-urls", self.base_url,
            "--advertise-client-urls", self.base_url,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}",
            "--heartbeat-interval", "10",
            "--election-timeout", "100",
            "--log-level", "error",
        ]
        self._log = open(os.path.join(self.data_dir, "etcd.log"), "ab")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        try:
            wait_until(self.healthy, timeout=self.startup_timeout, interval=0.05,
                       message=f"etcd on {self.host_port} to become healthy (log: {self.log_path})")
        except AssertionError:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), like a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log_path(self) -> str:
        return os.path.join(self.data_dir, "etcd.log")

    def healthy(self) -> bool:
        if not self.running:
            raise AssertionError(f"etcd exited with {self.process.returncode if self.process else None}; "
                                 f"see {self.log_path}")
        try:
            # A v2 read proves both that the member serves and that the v2 store is enabled.
            response = requests.get(f"{self.base_url}/v2/keys/", timeout=1)
            return response.status_code == 200
        except requests.RequestException:
            return False

    # -- convenience ---------------------------------------------------------------------
    def client(self, **kwargs):
        """A python-etcd client on this server (a new one each call)."""
        import etcd
        return etcd.Client(host="127.0.0.1", port=self.client_port, **kwargs)

    def __enter__(self) -> "EtcdServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture(scope="module")
def etcd_server() -> Iterator[EtcdServer]:
    """One etcd per test module; tests use distinct prefixes so they do not interfere."""
    server = EtcdServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


def unique_prefix(name: str) -> str:
    return f"/t-{name}-{time.monotonic_ns()}"
