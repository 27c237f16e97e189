"""Atomic file writes shared by every renderer (after consul-template's renderer)."""
from __future__ import annotations

import os
import tempfile


def write_atomic(path: str, text: str, skip_if_same: bool = True, mode: int = 0o600,
                 group: int | None = None) -> bool:
    """Write `text` to `path` through a temp file + fsync + rename (+ fsync of the directory, so
    the rename survives a crash). Returns False when the file already said so (not checked with
    `skip_if_same=False`, for callers that know it differs and want to spare the read).
    Files are private (0600) by default: configs and state may name internal addresses, and
    only the processes of this instance (one user) read them. `group`: the file's group id (set
    before the mode, so the file is never readable by more than it should)."""
    if skip_if_same:
        try:
            with open(path, "rb") as current:  # bytes: a damaged file (not UTF-8) just differs
                if current.read() == text.encode("utf-8"):
                    return False
        except FileNotFoundError:
            pass
    directory = os.path.dirname(path) or "."
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        if group is not None:
            os.chown(temp, -1, group)
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(directory)
    return True


def fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_text_or_none(path: str) -> str | None:
    """The file's text (UTF-8, as write_atomic writes it); None when it cannot be read (missing,
    unreadable, a directory)."""
    try:
        with open(path, encoding="utf-8") as source:
            return source.read()
    except OSError:
        return None
