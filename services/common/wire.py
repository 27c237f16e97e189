"""Source snapshots and plans on the bus as keyed states (services/common/keyed.py).

    source.<name>:<port>/<protocol>   one service of that source, and the entries it does not serve
    source.<name>                     the source's summary: state, error, warnings, count, hash...
    plan:<port>/<protocol>            one service of the plan, and the entries not served there
    plan                              the plan's summary: hash, settings, sources_ready, notes...

A key's payload is `{"schema": 2, "service": {...} | null, "excluded": [...]}`: `service` is null
for a key that only has excluded entries (every task failing its health check). Excluded entries
without a key ride on the summary. The summary's `hash` is the XOR of the services' digests
(model.xor_hash), plus the settings' for a plan: `SourceSnapshot.hash` and `Plan.hash` exactly.

Publishers use `SnapshotSender` / `PlanSender`; subscribers `SnapshotFollower` / `PlanFollower`,
which rebuild the SourceSnapshot / Plan the stages work with from the keys and hand it out when
a summary arrives and matches. A follower that disagrees with a summary says so
(`needs_resync`): the stage then calls `Subscriber.resync(prefix)` and `follower.reset()`.
See docs/bus.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, Iterable, Mapping, TypeVar

from services.common.bus import Message, Publisher
from services.common.keyed import KEYED_SCHEMA, KeyedMirror, KeyedSender, split_topic
from services.common.model import (SOURCE_STATES, SOURCES, Excluded, ModelError, Plan, ProxySettings,
                                   Service, SourceSnapshot, _choice, _inputs, _require_dict,
                                   _str_list, _timestamp, bounded_excluded, content_hash, excluded_from_list,
                                   excluded_to_list, xor_hash)

NO_SERVICE = "0" * 16  # the digest of a key without a service: XOR-neutral
PLAN_PREFIX = "plan"
SOURCE_PREFIX = "source."


def source_prefix(name: str) -> str:
    return f"{SOURCE_PREFIX}{name}"


@dataclass(frozen=True)
class KeyEntry:
    """What one key holds: its service (None when only excluded entries name the key) and the
    entries not served under it."""

    service: Service | None
    excluded: tuple[Excluded, ...] = ()

    @property
    def digest(self) -> str:
        return self.service.digest if self.service is not None else NO_SERVICE

    def to_payload(self) -> dict:
        return {"schema": KEYED_SCHEMA, "service": self.service.to_dict() if self.service is not None else None,
                "excluded": excluded_to_list(self.excluded)}


def entry_digest(entry: KeyEntry) -> str:
    return entry.digest


def entry_payload(entry: KeyEntry) -> dict:
    return entry.to_payload()


class EntryDecoder:
    """Decodes key payloads; one per follower (reuses nothing across keys: only changed keys
    arrive)."""

    def __call__(self, payload: dict, key: str) -> KeyEntry:
        _require_dict(payload, f"key {key!r}")
        if payload.get("schema") != KEYED_SCHEMA:
            raise ModelError(f"key {key!r}: unknown schema {payload.get('schema')!r:.20} (this is {KEYED_SCHEMA})")
        raw = payload.get("service")
        service = None if raw is None else Service.from_dict(raw, f"key {key!r}")
        if service is not None and service.key != key:
            raise ModelError(f"key {key!r} carries service {service.key}")
        excluded = excluded_from_list(payload.get("excluded", []), f"key {key!r}.excluded")
        return KeyEntry(service, excluded)


def entries_by_key(services: Iterable[Service], excluded: Iterable[Excluded],
                   previous: Mapping[str, KeyEntry] | None = None) -> tuple[dict[str, KeyEntry], tuple[Excluded, ...]]:
    """Services and excluded entries grouped by key, and the excluded entries without a key.
    An entry of `previous` (what a sender last sent) is reused when its service is the same
    object and its excluded entries are equal: building a KeyEntry costs microseconds, so at
    10,000 services a change would otherwise cost every publisher tens of milliseconds, and the
    sender tells an unchanged key by identity."""
    grouped: dict[str, list[Excluded]] = {}
    keyless: list[Excluded] = []
    for item in excluded:
        (grouped.setdefault(item.key, []) if item.key else keyless).append(item)
    previous = previous or {}
    entries: dict[str, KeyEntry] = {}
    for service in services:
        key = service.key
        items = tuple(grouped.pop(key, ())) if grouped else ()
        old = previous.get(key)
        entries[key] = (old if old is not None and old.service is service and old.excluded == items
                        else KeyEntry(service, items))
    for key, items in grouped.items():
        items = tuple(items)
        old = previous.get(key)
        entries[key] = old if old is not None and old.service is None and old.excluded == items else KeyEntry(None, items)
    return entries, tuple(keyless)


def _services_and_excluded(entries: Iterable[KeyEntry], keyless: Iterable[Excluded]) -> tuple[tuple[Service, ...], tuple[Excluded, ...]]:
    services = tuple(sorted((e.service for e in entries if e.service is not None), key=lambda s: (s.port, s.protocol)))
    excluded = bounded_excluded([item for e in entries for item in e.excluded] + list(keyless))
    return services, excluded


# -- publishers ---------------------------------------------------------------------------------

@dataclass
class SnapshotSender:
    """Publishes one source's snapshots as a keyed state."""

    publisher: Publisher
    source: str
    sender: KeyedSender = field(init=False)
    last_summary: dict | None = field(default=None, init=False)  # the last summary sent, but its hash

    def __post_init__(self) -> None:
        self.sender = KeyedSender(self.publisher, source_prefix(self.source), entry_payload, entry_digest)

    def publish(self, snapshot: SourceSnapshot, if_changed: bool = False):
        """Publish the keys that changed, then the summary; with `if_changed`, nothing at all
        (None) when no key changed and the summary would say what the last one said."""
        entries, keyless = entries_by_key(snapshot.services, snapshot.excluded, self.sender.last)
        changes = self.sender.changes(entries)
        summary = {"schema": KEYED_SCHEMA, "source": snapshot.source, "state": snapshot.state,
                   "error": snapshot.error, "warnings": list(snapshot.warnings), "count": len(snapshot.services),
                   "changed_at": snapshot.changed_at, "excluded": excluded_to_list(keyless)}
        if if_changed and not changes[0] and not changes[1] and summary == self.last_summary:
            return None
        self.last_summary = summary
        return self.sender.send(entries, lambda hash_: {**summary, "hash": hash_}, changes)


