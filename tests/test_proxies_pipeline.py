"""nginx virtual hosts and Pen-for-TCP through the real pipeline (each stage its own process)."""
from __future__ import annotations

import http.client

from sim.pipeline import Pipeline
from tests.helpers import HttpBackend, TcpBackend, free_port, tcp_ask, wait_until, write_services


def vhost_get(port: int, host: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    conn.request("GET", "/", headers={"Host": host})
    response = conn.getresponse()
    return response.status, response.read().decode().strip()


def test_virtual_hosts_route_by_name_through_haproxy():
    a, b = HttpBackend("a"), HttpBackend("b")
    web_port, api_port, vhost_port = free_port(), free_port(), free_port()
    pipeline = Pipeline(["--status-endpoint", "", "--vhost-domain", "apps.test",
                         "--vhost-port", str(vhost_port)],
                        programs=("haproxy", "pen", "nginx", "applier", "planner", "collector"), services_file=True)
    services_file = pipeline.services_file
    write_services(services_file, [
        {"name": "web", "port": web_port, "mode": "http", "servers": [{"host": "127.0.0.1", "port": a.port}]},
        {"name": "api.v1", "port": api_port, "mode": "http", "servers": [{"host": "127.0.0.1", "port": b.port}]},
    ])
    try:
        pipeline.start()
        wait_until(lambda: vhost_get(vhost_port, "web.apps.test") == (200, "a"), timeout=30, message="web vhost")
        # During nginx's reload an old worker (bootstrap config) may still take a connection:
        # the first vhost answering does not mean every worker has the new config yet.
        wait_until(lambda: vhost_get(vhost_port, "api.v1.apps.test") == (200, "b"), message="api.v1 vhost")
        assert vhost_get(vhost_port, "nope.apps.test")[0] == 503
        # Membership moves behind the vhost without touching nginx.
        write_services(services_file, [
            {"name": "web", "port": web_port, "mode": "http", "servers": [{"host": "127.0.0.1", "port": b.port}]},
            {"name": "api.v1", "port": api_port, "mode": "http", "servers": [{"host": "127.0.0.1", "port": b.port}]},
        ])
        wait_until(lambda: vhost_get(vhost_port, "web.apps.test") == (200, "b"), message="web moved to b")
    finally:
        pipeline.cleanup()
        a.close()
        b.close()


def test_tcp_through_pen_when_haproxy_is_off():
    a, b = TcpBackend("a"), TcpBackend("b")
    port = free_port()
    pipeline = Pipeline(["--status-endpoint", "", "--no-haproxy"],
                        programs=("pen", "applier", "planner", "collector"), services_file=True)
    services_file = pipeline.services_file
    write_services(services_file, [{"name": "db", "port": port, "servers": [{"host": "127.0.0.1", "port": a.port}]}])
    try:
        pipeline.start()
        wait_until(lambda: tcp_ask(port) == "a", timeout=30, message="TCP through Pen")
        write_services(services_file, [{"name": "db", "port": port, "servers": [{"host": "127.0.0.1", "port": b.port}]}])
        wait_until(lambda: tcp_ask(port) == "b", message="Pen member replaced")
    finally:
        pipeline.cleanup()
        a.close()
        b.close()
