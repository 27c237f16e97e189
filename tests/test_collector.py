import json
import logging
import os
import queue
import threading

import zmq

from services.collector.cache import SourceCache
from services.collector.main import SourceRunner
from services.collector.source import Discovery, Source, SourceError
from services.common.bus import Subscriber
from services.common.config import Settings
from services.common.model import Service, SourceSnapshot
from sim.pipeline import Pipeline
from tests.helpers import wait_until
from tests.keyed_watch import KeyedWatch

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


# ---------------------------------------------------------------------------------------------
# A source that cannot be built is published degraded; the others run (B4)

def test_a_source_with_a_bad_url_becomes_a_broken_source_and_the_others_are_built(tmp_path, caplog):
    from services.collector.file_source import FileSource
    from services.collector.main import build_sources
    from services.collector.source import BrokenSource

    with caplog.at_level(logging.ERROR, logger="proxymatic.collector"):
        sources = build_sources(Settings(marathon="http://admin:s3cret@m1:99999",
                                         registrator="etcd://u:s3cret@h:99999/services",
                                         services_file=str(tmp_path / "services.json")))
    assert [(type(s), s.name) for s in sources] == [(BrokenSource, "marathon"), (BrokenSource, "registrator"),
                                                    (FileSource, "file")]
    marathon, registrator = sources[0].reason, sources[1].reason
    assert marathon.startswith("cannot start: MARATHON_URL: ") and "m1:99999" in marathon
    assert registrator == "cannot start: REGISTRATOR_URL: registrator URL 'etcd://u:***@h:99999/services': bad port '99999'"
    assert "s3cret" not in caplog.text and "cannot start" in caplog.text


def test_a_bug_in_a_source_constructor_is_a_broken_source_too(monkeypatch):
    from services.collector import main
    from services.collector.source import BrokenSource

    def broken(settings):
        raise KeyError("http://admin:s3cret@m1:8080")

    monkeypatch.setattr(main, "SOURCE_BUILDERS", (("marathon", "marathon", "MARATHON_URL", broken),))
    (source,) = main.build_sources(Settings(marathon="http://m1:8080"))
    assert isinstance(source, BrokenSource) and "internal error" in source.reason and "s3cret" not in source.reason


def test_a_broken_source_is_degraded_with_its_reason_at_once():
    from services.collector.source import BrokenSource

    runner = SourceRunner(BrokenSource("registrator", "cannot start: REGISTRATOR_URL: bad port"), 60, queue.Queue(),
                          threading.Event())
    (update,) = run_until(runner, 1)
    assert (update.state, update.services, update.error) == ("degraded", (), "cannot start: REGISTRATOR_URL: bad port")
    # with a saved last good state, that is kept (a discovery fault never empties the proxies)
    runner = SourceRunner(BrokenSource("registrator", "bad"), 60, queue.Queue(), threading.Event(), Discovery((WEB,)))
    (update,) = run_until(runner, 1)
    assert (update.state, update.services, update.error) == ("degraded", (WEB,), "bad")


def test_collector_process_with_bad_source_urls_serves_the_file_source(tmp_path):
    """The real collector: two sources with URLs that do not parse are published degraded with
    the (redacted) reason; the file source runs normally, and the collector keeps running."""
    pipeline = Pipeline(["--marathon", "http://admin:s3cret@m1:99999",
                         "--registrator", "etcd://u:s3cret@h:99999/services"],
                        programs=("collector",), services_file=True)
    os.makedirs(pipeline.run_dir, exist_ok=True)
    with open(pipeline.services_file, "w") as handle:
        json.dump({"services": [{"name": "web", "port": 1234, "servers": [{"host": "10.0.0.1", "port": 80}]}]},
                  handle)
    ctx = zmq.Context()
    watch = KeyedWatch([Settings(run_dir=pipeline.run_dir).bus("collector")], ["source."], ctx)

    def heard() -> dict[str, SourceSnapshot]:
        return watch.poll(0.05).snapshots

    try:
        pipeline.start()
        wait_until(lambda: {"file", "marathon", "registrator"} <= heard().keys()
                   and watch.snapshots["file"].state == "ok", timeout=30, message="every source published")
        assert [(s.name, s.port) for s in watch.snapshots["file"].services] == [("web", 1234)]
        registrator, marathon = watch.snapshots["registrator"], watch.snapshots["marathon"]
        assert (registrator.state, registrator.services) == ("degraded", ())
        assert registrator.error == ("cannot start: REGISTRATOR_URL: registrator URL "
                                     "'etcd://u:***@h:99999/services': bad port '99999'")
        assert (marathon.state, marathon.services) == ("degraded", ())
        assert marathon.error.startswith("cannot start: MARATHON_URL: ")
        # the file source still follows changes: the collector is alive and well
        with open(pipeline.services_file + ".tmp", "w") as handle:
            json.dump({"services": [{"name": "api", "port": 2345, "servers": [{"host": "10.0.0.2", "port": 80}]}]},
                      handle)
        os.replace(pipeline.services_file + ".tmp", pipeline.services_file)
        wait_until(lambda: [s.name for s in heard()["file"].services] == ["api"], timeout=30,
                   message="the file change published")
        assert pipeline.processes["collector"].poll() is None and watch.errors == [] and watch.resyncs == 0
        assert "s3cret" not in json.dumps(watch.summaries) and "s3cret" not in pipeline.log("collector")
    finally:
        watch.close()
        ctx.term()
        pipeline.cleanup()


