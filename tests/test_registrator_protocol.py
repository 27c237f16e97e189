"""The etcd v2 protocol details a real etcd rarely shows: a scripted fake etcd checks the
waitIndex sequence and that a long poll closed with an empty body is retried."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from services.collector.registrator import RegistratorSource
from services.common.config import Settings
from tests.helpers import ServedBackend, wait_until


class FakeEtcd(ServedBackend):
    """Answers GET /v2/keys/services: a full read, then scripted watch answers in order."""

    def __init__(self, watch_answers: list[tuple[int, bytes]]):
        self.watch_answers = list(watch_answers)
        self.requests: list[dict] = []
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                query = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
                fake.requests.append(query)
                if query.get("wait") != "true":
                    body = json.dumps({"action": "get", "node": {"key": "/services", "dir": True, "nodes": [
                        {"key": "/services/web", "dir": True, "nodes": [
                            {"key": "/services/web/h:web.0:80", "value": "10.0.0.1:1", "modifiedIndex": 5}]}]}})
                    self.answer(200, body.encode(), index=41)
                elif fake.watch_answers:
                    status, body = fake.watch_answers.pop(0)
                    self.answer(status, body, index=41)
                else:  # an idle long poll: like etcd, headers at once, the body when it ends
                    self.send_response(200)
                    self.send_header("X-Etcd-Index", "41")
                    self.send_header("X-Etcd-Cluster-Id", "fake")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.flush()
                    fake.release.wait(5)
                    self.wfile.write(b"0\r\n\r\n")

            def answer(self, status: int, body: bytes, index: int) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Etcd-Index", str(index))
                self.send_header("X-Etcd-Cluster-Id", "fake")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._start(ThreadingHTTPServer(("127.0.0.1", 0), Handler))

    def close(self) -> None:
        self.release.set()
        super().close()


def test_wait_index_sequence_and_empty_body_retry():
    event = {"action": "set", "node": {"key": "/services/web/h:web.1:80", "value": "10.0.0.2:1",
                                       "modifiedIndex": 57, "createdIndex": 57}}
    fake = FakeEtcd([(200, b""), (200, json.dumps(event).encode())])
    source = RegistratorSource(Settings(registrator=f"etcd://127.0.0.1:{fake.port}/services"),
                               watch_timeout=10, backoff_start=0.05)
    try:
        assert [s.ip for s in source.current().services[0].servers] == ["10.0.0.1"]
        wait_until(lambda: len(source.current().services[0].servers) == 2, message="event applied")
        wait_until(lambda: len(fake.requests) >= 4, message="next long poll")
        watches = [r for r in fake.requests if r.get("wait") == "true"]
        # X-Etcd-Index + 1 after the full read; the same index again after the empty body;
        # the event's modifiedIndex + 1 after the event.
        assert [w["waitIndex"] for w in watches[:3]] == ["42", "42", "58"]
        assert all(w["recursive"] == "true" for w in watches)
        assert source.stats["empty_polls"] == 1 and source.stats["full_reads"] == 1
        assert source.error == ""
    finally:
        source.close()
        fake.close()