@dataclass
class PlanSender:
    """Publishes plans as a keyed state (the planner; tests and tools that stand in for it)."""

    publisher: Publisher
    sender: KeyedSender = field(init=False)
    # The excluded entries last published, and the same grouped by key (for `changed`).
    _excluded: tuple | None = field(default=None, init=False)
    _grouped: dict = field(default_factory=dict, init=False)
    _keyless: tuple = field(default=(), init=False)

    def __post_init__(self) -> None:
        self.sender = KeyedSender(self.publisher, PLAN_PREFIX, entry_payload, entry_digest)

    def publish(self, plan: Plan, by_key: Mapping[str, Service] | None = None, changed: Iterable[str] | None = None):
        """Publish what changed since the last plan, then the summary. A planner that knows
        which keys may have changed passes `by_key` (the plan's services by key) and `changed`:
        then only those keys, and the keys whose excluded entries changed, are compared (a
        change costs the same whatever the number of services)."""
        if by_key is not None and changed is not None and self._excluded is not None:
            entries, keyless, changes = self._changed_entries(plan, by_key, changed)
        else:
            entries, keyless = entries_by_key(plan.services, plan.excluded, self.sender.last)
            changes = self.sender.changes(entries)
            self._grouped = {key: entry.excluded for key, entry in entries.items() if entry.excluded}
        self._excluded, self._keyless = plan.excluded, keyless
        settings = plan.settings.to_dict()
        return self.sender.send(entries, lambda services_hash: {
            "schema": KEYED_SCHEMA, "hash": plan_hash(services_hash, settings), "services_hash": services_hash,
            "count": len(plan.services), "settings": settings, "inputs": dict(plan.inputs),
            "sources_ready": list(plan.sources_ready), "notes": list(plan.notes), "changed_at": plan.changed_at,
            "excluded": excluded_to_list(keyless)}, changes)

    def _changed_entries(self, plan: Plan, by_key: Mapping[str, Service], changed: Iterable[str]):
        """(entries of the keys that changed, keyless excluded entries, (changed, gone)), from
        `changed` and the excluded entries (at most MAX_EXCLUDED, grouped again only when the
        tuple is not the one last published)."""
        if plan.excluded is self._excluded:
            grouped, keyless, keys = self._grouped, self._keyless, set(changed)
        else:
            lists: dict[str, list[Excluded]] = {}
            rest: list[Excluded] = []
            for item in plan.excluded:
                (lists.setdefault(item.key, []) if item.key else rest).append(item)
            grouped = {key: tuple(items) for key, items in lists.items()}
            keyless = tuple(rest)
            old = self._grouped
            keys = set(changed) | {key for key in old.keys() | grouped.keys() if old.get(key) != grouped.get(key)}
            self._grouped = grouped
        last = self.sender.last
        entries: dict[str, KeyEntry] = {}
        changed_keys, gone = [], []
        for key in keys:
            service, items = by_key.get(key), grouped.get(key, ())
            previous = last.get(key)
            if service is None and not items:
                if previous is not None:
                    gone.append(key)
                continue
            if previous is not None and previous.service is service and previous.excluded == items:
                continue
            entry = KeyEntry(service, items)
            if previous is not None and previous == entry:
                continue
            entries[key] = entry
            changed_keys.append(key)
        return entries, keyless, (sorted(changed_keys), sorted(gone))


