"""RegistratorSource against a real etcd (v2 API): follows changes, survives outages."""
from __future__ import annotations

import threading

import pytest
import requests

from services.collector.registrator import RegistratorSource
from services.collector.source import SourceError
from services.common.config import Settings
from tests.etcd_server import EtcdServer, unique_prefix
from tests.helpers import free_port, wait_until

FAST = dict(watch_timeout=2.0, read_timeout=5.0, connect_timeout=0.5, backoff_start=0.05, backoff_max=0.3)


@pytest.fixture
def make_source():
    sources: list[RegistratorSource] = []

    def make(url: str, **tuning) -> RegistratorSource:
        source = RegistratorSource(Settings(registrator=url, refresh_interval=60),
                                   **{**FAST, **tuning})
        sources.append(source)
        return source

    yield make
    for source in sources:
        source.close()


def backends(source: RegistratorSource, port: int, protocol: str = "tcp") -> list[tuple[str, int]]:
    for service in source.current().services:
        if (service.port, service.protocol) == (port, protocol):
            return [(s.ip, s.port) for s in service.servers]
    return []


def degraded(source: RegistratorSource) -> str:
    try:
        source.current()
    except SourceError as error:
        return str(error)
    return ""


def test_follows_adds_removes_and_ttl_expiry(etcd_server, make_source):
    prefix = unique_prefix("follow")
    client = etcd_server.client()
    source = make_source(etcd_server.url(prefix))
    assert source.current().services == ()  # a missing prefix is an empty state, not an error

    client.write(f"{prefix}/web/h1:web.0:80", "127.0.0.1:31001")
    source.wait_for_change(10, threading.Event())
    wait_until(lambda: backends(source, 80) == [("127.0.0.1", 31001)], message="first backend")

    client.write(f"{prefix}/web/h2:web.0:80", "localhost:31002")  # a host name resolves
    client.write(f"{prefix}/dns/h1:dns.0:53:udp", "127.0.0.1:10053")
    client.write(f"{prefix}/web@8080/h1:web.1:80", "127.0.0.1:31003")
    client.write(f"{prefix}/web/h3:web.2:80", "127.0.0.1:31004", ttl=1)
    wait_until(lambda: len(backends(source, 80)) == 3 and backends(source, 53, "udp") == [("127.0.0.1", 10053)]
               and backends(source, 8080) == [("127.0.0.1", 31003)], message="all entries")
    services = {s.key: s for s in source.current().services}
    assert services["53/udp"].name == "dns" and services["8080/tcp"].name == "web"
    assert {s.source for s in services.values()} == {"registrator"}
    assert {s.mode for s in services.values()} == {"tcp"}

    wait_until(lambda: ("127.0.0.1", 31004) not in backends(source, 80), timeout=15, message="TTL expiry")
    client.delete(f"{prefix}/web/h1:web.0:80")
    wait_until(lambda: backends(source, 80) == [("127.0.0.1", 31002)], message="delete")
    client.delete(f"{prefix}/web", recursive=True, dir=True)
    wait_until(lambda: backends(source, 80) == [], message="directory delete")
    client.write(f"{prefix}/web/h1:web.0:80", "127.0.0.1:31001")
    client.write(f"{prefix}/web/h1:web.0:80", "127.0.0.1:31005", prevValue="127.0.0.1:31001")  # CAS
    wait_until(lambda: backends(source, 80) == [("127.0.0.1", 31005)], message="compareAndSwap")
    client.delete(f"{prefix}/web/h1:web.0:80", prevValue="127.0.0.1:31005")  # compareAndDelete
    wait_until(lambda: backends(source, 80) == [], message="compareAndDelete")
    # Incremental: one full read at start, every change came from the watch.
    assert source.stats["full_reads"] == 1 and source.stats["events"] >= 10


def test_garbage_is_skipped_with_warnings(etcd_server, make_source):
    prefix = unique_prefix("garbage")
    client = etcd_server.client()
    client.write(f"{prefix}/good/h:good.0:80", "127.0.0.1:1000")
    client.write(f"{prefix}/bad name/h:c0:81", "127.0.0.1:1001")
    client.write(f"{prefix}/good/h:good.1:80", "not an address")
    client.write(f"{prefix}/stray", "127.0.0.1:1002")
    client.write(f"{prefix}/a/b/h:c0:82", "127.0.0.1:1003")
    client.write(f"{prefix}/empty", None, dir=True)
    source = make_source(etcd_server.url(prefix))
    discovery = source.current()
    assert [(s.name, s.port) for s in discovery.services] == [("good", 80)]
    assert len(discovery.warnings) == 4
    for key in ("/bad name/", "/good/h:good.1:80", "/stray", "/a/b/h:c0:82"):
        assert any(prefix + key in w for w in discovery.warnings), key

    # Through the watch: a new bad value is a warning, fixing it makes it a backend.
    client.write(f"{prefix}/good/h:good.2:80", "127.0.0.1:99999")
    wait_until(lambda: any("h:good.2:80" in w and "bad port" in w for w in source.current().warnings),
               message="warning for the bad port")
    client.write(f"{prefix}/good/h:good.2:80", "127.0.0.1:1004")
    wait_until(lambda: backends(source, 80) == [("127.0.0.1", 1000), ("127.0.0.1", 1004)],
               message="fixed entry")
    assert not any("h:good.2:80" in w for w in source.current().warnings)


