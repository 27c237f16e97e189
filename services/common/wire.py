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
from services.common.keyed import KEYED_SCHEMA, KeyedMirror, KeyedSender, SendReport, send_keyed, split_topic
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


# -- publishers ---------------------------------------------------------------------------------

@dataclass
class _Changes:
    """Which entries a sender publishes: every key compared (`all`), or only the keys the caller
    says may have changed plus the keys whose excluded entries changed (`some`: the same result
    at the cost of the changed keys; the excluded entries, grouped by key again only when their
    tuple is not the one last published)."""

    sender: KeyedSender
    _excluded: tuple | None = None  # the excluded entries last published (None: nothing yet)
    _grouped: dict = field(default_factory=dict)
    _keyless: tuple = ()

    def __call__(self, services: Iterable[Service], excluded: tuple[Excluded, ...],
                 by_key: Mapping[str, Service] | None, changed: Iterable[str] | None):
        """(entries to send, keyless excluded entries, (changed keys, keys gone))."""
        if changed is not None and self._excluded is not None:
            if by_key is None:
                by_key = {service.key: service for service in services}
            result = self._some(excluded, by_key, changed)
        else:
            entries, keyless = entries_by_key(services, excluded, self.sender.last)
            self._grouped = {key: entry.excluded for key, entry in entries.items() if entry.excluded}
            result = entries, keyless, self.sender.changes(entries)
        self._excluded, self._keyless = excluded, result[1]
        return result

    def _some(self, excluded: tuple[Excluded, ...], by_key: Mapping[str, Service], changed: Iterable[str]):
        if excluded is self._excluded:
            grouped, keyless, keys = self._grouped, self._keyless, set(changed)
        else:
            lists: dict[str, list[Excluded]] = {}
            rest: list[Excluded] = []
            for item in excluded:
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


@dataclass
class SnapshotSender:
    """Publishes one source's snapshots as a keyed state."""

    publisher: Publisher
    source: str
    sender: KeyedSender = field(init=False)
    last_summary: dict | None = field(default=None, init=False)  # the last summary sent, but its hash
    _changes: _Changes = field(init=False)

    def __post_init__(self) -> None:
        self.sender = KeyedSender(self.publisher, source_prefix(self.source), entry_payload, entry_digest)
        self._changes = _Changes(self.sender)

    def publish(self, snapshot: SourceSnapshot, if_changed: bool = False, changed: Iterable[str] | None = None,
                by_key: Mapping[str, Service] | None = None):
        """Publish the keys that changed, then the summary; with `if_changed`, nothing at all
        (None) when no key changed and the summary would say what the last one said.
        `changed`: the only keys whose service may have changed since the last publish (the
        keys whose excluded entries changed are found here); None: compare every key.
        `by_key`: the snapshot's services by key, when the caller has them (saves building it)."""
        entries, keyless, changes = self._changes(snapshot.services, snapshot.excluded, by_key, changed)
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

    publisher: Publisher | None
    sender: KeyedSender = field(init=False)
    _changes: _Changes = field(init=False)

    def __post_init__(self) -> None:
        self.sender = KeyedSender(self.publisher, PLAN_PREFIX, entry_payload, entry_digest)
        self._changes = _Changes(self.sender)

    def publish(self, plan: Plan, by_key: Mapping[str, Service] | None = None, changed: Iterable[str] | None = None):
        """Publish what changed since the last plan, then the summary. A planner that knows
        which keys may have changed passes `by_key` (the plan's services by key) and `changed`:
        then only those keys, and the keys whose excluded entries changed, are compared (a
        change costs the same whatever the number of services)."""
        keys, summary, report = self.prepare(plan, by_key, changed)
        send_keyed(self.publisher, keys, summary, self.sender.bulk_keys)
        return report

    def prepare(self, plan: Plan, by_key: Mapping[str, Service] | None = None, changed: Iterable[str] | None = None
                ) -> tuple[list[tuple[str, dict]], tuple[str, dict], SendReport]:
        """What `publish` sends, without sending it (the planner's step; its loop sends it):
        the key messages (topic, payload), the summary (topic, payload) and the report. This
        sender counts them as sent."""
        if by_key is None and changed is not None:
            changed = None  # without the services by key, every key is compared
        entries, keyless, changes = self._changes(plan.services, plan.excluded, by_key, changed)
        keys, report = self.sender.commit(entries, changes)
        settings = plan.settings.to_dict()
        summary = {
            "schema": KEYED_SCHEMA, "hash": plan_hash(report.hash, settings), "services_hash": report.hash,
            "count": len(plan.services), "settings": settings, "inputs": dict(plan.inputs),
            "sources_ready": list(plan.sources_ready), "notes": list(plan.notes), "changed_at": plan.changed_at,
            "excluded": excluded_to_list(keyless)}
        return keys, (PLAN_PREFIX, summary), report


