"""The nginx driver: virtual hosts for TCP services (VHOST_DOMAIN), see nginx_render.

The rendered text depends only on the vhost set (each vhost proxies to its service's node-local
listener, HAProxy or Pen), so membership changes leave it unchanged and never reload nginx.
Render the plan; when the text differs from the config in use, test it with
`nginx -t -p <prefix> -c <candidate>`, move it in place atomically and send SIGHUP to the
master (a graceful reload: old workers finish their requests). A config that fails the test is
never installed: the result is `rejected` and nginx keeps serving the last good one.
The master itself is run by `proxymatic nginx` (nginx_launch) under supervisord.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess

from services.applier.driver import DriverResult, ProxyDriver
from services.applier.nginx_render import render
from services.common.files import write_atomic
from services.common.model import Plan, content_hash

log = logging.getLogger("proxymatic.applier.nginx")

CONFIG_FILE = "nginx.conf"
PID_FILE = "nginx.pid"
# "<master pid> <config hash>": what the running master serves, so that a restarted applier
# does not reload nginx for nothing. Written by nginx_launch before exec and after each reload.
LOADED_FILE = "loaded"


def nginx_user() -> str | None:
    """The worker user when we run as root (none otherwise: nginx keeps the current user)."""
    if os.geteuid() != 0:
        return None
    import pwd
    for name in ("www-data", "nginx", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return None


def prepare_prefix(prefix: str) -> None:
    for sub in ("", "logs", "tmp"):
        os.makedirs(os.path.join(prefix, sub), exist_ok=True)


def write_loaded(prefix: str, pid: int, text: str) -> None:
    """Record which config text master `pid` was told to load (by exec or by SIGHUP)."""
    write_atomic(os.path.join(prefix, LOADED_FILE), f"{pid} {content_hash(text)}\n")


def read_loaded(prefix: str) -> tuple[int, str] | None:
    try:
        with open(os.path.join(prefix, LOADED_FILE), encoding="utf-8") as source:
            pid, digest = source.read().split()
        return int(pid), digest
    except (OSError, ValueError):
        return None


class NginxDriver(ProxyDriver):
    name = "nginx"

    def __init__(self, settings, binary: str | None = None):
        self.prefix = settings.path("nginx")
        self.config = os.path.join(self.prefix, CONFIG_FILE)
        self.pid_file = os.path.join(self.prefix, PID_FILE)
        self.binary = binary or shutil.which("nginx") or "/usr/sbin/nginx"
        self.user = nginx_user()
        self.reloads = 0
        self._rejected = ""  # hash of the last text that failed `nginx -t`
        self._loaded: tuple[int, str] | None = None  # (master pid, hash of the text it was told to load)

    def apply(self, plan: Plan) -> DriverResult:
        if not plan.settings.vhost_domain:
            return DriverResult(self.name, True, "none", details={"enabled": False})
        try:
            rendered = render(plan, self.prefix, user=self.user)
        except ValueError as error:  # something the model should have refused: never rendered
            log.error("nginx: cannot render the plan: %s", error)
            return DriverResult(self.name, False, "rejected", errors=(f"cannot render: {error}",))
        text = rendered.text
        digest = content_hash(text)
        details = {"vhosts": [v.server_name for v in rendered.vhosts], "warnings": list(rendered.warnings),
                   "config": self.config}
        on_disk = self._read(self.config)
        master = self.master_pid()
        if text == on_disk and master is not None and self._loaded == (master, digest):
            return DriverResult(self.name, True, "none", details=details)
        if text != on_disk:
            if digest == self._rejected:
                return DriverResult(self.name, False, "rejected", errors=("config still fails nginx -t",),
                                    details=details)
            prepare_prefix(self.prefix)
            problem = self.test(text)
            if problem:
                self._rejected = digest
                log.error("nginx: rendered config rejected, keeping the last good one: %s", problem)
                return DriverResult(self.name, False, "rejected", errors=(problem,), details=details)
            write_atomic(self.config, text)
            log.info("nginx: config written (%d vhosts)", len(rendered.vhosts))
        self._rejected = ""
        if master is None:
            # `proxymatic nginx` reads this file when it starts: nothing more to do now.
            details["running"] = False
            self._loaded = None
            if text != on_disk:
                log.info("nginx: not running, %s is used when it starts", self.config)
            return DriverResult(self.name, True, "reload" if text != on_disk else "none", details=details)
        if text == on_disk and read_loaded(self.prefix) == (master, digest):
            # An applier restart, or nginx restarted: this master already serves this text.
            self._loaded = (master, digest)
            return DriverResult(self.name, True, "none", details=details)
        try:
            os.kill(master, signal.SIGHUP)
        except ProcessLookupError:
            self._loaded = None
            return DriverResult(self.name, True, "reload", details={**details, "running": False})
        self.reloads += 1
        self._loaded = (master, digest)
        write_loaded(self.prefix, master, text)
        log.info("nginx: reloaded master pid %d (%d vhosts)", master, len(rendered.vhosts))
        return DriverResult(self.name, True, "reload", details=details)

    def test(self, text: str) -> str:
        """Run `nginx -t` on `text`; the error message, or "" when it is valid."""
        candidate = os.path.join(self.prefix, f".candidate-{os.getpid()}.conf")
        try:
            with open(candidate, "w", encoding="utf-8") as out:
                out.write(text)
            proc = subprocess.run([self.binary, "-t", "-q", "-p", self.prefix + "/", "-c", candidate],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"nginx -t could not run: {error}"
        finally:
            if os.path.exists(candidate):
                os.unlink(candidate)
        if proc.returncode == 0:
            return ""
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        return "nginx -t failed: " + " | ".join(lines[-5:]).replace(candidate, "<rendered nginx.conf>")

    def master_pid(self) -> int | None:
        """The running master's pid, from the pid file, checked against /proc (no stale pids)."""
        try:
            pid = int(self._read(self.pid_file).strip())
            with open(f"/proc/{pid}/cmdline", "rb") as source:
                cmdline = source.read()
        except (OSError, ValueError):
            return None
        return pid if b"nginx" in cmdline else None

    @staticmethod
    def _read(path: str) -> str:
        try:
            with open(path, encoding="utf-8") as source:
                return source.read()
        except OSError:
            return ""
