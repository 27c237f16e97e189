"""Die with the parent: Linux's prctl(PR_SET_PDEATHSIG) through ctypes.

The signal is delivered when the parent (thread) that forked us exits, however it exits (kill -9
included); it survives exec, so a program that execs HAProxy or nginx hands it to their masters.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send `signum` when our parent dies. False where prctl is unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with(parent_pid: int, signum: int) -> None:
    """Set the parent-death signal, then make sure `parent_pid` was not already gone before it
    was set (the signal would never come): exit at once if we were reparented."""
    set_parent_death_signal(signum)
    if os.getppid() != parent_pid:
        os._exit(1)
