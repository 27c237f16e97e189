"""`proxymatic nginx`: run the nginx master in the foreground under supervisord.

Everything lives in `<run_dir>/nginx/` (the -p prefix): nginx.conf (written by the nginx driver;
a bootstrap config with only the default server when there is none yet), nginx.pid,
logs/error.log and tmp/. The process execs nginx, so supervisord signals it directly
(SIGTERM: fast stop, SIGQUIT: graceful stop, SIGHUP: reload).

While another program holds VHOST_PORT, nginx could not start (it would exit, and be restarted
over and over): the launcher waits until the port can be bound, then execs nginx with the config
the driver installed meanwhile (the driver reports every vhost set aside until then).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import time

from services.applier.bindable import bind_error
from services.applier.proc_identity import executes, signal_verified
from services.applier.nginx_driver import CONFIG_FILE, LISTEN_HOST, nginx_user, prepare_prefix, write_loaded
from services.applier.nginx_render import render
from services.common.files import write_atomic
from services.common.model import Plan

log = logging.getLogger("proxymatic.nginx")

PORT_POLL = 0.2  # seconds between two bind probes while the vhost port is taken
LEFTOVER_GRACE = 5.0  # seconds a leftover nginx process gets after SIGTERM, before SIGKILL


def nginx_argv(prefix: str, binary: str = "nginx") -> list[str]:
    return [binary, "-p", prefix + "/", "-c", os.path.join(prefix, CONFIG_FILE), "-g", "daemon off;"]


def bootstrap(settings) -> str:
    """Make sure the prefix and a config exist; return the prefix."""
    prefix = settings.path("nginx")
    prepare_prefix(prefix)
    config = os.path.join(prefix, CONFIG_FILE)
    if not os.path.exists(config):
        plan = Plan(services=(), settings=settings.proxy_settings())
        write_atomic(config, render(plan, prefix, user=nginx_user()).text)
        log.info("nginx: wrote bootstrap config %s", config)
    return prefix


def holds_prefix_files(pid: int, prefix: str) -> bool:
    """True when `pid` has a file of `prefix` open (every nginx process of a prefix keeps its
    error log open; a worker's command line does not name the prefix)."""
    inside = os.path.realpath(prefix) + os.sep
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for descriptor in descriptors:
        try:
            if os.readlink(f"/proc/{pid}/fd/{descriptor}").startswith(inside):
                return True
        except OSError:
            continue
    return False


def leftover_processes(prefix: str, binary: str) -> list[int]:
    """nginx processes of this prefix still running when its master is about to start: the
    workers of a master killed with SIGKILL (nginx workers do not die with their master) keep
    the vhost port and serve the old config, so the new master could never bind it."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and executes(int(entry), binary) \
                and holds_prefix_files(int(entry), prefix):
            found.append(int(entry))
    return found


def end_leftovers(prefix: str, binary: str, grace: float = LEFTOVER_GRACE) -> int:
    """SIGTERM every leftover nginx process of `prefix` (SIGKILL after `grace`); returns how many."""
    def still_ours(pid: int) -> bool:
        return executes(pid, binary) and holds_prefix_files(pid, prefix)

    leftovers = leftover_processes(prefix, binary)
    if not leftovers:
        return 0
    log.warning("nginx: ending %d leftover nginx process(es) of %s (pids %s) from an earlier start",
                len(leftovers), prefix, ", ".join(map(str, leftovers)))
    for pid in leftovers:
        signal_verified(pid, signal.SIGTERM, still_ours)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(still_ours(pid) for pid in leftovers):
        time.sleep(0.05)
    for pid in leftovers:
        signal_verified(pid, signal.SIGKILL, still_ours)
    return len(leftovers)


def wait_for_port(port: int, poll: float = PORT_POLL) -> None:
    """Return once `port` can be bound; log when it cannot, and again when the error changes."""
    reported = None
    while (error := bind_error(LISTEN_HOST, port, "tcp")) is not None:
        if error != reported:
            log.warning("nginx: port %d cannot be bound: %s; starting once it is free", port, error)
            reported = error
        time.sleep(poll)
    if reported is not None:
        log.info("nginx: port %d is free, starting", port)


def main(settings) -> int:
    """Entry point of `proxymatic nginx` (supervisord program); does not return on success."""
    prefix = bootstrap(settings)
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    end_leftovers(prefix, binary)
    wait_for_port(int(settings.vhost_port))
    argv = nginx_argv(prefix, binary)
    log.info("nginx: exec %s", " ".join(argv))
    with open(os.path.join(prefix, CONFIG_FILE), encoding="utf-8") as source:
        write_loaded(prefix, os.getpid(), source.read())  # exec keeps the pid: it is the master's
    os.execv(binary, argv)
    return 1  # not reached