# ---------------------------------------------------------------------------------------------
# Runner threads and the publish loop never die silently (B8)

def test_a_bug_while_reporting_is_reported_degraded_and_the_runner_goes_on(caplog):
    # A warning that is not a text breaks `_report` (redact), outside the source's own guard.
    bad = Discovery((WEB,), warnings=(42,))
    runner = SourceRunner(ScriptedSource(Discovery((WEB,)), bad, Discovery((WEB,), warnings=("fine",))), 60,
                          queue.Queue(), threading.Event())
    thread = threading.Thread(target=runner.run, daemon=True)
    with caplog.at_level(logging.ERROR, logger="proxymatic.collector"):
        thread.start()
        reports = [runner.updates.get(timeout=10) for _ in range(3)]
        alive = thread.is_alive()
    runner.stop.set()
    thread.join(10)
    assert alive and not thread.is_alive()
    states = [(r.snapshot.state, r.snapshot.services, r.live) for r in reports]
    assert states == [("ok", (WEB,), True), ("degraded", (WEB,), False), ("ok", (WEB,), True)]
    assert "internal error in the collector" in reports[1].snapshot.error
    assert reports[2].snapshot.warnings == ("fine",)
    assert "Traceback" in caplog.text and "TypeError" in caplog.text


def test_a_bug_while_reporting_before_any_answer_keeps_the_source_initializing():
    runner = SourceRunner(ScriptedSource(Discovery((WEB,), warnings=(None,)), Discovery((WEB,))), 60, queue.Queue(),
                          threading.Event())
    first, second = run_until(runner, 2)
    assert (first.state, first.services) == ("initializing", ()) and "internal error" in first.error
    assert (second.state, second.services) == ("ok", (WEB,))


def test_the_publish_loop_survives_a_bug_with_one_message(tmp_path, monkeypatch, caplog):
    from services.collector import main

    real_summarize, calls = main.summarize, []

    def summarize_once_broken(snapshot, hash_):
        calls.append(snapshot.source)
        if len(calls) == 1:
            raise RuntimeError("a bug with this message")
        return real_summarize(snapshot, hash_)

    monkeypatch.setattr(main, "summarize", summarize_once_broken)
    settings = Settings(run_dir=str(tmp_path))
    source = ScriptedSource(Discovery((WEB,)), Discovery(()), Discovery((WEB,)))
    source.wait_for_change = lambda timeout, stop: stop.wait(0.05)  # noqa: E731 - answers change every 50 ms
    stop = threading.Event()
    collector = threading.Thread(target=main.run, args=(settings, stop, [source]), daemon=True)
    ctx = zmq.Context()
    subscriber = Subscriber(ctx, [settings.bus("collector")], ["source.file"])
    try:
        with caplog.at_level(logging.ERROR, logger="proxymatic.collector"):
            collector.start()
            wait_until(lambda: any(m.topic == "source.file" for m in subscriber.poll(0.05)), timeout=30,
                       message="a snapshot published after the failed one")
            assert collector.is_alive()
        assert "error in the publish loop" in caplog.text and "a bug with this message" in caplog.text
    finally:
        stop.set()
        collector.join(10)
        subscriber.close()
        ctx.term()
    assert not collector.is_alive()


def test_a_runner_thread_that_ended_is_restarted_and_its_source_reported(caplog):
    from services.collector.main import _check_runners

    runner = SourceRunner(ScriptedSource(Discovery((WEB,))), 60, queue.Queue(), threading.Event(), Discovery((WEB,)))
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    runners = [(runner, dead)]
    with caplog.at_level(logging.ERROR, logger="proxymatic.collector"):
        _check_runners(runners)
    try:
        assert runners[0][1] is not dead and runners[0][1].is_alive()
        first = runner.updates.get(timeout=10).snapshot
        assert (first.state, first.services) == ("degraded", (WEB,)) and "thread ended" in first.error
        assert runner.updates.get(timeout=10).snapshot.state == "ok"  # the new thread runs the source
        assert "ended unexpectedly" in caplog.text
    finally:
        runner.stop.set()
        runners[0][1].join(10)
    assert not runners[0][1].is_alive()
