"""MarathonSource: the I/O around the pure Marathon modules (fetches, the event stream thread,
locking, timing).

The mirror is a `MarathonState` (mirror.py) plus a cache of parsed app versions (immutable, so
never refetched). Each event from `/v2/events` goes through `events.step_data`, which returns
the new mirror and what changed: apps touched (rebuilt at the next `current()`), apps to fetch
again, or a full resync. `wait_for_change` returns as soon as the stream goes quiet (`settle`),
coalescing a sustained burst for at most `coalesce`. `current()` then does the pending fetches
(one request per dirty app, or a single full `/v2/apps?embed=apps.tasks` when many apps are
dirty) and rebuilds the services of the apps that changed only (builder.ServiceBuilder); with
nothing changed it returns the cached Discovery. Every Discovery names the keys whose service
changed since the one before (`Discovery.changed`). A full resync happens after every stream
(re)connect and every `REFRESH_INTERVAL`. See docs/marathon.md.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Callable
from urllib.parse import quote

from services.collector.marathon import events
from services.collector.marathon.apps import AppSpec
from services.collector.marathon.builder import ServiceBuilder
from services.collector.marathon.client import EventStream, MarathonClient, NotFound, Replica, parse_replicas
from services.collector.marathon.mirror import (MarathonState, load_version, missing_versions, pairs_for,
                                                take_app)
from services.collector.resolve import Resolver
from services.collector.source import Discovery, DroppedEvents, Source, SourceError, down_note
from services.common.config import Settings
from services.common.memory import release_freed_memory
from services.common.redact import redact

log = logging.getLogger("proxymatic.collector.marathon")


def _one_line(text: str, limit: int) -> str:
    """Text for a one-line warning: control characters escaped, bounded length."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit * 2])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _causes(types: dict[str, None], limit: int = 6) -> str:
    """The event types behind a change in the order they first came, for the change log:
    "a, b and 2 more"."""
    shown = list(types)
    text = ", ".join(shown[:limit])
    return text if len(shown) <= limit else f"{text} and {len(shown) - limit} more"


