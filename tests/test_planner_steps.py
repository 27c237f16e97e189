"""The planner's step function (services/planner/steps.py) without processes or sockets: source
messages in (as a SnapshotSender publishes them), time passed as `now`, actions out; the plans
published are rebuilt by a PlanFollower as the applier would."""
import json
import logging

from services.common.bus import BULK_KEYS, Message
from services.common.config import Settings
from services.common.model import Excluded, Plan, Service, SourceSnapshot
from services.common.wire import PlanFollower, SnapshotSender
from services.planner.steps import (Drop, Note, PublishKeys, PublishSummary, RequestResync, SnapshotDone,
                                    SourceSummary, Tick, Timing, event_of, heartbeat, initial_state, step,
                                    wake_in)

QUIET, MAX_DELAY, RESYNC = 0.002, 0.05, 2.0


def svc(port: int, source: str = "file", servers: int = 1, name: str = "", **extra) -> Service:
    return Service.from_dict({"name": name or f"{source[0]}{port}", "port": port, "source": source, **extra,
                              "servers": [{"ip": f"10.0.0.{n + 1}", "port": 80} for n in range(servers)]})


class Collector:
    """Stands in for the collector's Publisher: the messages as on the wire (JSON round trip)."""

    def __init__(self, sender: str = "collector@t", epoch: str = "e1"):
        self.sender, self.epoch, self.seq, self.sent = sender, epoch, 0, []
        self.senders: dict[str, SnapshotSender] = {}

    def publish(self, topic: str, payload: dict) -> Message:
        self.seq += 1
        message = Message(topic, self.seq, 0.0, self.sender, self.epoch, json.loads(json.dumps(payload)))
        self.sent.append(message)
        return message

    def snapshot(self, source: str, *services: Service, state: str = "ok", **extra) -> list[Message]:
        sender = self.senders.setdefault(source, SnapshotSender(self, source))
        sender.publish(SourceSnapshot(source, state, tuple(services), **extra))
        sent, self.sent = self.sent, []
        return sent


class Planner:
    """The step function with its state, the actions it returned, and the plans they publish
    as a follower rebuilds them."""

    def __init__(self, settings: Settings | None = None, synced: bool = True):
        self.state = initial_state(settings or Settings(status_endpoint="", services_file="/x"),
                                   Timing(QUIET, MAX_DELAY, RESYNC))
        self.actions: list = []
        self.follower, self.plans, self.seq = PlanFollower(), [], 0
        if synced:
            self.step(SnapshotDone(), 0.0)

    def step(self, event, now: float) -> list:
        self.state, actions = step(self.state, event, now)
        self.actions.extend(actions)
        for action in actions:
            messages = []
            if isinstance(action, PublishKeys):
                messages = list(action.keys)
            elif isinstance(action, PublishSummary):
                messages = [(action.topic, action.payload)]
            for topic, payload in messages:
                self.seq += 1
                plan = self.follower.absorb(Message(topic, self.seq, 0.0, "planner@t", "p1",
                                                    json.loads(json.dumps(payload))))
                assert not self.follower.needs_resync
                if plan is not None:
                    self.plans.append(plan)
        return list(actions)

    def feed(self, messages: list[Message], now: float, tick: bool = True) -> list:
        actions = []
        for message in messages:
            actions += self.step(event_of(message), now)
        if tick:
            actions += self.step(Tick(), now)
        return actions

    def taken(self, kind) -> list:
        found = [a for a in self.actions if isinstance(a, kind)]
        self.actions = [a for a in self.actions if not isinstance(a, kind)]
        return found

    @property
    def plan(self) -> Plan:
        return self.plans[-1]


def summaries(actions) -> list[PublishSummary]:
    return [a for a in actions if isinstance(a, PublishSummary)]


def keys_published(actions) -> list[str]:
    return [topic.partition(":")[2] for a in actions if isinstance(a, PublishKeys) for topic, _ in a.keys]


def test_no_plan_before_the_collectors_whole_snapshot():
    collector, planner = Collector(), Planner(synced=False)
    assert summaries(planner.feed(collector.snapshot("file", svc(1000)), 0.0)) == []
    assert summaries(planner.feed([], 1.0)) == []
    assert wake_in(planner.state, 1.0) is None  # nothing to wait for before the snapshot
    assert len(summaries(planner.step(SnapshotDone(), 1.0))) == 1
    assert [s.key for s in planner.plan.services] == ["1000/tcp"]
    assert heartbeat(planner.state)["synced"] and heartbeat(planner.state)["plans_published"] == 1


