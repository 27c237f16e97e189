"""Shared test utilities: free ports, polling with a deadline, small real backends."""
from __future__ import annotations

import socket
import threading
import time
from typing import Callable, TypeVar

from services.applier.driver import DriverResult, ProxyDriver
from services.common.model import Plan
from sim.backends import (  # noqa: F401  (re-exported for tests)
    EchoBackend, HttpBackend, ServedBackend, TcpBackend, UdpEcho)

T = TypeVar("T")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
