"""Keyed state on the bus: one message per key that changed (the ZeroMQ Guide's Clone pattern).

A keyed state is a map `key -> value` under a topic prefix (`source.marathon`, `plan`). Its
publisher sends, per change:

- one message per key whose value changed, on topic `<prefix>:<key>` (`plan:1234/tcp`), with
  the value's payload, or a tombstone `{"deleted": true}` when the key is gone;
- then the prefix's **summary** on topic `<prefix>` (`plan`): small, whatever the size of the
  state, carrying `hash`, the state's full hash.

`hash` is maintained incrementally on both sides: the XOR of the per-key digests (each the
first 64 bits of a SHA-256, services/common/model.py `xor_hash`), so adding, changing or removing
one key costs one XOR, never a pass over the whole state. A subscriber mirrors the state from the
key messages (`KeyedMirror`) and acts on a summary only when its own hash equals the summary's;
when they disagree it forgets what it has and asks the publisher for a snapshot (no silent
drift). The publisher's snapshot answer gives every key's newest message (tombstones included)
before the summary (bus.py sorts them so), then END.

Only the keys that changed cross the bus, so a change costs the same at 10 services and at
10,000. See docs/bus.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, Mapping, TypeVar

from services.common.bus import BULK_KEYS, Message, Publisher

KEY_SEPARATOR = ":"
TOMBSTONE = {"deleted": True}
KEYED_SCHEMA = 2  # the `schema` of keyed payloads and summaries (1 was the full-state form)

V = TypeVar("V")


def key_topic(prefix: str, key: str) -> str:
    return f"{prefix}{KEY_SEPARATOR}{key}"


def split_topic(topic: str) -> tuple[str, str | None]:
    """`plan:1234/tcp` -> ("plan", "1234/tcp"); `plan` -> ("plan", None)."""
    prefix, separator, key = topic.partition(KEY_SEPARATOR)
    return (prefix, key) if separator else (topic, None)


def is_tombstone(payload: dict) -> bool:
    return payload.get("deleted") is True


def digest_int(digest: str) -> int:
    """A 16-hex-digit content digest as the integer the XOR hash combines."""
    return int(digest, 16)


def hash_hex(value: int) -> str:
    return f"{value:016x}"


@dataclass
class KeyedSender(Generic[V]):
    """What one publisher last sent under one prefix. `send` publishes the keys whose value
    changed since the last call (compared by identity, then equality: values that did not
    change are usually the very same objects), a tombstone for every key gone, then the summary.

    `encode(value)` gives a key's payload; `digest(value)` its 16-hex-digit digest for the hash.
    A change of more than `bulk_keys` keys goes to the publisher's snapshots only, announced by
    a summary marked `catch_up` (bus.BULK_KEYS; with a publisher that has no `keep`, live)."""

    publisher: Publisher
    prefix: str
    encode: Callable[[V], dict]
    digest: Callable[[V], str]
    last: dict[str, V] = field(default_factory=dict)
    hash: int = 0
    bulk_keys: int = BULK_KEYS

    def changes(self, values: Mapping[str, V]) -> tuple[list[str], list[str]]:
        """(keys changed or new, keys gone), each sorted."""
        last = self.last
        changed = [key for key, value in values.items()
                   if (old := last.get(key, _MISSING)) is _MISSING or (old is not value and old != value)]
        gone = [key for key in last if key not in values]
        return sorted(changed), sorted(gone)

    def send(self, values: Mapping[str, V], summary: Callable[[str], dict],
             changes: tuple[list[str], list[str]] | None = None) -> "SendReport":
        """Publish the changes, then `summary(hash)` on the prefix's own topic. `changes`: what
        `self.changes(values)` just said, when the caller asked already (not asked twice)."""
        keys, report = self.commit(values, changes)
        send_keyed(self.publisher, keys, (self.prefix, summary(report.hash)), self.bulk_keys)
        return report

    def commit(self, values: Mapping[str, V], changes: tuple[list[str], list[str]] | None = None
               ) -> tuple[list[tuple[str, dict]], "SendReport"]:
        """What `send` publishes, without publishing it: the key messages (topic, payload) of the
        changes, tombstones first, and the report with the new hash. `last` and `hash` now say
        they were sent: the caller sends them (`send_keyed`), then the summary."""
        changed, gone = self.changes(values) if changes is None else changes
        keys: list[tuple[str, dict]] = []
        for key in gone:
            self.hash ^= digest_int(self.digest(self.last.pop(key)))
            keys.append((key_topic(self.prefix, key), TOMBSTONE))
        for key in changed:
            old = self.last.get(key, _MISSING)
            if old is not _MISSING:
                self.hash ^= digest_int(self.digest(old))
            value = values[key]
            self.hash ^= digest_int(self.digest(value))
            self.last[key] = value
            keys.append((key_topic(self.prefix, key), self.encode(value)))
        return keys, SendReport(changed=tuple(changed), gone=tuple(gone), hash=hash_hex(self.hash))


def is_bulk(publisher: Publisher, keys: int, bulk_keys: int = BULK_KEYS) -> bool:
    """Whether a change of `keys` key messages goes to snapshots only (see bus.BULK_KEYS)."""
    return keys > bulk_keys and hasattr(publisher, "keep")


def send_keyed(publisher: Publisher, keys: list[tuple[str, dict]], summary: tuple[str, dict],
               bulk_keys: int = BULK_KEYS) -> bool:
    """Publish a change of a keyed state: its key messages, then its summary (topic, payload).
    A bulk change (more than `bulk_keys` keys) is kept for snapshot answers (Publisher.keep)
    and only its summary goes live, marked `catch_up`: a subscriber then takes the state's
    snapshot, instead of losing keys past its QUEUE_HWM and resyncing. True when bulk."""
    bulk = is_bulk(publisher, len(keys), bulk_keys)
    emit = publisher.keep if bulk else publisher.publish
    for topic, payload in keys:
        emit(topic, payload)
    if bulk:
        publisher.publish(*summary, catch_up=True)
    else:
        publisher.publish(*summary)
    return bulk


@dataclass(frozen=True)
class SendReport:
    changed: tuple[str, ...]
    gone: tuple[str, ...]
    hash: str


class _Missing:
    pass


_MISSING = _Missing()


@dataclass
class KeyedMirror(Generic[V]):
    """A subscriber's copy of one keyed state, kept from the key messages.

    `decode(payload, key)` turns a key's payload into a value (raise ValueError/ModelError for a
    bad one: it is dropped, and the hash will tell the state is incomplete); `digest(value)` must
    give the same digest the publisher's `KeyedSender` used."""

    prefix: str
    decode: Callable[[dict, str], V]
    digest: Callable[[V], str]
    values: dict[str, V] = field(default_factory=dict)
    _hash: int = 0
    # Keys changed since the last `take_changed()`: what the stage has not acted on yet.
    changed: set[str] = field(default_factory=set)

    @property
    def hash(self) -> str:
        return hash_hex(self._hash)

    def owns(self, topic: str) -> bool:
        prefix, key = split_topic(topic)
        return key is not None and prefix == self.prefix

    def absorb(self, message: Message) -> None:
        """Apply one key message of this prefix (the caller checked `owns`). Raises ValueError
        (or the model's ModelError) for a payload that does not decode; the state is unchanged."""
        _prefix, key = split_topic(message.topic)
        assert key is not None
        if is_tombstone(message.payload):
            self._remove(key)
        else:
            value = self.decode(message.payload, key)
            self._remove(key)
            self.values[key] = value
            self._hash ^= digest_int(self.digest(value))
        self.changed.add(key)

    def _remove(self, key: str) -> None:
        old = self.values.pop(key, _MISSING)
        if old is not _MISSING:
            self._hash ^= digest_int(self.digest(old))

    def matches(self, summary_hash: object) -> bool:
        return isinstance(summary_hash, str) and summary_hash == self.hash

    def clear(self) -> None:
        """Forget everything (before a resync: the snapshot brings the whole state again)."""
        self.changed.update(self.values)
        self.values.clear()
        self._hash = 0

    def take_changed(self) -> set[str]:
        changed, self.changed = self.changed, set()
        return changed
