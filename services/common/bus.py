"""The ZeroMQ bus: sequenced PUB/SUB with the Clone pattern (ZeroMQ Guide, chapter 5).

Each publishing stage binds a PUB socket and, next to it, a ROUTER "snapshot" socket. Every
message carries a full state for its topic (never a delta), so the publisher keeps the last
message of each topic and a late subscriber asks the snapshot socket for them.

A subscriber subscribes first, then requests a snapshot, and drops any message it already has
a newer sequence number for. Heartbeats carry the publisher's current sequence number and
epoch (a per-process id): a subscriber that sees a number it never received, or a new epoch
(a restarted publisher), asks for a snapshot again. So a message lost while a socket was
reconnecting, or dropped at a high-water mark for a slow subscriber, costs at most one
heartbeat interval. Anything that is not a well-formed message of this bus version is logged,
counted (`Subscriber.dropped`) and dropped, never raised. Protocol: docs/bus.md.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import orjson
import zmq

from services.common import curve
from services.common.curve import BusSecurity

log = logging.getLogger(__name__)

# The envelope's version ("v"): a message of any other version is dropped, never guessed at.
BUS_VERSION = 1
HEARTBEAT_TOPIC = "heartbeat."
HEARTBEAT_INTERVAL = 1.0
# A heartbeat's own interval is believed only within these bounds (a hostile or broken
# publisher must not make itself immortal or make the subscriber ask for snapshots nonstop).
HEARTBEAT_INTERVAL_RANGE = (0.01, 60.0)
# For its first seconds a publisher beats faster: subscribers that reconnect to a restarted
# publisher (ZeroMQ retries every 100 ms) miss what it sent before they were back, and learn of
# its new epoch (and ask for its snapshot) from the next heartbeat, not a second later.
STARTUP_HEARTBEAT_INTERVAL = 0.1
STARTUP_SECONDS = 3.0
# A publisher is considered dead after this many missed heartbeats.
HEARTBEAT_LIVENESS = 3
SNAPSHOT_REQUEST = b"SNAPSHOT"
SNAPSHOT_END = b"END"
SNAPSHOT_TIMEOUT = 2.0
# Messages queued per subscriber (ZeroMQ counts messages, not bytes). Messages are one key of a
# keyed state (~1 kB, services/common/keyed.py) or a small summary, so a stalled subscriber
# costs its publisher at most ~1 MB; beyond that ZeroMQ drops that subscriber's messages, and
# the heartbeat's seq (or a summary's hash) makes it ask for a snapshot once it reads again.
QUEUE_HWM = 1000
# A snapshot answer is one message per topic (every key of every keyed state, tombstones
# included) plus END; an answer that does not fit is not sent at all (the subscriber asks again
# after SNAPSHOT_TIMEOUT), so END never follows a partial answer. 10,000 apps with two ports
# each are ~20,000 keys (~20 MB held at most for a requester that does not read).
SNAPSHOT_HWM = 50_000
# A change of more keys than this in one keyed state (a cold start: the first plan of 10,000
# services) is not sent live, where it would overflow a subscriber's QUEUE_HWM and cost it a
# resync: its key messages are kept for snapshot answers only (Publisher.keep) and the summary
# goes out marked `catch_up`, on which a subscriber takes that state's snapshot (see docs/bus.md,
# Bulk changes). Half the high-water mark: a change below it fits a reading subscriber's queue.
BULK_KEYS = QUEUE_HWM // 2
# Live messages of a state under catch-up that a subscriber holds until its snapshot arrives;
# beyond that it drops them and resyncs the state when the snapshot comes.
CATCH_UP_BUFFER = 10 * QUEUE_HWM


class BusError(ValueError):
    """Frames that are not a message of this bus; `sender` when the body named one."""

    def __init__(self, reason: str, topic: str = "?", sender: str = "?"):
        super().__init__(reason)
        self.topic, self.sender = topic, sender


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {type(value).__name__}")
    return value


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r:.40}")
    return value


@dataclass(frozen=True)
class Message:
    topic: str
    seq: int
    ts: float
    sender: str
    epoch: str
    payload: dict
    # A live summary whose state's key messages were kept for snapshots only (a bulk change):
    # the subscriber takes the state's snapshot instead of delivering it (docs/bus.md).
    catch_up: bool = False

    def encode(self) -> list[bytes]:
        body = {"v": BUS_VERSION, "seq": self.seq, "ts": self.ts, "sender": self.sender,
                "epoch": self.epoch, "payload": self.payload}
        if self.catch_up:
            body["catch_up"] = True
        # orjson: a full snapshot of 1,000 services is ~0.5 MB; the stdlib takes 10 ms a hop for it.
        return [self.topic.encode(), orjson.dumps(body, option=orjson.OPT_SORT_KEYS)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> "Message":
        """The message in `frames`; BusError (saying why) for anything else."""
        if len(frames) != 2:
            raise BusError(f"expected 2 frames, got {len(frames)}",
                           frames[0][:80].decode(errors="replace") if frames else "?")
        try:
            topic = frames[0].decode()
        except UnicodeDecodeError:
            raise BusError("topic is not UTF-8", topic=repr(frames[0][:40])) from None
        try:
            body = orjson.loads(frames[1])
        except orjson.JSONDecodeError as error:
            raise BusError(f"body is not JSON: {error}", topic) from None
        if not isinstance(body, dict):
            raise BusError(f"body must be an object, got {type(body).__name__}", topic)
        sender = body.get("sender") if isinstance(body.get("sender"), str) else "?"
        if body.get("v") != BUS_VERSION:
            raise BusError(f"unknown bus version {body.get('v')!r:.20} (this is {BUS_VERSION})", topic, sender)
        try:
            ts = body.get("ts")
            if isinstance(ts, bool) or not isinstance(ts, (int, float)):
                raise ValueError(f"ts must be a number, got {ts!r:.40}")
            payload = body.get("payload")
            if not isinstance(payload, dict):
                raise ValueError(f"payload must be an object, got {type(payload).__name__}")
            return cls(topic=topic, seq=_count(body.get("seq"), "seq"), ts=float(ts),
                       sender=_text(body.get("sender"), "sender"), epoch=_text(body.get("epoch"), "epoch"),
                       payload=payload, catch_up=body.get("catch_up") is True)
        except ValueError as error:
            raise BusError(str(error), topic, sender) from None

    @property
    def is_heartbeat(self) -> bool:
        return self.topic.startswith(HEARTBEAT_TOPIC)


@dataclass(frozen=True)
class SnapshotEnd:
    """The END marker closing a snapshot answer: the publisher's seq and epoch at that time."""

    sender: str
    epoch: str
    seq: int

    def encode(self) -> list[bytes]:
        return [SNAPSHOT_END, json.dumps({"v": BUS_VERSION, "seq": self.seq, "epoch": self.epoch,
                                          "sender": self.sender}).encode()]

    @classmethod
    def decode(cls, frames: list[bytes]) -> "SnapshotEnd":
        if len(frames) != 2:
            raise BusError(f"END: expected 2 frames, got {len(frames)}", "END")
        try:
            body = orjson.loads(frames[1])
            if not isinstance(body, dict):
                raise ValueError("END body must be an object")
            if body.get("v") != BUS_VERSION:
                raise ValueError(f"END: unknown bus version {body.get('v')!r:.20}")
            return cls(_text(body.get("sender"), "sender"), _text(body.get("epoch"), "epoch"),
                       _count(body.get("seq"), "seq"))
        except ValueError as error:  # orjson.JSONDecodeError is a ValueError
            raise BusError(str(error), "END") from None


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
        """What the owner binds: `tcp://host:port` listens on that host's address only
        (`tcp://0.0.0.0:port` or `tcp://*:port` on every interface); ipc paths are files."""
        if address.startswith("tcp://"):
            host, _, port = address[len("tcp://"):].rpartition(":")
            return f"tcp://{'*' if host in ('*', '0.0.0.0') else host}:{port}"
        return address


