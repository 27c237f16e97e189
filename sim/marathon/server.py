"""One simulated Marathon replica: the REST endpoints proxymatic uses and the `/v2/events`
SSE stream, over a shared Cluster, with faults a test can switch on (5xx, hang, stalled or
dropped streams, basic auth).
"""
from __future__ import annotations

import base64
import queue
import socket
import threading
import time

import orjson
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from sim.marathon.cluster import Cluster, SimError


class Replica:
    """An HTTP server for a Cluster. `fault`: None | "500" | "503" | "hang" (partition: accept
    and never answer) | "malformed" (200 with broken JSON). `stall`: event streams stay open
    but send nothing. `refuse_events`: an HTTP status /v2/events answers instead of a stream
    (e.g. 503: Marathon up, its event bus not), while the REST API keeps working."""

    def __init__(self, cluster: Cluster, port: int = 0, host: str = "127.0.0.1",
                 auth: tuple[str, str] | None = None):
        self.cluster = cluster
        self.auth = auth
        self.fault: str | None = None
        self.stall = False
        self.refuse_events: int | None = None
        self.close_streams = False  # answer /v2/events 200, then close at once (a misbehaving proxy)
        self.stream_opens: list[float] = []  # wall-clock times event streams were answered 200
        self.requests: list[str] = []
        self._requests_lock = threading.Lock()
        self._stopping = threading.Event()
        self._streams: set[queue.Queue] = set()
        self._connections: set = set()
        self._connections_lock = threading.Lock()
        self._bind = (host, port)
        self.server: ThreadingHTTPServer | None = None
        self.port = port

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "Replica":
        replica = self

        class Handler(_Handler):
            pass

        Handler.replica = replica
        ThreadingHTTPServer.allow_reuse_address = True
        self._stopping.clear()
        self.server = ThreadingHTTPServer(self._bind, Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._bind = (self._bind[0], self.port)  # restart on the same port
        threading.Thread(target=self.server.serve_forever, args=(0.05,), name=f"sim-marathon-{self.port}", daemon=True).start()
        return self

    def stop(self) -> None:
        """Down: the port refuses connections (open streams are closed)."""
        self._stopping.set()
        self.drop_streams()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        with self._connections_lock:  # kept-alive connections go down with it
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def url(self) -> str:
        return f"http://{self._bind[0]}:{self.port}"

    def url_with_auth(self) -> str:
        if not self.auth:
            return self.url
        return f"http://{self.auth[0]}:{self.auth[1]}@{self._bind[0]}:{self.port}"

    # -- faults -----------------------------------------------------------------------------
    def drop_streams(self) -> None:
        for q in list(self._streams):
            q.put("drop")

    def api_requests(self) -> list[str]:
        """Requests other than the event stream, in order."""
        with self._requests_lock:
            return [r for r in self.requests if not r.startswith("/v2/events")]

    def stream_count(self) -> int:
        return len(self._streams)

    def _record(self, path: str) -> None:
        with self._requests_lock:
            self.requests.append(path)


class _Handler(BaseHTTPRequestHandler):
    replica: Replica
    protocol_version = "HTTP/1.1"
    server_version = "Jetty(9.3.z-SNAPSHOT)"
    # Headers and body are two writes: with Nagle on a kept-alive connection the body waits for
    # the client's delayed ACK (40 ms). Jetty sets TCP_NODELAY too (acceptedTcpNoDelay).
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.replica._connections_lock:
            self.replica._connections.add(self.connection)

    def finish(self) -> None:
        with self.replica._connections_lock:
            self.replica._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json; qs=2") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data) -> None:
        # compact, like Jackson; orjson: /v2/apps of 5,000 tasks in ~15 ms instead of ~100 ms
        self._send(status, orjson.dumps(data))

    def _authorized(self) -> bool:
        auth = self.replica.auth
        if not auth:
            return True
        expected = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        if self.headers.get("Authorization") == expected:
            return True
        body = b'{"message":"Invalid username or password."}'
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="Mesosphere Marathon"')
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return False

    def do_GET(self) -> None:  # noqa: N802
        replica = self.replica
        replica._record(self.path)
        fault = replica.fault
        if fault == "hang":
            while replica.fault == "hang" and not replica._stopping.is_set():
                replica._stopping.wait(0.05)
            self.close_connection = True
            return
        if fault in ("500", "502", "503"):
            self._json(int(fault), {"message": "simulated failure"})
            return
        if not self._authorized():
            return
        parts = urlsplit(self.path)
        path, query = unquote(parts.path).rstrip("/") or "/", parse_qs(parts.query)
        if fault == "malformed" and path != "/v2/events":
            self._send(200, b'{"apps": [{"id": "/broken", ')
            return
        cluster = replica.cluster
        try:
            if path == "/ping":
                self._send(200, b"pong\n", "text/plain; charset=utf-8")
            elif path == "/v2/events":
                self._events(query)
            elif path == "/v2/info":
                self._json(200, {"name": "marathon", "version": "1.10.26" if cluster.shape != "1.4" else "1.4.13",
                                 "buildref": "simulated", "elected": True,
                                 "leader": f"127.0.0.1:{replica.port}", "frameworkId": "sim-framework-0000",
                                 "marathon_config": {"master": "zk://127.0.0.1:2181/mesos", "hostname": "127.0.0.1",
                                                     "http_port": replica.port, "task_launch_timeout": 300000},
                                 "zookeeper_config": {"zk": "zk://127.0.0.1:2181/marathon"},
                                 "http_config": {"http_port": replica.port, "https_port": 8443}})
            elif path == "/v2/leader":
                self._json(200, {"leader": f"127.0.0.1:{replica.port}"})
            elif path == "/v2/tasks":
                with cluster.lock:
                    tasks = [cluster.render_task(t, service_ports=True) for t in cluster.tasks.values()]
                self._json(200, {"tasks": tasks})
            elif path == "/v2/apps":
                embed = "apps.tasks" in query.get("embed", [])
                with cluster.lock:
                    by_app = cluster.tasks_by_app()
                    apps = [cluster.render_app_with_tasks(a, embed, by_app.get(a.id, [])) for a in cluster.apps.values()]
                self._json(200, {"apps": apps})
            elif path.startswith("/v2/apps/"):
                self._app(path[len("/v2/apps"):], query)
            else:
                self._json(404, {"message": f"Resource not found: {path}"})
        except SimError as error:
            self._json(404, {"message": f"{error.args[0]!s} does not exist"})
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _app(self, rest: str, query) -> None:
        cluster = self.replica.cluster
        with cluster.lock:
            if "/versions/" in rest:
                app_id, version = rest.rsplit("/versions/", 1)
                self._json(200, cluster.render_app(cluster._app(app_id), version))
            elif rest.endswith("/versions"):
                app = cluster._app(rest[: -len("/versions")])
                self._json(200, {"versions": sorted(set(app.versions) | {app.version}, reverse=True)})
            elif rest.endswith("/tasks"):
                app = cluster._app(rest[: -len("/tasks")])
                self._json(200, {"tasks": [cluster.render_task(t, service_ports=True)
                                           for t in cluster.tasks.values() if t.app_id == app.id]})
            else:
                app = cluster._app(rest)
                self._json(200, {"app": cluster.render_app_with_tasks(app, "app.tasks" in query.get("embed", []))})

    def _events(self, query) -> None:
        replica, cluster = self.replica, self.replica.cluster
        if replica.refuse_events:
            self._json(replica.refuse_events, {"message": "event stream refused (simulated)"})
            return
        if "text/event-stream" not in self.headers.get("Accept", ""):
            self._json(406, {"message": "Accept: text/event-stream required"})
            return
        types = frozenset(query["event_type"]) if "event_type" in query else None
        light = query.get("plan-format", ["heavy"])[0] == "light"
        q = cluster.subscribe(types, light)
        replica._streams.add(q)
        try:
            self.send_response(200)
            for name, value in (("Cache-Control", "no-cache, no-store, must-revalidate"), ("Connection", "close"),
                                ("Content-Type", "text/event-stream;charset=UTF-8"), ("Expires", "0"),
                                ("Pragma", "no-cache")):
                self.send_header(name, value)
            self.end_headers()
            self.close_connection = True
            replica.stream_opens.append(time.time())
            attached = {"remoteAddress": self.client_address[0], "eventType": "event_stream_attached",
                        "timestamp": cluster.timestamp()}
            if types is None or "event_stream_attached" in types:
                self.wfile.write(cluster.frame("event_stream_attached", attached))
            self.wfile.flush()
            while not replica._stopping.is_set() and not replica.close_streams:
                try:
                    item = q.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item == "drop":
                    return
                if item == "stall" or replica.stall:
                    continue  # the stream stays open but says nothing
                self.wfile.write(item)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        finally:
            replica._streams.discard(q)
            cluster.unsubscribe(q)
