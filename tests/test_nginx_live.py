"""A real nginx (started by nginx_launch) driven by the nginx driver: vhosts proxying to the
services' node-local listeners, 503, reloads only when the vhost set changes (never for
membership), WebSockets, the PROXY protocol and a rejected config."""
from __future__ import annotations

import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.applier import nginx_driver, nginx_launch
from services.applier.proc_identity import children
from services.applier.nginx_driver import NginxDriver
from services.applier.nginx_render import Rendered, vhost_blocks
from services.common.config import Settings
from services.common.model import Plan, Service
from tests.helpers import HttpBackend, free_port, wait_until

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAIN = "test.local"


def read_head(conn: socket.socket) -> bytes:
    """Receive until the end of an HTTP head (or until the peer closes: then what came)."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


class UpgradeEcho:
    """A minimal WebSocket-ish server: answers an Upgrade request with 101, then echoes bytes."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            head = read_head(conn)
            if b"\r\n\r\n" not in head:
                return
            request = head.decode().lower()
            self.requests.append(request)
            if "upgrade: websocket" not in request or "connection: upgrade" not in request:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def get(port: int, host: str, path: str = "/") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def get_ok(port: int, host: str) -> str | None:
    status, body = get(port, host)
    return body if status == 200 else None


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as conn:
        conn.sendall(data)
        reply = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return reply
            reply += chunk


def service(name, port, servers=()):
    """A TCP service on `port`. The vhost never uses `servers` (HAProxy/Pen on the port balances
    them): the live tests give fake addresses that would fail if nginx ever connected to them."""
    return Service.from_dict({"name": name, "port": port,
                              "servers": [{"ip": ip, "port": p, "weight": w} for ip, p, w in servers]})


class Nginx:
    """`proxymatic nginx` in a temp run dir, on a free port."""

    def __init__(self, proxy_protocol: bool = False, port: int | None = None, wait: bool = True,
                 run_dir: str | None = None):
        self.run_dir = run_dir or tempfile.mkdtemp(prefix="pm", dir="/tmp")  # private (0700), like a real run dir
        self.port = port or free_port()
        self.settings = Settings(run_dir=self.run_dir, vhost_domain=DOMAIN, vhost_port=self.port,
                                 proxy_protocol=proxy_protocol, status_endpoint="")
        self.proxy = self.settings.proxy_settings()
        code = ("import sys, json; from services.common.config import Settings;"
                "from services.applier import nginx_launch;"
                "sys.exit(nginx_launch.main(Settings(**json.loads(sys.argv[1]))))")
        args = json.dumps({"run_dir": self.run_dir, "vhost_domain": DOMAIN, "vhost_port": self.port,
                           "proxy_protocol": proxy_protocol, "status_endpoint": ""})
        self.process = subprocess.Popen([sys.executable, "-c", code, args], cwd=ROOT)
        self.driver = NginxDriver(self.settings)
        if wait:
            wait_until(lambda: self.driver.master_pid() == self.process.pid, message="nginx master up")

    def plan(self, *services) -> Plan:
        return Plan(tuple(services), self.proxy)

    def close(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=10)
        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture
def nginx():
    server = Nginx()
    yield server
    server.close()


# How the live tests stand in for HAProxy/Pen: a vhost proxies to 127.0.0.1:<service port>, the
# listener HAProxy (or Pen) keeps on every service port. Here the listener is the test backend
# itself: each service's port IS the port of a backend (HttpBackend, UpgradeEcho),
# so a request reaching it went through nginx to the service's node-local listener. The servers
# listed in the plans are fake (TEST-NET addresses): nginx must never use them.
FAKE = [("192.0.2.1", 31000, 10), ("192.0.2.2", 31001, 20), ("192.0.2.3", 31002, 0)]


def workers_replaced(master: int, old: set[int]) -> set[int] | None:
    """After a reload: the workers once every one of `old` has gone. The master forks all the new
    workers before it tells the old ones to quit, so none is missing from the set returned."""
    now = children(master)
    return now if now and now.isdisjoint(old) else None


