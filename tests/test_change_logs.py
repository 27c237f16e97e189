"""One INFO line per changed service when a source's snapshot changes: which source, which
service, what changed and why, bounded, with the facts as logger fields."""
from __future__ import annotations

import logging
import queue
import threading

from services.collector.changes import MAX_LINES, ChangeLog
from services.collector.main import SourceRunner
from services.collector.source import Discovery, Source
from services.common.model import Service

log = logging.getLogger("proxymatic.test.changes")


def service(port: int, *servers: tuple[str, int, int], name: str = "web", mode: str = "tcp") -> Service:
    return Service.from_dict({"name": name, "port": port, "mode": mode, "servers": [
        {"ip": ip, "port": p, "weight": weight} for ip, p, weight in servers]})


def test_changes_name_servers_added_removed_and_reweighted_and_services_added_and_removed():
    changes = ChangeLog("marathon", log, (service(1234, ("10.0.0.1", 80, 500), ("10.0.0.2", 80, 500)),
                                          service(1235, ("10.0.0.5", 80, 500), name="old")))
    kept = service(1236, ("10.0.0.9", 80, 500), name="same")
    first = changes.changes((service(1234, ("10.0.0.1", 80, 200), ("10.0.0.3", 80, 500), mode="http"),
                             service(1237, ("10.0.0.7", 81, 500), name="new"), kept))
    assert first == [
        ("1234/tcp", "web", "~mode tcp->http ~weight 500->200 10.0.0.1:80 +10.0.0.3:80 -10.0.0.2:80"),
        ("1237/tcp", "new", "service added (1 servers): +10.0.0.7:81"),
        ("1236/tcp", "same", "service added (1 servers): +10.0.0.9:80"),
        ("1235/tcp", "old", "service removed (1 servers)"),
    ]
    # the same services again (equal, or the very same tuple): nothing to say
    again = (service(1234, ("10.0.0.1", 80, 200), ("10.0.0.3", 80, 500), mode="http"),
             service(1237, ("10.0.0.7", 81, 500), name="new"), kept)
    assert changes.changes(again) == []
    assert changes.changes(again) == []
    assert changes.changes(()) == [("1234/tcp", "web", "service removed (2 servers)"),
                                   ("1237/tcp", "new", "service removed (1 servers)"),
                                   ("1236/tcp", "same", "service removed (1 servers)")]


def test_a_service_replaced_by_another_at_the_same_place_is_one_removed_and_one_added():
    a, b, c = service(1000, ("10.0.0.1", 80, 500)), service(2000, ("10.0.0.2", 80, 500)), service(3000)
    changes = ChangeLog("file", log, (a, b))
    assert changes.changes((a, b)) == []
    assert changes.changes((a, c)) == [("3000/tcp", "web", "service added (0 servers)"),
                                       ("2000/tcp", "web", "service removed (1 servers)")]
    moved = service(3000, ("10.0.0.3", 80, 500))
    assert changes.changes((a, moved)) == [("3000/tcp", "web", "+10.0.0.3:80")]
    assert changes.changes((b, moved)) == [("2000/tcp", "web", "service added (1 servers): +10.0.0.2:80"),
                                           ("1000/tcp", "web", "service removed (1 servers)")]


def test_a_snapshot_logs_at_most_twenty_lines_then_how_many_more_with_fields(caplog):
    changes = ChangeLog("registrator", log)
    many = tuple(service(2000 + n, ("10.0.0.1", 3000 + n, 500), name=f"s{n}") for n in range(25))
    with caplog.at_level(logging.INFO, logger=log.name):
        assert changes.report(many, "watch") == 25
    lines = [r for r in caplog.records if r.name == log.name]
    assert len(lines) == MAX_LINES + 1
    first = lines[0]
    assert first.getMessage() == "source registrator: service 2000/tcp (s0) service added (1 servers): +10.0.0.1:3000 [watch]"
    assert (first.source, first.service, first.service_name, first.event) == ("registrator", "2000/tcp", "s0", "watch")
    assert first.change.startswith("service added")
    assert lines[-1].getMessage() == "source registrator: ... and 5 more changed services [watch]"
    assert lines[-1].more == 5


def test_a_change_with_many_servers_is_one_bounded_line():
    changes = ChangeLog("file", log, (service(1234),))
    wide = service(1234, *((f"10.0.1.{n}", 80, 500) for n in range(1, 40)))
    ((_, _, text),) = changes.changes((wide,))
    assert text.startswith("+10.0.1.1:80 +10.0.1.10:80") and text.endswith("(and 29 more)")


class Answers(Source):
    name = "marathon"

    def __init__(self, *answers: tuple[str, Discovery]):
        self.answers = list(answers)

    def current(self) -> Discovery:
        self.cause, answer = self.answers.pop(0)
        return answer

    def wait_for_change(self, timeout, stop):
        pass


def test_the_runner_logs_what_changed_and_why_only_when_the_services_change(caplog):
    one = service(1234, ("10.0.0.1", 80, 500))
    two = service(1234, ("10.0.0.1", 80, 500), ("10.0.0.2", 80, 500))
    source = Answers(("resync", Discovery((one,))), ("health_status_changed_event", Discovery((one,), warnings=("x",))),
                     ("status_update_event, health_status_changed_event", Discovery((two,))))
    runner = SourceRunner(source, 60, queue.Queue(), threading.Event())
    with caplog.at_level(logging.INFO, logger="proxymatic.collector"):
        for _ in range(3):
            runner._round()
    lines = [r for r in caplog.records if getattr(r, "service", None) == "1234/tcp"]
    assert [r.getMessage() for r in lines] == [
        "source marathon: service 1234/tcp (web) service added (1 servers): +10.0.0.1:80 [resync]",
        "source marathon: service 1234/tcp (web) +10.0.0.2:80 [status_update_event, health_status_changed_event]",
    ]
    assert lines[1].event == "status_update_event, health_status_changed_event" and lines[1].source == "marathon"
