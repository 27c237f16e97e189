"""The collector stage: runs every configured discovery source and publishes one snapshot per
source on the bus (topic `source.<name>`).

Each source runs in its own thread, so one that fails or hangs never delays another. A source
that fails keeps its last good services in the published snapshot, marked `degraded`: a
discovery outage never empties the proxies.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass

import zmq

from services.collector.cache import SourceCache
from services.collector.source import Discovery, Source, SourceError
from services.common.bus import Publisher
from services.common.config import Settings
from services.common.model import SourceSnapshot
from services.common.redact import redact

log = logging.getLogger("proxymatic.collector")

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0


def build_sources(settings: Settings) -> list[Source]:
    sources: list[Source] = []
    if settings.marathon:
        from services.collector.marathon import MarathonSource
        sources.append(MarathonSource(settings))
    if settings.registrator:
        from services.collector.registrator import RegistratorSource
        sources.append(RegistratorSource(settings))
    if settings.services_file:
        from services.collector.file_source import FileSource
        sources.append(FileSource(settings.services_file))
    return sources


@dataclass(frozen=True)
class SourceReport:
    """One snapshot from a runner; `live` when its services are the source's current answer
    (`ok`, or `degraded` only because changes may arrive late), so worth saving as last good."""

    snapshot: SourceSnapshot
    live: bool


@dataclass
class SourceRunner:
    """Drives one source: read, report, wait for change; back off while it fails."""

    source: Source
    refresh_interval: float
    updates: "queue.Queue[SourceReport]"
    stop: threading.Event
    saved: Discovery | None = None  # last good state from before a restart

    def run(self) -> None:
        last_good = self.saved
        backoff = BACKOFF_START
        while not self.stop.is_set():
            try:
                discovery = self.source.current()
            except Exception as error:  # SourceError, or a bug in one source: never kill the collector
                if not isinstance(error, SourceError):
                    log.error("source %s: unexpected error\n%s", self.source.name, redact(traceback.format_exc()))
                self._report_failure(str(error) if isinstance(error, SourceError) else f"internal error: {error!r}",
                                     last_good)
                self._back_off(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_START
            self._report(discovery, last_good)
            last_good = discovery
            try:
                self.source.wait_for_change(self.refresh_interval, self.stop)
            except Exception as error:
                if not isinstance(error, SourceError):
                    log.error("source %s: unexpected error while waiting\n%s", self.source.name,
                              redact(traceback.format_exc()))
                self._report_failure(str(error), last_good)
                self._back_off(backoff)

    def _report(self, discovery: Discovery, previous: Discovery | None) -> None:
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
        self.updates.put(SourceReport(SourceSnapshot(self.source.name, state, discovery.services, error=error,
                                                     warnings=warnings), live=True))

    def _back_off(self, seconds: float) -> None:
        """Wait before retrying, but let the source end the wait when it sees a recovery."""
        started = time.monotonic()
        try:
            self.source.wait_for_change(seconds, self.stop)
        except Exception:
            pass
        # A source that returns at once must not turn the retry into a hot loop.
        self.stop.wait(max(0.0, BACKOFF_START - (time.monotonic() - started)))

    def _report_failure(self, error: str, last_good: Discovery | None) -> None:
        error = redact(error)
        log.error("source %s: %s (keeping last good state)", self.source.name, error)
        if last_good is None:
            snapshot = SourceSnapshot(self.source.name, "initializing", (), error=error)
        else:
            snapshot = SourceSnapshot(self.source.name, "degraded", last_good.services, error=error,
                                      warnings=tuple(redact(w) for w in last_good.warnings))
        self.updates.put(SourceReport(snapshot, live=False))


def summarize(payload: dict) -> dict:
    """A source snapshot in brief, for heartbeats and /status/details."""
    return {"state": payload["state"], "error": payload["error"], "services": len(payload["services"]),
            "hash": payload["hash"], "warnings": payload["warnings"][:50]}


def run(settings: Settings, stop: threading.Event, sources: list[Source] | None = None) -> None:
    sources = build_sources(settings) if sources is None else sources
    ctx = zmq.Context.instance()
    publisher = Publisher(ctx, f"collector@{settings.node}", settings.bus("collector"))
    updates: "queue.Queue[SourceReport]" = queue.Queue()
    cache = SourceCache(settings.path("state"))
    threads = []
    for source in sources:
        saved = cache.load(source.name)
        if saved is not None:
            log.info("source %s: starting from its saved last good state (%d services)", source.name,
                     len(saved.services))
            updates.put(SourceReport(saved, live=False))
        runner = SourceRunner(source, settings.refresh_interval, updates, stop,
                              Discovery(saved.services) if saved else None)
        thread = threading.Thread(target=runner.run, name=f"source-{source.name}", daemon=True)
        thread.start()
        threads.append(thread)
    log.info("collector: sources %s, publishing on %s", [s.name for s in sources], settings.bus("collector").pub)
    last_published: dict[str, dict] = {}
    # Each source's state in a few fields, on every heartbeat: the status stage reads it there
    # instead of decoding every full snapshot.
    summaries: dict[str, dict] = {s.name: {"state": "initializing"} for s in sources}
    try:
        while not stop.is_set():
            publisher.serve_snapshots()
            publisher.heartbeat({"stage": "collector", "sources": summaries})
            try:
                report = updates.get(timeout=min(0.05, publisher.seconds_to_heartbeat()) or 0.05)
            except queue.Empty:
                cache.flush()  # only when idle: saving never delays publishing a change
                continue
            snapshot = report.snapshot
            if report.live:
                cache.remember(snapshot)
            payload = snapshot.to_dict()
            # Sources re-report after every wake-up; only real changes go on the bus.
            if last_published.get(snapshot.source) != payload:
                last_published[snapshot.source] = payload
                summaries[snapshot.source] = summarize(payload)
                publisher.publish(f"source.{snapshot.source}", payload)
                log.info("source %s: %s, %d services, hash %s", snapshot.source, snapshot.state,
                         len(snapshot.services), payload["hash"])
    finally:
        cache.flush(force=True)
        for source in sources:
            try:
                source.close()
            except Exception:
                log.exception("source %s: close failed", source.name)
        publisher.close()
