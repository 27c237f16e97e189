"""The ZeroMQ bus: sequenced PUB/SUB with the Clone pattern (ZeroMQ Guide, chapter 5).

Each publishing stage binds a PUB socket and, next to it, a ROUTER "snapshot" socket. Every
message carries a full state for its topic (never a delta), so the publisher keeps the last
message of each topic and a late subscriber asks the snapshot socket for them.

A subscriber subscribes first, then requests a snapshot, and drops any message it already has
a newer sequence number for. Heartbeats carry the publisher's current sequence number and
epoch (a per-process id): a subscriber that sees a number it never received, or a new epoch
(a restarted publisher), asks for a snapshot again. So a message lost while a socket was
reconnecting costs at most one heartbeat interval. Protocol: docs/bus.md.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

import orjson
import zmq

log = logging.getLogger(__name__)

HEARTBEAT_TOPIC = "heartbeat."
HEARTBEAT_INTERVAL = 1.0
# A publisher is considered dead after this many missed heartbeats.
HEARTBEAT_LIVENESS = 3
SNAPSHOT_REQUEST = b"SNAPSHOT"
SNAPSHOT_END = b"END"
SNAPSHOT_TIMEOUT = 2.0


@dataclass(frozen=True)
class Message:
    topic: str
    seq: int
    ts: float
    sender: str
    epoch: str
    payload: dict

    def encode(self) -> list[bytes]:
        body = {"seq": self.seq, "ts": self.ts, "sender": self.sender, "epoch": self.epoch,
                "payload": self.payload}
        # orjson: a full snapshot of 1,000 services is ~0.5 MB; the stdlib takes 10 ms a hop for it.
        return [self.topic.encode(), orjson.dumps(body, option=orjson.OPT_SORT_KEYS)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> "Message":
        if len(frames) != 2:
            raise ValueError(f"expected 2 frames, got {len(frames)}")
        body = orjson.loads(frames[1])
        return cls(topic=frames[0].decode(), seq=int(body["seq"]), ts=float(body["ts"]),
                   sender=str(body["sender"]), epoch=str(body["epoch"]), payload=body["payload"])

    @property
    def is_heartbeat(self) -> bool:
        return self.topic.startswith(HEARTBEAT_TOPIC)


@dataclass(frozen=True)
class Endpoint:
    """Where one publisher lives: its PUB address and its snapshot (ROUTER) address."""

    pub: str
    snapshot: str

    @classmethod
    def parse(cls, pub: str) -> "Endpoint":
        """`ipc://path.pub` pairs with `ipc://path.snap`; `tcp://host:port` with port+1."""
        if pub.startswith("tcp://"):
            host, _, port = pub[len("tcp://"):].rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65535:
                raise ValueError(f"bus endpoint {pub!r}: expected tcp://host:port")
            return cls(pub, f"tcp://{host}:{int(port) + 1}")
        if pub.startswith("ipc://"):
            base = pub[:-4] if pub.endswith(".pub") else pub
            return cls(pub, base + ".snap")
        raise ValueError(f"bus endpoint {pub!r}: expected tcp://host:port or ipc://path")

    def bind_form(self, address: str) -> str:
        # A tcp endpoint named by host is bound on all interfaces of that host; ipc paths are files.
        if address.startswith("tcp://"):
            _, _, port = address.rpartition(":")
            return f"tcp://*:{port}"
        return address


def _ensure_ipc_dir(address: str) -> None:
    if address.startswith("ipc://"):
        os.makedirs(os.path.dirname(address[len("ipc://"):]) or ".", exist_ok=True)


class Publisher:
    """Publishes full-state messages and answers snapshot requests for them."""

    def __init__(self, ctx: zmq.Context, sender: str, endpoint: Endpoint,
                 heartbeat_interval: float = HEARTBEAT_INTERVAL):
        self.sender = sender
        self.epoch = uuid.uuid4().hex[:12]
        self.seq = 0
        self.heartbeat_interval = heartbeat_interval
        self._last: dict[str, Message] = {}
        self._next_heartbeat = 0.0
        for address in (endpoint.pub, endpoint.snapshot):
            _ensure_ipc_dir(address)
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 10000)
        self.pub.bind(endpoint.bind_form(endpoint.pub))
        self.snapshot = ctx.socket(zmq.ROUTER)
        self.snapshot.setsockopt(zmq.LINGER, 0)
        self.snapshot.bind(endpoint.bind_form(endpoint.snapshot))

    def publish(self, topic: str, payload: dict) -> Message:
        self.seq += 1
        message = Message(topic, self.seq, time.time(), self.sender, self.epoch, payload)
        self._last[topic] = message
        self.pub.send_multipart(message.encode())
        return message

    def heartbeat(self, payload: dict | None = None, now: float | None = None) -> bool:
        """Send a heartbeat if one is due. Heartbeats carry the current seq without taking one."""
        now = time.monotonic() if now is None else now
        if now < self._next_heartbeat:
            return False
        self._next_heartbeat = now + self.heartbeat_interval
        body = {"interval": self.heartbeat_interval, "pid": os.getpid(), **(payload or {})}
        beat = Message(HEARTBEAT_TOPIC + self.sender, self.seq, time.time(), self.sender, self.epoch, body)
        self.pub.send_multipart(beat.encode())
        return True

    def seconds_to_heartbeat(self) -> float:
        return max(0.0, self._next_heartbeat - time.monotonic())

    def serve_snapshots(self) -> int:
        """Answer every pending snapshot request without blocking; returns how many."""
        served = 0
        while True:
            try:
                frames = self.snapshot.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return served
            if len(frames) != 3 or frames[1] != SNAPSHOT_REQUEST:
                log.warning("bus %s: ignoring malformed snapshot request", self.sender)
                continue
            identity, prefix = frames[0], frames[2].decode(errors="replace")
            for topic in sorted(self._last):
                if topic.startswith(prefix):
                    self.snapshot.send_multipart([identity, *self._last[topic].encode()])
            end = {"seq": self.seq, "epoch": self.epoch, "sender": self.sender}
            self.snapshot.send_multipart([identity, SNAPSHOT_END, json.dumps(end).encode()])
            served += 1

    def close(self) -> None:
        self.pub.close()
        self.snapshot.close()


@dataclass
class _Upstream:
    endpoint: Endpoint
    sub: zmq.Socket
    dealer: zmq.Socket
    snapshot_pending_since: float | None = None


@dataclass
class _SenderState:
    epoch: str = ""
    seq: int = 0
    last_heard: float = 0.0
    interval: float = HEARTBEAT_INTERVAL


@dataclass
class Subscriber:
    """Subscribes to several publishers and keeps itself current (Clone pattern)."""

    ctx: zmq.Context
    endpoints: list[Endpoint]
    prefixes: list[str] = field(default_factory=lambda: [""])
    _upstreams: list[_Upstream] = field(default_factory=list, init=False)
    _senders: dict[str, _SenderState] = field(default_factory=dict, init=False)
    _topic_seq: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for endpoint in self.endpoints:
            sub = self.ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, 10000)
            for prefix in self.prefixes:
                sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
            if not any(HEARTBEAT_TOPIC.startswith(p) for p in self.prefixes):
                sub.setsockopt(zmq.SUBSCRIBE, HEARTBEAT_TOPIC.encode())
            sub.connect(endpoint.pub)
            upstream = _Upstream(endpoint, sub, self._new_dealer(endpoint))
            self._upstreams.append(upstream)
            self._request_snapshot(upstream)

    def _new_dealer(self, endpoint: Endpoint) -> zmq.Socket:
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoint.snapshot)
        return dealer

    def _request_snapshot(self, upstream: _Upstream) -> None:
        now = time.monotonic()
        if upstream.snapshot_pending_since is not None:
            if now - upstream.snapshot_pending_since < SNAPSHOT_TIMEOUT:
                return
            # The publisher was gone when we asked: a fresh socket drops the stale request.
            upstream.dealer.close()
            upstream.dealer = self._new_dealer(upstream.endpoint)
        for prefix in self.prefixes:
            upstream.dealer.send_multipart([SNAPSHOT_REQUEST, prefix.encode()])
        upstream.snapshot_pending_since = now

    def sockets(self) -> list[zmq.Socket]:
        return [s for u in self._upstreams for s in (u.sub, u.dealer)]

    def poll(self, timeout: float) -> list[Message]:
        """Wait up to `timeout` seconds; return new messages (heartbeats included), oldest first."""
        poller = zmq.Poller()
        for socket in self.sockets():
            poller.register(socket, zmq.POLLIN)
        ready = dict(poller.poll(max(0, int(timeout * 1000))))
        return self.drain(ready)

    def drain(self, ready: dict | None = None) -> list[Message]:
        """Read everything waiting on this subscriber's sockets (for callers with their own poller)."""
        out: list[Message] = []
        for upstream in self._upstreams:
            if ready is None or upstream.dealer in ready:
                self._read_snapshot(upstream, out)
            if ready is None or upstream.sub in ready:
                self._read_updates(upstream, out)
        for upstream in self._upstreams:
            if upstream.snapshot_pending_since is not None and \
                    time.monotonic() - upstream.snapshot_pending_since >= SNAPSHOT_TIMEOUT:
                self._request_snapshot(upstream)
        return out

    def _read_updates(self, upstream: _Upstream, out: list[Message]) -> None:
        while True:
            try:
                frames = upstream.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            message = self._decode(frames)
            if message is None:
                continue
            if message.is_heartbeat:
                self._on_heartbeat(upstream, message)
                out.append(message)
            elif self._accept(message):
                out.append(message)

    def _read_snapshot(self, upstream: _Upstream, out: list[Message]) -> None:
        while True:
            try:
                frames = upstream.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frames and frames[0] == SNAPSHOT_END:
                end = json.loads(frames[1])
                state = self._senders.setdefault(end["sender"], _SenderState())
                if state.epoch != end["epoch"] or state.seq < end["seq"]:
                    state.epoch, state.seq = end["epoch"], end["seq"]
                state.last_heard = time.monotonic()
                upstream.snapshot_pending_since = None
                continue
            message = self._decode(frames)
            if message is not None and self._accept(message):
                out.append(message)

    def _decode(self, frames: list[bytes]) -> Message | None:
        try:
            return Message.decode(frames)
        except (ValueError, KeyError, TypeError) as error:
            log.warning("bus: dropping undecodable message: %s", error)
            return None

    def _accept(self, message: Message) -> bool:
        """Deliver a message unless a newer one of its topic from its sender was delivered."""
        key = (message.sender, message.topic)
        known = self._topic_seq.get(key)
        if known is not None and known[0] == message.epoch and known[1] >= message.seq:
            return False
        self._topic_seq[key] = (message.epoch, message.seq)
        state = self._senders.setdefault(message.sender, _SenderState())
        if state.epoch != message.epoch:
            state.epoch, state.seq = message.epoch, message.seq
        state.seq = max(state.seq, message.seq)
        state.last_heard = time.monotonic()
        return True

    def _on_heartbeat(self, upstream: _Upstream, beat: Message) -> None:
        state = self._senders.setdefault(beat.sender, _SenderState())
        state.last_heard = time.monotonic()
        state.interval = float(beat.payload.get("interval", HEARTBEAT_INTERVAL))
        if state.epoch != beat.epoch or state.seq < beat.seq:
            # A restarted publisher or a message we never got: catch up from its snapshot.
            self._request_snapshot(upstream)

    def alive(self, sender: str, now: float | None = None) -> bool:
        state = self._senders.get(sender)
        if state is None:
            return False
        now = time.monotonic() if now is None else now
        return now - state.last_heard < state.interval * HEARTBEAT_LIVENESS

    def senders(self) -> dict[str, float]:
        """Sender -> seconds since last heard."""
        now = time.monotonic()
        return {name: now - s.last_heard for name, s in self._senders.items()}

    def close(self) -> None:
        for upstream in self._upstreams:
            upstream.sub.close()
            upstream.dealer.close()