def plan_hash(services_hash: str, settings: dict) -> str:
    """Plan.hash from the services' XOR and the settings (the same as model.services_hash)."""
    return xor_hash([services_hash, content_hash([settings])])


# -- followers ----------------------------------------------------------------------------------

T = TypeVar("T")


@dataclass
class _Follower(Generic[T]):
    """Mirrors one keyed state per sender and builds the stage's object on a matching summary."""

    prefix: str
    mirrors: dict[str, KeyedMirror] = field(default_factory=dict)
    # Set when a summary disagreed with the mirror: the stage resyncs (Subscriber.resync, reset).
    needs_resync: bool = False
    mismatches: int = 0

    def owns(self, topic: str) -> bool:
        prefix, _key = split_topic(topic)
        return prefix == self.prefix

    def _mirror(self, sender: str) -> KeyedMirror:
        mirror = self.mirrors.get(sender)
        if mirror is None:
            mirror = self.mirrors[sender] = KeyedMirror(self.prefix, EntryDecoder(), entry_digest)
        return mirror

    def absorb(self, message: Message) -> T | None:
        """One message of this prefix: a key (None), or a summary (the rebuilt object when the
        mirror matches its hash, else None and `needs_resync`). Raises ModelError/ValueError for
        a payload that does not decode (the caller drops it and counts it)."""
        mirror = self._mirror(message.sender)
        _prefix, key = split_topic(message.topic)
        if key is not None:
            mirror.absorb(message)
            return None
        summary = _require_dict(message.payload, f"{self.prefix} summary")
        if summary.get("schema") != KEYED_SCHEMA:
            raise ModelError(f"{self.prefix}: unknown schema {summary.get('schema')!r:.20} (this is {KEYED_SCHEMA})")
        if not mirror.matches(self._services_hash(summary)):
            self.needs_resync = True
            self.mismatches += 1
            return None
        return self.build(mirror, summary)

    def _services_hash(self, summary: dict) -> Any:
        return summary.get("hash")

    def build(self, mirror: KeyedMirror, summary: dict) -> T:
        raise NotImplementedError

    def reset(self) -> None:
        """Before a resync: forget every mirror (the snapshot brings the whole state again)."""
        for mirror in self.mirrors.values():
            mirror.clear()
        self.needs_resync = False


