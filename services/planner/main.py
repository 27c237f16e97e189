"""The planner stage: follows the sources' keyed states (`source.<name>:<key>` and the summaries
`source.<name>`), publishes the plan as a keyed state (`plan:<key>` for what changed, then the
summary `plan`; docs/bus.md, Keyed states). docs/planner.md describes it.

What the planner decides is services/planner/steps.py's `step(state, event, now)`: coalescing
of bursts, resyncs (at most one per source per RESYNC_INTERVAL), what to publish and when. This
loop does the ZeroMQ I/O only: it feeds the step what the subscriber delivers and carries out
the actions.

No partial plans: after a start the first plan waits for the collector's whole snapshot (the
Clone pattern's END), so live updates of one source never make a plan without the others. A
message that does not decode is logged, counted (`dropped` in the heartbeat) and dropped; the
source's previous snapshot stays.
"""
from __future__ import annotations

import logging
import threading
import time

import zmq

from services.common.bus import HEARTBEAT_INTERVAL, Publisher, Subscriber
from services.common.curve import BusSecurity
from services.common.config import Settings
from services.common.wire import SOURCE_PREFIX
from services.planner.steps import (MAX_DELAY, QUIET_PERIOD, RESYNC_INTERVAL, Action, Drop, Note, PlannerState,
                                    PublishKeys, PublishSummary, RequestResync, SnapshotDone, Tick, Timing,
                                    event_of, heartbeat, initial_state, step, wake_in)

log = logging.getLogger("proxymatic.planner")

__all__ = ["run", "QUIET_PERIOD", "MAX_DELAY", "RESYNC_INTERVAL"]


def carry_out(actions: tuple[Action, ...], publisher: Publisher, subscriber: Subscriber) -> None:
    """The step's actions, on the bus and in the log."""
    for action in actions:
        if isinstance(action, PublishKeys):
            emit = publisher.keep if action.bulk else publisher.publish
            for topic, payload in action.keys:
                emit(topic, payload)
        elif isinstance(action, PublishSummary):
            publisher.publish(action.topic, action.payload, catch_up=action.catch_up)
        elif isinstance(action, RequestResync):
            subscriber.resync(action.prefix)
        elif isinstance(action, Drop):
            subscriber.drop(action.message, action.reason)
        elif isinstance(action, Note):
            log.log(action.level, "%s", action.text)


def run(settings: Settings, stop: threading.Event, quiet_period: float = QUIET_PERIOD,
        max_delay: float = MAX_DELAY, heartbeat_interval: float = HEARTBEAT_INTERVAL) -> None:
    ctx = zmq.Context.instance()
    publisher = Publisher(ctx, f"planner@{settings.node}", settings.bus("planner"), heartbeat_interval,
                          security=BusSecurity.from_settings(settings))
    subscriber = Subscriber(ctx, [settings.bus("collector")], [SOURCE_PREFIX],
                            security=BusSecurity.from_settings(settings))
    state: PlannerState = initial_state(settings, Timing(quiet_period, max_delay, RESYNC_INTERVAL))
    log.info("planner: sources from %s, plans on %s; first plan once the collector's snapshot is complete",
             settings.bus("collector").pub, settings.bus("planner").pub)

    def advance(event) -> None:
        nonlocal state
        state, actions = step(state, event, time.monotonic())
        if actions:
            carry_out(actions, publisher, subscriber)

    try:
        while not stop.is_set():
            publisher.heartbeat({**heartbeat(state), "dropped": subscriber.dropped})
            timeout = publisher.seconds_to_heartbeat()
            wake = wake_in(state, time.monotonic())
            if wake is not None:
                timeout = min(timeout, wake)
            ready = dict(subscriber.poller(publisher.snapshot).poll(int(min(timeout, 0.2) * 1000)))
            if publisher.snapshot in ready:
                publisher.serve_snapshots()
            for message in subscriber.drain(ready):
                if not message.is_heartbeat:
                    advance(event_of(message))
            if not state.synced and subscriber.snapshot_complete():
                advance(SnapshotDone())
            advance(Tick())
    finally:
        subscriber.close()
        publisher.close()
