"""The planner stage: follows the sources' keyed states (`source.<name>:<key>` and the summaries
`source.<name>`), publishes the plan as a keyed state (`plan:<key>` for what changed, then the
summary `plan`; docs/bus.md, Keyed states).

Bursts are coalesced: a change after a calm period is planned at once; further changes within
MAX_DELAY wait for a short quiet period (bounded by MAX_DELAY) and are planned together. A
plan is published only when it differs from the last one.

No partial plans: after a start the first plan waits for the collector's whole snapshot (the
Clone pattern's END), so live updates of one source never make a plan without the others. A
source's snapshot counts only once a summary matches the keys mirrored for it; when one does not
(a key message lost, a collector restarted with fewer keys), the planner resyncs that source
from the collector's snapshot (at most once per RESYNC_INTERVAL; `resyncs` in the heartbeat),
keeping its previous snapshot meanwhile. A message that does not decode is logged, counted
(`dropped` in the heartbeat) and dropped; the source's previous snapshot stays.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import zmq

from services.common.bus import HEARTBEAT_INTERVAL, SNAPSHOT_TIMEOUT, Message, Publisher, Subscriber
from services.common.config import Settings
from services.common.keyed import KeyedMirror, split_topic
from services.common.model import (SOURCE_STATES, SOURCES, ModelError, SourceSnapshot, _choice, _str_list,
                                   _timestamp, bounded_excluded, excluded_from_list)
from services.common.wire import SOURCE_PREFIX, PlanSender, SnapshotFollower, source_prefix
from services.planner.policy import PlanBuilder, absorb

log = logging.getLogger("proxymatic.planner")

QUIET_PERIOD = 0.002
MAX_DELAY = 0.05
# A source whose mirror disagrees again while its resync is under way (live summaries overtaking
# the snapshot answer) waits this long before asking again: one mismatch never becomes a storm
# of whole-source snapshots.
RESYNC_INTERVAL = SNAPSHOT_TIMEOUT


@dataclass(frozen=True)
class SourceUpdate:
    """A source's snapshot as its follower rebuilt it, with what the PlanBuilder needs to plan
    only what changed: the services by key, the keys changed since the follower's previous
    snapshot (None: any may have), and the source's hash (the mirror's, equal to its summary's)."""

    snapshot: SourceSnapshot
    by_key: dict
    changed: set | None
    hash: str


@dataclass
class PlannerFollower(SnapshotFollower):
    """A SnapshotFollower that hands out a SourceUpdate: the services unsorted (a plan is keyed,
    and sorting 10,000 services per change is most of what the rebuild costs) and the keys
    changed since last time (KeyedMirror.take_changed)."""

    # The mirror the previous update came from; `full`: the next update must say "any key may
    # have changed" (the first one, another sender's mirror, an update the stage did not use).
    last_mirror: KeyedMirror | None = None
    full: bool = True
    # The services and the excluded entries of the last update, by key, kept up to date from the
    # mirror's changed keys (not rebuilt over every key per change).
    by_key: dict = field(default_factory=dict)
    excluded_by_key: dict = field(default_factory=dict)
    keyless: tuple = ()
    excluded: tuple = ()

    def build(self, mirror: KeyedMirror, summary: dict) -> SourceUpdate:
        source = _choice(summary.get("source"), SOURCES, "snapshot.source")
        state = _choice(summary.get("state"), SOURCE_STATES, "snapshot.state")
        warnings = _str_list(summary.get("warnings", []), "snapshot.warnings")
        changed_at = _timestamp(summary.get("changed_at", 0.0), "snapshot.changed_at")
        keyless = excluded_from_list(summary.get("excluded", []), "summary.excluded")
        changed: set | None = mirror.take_changed()
        values = mirror.values
        excluded_moved = keyless != self.keyless
        if self.full or mirror is not self.last_mirror:
            self.by_key = {key: entry.service for key, entry in values.items() if entry.service is not None}
            self.excluded_by_key = {key: entry.excluded for key, entry in values.items() if entry.excluded}
            changed, excluded_moved = None, True
        else:  # the same dict, changed in place: the PlanBuilder takes `changed` as it is
            for key in changed:
                entry = values.get(key)
                service = entry.service if entry is not None else None
                if service is None:
                    self.by_key.pop(key, None)
                else:
                    self.by_key[key] = service
                items = entry.excluded if entry is not None else ()
                if items != self.excluded_by_key.get(key, ()):
                    excluded_moved = True
                    if items:
                        self.excluded_by_key[key] = items
                    else:
                        del self.excluded_by_key[key]
        if excluded_moved:
            everything = [item for items in self.excluded_by_key.values() for item in items] + list(keyless)
            self.excluded = bounded_excluded(everything) if everything else ()
        self.keyless, self.last_mirror, self.full = keyless, mirror, False
        snapshot = SourceSnapshot(source=source, state=state, services=tuple(self.by_key.values()),
                                  error=str(summary.get("error", "")), warnings=warnings, excluded=self.excluded,
                                  changed_at=changed_at)
        return SourceUpdate(snapshot, self.by_key, changed, mirror.hash)


