"""The planner stage: subscribes to source snapshots, publishes the plan (topic `plan`).

Bursts are coalesced: a change after a calm period is planned at once; further changes within
MAX_DELAY wait for a short quiet period (bounded by MAX_DELAY) and are planned together. A
plan is published only when it differs from the last one.
"""
from __future__ import annotations

import logging
import threading
import time

import zmq

from services.common.bus import Publisher, Subscriber
from services.common.config import Settings
from services.common.model import ModelError, ServiceDecoder, SourceSnapshot
from services.planner.policy import PolicyMemo, absorb, make_plan

log = logging.getLogger("proxymatic.planner")

QUIET_PERIOD = 0.002
MAX_DELAY = 0.05


def run(settings: Settings, stop: threading.Event, quiet_period: float = QUIET_PERIOD,
        max_delay: float = MAX_DELAY) -> None:
    ctx = zmq.Context.instance()
    publisher = Publisher(ctx, f"planner@{settings.node}", settings.bus("planner"))
    subscriber = Subscriber(ctx, [settings.bus("collector")], ["source."])
    snapshots: dict[str, SourceSnapshot] = {}
    decoders: dict[str, ServiceDecoder] = {}
    memo = PolicyMemo()
    first_pending: float | None = None
    last_change = 0.0
    last_planned = 0.0
    last_published: tuple | None = None
    poller = zmq.Poller()
    for socket in subscriber.sockets():
        poller.register(socket, zmq.POLLIN)
    poller.register(publisher.snapshot, zmq.POLLIN)
    log.info("planner: sources from %s, plans on %s", settings.bus("collector").pub, settings.bus("planner").pub)
    try:
        while not stop.is_set():
            publisher.heartbeat({"stage": "planner", "sources": sorted(snapshots)})
            timeout = publisher.seconds_to_heartbeat()
            if first_pending is not None:
                now = time.monotonic()
                timeout = min(timeout, max(0.0, min(last_change + quiet_period, first_pending + max_delay) - now))
            ready = dict(poller.poll(int(min(timeout, 0.2) * 1000)))
            if publisher.snapshot in ready:
                publisher.serve_snapshots()
            for message in subscriber.drain(ready):
                if message.is_heartbeat:
                    continue
                try:
                    source = str(message.payload.get("source"))
                    snapshot = SourceSnapshot.from_dict(message.payload, decoders.setdefault(source, ServiceDecoder()))
                except ModelError as error:
                    log.error("planner: rejected snapshot on %s from %s: %s", message.topic, message.sender, error)
                    continue
                snapshots[snapshot.source] = absorb(snapshots.get(snapshot.source), snapshot)
                last_change = time.monotonic()
                first_pending = first_pending or last_change
            if first_pending is None:
                continue
            now = time.monotonic()
            # Leading edge: a change after a calm period is planned at once; changes that follow
            # within max_delay wait for a quiet period, so a burst costs few plans.
            calm = first_pending - last_planned >= max_delay
            if not calm and now - last_change < quiet_period and now - first_pending < max_delay:
                continue
            first_pending, last_planned = None, now
            plan = make_plan(snapshots, settings, memo)
            identity = (plan.hash, plan.sources_ready, plan.notes)
            if identity == last_published:
                continue
            last_published = identity
            for note in plan.notes:
                log.warning("planner: %s", note)
            publisher.publish("plan", plan.to_dict())
            log.info("planner: plan %s, %d services, sources ready %s", plan.hash, len(plan.services),
                     list(plan.sources_ready))
    finally:
        subscriber.close()
        publisher.close()
