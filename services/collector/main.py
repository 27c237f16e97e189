"""The collector stage: runs every configured discovery source and publishes each source's
snapshot on the bus as a keyed state: one message per changed service on `source.<name>:<key>`,
then the source's summary on `source.<name>` (docs/bus.md, Keyed states).

Each source runs in its own thread, so one that fails or hangs never delays another. A source
that fails keeps its last good services in the published snapshot, marked `degraded`: a
discovery outage never empties the proxies. A source that cannot even be built (a URL that
does not parse) is published `degraded` with the reason while the others run; a bug in a
runner thread or in the publish loop is logged and costs one round or one message, never the
collector.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Mapping

import zmq

from services.collector.cache import SourceCache
from services.collector.changes import ChangeLog
from services.collector.exclusions import ExcludedCheck
from services.collector.source import BrokenSource, Discovery, Source, SourceBroken, SourceError
from services.common.backoff import Backoff
from services.common.bus import Publisher
from services.common.curve import BusSecurity
from services.common.config import Settings
from services.common.model import Service, SourceSnapshot
from services.common.wire import SnapshotSender
from services.common.redact import redact

log = logging.getLogger("proxymatic.collector")

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0


def _marathon(settings: Settings) -> Source:
    from services.collector.marathon import MarathonSource
    return MarathonSource(settings)


def _registrator(settings: Settings) -> Source:
    from services.collector.registrator import RegistratorSource
    return RegistratorSource(settings)


def _file(settings: Settings) -> Source:
    from services.collector.file_source import FileSource
    return FileSource(settings.services_file)


# (source name, the setting that enables it, its option for messages, how to build it)
SOURCE_BUILDERS = (
    ("marathon", "marathon", "MARATHON_URL", _marathon),
    ("registrator", "registrator", "REGISTRATOR_URL", _registrator),
    ("file", "services_file", "SERVICES_FILE", _file),
)


def build_sources(settings: Settings) -> list[Source]:
    """One source per configured option. A source that cannot be built (a URL that does not
    parse...) becomes a BrokenSource: published `degraded` with the (redacted) reason, while
    the other sources run normally; it never ends the collector."""
    sources: list[Source] = []
    for name, setting, option, build in SOURCE_BUILDERS:
        if not getattr(settings, setting):
            continue
        try:
            sources.append(build(settings))
            continue
        except (SourceError, ValueError) as error:  # ConfigError is a ValueError
            text = str(error)
            reason = text if text.startswith(option) else f"{option}: {text}"
        except Exception as error:  # a bug in one source's constructor: that source alone fails
            log.error("source %s: cannot start\n%s", name, redact(traceback.format_exc()))
            reason = f"internal error: {error!r}"
        reason = redact(f"cannot start: {reason}")
        log.error("source %s: %s (the other sources run)", name, reason)
        sources.append(BrokenSource(name, reason))
    return sources


@dataclass(frozen=True)
class SourceReport:
    """One snapshot from a runner; `live` when its services are the source's current answer
    (`ok`, or `degraded` only because changes may arrive late), so worth saving as last good."""

    snapshot: SourceSnapshot
    live: bool
    # The keys whose service may differ from the report before (None: unknown, compare every
    # key), and the snapshot's services by key when that is known (for the keyed sender).
    changed: frozenset[str] | None = None
    by_key: Mapping[str, Service] | None = None


@dataclass
class SourceRunner:
    """Drives one source: read, report, wait for change; back off while it fails."""

    source: Source
    refresh_interval: float
    updates: "queue.Queue[SourceReport]"
    stop: threading.Event
    saved: Discovery | None = None  # last good state from before a restart

    def __post_init__(self) -> None:
        self.last_good: Discovery | None = self.saved
        self._backoff = Backoff(BACKOFF_START, BACKOFF_MAX)
        self.counters = self.source.counters  # created here, before any thread of the source runs
        # When the services last changed (SourceSnapshot.changed_at), and what they were then.
        self.changed_at = 0.0
        self._services = self.saved.services if self.saved is not None else None
        self._changes = ChangeLog(self.source.name, log, self.saved.services if self.saved is not None else ())
        # Whether the change log has seen the source's previous Discovery: only then can its
        # `changed` (relative to that one) be trusted.
        self._seen_previous = False
        self._check_excluded = ExcludedCheck(self.source.name)

    def run(self) -> None:
        """Until `stop`. Whatever raises in one round (the source, or reporting what it said:
        a bug) is logged with its traceback and the source reported degraded with the reason;
        then the runner backs off and goes on. It never ends before `stop`."""
        while not self.stop.is_set():
            try:
                self._round()
            except Exception as error:  # noqa: BLE001 - a runner that ends freezes its source
                log.error("source %s: collector error\n%s", self.source.name, redact(traceback.format_exc()))
                self.counters.error()
                self._report_failure(f"internal error in the collector: {error!r}", self.last_good)
                self._back_off(self._backoff.next())

    def _round(self) -> None:
        """Ask the source, report, wait for a change (or back off after a failure)."""
        asked_at = time.time()
        try:
            discovery = self.source.current()
        except Exception as error:  # SourceError, or a bug in one source: never kill the collector
            if not isinstance(error, SourceError):
                log.error("source %s: unexpected error\n%s", self.source.name, redact(traceback.format_exc()))
                self.counters.error()  # sources count their own failed reads
            self._report_failure(str(error) if isinstance(error, SourceError) else f"internal error: {error!r}",
                                 self.last_good, broken=isinstance(error, SourceBroken),
                                 excluded=getattr(error, "excluded", ()) if isinstance(error, SourceError) else ())
            self._back_off(self._backoff.next())
            return
        self._report(discovery, self.last_good, getattr(self.source, "received_at", 0.0) or asked_at,
                     getattr(self.source, "cause", "") or "poll")
        self._backoff.reset()
        self.last_good = discovery
        try:
            self.source.wait_for_change(self.refresh_interval, self.stop)
        except Exception as error:
            if not isinstance(error, SourceError):
                log.error("source %s: unexpected error while waiting\n%s", self.source.name,
                          redact(traceback.format_exc()))
                self.counters.error()
            self._report_failure(str(error), self.last_good)
            self._back_off(self._backoff.current)

    def _report(self, discovery: Discovery, previous: Discovery | None, received_at: float | None = None,
                cause: str = "poll") -> None:
        # Credentials never reach the bus, whatever a source put in its texts.
        warnings = tuple(redact(w) for w in discovery.warnings)
        seen = set(previous.warnings) if previous else set()
        for warning, original in zip(warnings, discovery.warnings):
            if original not in seen:
                log.warning("source %s: %s", self.source.name, warning)
        if discovery.degraded and (previous is None or previous.degraded != discovery.degraded):
            log.warning("source %s: degraded: %s", self.source.name, redact(discovery.degraded))
        elif not discovery.degraded and previous is not None and previous.degraded:
            log.info("source %s: ok again", self.source.name)
        state, error = ("degraded", redact(discovery.degraded)) if discovery.degraded else ("ok", "")
        excluded = self._check_excluded(discovery.excluded)
        services = discovery.services
        # What changed in the services: only the keys the source says may have changed, when it
        # says (and the change log saw its previous answer); else every key, cheaply (the
        # unchanged services are the same objects).
        keys = discovery.changed if self._seen_previous else None
        self._seen_previous = False
        by_key = None
        try:
            found = self._changes.changes(services, keys)
            changed = bool(found)
            self._seen_previous = True
            if keys is not None:
                by_key = self._changes.by_key()
        except Exception:  # noqa: BLE001 - a bug here must not cost the snapshot
            log.error("source %s: cannot tell what changed\n%s", self.source.name, redact(traceback.format_exc()))
            found, changed, keys = [], services is not self._services, None
        if changed or self._services is None:
            # When the collector received what changed the services: the origin of the
            # change-to-applied latency (docs/bus.md, Origin time).
            self.changed_at = received_at or time.time()
        self._services = services
        self.updates.put(SourceReport(SourceSnapshot(self.source.name, state, services, error=error,
                                                     warnings=warnings, excluded=excluded,
                                                     changed_at=self.changed_at), live=True,
                                      changed=keys, by_key=by_key))
        if found:  # after the report: the log never delays publishing
            self._log_changes(found, cause)

    def _log_changes(self, found: list, cause: str) -> None:
        try:
            self._changes.log_changes(found, redact(cause))
        except Exception:  # noqa: BLE001 - a log line is never worth a round
            log.error("source %s: cannot log its changes\n%s", self.source.name, redact(traceback.format_exc()))

    def _back_off(self, seconds: float) -> None:
        """Wait before retrying, but let the source end the wait when it sees a recovery."""
        started = time.monotonic()
        try:
            self.source.wait_for_change(seconds, self.stop)
        except Exception:
            pass
        # A source that returns at once must not turn the retry into a hot loop.
        self.stop.wait(max(0.0, BACKOFF_START - (time.monotonic() - started)))

    def _report_failure(self, error: str, last_good: Discovery | None, broken: bool = False,
                        excluded: tuple = ()) -> None:
        """Report the source failing, keeping its last good services. Before any answer it is
        `initializing` (it may still come), or `degraded` with no services when it is `broken`
        (it cannot work until its configuration changes). Never raises."""
        try:
            error = redact(str(error))
            log.error("source %s: %s (keeping last good state)", self.source.name, error)
            # What the failure itself says is not served (a services file rejected whole)
            excluded = tuple(excluded) if isinstance(excluded, (tuple, list)) else ()
            if last_good is None:
                snapshot = SourceSnapshot(self.source.name, "degraded" if broken else "initializing", (), error=error,
                                          excluded=self._check_excluded(excluded) if excluded else ())
            else:
                snapshot = SourceSnapshot(self.source.name, "degraded", last_good.services, error=error,
                                          warnings=tuple(redact(str(w)) for w in last_good.warnings),
                                          excluded=self._check_excluded(last_good.excluded + excluded
                                                                        if excluded else last_good.excluded),
                                          changed_at=self.changed_at)
        except Exception:  # noqa: BLE001 - e.g. a last good state that does not make a snapshot
            log.error("source %s: cannot report its failure\n%s", self.source.name, redact(traceback.format_exc()))
            # `initializing` with no services: the planner keeps what the source said last, as
            # `degraded` with this error (policy.absorb), so the proxies are not emptied.
            snapshot = SourceSnapshot(self.source.name, "initializing", (),
                                      error="internal error in the collector (see its log)")
        self.updates.put(SourceReport(snapshot, live=False))


def summarize(snapshot: SourceSnapshot, hash_: str) -> dict:
    """A source snapshot in brief, for heartbeats and /status/details (`hash_`: its hash, as the
    sender keeps it up to date, never recomputed over every service)."""
    return {"state": snapshot.state, "error": snapshot.error, "services": len(snapshot.services),
            "hash": hash_, "warnings": list(snapshot.warnings[:50])}


def with_counters(summaries: dict[str, dict], sources: list[Source]) -> dict[str, dict]:
    """Each source's summary plus its counters (`events` by type, `errors`), for the heartbeat."""
    out = {}
    for source in sources:
        try:
            counters = source.counters.snapshot()
        except Exception:  # noqa: BLE001 - a heartbeat is never missed for its counters
            counters = {"events": {}, "errors": 0}
        out[source.name] = {**summaries.get(source.name, {"state": "initializing"}), **counters}
    return out


