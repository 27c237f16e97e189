import random
import socket

import orjson
import pytest
import zmq

from services.common.bus import (BUS_VERSION, QUEUE_HWM, HEARTBEAT_INTERVAL, SNAPSHOT_END, BusError, Endpoint,
                                 Heartbeats, Publisher, SnapshotEnd, Subscriber, heartbeat_interval)
from tests.helpers import wait_until


def collect(subscriber, into, topic_prefix="t."):
    for message in subscriber.poll(0.05):
        if message.topic.startswith(topic_prefix):
            into.append((message.topic, message.seq, message.payload))
    return into


def test_endpoint_pairs():
    assert Endpoint.parse("tcp://h:7000").snapshot == "tcp://h:7001"
    assert Endpoint.parse("ipc:///run/x/collector.pub").snapshot == "ipc:///run/x/collector.snap"


def test_late_subscriber_gets_current_state_then_updates(tmp_path):
    ctx = zmq.Context()
    endpoint = Endpoint.parse(f"ipc://{tmp_path}/p.pub")
    publisher = Publisher(ctx, "pub", endpoint)
    publisher.publish("t.a", {"v": 1})
    publisher.publish("t.a", {"v": 2})
    publisher.publish("t.b", {"v": 3})
    subscriber = Subscriber(ctx, [endpoint], ["t."])
    got = []

    def step():
        publisher.serve_snapshots()
        return collect(subscriber, got)

    wait_until(lambda: len(step()) >= 2, message="snapshot")
    assert sorted((t, p["v"]) for t, _, p in got) == [("t.a", 2), ("t.b", 3)]
    got.clear()
    wait_until(lambda: (publisher.publish("t.a", {"v": 4}), step())[1], message="live update")
    assert got[-1][2] == {"v": 4}
    subscriber.close(); publisher.close(); ctx.term()


def test_restarted_publisher_is_resynced_by_heartbeat(tmp_path):
    ctx = zmq.Context()
    endpoint = Endpoint.parse(f"ipc://{tmp_path}/p.pub")
    first = Publisher(ctx, "pub", endpoint, heartbeat_interval=0.05)
    first.publish("t.a", {"v": 1})
    subscriber = Subscriber(ctx, [endpoint], ["t."])
    got = []
    wait_until(lambda: (first.serve_snapshots(), collect(subscriber, got))[1], message="first state")
    first.close()
    # A new process: new epoch, seq starts again at 1; the message is published before the
    # subscriber has reconnected, so only the snapshot (asked for after a heartbeat) delivers it.
    second = Publisher(ctx, "pub", endpoint, heartbeat_interval=0.05)
    second.publish("t.a", {"v": 9})

    def step():
        second.serve_snapshots()
        second.heartbeat()
        return any(p == {"v": 9} for _, _, p in collect(subscriber, got))

    wait_until(step, message="resync after restart")
    assert subscriber.alive("pub")
    subscriber.close(); second.close(); ctx.term()


def test_stale_updates_dropped(tmp_path):
    ctx = zmq.Context()
    endpoint = Endpoint.parse(f"ipc://{tmp_path}/p.pub")
    publisher = Publisher(ctx, "pub", endpoint)
    subscriber = Subscriber(ctx, [endpoint], ["t."])
    message = publisher.publish("t.a", {"v": 1})
    assert subscriber._accept(message)
    assert not subscriber._accept(message)
    subscriber.close(); publisher.close(); ctx.term()


def test_tcp_endpoint_binds_its_host_only():
    # 127.0.0.2 is loopback too on Linux: reachable when bound on all interfaces, not otherwise.
    def reachable(host: str, port: int) -> bool:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            return False

    def publisher_on(host: str) -> tuple[Publisher, int]:
        # The snapshot socket takes port+1: below the ephemeral range, where connect() does not
        # take ports (it would hold free_port()+1 often), try until a pair is free.
        for _ in range(50):
            port = random.randrange(20000, 30000)
            try:
                return Publisher(ctx, "pub", Endpoint.parse(f"tcp://{host}:{port}")), port
            except zmq.ZMQError:
                continue
        raise AssertionError("no free pair of ports")

    ctx = zmq.Context()
    one, port = publisher_on("127.0.0.1")
    assert reachable("127.0.0.1", port) and reachable("127.0.0.1", port + 1)
    assert not reachable("127.0.0.2", port) and not reachable("127.0.0.2", port + 1)
    one.close()
    for everywhere in ("0.0.0.0", "*"):
        publisher, port = publisher_on(everywhere)
        assert reachable("127.0.0.2", port) and reachable("127.0.0.2", port + 1)
        publisher.close()
    assert Endpoint.parse("tcp://central:7100").bind_form("tcp://central:7100") == "tcp://central:7100"
    ctx.term()


