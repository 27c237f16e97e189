"""The planner as a step function: `step(state, event, now) -> (state, actions)`.

Everything the planner decides is here, with time an argument and no I/O: which source
messages make a source's snapshot (its `SourceFollower`), when a source must be resynced (at
most once per `resync_interval` each), when to plan (bursts coalesced: a change after a calm
period is planned at once; further changes within `max_delay` wait for a `quiet_period`,
bounded by `max_delay`), what to publish (only when the plan's hash, `sources_ready`, `notes`
or `excluded` changed; then only the keys re-planned since the last publish, and the summary).
The stage's loop (services/planner/main.py) does the ZeroMQ I/O: it turns what its subscriber
delivers into events and carries out the actions.

Events: `SourceEntry` (a source's key message), `SourceSummary` (a source's summary),
`SnapshotDone` (the collector's whole snapshot has arrived), `Tick` (time passed: after every
batch of messages and every wake-up). Actions: `Drop` (a message that does not decode),
`RequestResync` (a source whose mirror disagreed with its summary), `PublishKeys` and
`PublishSummary` (a plan), `Note` (a line for the log).

The state is a frozen dataclass; its `tables` (the followers' mirrors, the PlanBuilder, what
was last published) are updated in place by the step, so a change costs the keys it changed
and not a copy of 10,000 services: a state is used once, the step's result replaces it.
"""
from __future__ import annotations

import logging
import math
import traceback
from dataclasses import dataclass, field, replace

from services.common.bus import BULK_KEYS, SNAPSHOT_TIMEOUT, Message
from services.common.config import Settings
from services.common.keyed import split_topic
from services.common.model import SOURCES, SourceSnapshot
from services.common.wire import SOURCE_PREFIX, PlanSender, SourceFollower, source_prefix
from services.planner.policy import PlanBuilder, absorb

QUIET_PERIOD = 0.002
MAX_DELAY = 0.05
# A source whose mirror disagrees again while its resync is under way (live summaries overtaking
# the snapshot answer) waits this long before asking again: one mismatch never becomes a storm
# of whole-source snapshots.
RESYNC_INTERVAL = SNAPSHOT_TIMEOUT


# -- events ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceEntry:
    """A key message of a source (`source.<name>:<port>/<protocol>`)."""

    message: Message


@dataclass(frozen=True)
class SourceSummary:
    """A source's summary (`source.<name>`)."""

    message: Message


@dataclass(frozen=True)
class SnapshotDone:
    """The collector's whole snapshot has arrived (Subscriber.snapshot_complete)."""


@dataclass(frozen=True)
class Tick:
    """Time passed: plan if a coalescing period ended, resync what waited for its interval."""


Event = SourceEntry | SourceSummary | SnapshotDone | Tick


def event_of(message: Message) -> SourceEntry | SourceSummary:
    return SourceEntry(message) if split_topic(message.topic)[1] is not None else SourceSummary(message)


# -- actions --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Drop:
    """A message not used (does not decode, an unknown source...): logged and counted."""

    message: Message
    reason: str


@dataclass(frozen=True)
class RequestResync:
    """Ask the collector for this prefix's snapshot again (Subscriber.resync)."""

    prefix: str


@dataclass(frozen=True)
class PublishKeys:
    """The plan's key messages (topic, payload) that changed, tombstones first. `bulk`: more
    than bus.BULK_KEYS of them: kept for snapshot answers only (Publisher.keep), the summary
    then goes out marked `catch_up` (docs/bus.md, Bulk changes)."""

    keys: tuple[tuple[str, dict], ...]
    bulk: bool = False


@dataclass(frozen=True)
class PublishSummary:
    topic: str
    payload: dict
    catch_up: bool = False


@dataclass(frozen=True)
class Note:
    level: int
    text: str


Action = Drop | RequestResync | PublishKeys | PublishSummary | Note


# -- state ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    quiet_period: float = QUIET_PERIOD
    max_delay: float = MAX_DELAY
    resync_interval: float = RESYNC_INTERVAL


class Tables:
    """The planner's keyed tables, updated in place by `step` (see the module's docstring): one
    follower per known source (never per name a message makes up: memory stays bounded), the
    snapshot kept per source, the incremental PlanBuilder, and what was last published."""

    def __init__(self, settings: Settings) -> None:
        self.followers: dict[str, SourceFollower] = {name: SourceFollower(source_prefix(name)) for name in SOURCES}
        self.snapshots: dict[str, SourceSnapshot] = {}
        self.builder = PlanBuilder(settings)
        self.plans = PlanSender(None)  # prepares the key messages; the loop publishes them


@dataclass(frozen=True)
class PlannerState:
    tables: Tables
    timing: Timing = Timing()
    synced: bool = False  # the collector's whole snapshot has arrived: plans may go out
    pending_since: float | None = None  # the first change not planned yet
    last_change: float = -math.inf
    last_planned: float = -math.inf
    # (hash, sources_ready, notes, excluded) of the plan last published
    published: tuple | None = None
    resynced_at: tuple[tuple[str, float], ...] = ()  # (prefix, when) of each source's last resync
    resyncs: int = 0
    plans_published: int = 0
    sources: tuple[str, ...] = field(default=())  # the sources with a snapshot, sorted


def initial_state(settings: Settings, timing: Timing = Timing()) -> PlannerState:
    return PlannerState(Tables(settings), timing)


