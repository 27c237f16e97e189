"""Per-service isolation in Pen and nginx through the real pipeline (each stage its own process),
under client load: a port another program holds sets aside only what needs it, the reason
(service, port, OS error) is published on `applied.<node>`, and once the port is freed the
service is served without restarting anything."""
from __future__ import annotations

import http.client
import os
import pwd
import shutil
import socket
from typing import Callable

import pytest
import zmq

from services.applier.pen_control import PenControl
from services.common.bus import Subscriber
from services.common.config import Settings
from sim.pipeline import Pipeline
from tests.helpers import HttpBackend, Load, UdpEcho, free_port, udp_ask, wait_until, write_services

pytestmark = pytest.mark.skipif(shutil.which("pen") is None or shutil.which("nginx") is None,
                                reason="pen and nginx are needed")
DOMAIN = "apps.test"


def http_get(port: int, host: str = "localhost") -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", "/", headers={"Host": host})
        response = conn.getresponse()
        body = response.read().decode().strip()
        assert response.status == 200, (response.status, body)
        return body
    finally:
        conn.close()


class Applied:
    """The applier's `applied.<node>` results, as a subscriber sees them."""

    def __init__(self, run_dir: str):
        self.ctx = zmq.Context()
        self.subscriber = Subscriber(self.ctx, [Settings(run_dir=run_dir).bus("applier")], ["applied."])
        self.results: list[dict] = []

    def wait_for(self, found: Callable[[dict], object], message: str, timeout: float = 30.0):
        """The first truthy `found(result)` over the results seen so far and those to come."""
        def look():
            self.results += [m.payload for m in self.subscriber.poll(0.1)
                             if m.topic.startswith("applied.") and not m.is_heartbeat]
            return next((value for value in map(found, self.results) if value), None)
        return wait_until(look, timeout=timeout, message=message)

    def close(self) -> None:
        self.subscriber.close()
        self.ctx.term()


def set_aside(driver: str, key: str) -> Callable[[dict], str | None]:
    return lambda result: result["details"].get(driver, {}).get("set_aside", {}).get(key)


def none_set_aside(driver: str) -> Callable[[dict], bool]:
    return lambda result: driver in result["details"] and not result["details"][driver]["set_aside"]


def pen_pid(run_dir: str, port: int, protocol: str) -> int:
    return PenControl(os.path.join(run_dir, "pen", f"{port}-{protocol}.ctl")).pid()


def children(pid: int) -> set[int]:
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                if int(stat.read().rpartition(")")[2].split()[1]) == pid:
                    found.add(int(entry))
        except OSError:
            continue
    return found


def process_user(pid: int) -> str:
    with open(f"/proc/{pid}/status") as status:
        uid = next(int(line.split()[1]) for line in status if line.startswith("Uid:"))
    return pwd.getpwuid(uid).pw_name


def test_a_held_udp_port_sets_aside_only_its_pen_service():
    dns, echo = UdpEcho("dns"), UdpEcho("echo")
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # another program on the dns port
    squatter.bind(("127.0.0.1", 0))
    held = squatter.getsockname()[1]
    served = free_port(socket.SOCK_DGRAM)
    pipeline = Pipeline(["--status-endpoint", ""], programs=("pen", "applier", "planner", "collector"),
                        services_file=True)
    write_services(pipeline.services_file, [
        {"name": "dns", "port": held, "protocol": "udp", "servers": [{"host": "127.0.0.1", "port": dns.port}]},
        {"name": "echo", "port": served, "protocol": "udp", "servers": [{"host": "127.0.0.1", "port": echo.port}]},
    ])
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # one client flow through Pen
    load = Load(served, ask=lambda port: udp_ask(port, client))
    applied = None
    try:
        pipeline.start()
        applied = Applied(pipeline.run_dir)
        wait_until(lambda: udp_ask(served) == "echo", timeout=30, message="echo served through Pen")
        load.start()
        reason = applied.wait_for(set_aside("pen", f"{held}/udp"), message="dns set aside on applied.<node>")
        assert reason == f"service dns ({held}/udp): port {held} cannot be bound: [Errno 98] Address already in use"
        echo_pen = pen_pid(pipeline.run_dir, served, "udp")
        if os.geteuid() == 0:
            assert process_user(echo_pen) == "nobody"  # pens never run as root

        # the applier retries while the port is held; the warning is logged once, not per retry
        log = os.path.join(pipeline.run_dir, "logs", "applier.log")
        wait_until(lambda: open(log).read().count("retrying plan") >= 3, timeout=20, message="three retries")
        assert open(log).read().count(f"pen: set aside service dns ({held}/udp)") == 1

        squatter.close()
        wait_until(lambda: udp_ask(held) == "dns", timeout=20, message="dns served once its port is free")
        applied.wait_for(none_set_aside("pen"), message="nothing set aside any more")
        load.stop()
        assert load.ok > 0 and load.failures == [], (load.ok, load.failures[:5])
        assert pen_pid(pipeline.run_dir, served, "udp") == echo_pen  # echo's pen was never restarted
        assert all(process.poll() is None for process in pipeline.processes.values())
    finally:
        if load.is_alive():
            load.stop()
        if applied:
            applied.close()
        pipeline.cleanup()
        for closing in (squatter, client, dns, echo):
            closing.close()