def no_new_workers(master: int, workers: set[int]) -> bool:
    """No reload happened: the master forked no worker (an old one may still be finishing)."""
    now = children(master)
    return bool(now) and now <= workers


def test_vhosts_default_server_reloads_and_rejected_config(nginx, monkeypatch):
    port = nginx.port
    master = nginx.process.pid
    # the bootstrap config: only the default server
    assert get(port, "anything.example")[0] == 503
    assert get(port, "anything.example", "/_status") == (200, "OK\n")
    assert nginx.driver.apply(nginx.plan()).action == "none"  # the bootstrap is the empty plan's config
    workers = wait_until(lambda: children(master), message="nginx workers")

    web, api, admin = HttpBackend("web"), HttpBackend("api"), HttpBackend("admin")
    closed = free_port()  # nothing listens there: a listener refusing (e.g. Pen not up yet)
    try:
        # api.team has no server: its vhost still proxies to the listener, which answers for it
        plan = nginx.plan(service("web", web.port, FAKE[:1]), service("api.team", api.port),
                          service("gone", closed, FAKE[1:2]))
        first = nginx.driver.apply(plan)
        assert first.ok and first.action == "reload", first
        assert sorted(first.details["vhosts"]) == ["api.team.test.local", "gone.test.local", "web.test.local"]
        assert nginx.driver.reloads == 1
        workers = wait_until(lambda: workers_replaced(master, workers), message="workers after the reload")
        wait_until(lambda: get(port, "web.test.local") == (200, "web\n"), message="web vhost")
        assert get(port, "API.team.test.local:80") == (200, "api\n")
        assert get(port, "gone.test.local")[0] == 502  # refused by the (absent) listener
        assert get(port, "unknown.test.local")[0] == 503
        assert get(port, "unknown.test.local", "/_status")[0] == 200
        assert web.requests >= 1 and api.requests >= 1

        # membership changes never reload nginx: servers added, removed, re-weighted, drained,
        # all gone; plus a UDP service and a higher port under an existing name
        config = open(nginx.driver.config).read()
        udp = Service.from_dict({"name": "dns", "port": 53, "protocol": "udp",
                                 "servers": [{"ip": "127.0.0.1", "port": 53}]})
        higher = max(web.port, api.port, closed) + 1
        for servers in (FAKE, FAKE[1:], [("192.0.2.1", 31000, 256)], [("192.0.2.1", 31000, 0)], []):
            same = nginx.plan(service("web", web.port, servers), service("api.team", api.port, servers[:1]),
                              service("gone", closed, servers), service("web", higher, FAKE), udp)
            result = nginx.driver.apply(same)
            assert result.ok and result.action == "none", (servers, result)
            assert get(port, "web.test.local") == (200, "web\n")
        assert nginx.driver.reloads == 1
        assert open(nginx.driver.config).read() == config
        assert nginx.driver.master_pid() == master and no_new_workers(master, workers)

        # a restarted applier adopts the running nginx without reloading it
        assert NginxDriver(nginx.settings).apply(plan).action == "none"
        assert no_new_workers(master, workers)

        # a new service name: exactly one reload
        grown = nginx.plan(service("web", web.port, FAKE[:1]), service("api.team", api.port),
                           service("gone", closed, FAKE[1:2]), service("admin", admin.port, FAKE))
        added = nginx.driver.apply(grown)
        assert added.ok and added.action == "reload" and nginx.driver.reloads == 2, added
        workers = wait_until(lambda: workers_replaced(master, workers), message="workers after adding admin")
        wait_until(lambda: get(port, "admin.test.local") == (200, "admin\n"), message="admin vhost")
        assert nginx.driver.apply(grown).action == "none" and nginx.driver.reloads == 2

        # a config nginx -t refuses is not installed; the last good one keeps serving
        good = open(nginx.driver.config).read()
        real_render = nginx_driver.render

        def broken(*args, **kwargs):
            rendered = real_render(*args, **kwargs)
            return rendered.__class__(rendered.text.replace("server_tokens off;", "server_tokens maybe;"),
                                      rendered.vhosts, rendered.warnings)

        monkeypatch.setattr(nginx_driver, "render", broken)
        rejected = nginx.driver.apply(plan)
        assert not rejected.ok and rejected.action == "rejected" and "maybe" in rejected.errors[0], rejected
        assert open(nginx.driver.config).read() == good
        assert nginx.driver.master_pid() == master and nginx.driver.reloads == 2
        assert get(port, "admin.test.local") == (200, "admin\n")  # last good config serving
        assert nginx.driver.apply(plan).action == "rejected"  # still bad, not retried against nginx
        monkeypatch.setattr(nginx_driver, "render", real_render)
        assert nginx.driver.apply(plan).action == "reload" and nginx.driver.reloads == 3
        wait_until(lambda: workers_replaced(master, workers), message="workers after dropping admin")
        wait_until(lambda: get(port, "admin.test.local")[0] == 503, message="admin vhost gone")
        assert get(port, "web.test.local") == (200, "web\n")
        assert nginx.process.poll() is None
    finally:
        for backend in (web, api, admin):
            backend.close()


