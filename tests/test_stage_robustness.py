"""No stage loop dies on one message: the planner, the applier and the tap, each fed hostile
messages on a real ZeroMQ PUB socket at the endpoint it subscribes to, log, count and drop
every one, and still plan / apply / print the next good message."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

import pytest
import zmq

from services.applier import main as applier
from services.common.bus import QUEUE_HWM, Endpoint, Publisher, Subscriber
from services.common.config import Settings
from services.common.model import Plan, ProxySettings, Service, SourceSnapshot
from services.common.wire import PlanSender
from services.planner import main as planner
from tests.helpers import RecordingDriver, wait_until
from tests.test_bus import HOSTILE_FRAMES, raw_body

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEAT = 0.05


def service(port: int, servers: int = 1, source: str = "file") -> Service:
    return Service.from_dict({"name": "web", "port": port, "source": source, "servers": [
        {"ip": f"10.0.0.{i + 1}", "port": 80} for i in range(servers)]})


def snapshot(servers: int, source: str = "file") -> SourceSnapshot:
    return SourceSnapshot(source, "ok", (service(1234, servers, source),))


def good_plan(port: int) -> Plan:
    return Plan((service(port),), ProxySettings(), sources_ready=("file",))


def bad_snapshot_messages(source_hash: str) -> list[tuple[str, dict]]:
    """Keyed source messages with a valid envelope that do not decode, or name an unknown
    source: keys, and summaries that carry the right hash (one that did not would make the
    planner resync, not drop)."""
    summary = {"schema": 2, "source": "file", "state": "ok", "error": "", "warnings": [], "count": 1,
               "hash": source_hash, "changed_at": 0.0, "excluded": []}
    key = {"schema": 2, "service": service(1234).to_dict(), "excluded": []}
    return [
        ("source.file:1234/tcp", {**key, "schema": 1}),
        ("source.file:1234/tcp", {k: v for k, v in key.items() if k != "schema"}),
        ("source.file:1234/tcp", {**key, "service": "x"}),
        ("source.file:1234/tcp", {**key, "service": {**key["service"], "servers": [{"ip": 7}]}}),
        ("source.file:1234/tcp", {**key, "service": service(2001).to_dict()}),  # another key's service
        ("source.file:1234/tcp", {**key, "excluded": 5}),
        ("source.file:1234/tcp", {"schema": 2, "service": {"nested": [[[[[]]]]]}}),
        ("source.file", {**summary, "schema": 1}),
        ("source.file", {k: v for k, v in summary.items() if k != "schema"}),
        ("source.file", {**summary, "state": 5}),
        ("source.file", {**summary, "warnings": 3}),
        ("source.file", {**summary, "source": None}),
        ("source.file", {**summary, "source": "marathon"}),                  # topic and source disagree
        ("source.file", {**summary, "excluded": "x"}),
        ("source.file", {**summary, "changed_at": "soon"}),
        ("source.nope", {**summary, "source": "nope"}),
        ("source.nope:1234/tcp", key),
    ]
def bad_plan_messages(services_hash: str) -> list[tuple[str, dict]]:
    """Keyed plan messages with a valid envelope that do not decode: keys, and summaries that
    carry the right services_hash (one that did not would make the applier resync, not drop)."""
    good = {"schema": 2, "hash": Plan((service(2000),), ProxySettings(), sources_ready=("file",)).hash,
            "services_hash": services_hash, "count": 1, "settings": ProxySettings().to_dict(), "inputs": {},
            "sources_ready": ["file"], "notes": [], "changed_at": 0.0, "excluded": []}
    key = {"schema": 2, "service": service(2000).to_dict(), "excluded": []}
    return [
        ("plan:2000/tcp", {**key, "schema": 99}),
        ("plan:2000/tcp", {**key, "service": "x"}),
        ("plan:2000/tcp", {**key, "service": {**key["service"], "servers": [{"ip": 7}]}}),
        ("plan:2000/tcp", {**key, "service": service(2001).to_dict()}),   # another key's service
        ("plan:2000/tcp", {**key, "excluded": 5}),
        ("plan:2000/tcp", {"schema": 2, "service": {"nested": [[[[[]]]]]}}),
        ("plan", {**good, "schema": 99}),
        ("plan", {**good, "hash": "0000000000000000"}),               # does not match the content
        ("plan", {**good, "settings": {"max_connections": "many"}}),
        ("plan", {**good, "settings": []}),
        ("plan", {**good, "sources_ready": 5}),
        ("plan", {**good, "inputs": ["x"]}),
        ("plan", {**good, "notes": {"a": 1}}),
        ("plan", {**good, "excluded": "x"}),
    ]


class Beats:
    """The latest heartbeat payload of one stage, read from its PUB endpoint."""

    def __init__(self, ctx: zmq.Context, settings: Settings, stage: str, prefix: str):
        self.subscriber = Subscriber(ctx, [settings.bus(stage)], [prefix])
        self.latest: dict = {}
        self.data: list = []

    def poll(self) -> dict:
        for message in self.subscriber.poll(0.02):
            if message.is_heartbeat:
                self.latest = message.payload
            else:
                self.data.append(message)
        return self.latest


def on_topic(topic: bytes) -> list[list[bytes]]:
    """HOSTILE_FRAMES (test_bus) sent on `topic`; the non-UTF-8 topic stays non-UTF-8."""
    return [[topic if frames[0] == b"t.a" else topic + b"\xff", *frames[1:]] for frames in HOSTILE_FRAMES]


def feed(upstream: Publisher, beats: Beats, hostile: list, expected_dropped: int) -> int:
    """Send each hostile item (raw frames or (topic, payload)) and wait until the stage counted
    it: one at a time, so a burst never meets the high-water mark."""
    for item in hostile:
        if isinstance(item, tuple):
            upstream.publish(*item)
        else:
            upstream.send_frames(item)
        expected_dropped += 1
        wait_until(lambda: (upstream.serve_snapshots(), beats.poll().get("dropped"))[1] == expected_dropped,
                   timeout=30, message=f"{item!r:.120} dropped (count {expected_dropped})")
    return expected_dropped


def test_planner_survives_any_message_and_plans_the_next_good_one(caplog):
    from services.common.wire import SnapshotSender

    settings = Settings(run_dir=tempfile.mkdtemp(prefix="pm"), services_file="/x", node_name="t")
    ctx = zmq.Context.instance()
    collector = Publisher(ctx, "collector@t", settings.bus("collector"), heartbeat_interval=BEAT)
    sender = SnapshotSender(collector, "file")
    beats = Beats(ctx, settings, "planner", "plan")
    stop = threading.Event()
    thread = threading.Thread(target=planner.run, args=(settings, stop), kwargs={"heartbeat_interval": BEAT},
                              daemon=True)
    thread.start()

    def plans():
        collector.serve_snapshots()
        collector.heartbeat()
        beats.poll()
        return [m.payload for m in beats.data if m.topic == "plan"]

    try:
        first = sender.publish(snapshot(1))
        wait_until(plans, message="first plan")
        hostile = on_topic(b"source.file") + on_topic(b"source.file:1234/tcp") + bad_snapshot_messages(first.hash)
        dropped = feed(collector, beats, hostile, 0)
        # Hostile heartbeats are not dropped (their bad fields are ignored), and kill nothing.
        collector.send_frames([b"heartbeat.evil", raw_body(sender="evil", payload={"interval": "x"})])
        sender.publish(snapshot(3))
        wait_until(lambda: len(plans()) == 2, message="the good snapshot planned")
        (key,) = [m.payload for m in beats.data if m.topic == "plan:1234/tcp"][1:]
        assert len(key["service"]["servers"]) == 3
        assert thread.is_alive() and beats.latest["dropped"] == dropped == len(hostile)
        assert beats.latest["resyncs"] == 0
        assert "unknown schema 1 (this is 2)" in caplog.text and "from collector@t" in caplog.text
        assert "snapshot of source 'marathon' on topic 'source.file'" in caplog.text
        assert "unknown source 'nope'" in caplog.text and "carries service 2001/tcp" in caplog.text
    finally:
        stop.set()
        thread.join(10)
        beats.subscriber.close()
        collector.close()
        shutil.rmtree(settings.run_dir, ignore_errors=True)
    assert not thread.is_alive()


def test_applier_survives_any_message_and_applies_the_next_good_one(caplog):
    settings = Settings(run_dir=tempfile.mkdtemp(prefix="pm"), node_name="n")
    ctx = zmq.Context.instance()
    planner_stand_in = Publisher(ctx, "planner@n", settings.bus("planner"), heartbeat_interval=BEAT)
    plans = PlanSender(planner_stand_in)
    beats = Beats(ctx, settings, "applier", "applied.")
    driver = RecordingDriver()
    stop = threading.Event()
    thread = threading.Thread(target=applier.run, args=(settings, stop),
                              kwargs={"drivers": [driver], "heartbeat_interval": BEAT}, daemon=True)
    thread.start()

    def applied():
        planner_stand_in.serve_snapshots()
        planner_stand_in.heartbeat()
        beats.poll()
        return driver.applied

    try:
        first = good_plan(2000)
        report = plans.publish(first)
        wait_until(lambda: first.hash in applied(), message="first plan applied")
        hostile = on_topic(b"plan") + on_topic(b"plan:2000/tcp") + bad_plan_messages(report.hash)
        dropped = feed(planner_stand_in, beats, hostile, 0)
        assert driver.applied == [first.hash]
        second = good_plan(2001)
        plans.publish(second)
        wait_until(lambda: second.hash in applied(), message="the good plan applied")
        assert driver.applied == [first.hash, second.hash]
        assert thread.is_alive() and beats.latest["dropped"] == dropped == len(hostile)
        assert beats.latest["plan_resyncs"] == 0
        assert "unknown schema 99" in caplog.text and "is not its content's" in caplog.text
        assert "carries service 2001/tcp" in caplog.text
    finally:
        stop.set()
        thread.join(10)
        beats.subscriber.close()
        planner_stand_in.close()
        shutil.rmtree(settings.run_dir, ignore_errors=True)
    assert not thread.is_alive()


@pytest.fixture
def tap_process(tmp_path):
    """`proxymatic tap` on a stand-in publisher's endpoint, printing into a file."""
    endpoint = f"ipc://{tmp_path}/x.pub"
    output = open(tmp_path / "tap.out", "wb")
    errors = open(tmp_path / "tap.err", "wb")
    process = subprocess.Popen([sys.executable, "-m", "services.cli", "tap", "--run-dir", str(tmp_path),
                                "--bus", endpoint, "--no-heartbeats"],
                               cwd=REPO, stdout=output, stderr=errors, start_new_session=True)
    yield process, endpoint, tmp_path / "tap.out", tmp_path / "tap.err"
    process.kill()
    process.wait(10)
    output.close()
    errors.close()


