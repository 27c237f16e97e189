"""The planner stage: subscribes to source snapshots, publishes the plan (topic `plan`).

Bursts are coalesced: a change after a calm period is planned at once; further changes within
MAX_DELAY wait for a short quiet period (bounded by MAX_DELAY) and are planned together. A
plan is published only when it differs from the last one.

No partial plans: after a start the first plan waits for the collector's whole snapshot (the
Clone pattern's END), so live updates of one source never make a plan without the others. A
snapshot that does not decode is logged, counted (`dropped` in the heartbeat) and dropped;
the source's previous snapshot stays.
"""
from __future__ import annotations

import logging
import threading
import time

import zmq

from services.common.bus import HEARTBEAT_INTERVAL, Message, Publisher, Subscriber
from services.common.config import Settings
from services.common.model import SCHEMA_VERSION, SOURCES, ModelError, ServiceDecoder, SourceSnapshot
from services.planner.policy import PolicyMemo, absorb, make_plan

log = logging.getLogger("proxymatic.planner")

QUIET_PERIOD = 0.002
MAX_DELAY = 0.05


def decode_snapshot(message: Message, decoders: dict[str, ServiceDecoder]) -> SourceSnapshot:
    """The snapshot in a `source.<name>` message; ModelError for anything else. One decoder per
    known source (never per name a message makes up), so memory stays bounded."""
    name = message.topic[len("source."):]
    if name not in SOURCES:
        raise ModelError(f"unknown source {name!r}")
    schema = message.payload.get("schema")
    if schema != SCHEMA_VERSION:
        raise ModelError(f"unknown schema version {schema!r:.20} (this is {SCHEMA_VERSION})")
    snapshot = SourceSnapshot.from_dict(message.payload, decoders.setdefault(name, ServiceDecoder()))
    if snapshot.source != name:
        raise ModelError(f"snapshot of source {snapshot.source!r} on topic {message.topic!r}")
    return snapshot


def run(settings: Settings, stop: threading.Event, quiet_period: float = QUIET_PERIOD,
        max_delay: float = MAX_DELAY, heartbeat_interval: float = HEARTBEAT_INTERVAL) -> None:
    ctx = zmq.Context.instance()
    publisher = Publisher(ctx, f"planner@{settings.node}", settings.bus("planner"), heartbeat_interval)
    subscriber = Subscriber(ctx, [settings.bus("collector")], ["source."])
    snapshots: dict[str, SourceSnapshot] = {}
    decoders: dict[str, ServiceDecoder] = {}
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
                                 "dropped": subscriber.dropped, "plans_published": plans_published})
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
                    snapshot = decode_snapshot(message, decoders)
                except Exception as error:  # any payload at all: never the end of the loop
                    subscriber.drop(message, f"{type(error).__name__}: {error}")
                    continue
                snapshots[snapshot.source] = absorb(snapshots.get(snapshot.source), snapshot)
                last_change = time.monotonic()
                first_pending = first_pending or last_change
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
            publisher.publish("plan", plan.to_dict())
            plans_published += 1
            log.info("planner: plan %s, %d services, %d excluded, sources ready %s", plan.hash, len(plan.services),
                     len(plan.excluded), list(plan.sources_ready))
    finally:
        subscriber.close()
        publisher.close()