def test_websocket_upgrade_and_forwarded_headers(nginx):
    # the stand-in listeners: service port == backend port (see above)
    echo, headers = UpgradeEcho(), HttpBackend("hdr", echo_headers=True)
    try:
        assert nginx.driver.apply(nginx.plan(service("ws", echo.port, FAKE), service("hdr", headers.port))).ok
        # After a reload the old workers may still accept for a moment: ask until the new config answers.
        seen = json.loads(wait_until(lambda: get_ok(nginx.port, "hdr.test.local"), message="hdr vhost"))
        assert seen["x-real-ip"] == "127.0.0.1" and seen["x-forwarded-for"] == "127.0.0.1"
        assert seen["x-forwarded-proto"] == "http" and seen["host"] == "hdr.test.local"

        def upgraded() -> socket.socket | None:
            conn = socket.create_connection(("127.0.0.1", nginx.port), timeout=3)
            conn.sendall(b"GET /socket HTTP/1.1\r\nHost: ws.test.local\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            head = read_head(conn)
            if head.startswith(b"HTTP/1.1 101"):
                return conn
            conn.close()  # an old worker still finishing after the reload: ask again
            return None

        with wait_until(upgraded, message="101 Switching Protocols") as conn:
            conn.sendall(b"x")
            assert conn.recv(16) == b"x"
            conn.sendall(b"yz")
            assert conn.recv(16) == b"yz"
            # a membership change does not reload nginx, so an open WebSocket is not disturbed
            reloads = nginx.driver.reloads
            assert nginx.driver.apply(nginx.plan(service("ws", echo.port), service("hdr", headers.port,
                                                                                   FAKE))).action == "none"
            assert nginx.driver.reloads == reloads
            conn.sendall(b"still")
            assert conn.recv(16) == b"still"
        assert "upgrade: websocket" in echo.requests[-1] and "x-real-ip: 127.0.0.1" in echo.requests[-1]
        assert "host: ws.test.local" in echo.requests[-1]
    finally:
        echo.close()
        headers.close()


def test_proxy_protocol_client_address_reaches_the_backend():
    nginx = Nginx(proxy_protocol=True)
    headers = HttpBackend("hdr", echo_headers=True)  # the stand-in listener of the service (port == backend port)
    try:
        assert nginx.driver.apply(nginx.plan(service("hdr", headers.port, FAKE))).ok

        def ask(host: str, path: str = "/") -> bytes:
            return raw_request(nginx.port, b"PROXY TCP4 1.2.3.4 127.0.0.1 5555 80\r\n"
                               + f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())

        def answer() -> bytes | None:
            reply = ask("hdr.test.local")
            return reply.partition(b"\r\n\r\n")[2] if reply.startswith(b"HTTP/1.1 200") else None

        seen = json.loads(wait_until(answer, message="hdr vhost"))
        assert seen["x-real-ip"] == "1.2.3.4" and seen["x-forwarded-for"] == "1.2.3.4"
        assert seen["host"] == "hdr.test.local"
        assert ask("other.test.local").startswith(b"HTTP/1.1 503")
        assert ask("other.test.local", "/_status").startswith(b"HTTP/1.1 200")
    finally:
        headers.close()
        nginx.close()


def process_user(pid: int) -> str:
    with open(f"/proc/{pid}/status") as status:
        uid = next(int(line.split()[1]) for line in status if line.startswith("Uid:"))
    return pwd.getpwuid(uid).pw_name


def test_vhosts_nginx_rejects_are_set_aside_and_the_others_served(nginx, monkeypatch):
    web, api, admin = HttpBackend("web"), HttpBackend("api"), HttpBackend("admin")
    plan = nginx.plan(service("web", web.port), service("api", api.port), service("admin", admin.port))
    real_render = nginx_driver.render
    long_name = "x" * 200 + ".admin.test.local"

    def two_bad_blocks(*args, **kwargs):
        # api's block gets a directive nginx does not know (nginx names its line); admin's a name
        # too long for the names hash (nginx names no line: found by bisection)
        text = real_render(*args, **kwargs)
        bad = (text.text.replace("server_name api.test.local;", "server_name api.test.local; bogus_directive on;")
               .replace("server_name admin.test.local;", f"server_name {long_name};"))
        return Rendered(bad, text.vhosts, text.warnings, vhost_blocks(bad))

    tests = []
    real_test = nginx.driver.test
    monkeypatch.setattr(nginx.driver, "test", lambda text: tests.append(text) or real_test(text))
    monkeypatch.setattr(nginx_driver, "render", two_bad_blocks)
    try:
        result = nginx.driver.apply(plan)
        assert result.ok and result.action == "reload", result
        assert sorted(result.set_aside) == sorted([f"{api.port}/tcp", f"{admin.port}/tcp"])
        assert result.set_aside[f"{api.port}/tcp"].startswith("service api (vhost api.test.local): nginx -t failed: "
                                                              '[emerg] unknown directive "bogus_directive"')
        assert "server_names_hash" in result.set_aside[f"{admin.port}/tcp"]
        assert result.details["vhosts"] == ["web.test.local"]
        wait_until(lambda: get(nginx.port, "web.test.local") == (200, "web\n"), message="web vhost")
        assert get(nginx.port, "api.test.local")[0] == 503 and get(nginx.port, long_name)[0] == 503

        # the applier's retries: the same plan is not tested again
        runs = len(tests)
        again = nginx.driver.apply(plan)
        assert again.ok and again.action == "none" and again.set_aside == result.set_aside, again
        assert len(tests) == runs and nginx.driver.reloads == 1

        # fixed: everything is served, nothing set aside
        monkeypatch.setattr(nginx_driver, "render", real_render)
        fixed = nginx.driver.apply(plan)
        assert fixed.ok and fixed.action == "reload" and fixed.set_aside == {}, fixed
        wait_until(lambda: get(nginx.port, "api.test.local") == (200, "api\n"), message="api vhost")
        assert get(nginx.port, "admin.test.local") == (200, "admin\n")
    finally:
        for backend in (web, api, admin):
            backend.close()


def test_a_held_vhost_port_sets_every_vhost_aside_until_it_is_free():
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    port = squatter.getsockname()[1]
    web = HttpBackend("web")
    nginx = Nginx(port=port, wait=False)
    try:
        plan = nginx.plan(service("web", web.port))
        held = nginx.driver.apply(plan)
        assert held.ok and held.set_aside == {
            f"{web.port}/tcp": f"service web (vhost web.test.local): port {port} cannot be bound: "
                               "[Errno 98] Address already in use"}, held
        again = nginx.driver.apply(plan)  # a retry while it is still held: nothing new
        assert again.action == "none" and again.set_aside == held.set_aside
        assert nginx.process.poll() is None and nginx.driver.master_pid() is None  # the launcher waits

        squatter.close()
        master = wait_until(nginx.driver.master_pid, message="nginx started once the port is free")
        assert master == nginx.process.pid  # the launcher exec'd nginx: nothing restarted
        served = nginx.driver.apply(plan)
        assert served.ok and served.action == "none" and served.set_aside == {}, served  # it started with this config
        assert wait_until(lambda: get_ok(port, "web.test.local"), message="web vhost") == "web\n"
        if os.geteuid() == 0:  # workers never run as root
            assert {process_user(pid) for pid in children(master)} == {"www-data"}
    finally:
        squatter.close()
        web.close()
        nginx.close()


def test_a_reload_is_reported_once_the_old_workers_no_longer_accept(nginx):
    """Until an old worker has read QUIT it still accepts, with the previous config: a vhost
    just added would answer 503 from the default server. `apply` returns after that window."""
    web = HttpBackend("web")
    try:
        master = nginx.process.pid
        old = wait_until(lambda: NginxDriver._accepting_workers(master), message="the first workers")
        result = nginx.driver.apply(nginx.plan(service("web", web.port)))
        assert result.ok and result.action == "reload", result
        assert not old & NginxDriver._accepting_workers(master)
        assert get_ok(nginx.port, "web.test.local") == "web\n"  # at once, no retry
    finally:
        web.close()


def test_workers_left_by_a_killed_master_are_ended_before_the_next_start():
    """nginx workers do not die with a master killed by SIGKILL: they keep the vhost port and the
    old config. The next `proxymatic nginx` ends them, binds the port and serves the new config."""
    web, shop = HttpBackend("web"), HttpBackend("shop")
    first = Nginx()
    second = None
    try:
        assert first.driver.apply(first.plan(service("web", web.port))).ok
        assert wait_until(lambda: get_ok(first.port, "web.test.local"), message="web vhost") == "web\n"
        orphans = children(first.process.pid)
        assert orphans
        first.process.kill()  # the master (the launcher exec'd it), as `kill -9` would
        first.process.wait(timeout=10)
        assert all(os.path.exists(f"/proc/{pid}") for pid in orphans)  # still serving the old config
        second = Nginx(port=first.port, run_dir=first.run_dir)  # waits until its master is up
        prefix = os.path.join(first.run_dir, "nginx")
        assert not set(nginx_launch.leftover_processes(prefix, "nginx")) & orphans
        assert second.driver.apply(second.plan(service("web", web.port), service("shop", shop.port))).ok
        assert wait_until(lambda: get_ok(second.port, "shop.test.local"), message="shop vhost") == "shop\n"
    finally:
        for server in (second, first):
            if server is not None and server.process.poll() is None:
                server.close()
        for pid in nginx_launch.leftover_processes(os.path.join(first.run_dir, "nginx"), "nginx"):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(first.run_dir, ignore_errors=True)
        web.close()
        shop.close()


class BigBodies(ThreadingHTTPServer):
    """GET answers 3 MB; POST answers how many bytes of body it received."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self._answer(b"x" * 3_000_000)

            def do_POST(self) -> None:
                self._answer(str(len(self.rfile.read(int(self.headers["Content-Length"])))).encode())

            def _answer(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def test_large_bodies_pass_although_workers_cannot_reach_the_private_run_dir(nginx):
    big = BigBodies()
    try:
        assert nginx.driver.apply(nginx.plan(service("big", big.port))).ok

        def post() -> str | None:
            conn = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=10)
            try:
                conn.request("POST", "/", body=b"y" * 500_000, headers={"Host": "big.test.local"})
                response = conn.getresponse()
                return response.read().decode() if response.status == 200 else None
            finally:
                conn.close()

        # larger than the in-memory buffers: nginx would spill to tmp/, which its workers cannot open
        assert wait_until(post, message="a 500 kB request body through the vhost") == "500000"
        status, body = get(nginx.port, "big.test.local")
        assert status == 200 and len(body) == 3_000_000
        assert oct(os.stat(nginx.run_dir).st_mode & 0o777) == "0o700"
    finally:
        big.close()
