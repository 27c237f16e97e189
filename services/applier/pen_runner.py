"""`proxymatic pen`: one supervised program that keeps one Pen process per Pen service port.

The Pen driver (in the applier) decides which instances should exist and writes them to
`<run_dir>/pen/instances.json`; this runner starts, watches and restarts the pens so that the
running set matches the file. It re-reads the file on SIGHUP (the driver sends one after every
change) and also checks it every second, so a lost signal only delays a change.

Per instance `<port>-<protocol>` the run dir holds:
  <key>.cfg   penctl commands for every server slot, written by the driver; Pen reads it at start
              (-F), so a pen that is (re)started comes up with the current membership
  <key>.ctl   Pen's control socket (unix), membership changes go through it without a restart: a
              symlink to sock/<key>.ctl, which Pen creates (sock/ belongs to the user Pen runs as)
  <key>.pid   Pen's pid file, used to adopt a pen that outlived a runner restart
  <key>.html  Pen's status page (-w), needed for the `status` command that lists connections
A pen that dies is restarted after 1 s, doubling up to 30 s while it keeps dying quickly.

Run as root, the runner starts every pen as PEN_USER (nobody) from its first instruction
(`setpriv`), keeping only the right to bind ports below 1024; see `launch_argv` for why Pen's own
`-u` does not do. The run dir is private (0700), so a pen reaches its files through a descriptor
of the pen directory it inherits (fd PEN_DIR_FD, paths /proc/self/fd/<fd>/...), never through
the run dir's path. The runner creates the pid file and status page empty, 0600 and owned by
that user, and sock/ for the control sockets; the pen directory and the .cfg files stay root's
(a .cfg is 0640 with the pens' group, the one file a pen reads and does not own: `write_cfg`). A
pid read back from a pid file is only ever signalled when /proc shows it is that very pen (same
command line and executable).

A bad instance file (unreadable, not JSON, any malformed entry) keeps the running pens as they
are; a failure for one instance (its files, its start or stop) touches only that instance; and
the loop survives any exception: the runner never takes every pen down for a bug or bad data.
"""
from __future__ import annotations

import json
import logging
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import asdict, dataclass

from services.applier import proc_identity
from services.applier.pen_steps import MAX_BACKOFF, MIN_BACKOFF, PenLife, life_step
from services.common.files import write_atomic

log = logging.getLogger("proxymatic.pen")

INSTANCES_FILE = "instances.json"
SOCKET_DIR = "sock"  # the control sockets, created by the pens (so owned by their user)
# The descriptor of the pen directory every pen started as PEN_USER inherits: a fixed number, so
# a pen's command line (compared when a restarted runner adopts it) is the same for every runner.
PEN_DIR_FD = 200
PEN_DIR_VIEW = f"/proc/self/fd/{PEN_DIR_FD}"
RUNNER_PID_FILE = "runner.pid"
# Who Pen runs as when started by root (Debian has no user of its own for Pen).
PEN_USER = "nobody"


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
    def from_dict(cls, data) -> "PenInstance":
        """Raises ValueError for anything but an instance as `render_instances` writes it."""
        numbers = ("port", "slots", "clients", "max_connections")
        if not isinstance(data, dict) or not {"protocol", *numbers} <= set(data) \
                or not all(type(data[name]) is int for name in numbers):
            raise ValueError(f"bad pen instance {repr(data)[:200]}")
        instance = cls(port=data["port"], protocol=data["protocol"], slots=data["slots"],
                       clients=data["clients"], max_connections=data["max_connections"])
        if instance.protocol not in ("tcp", "udp") or not 0 < instance.port < 65536 or instance.slots < 1 \
                or instance.clients < 1 or instance.max_connections < 1:
            raise ValueError(f"bad pen instance {repr(data)[:200]}")
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

    @property
    def sockets(self) -> str:
        return os.path.join(self.directory, SOCKET_DIR)

    def socket(self, key: str) -> str:
        """Where the pen creates its control socket."""
        return os.path.join(self.sockets, f"{key}.ctl")

    def control(self, key: str) -> str:
        """Where clients connect: `<key>.ctl`, a symlink to `socket(key)` made by the runner."""
        return self.file(key, "ctl")


