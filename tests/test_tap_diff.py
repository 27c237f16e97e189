"""`proxymatic tap --diff`: what each data message changed since the previous one on its topic."""
from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time

import pytest

from services.common.bus import Message
from services.tap import Differ, diff_payloads, heartbeats_asked
from sim.pipeline import PROXYMATIC, Pipeline

ARROW = "\u2192"


def service(name: str, port: int, servers: list[dict], **fields) -> dict:
    return {"name": name, "port": port, "protocol": "tcp", "mode": "tcp", "source": "file", "health_check": None,
            "timeout_client": None, "timeout_server": None, "host_network": False, "servers": servers, **fields}


def server(ip: str, port: int, weight: int = 500, maxconn: int | None = None) -> dict:
    return {"ip": ip, "port": port, "hostname": "", "weight": weight, "maxconn": maxconn}


def summary(**fields) -> dict:
    """A source's summary (source.<name>)."""
    return {"schema": 2, "source": "file", "state": "ok", "error": "", "warnings": [], "excluded": [], "hash": "h",
            "count": 1, **fields}


def entry(service: dict | None, excluded: list | None = None) -> dict:
    """One key's payload (plan:<key>, source.<name>:<key>)."""
    return {"schema": 2, "service": service, "excluded": excluded or []}


DELETED = {"deleted": True}


def texts(topic: str, old, new) -> list[str]:
    return [change.text() for change in diff_payloads(topic, old, new)]


def test_services_and_servers_added_removed_changed():
    old_web = service("web", 1234, [server("10.0.0.1", 8080, 128), server("10.0.0.2", 8080)])
    new_web = service("web", 1234, [server("10.0.0.1", 8080, 256), server("10.0.0.3", 8080, maxconn=10)],
                      mode="http")
    assert texts("source.file:1234/tcp", entry(old_web), entry(new_web)) == [
        f"~ 1234/tcp web mode tcp {ARROW} http",
        f"~ 1234/tcp web: 10.0.0.1:8080 weight 128 {ARROW} 256",
        "- 1234/tcp web: 10.0.0.2:8080 weight 500",
        "+ 1234/tcp web: 10.0.0.3:8080 weight 500 maxconn 10",
    ]
    # a tombstone removes the service; a key heard for the first time is all additions
    assert texts("source.file:5432/tcp", entry(service("db", 5432, [server("10.0.0.9", 5432)])), DELETED) == [
        "- 5432/tcp db (1 server)"]
    assert texts("source.file:6379/tcp", None, entry(service("cache", 6379, [server("10.0.0.5", 6379)]))) == [
        "+ 6379/tcp cache (tcp, mode tcp, 1 server)",
        "+ 6379/tcp cache: 10.0.0.5:6379 weight 500",
    ]
    assert texts("source.file:5432/tcp", None, DELETED) == []  # gone before the tap came: nothing to say
    # the source's summary: its own fields
    assert texts("source.file", summary(), summary(state="degraded", error="etcd down", warnings=["entry x skipped"],
                                                     hash="g", count=2)) == [
        f"~ state: ok {ARROW} degraded",
        f"~ error: '' {ARROW} etcd down",
        "+ warning: entry x skipped",
    ]
    assert texts("source.file:1234/tcp", entry(new_web), entry(new_web)) == []


def test_plan_notes_excluded_and_applied_fields():
    excluded = {"source": "marathon", "code": "health_failing", "reason": "health check failing", "app": "/shop/web",
                "task": "t1", "service": "web.shop", "key": "1234/tcp", "address": "10.0.0.7:31002"}
    old = {"schema": 2, "hash": "a", "count": 0, "notes": ["a"], "excluded": [], "sources_ready": ["file"]}
    new = {"schema": 2, "hash": "b", "count": 0, "notes": ["b"], "excluded": [], "sources_ready": ["file", "marathon"]}
    assert texts("plan", old, new) == [
        f"~ sources_ready: [\"file\"] {ARROW} [\"file\", \"marathon\"]",
        "- note: a", "+ note: b",
    ]
    # the entries not served under a key ride on that key's message
    web = service("web.shop", 1234, [])
    assert texts("plan:1234/tcp", entry(web), entry(web, [excluded])) == [
        "+ excluded: 1234/tcp web.shop 10.0.0.7:31002 /shop/web t1: health check failing (marathon)"]
    assert texts("plan:1234/tcp", entry(web, [excluded]), entry(None, [excluded])) == ["- 1234/tcp web.shop (0 servers)"]
    assert texts("applied.vm", {"plan_hash": "x", "ok": True, "action": "none", "errors": []},
                 {"plan_hash": "y", "ok": False, "action": "rejected", "errors": ["bad"]}) == [
        f"~ plan_hash: x {ARROW} y", f"~ ok: True {ARROW} False", f"~ action: none {ARROW} rejected", "+ error: bad"]


