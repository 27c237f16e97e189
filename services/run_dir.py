"""The launcher's hold on its run dir: private permissions, one launcher at a time (an flock
held for the launcher's life), and no leftovers of a previous run (processes, sockets, pid
files) before a start or after a stop.

Every process of one instance carries INSTANCE_ENV=<run dir> in its environment (supervisord
passes the launcher's on, exec keeps it), which is how leftovers of an unclean stop are found.
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import stat
import time

log = logging.getLogger("proxymatic.launcher")

INSTANCE_ENV = "PROXYMATIC_INSTANCE"
LOCK_FILE = "proxymatic.lock"


class RunDirInUse(RuntimeError):
    pass


def prepare_run_dir(path: str, mode: int) -> None:
    """Create the run dir with `mode`, or set an existing one of ours to it. A shared directory
    (sticky, like /tmp, or someone else's) is left alone with a warning."""
    os.makedirs(path, mode=mode, exist_ok=True)
    info = os.stat(path)
    current = stat.S_IMODE(info.st_mode)
    if current == mode:
        return
    if info.st_uid != os.geteuid() or current & stat.S_ISVTX:
        log.warning("proxymatic: run dir %s is mode %o and shared: not changing it; its files stay private",
                    path, current)
        return
    os.chmod(path, mode)


class RunDirLock:
    """An exclusive flock on <run dir>/proxymatic.lock, which records the holder's pid."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirInUse(f"run dir {os.path.dirname(self.path)} is in use by another proxymatic "
                              f"(pid {holder}); give this one another --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _environment(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as source:
            return source.read()
    except OSError:
        return b""


def leftover_processes(run_dir: str) -> list[int]:
    """Processes (other than us) of an instance on `run_dir`."""
    marker = f"{INSTANCE_ENV}={run_dir}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and marker in _environment(int(entry)).split(b"\0"):
            found.append(int(entry))
    return found


def stop_leftovers(run_dir: str, grace: float = 10.0) -> list[int]:
    """SIGTERM every leftover of `run_dir`, SIGKILL what is still there after `grace` seconds."""
    pids = leftover_processes(run_dir)
    if not pids:
        return []
    log.warning("proxymatic: stopping %d leftover process(es) of a previous run on %s: %s",
                len(pids), run_dir, pids)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and leftover_processes(run_dir):
            time.sleep(0.05)
        pids = leftover_processes(run_dir)
        if not pids:
            break
    return pids


def remove_stale_files(run_dir: str) -> list[str]:
    """Remove every unix socket and pid file under `run_dir` (call only while no process of the
    instance runs): a stale supervisor.sock or bus socket would otherwise confuse the next start."""
    removed = []
    for directory, _dirs, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(directory, name)
            try:
                is_socket = stat.S_ISSOCK(os.lstat(path).st_mode)
            except FileNotFoundError:
                continue
            if is_socket or name.endswith(".pid"):
                try:
                    os.unlink(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
    return removed
