"""CURVE on tcp:// bus endpoints (services/common/curve.py, docs/security.md), on loopback tcp.

A publisher with keys serves only the subscribers whose public certificate is in its authorized
keys directory; anyone else (no keys, a key not authorized, a wrong server key) gets nothing,
neither live messages nor a snapshot, and the publisher logs the refusal once. A non-loopback
tcp:// endpoint without keys is refused at startup unless BUS_INSECURE.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest
import zmq
import zmq.auth

from services.common import curve
from services.common.bus import Endpoint, Publisher, Subscriber
from services.common.config import Settings
from services.common.curve import BusSecurity, SecurityError, check_settings
from tests.helpers import free_port, wait_until, write_services

PROXYMATIC = [sys.executable, "-m", "services.cli"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Keys:
    central: str       # dir with central.key, central.key_secret
    node: str          # dir with node1.key, node1.key_secret
    intruder: str      # dir with intruder.key, intruder.key_secret (not authorized)
    authorized: str    # dir with node1.key

    def publisher(self) -> BusSecurity:
        return BusSecurity.from_settings(Settings(bus_secret_key=f"{self.central}/central.key_secret",
                                                  bus_authorized_keys=self.authorized))

    def subscriber(self, who: str = "node", server: str = "central") -> BusSecurity:
        name = {"node": "node1", "intruder": "intruder"}[who]
        server_key = {"central": f"{self.central}/central.key", "intruder": f"{self.intruder}/intruder.key"}[server]
        return BusSecurity.from_settings(Settings(bus_secret_key=f"{getattr(self, who)}/{name}.key_secret",
                                                  bus_server_key=server_key))

    def env(self, who: str = "node") -> dict[str, str]:
        name = {"node": "node1", "intruder": "intruder"}[who]
        return {"BUS_SECRET_KEY": f"{getattr(self, who)}/{name}.key_secret",
                "BUS_SERVER_KEY": f"{self.central}/central.key"}


@pytest.fixture
def keys(tmp_path) -> Keys:
    made = Keys(str(tmp_path / "central"), str(tmp_path / "node"), str(tmp_path / "intruder"),
                str(tmp_path / "authorized"))
    curve.keygen(made.central, "central")
    curve.keygen(made.node, "node1")
    curve.keygen(made.intruder, "intruder")
    os.makedirs(made.authorized)
    shutil.copy(f"{made.node}/node1.key", made.authorized)
    return made


class Served:
    """A publisher on loopback tcp answering snapshots and sending heartbeats from a thread."""

    def __init__(self, ctx: zmq.Context, security: BusSecurity | None):
        self.endpoint = Endpoint.parse(f"tcp://127.0.0.1:{free_port()}")
        self.publisher = Publisher(ctx, "central-test", self.endpoint, heartbeat_interval=0.1, security=security)
        self.publisher.publish("plan", {"n": 0})  # in every snapshot answer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self.publisher.snapshot.poll(20):
                self.publisher.serve_snapshots()
            self.publisher.heartbeat()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.publisher.close()


@pytest.fixture
def ctx():
    context = zmq.Context()
    opened: list = []
    yield context, opened
    for thing in opened:
        thing.close()
    curve.stop(context)
    context.term()


def received(subscriber: Subscriber, served: Served, seconds: float) -> list:
    """Every message the subscriber gets in `seconds` while the publisher publishes live."""
    got: list = []
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        served.publisher.publish("plan", {"n": n})
        got += subscriber.poll(0.05)
    return got


def refusals(caplog) -> tuple[list[str], int]:
    """(the WARNINGs of refused subscribers, how many refusals in all, repeats included)."""
    records = [r for r in caplog.records if r.name == "proxymatic.bus" and "refused a subscriber" in r.getMessage()]
    return [r.getMessage() for r in records if r.levelno == logging.WARNING], len(records)


def test_keygen_writes_the_pair_with_private_secret(tmp_path):
    target = tmp_path / "keys"
    result = subprocess.run([*PROXYMATIC, "keygen", str(target), "node1"], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    public, secret = target / "node1.key", target / "node1.key_secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(public).st_mode) == 0o644
    public_key, no_secret = zmq.auth.load_certificate(str(public))
    same_public, secret_key = zmq.auth.load_certificate(str(secret))
    assert no_secret is None and same_public == public_key and len(secret_key) == 40
    assert zmq.curve_public(secret_key) == public_key

    again = subprocess.run([*PROXYMATIC, "keygen", str(target), "node1"], capture_output=True, text=True,
                           timeout=60, cwd=REPO)
    assert again.returncode == 1 and "--force" in again.stderr
    assert zmq.auth.load_certificate(str(public))[0] == public_key  # untouched

    forced = subprocess.run([*PROXYMATIC, "keygen", str(target), "node1", "--force"], capture_output=True,
                            text=True, timeout=60, cwd=REPO)
    assert forced.returncode == 0, forced.stderr
    assert zmq.auth.load_certificate(str(public))[0] != public_key
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    with pytest.raises(SecurityError, match="plain file name"):
        curve.keygen(str(target), "../elsewhere")


@pytest.mark.parametrize("who", ["node", "central"])  # the publisher accepts its own key too
def test_authorized_subscriber_gets_snapshot_and_live_messages(keys, ctx, caplog, who):
    context, opened = ctx
    served = Served(context, keys.publisher())
    opened.append(served)
    security = keys.subscriber() if who == "node" else BusSecurity.from_settings(Settings(
        bus_secret_key=f"{keys.central}/central.key_secret", bus_server_key=f"{keys.central}/central.key"))
    subscriber = Subscriber(context, [served.endpoint], ["plan"], security=security)
    opened.insert(0, subscriber)
    got: list = []
    wait_until(lambda: got.extend(subscriber.poll(0.05)) or subscriber.snapshot_complete(),
               message="the snapshot")
    assert [m.payload for m in got if m.topic == "plan"] == [{"n": 0}]  # from the snapshot
    served.publisher.publish("plan", {"n": 99})
    wait_until(lambda: any(m.payload.get("n") == 99 for m in subscriber.poll(0.05) if m.topic == "plan"),
               message="a live message")
    assert refusals(caplog)[0] == []


@pytest.mark.parametrize("who", ["no keys", "key not authorized", "wrong server key"])
def test_refused_subscriber_gets_nothing_and_is_logged_once(keys, ctx, caplog, who):
    caplog.set_level(logging.DEBUG, logger="proxymatic.bus")
    context, opened = ctx
    served = Served(context, keys.publisher())
    opened.append(served)
    security = {"no keys": None, "key not authorized": keys.subscriber("intruder"),
                "wrong server key": keys.subscriber("node", server="intruder")}[who]
    for attempt in range(1, 4):  # several subscribers from the same peer
        subscriber = Subscriber(context, [served.endpoint], [""], security=security)
        try:
            # Each subscriber's handshakes (its SUB and its snapshot DEALER) reach the publisher...
            wait_until(lambda: refusals(caplog)[1] >= 2 * attempt, message=f"attempt {attempt} refused")
            # ...and it gets nothing: no live message, no heartbeat, no snapshot.
            assert received(subscriber, served, 0.3) == []
            assert not subscriber.snapshot_complete()
        finally:
            subscriber.close()
    warnings, _ = refusals(caplog)
    assert len(warnings) == 1, warnings
    expected = {"no keys": f"on {served.endpoint.pub}: it has no CURVE keys",
                "key not authorized": "from 127.0.0.1 (key %s): not in BUS_AUTHORIZED_KEYS"
                                      % zmq.auth.load_certificate(f"{keys.intruder}/intruder.key")[0].decode(),
                "wrong server key": "its BUS_SERVER_KEY is not this publisher's public certificate"}[who]
    assert expected in warnings[0]


def test_ipc_endpoints_stay_as_they_are(keys, ctx, tmp_path):
    """Keys apply to tcp:// only: on ipc://, file permissions protect the bus."""
    context, opened = ctx
    endpoint = Endpoint.parse(f"ipc://{tmp_path}/bus/planner.pub")
    publisher = Publisher(context, "central-test", endpoint, security=keys.publisher())
    opened.append(publisher)
    publisher.publish("plan", {"n": 0})
    subscriber = Subscriber(context, [endpoint], ["plan"])  # no keys
    opened.insert(0, subscriber)

    def synced() -> bool:
        publisher.serve_snapshots()
        subscriber.poll(0.02)
        return subscriber.snapshot_complete()
    wait_until(synced, message="the snapshot over ipc without keys")
    assert not publisher.pub.curve_server and curve._guards.get(id(context)) is None