def test_a_burst_is_coalesced_and_the_last_state_wins():
    collector, planner = Collector(), Planner()
    assert len(summaries(planner.feed(collector.snapshot("file", svc(1000)), 0.0))) == 1  # calm: at once
    published = []
    now = 0.01
    for servers in range(2, 152):  # 150 snapshots, one every ms: never a quiet period
        published += summaries(planner.feed(collector.snapshot("file", svc(1000, servers=servers)), now))
        now += 0.001
    # at most one plan per max_delay within the burst
    assert 2 <= len(published) <= 0.15 / MAX_DELAY, len(published)
    assert wake_in(planner.state, now) <= QUIET
    published += summaries(planner.feed([], now + QUIET))  # the quiet period after the burst
    assert len(summaries(planner.actions)) == len(published) + 1 and len(planner.plan.services[0].servers) == 151
    assert summaries(planner.feed([], now + 1.0)) == []  # nothing new: nothing published
    assert planner.taken(RequestResync) == []


def test_changes_within_max_delay_wait_for_a_quiet_period():
    collector, planner = Collector(), Planner()
    planner.feed(collector.snapshot("file", svc(1000)), 0.0)
    assert summaries(planner.feed(collector.snapshot("file", svc(1000, servers=2)), 0.01)) == []
    assert abs(wake_in(planner.state, 0.01) - QUIET) < 1e-9
    assert summaries(planner.feed([], 0.011)) == []
    assert len(summaries(planner.feed([], 0.01 + QUIET))) == 1
    assert len(planner.plan.services[0].servers) == 2


def test_a_disagreeing_source_is_resynced_at_most_once_per_interval():
    collector, planner = Collector(), Planner()
    planner.feed(collector.snapshot("file", svc(1000), svc(2000)), 0.0)
    lost = collector.snapshot("file", svc(1000, servers=3), svc(2000))
    assert [m.topic for m in lost] == ["source.file:1000/tcp", "source.file"]
    actions = planner.feed(lost[1:], 10.0)  # the key message lost: the summary disagrees
    assert [a.prefix for a in actions if isinstance(a, RequestResync)] == ["source.file"]
    assert summaries(actions) == [] and planner.state.resyncs == 1
    # Live summaries overtaking the snapshot answer disagree again: no new request before 2 s.
    again = collector.snapshot("file", svc(1000, servers=3), svc(2000, servers=2))
    assert not any(isinstance(a, RequestResync) for a in planner.feed(again[1:], 11.0))
    assert abs(wake_in(planner.state, 11.0) - 1.0) < 1e-9
    assert not any(isinstance(a, RequestResync) for a in planner.feed([], 11.9))
    assert [a.prefix for a in planner.feed([], 12.0) if isinstance(a, RequestResync)] == ["source.file"]
    assert heartbeat(planner.state)["resyncs"] == 2
    # the snapshot answer: every key's newest message, then the summary
    answer = Collector().snapshot("file", svc(1000, servers=3), svc(2000, servers=2))
    assert len(summaries(planner.feed(answer, 12.5))) == 1
    assert [len(s.servers) for s in sorted(planner.plan.services, key=lambda s: s.port)] == [3, 2]
    # no plan was ever made from the disagreeing mirror
    assert [[len(s.servers) for s in sorted(p.services, key=lambda s: s.port)] for p in planner.plans] == [
        [1, 1], [3, 2]]


def test_only_the_changed_keys_are_planned_again_and_published():
    collector, planner = Collector(), Planner()
    services = [svc(port) for port in range(1000, 1100)]
    planner.feed(collector.snapshot("file", *services), 0.0)
    builder = planner.state.tables.builder
    replanned: list[str] = []
    original = builder._replan
    builder._replan = lambda key: (replanned.append(key), original(key))[1]
    services[7] = svc(1007, servers=2)
    actions = planner.feed(collector.snapshot("file", *services), 1.0)
    assert replanned == ["1007/tcp"]
    assert keys_published(actions) == ["1007/tcp"] and len(summaries(actions)) == 1
    assert len(planner.plan.services) == 100 and planner.plan.hash == summaries(actions)[0].payload["hash"]


def test_a_key_moving_between_sources_follows_the_precedence():
    collector, planner = Collector(), Planner()
    planner.feed(collector.snapshot("file", svc(1234, "file"), svc(2000, "file")), 0.0)
    assert planner.plan.services[0].source == "file"
    # Marathon claims 1234/tcp: it wins it, the file's service is noted and excluded
    actions = planner.feed(collector.snapshot("marathon", svc(1234, "marathon")), 1.0)
    assert keys_published(actions) == ["1234/tcp"]
    by_key = {s.key: s for s in planner.plan.services}
    assert (by_key["1234/tcp"].source, by_key["2000/tcp"].source) == ("marathon", "file")
    assert any("claimed by marathon" in note for note in planner.plan.notes)
    assert [(e.code, e.source, e.service) for e in planner.plan.excluded] == [("port_taken", "planner", "f1234")]
    assert any(isinstance(a, Note) and a.level == logging.WARNING and "claimed by marathon" in a.text
               for a in actions)
    # registrator claims it too: marathon keeps it, two losers noted
    planner.feed(collector.snapshot("registrator", svc(1234, "registrator")), 2.0)
    assert {s.key: s.source for s in planner.plan.services}["1234/tcp"] == "marathon"
    assert len(planner.plan.notes) == 2
    # marathon lets it go: registrator's, over the file's
    actions = planner.feed(collector.snapshot("marathon"), 3.0)
    assert keys_published(actions) == ["1234/tcp"]
    assert {s.key: s.source for s in planner.plan.services}["1234/tcp"] == "registrator"
    assert [n for n in planner.plan.notes if "claimed by registrator" in n] and len(planner.plan.notes) == 1
    # registrator too: the file's again, nothing noted
    planner.feed(collector.snapshot("registrator"), 4.0)
    assert {s.key: s.source for s in planner.plan.services}["1234/tcp"] == "file"
    assert planner.plan.notes == () and planner.plan.excluded == ()


