"""`proxymatic nginx`: run the nginx master in the foreground under supervisord.

Everything lives in `<run_dir>/nginx/` (the -p prefix): nginx.conf (written by the nginx driver;
a bootstrap config with only the default server when there is none yet), nginx.pid,
logs/error.log and tmp/. The process execs nginx, so supervisord signals it directly
(SIGTERM: fast stop, SIGQUIT: graceful stop, SIGHUP: reload).
"""
from __future__ import annotations

import logging
import os
import shutil

from services.applier.nginx_driver import CONFIG_FILE, nginx_user, prepare_prefix, write_atomic, write_loaded
from services.applier.nginx_render import render
from services.common.model import Plan

log = logging.getLogger("proxymatic.nginx")


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


def main(settings) -> int:
    """Entry point of `proxymatic nginx` (supervisord program); does not return on success."""
    prefix = bootstrap(settings)
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    argv = nginx_argv(prefix, binary)
    log.info("nginx: exec %s", " ".join(argv))
    with open(os.path.join(prefix, CONFIG_FILE), encoding="utf-8") as source:
        write_loaded(prefix, os.getpid(), source.read())  # exec keeps the pid: it is the master's
    os.execv(binary, argv)
    return 1  # not reached
