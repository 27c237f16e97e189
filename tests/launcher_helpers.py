"""Running the real `proxymatic` launcher in tests, and finding every process of its run.

A process belongs to a run when its command line or environment mentions the run dir (the
launcher hands its programs RUN_DIR and PROXYMATIC_INSTANCE by environment), or when it
descends from one that does (nginx's workers rename themselves and rewrite their environment).
`Run.close()` kills whatever is left, so no test leaves a process behind even when it fails.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

from tests.helpers import free_port, wait_until

BIN = os.path.dirname(sys.executable)


def http_get(url: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as source:
            return source.read()
    except OSError:
        return b""


def _stat(pid: int) -> tuple[str, int]:
    """(state letter, parent pid) of a process; ("", 0) when it is gone."""
    fields = _read(f"/proc/{pid}/stat").rsplit(b")", 1)[-1].split()
    return (fields[0].decode(), int(fields[1])) if len(fields) > 1 else ("", 0)


def processes_of(run_dir: str) -> set[int]:
    """Every live process mentioning `run_dir` in its command line or environment, and their
    descendants."""
    needle = run_dir.encode()
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    found = {pid for pid in pids if needle in _read(f"/proc/{pid}/cmdline") or needle in _read(f"/proc/{pid}/environ")}
    stats = {pid: _stat(pid) for pid in pids}
    parents = {pid: parent for pid, (_state, parent) in stats.items()}
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        grew = bool(children)
        found |= children
    # A zombie waiting for its parent to reap it is gone for our purposes.
    return {pid for pid in found if stats[pid][0] not in ("Z", "")}


def port_free(port: int, kind: int = socket.SOCK_STREAM) -> bool:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stale_files(run_dir: str) -> list[str]:
    """Sockets and pid files under `run_dir`."""
    found = []
    for directory, _dirs, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(directory, name)
            if name.endswith(".pid") or (os.path.exists(path) and stat.S_ISSOCK(os.lstat(path).st_mode)):
                found.append(path)
    return found


class Run:
    """One run dir (in a fresh temp dir) and the launchers started on it."""

    def __init__(self, **options: str):
        self.base = tempfile.mkdtemp(prefix="pml")
        self.run_dir = os.path.join(self.base, "run")  # created by the launcher
        self.services_file = os.path.join(self.base, "services.json")
        self.status_port = free_port()
        self.options = options
        self.launchers: list[subprocess.Popen] = []

    def start(self, *extra: str, env: dict | None = None, capture: bool = False) -> subprocess.Popen:
        argv = [os.path.join(BIN, "proxymatic"), "--services-file", self.services_file, "--run-dir", self.run_dir,
                "--status-endpoint", f"127.0.0.1:{self.status_port}", *extra]
        for name, value in self.options.items():
            argv += [f"--{name.replace('_', '-')}", value]
        process = subprocess.Popen(argv, start_new_session=True, env={**os.environ, **(env or {})},
                                   stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                                   stderr=subprocess.PIPE if capture else subprocess.DEVNULL, text=True)
        self.launchers.append(process)
        return process

    def write(self, services: list[dict]) -> None:
        temporary = self.services_file + ".tmp"
        with open(temporary, "w") as handle:
            json.dump({"services": services}, handle)
        os.replace(temporary, self.services_file)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.status_port}{path}"

    def status(self, method: str = "GET") -> tuple[int, str]:
        return http_get(self.url("/status"), method)

    def details(self) -> dict:
        return json.loads(http_get(self.url("/status/details"))[1])

    def wait_ok(self, timeout: float = 60) -> None:
        wait_until(lambda: self.status()[0] == 200, timeout=timeout, interval=0.2, message="/status OK")

    def supervisorctl(self, *args: str) -> str:
        return subprocess.run([os.path.join(BIN, "supervisorctl"), "-c", os.path.join(self.run_dir, "supervisord.conf"),
                               *args], capture_output=True, text=True, timeout=60).stdout.strip()

    def pid(self, program: str) -> int:
        answer = self.supervisorctl("pid", program)
        return int(answer) if answer.isdigit() else 0

    def processes(self) -> set[int]:
        return processes_of(self.run_dir)

    def close(self) -> None:
        """Kill everything of this run still alive (a failed test must not leak), remove the dir."""
        for process in self.launchers:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        try:
            wait_until(lambda: not self.processes(), timeout=15, interval=0.2, message="the run's processes gone")
        finally:
            for pid in self.processes():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for process in self.launchers:
                for stream in (process.stdout, process.stderr):
                    if stream:
                        stream.close()
            shutil.rmtree(self.base, ignore_errors=True)