def _ensure_ipc_dir(address: str) -> None:
    if address.startswith("ipc://"):
        os.makedirs(os.path.dirname(address[len("ipc://"):]) or ".", exist_ok=True)


def _socket(ctx: zmq.Context, kind: int, address: str) -> zmq.Socket:
    socket = ctx.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    if address.startswith("tcp://["):
        socket.setsockopt(zmq.IPV6, 1)
    return socket


def snapshot_order(topic: str) -> tuple:
    """`plan:...` keys, then `plan`; topics otherwise in name order."""
    prefix, separator, key = topic.partition(":")
    return (prefix, 0 if separator else 1, key)


class Publisher:
    """Publishes full-state messages and answers snapshot requests for them.

    Thread-safe: every use of its sockets and of seq holds one lock, so a heartbeat thread
    (see Heartbeats) may send while the owner publishes."""

    def __init__(self, ctx: zmq.Context, sender: str, endpoint: Endpoint,
                 heartbeat_interval: float = HEARTBEAT_INTERVAL, send_hwm: int = QUEUE_HWM,
                 security: BusSecurity | None = None):
        """`security`: CURVE on tcp:// endpoints (services/common/curve.py); None: none."""
        self.sender = sender
        self.epoch = uuid.uuid4().hex[:12]
        self.seq = 0
        self.heartbeat_interval = heartbeat_interval
        self._last: dict[str, Message] = {}
        self._next_heartbeat = 0.0
        self._fast_until = time.monotonic() + STARTUP_SECONDS
        self._lock = threading.Lock()
        for address in (endpoint.pub, endpoint.snapshot):
            _ensure_ipc_dir(address)
        self.pub = _socket(ctx, zmq.PUB, endpoint.pub)
        self.pub.setsockopt(zmq.SNDHWM, send_hwm)
        self.snapshot = _socket(ctx, zmq.ROUTER, endpoint.snapshot)
        self.snapshot.setsockopt(zmq.SNDHWM, SNAPSHOT_HWM)
        # An answer that does not fit raises instead of vanishing part-way (see SNAPSHOT_HWM).
        self.snapshot.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            for socket, address in ((self.pub, endpoint.pub), (self.snapshot, endpoint.snapshot)):
                curve.apply_server(ctx, socket, address, security, endpoint.pub)
            self.pub.bind(endpoint.bind_form(endpoint.pub))
            self.snapshot.bind(endpoint.bind_form(endpoint.snapshot))
        except zmq.ZMQError:
            self.pub.close()
            self.snapshot.close()
            raise

    def publish(self, topic: str, payload: dict, catch_up: bool = False) -> Message:
        """Send a message live and keep it for snapshot answers. `catch_up`: the message is the
        summary of a keyed state whose key messages went to `keep` only; live subscribers take
        the state's snapshot on it (the kept copy, for snapshot answers, is unmarked)."""
        with self._lock:
            self.seq += 1
            message = Message(topic, self.seq, time.time(), self.sender, self.epoch, payload, catch_up)
            self._last[topic] = replace(message, catch_up=False) if catch_up else message
            self._send(message.encode())
        return message

    def keep(self, topic: str, payload: dict) -> Message:
        """Take a seq and keep the message as its topic's newest for snapshot answers, without
        sending it live: the key messages of a bulk change (BULK_KEYS), announced by a summary
        published with `catch_up`."""
        with self._lock:
            self.seq += 1
            message = Message(topic, self.seq, time.time(), self.sender, self.epoch, payload)
            self._last[topic] = message
        return message

    def heartbeat(self, payload: dict | None = None, now: float | None = None) -> bool:
        """Send a heartbeat if one is due. Heartbeats carry the current seq without taking one."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if now < self._next_heartbeat:
                return False
            self._next_heartbeat = now + (min(self.heartbeat_interval, STARTUP_HEARTBEAT_INTERVAL)
                                          if now < self._fast_until else self.heartbeat_interval)
            body = {"interval": self.heartbeat_interval, "pid": os.getpid(), **(payload or {})}
            beat = Message(HEARTBEAT_TOPIC + self.sender, self.seq, time.time(), self.sender, self.epoch, body)
            self._send(beat.encode())
        return True

    def send_frames(self, frames: list[bytes]) -> None:
        """Send raw frames on the PUB socket (tools and tests that speak the wire form)."""
        with self._lock:
            self._send(frames)

    def _send(self, frames: list[bytes]) -> None:
        # With high-water marks this small, the PUB socket must first take in the credit its
        # peers returned for what they read (commands in its mailbox, which a send processes
        # only now and then): otherwise it counts its pipes as full and drops a message sent at
        # a trickle. Reading EVENTS processes them (a microsecond).
        self.pub.getsockopt(zmq.EVENTS)
        self.pub.send_multipart(frames)

    def seconds_to_heartbeat(self) -> float:
        return max(0.0, self._next_heartbeat - time.monotonic())

    def heartbeat_due(self) -> None:
        """Make the next heartbeat() send at once."""
        with self._lock:
            self._next_heartbeat = 0.0

    def serve_snapshots(self) -> int:
        """Answer every pending snapshot request without blocking; returns how many."""
        served = 0
        with self._lock:
            while True:
                try:
                    frames = self.snapshot.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return served
                if len(frames) != 3 or frames[1] != SNAPSHOT_REQUEST:
                    log.warning("bus %s: ignoring malformed snapshot request (%d frames)", self.sender, len(frames))
                    continue
                identity, prefix = frames[0], frames[2].decode(errors="replace")
                # A keyed state's key messages (`plan:1234/tcp`) before its summary (`plan`): a
                # subscriber checks its mirror against the summary's hash when it arrives.
                topics = sorted((t for t in self._last if t.startswith(prefix)), key=snapshot_order)
                answer = [self._last[topic].encode() for topic in topics]
                answer.append(SnapshotEnd(self.sender, self.epoch, self.seq).encode())
                try:
                    for frames_out in answer:
                        self.snapshot.send_multipart([identity, *frames_out], zmq.NOBLOCK)
                except zmq.ZMQError as error:
                    # Gone (EHOSTUNREACH) or not reading (EAGAIN): no END, so it asks again.
                    log.warning("bus %s: snapshot answer not sent: %s", self.sender, error)
                    continue
                served += 1

    def close(self) -> None:
        with self._lock:
            self.pub.close()
            self.snapshot.close()


class Heartbeats:
    """Sends a publisher's heartbeats from a thread of their own, so a stage blocked in a long
    call (a proxy reload) still says it is alive. `payload` is called on that thread: it must
    only read plain values."""

    def __init__(self, publisher: Publisher, payload: Callable[[], dict]):
        self.publisher, self.payload = publisher, payload
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{publisher.sender}", daemon=True)

    def start(self) -> "Heartbeats":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.publisher.heartbeat(self.payload())
            except Exception:  # a closed socket at shutdown, or a payload bug: never silent
                if self._stop.is_set():
                    return
                log.exception("bus %s: heartbeat failed", self.publisher.sender)
            self._wake.wait(max(0.01, self.publisher.seconds_to_heartbeat()))
            self._wake.clear()

    def beat_now(self) -> None:
        """A heartbeat at once (after a result: it carries the new state and seq right away)."""
        self.publisher.heartbeat_due()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


@dataclass(eq=False)
class _CatchUp:
    """A keyed state (`prefix`, one sender's) whose bulk change is being taken from a snapshot:
    its live messages wait in `held` until the snapshot's END, then go through as usual (those
    not newer than the snapshot's are dropped)."""

    sender: str
    prefix: str
    held: list = field(default_factory=list)
    overflowed: bool = False

    def covers(self, message: "Message") -> bool:
        topic = message.topic
        return message.sender == self.sender and (
            topic == self.prefix or (topic.startswith(self.prefix) and topic[len(self.prefix):].startswith(":")))


_FULL = "full"  # the END of one prefix of a whole snapshot request


@dataclass
class _Upstream:
    endpoint: Endpoint
    sub: zmq.Socket
    dealer: zmq.Socket
    snapshot_pending_since: float | None = None
    # When the SUB socket last read anything (heartbeats included): a CURVE handshake refused
    # once is never retried by ZeroMQ, so a secured SUB silent past a snapshot timeout is renewed.
    sub_heard: float = field(default_factory=time.monotonic)
    # What each END still to come closes, in request order (one END per request): _FULL for
    # each prefix of a whole snapshot request, or a _CatchUp.
    awaited: deque = field(default_factory=deque)
    catch_ups: list = field(default_factory=list)
    # A whole snapshot (up to its END for every prefix) arrived since this subscriber started.
    synced: bool = False


@dataclass
class _SenderState:
    epoch: str = ""
    seq: int = 0
    last_heard: float = 0.0
    interval: float = HEARTBEAT_INTERVAL


def heartbeat_interval(payload: dict) -> float:
    """The interval a heartbeat announces, if it is a sane number of seconds."""
    value = payload.get("interval")
    low, high = HEARTBEAT_INTERVAL_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return HEARTBEAT_INTERVAL
    return min(max(float(value), low), high)


@dataclass
class Subscriber:
    """Subscribes to several publishers and keeps itself current (Clone pattern)."""

    ctx: zmq.Context
    endpoints: list[Endpoint]
    prefixes: list[str] = field(default_factory=lambda: [""])
    receive_hwm: int = QUEUE_HWM
    # CURVE on tcp:// endpoints (services/common/curve.py); None: none.
    security: BusSecurity | None = None
    # Messages dropped as malformed, of another bus version, or refused by the stage (drop()).
    dropped: int = field(default=0, init=False)
    # Snapshots of one keyed state taken for a bulk change (a summary marked `catch_up`).
    catch_ups: int = field(default=0, init=False)
    _upstreams: list[_Upstream] = field(default_factory=list, init=False)
    _senders: dict[str, _SenderState] = field(default_factory=dict, init=False)
    _topic_seq: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for endpoint in self.endpoints:
            upstream = _Upstream(endpoint, self._new_sub(endpoint), self._new_dealer(endpoint))
            self._upstreams.append(upstream)
            self._request_snapshot(upstream)

    def _new_sub(self, endpoint: Endpoint) -> zmq.Socket:
        sub = _socket(self.ctx, zmq.SUB, endpoint.pub)
        sub.setsockopt(zmq.RCVHWM, self.receive_hwm)
        for prefix in self.prefixes:
            sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        if not any(HEARTBEAT_TOPIC.startswith(p) for p in self.prefixes):
            sub.setsockopt(zmq.SUBSCRIBE, HEARTBEAT_TOPIC.encode())
        curve.apply_client(self.ctx, sub, endpoint.pub, self.security, endpoint.pub)
        sub.connect(endpoint.pub)
        return sub

    def _new_dealer(self, endpoint: Endpoint) -> zmq.Socket:
        dealer = _socket(self.ctx, zmq.DEALER, endpoint.snapshot)
        curve.apply_client(self.ctx, dealer, endpoint.snapshot, self.security, endpoint.pub)
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
            self._renew_refused_sub(upstream, now)
            upstream.awaited.clear()
            for catch_up in upstream.catch_ups:  # their answers are lost with the old socket
                upstream.dealer.send_multipart([SNAPSHOT_REQUEST, catch_up.prefix.encode()])
                upstream.awaited.append(catch_up)
        for prefix in self.prefixes:
            upstream.dealer.send_multipart([SNAPSHOT_REQUEST, prefix.encode()])
            upstream.awaited.append(_FULL)
        upstream.snapshot_pending_since = now

    def _renew_refused_sub(self, upstream: _Upstream, now: float) -> None:
        """A secured SUB that has heard nothing (not even a heartbeat) since the last snapshot
        timeout: its handshake may have been refused (a key authorized since), which ZeroMQ
        never retries. A fresh socket tries again; the snapshot asked for next covers the gap."""
        if curve.secured(upstream.endpoint.pub, self.security) and now - upstream.sub_heard >= SNAPSHOT_TIMEOUT:
            upstream.sub.close()
            upstream.sub = self._new_sub(upstream.endpoint)
            upstream.sub_heard = now

    def _start_catch_up(self, upstream: _Upstream, summary: Message) -> None:
        """A live summary marked `catch_up`: ask for its state's snapshot (which has the summary
        too) and hold that state's live messages until it arrives."""
        catch_up = _CatchUp(summary.sender, summary.topic)
        upstream.catch_ups.append(catch_up)
        upstream.dealer.send_multipart([SNAPSHOT_REQUEST, summary.topic.encode()])
        upstream.awaited.append(catch_up)
        if upstream.snapshot_pending_since is None:
            upstream.snapshot_pending_since = time.monotonic()
        self.catch_ups += 1
        self._heard(summary)

    def _heard(self, message: Message) -> None:
        """A data message not delivered yet (held for a catch-up): its seq is known, so a
        heartbeat showing it is no gap."""
        state = self._senders.setdefault(message.sender, _SenderState())
        if state.epoch == message.epoch:
            state.seq = max(state.seq, message.seq)
        state.last_heard = time.monotonic()

    def sockets(self) -> list[zmq.Socket]:
        return [s for u in self._upstreams for s in (u.sub, u.dealer)]

    def poller(self, *extra: zmq.Socket) -> zmq.Poller:
        """A poller over this subscriber's sockets and `extra`. Build one for every wait: a
        snapshot request that timed out replaces the snapshot socket, and a poller holding the
        closed one would spin and never see the answer."""
        poller = zmq.Poller()
        for socket in (*self.sockets(), *extra):
            poller.register(socket, zmq.POLLIN)
        return poller

    def resync(self, prefix: str) -> None:
        """Ask every upstream for a new snapshot and accept its messages under `prefix` even if
        not newer than what was delivered: for a subscriber whose own copy disagrees with the
        publisher's hash (services/common/keyed.py), which must be rebuilt whole."""
        for topic_key in [k for k in self._topic_seq if k[1].startswith(prefix)]:
            del self._topic_seq[topic_key]
        for upstream in self._upstreams:
            upstream.snapshot_pending_since = None  # a pending request may predate the loss
            self._request_snapshot(upstream)

    def snapshot_complete(self, endpoint: Endpoint | None = None) -> bool:
        """Whether a whole snapshot (every topic, up to END) arrived from this upstream (from
        every upstream when None) since this subscriber started: before that, what it
        delivered may be only the part of the publisher's state that changed lately."""
        return all(u.synced for u in self._upstreams if endpoint is None or u.endpoint == endpoint)

    def poll(self, timeout: float) -> list[Message]:
        """Wait up to `timeout` seconds; return new messages (heartbeats included), oldest first."""
        ready = dict(self.poller().poll(max(0, int(timeout * 1000))))
        return self.drain(ready)

    def drain(self, ready: dict | None = None) -> list[Message]:
        """Read everything waiting on this subscriber's sockets (for callers with their own poller).
        A snapshot is read before updates, so once snapshot_complete() is true every message
        of that snapshot has been returned."""
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

    def drop(self, message: Message | None, reason: str, upstream: Endpoint | None = None,
             topic: str = "?", sender: str = "?") -> None:
        """Log and count a message that is not used: malformed here, or refused by the stage."""
        if message is not None:
            topic, sender = message.topic, message.sender
        self.dropped += 1
        log.warning("bus: dropped message on topic %r from %s%s: %s", topic[:80], sender[:80],
                    f" (via {upstream.pub})" if upstream else "", reason[:300])

    def _read_updates(self, upstream: _Upstream, out: list[Message]) -> None:
        while True:
            try:
                frames = upstream.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            upstream.sub_heard = time.monotonic()
            message = self._decode(upstream, frames)
            if message is None:
                continue
            if message.is_heartbeat:
                self._on_heartbeat(upstream, message)
                out.append(message)
            else:
                self._live(upstream, message, out)

    def _live(self, upstream: _Upstream, message: Message, out: list[Message]) -> None:
        """A live data message: held while its state catches up, a catch-up started by a
        `catch_up` summary, or delivered if newer than what was."""
        for catch_up in upstream.catch_ups:
            if catch_up.covers(message):
                if len(catch_up.held) < CATCH_UP_BUFFER:
                    catch_up.held.append(message)
                    self._heard(message)
                else:
                    catch_up.overflowed = True
                return
        if message.catch_up:
            self._start_catch_up(upstream, message)
        elif self._accept(message):
            out.append(message)

    def _read_snapshot(self, upstream: _Upstream, out: list[Message]) -> None:
        while True:
            try:
                frames = upstream.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frames and frames[0] == SNAPSHOT_END:
                self._on_snapshot_end(upstream, frames, out)
                continue
            message = self._decode(upstream, frames)
            if message is not None and self._accept(message):
                out.append(message)

    def _on_snapshot_end(self, upstream: _Upstream, frames: list[bytes], out: list[Message]) -> None:
        try:
            end = SnapshotEnd.decode(frames)
        except BusError as error:
            self.drop(None, str(error), upstream.endpoint, topic="END")
            return
        state = self._senders.setdefault(end.sender, _SenderState())
        if state.epoch != end.epoch or state.seq < end.seq:
            state.epoch, state.seq = end.epoch, end.seq
        state.last_heard = time.monotonic()
        closed = upstream.awaited.popleft() if upstream.awaited else _FULL
        if not upstream.awaited:
            upstream.snapshot_pending_since = None
        if isinstance(closed, _CatchUp):
            upstream.catch_ups.remove(closed)
            for message in closed.held:  # what came live meanwhile, in order, if newer
                self._live(upstream, message, out)
            if closed.overflowed:  # live messages lost meanwhile: take the state again whole
                self.resync(closed.prefix)
            return
        if _FULL in upstream.awaited:
            return  # the answer for another prefix is still to come
        if not upstream.synced:
            log.debug("bus: snapshot from %s complete (seq %d)", end.sender, end.seq)
        upstream.synced = True

    def _decode(self, upstream: _Upstream, frames: list[bytes]) -> Message | None:
        try:
            return Message.decode(frames)
        except BusError as error:
            self.drop(None, str(error), upstream.endpoint, topic=error.topic, sender=error.sender)
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
        state.interval = heartbeat_interval(beat.payload)
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
