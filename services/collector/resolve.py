"""Host name -> IP address for discovered backends (proxies want addresses), cached briefly.

A host that does not resolve is remembered for a shorter time so that a DNS outage costs one
lookup per host per `negative_ttl`, not one per task per refresh.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from typing import Callable

log = logging.getLogger("proxymatic.collector")


def lookup_address(host: str) -> str | None:
    """One IP address of `host` (IPv4 preferred, no IPv6 scope id), or None."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    addresses = [info[4][0].split("%", 1)[0] for info in infos]
    v4 = [a for a in addresses if ":" not in a]
    return (v4 or addresses or [None])[0]


class Resolver:
    def __init__(self, ttl: float = 30.0, negative_ttl: float = 5.0,
                 lookup: Callable[[str], str | None] = lookup_address, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._lookup = lookup
        self._clock = clock
        self._cache: dict[str, tuple[str | None, float]] = {}
        self._lock = threading.Lock()
        self.lookups = 0

    def __call__(self, host: str) -> str | None:
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            pass
        if not host or len(host) > 253 or any(c.isspace() for c in host):
            return None
        now = self._clock()
        with self._lock:
            cached = self._cache.get(host)
            if cached and cached[1] > now:
                return cached[0]
        self.lookups += 1
        address = self._lookup(host)
        if address is None:
            log.debug("host %r does not resolve", host)
        with self._lock:
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[host] = (address, now + (self.ttl if address else self.negative_ttl))
        return address