def plan_hash(services_hash: str, settings: dict) -> str:
    """Plan.hash from the services' XOR and the settings (the same as model.services_hash)."""
    return xor_hash([services_hash, content_hash([settings])])


# -- followers ----------------------------------------------------------------------------------

T = TypeVar("T")


def _key_order(service: Service) -> tuple:
    return (service.port, service.protocol)


@dataclass
class KeyedView:
    """One sender's keyed state (KeyEntry values) as the stages use it: the services by key, the
    excluded entries (bounded and ordered, the keyless ones included) and, when `ordered`, the
    services in (port, protocol) order. Kept up to date from the keys that changed: a change
    costs the changed keys, not a pass over every service (a changed service already there is
    replaced in place; the order is sorted again only when keys come or go, the excluded entries
    only when a changed key's or the keyless ones changed)."""

    ordered: bool = True
    by_key: dict[str, Service] = field(default_factory=dict)  # changed in place, see update
    excluded_by_key: dict[str, tuple[Excluded, ...]] = field(default_factory=dict)
    keyless: tuple[Excluded, ...] = ()
    excluded: tuple[Excluded, ...] = ()
    services: tuple[Service, ...] = ()  # in key order when `ordered`, else by_key's values
    position: dict[str, int] = field(default_factory=dict)  # key -> index in `services` (ordered)
    fresh: bool = True  # nothing taken yet: the next update takes every key

    def update(self, values: Mapping[str, KeyEntry], changed: Iterable[str] | None,
               keyless: tuple[Excluded, ...]) -> set[str] | None:
        """Take the keys that changed in `values` (every key when None, or the first time) and
        the keyless excluded entries; returns the keys whose service may have changed (None: any,
        and `by_key` is then a new dict)."""
        moved = excluded_moved = False
        if changed is None or self.fresh:
            self.by_key = {key: entry.service for key, entry in values.items() if entry.service is not None}
            self.excluded_by_key = {key: entry.excluded for key, entry in values.items() if entry.excluded}
            keys: set[str] | None = None
            moved = excluded_moved = True
        else:
            keys = set(changed)
            excluded_moved = keyless != self.keyless
            by_key, excluded_by_key = self.by_key, self.excluded_by_key
            for key in keys:
                entry = values.get(key)
                service = entry.service if entry is not None else None
                if service is None:
                    moved = by_key.pop(key, None) is not None or moved
                else:
                    moved = moved or key not in by_key
                    by_key[key] = service
                items = entry.excluded if entry is not None else ()
                if items != excluded_by_key.get(key, ()):
                    excluded_moved = True
                    if items:
                        excluded_by_key[key] = items
                    else:
                        del excluded_by_key[key]
        if excluded_moved:
            everything = [item for items in self.excluded_by_key.values() for item in items] + list(keyless)
            self.excluded = bounded_excluded(everything) if everything else ()
        self.keyless, self.fresh = keyless, False
        if not self.ordered:
            self.services = tuple(self.by_key.values())
        elif moved:
            self.services = tuple(sorted(self.by_key.values(), key=_key_order))
            self.position = {service.key: index for index, service in enumerate(self.services)}
        elif keys:
            services, position, by_key = list(self.services), self.position, self.by_key
            for key in keys:
                if key in by_key:  # else a key with excluded entries only, before and after
                    services[position[key]] = by_key[key]
            self.services = tuple(services)
        return keys


