"""Single-container mode: render the supervisord config into the run dir and run supervisord.

Graceful shutdown (interface.md): the first SIGTERM writes the `terminating` marker, so
/status answers 503 TERMINATING while every proxy keeps forwarding; proxymatic stops after
SHUTDOWN_GRACE seconds, or at a second SIGTERM/SIGINT when the grace is 0 (an orchestrator's
kill timeout ends it). Ctrl-C (SIGINT) stops at once.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import jinja2

from services.common.config import Settings

log = logging.getLogger("proxymatic.launcher")

DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy"


@dataclass(frozen=True)
class Program:
    name: str
    command: str
    priority: int
    stopsignal: str = "TERM"
    stopwaitsecs: int = 10


def programs(settings: Settings, args: list[str]) -> list[Program]:
    def command(name: str) -> str:
        words = [sys.executable, "-m", "services.cli", name, *args]
        # supervisord expands %(...)s in commands: a literal % must be doubled.
        return " ".join(shlex.quote(w) for w in words).replace("%", "%%")

    result = []
    if settings.haproxy:
        # SIGUSR1 is HAProxy's soft stop: established connections finish.
        result.append(Program("haproxy", command("haproxy"), 10, "USR1", 35))
    result.append(Program("pen", command("pen"), 10))
    if settings.vhost_domain:
        result.append(Program("nginx", command("nginx"), 10, "QUIT", 35))
    result += [
        Program("applier", command("applier"), 20),
        Program("planner", command("planner"), 30),
        Program("collector", command("collector"), 40),
        Program("status", command("status"), 50),
    ]
    return result


def render_supervisord_conf(settings: Settings, args: list[str]) -> str:
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(DEPLOY_DIR)),
                                     undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return environment.get_template("supervisord.conf.j2").render(
        run_dir=settings.run_dir, programs=programs(settings, args),
        # Saying so explicitly keeps supervisord from warning that it did not drop privileges.
        user="root" if os.geteuid() == 0 else None)


def write_supervisord_conf(settings: Settings, args: list[str]) -> str:
    os.makedirs(settings.path("logs"), exist_ok=True)
    path = settings.path("supervisord.conf")
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        handle.write(render_supervisord_conf(settings, args))
    os.replace(temporary, path)
    return path


def launch(settings: Settings, args: list[str]) -> int:
    os.makedirs(settings.run_dir, exist_ok=True)
    marker = settings.path("terminating")
    if os.path.exists(marker):
        os.unlink(marker)
    conf = write_supervisord_conf(settings, args)
    supervisord = os.path.join(os.path.dirname(sys.executable), "supervisord")
    # Own session: a terminal's Ctrl-C reaches only us, and we decide how to stop.
    child = subprocess.Popen([supervisord, "-n", "-c", conf], start_new_session=True)
    log.info("proxymatic: supervisord pid %d, run dir %s, logs in %s", child.pid, settings.run_dir,
             settings.path("logs"))
    stopping = threading.Event()

    def stop_now(*_args) -> None:
        stopping.set()
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    def on_sigterm(*_args) -> None:
        if os.path.exists(marker):
            stop_now()
            return
        open(marker, "w").close()
        log.info("proxymatic: SIGTERM: /status now TERMINATING, still forwarding%s",
                 f" for {settings.shutdown_grace}s" if settings.shutdown_grace else " until the next signal")
        if settings.shutdown_grace:
            threading.Timer(settings.shutdown_grace, stop_now).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, stop_now)
    code = child.wait()
    return 0 if stopping.is_set() else code or 1
