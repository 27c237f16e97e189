"""What changed in a source's services from one snapshot to the next, for the change log: one
INFO line per changed service (`+ip:port`, `-ip:port`, `~weight ...`, added, removed) naming
the source, the service and why (the event types behind it, "poll" or "resync"), at most
MAX_LINES per snapshot and then one "... and N more" line.

Every line carries its facts as logger fields (`extra`), so a JSON log formatter shows them:
`source`, `service` (the key, "port/protocol"), `service_name`, `change` (the change text) and
`event` (the cause).
"""
from __future__ import annotations

import logging
from bisect import bisect_left
from typing import Iterable, Mapping

from services.common.model import Server, Service

MAX_LINES = 20  # per snapshot
MAX_ITEMS = 10  # changes named per line


def _server_text(server: Server) -> str:
    return server.address


def _server_changes(old: Service, new: Service) -> list[str]:
    before = {(s.ip, s.port): s for s in old.servers}
    after = {(s.ip, s.port): s for s in new.servers}
    items: list[str] = []
    for address, server in after.items():
        previous = before.get(address)
        if previous is None:
            items.append(f"+{_server_text(server)}")
        elif previous != server:
            if previous.weight != server.weight:
                items.append(f"~weight {previous.weight}->{server.weight} {_server_text(server)}")
            if previous.maxconn != server.maxconn:
                items.append(f"~maxconn {previous.maxconn}->{server.maxconn} {_server_text(server)}")
            if previous.hostname != server.hostname:
                items.append(f"~hostname {previous.hostname or '-'}->{server.hostname or '-'} {_server_text(server)}")
    for address, server in before.items():
        if address not in after:
            items.append(f"-{_server_text(server)}")
    return items


_ATTRIBUTES = ("name", "mode", "timeout_client", "timeout_server", "host_network")


def describe_change(old: Service, new: Service) -> str:
    """`+10.0.0.1:80 -10.0.0.2:80 ~weight 500->200 10.0.0.3:80 ~mode tcp->http`, at most
    MAX_ITEMS items, then how many more."""
    items = [f"~{attribute} {getattr(old, attribute)}->{getattr(new, attribute)}"
             for attribute in _ATTRIBUTES if getattr(old, attribute) != getattr(new, attribute)]
    if old.health_check != new.health_check:
        items.append("~health_check")
    items.extend(_server_changes(old, new))
    if not items:
        return "~changed"
    shown = " ".join(items[:MAX_ITEMS])
    return shown if len(items) <= MAX_ITEMS else f"{shown} (and {len(items) - MAX_ITEMS} more)"


def _servers_text(service: Service) -> str:
    shown = " ".join(f"+{_server_text(s)}" for s in service.servers[:MAX_ITEMS])
    more = len(service.servers) - MAX_ITEMS
    text = f"service added ({len(service.servers)} servers)"
    if shown:
        text += f": {shown}"
    return text + (f" (and {more} more)" if more > 0 else "")


def _place(service: Service) -> tuple[int, str]:
    return service.port, service.protocol


class ChangeLog:
    """Remembers a source's last services (by key) and logs what the next ones change.
    One per source runner (not thread-safe)."""

    def __init__(self, source: str, logger: logging.Logger, services: Iterable[Service] = ()):
        self.source = source
        self.log = logger
        self._by_key: dict[str, Service] = {s.key: s for s in services}
        self._last: tuple[Service, ...] | None = None

    def changes(self, services: tuple[Service, ...], changed: Iterable[str] | None = None
                ) -> list[tuple[str, str, str]]:
        """(key, name, change) per changed service, in key order of the new services then the
        removed ones. Remembers `services` as the last ones.

        `changed`: the keys that may differ from the last services (Discovery.changed), when the
        source knows them and `services` are sorted by (port, protocol): only those keys are
        compared, whatever the number of services.

        Cheap when few services changed, which is the common case: sources reuse the Service
        objects that did not change and keep them sorted by key, so the two tuples are compared
        position by position, by identity; only when services were added or removed are they
        matched by key."""
        last = self._last
        if services is last:
            return []
        if changed is not None and last is not None:
            try:
                return self._changes_of(services, changed)
            except ValueError:  # a key that is not port/protocol: compare everything
                pass
        if last is not None and len(last) == len(services):
            found: list[tuple[str, str, str]] = []
            for old, new in zip(last, services):
                if old is new:
                    continue
                if old.port != new.port or old.protocol != new.protocol:
                    break  # keys moved: one added, one removed
                if old.digest != new.digest:
                    found.append((new.key, new.name, describe_change(old, new)))
            else:
                self._last = services
                self._by_key = {}  # rebuilt only if the next call needs it
                return found
        before = self._by_key if last is None or self._by_key else {s.key: s for s in last}
        after: dict[str, Service] = {}
        found = []
        for service in services:
            key = service.key
            after[key] = service
            old = before.get(key)
            if old is service:
                continue
            if old is None:
                found.append((key, service.name, _servers_text(service)))
            elif old.digest != service.digest:
                found.append((key, service.name, describe_change(old, service)))
        if len(after) != len(before) or found:
            for key, old in before.items():
                if key not in after:
                    found.append((key, old.name, f"service removed ({len(old.servers)} servers)"))
        self._by_key, self._last = after, services
        return found

    def _changes_of(self, services: tuple[Service, ...], changed: Iterable[str]) -> list[tuple[str, str, str]]:
        """`changes()` comparing only the keys `changed` (each looked up in the sorted
        `services`); the last services by key are kept up to date one key at a time."""
        wanted = sorted(changed)
        places = [(key, (int(key.partition("/")[0]), key.partition("/")[2])) for key in wanted]  # ValueError: bad key
        by_key = self._by_key if self._by_key or not self._last else {s.key: s for s in self._last}
        found: list[tuple[str, str, str]] = []
        removed: list[tuple[str, str, str]] = []
        for key, place in places:
            index = bisect_left(services, place, key=_place)
            new = services[index] if index < len(services) and _place(services[index]) == place else None
            old = by_key.get(key)
            if new is None:
                if old is not None:
                    del by_key[key]
                    removed.append((key, old.name, f"service removed ({len(old.servers)} servers)"))
                continue
            by_key[key] = new
            if old is None:
                found.append((key, new.name, _servers_text(new)))
            elif old is not new and old.digest != new.digest:
                found.append((key, new.name, describe_change(old, new)))
        self._by_key, self._last = by_key, services
        return found + removed

    def by_key(self) -> Mapping[str, Service]:
        """The last services by key (a copy: the caller may hand it to another thread)."""
        if not self._by_key and self._last:
            self._by_key = {s.key: s for s in self._last}
        return dict(self._by_key)

    def report(self, services: tuple[Service, ...], cause: str) -> int:
        """Log the changes from the last services to these (INFO), bounded. Returns how many
        services changed."""
        return self.log_changes(self.changes(services), cause)

    def log_changes(self, found: list[tuple[str, str, str]], cause: str) -> int:
        """Log changes found by `changes()` (INFO), at most MAX_LINES lines and then one line
        saying how many more. Returns how many services changed."""
        cause = cause or "poll"
        for key, name, change in found[:MAX_LINES]:
            self.log.info("source %s: service %s (%s) %s [%s]", self.source, key, name, change, cause,
                          extra={"source": self.source, "service": key, "service_name": name, "change": change,
                                 "event": cause})
        if len(found) > MAX_LINES:
            self.log.info("source %s: ... and %d more changed services [%s]", self.source, len(found) - MAX_LINES,
                          cause, extra={"source": self.source, "event": cause, "more": len(found) - MAX_LINES})
        return len(found)
