"""The one interface every discovery source implements (after confd's backend client).

A source answers two questions: what is there now (`current`), and "tell me when that may
have changed" (`wait_for_change`). The collector runs each source in its own thread, so a
source may block on the network as long as it honours `stop` and its own timeouts; one source
hanging never delays another.
"""
from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from services.common.model import Excluded, Service


class SourceError(Exception):
    """Discovery failed (unreachable, malformed answer...). The collector keeps the last good
    state of the source and reports it degraded with this message."""


@dataclass(frozen=True)
class Discovery:
    """What a source found: services, plus entries it skipped and why (never fatal).
    `degraded` says why the answer may be late although it is current (e.g. an event stream
    that is down, so changes only arrive with the next poll); "" when all is well."""

    services: tuple[Service, ...]
    warnings: tuple[str, ...] = ()
    degraded: str = ""
    # What the source saw but does not serve, each with its reason (docs/bus.md, Excluded).
    excluded: tuple[Excluded, ...] = ()
    # The keys ("port/protocol") whose service may have changed (added, changed, removed) since
    # the Discovery the source returned before this one; None: unknown, compare everything.
    # A superset is fine (a key that did not change compares equal); a key missing is not.
    # Excluded entries are not covered: the collector compares those whenever the tuple changes.
    changed: frozenset[str] | None = None


def down_note(what: str, since: float, reason: str, meanwhile: str) -> str:
    """The `degraded` text of a source whose change feed (event stream, watch) is down: since
    when (local time), why, and how changes still arrive meanwhile."""
    return f"{what} down since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}: {reason}; {meanwhile}"


class SourceCounters:
    """What a source counts for the collector's heartbeat (docs/bus.md, Counters in
    heartbeats): events by type (`status_update_event`..., `poll`, `watch`, `file_change`) and
    errors (failed reads, broken streams, dropped events). Thread-safe: the stream or watch
    thread counts as well as the runner."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, int] = {}
        self._errors = 0

    def event(self, kind: str, count: int = 1) -> None:
        with self._lock:
            self._events[kind] = self._events.get(kind, 0) + count

    def error(self, count: int = 1) -> None:
        with self._lock:
            self._errors += count

    @property
    def errors(self) -> int:
        return self._errors

    def events(self) -> dict[str, int]:
        with self._lock:
            return dict(self._events)

    def snapshot(self) -> dict:
        """`{"events": {type: count}, "errors": count}` for the heartbeat."""
        with self._lock:
            return {"events": dict(self._events), "errors": self._errors}


class Source(ABC):
    #: "marathon" | "registrator" | "file": also the planner's precedence key.
    name: str
    #: Wall-clock time (time.time()) at which the source received the newest event or answer
    #: that the last `current()` reflects; 0.0: unknown (the collector then uses the time it
    #: called `current()`). Set by `current()` itself, read by the collector right after it.
    received_at: float = 0.0
    #: Why the last `current()` may differ from the one before: the event types applied since
    #: (e.g. "status_update_event"), "poll" or "resync"; "" when unknown. Set like received_at.
    cause: str = ""

    @property
    def counters(self) -> SourceCounters:
        """This source's counters (created on first use; the collector creates them before
        any thread of the source runs)."""
        counters = self.__dict__.get("_counters")
        if counters is None:
            counters = self.__dict__.setdefault("_counters", SourceCounters())
        return counters

    @abstractmethod
    def current(self) -> Discovery:
        """Return the full current state. Raise SourceError when it cannot be known."""

    @abstractmethod
    def wait_for_change(self, timeout: float, stop: threading.Event) -> None:
        """Block until the state may have changed, `timeout` seconds pass, or `stop` is set.
        May raise SourceError (the collector backs off, then calls `current` again)."""

    def close(self) -> None:
        """Release connections; called once when the collector stops."""


class SourceBroken(SourceError):
    """The source cannot work at all until its configuration changes (e.g. a URL that does not
    parse): retrying does not help, so the collector publishes it `degraded` at once, with no
    services (or its saved last good ones), instead of `initializing` forever."""


class BrokenSource(Source):
    """Stands in for a source that could not be built (a bad URL...): every `current()` raises
    SourceBroken with the reason, so that source alone is published degraded while the other
    sources run normally."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason

    def current(self) -> Discovery:
        raise SourceBroken(self.reason)

    def wait_for_change(self, timeout: float, stop: threading.Event) -> None:
        stop.wait(timeout)


#: The warning about dropped malformed events changes at most this often (seconds).
DROPPED_NOTE_INTERVAL = 5.0
#: Dropped events logged one by one per interval; beyond that they are counted in one line.
DROPPED_LOG_BURST = 20


class DroppedEvents:
    """The malformed events a source dropped: each one logged at WARNING (at most
    `log_burst` lines per `interval`, the rest summed up in one line), counted, and summed up in
    one warning for the source's published snapshot, `<what>: N malformed events dropped
    (last: <reason>)`.

    That warning is part of the snapshot, so a new text means a new full snapshot on the bus.
    It therefore changes at most once per `interval` seconds: the first drop shows at once, the
    drops that follow within the interval show when it has passed (at the next drop, or at the
    next `refresh()`, which the source calls while it waits for changes). A flood of bad
    events costs one republish per interval, not one per event.

    Not thread-safe on its own: callers hold their source's lock (`drop`, `refresh`, `note`)."""

    def __init__(self, what: str, logger: logging.Logger, interval: float = DROPPED_NOTE_INTERVAL,
                 log_burst: int = DROPPED_LOG_BURST, clock: Callable[[], float] = time.monotonic):
        self.what = what
        self.log = logger
        self.interval = interval
        self.log_burst = log_burst
        self.clock = clock
        self.count = 0
        self.note = ""  # the published warning ("" before the first drop)
        self._last_reason = ""
        self._noted_count = 0  # the count `note` shows
        self._noted_at = 0.0
        self._logged_at = 0.0  # start of the current logging window
        self._logged = 0  # lines logged in that window
        self._unlogged = 0  # drops not logged one by one since the last summary line

    def drop(self, reason: str, message: str | None = None) -> bool:
        """Count one dropped event. `reason` (one line, already redacted) goes in the warning,
        `message` in the log line (default: `<what>: malformed event dropped: <reason>`).
        Returns whether the published warning changed."""
        self.count += 1
        self._last_reason = reason
        now = self.clock()
        if now - self._logged_at >= self.interval:
            self._flush_log()
            self._logged_at, self._logged = now, 0
        if self._logged < self.log_burst:
            self._logged += 1
            self.log.warning("%s", message or f"{self.what}: malformed event dropped: {reason}")
        else:
            self._unlogged += 1
        return self.refresh()

    def refresh(self) -> bool:
        """Bring the warning up to date if drops wait and the interval has passed. Returns
        whether it changed."""
        if self.count == self._noted_count:
            return False
        now = self.clock()
        if self.note and now - self._noted_at < self.interval:
            return False
        self._flush_log()
        self._noted_count, self._noted_at = self.count, now
        self.note = f"{self.what}: {self.count} malformed events dropped (last: {self._last_reason})"
        return True

    def pending(self) -> bool:
        """Whether drops wait to show in the warning."""
        return self.count != self._noted_count

    def _flush_log(self) -> None:
        if self._unlogged:
            self.log.warning("%s: %d more malformed events dropped (not logged one by one; %d in all)",
                             self.what, self._unlogged, self.count)
            self._unlogged = 0
