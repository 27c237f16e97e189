"""Whether a proxy could bind a listening port: probed before a config that adds listeners is
loaded, so a port held by another program sets aside one service instead of failing the load."""
from __future__ import annotations

import socket

from services.common.model import Service


def bind_error(host: str, port: int, protocol: str = "tcp") -> str | None:
    """None when `host:port` can be bound now; otherwise the OS error, e.g.
    "[Errno 98] Address already in use". Binds with SO_REUSEADDR, as the proxies do, and
    releases the port at once."""
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host or "0.0.0.0", port))
            if kind == socket.SOCK_STREAM:
                probe.listen(1)
    except OSError as error:
        return f"[Errno {error.errno}] {error.strerror}" if error.errno else str(error)
    return None


def unbindable_reason(service: Service, error: str) -> str:
    """Why a service is set aside when its port cannot be bound (every driver says it so)."""
    return f"service {service.name} ({service.key}): port {service.port} cannot be bound: {error}"
