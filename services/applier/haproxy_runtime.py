"""A thin client for HAProxy's master CLI (unix socket): process list, reload, and runtime API
commands routed to one worker (`@!<pid> <command>`).

Routing worker commands through the master rather than the worker's own stats socket means a
command always reaches the worker we believe is current: during a reload the stats socket path
may briefly still belong to the old worker, while `@!<pid>` fails loudly if that worker is gone.

Worker commands go out in batches: `prompt; @!<pid> <c1>; @!<pid> <c2>; ...` on one line, one
connection, and the master's prompt after each command splits the answers back per command (see
MasterCli.send_batch), so a membership change is one round trip, `show proc` included.

HAProxy 2.6 syntax used here (checked against `help` on a running 2.6.12):
    show proc
    reload
    show servers state [<backend>]
    show stat -1 4 -1                        (servers only, CSV)
    show stat -1 1 -1                        (frontends only, CSV)
    set server <b>/<s> addr <ip> port <port>
    set server <b>/<s> state ready|maint
    set weight <b>/<s> <0..256>
    set maxconn server <b>/<s> <n>           (0: no limit)
"""
from __future__ import annotations

import csv
import io
import logging
import re
import time
from dataclasses import dataclass

from services.applier.haproxy_render import key_of_backend
from services.common.unix_socket import exchange

log = logging.getLogger("proxymatic.applier.haproxy")

# Admin-state flags of `show servers state` (HAProxy's SRV_ADMF_*): any maintenance origin.
ADMIN_MAINT_MASK = 0x01 | 0x02 | 0x20


# What `prompt` makes the master CLI print after each command (2.6: `master> `).
_PROMPT_RE = re.compile(r"^master[^\n>]*> ", re.M)
MAX_BATCH_LINE = 8192
GONE_MARKER = "Can't find the target PID"


class HaproxyUnavailable(OSError):
    """The master CLI cannot be reached (HAProxy not started yet, restarting, or gone)."""


class CommandFailed(RuntimeError):
    """HAProxy answered a command with an error message."""


@dataclass(frozen=True)
class ProcInfo:
    master_pid: int
    reloads: int
    failed_reloads: int
    workers: tuple[int, ...]  # current workers (normally one)
    old_workers: tuple[int, ...] = ()

    @property
    def worker(self) -> int | None:
        return self.workers[-1] if self.workers else None


@dataclass(frozen=True)
class ServerState:
    backend: str
    server: str
    ip: str
    port: int
    admin_state: int
    operational_state: int
    weight: int  # the user weight (what `set weight` sets)

    @property
    def in_maintenance(self) -> bool:
        return bool(self.admin_state & ADMIN_MAINT_MASK)


def parse_show_proc(text: str) -> ProcInfo:
    """Parse `show proc` of HAProxy 2.6:

        #<PID>   <type>   <reloads>   <uptime>   <version>
        5974     master   2 [failed: 1]   0d00h10m25s   2.6.12
        # workers
        14977    worker   1   0d00h00m05s   2.6.12
        # old workers
        ...
    """
    master_pid = reloads = failed = None
    workers: list[int] = []
    old: list[int] = []
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            section = line.lstrip("#").strip().lower()
            continue
        fields = line.split()
        if len(fields) < 3 or not fields[0].isdigit():
            continue
        if fields[1] == "master":
            master_pid, reloads = int(fields[0]), int(fields[2])
            if "[failed:" in line:
                failed = int(line.split("[failed:", 1)[1].split("]", 1)[0])
        elif fields[1] == "worker":
            (old if section.startswith("old") else workers).append(int(fields[0]))
    if master_pid is None or reloads is None:
        raise CommandFailed(f"unexpected `show proc` answer: {text[:200]!r}")
    return ProcInfo(master_pid, reloads, failed or 0, tuple(workers), tuple(old))


def parse_servers_state(text: str) -> dict[tuple[str, str], ServerState]:
    """Parse `show servers state` (format version 1): (backend, server) -> state."""
    out: dict[tuple[str, str], ServerState] = {}
    header: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("# be_id"):
            header = line[2:].split()
            continue
        if not line.strip() or line.startswith("#") or header is None:
            continue
        row = dict(zip(header, line.split()))
        try:
            state = ServerState(
                backend=row["be_name"], server=row["srv_name"], ip=row["srv_addr"],
                port=int(row["srv_port"]), admin_state=int(row["srv_admin_state"]),
                operational_state=int(row["srv_op_state"]), weight=int(row["srv_uweight"]),
            )
        except (KeyError, ValueError):
            raise CommandFailed(f"unexpected `show servers state` line: {line[:200]!r}") from None
        out[(state.backend, state.server)] = state
    return out