def test_tap_survives_any_message_and_prints_the_next_good_one(tap_process):
    process, endpoint, out, err = tap_process
    ctx = zmq.Context.instance()
    publisher = Publisher(ctx, "planner@x", Endpoint.parse(endpoint), heartbeat_interval=BEAT)
    try:
        def printed(text: str) -> bool:
            publisher.serve_snapshots()
            publisher.heartbeat()
            return text in out.read_text()

        plans = PlanSender(publisher)
        plans.publish(good_plan(3000))
        wait_until(lambda: printed("plan:3000/tcp"), timeout=30, message="tap running")
        hostile = on_topic(b"plan")
        # A valid envelope whose payload the summary cannot read.
        hostile_payloads = [("plan:1/tcp", {"service": 5}), ("plan", {"notes": 5}),
                            ("source.file", {"warnings": 7}), ("heartbeat.x", {"sources": {"a": 5}})]
        for number, frames in enumerate(hostile, 1):
            publisher.send_frames(frames)
            wait_until(lambda: printed("") and err.read_text().count("dropped message") == number, timeout=30,
                       message=f"hostile message {number} logged")
        for topic, payload in hostile_payloads:
            publisher.publish(topic, payload)
        plans.publish(good_plan(3001))
        wait_until(lambda: printed("plan:3001/tcp"), timeout=30, message="the good message after them")
        lines = out.read_text().splitlines()
        assert any(line.split()[1] == "plan:3001/tcp" and line.endswith(" web 1 server") for line in lines)
        assert any(line.split()[1] == "plan:3000/tcp" and line.endswith(" deleted") for line in lines)
        assert process.poll() is None
        assert err.read_text().count("dropped message") == len(hostile) + 3  # the heartbeat is hidden
        assert "cannot show it" in err.read_text()
    finally:
        publisher.close()


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:"))


