"""Single-container mode: render the supervisord config into the run dir and run supervisord.

Graceful shutdown (interface.md): the first SIGTERM writes the `terminating` marker, so
/status answers 503 TERMINATING while every proxy keeps forwarding; proxymatic stops after
SHUTDOWN_GRACE seconds, or at a second SIGTERM/SIGINT when the grace is 0 (an orchestrator's
kill timeout ends it). Ctrl-C (SIGINT) stops at once. After a stop nothing is left: no process,
no socket, no pid file.

Lifecycle: one launcher per run dir (an flock, run_dir.py); supervisord is killed by the kernel
when the launcher dies however it dies (PR_SET_PDEATHSIG), and each program it supervises gets
SIGTERM when supervisord dies (services/cli.py), so nothing outlives a kill -9 of the launcher.
A start after an unclean stop ends the previous run's leftovers and removes its stale files.

Secrets: settings reach the programs through the environment (supervisord passes the launcher's
on), never their command lines, so a Marathon password is in no `ps` output and no config file.
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

import jinja2

from services.common.config import Settings, settings_environ
from services.common.files import write_atomic
from services.common.pdeathsig import die_with
from services.run_dir import (INSTANCE_ENV, RunDirInUse, RunDirLock, prepare_run_dir, remove_stale_files,
                              stop_leftovers)

log = logging.getLogger("proxymatic.launcher")

# services/templates/supervisord.conf.j2, installed with the package (package data): the
# launcher works from a wheel as from the source tree.
TEMPLATE_PACKAGE, TEMPLATE = "services", "supervisord.conf.j2"
# Private: nothing in the run dir is for other users (nginx's workers buffer nothing to disk,
# Pen drops root holding an open directory descriptor).
RUN_DIR_MODE = 0o700


@dataclass(frozen=True)
class Program:
    name: str
    command: str
    priority: int
    stopsignal: str = "TERM"
    stopwaitsecs: int = 10


def programs(settings: Settings) -> list[Program]:
    """What supervisord runs for ROLE (docs/roles.md):

    - `all`: the proxies, collector, planner, applier and status (one node does everything);
    - `central`: collector, planner and status (no proxy, no applier: it serves no traffic);
    - `node`: the proxies, applier and status (the applier follows PLANNER_BUS, the central(s)).
    """
    def command(name: str) -> str:
        # No settings on the command line: the programs read them from the environment.
        words = [sys.executable, "-m", "services.cli", name]
        # supervisord expands %(...)s in commands: a literal % must be doubled.
        return " ".join(shlex.quote(w) for w in words).replace("%", "%%")

    proxies = settings.role in ("all", "node")
    result = []
    if proxies:
        if settings.haproxy:
            # SIGUSR1 is HAProxy's soft stop: established connections finish.
            result.append(Program("haproxy", command("haproxy"), 10, "USR1", 35))
        result.append(Program("pen", command("pen"), 10))
        if settings.vhost_domain:
            result.append(Program("nginx", command("nginx"), 10, "QUIT", 35))
    # Publishers start before their subscribers (collector, planner, applier): a subscriber's
    # first snapshot request then finds its publisher bound.
    if settings.role in ("all", "central"):
        result += [Program("collector", command("collector"), 20), Program("planner", command("planner"), 30)]
    if proxies:
        result.append(Program("applier", command("applier"), 40))
    result.append(Program("status", command("status"), 50))
    return result


def render_supervisord_conf(settings: Settings) -> str:
    environment = jinja2.Environment(loader=jinja2.PackageLoader(TEMPLATE_PACKAGE, "templates"),
                                     undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return environment.get_template(TEMPLATE).render(
        run_dir=settings.run_dir.replace("%", "%%"), programs=programs(settings),
        # Saying so explicitly keeps supervisord from warning that it did not drop privileges.
        user="root" if os.geteuid() == 0 else None)


def write_supervisord_conf(settings: Settings) -> str:
    os.makedirs(settings.path("logs"), mode=0o700, exist_ok=True)
    os.chmod(settings.path("logs"), 0o700)
    path = settings.path("supervisord.conf")
    write_atomic(path, render_supervisord_conf(settings))
    return path


def program_environment(settings: Settings) -> dict[str, str]:
    """The environment supervisord and every program get: ours plus every setting."""
    return {**os.environ, **settings_environ(settings), INSTANCE_ENV: settings.run_dir}


def clean_up(settings: Settings) -> None:
    """No process of a previous run, no stale socket, pid file or TERMINATING marker."""
    survivors = stop_leftovers(settings.run_dir)
    if survivors:
        log.error("proxymatic: processes of a previous run on %s survived SIGKILL: %s", settings.run_dir, survivors)
    for path in remove_stale_files(settings.run_dir):
        log.debug("proxymatic: removed stale %s", path)
    marker = settings.path("terminating")
    if os.path.exists(marker):
        os.unlink(marker)


def launch(settings: Settings) -> int:
    prepare_run_dir(settings.run_dir, RUN_DIR_MODE)
    lock = RunDirLock(settings.run_dir)
    try:
        lock.acquire()
    except RunDirInUse as error:
        print(f"proxymatic: error: {error}", file=sys.stderr)
        return 1
    try:
        return supervise(settings)
    finally:
        clean_up(settings)
        lock.release()


def supervise(settings: Settings) -> int:
    clean_up(settings)
    marker = settings.path("terminating")
    conf = write_supervisord_conf(settings)
    supervisord = os.path.join(os.path.dirname(sys.executable), "supervisord")
    launcher_pid = os.getpid()
    # Own session: a terminal's Ctrl-C reaches only us, and we decide how to stop. SIGKILL when
    # we die: every program then gets its own SIGTERM from the kernel and stops at once.
    child = subprocess.Popen([supervisord, "-n", "-c", conf], start_new_session=True,
                             env=program_environment(settings),
                             preexec_fn=lambda: die_with(launcher_pid, signal.SIGKILL))
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
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o600))
        log.info("proxymatic: SIGTERM: /status now TERMINATING, still forwarding%s",
                 f" for {settings.shutdown_grace}s" if settings.shutdown_grace else " until the next signal")
        if settings.shutdown_grace:
            grace_timer.start()

    # A daemon timer: a second signal within the grace must not leave us waiting for it at exit.
    grace_timer = threading.Timer(settings.shutdown_grace, stop_now)
    grace_timer.daemon = True
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, stop_now)
    code = child.wait()
    grace_timer.cancel()
    return 0 if stopping.is_set() else code or 1
