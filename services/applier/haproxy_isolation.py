"""Which services HAProxy cannot take, so the driver sets those aside and serves the rest.

One service must never keep every other one from being served (marathon-lb's worst failure:
one app's port or block froze every route). Three ways a service can be refused, and how its
culprit is found here (the driver, haproxy_driver.py, acts on the answers):

- its listener cannot be bound (port held by another program, a low port without root): the
  driver probes new listeners before a reload (bindable.bind_error); a reload that fails all the
  same names the listener in HAProxy's startup messages (`bind_failures`);
- `haproxy -c` rejects the config: its ALERT lines name a line of the file or a proxy id, which
  `blame_alerts` maps to the service sections of the rendering; failing that, the driver
  validates subsets of the services (culprits.find, bounded) until the culprits are found.

Pure functions, except `ProgramLog` (reads the tail of HAProxy's own log file).
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from services.applier.haproxy_render import key_of_backend
from services.common.model import Service

_WHERE = re.compile(r"\[([^\[\]]+):(\d+)\]")
# A service's proxy id inside HAProxy's messages: svc_<port>_<tcp|udp>_<name> (haproxy_render.
# backend_id; the name part is [a-z0-9_.-]), or svc_<port>_<tcp|udp> (older configs). Only port
# and protocol are read: they are the service key (key_of_backend reads a whole id).
_PROXY_ID = re.compile(r"(?<![A-Za-z0-9_.-])svc_(\d+)_(tcp|udp)(?:_[a-z0-9_.-]+)?(?![A-Za-z0-9_-])")
# HAProxy 2.6: "Binding [haproxy.cfg:16] for proxy svc_10081_tcp_web: cannot bind socket (Address
# already in use) for [0.0.0.0:10081]"; older: "Starting frontend svc_10081_tcp_web: cannot bind
# socket (Address already in use) [0.0.0.0:10081]".
_BIND_FAILURE = re.compile(r"(?:for proxy|Starting (?:frontend|proxy)) (\S+?): cannot bind socket "
                           r"\(([^()]*)\)(?: for)? \[([^\[\]]*)\]")
_ERRNO_BY_TEXT = {os.strerror(number): number for number in errno.errorcode}


@dataclass(frozen=True)
class SetAside:
    """A service left out of HAProxy's config, and why."""

    service: Service
    reason: str  # names the service, its key and port, and the OS or HAProxy error
    kind: str  # "bind": its listener cannot be bound (probed again on a retry);
    #            "config": HAProxy rejected its section (tried again only once the service changes)


@dataclass(frozen=True)
class Section:
    """Where one service's section sits in a rendered config (1-based lines, inclusive)."""

    key: str  # service key, "port/protocol"
    first: int
    last: int


def section_lines(header: str, sections: Sequence[tuple[str, str]]) -> list[Section]:
    """The line range of each section of a config assembled as header + sections + newline,
    each section starting with the newline that ends the line before it (haproxy_render)."""
    line = header.count("\n") + 1  # the header's last line
    out = []
    for key, text in sections:
        lines = text.count("\n")
        out.append(Section(key, line + 1, line + lines))
        line += lines
    return out


def key_of_proxy(proxy: str) -> str | None:
    """svc_10081_tcp_web (or svc_10081_tcp) -> 10081/tcp; None for HAProxy's own proxies (stats...)."""
    return key_of_backend(proxy.strip("'\""))


def blame_alerts(alerts: Iterable[str], sections: Sequence[Section], config_name: str) -> dict[str, str]:
    """Service key -> the alerts that point into its section: a `[<file>:<line>]` of the file
    checked (named `config_name`) inside the section, or the service's proxy id. Alerts pointing
    nowhere (the header, a summary line) blame nobody."""
    keys = {section.key for section in sections}
    blamed: dict[str, list[str]] = {}
    for alert in alerts:
        culprits = set()
        for path, line in _WHERE.findall(alert):
            if os.path.basename(path) == os.path.basename(config_name):
                number = int(line)
                culprits.update(s.key for s in sections if s.first <= number <= s.last)
        for port, protocol in _PROXY_ID.findall(alert):
            if f"{port}/{protocol}" in keys:
                culprits.add(f"{port}/{protocol}")
        for key in culprits:
            blamed.setdefault(key, []).append(alert)
    return {key: "; ".join(messages[:3]) for key, messages in blamed.items()}


def bind_failures(log_text: str) -> dict[str, str]:
    """Service key -> OS error, from HAProxy's startup messages of a reload that could not bind
    its listeners, e.g. "[Errno 98] Address already in use"."""
    failures = {}
    for proxy, error, _address in _BIND_FAILURE.findall(log_text):
        key = key_of_proxy(proxy)
        if key is not None:
            failures[key] = os_error_text(error)
    return failures


def os_error_text(strerror: str) -> str:
    """"Address already in use" -> "[Errno 98] Address already in use" (as bind_error says it)."""
    number = _ERRNO_BY_TEXT.get(strerror.strip())
    return f"[Errno {number}] {strerror.strip()}" if number else strerror.strip()


def rejected_reason(service: Service, message: str) -> str:
    return f"service {service.name} ({service.key}): HAProxy rejected its section: {message}"


class ProgramLog:
    """The tail of HAProxy's own output (`<run_dir>/logs/haproxy.log`, where supervisord and
    sim.pipeline put it): the only place HAProxy 2.6 says why a reload failed (its master CLI
    has no `show startup-logs`)."""

    def __init__(self, path: str):
        self.path = path

    def offset(self) -> int:
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def since(self, offset: int, limit: int = 1 << 20) -> str:
        """What was written after `offset` (from the start when the log was rotated meanwhile)."""
        try:
            with open(self.path, "rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                start = offset if offset <= size else 0
                handle.seek(max(start, size - limit))
                return handle.read().decode(errors="replace")
        except OSError:
            return ""