def raw_body(**overrides) -> bytes:
    body = {"v": BUS_VERSION, "seq": 1, "ts": 1.0, "sender": "evil", "epoch": "e1", "payload": {}}
    body.update(overrides)
    return orjson.dumps({k: v for k, v in body.items() if v is not MISSING})


MISSING = object()
HOSTILE_FRAMES = [
    [b"t.a"],                                               # one frame
    [b"t.a", raw_body(), b"extra"],                          # three frames
    [b"t.a", b"\x00\xff garbage"],                           # not JSON
    [b"t.a", b'{"seq": 1, "ts": '],                          # truncated JSON
    [b"t.\xff\xfe", raw_body()],                             # topic not UTF-8
    [b"t.a", b"[1, 2, 3]"],                                  # not an object
    [b"t.a", raw_body(v=2)],                                 # unknown bus version
    [b"t.a", raw_body(v=MISSING)],                           # no version
    [b"t.a", raw_body(seq="1")],                             # wrong types
    [b"t.a", raw_body(seq=-5)],
    [b"t.a", raw_body(ts=True)],
    [b"t.a", raw_body(sender=7)],
    [b"t.a", raw_body(epoch=MISSING)],
    [b"t.a", raw_body(payload=[1])],                         # payload not an object
    [b"t.a", raw_body(payload="x")],
]


def test_malformed_messages_are_counted_and_dropped(tmp_path, caplog):
    ctx = zmq.Context()
    endpoint = Endpoint.parse(f"ipc://{tmp_path}/p.pub")
    publisher = Publisher(ctx, "pub", endpoint)
    subscriber = Subscriber(ctx, [endpoint], ["t."])
    try:
        wait_until(lambda: (publisher.serve_snapshots(), subscriber.poll(0.02), subscriber.snapshot_complete())[2],
                   message="subscriber connected")
        got = []
        for number, frames in enumerate(HOSTILE_FRAMES, 1):
            # one at a time: small messages in a burst could meet the high-water mark
            publisher.send_frames(frames)
            wait_until(lambda: collect(subscriber, got) is not None and subscriber.dropped == number, timeout=30,
                       message=f"hostile message {number} dropped (count {subscriber.dropped})")
        publisher.publish("t.a", {"v": 1})
        wait_until(lambda: collect(subscriber, got), message="the good message after them")
        assert got == [("t.a", 1, {"v": 1})]
        assert "unknown bus version 2" in caplog.text and "expected 2 frames, got 3" in caplog.text
        assert "from evil" in caplog.text
    finally:
        subscriber.close(); publisher.close(); ctx.term()


def test_a_hostile_heartbeat_interval_is_clamped():
    assert heartbeat_interval({"interval": "x"}) == HEARTBEAT_INTERVAL
    assert heartbeat_interval({"interval": float("inf")}) == HEARTBEAT_INTERVAL
    assert heartbeat_interval({"interval": 1e9}) == 60.0
    assert heartbeat_interval({"interval": -1}) == 0.01
    assert heartbeat_interval({}) == HEARTBEAT_INTERVAL


def test_snapshot_complete_only_after_the_end_marker(tmp_path):
    ctx = zmq.Context()
    endpoint = Endpoint.parse(f"ipc://{tmp_path}/p.pub")
    publisher = Publisher(ctx, "pub", endpoint, heartbeat_interval=0.05)
    publisher.publish("t.old", {"v": 1})
    subscriber = Subscriber(ctx, [endpoint], ["t."])
    got = []
    try:
        # Live updates flow, but until the snapshot is answered the subscriber is not complete.
        wait_until(lambda: (publisher.publish("t.live", {"v": 2}), collect(subscriber, got))[1],
                   message="a live update")
        assert not subscriber.snapshot_complete() and not subscriber.snapshot_complete(endpoint)
        wait_until(lambda: (publisher.serve_snapshots(), collect(subscriber, got),
                            subscriber.snapshot_complete())[2], message="snapshot complete")
        assert ("t.old", 1, {"v": 1}) in got
    finally:
        subscriber.close(); publisher.close(); ctx.term()