def test_a_key_authorized_later_is_served_without_restarts(keys, ctx, caplog):
    """The authorized directory is read again on a handshake, and a refused subscriber tries
    again with fresh sockets (ZeroMQ never retries a refused handshake)."""
    context, opened = ctx
    served = Served(context, keys.publisher())
    opened.append(served)
    subscriber = Subscriber(context, [served.endpoint], ["plan"], security=keys.subscriber("intruder"))
    opened.insert(0, subscriber)
    wait_until(lambda: refusals(caplog)[0], message="the refusal")
    assert received(subscriber, served, 0.3) == []
    shutil.copy(f"{keys.intruder}/intruder.key", keys.authorized)
    got: list = []
    wait_until(lambda: got.extend(subscriber.poll(0.05)) or subscriber.snapshot_complete(), timeout=15,
               message="the snapshot once authorized")
    served.publisher.publish("plan", {"n": 7})
    wait_until(lambda: any(m.payload.get("n") == 7 for m in subscriber.poll(0.05) if m.topic == "plan"),
               timeout=15, message="live messages once authorized")


def test_startup_check_names_the_missing_options(keys):
    def check(command, **values):
        return check_settings(Settings(**values), command)

    with pytest.raises(SecurityError, match="COLLECTOR_BUS tcp://0.0.0.0:7000 is not a loopback address: "
                                            "set BUS_SECRET_KEY and BUS_AUTHORIZED_KEYS"):
        check("collector", collector_bus="tcp://0.0.0.0:7000")
    with pytest.raises(SecurityError, match="set BUS_AUTHORIZED_KEYS"):
        check("planner", planner_bus="tcp://10.0.0.1:7100", bus_secret_key=f"{keys.central}/central.key_secret")
    with pytest.raises(SecurityError, match="PLANNER_BUS tcp://10.0.0.1:7100 .*set BUS_SECRET_KEY and BUS_SERVER_KEY"):
        check("run", role="node", planner_bus="tcp://10.0.0.1:7100")
    with pytest.raises(SecurityError, match="--bus tcp://central:7100 .*BUS_SERVER_KEY"):
        check_settings(Settings(bus_secret_key=f"{keys.node}/node1.key_secret"), "tap", ["tcp://central:7100"])
    with pytest.raises(SecurityError, match="BUS_SECRET_KEY: .*not a CURVE secret certificate"):
        check("collector", bus_secret_key=f"{keys.central}/central.key")  # the public one by mistake
    with pytest.raises(SecurityError, match="BUS_AUTHORIZED_KEYS: .* is not a directory"):
        check("collector", bus_authorized_keys=f"{keys.central}/nowhere")
    # Loopback and ipc need no keys; BUS_INSECURE allows anything; keys make it pass.
    check("run", collector_bus="tcp://127.0.0.1:7000", planner_bus="tcp://[::1]:7100", applier_bus="tcp://localhost:7200")
    check("run")
    check("run", role="node", planner_bus="tcp://10.0.0.1:7100", bus_insecure=True)
    check("run", role="node", planner_bus="tcp://10.0.0.1:7100", **{"bus_secret_key": f"{keys.node}/node1.key_secret",
                                                                    "bus_server_key": f"{keys.central}/central.key"})
    check("collector", collector_bus="tcp://0.0.0.0:7000", bus_secret_key=f"{keys.central}/central.key_secret",
          bus_authorized_keys=keys.authorized)


