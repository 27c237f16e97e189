"""`proxymatic pen`: one supervised program that keeps one Pen process per Pen service port.

The Pen driver (in the applier) decides which instances should exist and writes them to
`<run_dir>/pen/instances.json`; this runner starts, watches and restarts the pens so that the
running set matches the file. It re-reads the file on SIGHUP (the driver sends one after every
change) and also checks it every second, so a lost signal only delays a change.

Per instance `<port>-<protocol>` the run dir holds:
  <key>.cfg   penctl commands for every server slot, written by the driver; Pen reads it at start
              (-F), so a pen that is (re)started comes up with the current membership
  <key>.ctl   Pen's control socket (unix), membership changes go through it without a restart
  <key>.pid   Pen's pid file, used to adopt a pen that outlived a runner restart
  <key>.html  Pen's status page (-w), needed for the `status` command that lists connections
A pen that dies is restarted after 1 s, doubling up to 30 s while it keeps dying quickly.
"""
from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import time
from dataclasses import asdict, dataclass

from services.common.files import write_atomic

log = logging.getLogger("proxymatic.pen")

INSTANCES_FILE = "instances.json"
RUNNER_PID_FILE = "runner.pid"
MIN_BACKOFF = 1.0
MAX_BACKOFF = 30.0
STABLE_AFTER = 10.0  # a pen that ran this long resets the restart backoff


@dataclass(frozen=True)
class PenInstance:
    """Everything a Pen process is started with; a change to any field means a restart."""

    port: int
    protocol: str  # tcp | udp
    slots: int  # server table size (PEN_SERVERS)
    clients: int  # PEN_CLIENTS
    max_connections: int  # MAX_CONNECTIONS

    @property
    def key(self) -> str:
        return f"{self.port}-{self.protocol}"

    @classmethod
    def from_dict(cls, data: dict) -> "PenInstance":
        instance = cls(port=int(data["port"]), protocol=str(data["protocol"]), slots=int(data["slots"]),
                       clients=int(data["clients"]), max_connections=int(data["max_connections"]))
        if instance.protocol not in ("tcp", "udp") or not 0 < instance.port < 65536 or instance.slots < 1:
            raise ValueError(f"bad pen instance {data!r}")
        return instance


class PenFiles:
    """Where everything of the Pen stage lives: `<run_dir>/pen/`."""

    def __init__(self, directory: str):
        self.directory = directory

    @classmethod
    def of(cls, settings) -> "PenFiles":
        return cls(settings.path("pen"))

    @property
    def instances(self) -> str:
        return os.path.join(self.directory, INSTANCES_FILE)

    @property
    def runner_pid(self) -> str:
        return os.path.join(self.directory, RUNNER_PID_FILE)

    def file(self, key: str, suffix: str) -> str:
        return os.path.join(self.directory, f"{key}.{suffix}")

    def control(self, key: str) -> str:
        return self.file(key, "ctl")


def render_instances(instances: list[PenInstance]) -> str:
    data = {"instances": [asdict(i) for i in sorted(instances, key=lambda i: (i.port, i.protocol))]}
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def read_instances(path: str) -> dict[str, PenInstance]:
    """The desired instances; a missing file means none. Raises ValueError for a broken file."""
    try:
        with open(path, encoding="utf-8") as source:
            data = json.load(source)
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: {error}") from error
    instances = {}
    for item in data.get("instances", []):
        instance = PenInstance.from_dict(item)
        instances[instance.key] = instance
    return instances


def pen_argv(instance: PenInstance, files: PenFiles, binary: str = "pen") -> list[str]:
    key = instance.key
    argv = [binary, "-f",  # foreground: the runner is the supervisor
            "-W",  # weighted server selection (weight 0 = no new clients)
            "-r",  # no client stickiness: every new connection/flow is balanced by weight
            "-C", files.control(key), "-p", files.file(key, "pid"), "-w", files.file(key, "html"),
            "-F", files.file(key, "cfg"),
            "-c", str(instance.clients), "-x", str(instance.max_connections)]
    if instance.protocol == "udp":
        argv.append("-U")
    if os.geteuid() == 0:
        # Pen refuses a control socket when it runs as root unless told so explicitly; it cannot
        # drop to another user either, since it writes its pid file and status page afterwards.
        argv += ["-u", "root"]
    argv.append(str(instance.port))
    return argv


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as source:
            return [part.decode(errors="replace") for part in source.read().split(b"\0") if part]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Pen:
    """One pen process: our child, or adopted from a previous runner (then only watched)."""

    def __init__(self, instance: PenInstance, argv: list[str]):
        self.instance = instance
        self.argv = argv
        self.process: subprocess.Popen | None = None
        self.adopted_pid: int | None = None
        self.started = 0.0
        self.backoff = MIN_BACKOFF
        self.restart_at = 0.0  # monotonic time of the next start attempt

    @property
    def pid(self) -> int | None:
        if self.process is not None:
            return self.process.pid
        return self.adopted_pid

    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        if self.adopted_pid is not None:
            return _alive(self.adopted_pid) and _cmdline(self.adopted_pid) == self.argv
        return False


