"""Separate "hosts" on one machine for tests: network namespaces joined by a bridge.

    net = Network(["c1", "n1", "n2"])        # creates nothing yet
    net.create()                             # bridge, namespaces, veth pairs, addresses, lo up
    net.ip("c1")                             # '10.213.37.1'
    proc = net.popen("c1", [sys.executable, "-m", "http.server"])   # runs inside c1
    with net.inside("n1"):                   # this thread's sockets are n1's
        socket.create_connection(("127.0.0.1", 80))
    net.thread("n1", target=fn).start()      # a thread living in n1
    net.close()                              # every process in the namespaces killed,
                                             # namespaces, veths and the bridge deleted

Everything is named `pmn<pid>...` (the pid of the process that made it), so two runs side by side
never collide, and a run finds the leftovers of a crashed one (its pid is no longer a live
Python) and removes them before it starts. The addresses are a private 10.213.X.0/24 not
configured anywhere else on this machine; the bridge has the .254 address in the root namespace
so the test process itself reaches every namespace (status endpoints), and nothing is routed
anywhere else: no default route in a namespace, no forwarding set up.

Needs root and `ip netns` (iproute2); `skip_reason()` says why not, for `pytest.skip`.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from typing import Callable, Iterator

PREFIX = "pmn"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str, check: bool = True, namespace: str | None = None) -> str:
    argv = ["ip", *(("-n", namespace) if namespace else ()), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def skip_reason() -> str:
    """Why namespaces cannot be made here ('' when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the test as root)"
    if not shutil.which("ip"):
        return "`ip` (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        return f"`ip netns add` does not work here: {error}"
    finally:
        _ip("netns", "del", probe, check=False)
    return ""


def _owner_alive(pid: int) -> bool:
    """A run's owner is alive when its pid is a live Python process (not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[-1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
    except (OSError, IndexError):
        return False
    return state != b"Z" and b"python" in cmdline


def namespace_pids(full_name: str) -> set[int]:
    """Every process whose network namespace is `full_name` (`ip netns pids`)."""
    out = _ip("netns", "pids", full_name, check=False)
    return {int(word) for word in out.split() if word.isdigit()}


def _kill_namespace_processes(full_name: str, timeout: float = 10.0) -> set[int]:
    """SIGKILL every process in the namespace until none is left; returns the survivors."""
    deadline = time.monotonic() + timeout
    while True:
        pids = namespace_pids(full_name) - {os.getpid()}
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)  # the kernel reaping them; bounded by the deadline


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list", check=False).splitlines() if line.strip()]


def _links() -> list[str]:
    names = []
    for line in _ip("-o", "link", "show", check=False).splitlines():
        match = re.match(r"\d+:\s+([^:@\s]+)", line)
        if match:
            names.append(match.group(1))
    return names


def _owner(name: str) -> int | None:
    match = re.match(rf"{PREFIX}(\d+)", name)
    return int(match.group(1)) if match else None


def clean_leftovers(keep: int | None = None) -> list[str]:
    """Remove the namespaces and links of runs whose owner is gone (a crashed or killed test);
    never those of a live run nor `keep`'s. Returns what was removed."""
    removed = []
    for name in _namespaces():
        owner = _owner(name)
        if owner is None or owner == keep or _owner_alive(owner):
            continue
        _kill_namespace_processes(name)
        _ip("netns", "del", name, check=False)
        removed.append(name)
    for name in _links():
        owner = _owner(name)
        if owner is None or owner == keep or _owner_alive(owner):
            continue
        _ip("link", "del", name, check=False)
        removed.append(name)
    return removed


def _subnet_in_use() -> set[int]:
    used = set()
    for line in _ip("-o", "-4", "addr", "show", check=False).splitlines():
        match = re.search(r"inet 10\.213\.(\d+)\.", line)
        if match:
            used.add(int(match.group(1)))
    for line in _ip("-4", "route", "show", check=False).splitlines():
        match = re.match(r"10\.213\.(\d+)\.", line)
        if match:
            used.add(int(match.group(1)))
    return used


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