def test_stage_refuses_a_public_endpoint_without_keys_and_starts_with_bus_insecure(tmp_path):
    services = str(tmp_path / "services.json")
    write_services(services, [])
    port = free_port()
    argv = [*PROXYMATIC, "collector", "--services-file", services, "--run-dir", str(tmp_path / "run"),
            "--collector-bus", f"tcp://0.0.0.0:{port}"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert refused.returncode == 1
    assert f"COLLECTOR_BUS tcp://0.0.0.0:{port} is not a loopback address: set BUS_SECRET_KEY and " \
           "BUS_AUTHORIZED_KEYS" in refused.stderr and "BUS_INSECURE" in refused.stderr

    started = subprocess.Popen([*argv, "--bus-insecure"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, cwd=REPO, env=env)
    try:
        def bound() -> bool:
            assert started.poll() is None, started.stderr.read()
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0
        wait_until(bound, timeout=30, message="the collector bound with --bus-insecure")
    finally:
        started.terminate()
        try:
            started.wait(timeout=10)
        except subprocess.TimeoutExpired:
            started.kill()
            started.wait(timeout=10)
        started.stderr.close()


def test_tap_reads_a_tcp_bus_with_keys(keys, ctx):
    context, opened = ctx
    served = Served(context, keys.publisher())
    opened.append(served)
    served.publisher.publish("source.file", {"schema": 2, "source": "file", "state": "ok", "count": 0, "hash": "0"})
    command = [*PROXYMATIC, "tap", "--bus", served.endpoint.pub, "--topic", "source.", "--count", "1"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RUN_DIR": "/tmp/proxymatic-test-curve"}
    refused = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=REPO, env={**env, **keys.env("intruder")})
    tapping = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=REPO, env={**env, **keys.env("node")})
    try:
        out, err = tapping.communicate(timeout=30)
        assert tapping.returncode == 0, err
        assert "source.file" in out and "central-test" in out
        # The refused tap shows nothing; it says why on stderr.
        with pytest.raises(subprocess.TimeoutExpired):
            refused.communicate(timeout=2)
    finally:
        for process in (tapping, refused):
            if process.poll() is None:
                process.terminate()
            out, err = process.communicate(timeout=10)
    assert out == "" and "refused this subscriber's key" in err  # the refused tap's
