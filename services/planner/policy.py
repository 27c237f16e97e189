"""From source snapshots to a plan: pure functions, no I/O.

Rules (interface.md): Marathon wins a service port over registrator, which wins over the file;
host-network services only with EXPOSE_HOST; per-container maxconn divided by GROUP_SIZE;
weights scaled from 1..1000 to HAProxy's 0..256 keeping proportions; ports proxymatic itself
listens on are never given to a service. Every rule that drops something says so in `notes`.
"""
from __future__ import annotations

import math
from dataclasses import replace

from services.common.config import Settings, reserved_ports
from services.common.model import MAX_WEIGHT, Excluded, Plan, Service, SourceSnapshot, bounded_excluded

PRECEDENCE = ("marathon", "registrator", "file")
PROXY_MAX_WEIGHT = 256


def scale_weight(weight: int) -> int:
    """1..1000 onto 0..256; a positive weight never becomes 0 (that would drain the server)."""
    if weight <= 0:
        return 0
    return max(1, min(PROXY_MAX_WEIGHT, round(weight * PROXY_MAX_WEIGHT / MAX_WEIGHT)))


def divide_maxconn(maxconn: int | None, group_size: int) -> int | None:
    # Rounded up: with 3 instances and maxconn 10 each instance allows 4, never 0.
    return None if maxconn is None else max(1, math.ceil(maxconn / group_size))


def absorb(previous: SourceSnapshot | None, incoming: SourceSnapshot) -> SourceSnapshot:
    """The snapshot to keep for a source. A restarted collector says `initializing` until the
    source answers: missing is not failing, so what the source last said stays, degraded."""
    if incoming.state == "initializing" and previous is not None and previous.state != "initializing":
        return SourceSnapshot(incoming.source, "degraded", previous.services, error=incoming.error,
                              warnings=previous.warnings, excluded=previous.excluded, changed_at=previous.changed_at)
    return incoming


def _planner_excluded(code: str, reason: str, service: Service) -> Excluded:
    """The planner's Excluded for a whole service it drops (one per service, no address)."""
    servers = len(service.servers)
    return Excluded(source="planner", code=code, reason=f"{reason} ({servers} server{'s' if servers != 1 else ''})",
                    service=service.name, key=service.key)


def merge(snapshots: dict[str, SourceSnapshot], excluded: list[Excluded] | None = None
          ) -> tuple[dict[str, Service], list[str]]:
    """Services by key, the first source in PRECEDENCE winning a key; a note (and, when
    `excluded` is given, a `port_taken` entry naming the winner) for each service that lost."""
    merged: dict[str, Service] = {}
    notes: list[str] = []
    for source in PRECEDENCE:
        snapshot = snapshots.get(source)
        if snapshot is None:
            continue
        for service in snapshot.services:
            winner = merged.get(service.key)
            if winner is not None:
                notes.append(f"port {service.key}: {source} service {service.name!r} ignored, "
                             f"claimed by {winner.source} service {winner.name!r}")
                if excluded is not None:
                    excluded.append(_planner_excluded(
                        "port_taken", f"{source} service ignored: port {service.key} is taken by {winner.source} "
                        f"service {winner.name!r} ({' > '.join(PRECEDENCE)})", service))
                continue
            merged[service.key] = service
    return merged, notes


def apply_policies(service: Service, settings: Settings) -> Service:
    servers = tuple(
        replace(server, weight=scale_weight(server.weight),
                maxconn=divide_maxconn(server.maxconn, settings.group_size))
        for server in service.servers
    )
    return service.with_servers(servers)


class PolicyMemo:
    """Policies applied to a service last time, by object identity: sources and the bus decoder
    reuse unchanged Service objects, so only changed services are processed again."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[Service, Service]] = {}
        self._next: dict[int, tuple[Service, Service]] = {}

    def apply(self, service: Service, settings: Settings) -> Service:
        hit = self._seen.get(id(service))
        result = hit[1] if hit is not None and hit[0] is service else apply_policies(service, settings)
        self._next[id(service)] = (service, result)
        return result

    def rotate(self) -> None:
        """Forget services that were not in the last plan."""
        self._seen, self._next = self._next, {}


def make_plan(snapshots: dict[str, SourceSnapshot], settings: Settings, memo: PolicyMemo | None = None) -> Plan:
    memo = memo or PolicyMemo()
    excluded: list[Excluded] = []
    merged, notes = merge(snapshots, excluded)
    reserved = reserved_ports(settings)
    services: list[Service] = []
    for key in sorted(merged, key=lambda k: (int(k.split("/")[0]), k)):
        service = merged[key]
        if service.host_network and not settings.expose_host:
            notes.append(f"port {key}: service {service.name!r} uses host networking; "
                         "not proxied (set EXPOSE_HOST=true to proxy it)")
            excluded.append(_planner_excluded(
                "host_network", f"{service.source} service uses host networking; not proxied "
                "(set EXPOSE_HOST=true to proxy it)", service))
            continue
        if service.protocol == "tcp" and service.port in reserved:
            notes.append(f"port {key}: service {service.name!r} collides with "
                         f"{reserved[service.port]}; not proxied")
            excluded.append(_planner_excluded(
                "reserved_port", f"{service.source} service not proxied: port {service.port} is proxymatic's own "
                f"({reserved[service.port]})", service))
            continue
        services.append(memo.apply(service, settings))
    memo.rotate()
    return Plan(
        services=tuple(services),
        settings=settings.proxy_settings(),
        inputs=tuple(sorted((name, s.hash) for name, s in snapshots.items())),
        sources_ready=tuple(sorted(name for name, s in snapshots.items() if s.state != "initializing")),
        notes=tuple(notes),
        excluded=plan_excluded(snapshots, excluded),
        changed_at=max((s.changed_at for s in snapshots.values()), default=0.0),
    )


def plan_excluded(snapshots: dict[str, SourceSnapshot], own: list[Excluded]) -> tuple[Excluded, ...]:
    """The sources' excluded entries (in PRECEDENCE order) plus the planner's, bounded and
    ordered (`bounded_excluded`)."""
    everything: list[Excluded] = []
    for source in (*PRECEDENCE, *sorted(set(snapshots) - set(PRECEDENCE))):
        snapshot = snapshots.get(source)
        if snapshot is not None:
            everything.extend(snapshot.excluded)
    everything.extend(own)
    return bounded_excluded(everything) if everything else ()

