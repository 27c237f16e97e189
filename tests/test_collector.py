import queue
import threading

from services.collector.cache import SourceCache
from services.collector.main import SourceRunner
from services.collector.source import Discovery, Source, SourceError
from services.common.model import Service, SourceSnapshot

WEB = Service.from_dict({"name": "web", "port": 1234, "servers": [{"ip": "10.0.0.1", "port": 80}]})


class ScriptedSource(Source):
    """Answers from a script: a Discovery, or an exception to raise."""

    name = "file"

    def __init__(self, *answers):
        self.answers = list(answers)

    def current(self):
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def wait_for_change(self, timeout, stop):
        stop.wait(0.01)


def run_until(runner, count):
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    got = [runner.updates.get(timeout=10).snapshot for _ in range(count)]
    runner.stop.set()
    thread.join(10)
    return got


def test_failure_before_any_success_is_initializing_then_ok():
    runner = SourceRunner(ScriptedSource(SourceError("down"), Discovery((WEB,))), 60, queue.Queue(), threading.Event())
    first, second = run_until(runner, 2)
    assert (first.state, first.services, first.error) == ("initializing", (), "down")
    assert (second.state, second.services) == ("ok", (WEB,))


def test_failure_after_success_keeps_last_good_state():
    runner = SourceRunner(ScriptedSource(Discovery((WEB,)), SourceError("gone")), 60, queue.Queue(), threading.Event())
    first, second = run_until(runner, 2)
    assert first.state == "ok"
    assert (second.state, second.services, second.error) == ("degraded", (WEB,), "gone")


def test_a_bug_in_a_source_is_reported_not_fatal():
    runner = SourceRunner(ScriptedSource(Discovery((WEB,)), KeyError("oops")), 60, queue.Queue(), threading.Event())
    _, second = run_until(runner, 2)
    assert second.state == "degraded" and "internal error" in second.error


def test_saved_state_survives_a_restart_during_an_outage(tmp_path):
    cache = SourceCache(str(tmp_path))
    cache.remember(SourceSnapshot("file", "ok", (WEB,)))
    cache.flush(force=True)
    saved = SourceCache(str(tmp_path)).load("file")
    assert saved.state == "degraded" and saved.services == (WEB,) and "last good state" in saved.error
    runner = SourceRunner(ScriptedSource(SourceError("still down")), 60, queue.Queue(), threading.Event(),
                          Discovery(saved.services))
    (update,) = run_until(runner, 1)
    assert (update.state, update.services) == ("degraded", (WEB,))


def test_unreadable_saved_state_is_ignored(tmp_path):
    (tmp_path / "file.json").write_text("{garbage")
    assert SourceCache(str(tmp_path)).load("file") is None
    assert SourceCache(str(tmp_path)).load("marathon") is None


def test_a_source_that_only_polls_is_degraded_with_its_reason_then_ok_again():
    late = Discovery((WEB,), degraded="event stream down since 10:00:00: HTTP 503; polling every 60s")
    runner = SourceRunner(ScriptedSource(Discovery((WEB,)), late, Discovery((WEB,))), 60, queue.Queue(),
                          threading.Event())
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    reports = [runner.updates.get(timeout=10) for _ in range(3)]
    runner.stop.set()
    thread.join(10)
    assert [(r.snapshot.state, r.snapshot.error) for r in reports] == [
        ("ok", ""), ("degraded", late.degraded), ("ok", "")]
    # its services are current: saved as the last good state, unlike a failure's kept state
    assert all(r.live and r.snapshot.services == (WEB,) for r in reports)


def test_a_failure_is_not_saved_as_last_good_state():
    runner = SourceRunner(ScriptedSource(Discovery((WEB,)), SourceError("gone")), 60, queue.Queue(),
                          threading.Event())
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    first, second = (runner.updates.get(timeout=10) for _ in range(2))
    runner.stop.set()
    thread.join(10)
    assert (first.live, second.live) == (True, False)


def test_credentials_never_reach_a_published_error_or_warning():
    leaky = Discovery((WEB,), warnings=("app x: see http://admin:s3cret@m1:8080/v2",),
                      degraded="event stream down: http://admin:s3cret@m1:8080 refused")
    for answers in ((leaky,), (Discovery((WEB,)), SourceError("http://admin:s3cret@m1:8080: HTTP 500")),
                    (Discovery((WEB,)), KeyError("http://admin:s3cret@m1:8080"))):
        runner = SourceRunner(ScriptedSource(*answers), 60, queue.Queue(), threading.Event())
        for snapshot in run_until(runner, 2):
            text = repr(snapshot.to_dict())
            assert "s3cret" not in text
            assert "admin:***@m1" in text or snapshot.state == "ok"
