import zmq

from services.common.bus import Endpoint, Publisher, Subscriber
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