def parse_server_maxconn(text: str) -> dict[tuple[str, str], int]:
    """From `show stat` CSV: (backend, server) -> maxconn (0: no limit)."""
    lines = text.strip().splitlines()
    if not lines or not lines[0].startswith("# "):
        raise CommandFailed(f"unexpected `show stat` answer: {text[:200]!r}")
    reader = csv.DictReader(io.StringIO("\n".join([lines[0][2:], *lines[1:]])))
    out = {}
    for row in reader:
        if row.get("svname") in ("FRONTEND", "BACKEND") or not row.get("pxname"):
            continue
        slim = row.get("slim") or "0"
        out[(row["pxname"], row["svname"])] = int(slim) if slim.isdigit() else 0
    return out


def parse_listener_ports(text: str) -> set[int]:
    """From `show stat -1 1 -1` CSV (frontends only): the ports of the service listeners
    (`svc_<port>_tcp_<name>`) the worker holds."""
    lines = text.strip().splitlines()
    if not lines or not lines[0].startswith("# "):
        raise CommandFailed(f"unexpected `show stat` answer: {text[:200]!r}")
    ports = set()
    for line in lines[1:]:
        # svc_<port>_tcp_<name>, or an older svc_<port>_tcp (a HAProxy started by a previous
        # version still holds those ports)
        name, _, rest = line.partition(",")
        key = key_of_backend(name)
        if key is not None and key.endswith("/tcp") and rest.startswith("FRONTEND,"):
            ports.add(int(key.split("/")[0]))
    return ports


def _check_single(command: str) -> None:
    """One command per CLI line part: nothing from a value can start another command."""
    if "\n" in command or "\r" in command or ";" in command:
        raise ValueError(f"refusing a multi-command CLI line: {command!r}")


