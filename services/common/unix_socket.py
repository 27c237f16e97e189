"""One request/answer exchange over a unix socket (HAProxy's CLI, Pen's control socket,
HAProxy's statistics page): connect, send, read until the peer closes."""
from __future__ import annotations

import socket


def exchange(path: str, payload: bytes, timeout: float, half_close: bool = False) -> bytes:
    """Raises OSError (including socket.timeout) when the peer is not there or too slow.
    `half_close` shuts our side down after sending, for peers that answer at end of input."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(path)
        conn.sendall(payload)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)
