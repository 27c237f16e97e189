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

import zmq

from services.common.bus import HEARTBEAT_INTERVAL, SNAPSHOT_TIMEOUT, Message, Publisher, Subscriber
from services.common.config import Settings
from services.common.keyed import split_topic
from services.common.model import SOURCES, ModelError, SourceSnapshot
from services.common.wire import SOURCE_PREFIX, PlanSender, SnapshotFollower, snapshot_follower
from services.planner.policy import PolicyMemo, absorb, make_plan

log = logging.getLogger("proxymatic.planner")

QUIET_PERIOD = 0.002
MAX_DELAY = 0.05
# A source whose mirror disagrees again while its resync is under way (live summaries overtaking
# the snapshot answer) waits this long before asking again: one mismatch never becomes a storm
# of whole-source snapshots.
RESYNC_INTERVAL = SNAPSHOT_TIMEOUT


class SourceFollowers:
    """One `SnapshotFollower` per known source (never per name a message makes up, so memory
    stays bounded): each mirrors its source's keys and hands out the source's SourceSnapshot
    when a summary arrives that its mirror agrees with."""

    def __init__(self) -> None:
        self.followers: dict[str, SnapshotFollower] = {name: snapshot_follower(name) for name in SOURCES}
        self.resynced_at: dict[str, float] = {}
        self.resyncs = 0

    def absorb(self, message: Message) -> tuple[SnapshotFollower, SourceSnapshot | None]:
        """The follower of the message's source, and the snapshot when the message is a summary
        its mirror matches. ModelError/ValueError for a message that does not decode (or names
        an unknown source, or a summary of another source than its topic's)."""
        prefix, _key = split_topic(message.topic)
        name = prefix[len(SOURCE_PREFIX):] if prefix.startswith(SOURCE_PREFIX) else prefix
        follower = self.followers.get(name)
        if follower is None:
            raise ModelError(f"unknown source {name!r:.40}")
        snapshot = follower.absorb(message)
        if snapshot is not None:
            if snapshot.source != name:
                raise ModelError(f"snapshot of source {snapshot.source!r} on topic {message.topic!r:.80}")
            follower.needs_resync = False  # its mirror agrees again
        return follower, snapshot

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
    memo = PolicyMemo()
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
                    follower, snapshot = followers.absorb(message)
                except Exception as error:  # any payload at all: never the end of the loop
                    subscriber.drop(message, f"{type(error).__name__}: {error}")
                    continue
                if snapshot is None:
                    continue
                snapshots[snapshot.source] = absorb(snapshots.get(snapshot.source), snapshot)
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
                plan = make_plan(snapshots, settings, memo)
            except Exception:  # a policy bug must not end the stage: the last plan stays out
                log.exception("planner: could not make a plan from sources %s", sorted(snapshots))
                continue
            # Never for changed_at alone: it is when, not what.
            identity = (plan.hash, plan.sources_ready, plan.notes, plan.excluded)
            if identity == last_published:
                continue
            notes_before = last_published[2] if last_published is not None else ()
            last_published = identity
            for note in plan.notes:
                if note not in notes_before:  # each note once, not again with every plan
                    log.warning("planner: %s", note)
            plans.publish(plan)
            plans_published += 1
            log.info("planner: plan %s, %d services, %d excluded, sources ready %s", plan.hash, len(plan.services),
                     len(plan.excluded), list(plan.sources_ready))
    finally:
        subscriber.close()
        publisher.close()