def step(state: PlannerState, event: Event, now: float) -> tuple[PlannerState, tuple[Action, ...]]:
    """The planner's next state and what to do, given one event at `now` (monotonic seconds)."""
    if isinstance(event, (SourceEntry, SourceSummary)):
        return _absorb(state, event.message, now)
    if isinstance(event, SnapshotDone):
        if state.synced:
            return state, ()
        note = Note(logging.INFO, f"planner: collector snapshot complete (sources {list(state.sources)})")
        state, actions = _plan(replace(state, synced=True), now)
        return state, (note, *actions)
    if isinstance(event, Tick):
        state, resyncs = _resync(state, now)
        state, actions = _plan(state, now)
        return state, resyncs + actions
    raise TypeError(f"not a planner event: {event!r:.80}")


def wake_in(state: PlannerState, now: float) -> float | None:
    """Seconds until a Tick has something to do (a coalescing period ends, a deferred resync is
    due), or None."""
    times: list[float] = []
    if state.pending_since is not None and state.synced:
        timing = state.timing
        times.append(min(state.last_change + timing.quiet_period, state.pending_since + timing.max_delay))
    if any(f.needs_resync for f in state.tables.followers.values()):
        at = dict(state.resynced_at)
        times.extend(at.get(f.prefix, -math.inf) + state.timing.resync_interval
                     for f in state.tables.followers.values() if f.needs_resync)
    return max(0.0, min(times) - now) if times else None


def heartbeat(state: PlannerState) -> dict:
    return {"stage": "planner", "sources": list(state.sources), "synced": state.synced,
            "plans_published": state.plans_published, "resyncs": state.resyncs}


def _absorb(state: PlannerState, message: Message, now: float) -> tuple[PlannerState, tuple[Action, ...]]:
    tables = state.tables
    prefix, key = split_topic(message.topic)
    name = prefix[len(SOURCE_PREFIX):] if prefix.startswith(SOURCE_PREFIX) else prefix
    follower = tables.followers.get(name)
    if follower is None:
        return state, (Drop(message, f"ModelError: unknown source {name!r:.40}"),)
    try:
        update = follower.absorb(message)
    except Exception as error:  # any payload at all: never the end of the loop
        return state, (Drop(message, f"{type(error).__name__}: {error}"),)
    if update is None:
        if key is None and follower.needs_resync:  # the summary disagreed with the mirror
            return _resync(state, now)
        return state, ()
    if update.snapshot.source != name:
        follower.full = True  # its changed keys were taken: the next update compares all
        return state, (Drop(message, f"ModelError: snapshot of source {update.snapshot.source!r} "
                                     f"on topic {message.topic!r:.80}"),)
    follower.needs_resync = False  # its mirror agrees again
    builder = tables.builder
    kept = absorb(tables.snapshots.get(name), update.snapshot)
    tables.snapshots[name] = kept
    if kept is update.snapshot:
        builder.update(kept, update.by_key, update.changed, update.hash)
    else:  # the source's last word kept, degraded: its services as they were
        builder.update(kept, None, (), builder.hashes.get(name))
        follower.full = True
    return replace(state, last_change=now, pending_since=now if state.pending_since is None else state.pending_since,
                   sources=tuple(sorted(tables.snapshots))), ()


def _resync(state: PlannerState, now: float) -> tuple[PlannerState, tuple[Action, ...]]:
    """Resync every source whose mirror disagreed with its summary (forget the mirror, ask for
    the source's snapshot), each at most once per resync_interval."""
    at = dict(state.resynced_at)
    actions: list[Action] = []
    resyncs = 0
    for follower in state.tables.followers.values():
        if follower.needs_resync and now - at.get(follower.prefix, -math.inf) >= state.timing.resync_interval:
            follower.reset()
            at[follower.prefix] = now
            resyncs += 1
            actions += [Note(logging.INFO, f"planner: {follower.prefix} disagrees with its summary; resyncing it"),
                        RequestResync(follower.prefix)]
    if not resyncs:
        return state, ()
    return replace(state, resynced_at=tuple(sorted(at.items())), resyncs=state.resyncs + resyncs), tuple(actions)


def _plan(state: PlannerState, now: float) -> tuple[PlannerState, tuple[Action, ...]]:
    if state.pending_since is None or not state.synced:
        return state, ()
    timing = state.timing
    # Leading edge: a change after a calm period is planned at once; changes that follow within
    # max_delay wait for a quiet period, so a burst costs few plans.
    calm = state.pending_since - state.last_planned >= timing.max_delay
    if not calm and now - state.last_change < timing.quiet_period and now - state.pending_since < timing.max_delay:
        return state, ()
    state = replace(state, pending_since=None, last_planned=now)
    tables = state.tables
    builder = tables.builder
    try:
        plan = builder.plan()
    except Exception:  # a policy bug must not end the stage: the last plan stays out
        return state, (Note(logging.ERROR, f"planner: could not make a plan from sources {list(state.sources)}\n"
                                           f"{traceback.format_exc()}"),)
    # Never for changed_at alone: it is when, not what.
    identity = (builder.hash, plan.sources_ready, plan.notes, plan.excluded)
    if identity == state.published:
        return state, ()
    notes_before = state.published[2] if state.published is not None else ()
    actions: list[Action] = [Note(logging.WARNING, f"planner: {note}") for note in plan.notes
                             if note not in notes_before]  # each note once, not again with every plan
    keys, (topic, summary), report = tables.plans.prepare(plan, builder.planned, builder.unpublished)
    builder.unpublished = set()
    bulk = len(keys) > BULK_KEYS
    actions += [PublishKeys(tuple(keys), bulk), PublishSummary(topic, summary, bulk),
                Note(logging.INFO, f"planner: plan {builder.hash}, {len(plan.services)} services, "
                                   f"{len(plan.excluded)} excluded, sources ready {list(plan.sources_ready)} "
                                   f"({len(report.changed)} keys changed, {len(report.gone)} gone)")]
    return replace(state, published=identity, plans_published=state.plans_published + 1), tuple(actions)
