"""Is pid N still the process we think it is? Checked before signalling a pid read from a file:
a pid file can be stale (the pid recycled by another program) or written by a process that
dropped root, so a pid alone is never enough to send a signal."""
from __future__ import annotations

import os
import shutil
import signal
from typing import Callable

DELETED = " (deleted)"  # readlink of /proc/<pid>/exe when the binary was replaced since


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as source:
            return [part.decode(errors="replace") for part in source.read().split(b"\0") if part]
    except OSError:
        return []


def executable(pid: int) -> str | None:
    """The program file pid `pid` runs, or None when it is gone or not ours to inspect."""
    try:
        path = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return path[:-len(DELETED)] if path.endswith(DELETED) else path


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat): with
    the pid, it names one process for good, since a recycled pid starts later."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as source:
            fields = source.read().rpartition(")")[2].split()
    except OSError:
        return None
    # fields[0] is field 3 (state): field 22 is fields[19]
    return fields[19] if len(fields) > 19 else None


def children(pid: int) -> set[int]:
    """The pids whose parent is `pid`."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as source:
                fields = source.read().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[1] == str(pid):  # fields[1] is field 4, the parent's pid
            found.add(int(entry))
    return found


def resolve(binary: str) -> str | None:
    found = shutil.which(binary)
    return os.path.realpath(found) if found else None


def executes(pid: int, binary: str) -> bool:
    """True when `pid` runs the program file `binary` resolves to (a process can rewrite its
    command line, not its executable)."""
    expected = resolve(binary)
    actual = executable(pid)
    return expected is not None and actual is not None and os.path.realpath(actual) == expected


def signal_verified(pid: int, signum: int, verify: Callable[[int], bool]) -> bool:
    """Send `signum` to `pid` only if `verify(pid)` holds. The pid is pinned first (a pidfd), so
    it cannot be recycled between the check and the signal. False when nothing was sent."""
    if pid <= 0:
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not verify(pid):
            return False
        signal.pidfd_send_signal(pidfd, signum)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def identity(pid: int) -> str:
    """`<pid> <start time>`: what a pid file should hold to be checked with `same_process`."""
    return f"{pid} {start_time(pid) or ''}".strip()


def same_process(text: str) -> int | None:
    """The pid recorded by `identity`, when that very process is still running; else None.
    A file holding only a pid (older format) is trusted when the pid is alive."""
    parts = text.split()
    try:
        pid = int(parts[0])
    except (IndexError, ValueError):
        return None
    if pid <= 0:
        return None
    started = start_time(pid)
    if started is None or (len(parts) > 1 and parts[1] != started):
        return None
    return pid
