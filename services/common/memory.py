"""Giving freed memory back to the system after a large, short-lived allocation.

A full read of a large cluster (Marathon's /v2/apps for 10,000 apps) builds hundreds of MB of
short-lived JSON objects; once they are freed, glibc keeps most of that heap mapped, so the
process's RSS stays at its peak although Python no longer uses it. `malloc_trim` returns it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl...): nothing to give back this way
        return None


def release_freed_memory() -> None:
    """Return the heap's free pages to the system (a few ms; call after a large read)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
