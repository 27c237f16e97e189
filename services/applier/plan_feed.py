"""The plan as a subscriber follows it: one PlanFollower (services/common/wire.py) per planner
(sender and epoch) heard through one Subscriber, which it resyncs when a summary disagrees with
the keys received.

Used by the applier, the status stage and `proxymatic explain`. The plan arrives as keyed
state (one `plan:<port>/<protocol>` message per changed service, then the `plan` summary;
docs/bus.md): `feed(messages)` absorbs them in order and returns the plan to serve when it
changed. A summary followed by a newer one of the same sender in the same batch is skipped
(its plan is obsolete: building it would cost a pass over every service for nothing). A
message that does not decode is dropped and counted (`Subscriber.drop`). A summary whose hash
the mirror does not match (a key message lost, a planner restarted with fewer services) makes
the feed forget that planner's mirror and ask for a snapshot (`Subscriber.resync`), at most once
per RESYNC_MIN_INTERVAL: a publisher whose own summary disagrees with its keys (a bug, a
hand-written message) costs one snapshot a second, not a storm. No plan comes out of a planner
until a summary matches again: never a partial plan.

Several planners (a node following two centrals, PLANNER_BUS=tcp://c1:7100,tcp://c2:7100;
docs/roles.md): each planner's newest complete plan is its candidate; the plan served is the
newest candidate of the planners alive (heard within HEARTBEAT_LIVENESS heartbeat intervals) by
`changed_at`, ties broken by the greater hash, so every node picks the same. A planner that
restarts (a new epoch) starts a new follower. The feed hands a plan out only when the choice
changed in content (hash, sources_ready, notes, excluded, inputs): the same plan sent by both
centrals is applied once, and a central that dies leaves the other's plan in place with no gap
(the other's current plan, if it differs, once the dead one is no longer alive). When no planner
is alive nothing is handed out: the node keeps serving its last plan.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from services.common.bus import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, Message, Subscriber, heartbeat_interval
from services.common.keyed import split_topic
from services.common.model import Plan
from services.common.wire import PLAN_PREFIX, PlanFollower

log = logging.getLogger("proxymatic.plan")

RESYNC_MIN_INTERVAL = 1.0


@dataclass
class Planner:
    """One planner as the feed follows it: its epoch, its follower (mirror) and its newest
    complete plan."""

    sender: str
    epoch: str
    follower: PlanFollower = field(default_factory=PlanFollower)
    plan: Plan | None = None
    heard: float = float("-inf")  # monotonic, any message of its (heartbeats included)
    interval: float = HEARTBEAT_INTERVAL

    def alive(self, now: float) -> bool:
        return now - self.heard < self.interval * HEARTBEAT_LIVENESS


def newest(plans: list[Plan]) -> Plan | None:
    """The plan to serve among complete candidates: newest change first, then the greater hash."""
    return max(plans, key=lambda plan: (plan.changed_at, plan.hash), default=None)


def same_content(a: Plan | None, b: Plan | None) -> bool:
    """Whether handing out `b` after `a` would tell its users nothing new (`changed_at` aside:
    two centrals learn of one change at slightly different times)."""
    if a is None or b is None:
        return a is b
    return a is b or (a.hash == b.hash and a.sources_ready == b.sources_ready and a.notes == b.notes
                      and a.inputs == b.inputs and a.excluded == b.excluded)


@dataclass
class PlanFeed:
    subscriber: Subscriber
    who: str  # for the log: "applier", "status", "explain"
    resync_min_interval: float = RESYNC_MIN_INTERVAL
    # What to do with a message that does not decode (message, reason): Subscriber.drop (logged,
    # counted) unless given (`proxymatic explain` lists them for its user).
    on_drop: Callable[[Message, str], None] | None = None
    resyncs: int = 0  # snapshots asked for because a summary disagreed
    planners: dict[str, Planner] = field(default_factory=dict)  # sender -> its newest epoch's follower
    served: Plan | None = None  # the plan last handed out
    _last_resync: float = field(default=float("-inf"), init=False)
    _streak: int = field(default=0, init=False)  # resyncs since the last plan that matched

    def owns(self, message: Message) -> bool:
        return not message.is_heartbeat and split_topic(message.topic)[0] == PLAN_PREFIX

    def _planner(self, message: Message) -> Planner:
        planner = self.planners.get(message.sender)
        if planner is None or planner.epoch != message.epoch:
            if planner is not None:
                log.info("%s: %s restarted (epoch %s); following its new plans", self.who, message.sender,
                         message.epoch)
            planner = self.planners[message.sender] = Planner(message.sender, message.epoch)
        return planner

    def feed(self, messages: list[Message], now: float | None = None) -> Plan | None:
        """Absorb the plan's messages among `messages` (heartbeats tell which planners are
        alive; others are ignored), then resync if a summary disagreed (or one did earlier and
        the last resync was too recent). Returns the plan to serve when it changed, else None."""
        now = time.monotonic() if now is None else now
        mine = []
        for message in messages:
            if message.is_heartbeat:
                planner = self.planners.get(message.sender)
                if planner is not None:
                    planner.heard = now
                    planner.interval = heartbeat_interval(message.payload)
            elif self.owns(message):
                mine.append(message)
        last_summary = {m.sender: i for i, m in enumerate(mine) if split_topic(m.topic)[1] is None}
        for index, message in enumerate(mine):
            planner = self._planner(message)
            planner.heard = now
            if split_topic(message.topic)[1] is None and last_summary[message.sender] != index:
                continue
            try:
                built = planner.follower.absorb(message)
            except Exception as error:  # any payload at all: never the end of the caller's loop
                (self.on_drop or self.subscriber.drop)(message, f"{type(error).__name__}: {error}")
                continue
            if built is not None:  # the mirror matches: whatever disagreed before is settled
                planner.plan, planner.follower.needs_resync = built, False
                if not any(p.follower.needs_resync for p in self.planners.values()):
                    self._streak = 0
        self.resync_if_needed()
        return self.choose(now)

    def choose(self, now: float | None = None) -> Plan | None:
        """The newest complete plan of the planners alive, if it is news (see the docstring)."""
        now = time.monotonic() if now is None else now
        chosen = newest([p.plan for p in self.planners.values() if p.plan is not None and p.alive(now)])
        if chosen is None or same_content(self.served, chosen):
            return None
        self.served = chosen
        return chosen

    def resync_if_needed(self, now: float | None = None) -> bool:
        """Forget the mirror of every planner whose summary disagreed and ask for a snapshot
        (call it now and then even without messages: a resync deferred by the interval happens
        then)."""
        behind = [p for p in self.planners.values() if p.follower.needs_resync]
        if not behind:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last_resync < self.resync_min_interval:
            return False
        self._last_resync = now
        self.resyncs += 1
        self._streak += 1
        (log.warning if self._streak == 1 else log.debug)(
            "%s: the plan's summary from %s disagrees with the services received (a message lost?); "
            "asking for a snapshot", self.who, ", ".join(p.sender for p in behind))
        self.subscriber.resync(PLAN_PREFIX)
        for planner in behind:
            planner.follower.reset()
        return True