def render_instances(instances: list[PenInstance]) -> str:
    data = {"instances": [asdict(i) for i in sorted(instances, key=lambda i: (i.port, i.protocol))]}
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def read_instances(path: str) -> dict[str, PenInstance]:
    """The desired instances; a missing file means none. Raises ValueError for anything else
    than a file `render_instances` could have written (unreadable, not JSON, a bad entry)."""
    try:
        with open(path, encoding="utf-8") as source:
            data = json.load(source)  # a JSONDecodeError or UnicodeDecodeError is a ValueError
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get("instances", []), list):
        raise ValueError(f"{path}: not an object with a list of instances: {repr(data)[:100]}")
    instances = {}
    for item in data.get("instances", []):
        try:
            instance = PenInstance.from_dict(item)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
        instances[instance.key] = instance
    return instances


def pen_group() -> int | None:
    """The group pens run with when we are root and they run as PEN_USER; None otherwise (then
    they run as our user, or as root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PEN_USER).pw_gid
    except KeyError:
        return None


def write_cfg(path: str, text: str) -> bool:
    """Write a pen's `.cfg` atomically: the one file a pen reads and does not own. As root it is
    root's, group the pens' group, 0640 (a pen, as PEN_USER, reads it through the inherited
    directory descriptor: opening it checks the file's own mode); otherwise 0600. An existing
    file with the same text keeps it and gets that owner and mode. False when the text was
    already there."""
    gid = pen_group()
    mode = 0o640 if gid is not None else 0o600
    try:
        with open(path, "rb") as current:
            same = current.read() == text.encode()
    except FileNotFoundError:
        same = False
    if same:
        status = os.stat(path)
        if gid is not None and status.st_gid != gid:
            os.chown(path, -1, gid)  # before the mode: a pen can read it at every step
        if stat.S_IMODE(status.st_mode) != mode:
            os.chmod(path, mode)
        return False
    return write_atomic(path, text, skip_if_same=False, mode=mode, group=gid)


def dropped(user: str | None) -> bool:
    """Whether pens run as another user than ours (see `pen_user`)."""
    return user not in (None, "root")


def pen_argv(instance: PenInstance, files: PenFiles, binary: str = "pen", user: str | None = None) -> list[str]:
    """Pen's command line (what /proc shows once it runs); `user` is what `pen_user` chose. A pen
    of another user names its files through the inherited directory descriptor."""
    key = instance.key

    def at(path: str) -> str:
        return os.path.join(PEN_DIR_VIEW, os.path.relpath(path, files.directory)) if dropped(user) else path

    argv = [binary, "-f",  # foreground: the runner is the supervisor
            "-W",  # weighted server selection (weight 0 = no new clients)
            "-r",  # no client stickiness: every new connection/flow is balanced by weight
            "-C", at(files.socket(key)), "-p", at(files.file(key, "pid")), "-w", at(files.file(key, "html")),
            "-F", at(files.file(key, "cfg")),
            "-c", str(instance.clients), "-x", str(instance.max_connections)]
    if instance.protocol == "udp":
        argv.append("-U")
    if user == "root":
        argv += ["-u", "root"]  # Pen refuses a control socket when it runs as root without `-u`
    argv.append(str(instance.port))
    return argv


def launch_argv(argv: list[str], user: str | None) -> list[str]:
    """How the runner starts a pen: as `user` from the start, with nothing but the capability to
    bind ports below 1024. Not Pen's `-u`, which switches after binding the listening port: a
    UDP pen then binds each client flow's socket to that port with SO_REUSEPORT, which Linux only
    allows among sockets of one uid, so a pen that dropped root forwards no datagram (EADDRINUSE,
    once per flow)."""
    if not dropped(user):
        return argv
    entry = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all,+net_bind_service", "--ambient-caps=+net_bind_service", *argv]


def pen_user(wanted: str = PEN_USER) -> str | None:
    """The user pens run as: None when we are not root (they keep our user); `wanted` when it
    exists and setpriv can start a process as it; otherwise root, with a warning."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(wanted)
    except KeyError:
        log.warning("pen: no user %r, pens run as root", wanted)
        return "root"
    if shutil.which("setpriv") is None:
        log.warning("pen: no setpriv (util-linux) to start pens as %r: they run as root", wanted)
        return "root"
    true = shutil.which("true") or "/bin/true"
    try:  # setpriv needs CAP_SETUID, CAP_SETGID and CAP_NET_BIND_SERVICE: not in every container
        subprocess.run(launch_argv([true], wanted), check=True, timeout=5, capture_output=True)
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("pen: cannot start a process as %r with setpriv (%s): pens run as root", wanted, error)
        return "root"
    return wanted


def prepare_owned(path: str, user: str | None) -> None:
    """An empty file at `path` that `user` may write (a pen writes it, in a directory it cannot
    write); it replaces whatever was there, so nothing left by an earlier process survives.
    0600: the pen (its owner) writes it and reads it back (the status page), root reads any."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if user and user != "root":
            entry = pwd.getpwnam(user)
            os.fchown(fd, entry.pw_uid, entry.pw_gid)
    finally:
        os.close(fd)


def own_pen(pid: int, instance: PenInstance, files: PenFiles, binary: str) -> bool:
    """Whether `pid` is a pen of this instance: Pen's executable, listening on the instance's
    port with its control socket. Settings may differ (a pen left by an older runner)."""
    line = proc_identity.cmdline(pid)
    socket_path = files.socket(instance.key)
    controls = (socket_path, os.path.join(PEN_DIR_VIEW, os.path.relpath(socket_path, files.directory)),
                files.control(instance.key))  # as root, as another user, and before sock/ existed
    has_control = any(a == "-C" and b in controls for a, b in zip(line, line[1:]))
    return has_control and line[-1] == str(instance.port) and proc_identity.executes(pid, binary)


class _Pen:
    """One pen process: our child, or adopted from a previous runner (then only watched)."""

    def __init__(self, instance: PenInstance, argv: list[str]):
        self.instance = instance
        self.argv = argv  # for an adopted pen: its command line as found
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
            return self.is_it(self.adopted_pid)
        return False

    def is_it(self, pid: int) -> bool:
        """`pid` is this pen: its command line and Pen's executable (checked before a signal)."""
        if self.process is not None:
            return pid == self.process.pid and self.process.poll() is None
        return proc_identity.cmdline(pid) == self.argv and proc_identity.executes(pid, self.argv[0])


class PenRunner:
    def __init__(self, files: PenFiles, binary: str = "pen", poll_interval: float = 1.0):
        self.files = files
        self.binary = binary
        self.poll_interval = poll_interval
        os.makedirs(files.directory, exist_ok=True)
        self.user = pen_user()
        self._prepare_directory()
        self.pens: dict[str, _Pen] = {}
        self.desired: dict[str, PenInstance] = {}
        self._stopping = False
        self._wake_r, self._wake_w = -1, -1
        self._load_error: str | None = None  # why the instance file was last refused
        self._errors: dict[str, str] = {}  # instance key -> its last failure, logged once

    # -- reconciliation ---------------------------------------------------------------------
    def load(self) -> None:
        """Read the instance file; a bad one keeps the current set (logged when its reason changes,
        not every second)."""
        try:
            desired = read_instances(self.files.instances)
        except ValueError as error:
            if str(error) != self._load_error:
                log.error("pen: cannot read the instance file, keeping the %d pen(s) as they are: %s",
                          len(self.pens), error)
            self._load_error = str(error)
            return
        if self._load_error is not None:
            log.info("pen: the instance file is readable again")
            self._load_error = None
        self.desired = desired

    def reconcile(self) -> None:
        """Make the running pens match `desired`, one instance at a time: a failure for one (an
        exception included) is logged and retried later for that instance only."""
        for key in sorted(set(self.pens) - set(self.desired)):
            self._guarded(key, "stop", self._retire, key)
        for key, instance in sorted(self.desired.items()):
            if not self._guarded(key, "start", self._reconcile_one, key, instance):
                pen = self.pens.get(key)
                if pen is not None and pen.process is None and not pen.adopted_pid:
                    del self.pens[key]  # nothing runs: the next turn starts afresh (adoption first)

    def _guarded(self, key: str, what: str, action, *args):
        """`action(*args)`, logging an exception (once per distinct error) instead of raising it:
        False when it raised."""
        try:
            action(*args)
        except Exception as error:  # noqa: BLE001  one instance's failure is never everyone's
            text = f"{type(error).__name__}: {error}"
            if self._errors.get(key) != text:
                log.exception("pen %s: cannot %s it: %s", key, what, text)
            else:
                log.debug("pen %s: cannot %s it: %s", key, what, text)
            self._errors[key] = text
            return False
        self._errors.pop(key, None)
        return True

    def _retire(self, key: str) -> None:
        log.info("pen %s: no longer wanted, stopping", key)
        self._stop(self.pens[key])
        del self.pens[key]
        self._remove_files(key)

    @staticmethod
    def _delay(pen: "_Pen") -> None:
        """The next start attempt of `pen` after its backoff, which doubles up to MAX_BACKOFF."""
        pen.restart_at = time.monotonic() + pen.backoff
        pen.backoff = min(MAX_BACKOFF, pen.backoff * 2)

    def _reconcile_one(self, key: str, instance: PenInstance) -> None:
        now = time.monotonic()
        argv = pen_argv(instance, self.files, self.binary, self.user)
        pen = self.pens.get(key)
        if pen is not None and (pen.argv != argv or pen.instance != instance):
            log.info("pen %s: settings changed (%s), restarting", key, instance)
            self._stop(pen)
            pen = None
        if pen is None:
            pen = self.pens[key] = _Pen(instance, argv)
            if self._adopt(pen):
                return
        life, turn = life_step(PenLife(pen.started, pen.adopted_pid is not None, pen.restart_at, pen.backoff),
                               pen.running(), now)
        if turn.died:
            code = pen.process.returncode if pen.process is not None else None
            log.warning("pen %s: exited (code %s), restarting in %.0fs", key, code, turn.delay)
            pen.process, pen.adopted_pid = None, None
        pen.started, pen.restart_at, pen.backoff = life.started, life.restart_at, life.backoff
        if turn.start:
            self._start(pen)

    def _adopt(self, pen: _Pen) -> bool:
        """Take over a pen a previous runner left running (its pid file). The file is written by
        Pen after it dropped root, so the pid is trusted only as far as /proc confirms it."""
        key = pen.instance.key
        try:
            with open(self.files.file(key, "pid"), encoding="utf-8") as source:
                pid = int(source.read().strip())
        except (OSError, ValueError):
            return False
        if pid <= 0 or not own_pen(pid, pen.instance, self.files, self.binary):
            return False
        if proc_identity.cmdline(pid) == pen.argv:
            pen.adopted_pid = pid
            pen.started = time.monotonic()
            log.info("pen %s: adopted running pen pid %d", key, pid)
            return True
        # Ours but started with other settings (e.g. before an upgrade): it holds the port, so
        # it has to go before this instance can start.
        log.info("pen %s: pen pid %d runs with other settings, stopping it", key, pid)
        old = _Pen(pen.instance, proc_identity.cmdline(pid))
        old.adopted_pid = pid
        self._stop(old)
        return False

    def _prepare_directory(self) -> None:
        """sock/, where pens create their control sockets, writable by their user only; and, for
        pens of another user, the pen directory's descriptor they inherit (it must let them
        open the files named there: mode 0711, no listing)."""
        os.makedirs(self.files.sockets, mode=0o700, exist_ok=True)
        entry = pwd.getpwnam(self.user) if dropped(self.user) else None
        os.chown(self.files.sockets, entry.pw_uid if entry else os.geteuid(), entry.pw_gid if entry else os.getegid())
        os.chmod(self.files.sockets, 0o700)
        if entry:
            os.chmod(self.files.directory, 0o711)
            descriptor = os.open(self.files.directory, os.O_RDONLY | os.O_DIRECTORY)
            os.dup2(descriptor, PEN_DIR_FD, inheritable=False)
            os.close(descriptor)

    def _start(self, pen: _Pen) -> None:
        key = pen.instance.key
        try:
            for path in (self.files.socket(key), self.files.control(key)):
                if os.path.lexists(path):
                    os.unlink(path)
            # The name clients use stays in the root-owned directory: a symlink to the socket.
            os.symlink(os.path.join(SOCKET_DIR, f"{key}.ctl"), self.files.control(key))
            # The pen writes these and cannot create files here: they must exist and be its own.
            for suffix in ("pid", "html"):
                prepare_owned(self.files.file(key, suffix), self.user)
            cfg = self.files.file(key, "cfg")
            if not os.path.exists(cfg):
                write_cfg(cfg, "")  # the driver has not written a membership yet: all slots empty
        except (OSError, KeyError) as error:
            log.error("pen %s: cannot prepare its files: %s", key, error)
            self._delay(pen)
            return
        try:
            pen.process = subprocess.Popen(launch_argv(pen.argv, self.user), stdin=subprocess.DEVNULL,
                                           pass_fds=(PEN_DIR_FD,) if dropped(self.user) else ())
        except (OSError, ValueError, subprocess.SubprocessError) as error:
            log.error("pen %s: cannot start %s: %s", key, pen.argv[0], error)
            self._delay(pen)
            return
        pen.started = time.monotonic()
        log.info("pen %s: started pid %d: %s", key, pen.process.pid, " ".join(launch_argv(pen.argv, self.user)))

    def _stop(self, pen: _Pen, grace: float = 5.0) -> None:
        pid = pen.pid
        if pid is None or not pen.running():
            return
        if not self._send(pen, signal.SIGTERM):
            return
        deadline = time.monotonic() + grace
        while pen.running() and time.monotonic() < deadline:
            time.sleep(0.02)
        if pen.running():
            log.warning("pen %s: pid %d ignored SIGTERM, killing it", pen.instance.key, pid)
            self._send(pen, signal.SIGKILL)
        if pen.process is not None:
            pen.process.wait()

    @staticmethod
    def _send(pen: _Pen, signum: int) -> bool:
        """Signal a pen: our child directly (its pid stays ours until waited for), an adopted one
        only while /proc still shows that very pen."""
        if pen.process is not None:
            if pen.process.poll() is not None:
                return False
            pen.process.send_signal(signum)
            return True
        sent = proc_identity.signal_verified(pen.adopted_pid or 0, signum, pen.is_it)
        if not sent:
            log.warning("pen %s: pid %s is no longer that pen, not signalled", pen.instance.key, pen.adopted_pid)
        return sent

    def _remove_files(self, key: str) -> None:
        """The files of a pen that was stopped; one that cannot be removed is logged and left."""
        for path in (self.files.control(key), self.files.socket(key), self.files.file(key, "pid"),
                     self.files.file(key, "html")):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as error:
                log.warning("pen %s: cannot remove %s: %s", key, path, error)

    def stop_all(self) -> None:
        for key in sorted(self.pens):
            self._guarded(key, "stop", self._stop, self.pens[key])
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
        # pid and start time: a driver never signals another process that got the pid later
        write_atomic(self.files.runner_pid, proc_identity.identity(os.getpid()) + "\n")
        log.info("pen runner: watching %s", self.files.instances)
        try:
            # The first turn even when told to stop already: it adopts the pens a previous runner
            # left, so that stopping stops them too (they would be left running otherwise).
            self._step()
            while not self._stopping:
                self._wait()
                if not self._stopping:
                    self._step()
        finally:
            log.info("pen runner: stopping %d pen(s)", len(self.pens))
            self.stop_all()
            signal.set_wakeup_fd(-1)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r, self._wake_w = -1, -1
            try:
                os.unlink(self.files.runner_pid)
            except FileNotFoundError:
                pass
        return 0

    def _step(self) -> None:
        """One turn of the loop. Nothing raised here ends the loop: its `finally` stops every pen,
        so an exception is logged and the pens are left as they are until the next turn."""
        try:
            self.load()
            self.reconcile()
        except Exception:  # noqa: BLE001
            log.exception("pen runner: reconciling failed, the pens stay as they are")

    def _wait(self) -> None:
        """Until a signal, or the next check (poll interval, or a pen's restart time)."""
        try:
            select.select([self._wake_r], [], [], self._timeout())
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        except Exception:  # noqa: BLE001
            log.exception("pen runner: waiting failed")
            time.sleep(self.poll_interval)  # not a busy loop while it keeps failing


def main(settings) -> int:
    """Entry point of `proxymatic pen` (supervisord program)."""
    return PenRunner(PenFiles.of(settings)).run()


def _runner(files: PenFiles) -> int | None:
    """The runner's pid, when the process recorded in runner.pid is still running."""
    try:
        with open(files.runner_pid, encoding="utf-8") as source:
            recorded = source.read()
    except OSError:
        return None
    return proc_identity.same_process(recorded)


def signal_runner(files: PenFiles) -> bool:
    """Wake the runner (the driver calls this after changing the instance file). A stale
    runner.pid never gets another process signalled: the pid is pinned, then checked again."""
    pid = _runner(files)
    return pid is not None and proc_identity.signal_verified(pid, signal.SIGHUP, lambda p: _runner(files) == p)


def runner_alive(files: PenFiles) -> bool:
    return _runner(files) is not None