class MasterCli:
    """One connection per line: a single command (`send`), or a batch in prompt mode
    (`send_batch`). The connection is half-closed after the line, so the master answers and
    closes."""

    def __init__(self, path: str, timeout: float = 5.0):
        self.path = path
        self.timeout = timeout

    def send(self, command: str) -> str:
        _check_single(command)
        return self._send_line(command)

    def _send_line(self, line: str) -> str:
        try:
            # the master CLI answers once it sees the end of input
            answer = exchange(self.path, line.encode() + b"\n", self.timeout, half_close=True)
        except OSError as error:
            raise HaproxyUnavailable(f"master CLI {self.path}: {error}") from error
        return answer.decode(errors="replace")

    def send_batch(self, commands: list[str], max_line: int = MAX_BATCH_LINE) -> list[str | None]:
        """Several commands in as few connections as possible: `prompt; <c1>; <c2>; ...` per line
        of at most `max_line` bytes (HAProxy's CLI buffer is tune.bufsize, 16 kB by default).

        In prompt mode the master prints `master> ` after every command, so each command gets its
        own answer back (a worker command's answer is the worker's text, usually empty). A command
        HAProxy cannot route (`@!<pid>` of a process that is gone) ends the line: its answer is the
        master's error message, and it and every command after it (nothing more is sent) get
        None or that message, so a caller sees exactly which commands ran.
        """
        for command in commands:
            _check_single(command)
        answers: list[str | None] = []
        start = 0
        while start < len(commands):
            end, size = start, len("prompt")
            while end < len(commands) and (end == start or size + 2 + len(commands[end]) <= max_line):
                size += 2 + len(commands[end])
                end += 1
            chunk = commands[start:end]
            parts = _PROMPT_RE.split(self._send_line("; ".join(["prompt", *chunk])))
            if parts[0].strip():
                raise CommandFailed(f"unexpected answer to `prompt`: {parts[0][:200]!r}")
            got = parts[1:]
            if len(got) == len(chunk) + 1 and not got[-1].strip():
                answers += got[:-1]
                start = end
                continue
            # The line stopped early: the last part is the failing command's message.
            answers += got[:len(chunk)] + [None] * (len(chunk) - len(got))
            answers += [None] * (len(commands) - end)
            break
        return answers

    def show_proc(self) -> ProcInfo:
        return parse_show_proc(self.send("show proc"))

    def reload(self) -> None:
        """Ask the master to re-exec with the config on disk. HAProxy 2.6 answers nothing and may
        drop the connection while it re-executes; confirm with `wait_for_reload`."""
        try:
            self.send("reload")
        except HaproxyUnavailable as error:
            log.debug("haproxy: master CLI closed during reload: %s", error)

    def wait_for_reload(self, before: ProcInfo, timeout: float = 15.0) -> ProcInfo:
        """Poll `show proc` until the master counted one more reload; returns the new ProcInfo.
        Raises CommandFailed when the reload failed (the previous worker keeps serving)."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                info = self.show_proc()
            except (HaproxyUnavailable, CommandFailed) as error:  # the master is re-executing
                last_error = error
                time.sleep(0.05)
                continue
            if info.master_pid != before.master_pid:
                # HAProxy was restarted meanwhile: it read the config on disk at start.
                if info.worker is not None:
                    return info
            elif info.reloads > before.reloads:
                if info.failed_reloads > before.failed_reloads:
                    raise CommandFailed("HAProxy refused the new configuration at reload "
                                        "(see HAProxy's log); the previous workers keep serving")
                if info.worker is not None and info.worker not in before.workers:
                    return info
            time.sleep(0.05)
        raise HaproxyUnavailable(f"reload not confirmed within {timeout:.0f}s"
                                 + (f" (last error: {last_error})" if last_error else ""))

    def worker_command(self, pid: int, command: str) -> str:
        """Send a runtime API command to one worker; raises CommandFailed if it is gone."""
        answer = self.send(f"@!{int(pid)} {command}")
        if GONE_MARKER in answer:
            raise CommandFailed(f"worker {pid} is gone")
        return answer.strip()


@dataclass(frozen=True)
class Command:
    """One runtime API command for a worker, and how to tell its answer is not an error: an
    empty answer, or one containing one of `ok_markers`."""

    text: str
    ok_markers: tuple[str, ...] = ()

    def error(self, answer: str | None, pid: int) -> str | None:
        """None when `answer` means success, else what went wrong."""
        if answer is None:
            return f"`{self.text}`: not run (an earlier command of the batch ended it)"
        answer = answer.strip()
        if GONE_MARKER in answer:
            return f"worker {pid} is gone"
        if answer and not any(marker in answer for marker in self.ok_markers):
            return f"`{self.text}`: {answer.splitlines()[0]}"
        return None


def set_addr(backend: str, server: str, ip: str, port: int) -> Command:
    return Command(f"set server {backend}/{server} addr {ip} port {int(port)}",
                   ok_markers=("changed from", "no need to change"))


def set_weight(backend: str, server: str, weight: int) -> Command:
    return Command(f"set weight {backend}/{server} {int(weight)}")


def set_maxconn(backend: str, server: str, maxconn: int | None) -> Command:
    return Command(f"set maxconn server {backend}/{server} {int(maxconn or 0)}")


def set_state(backend: str, server: str, state: str) -> Command:
    if state not in ("ready", "maint", "drain"):
        raise ValueError(f"unknown server state {state!r}")
    return Command(f"set server {backend}/{server} state {state}")


class WorkerApi:
    """The runtime API of one HAProxy worker, through the master CLI."""

    def __init__(self, master: MasterCli, pid: int):
        self.master = master
        self.pid = pid

    def run(self, commands: list[Command], show_proc: bool = False) -> tuple[ProcInfo | None, list[str]]:
        """Send `commands` in order, batched (MasterCli.send_batch); returns `show proc` taken
        first on the same line when `show_proc` (None otherwise) and one message per failed
        command. With `show_proc`, a caller must check the worker is still the one it meant
        before trusting the answers."""
        lines = (["show proc"] if show_proc else []) + [f"@!{int(self.pid)} {c.text}" for c in commands]
        if not lines:
            return None, []
        answers = self.master.send_batch(lines)
        proc = None
        if show_proc:
            if answers[0] is None:
                raise CommandFailed("`show proc` got no answer")
            proc = parse_show_proc(answers[0])
            answers = answers[1:]
        errors = [e for c, a in zip(commands, answers) if (e := c.error(a, self.pid)) is not None]
        if log.isEnabledFor(logging.DEBUG):
            for command in commands:
                log.debug("haproxy: worker %s: %s", self.pid, command.text)
        return proc, errors

    def run_all(self, commands: list[Command]) -> None:
        """Send `commands`; raises CommandFailed naming the first that failed."""
        _, errors = self.run(commands)
        if errors:
            raise CommandFailed(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))

    def servers_state(self) -> dict[tuple[str, str], ServerState]:
        return parse_servers_state(self.master.worker_command(self.pid, "show servers state"))

    def servers_maxconn(self) -> dict[tuple[str, str], int]:
        return parse_server_maxconn(self.master.worker_command(self.pid, "show stat -1 4 -1"))

    def listener_ports(self) -> set[int]:
        """The service ports this worker listens on (a probe of them would fail: they are its own)."""
        return parse_listener_ports(self.master.worker_command(self.pid, "show stat -1 1 -1"))