def _start(runner: SourceRunner) -> threading.Thread:
    thread = threading.Thread(target=runner.run, name=f"source-{runner.source.name}", daemon=True)
    thread.start()
    return thread


def _check_runners(runners: list[tuple[SourceRunner, threading.Thread]]) -> None:
    """A runner thread that ended before `stop` (it should not: SourceRunner.run catches every
    Exception) is restarted from its last good state, so its source never freezes silently."""
    for index, (runner, thread) in enumerate(runners):
        if not thread.is_alive() and not runner.stop.is_set():
            log.error("source %s: its thread ended unexpectedly; restarting it", runner.source.name)
            runner._report_failure("its collector thread ended unexpectedly; restarted", runner.last_good)
            runners[index] = (runner, _start(runner))


def _publish(report: SourceReport, publisher: Publisher, cache: SourceCache, senders: dict[str, SnapshotSender],
             summaries: dict[str, dict], stale: set[str] | None = None) -> None:
    """Publish a source's snapshot as a keyed state: only the services (and excluded entries)
    that changed, then its summary. Sources re-report after every wake-up; only real changes go
    on the bus (a new `changed_at` alone is one: the summary carries it).

    A report that says which keys may have changed has only those compared; `stale` names the
    sources whose last publish failed half-way, which compare every key once more instead."""
    snapshot = report.snapshot
    stale = set() if stale is None else stale
    try:
        if report.live:
            cache.remember(snapshot)
        sender = senders.get(snapshot.source)
        if sender is None:
            sender = senders[snapshot.source] = SnapshotSender(publisher, snapshot.source)
        changed = report.changed if snapshot.source not in stale else None
        sent = sender.publish(snapshot, if_changed=True, changed=changed,
                              by_key=report.by_key if changed is not None else None)
    except BaseException:
        stale.add(snapshot.source)  # what the bus was told is not what the next report follows
        raise
    stale.discard(snapshot.source)
    if sent is None:
        return
    summaries[snapshot.source] = summarize(snapshot, sent.hash)
    log.info("source %s: %s, %d services, %d excluded, hash %s (%d keys changed, %d gone)", snapshot.source,
             snapshot.state, len(snapshot.services), len(snapshot.excluded), sent.hash, len(sent.changed),
             len(sent.gone))