class SourceFollowers:
    """One `PlannerFollower` per known source (never per name a message makes up, so memory
    stays bounded): each mirrors its source's keys and hands out the source's snapshot when a
    summary arrives that its mirror agrees with."""

    def __init__(self) -> None:
        self.followers: dict[str, PlannerFollower] = {name: PlannerFollower(source_prefix(name)) for name in SOURCES}
        self.resynced_at: dict[str, float] = {}
        self.resyncs = 0

    def absorb(self, message: Message) -> tuple[PlannerFollower, SourceUpdate | None]:
        """The follower of the message's source, and its update when the message is a summary
        its mirror matches. ModelError/ValueError for a message that does not decode (or names
        an unknown source, or a summary of another source than its topic's)."""
        prefix, _key = split_topic(message.topic)
        name = prefix[len(SOURCE_PREFIX):] if prefix.startswith(SOURCE_PREFIX) else prefix
        follower = self.followers.get(name)
        if follower is None:
            raise ModelError(f"unknown source {name!r:.40}")
        update = follower.absorb(message)
        if update is not None:
            if update.snapshot.source != name:
                follower.full = True  # its changed keys were taken: the next update compares all
                raise ModelError(f"snapshot of source {update.snapshot.source!r} on topic {message.topic!r:.80}")
            follower.needs_resync = False  # its mirror agrees again
        return follower, update

    def resync(self, subscriber: Subscriber, now: float) -> None:
        """Resync every source whose mirror disagreed with its summary (Subscriber.resync, then
        forget the mirror), each at most once per RESYNC_INTERVAL."""
        for follower in self.followers.values():
            if follower.needs_resync and now - self.resynced_at.get(follower.prefix, -RESYNC_INTERVAL) >= RESYNC_INTERVAL:
                log.info("planner: %s disagrees with its summary; resyncing it", follower.prefix)
                subscriber.resync(follower.prefix)
                follower.reset()
                self.resynced_at[follower.prefix] = now
                self.resyncs += 1


def run(settings: Settings, stop: threading.Event, quiet_period: float = QUIET_PERIOD,
        max_delay: float = MAX_DELAY, heartbeat_interval: float = HEARTBEAT_INTERVAL) -> None:
    ctx = zmq.Context.instance()
    publisher = Publisher(ctx, f"planner@{settings.node}", settings.bus("planner"), heartbeat_interval)
    subscriber = Subscriber(ctx, [settings.bus("collector")], [SOURCE_PREFIX])
    plans = PlanSender(publisher)
    snapshots: dict[str, SourceSnapshot] = {}
    followers = SourceFollowers()
    # The plan, kept up to date one changed key at a time (make_plan's result, without
    # re-planning every service per change).
    builder = PlanBuilder(settings)
    first_pending: float | None = None
    last_change = 0.0
    last_planned = 0.0
    last_published: tuple | None = None
    log.info("planner: sources from %s, plans on %s; first plan once the collector's snapshot is complete",
             settings.bus("collector").pub, settings.bus("planner").pub)
    synced = False
    plans_published = 0
    try:
        while not stop.is_set():
            publisher.heartbeat({"stage": "planner", "sources": sorted(snapshots), "synced": synced,
                                 "dropped": subscriber.dropped, "plans_published": plans_published,
                                 "resyncs": followers.resyncs})
            timeout = publisher.seconds_to_heartbeat()
            if first_pending is not None and synced:
                now = time.monotonic()
                timeout = min(timeout, max(0.0, min(last_change + quiet_period, first_pending + max_delay) - now))
            ready = dict(subscriber.poller(publisher.snapshot).poll(int(min(timeout, 0.2) * 1000)))
            if publisher.snapshot in ready:
                publisher.serve_snapshots()
            for message in subscriber.drain(ready):
                if message.is_heartbeat:
                    continue
                try:
                    follower, update = followers.absorb(message)
                except Exception as error:  # any payload at all: never the end of the loop
                    subscriber.drop(message, f"{type(error).__name__}: {error}")
                    continue
                if update is None:
                    continue
                name = update.snapshot.source
                kept = absorb(snapshots.get(name), update.snapshot)
                snapshots[name] = kept
                if kept is update.snapshot:
                    builder.update(kept, update.by_key, update.changed, update.hash)
                else:  # the source's last word kept, degraded: its services as they were
                    builder.update(kept, builder.by_source.get(name), (), builder.hashes.get(name))
                    follower.full = True
                last_change = time.monotonic()
                first_pending = first_pending or last_change
            # A mirror that disagreed with its summary: forget it, take the whole source again.
            followers.resync(subscriber, time.monotonic())
            if not synced and subscriber.snapshot_complete():
                synced = True
                log.info("planner: collector snapshot complete (sources %s)", sorted(snapshots))
            if first_pending is None or not synced:
                continue
            now = time.monotonic()
            # Leading edge: a change after a calm period is planned at once; changes that follow
            # within max_delay wait for a quiet period, so a burst costs few plans.
            calm = first_pending - last_planned >= max_delay
            if not calm and now - last_change < quiet_period and now - first_pending < max_delay:
                continue
            first_pending, last_planned = None, now
            try:
                plan = builder.plan()
            except Exception:  # a policy bug must not end the stage: the last plan stays out
                log.exception("planner: could not make a plan from sources %s", sorted(snapshots))
                continue
            # Never for changed_at alone: it is when, not what.
            identity = (builder.hash, plan.sources_ready, plan.notes, plan.excluded)
            if identity == last_published:
                continue
            notes_before = last_published[2] if last_published is not None else ()
            last_published = identity
            for note in plan.notes:
                if note not in notes_before:  # each note once, not again with every plan
                    log.warning("planner: %s", note)
            sent = plans.publish(plan, builder.planned, builder.unpublished)
            builder.unpublished = set()
            plans_published += 1
            log.info("planner: plan %s, %d services, %d excluded, sources ready %s (%d keys changed, %d gone)",
                     builder.hash, len(plan.services), len(plan.excluded), list(plan.sources_ready),
                     len(sent.changed), len(sent.gone))
    finally:
        subscriber.close()
        publisher.close()
