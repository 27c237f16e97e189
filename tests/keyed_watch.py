"""Tests' view of the keyed states on the bus (docs/bus.md, Keyed states): source snapshots and
plans rebuilt from their keys by the followers of services/common/wire.py, exactly as the
planner and the applier see them, with the resync a stage does when a summary disagrees."""
from __future__ import annotations

import zmq

from services.common.bus import Endpoint, Message, Subscriber
from services.common.keyed import split_topic
from services.common.model import SOURCES, Plan, SourceSnapshot
from services.common.wire import PLAN_PREFIX, SOURCE_PREFIX, PlanFollower, SnapshotFollower


class KeyedWatch:
    """Follows `source.*` and `plan` keyed states (and keeps every other message) on some
    publishers' buses."""

    def __init__(self, endpoints: list[Endpoint], prefixes: list[str], ctx: zmq.Context | None = None):
        self.subscriber = Subscriber(ctx or zmq.Context.instance(), endpoints, prefixes)
        self.followers: dict = {}
        self.snapshots: dict[str, SourceSnapshot] = {}  # the newest of each source
        self.summaries: dict[str, dict] = {}  # the newest matching summary payload by prefix
        self.history: list[SourceSnapshot | Plan] = []  # every snapshot and plan rebuilt, in order
        self.plans: list[Plan] = []
        self.beats: dict[str, dict] = {}  # the newest heartbeat of each sender
        self.messages: list[Message] = []  # data messages that are not keyed states (applied.)
        self.errors: list[str] = []
        self.resyncs = 0

    def _follower(self, topic: str):
        prefix, _key = split_topic(topic)
        follower = self.followers.get(prefix)
        if follower is None:
            if prefix == PLAN_PREFIX:
                follower = PlanFollower()
            elif prefix.startswith(SOURCE_PREFIX) and prefix[len(SOURCE_PREFIX):] in SOURCES:
                follower = SnapshotFollower(prefix)
            else:
                return None
            self.followers[prefix] = follower
        return follower

    def poll(self, timeout: float = 0.05) -> "KeyedWatch":
        for message in self.subscriber.poll(timeout):
            if message.is_heartbeat:
                self.beats[message.sender] = message.payload
                continue
            follower = self._follower(message.topic)
            if follower is None:
                self.messages.append(message)
                continue
            try:
                built = follower.absorb(message)
            except ValueError as error:  # ModelError too
                self.errors.append(f"{message.topic}: {error}")
                continue
            if follower.needs_resync:
                self.subscriber.resync(follower.prefix)
                follower.reset()
                self.resyncs += 1
            if built is None:
                continue
            self.summaries[follower.prefix] = message.payload
            self.history.append(built)
            if isinstance(built, Plan):
                self.plans.append(built)
            else:
                self.snapshots[built.source] = built
        return self

    @property
    def plan(self) -> Plan | None:
        return self.plans[-1] if self.plans else None

    def payloads(self, topic_prefix: str) -> list[dict]:
        """Payloads of the other data messages (`applied.`) whose topic starts so."""
        return [m.payload for m in self.messages if m.topic.startswith(topic_prefix)]

    def close(self) -> None:
        self.subscriber.close()
