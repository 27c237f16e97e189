"""The nginx driver: virtual hosts for TCP services (VHOST_DOMAIN), see nginx_render.

The rendered text depends only on the vhost set (each vhost proxies to its service's node-local
listener, HAProxy or Pen), so membership changes leave it unchanged and never reload nginx.
Render the plan; when the text differs from the config in use, test it with
`nginx -t -p <prefix> -c <candidate>`, move it in place atomically and send SIGHUP to the
master (a graceful reload: old workers finish their requests). A config that fails the test is
never installed: the vhosts to blame are found (nginx_isolate) and set aside, and the rest is
installed; when no vhost explains the failure the result is `rejected` and nginx keeps serving
the last good one. While the master is not running because VHOST_PORT is held by another
program (the launcher waits for it), every vhost is set aside with the OS error.
The master itself is run by `proxymatic nginx` (nginx_launch) under supervisord.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import time

from services.applier import culprits, nginx_isolate, proc_identity
from services.applier.bindable import bind_error
from services.applier.driver import DriverResult, ProxyDriver
from services.applier.nginx_render import Rendered, render
from services.common.files import read_text_or_none, write_atomic
from services.common.model import Plan, content_hash

log = logging.getLogger("proxymatic.applier.nginx")

CONFIG_FILE = "nginx.conf"
PID_FILE = "nginx.pid"
# "<master pid> <config hash>": what the running master serves, so that a restarted applier
# does not reload nginx for nothing. Written by nginx_launch before exec and after each reload.
LOADED_FILE = "loaded"
LISTEN_HOST = "0.0.0.0"  # the vhost port listens on every address
_LOG_PREFIX = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (\[\w+\]) \d+#\d+: ")
# After a reload, the old workers accept new connections until they have read the master's
# QUIT and closed their listeners ("worker process is shutting down"): until then a client can
# still get the previous config. `applied` waits for that, this long at most.
OLD_WORKERS_TIMEOUT = 2.0
# Bounds the search for rejected vhosts (each `nginx -t` takes tens of milliseconds).
MAX_ISOLATION_TESTS = culprits.MAX_RUNS
MAX_ISOLATION_SECONDS = culprits.MAX_SECONDS


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
        self._rejected = ""  # hash of the last text that failed `nginx -t` as a whole
        # hash of the last full rendering that failed, -> (the rendering without the vhosts
        # set aside, vhost key -> nginx's message): the same plan is not bisected again
        self._isolated: tuple[str, Rendered, dict[str, str]] | None = None
        self._set_aside: dict[str, str] = {}  # as last reported (warnings once per change)
        self._loaded: tuple[int, str] | None = None  # (master pid, hash of the text it was told to load)

    def apply(self, plan: Plan) -> DriverResult:
        if not plan.settings.vhost_domain:
            return DriverResult(self.name, True, "none", details={"enabled": False})
        try:
            rendered = render(plan, self.prefix, user=self.user)
        except ValueError as error:  # something the model should have refused: never rendered
            log.error("nginx: cannot render the plan: %s", error)
            return DriverResult(self.name, False, "rejected", errors=(f"cannot render: {error}",))
        on_disk = read_text_or_none(self.config)
        servable = self._servable(plan, rendered, on_disk)
        if isinstance(servable, str):
            details = {"vhosts": [v.server_name for v in rendered.vhosts], "warnings": list(rendered.warnings),
                       "config": self.config}
            return self._result(False, "rejected", details, {}, errors=(servable,))
        rendered, set_aside = servable
        text = rendered.text
        digest = content_hash(text)
        details = {"vhosts": [v.server_name for v in rendered.vhosts], "warnings": list(rendered.warnings),
                   "config": self.config}
        master = self.master_pid()
        if text == on_disk and master is not None and self._loaded == (master, digest):
            return self._result(True, "none", details, set_aside)
        if text != on_disk:
            prepare_prefix(self.prefix)
            write_atomic(self.config, text)
            log.info("nginx: config written (%d vhosts)", len(rendered.vhosts))
        if master is None:
            # `proxymatic nginx` reads this file when it starts: nothing more to do now. It waits
            # while the vhost port is taken; then no vhost can be served, each is set aside.
            details["running"] = False
            self._loaded = None
            if text != on_disk:
                log.info("nginx: not running, %s is used when it starts", self.config)
            unbound = bind_error(LISTEN_HOST, plan.settings.vhost_port, "tcp")
            if unbound:
                details["listen_error"] = f"port {plan.settings.vhost_port} cannot be bound: {unbound}"
                set_aside = {**set_aside, **{v.key: f"service {v.service} (vhost {v.server_name}): "
                                                    f"{details['listen_error']}" for v in rendered.vhosts}}
            return self._result(True, "reload" if text != on_disk else "none", details, set_aside)
        if text == on_disk and read_loaded(self.prefix) == (master, digest):
            # An applier restart, or nginx restarted: this master already serves this text.
            self._loaded = (master, digest)
            return self._result(True, "none", details, set_aside)
        accepting_before = self._accepting_workers(master)
        if not self._signal_master(master, signal.SIGHUP):
            self._loaded = None
            return self._result(True, "reload", {**details, "running": False}, set_aside)
        self._wait_for_old_workers(master, accepting_before)
        self.reloads += 1
        self._loaded = (master, digest)
        write_loaded(self.prefix, master, text)
        log.info("nginx: reloaded master pid %d (%d vhosts)", master, len(rendered.vhosts))
        return self._result(True, "reload", details, set_aside)

    def _servable(self, plan: Plan, rendered: Rendered, on_disk: str | None) -> tuple[Rendered, dict[str, str]] | str:
        """The rendering nginx accepts: `rendered` itself, or without the vhosts `nginx -t` rejects
        (with nginx's message per vhost key); a string (the error) when that cannot be found."""
        if rendered.text == on_disk:
            return rendered, {}  # the installed config passed nginx -t
        digest = content_hash(rendered.text)
        if self._isolated is not None and self._isolated[0] == digest:
            return self._isolated[1], self._isolated[2]
        if digest == self._rejected:
            return "config still fails nginx -t"
        prepare_prefix(self.prefix)
        problem = self.test(rendered.text)
        if not problem:
            return rendered, {}
        isolated = self._isolate(plan, rendered, problem)
        if isolated is None:
            self._rejected = digest
            log.error("nginx: rendered config rejected, keeping the last good one: %s", problem)
            return problem
        self._isolated = (digest, *isolated)
        return isolated

    def _isolate(self, plan: Plan, rendered: Rendered, problem: str) -> tuple[Rendered, dict[str, str]] | None:
        """Find the vhosts that make `nginx -t` fail: the block nginx names by line, else bisect.
        None when the failure is not any vhost's alone (then the whole config is rejected)."""
        keys = [v.key for v in rendered.vhosts]
        names = {v.key: v for v in rendered.vhosts}

        def test_only(subset: list[str]) -> str:
            return self.test(self._render(plan, frozenset(keys) - set(subset)).text)

        test = culprits.bounded(test_only, MAX_ISOLATION_TESTS, MAX_ISOLATION_SECONDS)
        failing: dict[str, str] = {}
        current, message = rendered, problem
        try:
            while message:
                named = [k for k in nginx_isolate.blocks_at(nginx_isolate.error_lines(message), current.blocks)
                         if k not in failing]
                if named:
                    failing.update({k: message for k in named})
                    current = self._render(plan, frozenset(failing))
                    message = test([v.key for v in current.vhosts])
                    continue
                # Search the vhosts that fail on their own: none when the config without any vhost
                # fails too, or when some only fail together. The rest passes without those found.
                found = culprits.find([v.key for v in current.vhosts], test, message, together=False) \
                    if current.vhosts else None
                if not found:
                    return None
                failing.update(found)
                current, message = self._render(plan, frozenset(failing)), ""
        except culprits.OverBudget as error:
            log.error("nginx: could not isolate the failing vhosts: %s", error)
            return None
        set_aside = {k: f"service {names[k].service} (vhost {names[k].server_name}): {failing[k]}"
                     for k in sorted(failing, key=keys.index)}
        return current, set_aside

    def _render(self, plan: Plan, exclude: frozenset[str]) -> Rendered:
        return render(plan, self.prefix, user=self.user, exclude=exclude)

    def _result(self, ok: bool, action: str, details: dict, set_aside: dict[str, str],
                errors: tuple[str, ...] = ()) -> DriverResult:
        """The result; set-aside vhosts are logged when their reason appears or changes, not on
        each of the applier's retries."""
        for key, reason in set_aside.items():
            if self._set_aside.get(key) != reason:
                log.warning("nginx: set aside %s", reason)
        for key in sorted(set(self._set_aside) - set(set_aside)):
            log.info("nginx: vhost %s no longer set aside", key)
        self._set_aside = dict(set_aside)
        return DriverResult(self.name, ok, action, errors=errors, details=details, set_aside=dict(set_aside))

    def test(self, text: str) -> str:
        """Run `nginx -t` on `text`; the error message, or "" when it is valid."""
        candidate = os.path.join(self.prefix, f".candidate-{os.getpid()}.conf")
        try:
            with open(candidate, "w", encoding="utf-8") as out:
                out.write(text)
            proc = subprocess.run([self.binary, "-t", "-q", "-p", self.prefix + "/", "-c", candidate],
                                  capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"nginx -t could not run: {error}"
        finally:
            if os.path.exists(candidate):
                os.unlink(candidate)
        if proc.returncode == 0:
            return ""
        # "2026/11/30 10:33:21 [emerg] 28046#28046: unknown directive ..." -> "[emerg] unknown directive ...":
        # the same problem reads the same every time; nginx's closing "test failed" line adds nothing
        lines = [_LOG_PREFIX.sub(r"\1 ", line) for line in (proc.stderr + proc.stdout).splitlines()
                 if line.strip() and not line.endswith(" test failed")]
        return "nginx -t failed: " + " | ".join(lines[-5:]).replace(candidate, nginx_isolate.CONFIG_NAME)

    def master_pid(self) -> int | None:
        """The running master's pid, from the pid file, checked against /proc (no stale pids)."""
        try:
            pid = int((read_text_or_none(self.pid_file) or "").strip())
        except ValueError:
            return None
        return pid if self._is_master(pid) else None

    def _is_master(self, pid: int) -> bool:
        """nginx's executable, with this prefix on its command line ("nginx: master process
        /usr/sbin/nginx -p <prefix>/ ...")."""
        line = " ".join(proc_identity.cmdline(pid))
        return pid > 0 and f"-p {self.prefix}/" in line and proc_identity.executes(pid, self.binary)

    @staticmethod
    def _accepting_workers(master: int) -> set[int]:
        """Workers of `master` that still accept connections (not shutting down)."""
        return {pid for pid in proc_identity.children(master)
                if " ".join(proc_identity.cmdline(pid)) == "nginx: worker process"}

    def _wait_for_old_workers(self, master: int, old: set[int], timeout: float = OLD_WORKERS_TIMEOUT) -> None:
        """Return once none of `old` accepts connections any more (each has gone or is shutting
        down), so what `applied` reports is what a new connection gets."""
        deadline = time.monotonic() + timeout
        while old & self._accepting_workers(master):
            if time.monotonic() >= deadline:
                log.warning("nginx: old workers %s still accepting %.1fs after the reload", sorted(old), timeout)
                return
            time.sleep(0.01)

    def _signal_master(self, pid: int, signum: int) -> bool:
        return proc_identity.signal_verified(pid, signum, self._is_master)