class MarathonSource(Source):
    name = "marathon"

    def __init__(self, settings: Settings, *, events: bool = True, watchdog: float | None = None,
                 request_timeout: float = 10.0, connect_timeout: float = 3.0, backoff_initial: float = 0.5,
                 backoff_max: float = 30.0, coalesce: float = 0.05, settle: float = 0.002, max_app_fetches: int = 5,
                 version_cache_size: int = 10000, resolver: Callable[[str], str | None] | None = None,
                 refresh_interval: float | None = None, server_filter: bool = True):
        try:
            self.replicas: list[Replica] = parse_replicas(settings.marathon)
        except ValueError as error:
            raise SourceError(str(error)) from None
        self.refresh_interval = float(refresh_interval if refresh_interval is not None else settings.refresh_interval)
        self.client = MarathonClient(self.replicas, timeout=request_timeout, connect_timeout=connect_timeout)
        self.resolve = resolver or Resolver()
        self.coalesce = coalesce  # the longest a burst of events is coalesced
        self.settle = settle  # the stream quiet this long: the burst is over
        self.max_app_fetches = max_app_fetches
        self._events_enabled = events
        self._stream_kwargs = dict(
            # Marathon sends nothing on a quiet cluster, so a silent stream is reopened (and the
            # mirror resynced) once per refresh interval at most: the same cost as the poll.
            watchdog=watchdog if watchdog is not None else max(10.0, min(self.refresh_interval, 300.0)),
            connect_timeout=connect_timeout, backoff_initial=backoff_initial, backoff_max=backoff_max,
            server_filter=server_filter, on_status=self._on_stream_status)
        self.stream: EventStream | None = None
        self._stream_note = ""  # why the source is degraded while the stream is down ("" when up)
        # malformed events dropped, and the warning about them (guarded by _cond)
        self._dropped = DroppedEvents("event stream", log)
        self._cond = threading.Condition()
        # the mirror (guarded by _cond)
        self._state = MarathonState()  # replaced whole, never changed in place
        self._versions: OrderedDict[tuple[str, str], AppSpec | None] = OrderedDict()
        self._version_cache_size = version_cache_size
        # the services, built incrementally (guarded by _build_lock, taken before _cond)
        self.builder = ServiceBuilder()
        self._build_lock = threading.Lock()
        self._touched: set[str] = set()  # apps whose fragment may be stale (guarded by _cond)
        self._rebuild_all = True  # after a full sync: check every app, drop the vanished
        self._discovery: Discovery | None = None  # what the builder gave last
        # keys whose service changed since the last Discovery handed out (guarded by _build_lock);
        # None until the first one: the collector diffs that one whole
        self._unreported: set[str] | None = None
        # (that, the notes, it with the notes below) (guarded by _cond)
        self._noted: tuple[Discovery, tuple[str, str], Discovery] | None = None
        self._last_event = 0.0  # monotonic time of the last event or stream connect
        # pending work
        self._synced = False
        self._pending_full = True
        self._dirty_apps: set[str] = set()
        self._changed = False
        self._last_full = 0.0
        self._recording: list[tuple[str, dict]] | None = None
        self._fetch_warnings: list[str] = []
        self._fetch_excluded: list = []  # Excluded entries of the apps and tasks a fetch skipped
        # What the next current() reflects: the newest event's arrival (wall clock) and the
        # event types applied since the last current() (guarded by _cond).
        self._news_at = 0.0
        self._news: dict[str, None] = {}  # an ordered set
        self._stream_failures_seen = 0
        self._closed = False
        self._failed = False  # the last current() raised: wait for news, not for pending work
        self.stats = {"events": 0, "events_applied": 0, "events_dropped": 0, "full_syncs": 0, "app_fetches": 0,
                      "version_fetches": 0}

    # ------------------------------------------------------------------------------------------
    # Source interface

    def current(self) -> Discovery:
        self._ensure_stream()
        with self._cond:
            resync = self._pending_full or not self._synced
            full = (resync or time.monotonic() - self._last_full >= self.refresh_interval
                    or len(self._dirty_apps) > self.max_app_fetches)
            self._changed = False
            # What this call reflects, for the collector (changed_at, the change log's "why").
            news_at, news = self._news_at, self._news
            self._news_at, self._news = 0.0, {}
            if news:
                self.received_at, self.cause = news_at, _causes(news)
            else:
                self.received_at, self.cause = 0.0, "resync" if resync and self._synced else "poll"
            if (not full and not self._dirty_apps and not self._touched and not self._rebuild_all
                    and self._discovery is not None):
                self._failed = False
                return self._with_notes(self._discovery)  # nothing changed since the last call
            dirty = set() if full else set(self._dirty_apps)
            self._pending_full = False
            self._dirty_apps.clear()
            if full or dirty:
                self._recording = []
        if full or dirty:
            try:
                self._fetch(full, dirty)
            except BaseException:
                with self._cond:  # not reflected yet: the next current() will
                    self._news = {**news, **self._news}
                    self._news_at = max(self._news_at, news_at)
                raise
            if full:
                self.counters.event("poll")
            if not news:
                self.received_at = time.time()  # the answer that may change the services
        else:
            with self._cond:
                self._failed = False
        self._fetch_missing_versions()
        discovery = self._build()
        if full:
            release_freed_memory()  # the whole /v2/apps answer was just freed
        return discovery

    def _fetch(self, full: bool, dirty: set[str]) -> None:
        started = time.monotonic()
        try:
            if full:
                apps, tasks, warnings, excluded = self._fetch_all()
            else:
                apps, tasks, warnings, excluded = self._fetch_apps(dirty)
        except BaseException:
            self.counters.error()
            with self._cond:
                self._recording = None
                self._pending_full = self._pending_full or full
                self._dirty_apps |= dirty
                self._failed = True
            raise
        with self._cond:
            self._failed = False
            recorded, self._recording = self._recording or [], None
            if full:
                self._state = MarathonState(apps, tasks)
                self._last_full = started
                self._synced = True
                self._rebuild_all = True
                self.stats["full_syncs"] += 1
            else:
                self._state = self._state.with_apps(apps, tasks, dirty)
                self._touched |= dirty
            for event_type, event in recorded:  # what happened while we were fetching
                self._state, changes, problem = events.step(self._state, event_type, event)
                if problem:
                    self._drop_event(event_type, problem)
                self._take(changes)
            self._fetch_warnings = warnings
            self._fetch_excluded = excluded

    def wait_for_change(self, timeout: float, stop: threading.Event) -> None:
        self._ensure_stream()
        deadline = time.monotonic() + timeout
        changed = False
        with self._cond:
            while not stop.is_set() and not self._closed:
                # After a failure the collector backs off through this call: only news (an
                # event, a stream that connects again) ends the wait early, not the retry
                # that is pending anyway.
                if self._changed or (not self._failed and (self._pending_full or self._dirty_apps
                                                           or self._dropped.refresh())):
                    changed = True
                    break
                now = time.monotonic()
                if self._failed:
                    if now >= deadline:
                        return
                    self._cond.wait(min(deadline - now, 0.25))
                    continue
                if now - self._last_full >= self.refresh_interval:
                    self._pending_full = True
                    changed = True
                    break
                remaining = min(deadline, self._last_full + self.refresh_interval) - now
                if now >= deadline:
                    return
                self._cond.wait(min(max(remaining, 0.001), 0.25))
        if changed and self.coalesce > 0:
            self._settle(stop)

    def _settle(self, stop: threading.Event) -> None:
        """Let a burst of events land (one rebuild, one fetch): return once the stream has been
        quiet for `settle` seconds, and after `coalesce` seconds at most. An isolated event
        costs `settle`; a sustained burst costs at most `coalesce`."""
        bound = time.monotonic() + self.coalesce
        while not stop.is_set() and not self._closed:
            now = time.monotonic()
            quiet_at = self._last_event + self.settle
            if now >= quiet_at or now >= bound:
                return
            # not the condition: it is notified at every event, and this wait is for silence
            stop.wait(min(quiet_at, bound) - now)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self.stream is not None:
            self.stream.close()
        self.client.close()

    # ------------------------------------------------------------------------------------------
    # fetching

    def _ensure_stream(self) -> None:
        if self._events_enabled and self.stream is None and not self._closed:
            self.stream = EventStream(self.replicas, self._on_event, self._on_connect, **self._stream_kwargs)
            self.stream.start()

    def _take_app(self, app: Any, warnings: list[str], excluded: list | None = None):
        # the mirror read without the lock: replaced whole, never changed in place
        taken = take_app(app, self._state.apps, warnings, [] if excluded is None else excluded)
        if taken:
            self._remember_version(taken[1][1])
        return taken

    def _fetch_all(self):
        data = self.client.get_json("/v2/apps", {"embed": "apps.tasks"})
        apps_list = data.get("apps") if isinstance(data, dict) else None
        if not isinstance(apps_list, list):
            raise SourceError("Marathon /v2/apps answered without an apps list")
        warnings: list[str] = []
        excluded: list = []
        apps, tasks = {}, {}
        for app in apps_list:
            taken = self._take_app(app, warnings, excluded)
            if taken:
                apps[taken[0]], tasks[taken[0]] = taken[1], taken[2]
        log.debug("marathon: full sync, %d apps, %d tasks", len(apps), sum(len(t) for t in tasks.values()))
        return apps, tasks, warnings, excluded

    def _fetch_apps(self, app_ids: set[str]):
        warnings: list[str] = list(self._fetch_warnings)
        # the entries of the apps fetched again are replaced by what this fetch says of them
        excluded: list = [e for e in self._fetch_excluded if e.app not in app_ids]
        apps, tasks = {}, {}
        for app_id in sorted(app_ids):
            self.stats["app_fetches"] += 1
            try:
                data = self.client.get_json(f"/v2/apps/{quote(app_id.strip('/'))}", {"embed": "app.tasks"})
            except NotFound:
                continue  # gone: dropped by the caller
            app = data.get("app") if isinstance(data, dict) else None
            taken = self._take_app(app, warnings, excluded)
            if taken:
                apps[app_id], tasks[app_id] = taken[1], taken[2]
        return apps, tasks, warnings, excluded

    def _remember_version(self, spec: AppSpec) -> None:
        key = (spec.app_id, spec.version)
        self._versions[key] = spec
        self._versions.move_to_end(key)
        while len(self._versions) > self._version_cache_size:
            self._versions.popitem(last=False)

    def _fetch_missing_versions(self) -> None:
        with self._cond:  # only apps that changed can lack a version (they stay touched until built)
            touched = self._state.tasks.keys() if self._rebuild_all else self._touched
            missing = missing_versions(self._state, self._versions, touched)
        for app_id, version in sorted(missing):
            self.stats["version_fetches"] += 1
            try:
                app = self.client.get_json(f"/v2/apps/{quote(app_id.strip('/'))}/versions/{quote(version)}")
            except NotFound:
                app = None
            spec, problem = load_version(app)
            if problem:
                log.warning("marathon: app %s version %s unusable: %s", app_id, version, problem)
            with self._cond:
                self._versions[(app_id, version)] = spec

    def _build(self) -> Discovery:
        """Rebuild the fragments of the touched apps, re-merge the ports they changed."""
        with self._build_lock:
            with self._cond:
                touched, self._touched = self._touched, set()
                if self._rebuild_all:
                    touched |= self._state.tasks.keys() | self.builder.app_ids()
                    self._rebuild_all = False
                work = [(app_id, pairs_for(self._state, self._versions, app_id)) for app_id in sorted(touched)]
                fetch_warnings = tuple(self._fetch_warnings)
                fetch_excluded = tuple(self._fetch_excluded)
            try:
                for app_id, (pairs, warnings) in work:
                    self.builder.update(app_id, pairs, self.resolve, warnings)
                services, warnings = self.builder.result(fetch_warnings)
                excluded = self.builder.excluded(fetch_excluded)
            except BaseException:
                with self._cond:
                    self._touched |= touched
                raise
            changed = self.builder.take_changed()
            discovery = self._discovery
            if discovery is None:
                self._unreported = None  # the first: no Discovery before it to compare with
            elif self._unreported is not None:
                self._unreported |= changed
            if (discovery is None or discovery.services is not services or discovery.warnings != warnings
                    or discovery.excluded is not excluded):
                reported = frozenset(self._unreported) if self._unreported is not None else None
                discovery = self._discovery = Discovery(services, warnings, excluded=excluded, changed=reported)
                self._unreported = set()
        return self._with_notes(discovery)

    def _with_notes(self, base: Discovery) -> Discovery:
        """The built services with the stream's state: `degraded` while the stream is down,
        and a warning counting the malformed events dropped (its text changes at most every
        few seconds, see DroppedEvents). The same object while nothing changed, so the
        collector sees no change."""
        with self._cond:
            self._dropped.refresh()
            dropped = self._dropped.note
            notes = (self._stream_note, dropped)
            if self._noted is None or self._noted[0] is not base or self._noted[1] != notes:
                # first: the heartbeat's summary (status) shows only the first warnings
                warnings = ((dropped,) if dropped else ()) + base.warnings
                self._noted = (base, notes, Discovery(base.services, warnings, degraded=self._stream_note,
                                                      excluded=base.excluded, changed=base.changed))
            return self._noted[2]

    # ------------------------------------------------------------------------------------------
    # events (called from the stream thread)

    def _on_connect(self, replica: Replica) -> None:
        with self._cond:
            self._pending_full = True  # events may have been missed: resync fully
            self._changed = True
            self._last_event = time.monotonic()
            self._cond.notify_all()

    def _on_stream_status(self) -> None:
        """The stream went up or down (or failed once more): publish `degraded` while it is
        down and we only poll, `ok` again once it is up."""
        stream = self.stream
        if stream is None:
            return
        health = stream.health()
        failed = 0 if health.up else health.failed_attempts
        if failed > self._stream_failures_seen:
            self.counters.error(failed - self._stream_failures_seen)
        self._stream_failures_seen = failed
        note = ""
        if not health.up and health.failed_attempts and health.down_since is not None:
            note = down_note("event stream", health.down_since, _one_line(redact(health.error), 200),
                             f"polling every {self.refresh_interval:g}s")
        with self._cond:
            if note != self._stream_note:
                self._stream_note = note
                # While Marathon itself fails, the collector is backing off: a stream failing
                # too is no news (the stream coming back is, through _on_connect).
                if not self._failed:
                    self._changed = True
                    self._cond.notify_all()

    def _on_event(self, event_type: str, data: bytes) -> None:
        """One event from the stream thread. Whatever is wrong with it (bad JSON, fields of the
        wrong type, a bug while applying it) drops that event alone, with a warning; the
        stream goes on."""
        self._last_event = time.monotonic()
        self.stats["events"] += 1
        self.counters.event(_one_line(event_type or "untyped", 80))
        try:
            problem = self._handle_event(event_type, data)
        except Exception as error:  # noqa: BLE001 - a bug must not end the stream
            problem = f"{type(error).__name__}: {error}"
        if problem:
            self._drop_event(event_type, problem)

    def _drop_event(self, event_type: str, problem: str) -> None:
        kind = _one_line(event_type or "untyped", 80)  # a known type (the parser drops the others)
        reason = _one_line(redact(problem), 200)
        self.counters.error()
        with self._cond:
            self.stats["events_dropped"] += 1
            # Each drop is logged (rate-limited) and counted; the published warning changes at
            # most every few seconds: a flood of bad events is not a flood of full snapshots.
            if self._dropped.drop(f"{kind}: {reason}", f"marathon: {kind} event dropped: {reason}"):
                self._changed = True
                self._cond.notify_all()

    def _handle_event(self, event_type: str, data: bytes) -> str | None:
        """Apply one event (events.step_data); returns why it was dropped, None when it was
        used (or ignored)."""
        with self._cond:
            state, changes, problem = events.step_data(self._state, event_type, data)
            if problem:
                return problem
            self._state = state
            carried = data and not events.is_deployment(event_type)  # not just "fetch these"
            if carried and self._recording is not None:  # replayed on what the fetch brings
                self._recording.append((event_type, events.decode_event(data)))
            if self._take(changes):
                self._changed = True
                if carried:
                    self.stats["events_applied"] += 1
                self._noted_news(event_type)
                self._cond.notify_all()
        return None

    def _take(self, changes: events.Changes) -> bool:
        """Note what an event changed, for the next current() (lock held)."""
        self._touched |= changes.touched
        self._dirty_apps |= changes.fetch
        if changes.resync:
            self._pending_full = True
        return bool(changes)

    def _noted_news(self, event_type: str) -> None:
        """An event that may change the services arrived now (lock held)."""
        self._news_at = time.time()
        if len(self._news) < 16:  # a handful of types exist; never a set of hostile names
            self._news.setdefault(_one_line(event_type or "untyped", 80))