def test_event_index_cleared_triggers_a_full_read(etcd_server, make_source):
    prefix = unique_prefix("cleared")
    client = etcd_server.client()
    client.write(f"{prefix}/web/h:web.0:80", "127.0.0.1:2000")
    holding, release = threading.Event(), threading.Event()

    def before_watch() -> None:
        if not release.is_set():
            holding.set()
            release.wait(30)

    source = make_source(etcd_server.url(prefix), before_watch=before_watch)
    assert backends(source, 80) == [("127.0.0.1", 2000)]
    wait_until(holding.is_set, message="watcher held")
    # While the watcher is held: a change under the prefix, then >1000 unrelated events, so the
    # index it will resume from is no longer in etcd's history.
    client.write(f"{prefix}/web/h:web.1:80", "127.0.0.1:2001")
    session = requests.Session()
    for i in range(1100):
        session.put(f"{etcd_server.base_url}/v2/keys/unrelated{prefix}/k{i % 7}", data={"value": str(i)})
    release.set()
    wait_until(lambda: source.stats["index_cleared"] >= 1, message="errorCode 401")
    wait_until(lambda: backends(source, 80) == [("127.0.0.1", 2000), ("127.0.0.1", 2001)],
               message="full read after 401")
    assert source.stats["full_reads"] >= 2
    client.write(f"{prefix}/web/h:web.2:80", "127.0.0.1:2002")
    wait_until(lambda: len(backends(source, 80)) == 3, message="watching again after the full read")


def test_etcd_restart_keeps_state_then_resyncs(make_source):
    with EtcdServer() as server:
        prefix = "/services"
        server.client().write(f"{prefix}/web/h:web.0:80", "127.0.0.1:3000")
        server.client().write(f"{prefix}/web/h:web.1:80", "127.0.0.1:3001")
        source = make_source(server.url(prefix))
        assert len(backends(source, 80)) == 2
        woke = threading.Event()

        def waiter() -> None:
            source.wait_for_change(30, threading.Event())
            woke.set()

        threading.Thread(target=waiter, daemon=True).start()
        server.kill()  # mid-watch, like a crash
        wait_until(woke.is_set, message="wait_for_change woken by the outage")
        error = wait_until(lambda: degraded(source), message="degraded while etcd is down")
        assert "cannot read etcd" in error and server.host_port in error
        last = source.last_known()
        assert [len(s.servers) for s in last.services] == [2]  # backends are kept

        server.start()  # same data dir, same ports
        server.client().delete(f"{prefix}/web/h:web.0:80")
        server.client().write(f"{prefix}/api/h:api.0:81", "127.0.0.1:3002")
        wait_until(lambda: not degraded(source) and backends(source, 80) == [("127.0.0.1", 3001)]
                   and backends(source, 81) == [("127.0.0.1", 3002)], message="resync after restart")
        assert source.error == ""

        # etcd replaced by a new cluster (fresh data dir) on the same address: new cluster id,
        # indexes start again: the source notices and reads everything again.
        server.stop()
        replacement = EtcdServer()
        replacement.client_port, replacement.peer_port = server.client_port, server.peer_port
        with replacement:
            replacement.client().write(f"{prefix}/new/h:new.0:82", "127.0.0.1:3003")
            wait_until(lambda: [s.name for s in source.current().services] == ["new"],
                       message="state of the replacement cluster")


def test_failover_to_the_second_endpoint(etcd_server, make_source):
    prefix = unique_prefix("failover")
    etcd_server.client().write(f"{prefix}/web/h:web.0:80", "127.0.0.1:4000")
    dead = free_port()
    source = make_source(f"etcd://127.0.0.1:{dead},{etcd_server.host_port}{prefix}")
    assert backends(source, 80) == [("127.0.0.1", 4000)]
    assert source.endpoint_text == etcd_server.host_port and source.stats["failovers"] == 1
    etcd_server.client().write(f"{prefix}/web/h:web.1:80", "127.0.0.1:4001")
    wait_until(lambda: len(backends(source, 80)) == 2, message="watching on the second endpoint")

    nowhere = make_source(f"etcd://127.0.0.1:{dead},127.0.0.1:{free_port()}{prefix}")
    with pytest.raises(SourceError) as error:
        nowhere.current()
    assert f"127.0.0.1:{dead}" in str(error.value)