class Network:
    """A bridge and one namespace per name, each with one address on a private /24."""

    def __init__(self, names: list[str]):
        if len(set(names)) != len(names) or not all(re.fullmatch(r"[a-z0-9]{1,6}", n) for n in names):
            raise ValueError(f"namespace names must be unique, 1-6 lower-case letters or digits: {names}")
        if len(names) > 200:
            raise ValueError("at most 200 namespaces")
        self.tag = f"{PREFIX}{os.getpid()}"
        self.names = list(names)
        self.bridge = f"{self.tag}br"
        self.subnet: int | None = None
        self.processes: list[subprocess.Popen] = []
        self.created: list[str] = []  # namespaces made so far (close() removes them)
        self._lock = threading.Lock()

    # -- names and addresses -------------------------------------------------------------
    def full(self, name: str) -> str:
        """The namespace's real name (`ip netns exec <this>`)."""
        if name not in self.names:
            raise KeyError(name)
        return f"{self.tag}-{name}"

    def ip(self, name: str) -> str:
        return f"10.213.{self.subnet}.{self.names.index(name) + 1}"

    @property
    def host_ip(self) -> str:
        """The root namespace's address on the bridge (where the test process talks from)."""
        return f"10.213.{self.subnet}.254"

    # -- making and removing -------------------------------------------------------------
    def create(self) -> "Network":
        clean_leftovers(keep=os.getpid())
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self) -> None:
        used = _subnet_in_use()
        start = os.getpid() % 200 + 20
        free = [x for x in list(range(start, 250)) + list(range(20, start)) if x not in used]
        if not free:
            raise RuntimeError("no free 10.213.X.0/24 subnet")
        self.subnet = free[0]
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index, name in enumerate(self.names):
            full = self.full(name)
            _ip("netns", "add", full)
            self.created.append(full)
            veth = f"{self.tag}v{index}"
            # The peer is made inside the namespace under the name eth0: no clash between runs.
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", full)
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("addr", "add", f"{self.ip(name)}/24", "dev", "eth0", namespace=full)
            _ip("link", "set", "eth0", "up", namespace=full)
            _ip("link", "set", "lo", "up", namespace=full)

    def close(self) -> list[str]:
        """Kill every process started here and every process still in a namespace (children,
        daemons, HAProxy workers: whatever lives there), delete the namespaces, the veths and
        the bridge. Returns problems (survivors, links left), empty when all went."""
        problems = []
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
        for full in self.created:
            survivors = _kill_namespace_processes(full)
            if survivors:
                problems.append(f"{full}: processes survived SIGKILL: {sorted(survivors)}")
            _ip("netns", "del", full, check=False)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream:
                    stream.close()
        for name in _links():
            if name.startswith(self.tag):
                _ip("link", "del", name, check=False)
        left = [name for name in _links() if name.startswith(self.tag)]
        left += [name for name in _namespaces() if name.startswith(self.tag + "-")]
        if left:
            problems.append(f"left behind: {left}")
        self.created = []
        return problems

    def __enter__(self) -> "Network":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running things inside -----------------------------------------------------------
    def popen(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start `argv` inside the namespace in a process group of its own (`ip netns exec`
        execs it: the Popen's pid is the program's)."""
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        process = subprocess.Popen(["ip", "netns", "exec", self.full(name), *argv], start_new_session=True, **kwargs)
        with self._lock:
            self.processes.append(process)
        return process

    def run(self, name: str, argv: list[str], timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.full(name), *argv], timeout=timeout, **kwargs)

    @staticmethod
    def kill(process: subprocess.Popen, sig: int = signal.SIGKILL, group: bool = True) -> None:
        """Signal a process started with popen() (its whole process group by default)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(process.pid, sig)
            else:
                process.send_signal(sig)

    def pids(self, name: str) -> set[int]:
        """Every live process in the namespace."""
        return namespace_pids(self.full(name))

    @contextlib.contextmanager
    def inside(self, name: str) -> Iterator[None]:
        """The calling thread in the namespace (sockets it creates are the namespace's), back in
        its own afterwards. Only this thread moves: setns(2) on a network namespace is per thread."""
        with open("/proc/thread-self/ns/net", "rb") as own, open(f"/run/netns/{self.full(name)}", "rb") as target:
            _setns(target.fileno())
            try:
                yield
            finally:
                _setns(own.fileno())

    def thread(self, name: str, target: Callable[..., object], *args, daemon: bool = True,
               **kwargs) -> threading.Thread:
        """A thread (not started) running `target` inside the namespace."""
        def body() -> None:
            with self.inside(name):
                target(*args, **kwargs)
        return threading.Thread(target=body, daemon=daemon, name=f"netns-{name}")

    def call(self, name: str, fn: Callable[[], object], timeout: float = 30) -> object:
        """fn() run inside the namespace (in a short-lived thread); its result or exception."""
        box: dict[str, object] = {}

        def body() -> None:
            try:
                box["value"] = fn()
            except BaseException as error:  # handed to the caller
                box["error"] = error
        worker = self.thread(name, body)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            raise TimeoutError(f"call in {name} still running after {timeout}s")
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box.get("value")


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread meanwhile, so a run stopped with
    `kill` or `timeout` still tears its namespaces down (`finally` blocks run); SIGKILL leaves
    them to the next run's clean_leftovers()."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, _frame) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def assert_clean(tag: str) -> None:
    """Nothing of the run `tag` (`pmn<pid>`) left: no namespace, no link."""
    left = [n for n in _namespaces() if n.startswith(tag + "-")] + [n for n in _links() if n.startswith(tag)]
    assert not left, f"left behind: {left}"


__all__ = ["Network", "skip_reason", "clean_leftovers", "namespace_pids", "assert_clean", "sigterm_interrupts"]
