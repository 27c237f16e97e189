"""`proxymatic haproxy`: the supervised HAProxy program.

Prepares <run_dir>/haproxy/ and execs HAProxy in master-worker mode in the foreground, so that
supervisord supervises HAProxy's master itself. When no config exists yet (first start), the
rendering of an empty plan is written; otherwise the config on disk is kept: it always equals the
state the applier last converged to, so a restarted HAProxy serves the same backends at once.
"""
from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import resource
import shutil
import subprocess

from services.applier.bindable import bind_error
from services.applier.haproxy_render import HaproxyPaths, RunAs, render, split_sections
from services.common.config import Settings
from services.common.files import write_atomic
from services.common.model import Plan

log = logging.getLogger("proxymatic.applier.haproxy")

DEFAULT_BINARY = "/usr/sbin/haproxy"
_ALERT_PREFIX = re.compile(r"^\[ALERT\]\s+\(\d+\)\s*:\s*")


def haproxy_binary() -> str:
    return os.environ.get("PROXYMATIC_HAPROXY_BIN") or shutil.which("haproxy") or DEFAULT_BINARY


def fd_limit() -> int | None:
    """The hard RLIMIT_NOFILE: HAProxy's global maxconn is capped so it can get its descriptors."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return None if hard == resource.RLIM_INFINITY else hard


def run_as() -> RunAs | None:
    """Who HAProxy's workers run as: when started as root, the Debian package's `haproxy`
    account if it exists, else nobody/nogroup; otherwise HAProxy cannot switch users (None)."""
    if os.geteuid() != 0:
        return None
    for user, group in (("haproxy", "haproxy"), ("nobody", "nogroup")):
        try:
            pwd.getpwnam(user)
            grp.getgrnam(group)
        except KeyError:
            continue
        return RunAs(user, group)
    return None


def command(paths: HaproxyPaths, binary: str | None = None) -> list[str]:
    """Master-worker (-W), foreground (-db), master CLI (-S) on a mode-600 unix socket."""
    return [binary or haproxy_binary(), "-W", "-db", "-S", f"{paths.master_socket},mode,600",
            "-f", paths.config, "-p", paths.pidfile]


def bootstrap_config(settings: Settings, paths: HaproxyPaths) -> str:
    """The rendering of an empty plan: only the statistics listener."""
    return render(Plan(services=(), settings=settings.proxy_settings()), paths, {}, fd_limit(), run_as=run_as())


def check_config_alerts(path: str, binary: str | None = None, timeout: float = 30.0) -> tuple[bool, list[str]]:
    """`haproxy -c -f <path>`: (valid, every ALERT line without its prefix; when it failed
    without any, what it printed)."""
    try:
        proc = subprocess.run([binary or haproxy_binary(), "-c", "-f", path], capture_output=True,
                              text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, [f"could not run haproxy -c: {error}"]
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 0:
        return True, [output] if output else []
    alerts = [_ALERT_PREFIX.sub("", line).strip() for line in output.splitlines() if line.startswith("[ALERT]")]
    return False, alerts or [output[:500] or f"haproxy -c exited with {proc.returncode}"]


def summary(alerts: list[str]) -> str:
    """The first alerts: they say where and why (the last ones only say "errors found")."""
    return "; ".join(alerts[:3])


def check_config(path: str, binary: str | None = None, timeout: float = 30.0) -> tuple[bool, str]:
    """`haproxy -c -f <path>`: (valid, HAProxy's first ALERT lines or output)."""
    valid, alerts = check_config_alerts(path, binary, timeout)
    return valid, summary(alerts)


def prepare(settings: Settings) -> HaproxyPaths:
    """Create the HAProxy directory and make sure a valid config is there."""
    paths = HaproxyPaths.for_run_dir(settings.run_dir)
    os.makedirs(paths.dir, mode=0o700, exist_ok=True)
    if os.path.exists(paths.config):
        valid, message = check_config(paths.config)
        if valid:
            drop_unbindable(paths)
            return paths
        # Should not happen (every config is validated before it is written): keep it for
        # inspection and start from the bootstrap config; the applier reloads the plan.
        log.error("haproxy: %s does not validate (%s); starting from an empty config", paths.config, message)
        os.replace(paths.config, paths.config + ".invalid")
    log.info("haproxy: writing bootstrap config %s", paths.config)
    write_atomic(paths.config, bootstrap_config(settings, paths))
    return paths


def drop_unbindable(paths: HaproxyPaths) -> list[str]:
    """Before HAProxy starts from the config on disk: leave out the services whose port another
    program took meanwhile, or HAProxy would not start at all and serve nothing. The config then
    differs from slots.json, so the applier reloads it and reports those services set aside.
    Returns what was left out."""
    with open(paths.config) as handle:
        text = handle.read()
    header, sections = split_sections(text)
    kept, dropped = [], []
    for bid, section in sections.items():
        port = int(bid.split("_")[1])
        error = bind_error("0.0.0.0", port)
        if error is None:
            kept.append(section)
        else:
            dropped.append(f"port {port}: {error}")
    if dropped:
        log.warning("haproxy: starting without the listeners that cannot be bound (%s)", "; ".join(dropped))
        write_atomic(paths.config, header + "".join(kept) + "\n")
    return dropped


def main(settings: Settings) -> None:
    """Prepare, then replace this process with HAProxy's master (never returns)."""
    paths = prepare(settings)
    argv = command(paths)
    log.info("haproxy: exec %s", " ".join(argv))
    os.execvp(argv[0], argv)
