"""Logging for every proxymatic process: text lines, or with LOG_FORMAT=json one JSON object
per line.

Text (the default) looks as it always did:

    2026-11-30 12:48:27,983 INFO collector[1852] proxymatic.collector: source file: ok, 1 services, ...

JSON (`LOG_FORMAT=json` or `--log-format json`), python-json-logger's JsonFormatter:

    {"ts": "2026-11-30T12:48:27.983000+00:00", "level": "INFO", "stage": "collector",
     "msg": "source file: ok, 1 services, ...", "logger": "proxymatic.collector", "pid": 1852,
     "source": "file", "event": "published"}

`ts` is ISO 8601 in UTC, `stage` the command (`collector`, `planner`, `applier`, `status`,
`haproxy`, `nginx`, `pen`, `launcher` for `proxymatic` itself, `tap`, `plan`, `explain`), and
every field a caller passes with `extra={...}` (`service`, `source`, `event`...) is a key of
its own. A traceback is in `exc_info` (one string), never on lines of its own.

The launcher hands LOG_FORMAT to every program it runs under supervisord (settings travel by
environment, services/common/config.py settings_environ), so one setting covers every stage.

In JSON mode the long-running programs (the stages, the launcher, the proxy programs before
they exec) also turn what would otherwise reach stderr outside logging into records: uncaught
exceptions (main thread and other threads), Python warnings, and any other text written to
`sys.stderr` (e.g. the standard library's HTTP server printing a client error), one record per
line with logger `stderr`. So every line a stage writes is JSON.

Not ours, not JSON: what HAProxy, nginx and Pen print themselves (HAProxy's and nginx's
masters replace `proxymatic haproxy|nginx` by exec; Pen is a child of the pen runner), which
lands in the same `logs/haproxy.log`, `logs/nginx.log`, `logs/pen.log`; and supervisord's own
`logs/supervisord.log`. The tools' data output (`tap`, `plan`, `explain` on stdout) is not
logging either.
"""
from __future__ import annotations

import io
import logging
import sys
import threading

from pythonjsonlogger.json import JsonFormatter

from services.common.config import TOOLS, Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s {stage}[%(process)d] %(name)s: %(message)s"
# Record attributes the JSON lines carry under these names (besides `ts` and `stage`).
JSON_FIELDS = {"levelname": "level", "message": "msg", "name": "logger", "process": "pid"}
FIRST_KEYS = ("ts", "level", "stage", "msg")


def stage_name(command: str) -> str:
    return "launcher" if command == "run" else command


class _Formatter(JsonFormatter):
    """python-json-logger's JsonFormatter with the fixed keys first, for a human reading the file."""

    def process_log_record(self, log_data: dict) -> dict:
        return {**{key: log_data.pop(key) for key in FIRST_KEYS if key in log_data}, **log_data}


def json_formatter(stage: str) -> JsonFormatter:
    """One JSON object per record: ts, level, stage, msg, logger, pid, then the extra fields."""
    return _Formatter(list(JSON_FIELDS), rename_fields=JSON_FIELDS, timestamp="ts",
                      static_fields={"stage": stage}, json_ensure_ascii=False)


class _StderrToLog(io.TextIOBase):
    """Stands in for sys.stderr in JSON mode: each complete line written becomes one record of
    logger `stderr` (at WARNING), so stray prints never break the one-object-per-line format."""

    def __init__(self, stream, logger: logging.Logger):
        self._stream = stream
        self._logger = logger
        self._buffer = ""
        self._lock = threading.RLock()
        self._busy = threading.local()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if getattr(self._busy, "active", False):  # logging itself failing: straight to the stream
            self._stream.write(text)
            return len(text)
        with self._lock:
            self._buffer += text
            *lines, self._buffer = self._buffer.split("\n")
        self._emit(lines)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            lines, self._buffer = ([self._buffer] if self._buffer else []), ""
        self._emit(lines)
        self._stream.flush()

    def _emit(self, lines: list[str]) -> None:
        self._busy.active = True
        try:
            for line in lines:
                if line.strip():
                    self._logger.warning("%s", line.rstrip("\r"))
        finally:
            self._busy.active = False

    def fileno(self) -> int:  # a child process given our stderr gets the real one
        return self._stream.fileno()

    def isatty(self) -> bool:
        return False


def _capture_stray_output(stream) -> None:
    """JSON mode, long-running programs: uncaught exceptions, warnings and stray stderr text as
    records too."""
    stray = logging.getLogger("stderr")

    def excepthook(kind, value, traceback) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, value, traceback)
            return
        logging.getLogger("proxymatic").critical("uncaught exception: %s: %s", kind.__name__, value,
                                                 exc_info=(kind, value, traceback))

    def thread_excepthook(args) -> None:
        if args.exc_type is SystemExit:
            return
        logging.getLogger("proxymatic").critical(
            "uncaught exception in thread %s: %s: %s", getattr(args.thread, "name", "?"), args.exc_type.__name__,
            args.exc_value, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    logging.captureWarnings(True)
    sys.stderr = _StderrToLog(stream, stray)


def configure_logging(settings: Settings, command: str) -> None:
    """The root logger for this process: level from VERBOSE, format from LOG_FORMAT, on stderr
    (which supervisord sends to `RUN_DIR/logs/<program>.log`)."""
    stage = stage_name(command)
    stream = sys.stderr
    if isinstance(stream, _StderrToLog):  # configured before in this process
        stream = sys.stderr = stream._stream
    handler = logging.StreamHandler(stream)
    if settings.log_format == "json":
        handler.setFormatter(json_formatter(stage))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT.format(stage=command)))
    root = logging.getLogger()
    for old in list(root.handlers):  # configured once per process; a second call replaces it
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if settings.verbose else logging.INFO)
    # A tool's stdout is its output and its stderr a terminal's: only programs capture stray output.
    if settings.log_format == "json" and command not in TOOLS:
        _capture_stray_output(stream)