@dataclass
class KeyedFollower(Generic[T]):
    """Mirrors one keyed state of KeyEntry values (per sender: a restarted or second publisher
    has its own mirror), checks every summary's hash against the mirror and, when they agree,
    builds the stage's object from the mirror's `KeyedView`. The one follower of the planner
    (sources) and of the applier, the status stage and explain (the plan).

    When a summary disagrees it sets `needs_resync`: the stage then calls
    `Subscriber.resync(prefix)` and `reset()` (at the pace it chooses)."""

    prefix: str
    mirrors: dict[str, KeyedMirror] = field(default_factory=dict)
    # Set when a summary disagreed with the mirror: the stage resyncs (Subscriber.resync, reset).
    needs_resync: bool = False
    mismatches: int = 0
    # The next view handed out must say "any key may have changed" (the stage did not use the
    # last one); `ordered`: the views keep the services in key order.
    full: bool = False
    ordered: bool = True
    _views: dict[int, KeyedView] = field(default_factory=dict)  # id(mirror) -> its view
    _last_view: KeyedView | None = None

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

    def view(self, mirror: KeyedMirror, summary: dict) -> tuple[KeyedView, set[str] | None]:
        """The mirror's view brought up to date with the keys changed since the last call, and
        those keys (None: any may have; after `full`, or when the view is another sender's than
        last time)."""
        keyless = excluded_from_list(summary.get("excluded", []), f"{self.prefix} summary.excluded")
        view = self._views.get(id(mirror))  # mirrors live as long as the follower
        if view is None:
            view = self._views[id(mirror)] = KeyedView(self.ordered)
        changed = view.update(mirror.values, mirror.take_changed(), keyless)
        if self.full or view is not self._last_view:
            changed = None
        self.full, self._last_view = False, view
        return view, changed

    def build(self, mirror: KeyedMirror, summary: dict) -> T:
        raise NotImplementedError

    def reset(self) -> None:
        """Before a resync: forget every mirror (the snapshot brings the whole state again)."""
        for mirror in self.mirrors.values():
            mirror.clear()
        self.needs_resync = False


_Follower = KeyedFollower  # the name it had


def _snapshot(view: KeyedView, summary: dict) -> SourceSnapshot:
    return SourceSnapshot(
        source=_choice(summary.get("source"), SOURCES, "snapshot.source"),
        state=_choice(summary.get("state"), SOURCE_STATES, "snapshot.state"),
        services=view.services, error=str(summary.get("error", "")),
        warnings=_str_list(summary.get("warnings", []), "snapshot.warnings"), excluded=view.excluded,
        changed_at=_timestamp(summary.get("changed_at", 0.0), "snapshot.changed_at"))


@dataclass
class SnapshotFollower(KeyedFollower[SourceSnapshot]):
    """One source as its subscribers see it (tests, tools): its SourceSnapshot, services in key
    order."""

    def build(self, mirror: KeyedMirror, summary: dict) -> SourceSnapshot:
        view, _changed = self.view(mirror, summary)
        return _snapshot(view, summary)


@dataclass(frozen=True)
class SourceUpdate:
    """A source's snapshot as its follower rebuilt it, with what the planner's PlanBuilder needs
    to plan only what changed: the services by key (the view's dict, changed in place from one
    update to the next of the same sender), the keys changed since the previous update (None:
    any may have), and the source's hash (the mirror's, equal to its summary's)."""

    snapshot: SourceSnapshot
    by_key: dict
    changed: set | None
    hash: str


@dataclass
class SourceFollower(KeyedFollower[SourceUpdate]):
    """The planner's view of one source: a SourceUpdate, the services unsorted (a plan is keyed,
    and sorting 10,000 services per change would be most of what a change costs)."""

    ordered: bool = False

    def build(self, mirror: KeyedMirror, summary: dict) -> SourceUpdate:
        view, changed = self.view(mirror, summary)
        return SourceUpdate(_snapshot(view, summary), view.by_key, changed, mirror.hash)


@dataclass
class PlanFollower(KeyedFollower[Plan]):
    """The applier's (and the status stage's, explain's, a test's) view of the plan."""

    prefix: str = PLAN_PREFIX

    def _services_hash(self, summary: dict) -> Any:
        return summary.get("services_hash")

    def build(self, mirror: KeyedMirror, summary: dict) -> Plan:
        view, _changed = self.view(mirror, summary)
        plan = Plan(services=view.services, settings=ProxySettings.from_dict(summary.get("settings", {})),
                    inputs=_inputs(summary.get("inputs", {})),
                    sources_ready=_str_list(summary.get("sources_ready", []), "plan.sources_ready"),
                    notes=_str_list(summary.get("notes", []), "plan.notes"), excluded=view.excluded,
                    changed_at=_timestamp(summary.get("changed_at", 0.0), "plan.changed_at"))
        if plan.hash != summary.get("hash"):
            raise ModelError(f"plan summary hash {summary.get('hash')!r:.20} is not its content's {plan.hash}")
        return plan
