"""Marathon (simulator) and registrator (real etcd) through the real pipeline: each stage its
own process, real HAProxy for TCP and Pen for UDP."""
from __future__ import annotations

import http.client
import socket
import threading

import pytest

from sim.marathon import MarathonSim
from sim.pipeline import Pipeline
from tests.etcd_server import unique_prefix
from tests.helpers import HttpBackend, Load, TcpBackend, UdpEcho, free_port, tcp_ask, udp_ask, wait_until


def http_ask(port: int) -> str:
    """Marathon tasks here are HTTP backends: HAProxy health-checks them with the app's
    Marathon health check path; registrator entries are plain TCP backends (tcp_ask)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    conn.request("GET", "/")
    response = conn.getresponse()
    body = response.read().decode().strip()
    conn.close()
    if response.status != 200:
        raise OSError(f"HTTP {response.status}")
    return body


def serving(port: int, tries: int = 8, http_backends: bool = False) -> set[str]:
    names = set()
    for _ in range(tries):
        try:
            names.add(http_ask(port) if http_backends else tcp_ask(port, timeout=1))
        except (OSError, http.client.HTTPException):
            names.add("<refused>")
    return names


@pytest.fixture
def backends():
    made = {name: HttpBackend(name) for name in ("m1", "m2", "m3")}
    made.update({name: TcpBackend(name) for name in ("r1", "r2")})
    made["u1"], made["u2"] = UdpEcho("u1"), UdpEcho("u2")
    yield made
    for backend in made.values():
        backend.close()


def test_marathon_and_registrator_reach_haproxy_and_pen(etcd_server, backends):
    sim = MarathonSim().start()
    web_port, cache_port, dns_port = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    prefix = unique_prefix("services")
    client = etcd_server.client()
    client.write(f"{prefix}/cache@{cache_port}/h1:cache.0:6379", f"127.0.0.1:{backends['r1'].port}")
    client.write(f"{prefix}/dns@{dns_port}/h1:dns.0:53:udp", f"127.0.0.1:{backends['u1'].port}")
    # registrator also claims Marathon's port: Marathon wins.
    client.write(f"{prefix}/intruder@{web_port}/h1:x.0:80", f"127.0.0.1:{backends['r2'].port}")
    sim.deploy_app("/shop/web", network="BRIDGE", service_ports=[web_port], instances=2, host="127.0.0.1",
                   host_ports=[[backends["m1"].port], [backends["m2"].port]], health_check=True)
    pipeline = Pipeline(["--marathon", sim.url, "--registrator", etcd_server.url(prefix), "--status-endpoint", ""])
    try:
        pipeline.start()
        wait_until(lambda: serving(web_port, http_backends=True) == {"m1", "m2"}, timeout=30, message="marathon tasks served")
        wait_until(lambda: serving(cache_port) == {"r1"}, timeout=30, message="registrator entry served")
        wait_until(lambda: udp_ask(dns_port) == "u1", timeout=30, message="UDP entry served by Pen")

        # A rolling restart under load: health fails first (the app traps SIGTERM), then the
        # task is killed and a new one starts. Not one request fails.
        load = Load(web_port, http_ask)
        load.start()
        try:
            first, second = sim.task_ids("/shop/web")
            sim.set_health(first, False)
            wait_until(lambda: serving(web_port, http_backends=True) == {"m2"}, message="failing task drained")
            sim.kill_task(first)
            wait_until(lambda: first not in sim.task_ids("/shop/web"), message="task killed")
            assert serving(web_port, http_backends=True) == {"m2"}
        finally:
            load.stop()
        assert load.failures == [] and load.ok > 10

        # registrator entries follow etcd; UDP backends move.
        client.write(f"{prefix}/cache@{cache_port}/h2:cache.1:6379", f"127.0.0.1:{backends['r2'].port}")
        client.delete(f"{prefix}/cache@{cache_port}/h1:cache.0:6379")
        wait_until(lambda: serving(cache_port) == {"r2"}, message="registrator change followed")
        client.write(f"{prefix}/dns@{dns_port}/h1:dns.0:53:udp", f"127.0.0.1:{backends['u2'].port}")
        wait_until(lambda: udp_ask(dns_port) == "u2", message="UDP backend moved")

        # Discovery down: nothing changes in the proxies.
        sim.stop()
        etcd_server.kill()
        try:
            assert serving(cache_port) == {"r2"} and "m2" in serving(web_port, http_backends=True)
            pipeline.restart("collector")  # even a collector restarted during the outage keeps nothing from nowhere
            assert serving(cache_port) == {"r2"}
        finally:
            etcd_server.start()
    finally:
        pipeline.cleanup()
        sim.stop()


def test_canary_weights_split_traffic_under_load():
    """Two app versions on one service port are one service; each version's servers get its
    weight label. leastconn honours weights once connections overlap (busy backends, several
    clients), which is when a canary's share matters."""
    main, canary = HttpBackend("main", delay=0.02), HttpBackend("canary", delay=0.02)
    sim = MarathonSim().start()
    port = free_port()
    for app_id, backend, weight in (("/shop/web", main, "800"), ("/shop/web-canary", canary, "200")):
        sim.deploy_app(app_id, network="BRIDGE", service_ports=[port], instances=1, host="127.0.0.1",
                       host_ports=[[backend.port]], labels={"com.meltwater.proxymatic.port.0.weight": weight})
    pipeline = Pipeline(["--marathon", sim.url, "--status-endpoint", ""])
    try:
        pipeline.start()
        wait_until(lambda: serving(port, 20, http_backends=True) == {"main", "canary"}, timeout=30,
                   message="both versions served")
        counts = {"main": 0, "canary": 0}
        lock = threading.Lock()

        def client() -> None:
            for _ in range(25):
                name = http_ask(port)
                with lock:
                    counts[name] += 1

        clients = [threading.Thread(target=client) for _ in range(16)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        share = counts["canary"] / sum(counts.values())
        assert 0.1 <= share <= 0.3, counts  # 20% asked for
    finally:
        pipeline.cleanup()
        sim.stop()
        main.close()
        canary.close()
