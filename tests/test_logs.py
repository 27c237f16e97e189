"""LOG_FORMAT: text by default (as it always looked), or one JSON object per line in every
stage's log (ts, level, stage, msg and the records' extra fields)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from tests.helpers import free_port, wait_until
from tests.launcher_helpers import Run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("collector", "planner", "applier", "status")

SCRIPT = """
import logging, sys, threading, warnings
from services.common.config import Settings
from services.common.logs import configure_logging
configure_logging(Settings(log_format=sys.argv[1]), "collector")
log = logging.getLogger("proxymatic.collector")
log.info("source %s: ok", "file", extra={"source": "file", "service": "1234/tcp", "event": "published"})
try:
    1 / 0
except ZeroDivisionError:
    log.exception("it failed")
warnings.warn("a warning")
print("a stray line\\nand another", file=sys.stderr)
threading.Thread(target=lambda: 1 / 0).start()
"""


def run_script(log_format: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", SCRIPT, log_format], cwd=ROOT, capture_output=True, text=True,
                            timeout=30)
    assert result.stdout == ""
    return result.stderr.splitlines()


def test_text_is_the_default_and_looks_as_before():
    lines = run_script("text")
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO collector\[\d+\] proxymatic\.collector: "
                    r"source file: ok$", lines[0])
    assert lines[1].endswith("ERROR collector[%s] proxymatic.collector: it failed" % lines[0].split("[")[1].split("]")[0])
    assert lines[2] == "Traceback (most recent call last):"  # tracebacks as they always were


def test_json_every_line_one_object_with_the_extra_fields():
    lines = run_script("json")
    records = [json.loads(line) for line in lines]  # every line parses
    for record in records:
        assert list(record)[:4] == ["ts", "level", "stage", "msg"] and record["stage"] == "collector"
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00$", record["ts"])
    first = records[0]
    assert (first["level"], first["msg"], first["logger"]) == ("INFO", "source file: ok", "proxymatic.collector")
    assert (first["source"], first["service"], first["event"]) == ("file", "1234/tcp", "published")
    assert "ZeroDivisionError" in records[1]["exc_info"] and records[1]["msg"] == "it failed"
    assert any("a warning" in r["msg"] and r["logger"] == "py.warnings" for r in records)
    assert [r["msg"] for r in records if r["logger"] == "stderr"] == ["a stray line", "and another"]
    assert any(r["level"] == "CRITICAL" and "uncaught exception in thread" in r["msg"] and "ZeroDivisionError"
               in r["exc_info"] for r in records)


def test_json_in_every_stage_log_under_the_launcher():
    run = Run()
    port = free_port()
    try:
        run.write([{"name": "web", "port": port, "servers": [{"host": "127.0.0.1", "port": 9}]}])
        launcher = run.start(env={"LOG_FORMAT": "json"})
        run.wait_ok()
        # a change, a warning and a bad file: more lines of more kinds in every stage
        with open(run.services_file, "w") as handle:
            handle.write("{not json")
        logs = os.path.join(run.run_dir, "logs")
        wait_until(lambda: "degraded" in read(logs, "collector"), timeout=30, message="the collector's warning")
        run.write([{"name": "web", "port": port, "servers": [{"host": "127.0.0.1", "port": 10}]}])
        wait_until(lambda: read(logs, "planner").count('"msg": "planner: plan ') >= 2, timeout=30,
                   message="a second plan")
        assert launcher.poll() is None
        for stage in STAGES:
            text = read(logs, stage)
            assert text.strip(), f"{stage}.log is empty"
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    raise AssertionError(f"{stage}.log: not JSON: {line!r}") from None
                assert {"ts", "level", "stage", "msg"} <= set(record), line
                assert record["stage"] == stage, line
        # the Pen runner's lines are ours (Pen itself prints nothing here unless it fails)
        for line in read(logs, "pen").splitlines():
            json.loads(line)
        # haproxy.log: ours until `proxymatic haproxy` execs HAProxy, then HAProxy's own lines
        assert json.loads(read(logs, "haproxy").splitlines()[0])["stage"] == "haproxy"
    finally:
        run.close()


def read(logs: str, program: str) -> str:
    try:
        with open(os.path.join(logs, f"{program}.log"), errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""
