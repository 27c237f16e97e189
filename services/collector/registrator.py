"""Registrator discovery: services that gliderlabs/registrator publishes in etcd (v2 API).

A background thread keeps an in-memory copy of the prefix:

1. full read: GET <prefix>?recursive=true (a missing prefix, errorCode 100, is an empty state);
2. long poll: GET <prefix>?wait=true&recursive=true&waitIndex=<X-Etcd-Index + 1>, then
   <node.modifiedIndex + 1> after each event. Every event (set, create, update,
   compareAndSwap, delete, expire, compareAndDelete) is applied to the copy, one key (or one
   deleted directory) at a time. A poll that times out moves waitIndex to the poll's own
   X-Etcd-Index + 1 (nothing under the prefix changed up to there), so a quiet prefix in a
   busy etcd does not fall out of the 1000-event history. A poll closed with an empty body is
   retried. errorCode 401 (event index cleared) → full read, then carry on;
3. a full read every REFRESH_INTERVAL as a safety net, and after every failure.

Outage: `current()` raises SourceError while etcd cannot be read (the collector then keeps the
last good services and reports the source degraded); the thread retries with exponential
backoff, trying every endpoint of the URL in turn, and `wait_for_change` wakes up the caller
on each health change. The in-memory copy is never emptied by a failure (`last_known()`).
Details and the key layout: docs/registrator.md.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from http.client import HTTPException
from typing import Any, Callable
from urllib.parse import quote

import etcd
import urllib3
from urllib3.exceptions import HTTPError

from services.collector.registrator_parse import (
    Entry, EntryError, Resolver, caching_resolver, discovery_all, parse_entry,
    parse_etcd_url, parse_tree, relative_key, resolve_host,
)
from services.collector.source import Discovery, DroppedEvents, Source, SourceError, down_note
from services.common.memory import release_freed_memory
from services.common.backoff import Backoff
from services.common.config import ConfigError, Settings
from services.common.redact import redact

log = logging.getLogger("proxymatic.collector.registrator")

SET_ACTIONS = frozenset({"set", "create", "update", "compareAndSwap"})
DELETE_ACTIONS = frozenset({"delete", "expire", "compareAndDelete"})

# Network failures of one request (python-etcd wraps some, urllib3/http.client raise others).
_NETWORK_ERRORS = (etcd.EtcdConnectionFailed, HTTPError, HTTPException, OSError)


class _Unavailable(Exception):
    """No endpoint answered."""


class _Resync(Exception):
    """The watch cannot continue from its index: read everything again."""


class BadEvent(ValueError):
    """A watch event whose fields have the wrong shape: dropped alone, with a warning."""


# A watch broken this many times in a row (while full reads work) means the source only polls.
WATCH_FAILURES_DEGRADED = 2


class RegistratorSource(Source):
    name = "registrator"

    def __init__(self, settings: Settings, *,
                 watch_timeout: float = 10.0,
                 read_timeout: float = 10.0,
                 connect_timeout: float = 2.0,
                 backoff_start: float = 0.2,
                 backoff_max: float = 5.0,
                 initial_timeout: float = 5.0,
                 refresh_interval: float | None = None,
                 resolve: Resolver = resolve_host,
                 before_watch: Callable[[], None] | None = None):
        """`settings.registrator` is `etcd://[user:password@]host:port[,host:port...]/prefix`
        (raises ConfigError, without the password, when it does not parse). The keyword
        arguments tune timeouts (seconds) for tests and benchmarks:

        watch_timeout    read timeout of one long poll (it is then re-issued)
        read_timeout     read timeout of a full read
        connect_timeout  TCP connect timeout per endpoint
        backoff_start/max  retry delays while no endpoint answers
        initial_timeout  how long the first `current()` waits for the first full read
        refresh_interval full read period (default settings.refresh_interval)
        resolve          host name → IP for values that are not IP addresses
        before_watch     called before each long poll (tests use it to hold the watcher)
        """
        try:
            url = parse_etcd_url(settings.registrator)
        except ValueError as error:
            raise ConfigError(f"REGISTRATOR_URL: {error}") from None
        self.endpoints, self.prefix = url.endpoints, url.prefix
        self.watch_timeout = watch_timeout
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.backoff_start = backoff_start
        self.backoff_max = backoff_max
        self.initial_timeout = initial_timeout
        self.refresh_interval = float(refresh_interval if refresh_interval is not None
                                      else settings.refresh_interval)
        self._resolve = resolve
        self._before_watch = before_watch
        # user:password@ in the URL: HTTP basic auth on every request (etcd v2 auth)
        self._clients = [etcd.Client(host=host, port=port, read_timeout=read_timeout,
                                     username=url.username or None, password=url.password or None,
                                     allow_reconnect=False, per_host_pool_size=2)
                         for host, port in self.endpoints]
        self._endpoint = 0  # index of the endpoint in use (sticky until it fails)

        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight: Any = None  # the open long-poll response, shut down by close()
        # State, guarded by _cond. `_version` counts changes callers can see.
        self._entries: dict[str, Entry] = {}
        self._warnings: dict[str, str] = {}
        self._excluded: dict[str, Any] = {}  # key -> Excluded, for the keys in _warnings
        # When the entries last changed (wall clock) and why ("watch", "poll", "resync"), since
        # the last current(): what the collector reports as changed_at and in the change log.
        self._changed_wall = 0.0
        self._causes: set[str] = set()
        self._synced = False
        self._error = ""
        self._version = 0
        self._seen_version = -1
        self._cache: tuple[int, Discovery] | None = None
        self._wait_index = 0
        self._last_full_read = 0.0
        self._watch_failures = 0  # long polls broken in a row (garbage, resets...)
        self._watch_down_since = 0.0  # wall-clock time of the first of them
        self._degraded = ""  # why changes only arrive with the next full read ("" when watching)
        # malformed watch events dropped, and the warning about them (guarded by _cond)
        self._dropped = DroppedEvents("etcd watch", log)
        self.stats = {"full_reads": 0, "events": 0, "index_cleared": 0, "failovers": 0,
                      "failures": 0, "empty_polls": 0, "poll_timeouts": 0, "events_dropped": 0}

    # -- Source interface -------------------------------------------------------------------
    def current(self) -> Discovery:
        self._ensure_started()
        deadline = time.monotonic() + self.initial_timeout
        with self._cond:
            while not self._synced and not self._error and not self._stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.2))
            self._seen_version = self._version
            if self._error:
                raise SourceError(self._error)
            if not self._synced:
                raise SourceError(f"etcd {self.endpoint_text}: prefix {self.prefix or '/'} not read yet")
            self.received_at = self._changed_wall
            self.cause = ", ".join(sorted(self._causes)) or "poll"
            self._causes = set()
        return self._discovery()

    def wait_for_change(self, timeout: float, stop: threading.Event) -> None:
        """Return when the services or the health of the source changed since the last
        `current()`, after `timeout`, or within 0.2 s of `stop` (or `close()`)."""
        self._ensure_started()
        deadline = time.monotonic() + timeout
        with self._cond:
            while not stop.is_set() and not self._stop.is_set():
                if self._dropped.refresh():  # drops that waited to show in the warning
                    self._changed()
                if self._version != self._seen_version:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(min(remaining, 0.2))

    def close(self) -> None:
        self._stop.set()
        response = self._inflight
        if response is not None:
            try:
                response.shutdown()  # unblocks a long poll at once (urllib3 >= 2.3)
            except Exception:  # noqa: BLE001 - best effort, the read timeout bounds it anyway
                pass
        with self._cond:
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
        for client in self._clients:
            try:
                client.http.clear()
            except Exception:  # noqa: BLE001
                pass

    # -- extras -----------------------------------------------------------------------------
    def last_known(self) -> Discovery | None:
        """The last state read from etcd, even while etcd is unreachable (None before the
        first read)."""
        with self._cond:
            if not self._synced:
                return None
        return self._discovery()

    @property
    def error(self) -> str:
        """Why etcd cannot be read right now ("" when healthy)."""
        return self._error

    @property
    def endpoint_text(self) -> str:
        host, port = self.endpoints[self._endpoint]
        return f"{host}:{port}"

    # -- state ------------------------------------------------------------------------------
    def _discovery(self) -> Discovery:
        with self._cond:
            if self._dropped.refresh():
                self._changed()
            version = self._version
            if self._cache is not None and self._cache[0] == version:
                return self._cache[1]
            entries = dict(self._entries)
            warnings = dict(self._warnings)
            excluded = dict(self._excluded)
            degraded, dropped = self._degraded, self._dropped.note
        services, all_warnings, all_excluded = discovery_all(entries, warnings, excluded)
        # The dropped-events count first: the heartbeat's summary shows only the first warnings.
        discovery = Discovery(services=services, warnings=((dropped,) if dropped else ()) + all_warnings,
                              degraded=degraded, excluded=all_excluded)
        with self._cond:
            if self._version == version:
                self._cache = (version, discovery)
        return discovery

    def _changed(self) -> None:
        """Caller holds _cond."""
        self._version += 1
        self._cond.notify_all()

    def _entries_changed(self, cause: str) -> None:
        """The entries changed now, because of `cause` (caller holds _cond)."""
        self._changed_wall = time.time()
        self._causes.add(cause)
        self._changed()

    def _set_error(self, message: str) -> None:
        with self._cond:
            if message != self._error:
                if message:
                    log.warning("source registrator: %s", message)
                elif self._error:
                    log.info("source registrator: etcd %s readable again via %s", self.prefix or "/",
                             self.endpoint_text)
                self._error = message
                self._changed()

    def _replace_all(self, entries: dict[str, Entry], warnings: dict[str, str], index: int,
                     excluded: dict | None = None, cause: str = "poll") -> None:
        excluded = {} if excluded is None else excluded
        with self._cond:
            changed = (not self._synced or entries != self._entries or warnings != self._warnings
                       or excluded != self._excluded)
            self._entries, self._warnings, self._excluded = entries, warnings, excluded
            self._synced = True
            self._wait_index = index + 1
            self._last_full_read = time.monotonic()
            if changed:
                self._entries_changed(cause)

    def apply_event(self, event: dict) -> None:
        """Apply one etcd v2 watch event (`{"action": ..., "node": {...}}`) to the in-memory
        state. Used by the watcher; public so that recorded events can be replayed in tests.
        Raises BadEvent (nothing applied) when its fields have the wrong shape; a value that is
        not a string makes that key a skipped entry, like any malformed value."""
        if not isinstance(event, dict):
            raise BadEvent("not a JSON object")
        action, node = event.get("action"), event.get("node")
        if not isinstance(action, str):
            raise BadEvent("action is not a string")
        if not isinstance(node, dict):
            raise BadEvent(f"{action[:40]!r}: node is not an object")
        key = node.get("key")
        if not isinstance(key, str):
            raise BadEvent(f"{action[:40]!r}: node key is not a string")
        modified = node.get("modifiedIndex")
        if modified is not None and (isinstance(modified, bool) or not isinstance(modified, int) or modified < 0):
            raise BadEvent(f"{action[:40]!r} {key[:200]!r}: modifiedIndex is not an index")
        if action in SET_ACTIONS:
            if node.get("dir"):
                return  # a new (empty) service directory
            if relative_key(self.prefix, key) is None:
                return
            value = node.get("value")
            excluded = None
            try:
                if not isinstance(value, str):
                    raise EntryError(f"registrator key {key[:200]!r}: value is not a string ({type(value).__name__})",
                                     key=key, detail=f"value is not a string ({type(value).__name__})")
                parsed: Entry | str = parse_entry(self.prefix, key, value, self._resolve)
            except EntryError as error:
                parsed = str(error)
                excluded = error.excluded()
                log.debug("source registrator: %s", parsed)
            with self._cond:
                old = self._entries.get(key, self._warnings.get(key))
                if parsed == old and excluded == self._excluded.get(key):
                    return  # e.g. registrator's TTL refresh: same value again
                self._entries.pop(key, None)
                self._warnings.pop(key, None)
                self._excluded.pop(key, None)
                if isinstance(parsed, Entry):
                    self._entries[key] = parsed
                else:
                    self._warnings[key] = parsed
                    self._excluded[key] = excluded
                self._entries_changed("watch")
        elif action in DELETE_ACTIONS:
            with self._cond:
                if key in self._entries or key in self._warnings:
                    doomed = [key]
                else:  # a directory (a service, or the prefix itself) deleted or expired
                    below = key.rstrip("/") + "/"
                    doomed = [k for k in (*self._entries, *self._warnings) if k.startswith(below)]
                if not doomed:
                    return
                for k in doomed:
                    self._entries.pop(k, None)
                    self._warnings.pop(k, None)
                    self._excluded.pop(k, None)
                self._entries_changed("watch")
        else:
            raise _Resync(f"unknown etcd action {action[:40]!r} on {key[:200]!r}")

    # -- etcd I/O ---------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        with self._cond:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="registrator-etcd", daemon=True)
                self._thread.start()

    def _path(self) -> str:
        return "/v2/keys" + quote(self.prefix or "/")

    def _full_read(self, cause: str = "poll") -> None:
        """Read the whole prefix, trying every endpoint from the current one. Raises _Unavailable."""
        errors = []
        for attempt in range(len(self._clients)):
            index = (self._endpoint + attempt) % len(self._clients)
            client = self._clients[index]
            try:
                payload, etcd_index = self._get(client, {"recursive": "true"},
                                                urllib3.Timeout(connect=self.connect_timeout,
                                                                read=self.read_timeout))
            except etcd.EtcdKeyNotFound as error:
                payload, etcd_index = None, int((error.payload or {}).get("index") or 0)
            except (etcd.EtcdException, ValueError, *_NETWORK_ERRORS) as error:
                host, port = self.endpoints[index]
                errors.append(f"{host}:{port}: {_describe(error)}")
                continue
            if index != self._endpoint:
                self.stats["failovers"] += 1
                log.info("source registrator: failed over to etcd %s:%s", *self.endpoints[index])
                self._endpoint = index
            resolver = caching_resolver(self._resolve)
            excluded: dict = {}
            entries, warnings = parse_tree(self.prefix, (payload or {}).get("node"), resolver, excluded)
            self.stats["full_reads"] += 1
            self.counters.event("poll")
            self._replace_all(entries, warnings, etcd_index, excluded, cause)
            del payload, entries
            release_freed_memory()  # the whole tree's JSON was just freed
            return
        self.counters.error()  # one failed read, whatever the number of endpoints tried
        raise _Unavailable("; ".join(errors))

    def _get(self, client: etcd.Client, params: dict, timeout: urllib3.Timeout) -> tuple[dict, int]:
        """GET the prefix; returns (JSON body, X-Etcd-Index). Raises python-etcd's typed errors."""
        response = client.http.request("GET", client.base_uri + self._path(), fields=params, timeout=timeout,
                                       headers=client._get_headers(), preload_content=False, retries=False)
        try:
            client._check_cluster_id(response)
            body = response.data
        finally:
            response.release_conn()
        if response.status not in (200, 201):
            client._handle_server_response(_Preloaded(response.status, body))
        return _decode(body), int(response.headers.get("x-etcd-index") or 0)

    def _watch(self) -> bool:
        """One long poll on the current endpoint; applies what it returns. Returns whether it
        made progress (an event, or a poll that ran to its timeout)."""
        client = self._clients[self._endpoint]
        wait_index = self._wait_index
        timeout = self.watch_timeout
        if self.refresh_interval > 0:
            timeout = max(0.05, min(timeout, self._last_full_read + self.refresh_interval - time.monotonic()))
        params = {"wait": "true", "recursive": "true", "waitIndex": str(wait_index)}
        response = client.http.request(
            "GET", client.base_uri + self._path(), fields=params, headers=client._get_headers(),
            timeout=urllib3.Timeout(connect=self.connect_timeout, read=timeout),
            preload_content=False, retries=False)
        self._inflight = response
        try:
            if self._stop.is_set():
                return False
            client._check_cluster_id(response)
            start_index = int(response.headers.get("x-etcd-index") or 0)
            try:
                body = response.data
            except urllib3.exceptions.ReadTimeoutError:
                # Nothing under the prefix changed from wait_index up to the poll's start index.
                self.stats["poll_timeouts"] += 1
                if start_index >= wait_index:
                    self._wait_index = start_index + 1
                response.close()
                self._watch_ok()
                return True
        finally:
            self._inflight = None
            response.release_conn()
        if response.status not in (200, 201):
            try:
                client._handle_server_response(_Preloaded(response.status, body))
            except etcd.EtcdEventIndexCleared as error:
                self.stats["index_cleared"] += 1
                raise _Resync(f"event index {wait_index} cleared ({error})") from None
            except etcd.EtcdKeyNotFound:
                raise _Resync("prefix vanished") from None
            except etcd.EtcdException as error:
                raise _Resync(_describe(error)) from None
        if not body.strip():
            self.stats["empty_polls"] += 1  # etcd closed the long poll without an event: retry
            return False
        self.stats["events"] += 1
        self.counters.event("watch")
        try:
            event = _decode(body)
            self.apply_event(event)
        except Exception as error:  # noqa: BLE001 - garbage, or a bug applying it: drop it alone
            # A malformed event is not a broken watch (the long poll worked): it neither counts
            # toward `degraded` nor resets that count. Where to go on from is unknown (or the
            # copy half-changed): read everything again.
            self._drop_event(error)
            raise _Resync("after a dropped watch event") from None
        self._watch_ok()
        modified = event["node"].get("modifiedIndex") or 0
        self._wait_index = max(self._wait_index, modified + 1)
        return True

    def _drop_event(self, error: Exception) -> None:
        reason = redact(_describe(error))
        self.counters.error()
        with self._cond:
            self.stats["events_dropped"] += 1
            # Each drop is logged (rate-limited) and counted; the published warning changes at
            # most every few seconds: a flood of bad events is not a flood of full snapshots.
            if self._dropped.drop(reason, f"source registrator: watch event dropped: {reason}"):
                self._changed()

    def _watch_ok(self) -> None:
        """A long poll made progress: the watch works (again)."""
        self._watch_failures = 0
        if self._degraded:
            with self._cond:
                self._degraded = ""
                self._changed()
            log.info("source registrator: watching etcd %s again", self.endpoint_text)

    def _watch_broken(self, reason: str) -> None:
        """A long poll broke. Twice in a row and the source only polls: say so."""
        if self._watch_failures == 0:
            self._watch_down_since = time.time()
        self._watch_failures += 1
        self.counters.error()
        if self._watch_failures < WATCH_FAILURES_DEGRADED:
            return
        note = down_note("etcd watch", self._watch_down_since, reason,
                         f"reading everything every {self.backoff_max:g}s at most")
        with self._cond:
            if note != self._degraded:
                self._degraded = note
                self._changed()

    def _run(self) -> None:
        need_full_read = True
        resync = False  # the next full read follows a failure (the change log says "resync")
        delay = Backoff(self.backoff_start, self.backoff_max)  # while etcd is down
        # Long polls that end at once without progress (empty bodies, broken watches while
        # full reads work) are retried at once the first time, then with a growing pause, so
        # a misbehaving server never makes this thread spin.
        idle_polls, idle_delay = 0, Backoff(self.backoff_start, self.backoff_max)
        while not self._stop.is_set():
            if idle_polls > 1:
                self._stop.wait(idle_delay.next())
            try:
                if need_full_read or (self.refresh_interval > 0 and
                                      time.monotonic() - self._last_full_read >= self.refresh_interval):
                    self._full_read("resync" if resync else "poll")
                    need_full_read = resync = False
                    delay.reset()
                    self._set_error("")
                if self._before_watch is not None:
                    self._before_watch()
                if self._stop.is_set():
                    break
                if self._watch():
                    idle_polls = 0
                    idle_delay.reset()
                else:
                    idle_polls += 1
            except _Resync as reason:
                log.info("source registrator: full read of %s: %s", self.prefix or "/", reason)
                need_full_read = True
                resync = True  # what changed meanwhile shows as a resync
                idle_polls += 1  # a server answering garbage over and over is paced too
            except _Unavailable as error:
                self.stats["failures"] += 1
                # etcd itself is down: that is the error now; the watch's count starts afresh after
                self._watch_failures = 0
                with self._cond:
                    self._degraded = ""
                self._set_error(f"cannot read etcd prefix {self.prefix or '/'}: {error}")
                need_full_read = True
                resync = True  # what changed meanwhile shows as a resync
                idle_polls = 0  # paced by `delay` instead
                idle_delay.reset()
                self._stop.wait(delay.next())
            except (etcd.EtcdException, ValueError, *_NETWORK_ERRORS) as error:
                # The long poll broke (etcd stopped, connection reset, garbage): read everything
                # again, failing over if needed; only that read decides whether we are down.
                if not self._stop.is_set():
                    log.info("source registrator: watch on etcd %s broke: %s", self.endpoint_text,
                             _describe(error))
                    self._watch_broken(f"etcd {self.endpoint_text}: {_describe(error)}")
                need_full_read = True
                resync = True  # what changed meanwhile shows as a resync
                idle_polls += 1
            except Exception as error:  # noqa: BLE001 - a bug must not stop discovery for good
                log.exception("source registrator: unexpected error")
                self._watch_broken(f"internal error: {_describe(error)}")
                need_full_read = True
                resync = True  # what changed meanwhile shows as a resync
                self._stop.wait(delay.next())


class _Preloaded:
    """The bits of an HTTP response python-etcd's error mapping reads."""

    def __init__(self, status: int, data: bytes):
        self.status = status
        self.data = data


def _decode(body: bytes) -> dict:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeError, ValueError) as error:
        raise ValueError(f"etcd answered with invalid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError("etcd answered with a JSON value that is not an object")
    return data


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) < 300 else text[:297] + "..."
