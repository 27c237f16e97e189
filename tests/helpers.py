"""Shared test utilities: free ports, polling with a deadline, small real backends."""
from __future__ import annotations

import collections
import json
import os
import socket
import threading
import time
from typing import Callable, TypeVar

from services.applier.driver import DriverResult, ProxyDriver
from services.common.model import Plan
from sim.backends import (  # noqa: F401  (re-exported for tests)
    EchoBackend, HttpBackend, ServedBackend, TcpBackend, UdpEcho)

T = TypeVar("T")


# Ports handed out lately: the kernel may give the same free port to two binds in a row, and a
# test asking for several ports needs them distinct.
_RECENT_PORTS: "collections.deque[int]" = collections.deque(maxlen=2048)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free on 127.0.0.1 now, not handed out by this function lately."""
    while True:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _RECENT_PORTS:
            _RECENT_PORTS.append(port)
            return port


def free_ports(count: int, kind: int = socket.SOCK_STREAM) -> list[int]:
    """`count` distinct free ports."""
    return [free_port(kind) for _ in range(count)]


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; fail with `message` at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:  # the thing polled may not be up yet
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}"
                         + (f" (last error: {last_error!r})" if last_error else ""))


def tcp_ask(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> str:
    """Connect to a TcpBackend (possibly through a proxy) and return the name it answers."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(256)
            if not chunk:
                break
            data += chunk
    return data.decode().strip()


def udp_ask(port: int, sock: socket.socket | None = None) -> str:
    own = sock is None
    sock = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(0.5)
        sock.sendto(b"ping", ("127.0.0.1", port))
        return sock.recv(2048).decode().split(":")[0]
    finally:
        if own:
            sock.close()


class Load(threading.Thread):
    """Requests through a proxy in a loop (`ask(port)` returns the backend's answer), counting
    failures: for "zero failed requests while X changes" assertions."""

    def __init__(self, port: int, ask: Callable[[int], str] | None = None):
        super().__init__(daemon=True)
        self.port, self.ask = port, ask or (lambda p: tcp_ask(p, timeout=3))
        self.ok, self.failures = 0, []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                assert self.ask(self.port), "empty answer"
                self.ok += 1
            except Exception as error:  # every kind of failure counts
                self.failures.append(repr(error))

    def stop(self) -> None:
        self.done.set()
        self.join()


class RecordingDriver(ProxyDriver):
    """A driver that records the plans it was asked to apply and always succeeds."""

    name = "recording"

    def __init__(self):
        self.applied: list[str] = []

    def apply(self, plan: Plan) -> DriverResult:
        self.applied.append(plan.hash)
        return DriverResult(self.name, True, "runtime")


def write_services(path: str, services: list[dict]) -> None:
    """A services file replaced whole (rename), as an operator's tool would: the collector never
    reads half a file."""
    with open(path + ".tmp", "w") as handle:
        json.dump({"services": services}, handle)
    os.replace(path + ".tmp", path)


def services_entry(name: str, port: int, *backends) -> dict:
    """One services-file entry on 127.0.0.1: `backends` are ports or objects with a `.port`."""
    return {"name": name, "port": port,
            "servers": [{"host": "127.0.0.1", "port": getattr(b, "port", b)} for b in backends]}


class FakeUnixServer:
    """A unix socket answering every request with `answer` (Pen's `pid`, HAProxy's `show proc`,
    `show info` or `show stat`) and recording the requests; `hung` makes it say nothing."""

    def __init__(self, path: str, answer: str):
        self.path = path
        self.answer = answer
        self.requests: list[bytes] = []
        self.hung = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                self.requests.append(conn.recv(256))
                if not self.hung.is_set():
                    conn.sendall(self.answer.encode())
                else:
                    conn.settimeout(3)
                    try:
                        conn.recv(64)  # say nothing until the client gives up
                    except OSError:
                        pass

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.listener.close()
        os.unlink(self.path)
        self.thread.join(timeout=5)