def test_first_message_in_full_or_in_one_line():
    small = entry(service("web", 1234, [server("10.0.0.1", 8080)]))
    differ = Differ(first_state_lines=5)
    text = differ.render(Message("source.file:1234/tcp", 1, time.time(), "collector@n", "e", small), False)
    assert text.splitlines()[0].endswith("web 1 server")
    assert text.splitlines()[1:] == ["  + 1234/tcp web (tcp, mode tcp, 1 server)", "  + 1234/tcp web: 10.0.0.1:8080 weight 500"]
    big = entry(service("s", 2000, [server("10.0.0.1", 3000 + i) for i in range(10)]))
    text = differ.render(Message("plan:2000/tcp", 1, time.time(), "planner@n", "e", big), False)
    assert len(text.splitlines()) == 2 and "first message on plan:2000/tcp: s 10 servers (11 lines not shown)" in text
    document = json.loads(differ.render(Message("plan:2000/tcp", 2, time.time(), "planner@n", "e", big), True))
    assert document["changes"] == [] and document["first"] is False and document["summary"] == "no change in content"
    # a summary whose keys changed but not its own fields: its line alone
    plan_summary = {"schema": 2, "hash": "a", "count": 1, "sources_ready": ["file"], "notes": []}
    differ.render(Message("plan", 3, time.time(), "planner@n", "e", plan_summary), False)
    text = differ.render(Message("plan", 4, time.time(), "planner@n", "e", {**plan_summary, "hash": "b"}), False)
    assert text.splitlines() == [text.splitlines()[0]] and "hash=b services=1 ready=['file'] notes=0" in text
    deleted = differ.render(Message("plan:2000/tcp", 5, time.time(), "planner@n", "e", DELETED), False)
    assert deleted.splitlines()[0].endswith(" deleted") and deleted.splitlines()[1:] == ["  - 2000/tcp s (10 servers)"]


def test_heartbeats_only_when_asked():
    assert not heartbeats_asked([]) and not heartbeats_asked(["plan", "source."])
    assert heartbeats_asked(["heartbeat.planner"]) and heartbeats_asked(["heart"])