def test_a_stopped_subscriber_costs_little_and_catches_up_after_sigcont(tap_process):
    """Key-sized messages (keyed states: ~1 kB each) at twenty times the high-water mark to a tap
    stopped with SIGSTOP: the publisher holds at most QUEUE_HWM of them for it (~2 MB here, not
    the 40 MB sent), the rest of the pipeline goes on, and the tap catches up from a snapshot
    after SIGCONT."""
    process, endpoint, out, _err = tap_process
    ctx = zmq.Context.instance()
    publisher = Publisher(ctx, "planner@x", Endpoint.parse(endpoint), heartbeat_interval=0.1)
    healthy = Subscriber(ctx, [Endpoint.parse(endpoint)], ["t."])  # the rest of the pipeline
    blob = "x" * 2048  # a key message with a few servers
    count = 20 * QUEUE_HWM  # 40 MB for a subscriber that reads nothing
    seen: list[int] = []

    def pump(timeout: float = 0.01) -> list[int]:
        publisher.serve_snapshots()
        publisher.heartbeat()
        seen.extend(m.payload["a_n"] for m in healthy.poll(timeout) if m.topic == "t.big")
        return seen

    try:
        publisher.publish("t.big", {"a_n": -1, "blob": blob})
        wait_until(lambda: pump() and '"a_n": -1' in out.read_text(), timeout=30, message="tap and subscriber running")
        os.kill(process.pid, signal.SIGSTOP)
        before = rss_bytes()
        for n in range(count):
            publisher.publish("t.big", {"a_n": n, "blob": blob})
            if n % 100 == 99:  # the healthy subscriber reads well within its high-water mark
                pump(0)
        wait_until(lambda: pump()[-1] == count - 1, timeout=30, message="the pipeline goes on while the tap is stopped")
        grown = rss_bytes() - before
        os.kill(process.pid, signal.SIGCONT)
        # Everything past the high-water mark was dropped for the tap: the heartbeat's seq makes
        # it ask for a snapshot, which has the last state.
        wait_until(lambda: pump() and f'"a_n": {count - 1}' in out.read_text(), timeout=30, message="tap caught up")
        assert grown < 16 * 1024 * 1024, grown
        assert process.poll() is None
    finally:
        os.kill(process.pid, signal.SIGCONT)
        healthy.close()
        publisher.close()