@dataclass
class SnapshotFollower(_Follower[SourceSnapshot]):
    """The planner's view of one source."""

    def build(self, mirror: KeyedMirror, summary: dict) -> SourceSnapshot:
        services, excluded = _services_and_excluded(
            mirror.values.values(), excluded_from_list(summary.get("excluded", []), "summary.excluded"))
        return SourceSnapshot(
            source=_choice(summary.get("source"), SOURCES, "snapshot.source"),
            state=_choice(summary.get("state"), SOURCE_STATES, "snapshot.state"),
            services=services, error=str(summary.get("error", "")),
            warnings=_str_list(summary.get("warnings", []), "snapshot.warnings"), excluded=excluded,
            changed_at=_timestamp(summary.get("changed_at", 0.0), "snapshot.changed_at"))


@dataclass
class _Ordered:
    """A plan's services in (port, protocol) order and its excluded entries, kept up to date from
    the keys that changed: a change to services already there replaces them in place (one copy
    of the tuple) instead of sorting every service again, and the excluded entries are sorted
    again only when a changed key has some (before or after) or the keyless ones changed."""

    services: tuple[Service, ...] = ()
    position: dict[str, int] = field(default_factory=dict)  # key -> index in `services`
    excluded: tuple[Excluded, ...] = ()
    excluded_keys: frozenset[str] = frozenset()  # keys whose entry has excluded entries
    keyless: tuple[Excluded, ...] = ()

    def update(self, values: dict[str, KeyEntry], changed: set[str],
               keyless: tuple[Excluded, ...]) -> tuple[tuple[Service, ...], tuple[Excluded, ...]]:
        in_place = bool(self.position) and all(
            key in self.position and key in values and values[key].service is not None for key in changed)
        if in_place:
            services = list(self.services)
            for key in changed:
                services[self.position[key]] = values[key].service
            self.services = tuple(services)
        else:
            self.services, _ = _services_and_excluded(values.values(), ())
            self.position = {service.key: index for index, service in enumerate(self.services)}
        excluded_now = {key for key in changed if key in values and values[key].excluded}
        if not in_place or changed & self.excluded_keys or excluded_now or keyless != self.keyless:
            self.excluded = bounded_excluded([item for e in values.values() for item in e.excluded] + list(keyless))
            self.excluded_keys = frozenset(key for key, entry in values.items() if entry.excluded)
            self.keyless = keyless
        return self.services, self.excluded


@dataclass
class PlanFollower(_Follower[Plan]):
    """The applier's (and the status stage's, explain's, a test's) view of the plan."""

    prefix: str = PLAN_PREFIX
    _ordered: dict[int, _Ordered] = field(default_factory=dict)  # id(mirror) -> its order

    def _services_hash(self, summary: dict) -> Any:
        return summary.get("services_hash")

    def build(self, mirror: KeyedMirror, summary: dict) -> Plan:
        keyless = excluded_from_list(summary.get("excluded", []), "plan.excluded")
        ordered = self._ordered.setdefault(id(mirror), _Ordered())  # mirrors live as long as the follower
        services, excluded = ordered.update(mirror.values, mirror.take_changed(), keyless)
        plan = Plan(services=services, settings=ProxySettings.from_dict(summary.get("settings", {})),
                    inputs=_inputs(summary.get("inputs", {})),
                    sources_ready=_str_list(summary.get("sources_ready", []), "plan.sources_ready"),
                    notes=_str_list(summary.get("notes", []), "plan.notes"), excluded=excluded,
                    changed_at=_timestamp(summary.get("changed_at", 0.0), "plan.changed_at"))
        if plan.hash != summary.get("hash"):
            raise ModelError(f"plan summary hash {summary.get('hash')!r:.20} is not its content's {plan.hash}")
        return plan


def snapshot_follower(name: str) -> SnapshotFollower:
    return SnapshotFollower(source_prefix(name))
