"""From source snapshots to a plan: pure functions, no I/O.

Rules (interface.md): Marathon wins a service port over registrator, which wins over the file;
host-network services only with EXPOSE_HOST; per-container maxconn divided by GROUP_SIZE;
weights stay on the user's 1..1000 scale (the drivers tell the proxies `Server.proxy_weight`); ports proxymatic itself
listens on are never given to a service. Every rule that drops something says so in `notes`.
"""
from __future__ import annotations

import math
from typing import Iterable

from services.common.config import Settings, reserved_ports
from services.common.model import (Excluded, Plan, Service, SourceSnapshot, bounded_excluded,
                                   content_hash)

PRECEDENCE = ("marathon", "registrator", "file")

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
        server.with_maxconn(divide_maxconn(server.maxconn, settings.group_size))
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



class PlanBuilder:
    """`make_plan`, kept up to date one changed key at a time (the planner stage's way).

    The stage tells it, per source, the services by key and which keys may have changed (the
    keyed mirror knows: KeyedMirror.take_changed); only those keys are merged and run through
    the policies again. What is left per plan is a few passes at C speed (the services tuple)
    and the plan's hash, kept as an XOR like the sources'. Gives the same plan as `make_plan`
    over the same snapshots (services in another order: a plan is keyed; tests/test_planner.py
    checks it on random changes)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.proxy_settings = settings.proxy_settings()
        self._settings_digest = content_hash([self.proxy_settings.to_dict()])
        self.reserved = reserved_ports(settings)
        self.snapshots: dict[str, SourceSnapshot] = {}
        self.hashes: dict[str, str] = {}  # each source's hash, as its summary said
        self.by_source: dict[str, dict[str, Service]] = {}
        self.planned: dict[str, Service] = {}
        self._winners: dict[str, Service] = {}  # key -> the source service behind planned[key]
        self._merge_notes: dict[str, list[tuple[int, str, Excluded]]] = {}  # key -> (loser's rank, note, excluded)
        self._policy_notes: dict[str, tuple[str, Excluded]] = {}
        self._xor = 0
        self._dirty: set[str] = set()
        # Keys re-planned since the plan was last published (PlanSender.publish compares only
        # those); the stage empties it after publishing.
        self.unpublished: set[str] = set()
        self._excluded_key: tuple | None = None
        self._excluded: tuple[Excluded, ...] = ()

    def update(self, snapshot: SourceSnapshot, by_key: dict[str, Service] | None = None,
               changed: Iterable[str] | None = None, hash_: str | None = None) -> None:
        """A source's snapshot to plan from. `by_key`: its services by key (built here when
        None); `changed`: the keys that may differ from the previous update (every key when
        None); `hash_`: its hash (SourceSnapshot.hash, computed here when None)."""
        name = snapshot.source
        old = self.by_source.get(name, {})
        if by_key is None:
            by_key = {service.key: service for service in snapshot.services}
        if changed is None:
            # Any key may have changed, and `old` may be `by_key` changed in place (a follower's
            # dict): every key of either is planned again (a key whose winner is the same object
            # keeps its planned service). Rare: a source's first update, another sender's, the
            # update after one the stage did not use.
            self._dirty.update(old.keys() | by_key.keys())
        elif by_key is old:
            self._dirty.update(changed)  # the same dict, changed in place: nothing to compare with
        else:
            for key in changed:
                if old.get(key) is not by_key.get(key):
                    self._dirty.add(key)
        self.by_source[name] = by_key
        self.snapshots[name] = snapshot
        self.hashes[name] = snapshot.hash if hash_ is None else hash_

    def _replan(self, key: str) -> None:
        winner: Service | None = None
        losers: list[tuple[int, str, Excluded]] = []
        for rank, source in enumerate(PRECEDENCE):
            service = self.by_source.get(source, {}).get(key)
            if service is None:
                continue
            if winner is None:
                winner = service
                continue
            losers.append((rank, f"port {key}: {source} service {service.name!r} ignored, "
                                 f"claimed by {winner.source} service {winner.name!r}",
                           _planner_excluded("port_taken", f"{source} service ignored: port {key} is taken by "
                                             f"{winner.source} service {winner.name!r} ({' > '.join(PRECEDENCE)})",
                                             service)))
        if losers:
            self._merge_notes[key] = losers
        else:
            self._merge_notes.pop(key, None)
        self._policy_notes.pop(key, None)
        planned = None
        if winner is not None:
            if winner.host_network and not self.settings.expose_host:
                self._policy_notes[key] = (
                    f"port {key}: service {winner.name!r} uses host networking; "
                    "not proxied (set EXPOSE_HOST=true to proxy it)",
                    _planner_excluded("host_network", f"{winner.source} service uses host networking; not proxied "
                                      "(set EXPOSE_HOST=true to proxy it)", winner))
            elif winner.protocol == "tcp" and winner.port in self.reserved:
                self._policy_notes[key] = (
                    f"port {key}: service {winner.name!r} collides with {self.reserved[winner.port]}; not proxied",
                    _planner_excluded("reserved_port", f"{winner.source} service not proxied: port {winner.port} is "
                                      f"proxymatic's own ({self.reserved[winner.port]})", winner))
            elif self._winners.get(key) is winner:
                planned = self.planned[key]
            else:
                planned = apply_policies(winner, self.settings)
        old = self.planned.pop(key, None)
        self._winners.pop(key, None)
        if old is not None:
            self._xor ^= int(old.digest, 16)
        if planned is not None:
            self.planned[key] = planned
            self._winners[key] = winner
            self._xor ^= int(planned.digest, 16)

    @property
    def hash(self) -> str:
        """Plan.hash of the plan `plan()` gives, kept up to date as an XOR."""
        return f"{self._xor ^ int(self._settings_digest, 16):016x}"

    def _notes(self) -> tuple[tuple[str, ...], list[Excluded]]:
        """make_plan's notes in its order: the merge's (by losing source, then key), then the
        policies' (by key); and the planner's own excluded entries."""
        merge = sorted(((rank, _key_order(key), note, excluded) for key, losers in self._merge_notes.items()
                        for rank, note, excluded in losers), key=lambda item: item[:2])
        policy = sorted((_key_order(key), note, excluded) for key, (note, excluded) in self._policy_notes.items())
        notes = tuple([item[2] for item in merge] + [item[1] for item in policy])
        return notes, [item[3] for item in merge] + [item[2] for item in policy]

    def plan(self) -> Plan:
        for key in self._dirty:
            self._replan(key)
        self.unpublished |= self._dirty
        self._dirty = set()
        notes, own = self._notes()
        snapshots = self.snapshots
        # The sources' excluded entries and the planner's: sorted again only when they changed.
        identity = (tuple((name, s.excluded) for name, s in snapshots.items()), tuple(own))
        if identity != self._excluded_key:
            self._excluded_key, self._excluded = identity, plan_excluded(snapshots, own)
        return Plan(
            services=tuple(self.planned.values()),
            settings=self.proxy_settings,
            inputs=tuple(sorted(self.hashes.items())),
            sources_ready=tuple(sorted(name for name, s in snapshots.items() if s.state != "initializing")),
            notes=notes,
            excluded=self._excluded,
            changed_at=max((s.changed_at for s in snapshots.values()), default=0.0),
        )


def _key_order(key: str) -> tuple:
    port, _, protocol = key.partition("/")
    return (int(port), protocol)