class Tap:
    """`proxymatic tap --diff` on a run dir, its lines read as they come."""

    def __init__(self, run_dir: str, *extra: str):
        self.process = subprocess.Popen([*PROXYMATIC, "tap", "--run-dir", run_dir, "--diff", *extra],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.seen: list[str] = []
        self.cursor = 0  # lines before it were looked at by a previous `until`
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def until(self, wanted: str, timeout: float = 30) -> list[str]:
        """Every line so far, once one after the previous match contains `wanted`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while self.cursor < len(self.seen):
                self.cursor += 1
                if wanted in self.seen[self.cursor - 1]:
                    return self.seen
            self._read_one()
        raise AssertionError(f"tap never showed {wanted!r}; it showed:\n" + "\n".join(self.seen))

    def until_in_block(self, topic: str, wanted: str, timeout: float = 30) -> list[str]:
        """Every line so far, once a message on `topic` shows the diff line `wanted`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(wanted in block for block in blocks(self.seen, topic)):
                return self.seen
            self._read_one()
        raise AssertionError(f"tap never showed {wanted!r} on {topic}; it showed:\n" + "\n".join(self.seen))

    def _read_one(self) -> None:
        try:
            self.seen.append(self.lines.get(timeout=0.2))
        except queue.Empty:
            pass

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.process.stdout.close()
        self.process.stderr.close()


def blocks(lines: list[str], topic: str) -> list[list[str]]:
    """The diff lines under each message line of `topic`."""
    found, current = [], None
    for line in lines:
        if not line.startswith("  "):
            current = [] if line.split()[1] == topic else None
            if current is not None:
                found.append(current)
        elif current is not None:
            current.append(line.strip())
    return found


def write(path: str, servers: list[tuple[str, int, int]]) -> None:
    document = {"services": [{"name": "web", "port": 11234, "servers": [{"host": ip, "port": port, "weight": weight}
                                                                        for ip, port, weight in servers]}]}
    with open(path + ".tmp", "w") as handle:
        json.dump(document, handle)
    os.replace(path + ".tmp", path)


@pytest.fixture
def pipeline():
    pipeline = Pipeline([], programs=("collector", "planner"), services_file=True)
    write(pipeline.services_file, [("10.0.0.1", 8080, 500), ("10.0.0.2", 8080, 500)])
    pipeline.start()
    yield pipeline
    pipeline.cleanup()


def test_diff_through_a_running_pipeline(pipeline):
    tap = Tap(pipeline.run_dir)
    try:
        # The first messages (from the snapshots): the whole state as additions.
        tap.until_in_block("plan:11234/tcp", "+ 11234/tcp web: 10.0.0.2:8080 weight 500")
        write(pipeline.services_file, [("10.0.0.2", 8080, 1000), ("10.0.0.3", 8080, 500)])
        # from two publishers, in either order: the source's message and the plan's
        tap.until_in_block("plan:11234/tcp", "+ 11234/tcp web: 10.0.0.3:8080 weight 500")
        lines = tap.until_in_block("source.file:11234/tcp", "+ 11234/tcp web: 10.0.0.3:8080 weight 500")
    finally:
        tap.close()
    assert not any("heartbeat" in line for line in lines)
    first_source, *later_source = blocks(lines, "source.file:11234/tcp")
    assert "+ 11234/tcp web: 10.0.0.1:8080 weight 500" in first_source
    assert later_source[-1] == ["- 11234/tcp web: 10.0.0.1:8080 weight 500",
                                f"~ 11234/tcp web: 10.0.0.2:8080 weight 500 {ARROW} 1000",
                                "+ 11234/tcp web: 10.0.0.3:8080 weight 500"]
    assert blocks(lines, "plan:11234/tcp")[-1] == later_source[-1]  # the plan keeps the user's weights
    assert blocks(lines, "plan")[-1] == []  # the summary: its fields did not change


def test_diff_as_json_and_heartbeats_when_asked(pipeline):
    tap = Tap(pipeline.run_dir, "--json", "--topic", "plan", "--topic", "heartbeat.planner")
    try:
        tap.until('"topic": "heartbeat.planner@')
        if not any('"topic": "plan"' in line for line in tap.seen):
            tap.until('"topic": "plan"')
        write(pipeline.services_file, [("10.0.0.1", 8080, 500)])
        lines = tap.until('"op": "-"')
    finally:
        tap.close()
    documents = [json.loads(line) for line in lines]
    plans = [d for d in documents if d["topic"] == "plan:11234/tcp"]
    assert plans[0]["first"] is True
    assert {"op": "-", "key": "11234/tcp", "name": "web", "server": "10.0.0.2:8080", "old": "weight 500"} \
        in plans[-1]["changes"]
    assert all("changes" not in d for d in documents if d["topic"].startswith("heartbeat"))


def test_a_payload_it_cannot_diff_is_dropped_and_the_next_good_one_diffed(tmp_path):
    """Hostile payloads in valid envelopes: the tap logs and skips each, remembers none of them,
    and diffs the next good message against the last good one."""
    import zmq

    from services.common.bus import Endpoint, Publisher
    endpoint = f"ipc://{tmp_path}/x.pub"
    out, err = tmp_path / "tap.out", tmp_path / "tap.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        process = subprocess.Popen([*PROXYMATIC, "tap", "--run-dir", str(tmp_path), "--bus", endpoint, "--diff"],
                                   stdout=stdout, stderr=stderr, start_new_session=True)
    publisher = Publisher(zmq.Context.instance(), "planner@x", Endpoint.parse(endpoint), heartbeat_interval=0.2)

    def printed(text: str) -> bool:
        publisher.serve_snapshots()
        publisher.heartbeat()
        return text in out.read_text()

    def web(*addresses: str) -> dict:
        return entry(service("web", 3000, [server(a, 80) for a in addresses]))
    try:
        publisher.publish("plan:3000/tcp", web("10.0.0.1"))
        wait(lambda: printed("+ 3000/tcp web: 10.0.0.1:80 weight 500"))
        for payload in ({"service": 5}, {"service": {"port": 1, "servers": 5}}, {"service": {"servers": [5]}},
                        {"service": None, "excluded": 5}):
            publisher.publish("plan:3000/tcp", payload)
        publisher.publish("plan:3000/tcp", web("10.0.0.1", "10.0.0.2"))
        wait(lambda: printed("+ 3000/tcp web: 10.0.0.2:80 weight 500"))
        assert process.poll() is None
        assert err.read_text().count("cannot show it") == 4
        last = out.read_text().split("seq=6")[1].splitlines()[1:]
        assert last == ["  + 3000/tcp web: 10.0.0.2:80 weight 500"]  # against the last good one
    finally:
        publisher.close()
        process.kill()
        process.wait(10)


def wait(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
