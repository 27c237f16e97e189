"""The plan as a subscriber follows it: a PlanFollower (services/common/wire.py) fed from one
Subscriber, which it resyncs when a summary disagrees with the keys received.

Used by the applier, the status stage and `proxymatic explain`. The plan arrives as keyed
state (one `plan:<port>/<protocol>` message per changed service, then the `plan` summary;
docs/bus.md): `feed(messages)` absorbs them in order and returns the newest plan a summary
completed. A summary followed by a newer one of the same sender in the same batch is skipped
(its plan is obsolete: building it would cost a pass over every service for nothing). A
message that does not decode is dropped and counted (`Subscriber.drop`). A summary whose hash
the mirror does not match (a key message lost, a planner restarted with fewer services) makes
the feed forget its mirror and ask for a snapshot (`Subscriber.resync`), at most once per
RESYNC_MIN_INTERVAL: a publisher whose own summary disagrees with its keys (a bug, a
hand-written message) costs one snapshot a second, not a storm. No plan comes out until a
summary matches again: never a partial plan.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from services.common.bus import Message, Subscriber
from services.common.keyed import split_topic
from services.common.model import Plan
from services.common.wire import PLAN_PREFIX, PlanFollower

log = logging.getLogger("proxymatic.plan")

RESYNC_MIN_INTERVAL = 1.0


@dataclass
class PlanFeed:
    subscriber: Subscriber
    who: str  # for the log: "applier", "status", "explain"
    follower: PlanFollower = field(default_factory=PlanFollower)
    resync_min_interval: float = RESYNC_MIN_INTERVAL
    # What to do with a message that does not decode (message, reason): Subscriber.drop (logged,
    # counted) unless given (`proxymatic explain` lists them for its user).
    on_drop: Callable[[Message, str], None] | None = None
    resyncs: int = 0  # snapshots asked for because a summary disagreed
    _last_resync: float = field(default=float("-inf"), init=False)
    _streak: int = field(default=0, init=False)  # resyncs since the last plan that matched

    def owns(self, message: Message) -> bool:
        return not message.is_heartbeat and self.follower.owns(message.topic)

    def feed(self, messages: list[Message]) -> Plan | None:
        """Absorb the plan's messages among `messages` (others are ignored), then resync if a
        summary disagreed (or one did earlier and the last resync was too recent)."""
        mine = [m for m in messages if self.owns(m)]
        last_summary = {m.sender: i for i, m in enumerate(mine) if split_topic(m.topic)[1] is None}
        plan: Plan | None = None
        for index, message in enumerate(mine):
            if split_topic(message.topic)[1] is None and last_summary[message.sender] != index:
                continue
            try:
                built = self.follower.absorb(message)
            except Exception as error:  # any payload at all: never the end of the caller's loop
                (self.on_drop or self.subscriber.drop)(message, f"{type(error).__name__}: {error}")
                continue
            if built is not None:  # the mirror matches: whatever disagreed before is settled
                plan, self._streak, self.follower.needs_resync = built, 0, False
        self.resync_if_needed()
        return plan

    def resync_if_needed(self, now: float | None = None) -> bool:
        """Forget the mirror and ask for a snapshot if a summary disagreed with it (call it now
        and then even without messages: a resync deferred by the interval happens then)."""
        if not self.follower.needs_resync:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last_resync < self.resync_min_interval:
            return False
        self._last_resync = now
        self.resyncs += 1
        self._streak += 1
        (log.warning if self._streak == 1 else log.debug)(
            "%s: the plan's summary disagrees with the services received (a message lost?); "
            "asking the planner for a snapshot", self.who)
        self.subscriber.resync(PLAN_PREFIX)
        self.follower.reset()
        return True