def test_refresh_interval_full_reads_and_prompt_stop(etcd_server, make_source):
    prefix = unique_prefix("refresh")
    etcd_server.client().write(f"{prefix}/web/h:web.0:80", "127.0.0.1:5000")
    source = make_source(etcd_server.url(prefix), refresh_interval=0.2)
    first = source.current()
    version = source._version
    wait_until(lambda: source.stats["full_reads"] >= 3, message="periodic full reads")
    assert source._version == version and source.current() == first  # identical reads: no change

    stop = threading.Event()
    waiter = threading.Thread(target=source.wait_for_change, args=(600, stop), daemon=True)
    waiter.start()
    stop.set()
    waiter.join(5)
    assert not waiter.is_alive()
    source.close()
    assert source._thread is not None
    source._thread.join(5)
    assert not source._thread.is_alive()


def test_collector_keeps_backends_while_etcd_is_down(make_source):
    import queue

    from services.collector.main import SourceRunner

    with EtcdServer() as server:
        server.client().write("/services/web/h:web.0:80", "127.0.0.1:6000")
        source = make_source(server.url("/services"))
        updates: queue.Queue = queue.Queue()
        stop = threading.Event()
        runner = threading.Thread(target=SourceRunner(source, 60, updates, stop).run, daemon=True)
        runner.start()
        seen = []

        def snapshot(state: str):
            while not updates.empty():
                seen.append(updates.get().snapshot)
            return next((s for s in reversed(seen) if s.state == state), None)

        try:
            wait_until(lambda: snapshot("ok"), message="ok snapshot")
            server.kill()
            down = wait_until(lambda: snapshot("degraded"), message="degraded snapshot")
            assert [(s.name, len(s.servers)) for s in down.services] == [("web", 1)] and down.error
            seen.clear()
            server.start()
            server.client().write("/services/web/h:web.1:80", "127.0.0.1:6001")
            wait_until(lambda: (s := snapshot("ok")) and len(s.services[0].servers) == 2,
                       message="ok again with the change")
        finally:
            stop.set()
            runner.join(5)


def test_quiet_prefix_in_a_busy_etcd_needs_no_full_read(etcd_server, make_source):
    """A poll that times out moves waitIndex to its start index + 1, so >1000 events on
    other keys spread over several polls never push the watch out of etcd's history."""
    prefix = unique_prefix("quiet")
    source = make_source(etcd_server.url(prefix), watch_timeout=0.3)
    assert source.current().services == ()
    session = requests.Session()
    for i in range(1200):
        session.put(f"{etcd_server.base_url}/v2/keys/busy{prefix}/k{i % 5}", data={"value": str(i)})
    wait_until(lambda: source.stats["poll_timeouts"] >= 2, message="timed-out polls")
    etcd_server.client().write(f"{prefix}/web/h:web.0:80", "127.0.0.1:7000")
    wait_until(lambda: backends(source, 80) == [("127.0.0.1", 7000)], message="event after the busy period")
    assert source.stats["index_cleared"] == 0 and source.stats["full_reads"] == 1


def test_user_and_password_in_the_url_authenticate_reads_and_watches(make_source):
    """etcd v2 auth on (guest may read nothing): `user:password@` in REGISTRATOR_URL is sent
    with the full reads and the long polls; a wrong password is an error without it."""
    with EtcdServer() as server:
        base, root = server.base_url, ("root", "s3c@ret")
        assert requests.put(f"{base}/v2/auth/users/root", json={"user": "root", "password": "s3c@ret"},
                            timeout=5).status_code == 201
        assert requests.put(f"{base}/v2/auth/enable", timeout=5).ok
        assert requests.put(f"{base}/v2/auth/roles/guest", auth=root, timeout=5,
                            json={"role": "guest", "revoke": {"kv": {"read": ["/*"], "write": ["/*"]}}}).ok
        assert requests.get(f"{base}/v2/keys/services", timeout=5).status_code == 401
        assert requests.put(f"{base}/v2/keys/services/web/h:web.0:80", data={"value": "127.0.0.1:6000"},
                            auth=root, timeout=5).ok

        source = make_source(f"etcd://root:s3c%40ret@{server.host_port}/services")
        assert backends(source, 80) == [("127.0.0.1", 6000)]
        assert requests.put(f"{base}/v2/keys/services/web/h:web.1:80", data={"value": "127.0.0.1:6001"},
                            auth=root, timeout=5).ok
        wait_until(lambda: backends(source, 80) == [("127.0.0.1", 6000), ("127.0.0.1", 6001)],
                   message="a change seen through the authenticated watch")
        assert source.stats["full_reads"] == 1 and source.stats["events"] >= 1

        wrong = make_source(f"etcd://root:wrong-pw@{server.host_port}/services", initial_timeout=10)
        error = wait_until(lambda: degraded(wrong), message="a wrong password refused")
        assert "wrong-pw" not in error and server.host_port in error