def test_the_summary_is_published_only_when_hash_sources_ready_notes_or_excluded_change():
    collector, planner = Collector(), Planner()
    planner.feed(collector.snapshot("file", svc(1000), changed_at=1.0), 0.0)
    assert len(planner.plans) == 1
    # changed_at alone (when, not what): no plan
    assert summaries(planner.feed(collector.snapshot("file", svc(1000), changed_at=2.0), 1.0)) == []
    # sources_ready: marathon reports, with nothing yet
    planner.feed(collector.snapshot("marathon", state="initializing"), 2.0)
    assert summaries(planner.feed(collector.snapshot("marathon"), 3.0))
    assert planner.plan.sources_ready == ("file", "marathon") and keys_published(planner.actions[-3:]) == []
    # excluded: an entry alone, no service changed
    failing = Excluded("file", "health_failing", "failing", key="1000/tcp", task="t1")
    actions = planner.feed(collector.snapshot("file", svc(1000), excluded=(failing,)), 4.0)
    assert summaries(actions) and planner.plan.excluded == (failing,)
    # notes: a host-network service not proxied
    actions = planner.feed(collector.snapshot("file", svc(1000), svc(3000, host_network=True),
                                              excluded=(failing,)), 5.0)
    assert summaries(actions) and any("host networking" in n for n in planner.plan.notes)
    assert [s.key for s in planner.plan.services] == ["1000/tcp"]
    # the hash: a server more
    actions = planner.feed(collector.snapshot("file", svc(1000, servers=2), svc(3000, host_network=True),
                                              excluded=(failing,)), 6.0)
    assert keys_published(actions) == ["1000/tcp"] and summaries(actions)
    # the same again: nothing
    assert summaries(planner.feed(collector.snapshot("file", svc(1000, servers=2), svc(3000, host_network=True),
                                                     excluded=(failing,), changed_at=9.0), 7.0)) == []
    assert heartbeat(planner.state)["plans_published"] == len(planner.plans) == 5


def test_a_restarted_collector_saying_initializing_keeps_the_sources_services():
    collector, planner = Collector(), Planner()
    planner.feed(collector.snapshot("file", svc(1000), svc(2000)), 0.0)
    restarted = Collector(epoch="e2")  # the same sender, a new process: its own mirror... of the same name
    planner.feed(restarted.snapshot("file", state="initializing"), 1.0)
    assert [s.key for s in sorted(planner.plan.services, key=lambda s: s.port)] == ["1000/tcp", "2000/tcp"]
    # then it answers with one service only: the other is gone
    planner.feed(restarted.snapshot("file", svc(2000, servers=2)), 2.0)
    assert [(s.key, len(s.servers)) for s in planner.plan.services] == [("2000/tcp", 2)]


def test_a_first_plan_of_many_keys_is_published_in_bulk():
    collector, planner = Collector(), Planner()
    actions = planner.feed(collector.snapshot("file", *(svc(port) for port in range(10000, 10000 + BULK_KEYS + 1))),
                           0.0)
    (keys,) = [a for a in actions if isinstance(a, PublishKeys)]
    (summary,) = summaries(actions)
    assert keys.bulk and summary.catch_up and len(keys.keys) == BULK_KEYS + 1
    # a change then goes live
    actions = planner.feed(collector.snapshot("file", *(svc(port) for port in range(10000, 10000 + BULK_KEYS))), 1.0)
    (keys,) = [a for a in actions if isinstance(a, PublishKeys)]
    assert not keys.bulk and not summaries(actions)[0].catch_up and len(keys.keys) == 1


def test_what_does_not_decode_is_dropped_and_the_source_stays():
    collector, planner = Collector(), Planner()
    planner.feed(collector.snapshot("file", svc(1000)), 0.0)
    bad = [Message("source.nowhere", 1, 0.0, "collector@t", "e1", {}),
           Message("source.file:1000/tcp", 99, 0.0, "collector@t", "e1", {"schema": 2, "service": {"port": "x"}}),
           Message("source.file", 100, 0.0, "collector@t", "e1", {"schema": 1})]
    actions = planner.feed(bad, 1.0)
    assert len([a for a in actions if isinstance(a, Drop)]) == 3 and summaries(actions) == []
    assert [s.key for s in planner.plan.services] == ["1000/tcp"]
    assert isinstance(event_of(bad[0]), SourceSummary)
