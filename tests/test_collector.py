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
    got = [runner.updates.get(timeout=10) for _ in range(count)]
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