def test_a_held_vhost_port_sets_aside_the_vhosts_until_nginx_can_listen():
    web = HttpBackend("web")
    squatter = socket.socket()  # another program on the vhost port
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(8)
    vhost_port = squatter.getsockname()[1]
    web_port = free_port()
    pipeline = Pipeline(["--status-endpoint", "", "--no-haproxy", "--vhost-domain", DOMAIN,
                         "--vhost-port", str(vhost_port)],
                        programs=("pen", "nginx", "applier", "planner", "collector"), services_file=True)
    write_services(pipeline.services_file, [
        {"name": "web", "port": web_port, "mode": "http", "servers": [{"host": "127.0.0.1", "port": web.port}]}])
    direct = Load(web_port, ask=http_get)  # the service itself, through Pen: unaffected
    applied = None
    try:
        pipeline.start()
        applied = Applied(pipeline.run_dir)
        wait_until(lambda: http_get(web_port) == "web", timeout=30, message="web served through Pen")
        direct.start()
        reason = applied.wait_for(set_aside("nginx", f"{web_port}/tcp"), message="web's vhost set aside")
        assert reason == (f"service web (vhost web.{DOMAIN}): port {vhost_port} cannot be bound: "
                          "[Errno 98] Address already in use")
        web_pen = pen_pid(pipeline.run_dir, web_port, "tcp")
        if os.geteuid() == 0:
            assert process_user(web_pen) == "nobody"  # pens never run as root

        squatter.close()
        wait_until(lambda: http_get(vhost_port, f"web.{DOMAIN}") == "web", timeout=20,
                   message="the vhost served once its port is free")
        applied.wait_for(none_set_aside("nginx"), message="no vhost set aside any more")
        through_vhost = Load(vhost_port, ask=lambda port: http_get(port, f"web.{DOMAIN}"))
        through_vhost.start()
        wait_until(lambda: through_vhost.ok >= 20, message="requests through the vhost")
        through_vhost.stop()
        direct.stop()
        assert direct.ok > 0 and direct.failures == [], (direct.ok, direct.failures[:5])
        assert through_vhost.ok >= 20 and through_vhost.failures == [], through_vhost.failures[:5]
        assert pen_pid(pipeline.run_dir, web_port, "tcp") == web_pen  # Pen was not restarted
        assert all(process.poll() is None for process in pipeline.processes.values())
        # nginx is the launcher's process (exec), and its workers run unprivileged
        master = int(open(os.path.join(pipeline.run_dir, "nginx", "nginx.pid")).read())
        assert master == pipeline.processes["nginx"].pid
        if os.geteuid() == 0:
            assert {process_user(pid) for pid in children(master)} == {"www-data"}
    finally:
        if direct.is_alive():
            direct.stop()
        if applied:
            applied.close()
        pipeline.cleanup()
        squatter.close()
        web.close()
