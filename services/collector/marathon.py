"""Marathon discovery: an event-driven mirror of the apps and tasks, polled as a safety net.

State: the current app specs, the tasks of every app, and a cache of parsed app versions
(immutable, so never refetched). Events from `/v2/events` are applied to that mirror directly
when they carry the change (a status update has host, ports, state and version; a health change
has the verdict); otherwise they mark one app for refetch. `wait_for_change` returns as soon
as the stream goes quiet (`settle`), coalescing a sustained burst for at most `coalesce`.
`current()` then does the pending fetches (one request per dirty app, or a single full
`/v2/apps?embed=apps.tasks` when many apps are dirty) and rebuilds the services of the apps
that changed only (`ServiceBuilder`: one cached fragment per app, ports re-merged only where
backends changed); with nothing changed it returns the cached Discovery. A full resync happens
after every stream (re)connect and every `REFRESH_INTERVAL`. See docs/marathon.md.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from typing import Any, Callable
from urllib.parse import quote

from services.collector.marathon_client import (EventStream, MarathonClient, NotFound, Replica, decode_event,
                                                parse_replicas)
from services.collector.marathon_events import event_problem
from services.collector.exclusions import excluded as make_excluded
from services.collector.marathon_parse import (TERMINAL_STATES, AppError, AppSpec, ServiceBuilder, app_skipped,
                                               app_uses_current_config, clip, parse_app)
from services.collector.resolve import Resolver
from services.collector.source import Discovery, DroppedEvents, Source, SourceError
from services.common.config import Settings
from services.common.redact import redact

log = logging.getLogger("proxymatic.collector.marathon")

_DEPLOYMENT_APP_RE = re.compile(rb'"app"\s*:\s*"(/[^"\\]{1,512})"')
_KEEP_TASK_KEYS = ("id", "appId", "host", "ports", "ipAddresses", "version", "state", "healthCheckResults")
# Fields of an app in /v2/apps that change without its definition changing (no new parse).
_VOLATILE_APP_KEYS = frozenset({"tasks", "tasksStaged", "tasksRunning", "tasksHealthy", "tasksUnhealthy",
                                "deployments", "lastTaskFailure", "taskStats", "readinessCheckResults"})
_GONE_CONDITIONS = frozenset({"Killed", "Finished", "Failed", "Gone", "Dropped", "Error", "Unknown",
                              "UnreachableInactive"})


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


def _slim(task: dict, app_id: str) -> dict:
    slim = {key: task[key] for key in _KEEP_TASK_KEYS if key in task}
    slim["appId"] = app_id
    return slim


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
        self._apps: dict[str, tuple[dict, AppSpec]] = {}  # app id -> (app without tasks, spec)
        self._tasks: dict[str, dict[str, dict]] = {}  # app id -> task id -> slim task
        self._versions: OrderedDict[tuple[str, str], AppSpec | None] = OrderedDict()
        self._version_cache_size = version_cache_size
        # the services, built incrementally (guarded by _build_lock, taken before _cond)
        self.builder = ServiceBuilder()
        self._build_lock = threading.Lock()
        self._touched: set[str] = set()  # apps whose fragment may be stale (guarded by _cond)
        self._rebuild_all = True  # after a full sync: check every app, drop the vanished
        self._discovery: Discovery | None = None  # what the builder gave last
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
        return self._build()

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
                self._apps, self._tasks = apps, tasks
                self._last_full = started
                self._synced = True
                self._rebuild_all = True
                self.stats["full_syncs"] += 1
            else:
                for app_id in dirty:
                    if app_id in apps:
                        self._apps[app_id] = apps[app_id]
                        self._tasks[app_id] = tasks.get(app_id, {})
                    else:
                        self._apps.pop(app_id, None)
                        self._tasks.pop(app_id, None)
                self._touched |= dirty
            for event_type, event in recorded:  # what happened while we were fetching
                try:
                    self._apply(event_type, event)
                except Exception as error:  # noqa: BLE001 - one event must not fail the sync
                    self._drop_event(event_type, f"{type(error).__name__}: {error}")
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

    def _known_spec(self, app: Any) -> AppSpec | None:
        """The spec parsed last time when the app's definition has not changed since (a full
        sync of 1,000 apps then parses only what changed)."""
        if not isinstance(app, dict) or not isinstance(app.get("id"), str):
            return None
        app_id = app["id"] if app["id"].startswith("/") else "/" + app["id"]
        known = self._apps.get(app_id)  # read without the lock: replaced whole, never mutated
        if known is None:
            return None
        definition, spec = known
        for key in definition.keys() | app.keys():
            if key not in _VOLATILE_APP_KEYS and definition.get(key) != app.get(key):
                return None
        return spec

    def _take_app(self, app: Any, warnings: list[str], excluded: list | None = None
                  ) -> tuple[str, tuple[dict, AppSpec], dict[str, dict]] | None:
        excluded = [] if excluded is None else excluded
        try:
            spec = self._known_spec(app) or parse_app(app)
        except AppError as error:
            warnings.append(f"app skipped: {error}")
            excluded.append(app_skipped(app, error))
            return None
        except Exception as error:  # hostile data: skip this app alone
            warnings.append(f"app {clip(app.get('id') if isinstance(app, dict) else app)} skipped: {clip(str(error), 120)}")
            excluded.append(app_skipped(app, error))
            return None
        raw_tasks = app.get("tasks")
        tasks = {}
        for task in raw_tasks if isinstance(raw_tasks, list) else []:
            if isinstance(task, dict) and isinstance(task.get("id"), str):
                tasks[task["id"]] = _slim(task, spec.app_id)
            else:
                warnings.append(f"app {clip(spec.app_id)}: malformed task {clip(task)} skipped")
                excluded.append(make_excluded("marathon", "bad_data", f"malformed task {clip(task)} skipped",
                                              app=spec.app_id, service=spec.name or ""))
        definition = {k: v for k, v in app.items() if k != "tasks"}
        self._remember_version(spec)
        return spec.app_id, (definition, spec), tasks

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

    def _spec_for(self, task: dict) -> AppSpec | None | bool:
        """The spec of a task's app version; False when it must be fetched first."""
        entry = self._apps.get(task.get("appId"))
        if entry is None:
            return None
        definition, spec = entry
        version = task.get("version")
        if app_uses_current_config(definition, version):
            return spec
        key = (spec.app_id, version)
        if key in self._versions:
            return self._versions[key]
        return False

    def _fetch_missing_versions(self) -> None:
        with self._cond:  # only apps that changed can lack a version (they stay touched until built)
            touched = self._tasks.keys() if self._rebuild_all else self._touched
            missing = {(task["appId"], task["version"]) for app_id in touched
                       for task in self._tasks.get(app_id, {}).values() if self._spec_for(task) is False}
        for app_id, version in sorted(missing):
            self.stats["version_fetches"] += 1
            try:
                app = self.client.get_json(f"/v2/apps/{quote(app_id.strip('/'))}/versions/{quote(version)}")
                spec: AppSpec | None = parse_app(app)
            except NotFound:
                spec = None
            except AppError as error:
                log.warning("marathon: app %s version %s unusable: %s", app_id, version, error)
                spec = None
            with self._cond:
                if spec is None:
                    self._versions[(app_id, version)] = None
                else:
                    self._versions[(app_id, version)] = spec

    def _build(self) -> Discovery:
        """Rebuild the fragments of the touched apps, re-merge the ports they changed."""
        with self._build_lock:
            with self._cond:
                touched, self._touched = self._touched, set()
                if self._rebuild_all:
                    touched |= self._tasks.keys() | self.builder.app_ids()
                    self._rebuild_all = False
                work = [(app_id, self._pairs(app_id)) for app_id in sorted(touched)]
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
            discovery = self._discovery
            if (discovery is None or discovery.services is not services or discovery.warnings != warnings
                    or discovery.excluded is not excluded):
                discovery = self._discovery = Discovery(services, warnings, excluded=excluded)
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
                                                      excluded=base.excluded))
            return self._noted[2]

    def _pairs(self, app_id: str) -> tuple[list[tuple[dict, AppSpec]], list[str]]:
        """(task copy, spec of its version) for the tasks of one app, and warnings (lock held)."""
        pairs: list[tuple[dict, AppSpec]] = []
        warnings: list[str] = []
        for task in self._tasks.get(app_id, {}).values():
            spec = self._spec_for(task)
            if spec is None and app_id in self._apps:
                # the version is gone from Marathon: the current definition is the best guess
                spec = self._apps[app_id][1]
                warnings.append(f"app {clip(app_id)}: version {clip(task.get('version'))} of task "
                                f"{clip(task.get('id'))} not found; using the current definition")
            if spec:
                # A shallow copy: events replace a task's values, never mutate them in place,
                # so the copy is a snapshot (and the fragment's inputs to compare with).
                pairs.append((dict(task), spec))
        return pairs, warnings

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
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(health.down_since))
            note = (f"event stream down since {since}: {_one_line(redact(health.error), 200)}; "
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
        """Apply one event; returns why it was dropped, None when it was used (or ignored)."""
        if event_type.startswith("deployment_") or event_type == "unknown_large_event":
            # Plans can be megabytes: find the apps without parsing; none found -> resync.
            apps = {m.decode("utf-8", "replace") for m in _DEPLOYMENT_APP_RE.findall(data)} if data else set()
            with self._cond:
                if apps:
                    self._dirty_apps |= apps
                else:
                    self._pending_full = True
                self._changed = True
                self._noted_news(event_type)
                self._cond.notify_all()
            return None
        if not data:  # too big to keep: we cannot tell what changed
            with self._cond:
                self._pending_full = True
                self._changed = True
                self._noted_news(event_type)
                self._cond.notify_all()
            return None
        event = decode_event(data)
        if event is None:
            return f"not a JSON object: {data[:200]!r}"
        problem = event_problem(event_type, event)
        if problem:
            return problem
        with self._cond:
            applied = self._apply(event_type, event)  # raising: dropped, and not replayed either
            if self._recording is not None:
                self._recording.append((event_type, event))
            if applied:
                self._changed = True
                self.stats["events_applied"] += 1
                self._noted_news(event_type)
                self._cond.notify_all()
        return None

    def _noted_news(self, event_type: str) -> None:
        """An event that may change the services arrived now (lock held)."""
        self._news_at = time.time()
        if len(self._news) < 16:  # a handful of types exist; never a set of hostile names
            self._news.setdefault(_one_line(event_type or "untyped", 80))

    def _find_task(self, app_id: Any, task_id: Any = None, instance_id: Any = None) -> dict | None:
        tasks = self._tasks.get(app_id) if isinstance(app_id, str) else None
        if not tasks:
            return None
        if isinstance(task_id, str) and task_id in tasks:
            return tasks[task_id]
        instance_id = instance_id if isinstance(instance_id, str) else task_id
        if not isinstance(instance_id, str):
            return None
        # Instance ids are <app>.marathon-<uuid> (or instance-); legacy task ids <app>.<uuid>;
        # 1.5+ task ids embed the instance id.
        legacy = re.sub(r"\.(marathon|instance)-", ".", instance_id, count=1)
        if legacy in tasks:
            return tasks[legacy]
        prefix = instance_id + "."
        for candidate_id, task in tasks.items():
            if candidate_id.startswith(prefix):
                return task
            results = task.get("healthCheckResults")
            if isinstance(results, list) and any(isinstance(r, dict) and r.get("instanceId") == instance_id
                                                 for r in results):
                return task
        return None

    def _apply(self, event_type: str, event: dict) -> bool:
        """Apply one event to the mirror (lock held). Returns whether routing may change.
        An app whose tasks it changes is marked touched: its fragment is checked at the next
        build. Values of a task are replaced, never mutated in place (see `_pairs`)."""
        if event_type == "status_update_event":
            app_id, task_id, status = event.get("appId"), event.get("taskId"), event.get("taskStatus")
            if not isinstance(app_id, str) or not isinstance(task_id, str):
                return False
            if app_id not in self._apps:
                self._dirty_apps.add(app_id)
                return True
            tasks = self._tasks.setdefault(app_id, {})
            self._touched.add(app_id)
            if status in TERMINAL_STATES:
                return tasks.pop(task_id, None) is not None
            task = tasks.get(task_id)
            if task is None:
                task = tasks[task_id] = {"id": task_id, "appId": app_id}
            for key in ("host", "ports", "ipAddresses", "version"):
                if key in event:
                    task[key] = event[key]
            task["state"] = status
            return True
        if event_type in ("health_status_changed_event", "instance_health_changed_event"):
            app_id = event.get("appId", event.get("runSpecId"))
            alive = event.get("alive", event.get("healthy"))
            task = self._find_task(app_id, event.get("taskId"), event.get("instanceId"))
            if task is None or not isinstance(alive, bool):
                if isinstance(app_id, str) and alive is not None:
                    self._dirty_apps.add(app_id)
                    return True
                return False
            task["healthCheckResults"] = [{"alive": alive}]
            self._touched.add(task["appId"])
            return True
        if event_type == "instance_changed_event":
            condition = event.get("condition")
            task = self._find_task(event.get("runSpecId"), None, event.get("instanceId"))
            if task is None:
                return False  # the status_update_event that goes with it carries the details
            if condition == "Killing":
                task["state"] = "TASK_KILLING"
                self._touched.add(task["appId"])
                return True
            if condition in _GONE_CONDITIONS or condition == "Unreachable":
                self._tasks[task["appId"]].pop(task["id"], None)
                self._touched.add(task["appId"])
                return True
            return False
        if event_type == "failed_health_check_event":
            # Marathon's `alive` is "last success after last failure": one failed check makes the
            # task not alive in /v2/apps too. `taskId` holds the instance id on 1.4+.
            app_id = event.get("appId")
            task = self._find_task(app_id, event.get("taskId"), event.get("instanceId", event.get("taskId")))
            if task is not None:
                task["healthCheckResults"] = [{"alive": False}]
                self._touched.add(task["appId"])
                return True
            if isinstance(app_id, str):
                self._dirty_apps.add(app_id)
                return True
            return False
        if event_type == "api_post_event":
            definition = event.get("appDefinition")
            app_id = definition.get("id") if isinstance(definition, dict) else None
            if isinstance(app_id, str):
                self._dirty_apps.add(app_id if app_id.startswith("/") else "/" + app_id)
            else:
                self._pending_full = True  # a group change: we cannot tell which apps
            return True
        if event_type == "app_terminated_event":
            app_id = event.get("appId")
            if isinstance(app_id, str) and (app_id in self._apps or app_id in self._tasks):
                self._apps.pop(app_id, None)
                self._tasks.pop(app_id, None)
                self._touched.add(app_id)
                return True
            return False
        return False