def run(settings: Settings, stop: threading.Event, sources: list[Source] | None = None) -> None:
    sources = build_sources(settings) if sources is None else sources
    ctx = zmq.Context.instance()
    publisher = Publisher(ctx, f"collector@{settings.node}", settings.bus("collector"),
                          security=BusSecurity.from_settings(settings))
    updates: "queue.Queue[SourceReport]" = queue.Queue()
    cache = SourceCache(settings.path("state"))
    runners: list[tuple[SourceRunner, threading.Thread]] = []
    for source in sources:
        saved = cache.load(source.name)
        if saved is not None:
            log.info("source %s: starting from its saved last good state (%d services)", source.name,
                     len(saved.services))
            updates.put(SourceReport(saved, live=False))
        runner = SourceRunner(source, settings.refresh_interval, updates, stop,
                              Discovery(saved.services) if saved else None)
        runners.append((runner, _start(runner)))
    log.info("collector: sources %s, publishing on %s", [s.name for s in sources], settings.bus("collector").pub)
    # One keyed sender per source, for the process's life (it knows what the bus was told).
    senders: dict[str, SnapshotSender] = {}
    stale: set[str] = set()  # sources whose next publish compares every key (see _publish)
    # Each source's state in a few fields, on every heartbeat: the status stage reads it there
    # instead of following every source's keys.
    summaries: dict[str, dict] = {s.name: {"state": "initializing"} for s in sources}
    try:
        while not stop.is_set():
            # Guarded round by round: a bug with one message is logged and costs that message,
            # never the collector (and with it every source).
            try:
                _check_runners(runners)
                publisher.serve_snapshots()
                if publisher.seconds_to_heartbeat() <= 0:
                    publisher.heartbeat({"stage": "collector", "sources": with_counters(summaries, sources)})
                try:
                    report = updates.get(timeout=min(0.05, publisher.seconds_to_heartbeat()) or 0.05)
                except queue.Empty:
                    cache.flush()  # only when idle: saving never delays publishing a change
                    continue
                _publish(report, publisher, cache, senders, summaries, stale)
            except Exception:  # noqa: BLE001
                log.error("collector: error in the publish loop\n%s", redact(traceback.format_exc()))
                stop.wait(0.05)  # a fault that repeats is not a hot loop
    finally:
        cache.flush(force=True)
        for source in sources:
            try:
                source.close()
            except Exception:
                log.exception("source %s: close failed", source.name)
        publisher.close()
