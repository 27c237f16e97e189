"""Small real backends that say who they are: for tests, benchmarks and `make demo`."""
from __future__ import annotations

import json
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ServedBackend:
    """A socketserver served from a daemon thread, a daemon thread per connection: `port`, `close()`."""

    server: socketserver.BaseServer
    port: int

    def _start(self, server: socketserver.BaseServer) -> None:
        self.server = server
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TcpBackend(ServedBackend):
    """A TCP server that answers every connection with its name and closes: `who is serving?`"""

    def __init__(self, name: str, port: int | None = None):
        self.name = name
        self.connections = 0
        backend = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                backend.connections += 1
                self.request.sendall(backend.name.encode() + b"\n")

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._start(socketserver.ThreadingTCPServer(("127.0.0.1", port or 0), Handler))


class EchoBackend(ServedBackend):
    """Echoes lines on a connection that stays open: proves a connection survives a reload."""

    def __init__(self):
        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for line in self.rfile:
                    self.wfile.write(line)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._start(socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler))


class QuietHTTPServer(ThreadingHTTPServer):
    """A proxy closing an idle keep-alive connection is normal: no traceback for it."""

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class HttpBackend(ServedBackend):
    """An HTTP server answering `name` on every path; `healthy` drives /health (200 or 503).
    With `echo_headers` it answers the request headers it received instead, as JSON (names in
    lower case): what a proxy in front added."""

    def __init__(self, name: str, delay: float = 0.0, echo_headers: bool = False):
        self.name = name
        self.healthy = True
        self.requests = 0
        self.delay = delay  # seconds spent on each request (a busy backend)
        self.echo_headers = echo_headers
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                backend.requests += 1
                if backend.delay:
                    time.sleep(backend.delay)
                if self.path == "/health" and not backend.healthy:
                    body, code = b"unhealthy\n", 503
                elif backend.echo_headers:
                    body, code = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode(), 200
                else:
                    body, code = backend.name.encode() + b"\n", 200
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Backend", backend.name)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._start(QuietHTTPServer(("127.0.0.1", 0), Handler))


class UdpEcho:
    """Answers every datagram with `<name>:<payload>`."""

    def __init__(self, name: str):
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(2048)
                self.sock.sendto(self.name.encode() + b":" + data, peer)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