class PenRunner:
    def __init__(self, files: PenFiles, binary: str = "pen", poll_interval: float = 1.0):
        self.files = files
        self.binary = binary
        self.poll_interval = poll_interval
        self.pens: dict[str, _Pen] = {}
        self.desired: dict[str, PenInstance] = {}
        self._stopping = False
        self._wake_r, self._wake_w = -1, -1

    # -- reconciliation ---------------------------------------------------------------------
    def load(self) -> None:
        try:
            self.desired = read_instances(self.files.instances)
        except ValueError as error:
            log.error("pen: cannot read the instance file, keeping the current set: %s", error)

    def reconcile(self) -> None:
        now = time.monotonic()
        for key in sorted(set(self.pens) - set(self.desired)):
            log.info("pen %s: no longer wanted, stopping", key)
            self._stop(self.pens.pop(key))
            self._remove_files(key)
        for key, instance in sorted(self.desired.items()):
            argv = pen_argv(instance, self.files, self.binary)
            pen = self.pens.get(key)
            if pen is not None and (pen.argv != argv or pen.instance != instance):
                log.info("pen %s: settings changed (%s), restarting", key, instance)
                self._stop(pen)
                pen = None
            if pen is None:
                pen = self.pens[key] = _Pen(instance, argv)
                if self._adopt(pen):
                    continue
            if pen.running():
                if pen.started and now - pen.started > STABLE_AFTER:
                    pen.backoff = MIN_BACKOFF
                continue
            if pen.started or pen.adopted_pid:
                # It ran and died: wait a little before the next try, longer while it keeps dying.
                code = pen.process.returncode if pen.process is not None else None
                log.warning("pen %s: exited (code %s), restarting in %.0fs", key, code, pen.backoff)
                pen.restart_at = now + pen.backoff
                pen.backoff = min(MAX_BACKOFF, pen.backoff * 2) if now - pen.started < STABLE_AFTER \
                    else MIN_BACKOFF
                pen.process, pen.adopted_pid, pen.started = None, None, 0.0
            if now >= pen.restart_at:
                self._start(pen)

    def _adopt(self, pen: _Pen) -> bool:
        try:
            with open(self.files.file(pen.instance.key, "pid"), encoding="utf-8") as source:
                pid = int(source.read().strip())
        except (OSError, ValueError):
            return False
        if _alive(pid) and _cmdline(pid) == pen.argv:
            pen.adopted_pid = pid
            pen.started = time.monotonic()
            log.info("pen %s: adopted running pen pid %d", pen.instance.key, pid)
            return True
        return False

    def _start(self, pen: _Pen) -> None:
        key = pen.instance.key
        for suffix in ("ctl", "pid"):
            try:
                os.unlink(self.files.file(key, suffix))
            except FileNotFoundError:
                pass
        cfg = self.files.file(key, "cfg")
        if not os.path.exists(cfg):
            write_atomic(cfg, "")  # the driver has not written a membership yet: all slots empty
        try:
            pen.process = subprocess.Popen(pen.argv, stdin=subprocess.DEVNULL)
        except OSError as error:
            log.error("pen %s: cannot start %s: %s", key, pen.argv[0], error)
            pen.restart_at = time.monotonic() + pen.backoff
            pen.backoff = min(MAX_BACKOFF, pen.backoff * 2)
            return
        pen.started = time.monotonic()
        log.info("pen %s: started pid %d: %s", key, pen.process.pid, " ".join(pen.argv))

    def _stop(self, pen: _Pen, grace: float = 5.0) -> None:
        pid = pen.pid
        if pid is None or not pen.running():
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while pen.running() and time.monotonic() < deadline:
            time.sleep(0.02)
        if pen.running():
            log.warning("pen %s: pid %d ignored SIGTERM, killing it", pen.instance.key, pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if pen.process is not None:
            pen.process.wait()

    def _remove_files(self, key: str) -> None:
        for suffix in ("ctl", "pid", "html"):
            try:
                os.unlink(self.files.file(key, suffix))
            except FileNotFoundError:
                pass

    def stop_all(self) -> None:
        for key in sorted(self.pens):
            self._stop(self.pens[key])
        self.pens.clear()

    # -- main loop --------------------------------------------------------------------------
    def _signal(self, signum: int, frame) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True

    def _timeout(self) -> float:
        now = time.monotonic()
        pending = [p.restart_at - now for p in self.pens.values() if p.process is None and not p.adopted_pid]
        return max(0.01, min([self.poll_interval] + pending))

    def run(self) -> int:
        os.makedirs(self.files.directory, exist_ok=True)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, self._signal)
        write_atomic(self.files.runner_pid, f"{os.getpid()}\n")
        log.info("pen runner: watching %s", self.files.instances)
        try:
            while not self._stopping:
                self.load()
                self.reconcile()
                select.select([self._wake_r], [], [], self._timeout())
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
        finally:
            log.info("pen runner: stopping %d pen(s)", len(self.pens))
            self.stop_all()
            signal.set_wakeup_fd(-1)
            try:
                os.unlink(self.files.runner_pid)
            except FileNotFoundError:
                pass
        return 0


def main(settings) -> int:
    """Entry point of `proxymatic pen` (supervisord program)."""
    return PenRunner(PenFiles.of(settings)).run()


def signal_runner(files: PenFiles) -> bool:
    """Wake the runner (the driver calls this after changing the instance file)."""
    try:
        with open(files.runner_pid, encoding="utf-8") as source:
            pid = int(source.read().strip())
        os.kill(pid, signal.SIGHUP)
        return True
    except (OSError, ValueError):
        return False


def runner_alive(files: PenFiles) -> bool:
    try:
        with open(files.runner_pid, encoding="utf-8") as source:
            return _alive(int(source.read().strip()))
    except (OSError, ValueError):
        return False