def test_snapshot_complete_waits_for_the_end_of_every_prefix(tmp_path):
    """One request per prefix, one END each: an empty answer for one prefix ("plan" before any
    plan) must not say complete while the other prefix's answer is still to come."""
    ctx = zmq.Context()
    endpoint = Endpoint.parse(f"ipc://{tmp_path}/p.pub")
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint.snapshot)
    subscriber = Subscriber(ctx, [endpoint], ["a.", "b."])
    try:
        requests = []
        wait_until(lambda: (router.poll(50) and requests.append(router.recv_multipart()), len(requests) == 2)[1],
                   message="both snapshot requests")
        assert [frames[2] for frames in requests] == [b"a.", b"b."]
        identity = requests[0][0]
        router.send_multipart([identity, *SnapshotEnd("pub", "e1", 0).encode()])
        wait_until(lambda: (subscriber.poll(0.02), len(subscriber._upstreams[0].awaited) == 1)[1],
                   message="the first END read")
        assert not subscriber.snapshot_complete()
        router.send_multipart([identity, *SnapshotEnd("pub", "e1", 0).encode()])
        wait_until(lambda: (subscriber.poll(0.02), subscriber.snapshot_complete())[1], message="complete")
    finally:
        subscriber.close(); router.close(0); ctx.term()


def test_heartbeats_thread_beats_while_the_owner_is_busy(tmp_path):
    ctx = zmq.Context()
    endpoint = Endpoint.parse(f"ipc://{tmp_path}/p.pub")
    publisher = Publisher(ctx, "pub", endpoint, heartbeat_interval=0.05)
    subscriber = Subscriber(ctx, [endpoint], ["t."])
    beats = Heartbeats(publisher, lambda: {"stage": "test"}).start()
    seen = []
    try:
        # The owner thread (this one) never calls heartbeat(); publishing alongside is safe.
        def step():
            publisher.publish("t.a", {"n": len(seen)})
            seen.extend(m for m in subscriber.poll(0.02) if m.is_heartbeat)
            return len(seen) >= 5
        wait_until(step, message="heartbeats from the thread")
        assert seen[-1].payload["stage"] == "test" and subscriber.alive("pub")
    finally:
        beats.stop()
        subscriber.close(); publisher.close(); ctx.term()


def test_send_and_receive_high_water_marks_are_sized_for_full_state(tmp_path):
    ctx = zmq.Context()
    endpoint = Endpoint.parse(f"ipc://{tmp_path}/p.pub")
    publisher = Publisher(ctx, "pub", endpoint)
    subscriber = Subscriber(ctx, [endpoint], ["t."])
    try:
        assert publisher.pub.getsockopt(zmq.SNDHWM) == QUEUE_HWM <= 1000
        assert all(s.getsockopt(zmq.RCVHWM) == QUEUE_HWM for s in subscriber.sockets()[::2])
    finally:
        subscriber.close(); publisher.close(); ctx.term()


def test_a_malformed_snapshot_end_is_refused():
    good = SnapshotEnd("pub", "e1", 3)
    assert SnapshotEnd.decode(good.encode()) == good
    for frames in ([SNAPSHOT_END], [SNAPSHOT_END, b"{"], [SNAPSHOT_END, b"[]"], [SNAPSHOT_END, b'{"v": 2}'],
                   [SNAPSHOT_END, b'{"v": 1, "seq": "3", "epoch": "e", "sender": "s"}']):
        with pytest.raises(BusError):
            SnapshotEnd.decode(frames)


def test_a_new_publisher_beats_fast_then_at_its_interval(tmp_path):
    """Subscribers that reconnect to a restarted publisher learn of its new epoch within the
    fast start-up interval, not a whole heartbeat interval later."""
    import time

    from services.common.bus import STARTUP_HEARTBEAT_INTERVAL, STARTUP_SECONDS
    ctx = zmq.Context.instance()
    publisher = Publisher(ctx, "p", Endpoint.parse(f"ipc://{tmp_path}/p.pub"), heartbeat_interval=5.0)
    try:
        start = time.monotonic()
        assert publisher.heartbeat(now=start)
        assert not publisher.heartbeat(now=start + STARTUP_HEARTBEAT_INTERVAL / 2)
        assert publisher.heartbeat(now=start + STARTUP_HEARTBEAT_INTERVAL)
        late = start + STARTUP_SECONDS + 1
        assert publisher.heartbeat(now=late)
        assert not publisher.heartbeat(now=late + 1.0)  # past start-up: every 5 s, as announced
        assert publisher.heartbeat(now=late + 5.0)
    finally:
        publisher.close()
