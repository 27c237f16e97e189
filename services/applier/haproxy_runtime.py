"""A thin client for HAProxy's master CLI (unix socket): process list, reload, and runtime API
commands routed to one worker (`@!<pid> <command>`).

Routing worker commands through the master rather than the worker's own stats socket means a
command always reaches the worker we believe is current: during a reload the stats socket path
may briefly still belong to the old worker, while `@!<pid>` fails loudly if that worker is gone.

HAProxy 2.6 syntax used here (checked against `help` on a running 2.6.12):
    show proc
    reload
    show servers state [<backend>]
    show stat -1 4 -1                        (servers only, CSV)
    set server <b>/<s> addr <ip> port <port>
    set server <b>/<s> state ready|maint
    set weight <b>/<s> <0..256>
    set maxconn server <b>/<s> <n>           (0: no limit)
"""
from __future__ import annotations

import csv
import io
import logging
import socket
import time
from dataclasses import dataclass

log = logging.getLogger("proxymatic.applier.haproxy")

# Admin-state flags of `show servers state` (HAProxy's SRV_ADMF_*): any maintenance origin.
ADMIN_MAINT_MASK = 0x01 | 0x02 | 0x20


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


class MasterCli:
    """One connection per command, as HAProxy's non-interactive CLI mode expects."""

    def __init__(self, path: str, timeout: float = 5.0):
        self.path = path
        self.timeout = timeout

    def send(self, command: str) -> str:
        if "\n" in command or "\r" in command or ";" in command:
            raise ValueError(f"refusing a multi-command CLI line: {command!r}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(self.timeout)
                conn.connect(self.path)
                conn.sendall(command.encode() + b"\n")
                conn.shutdown(socket.SHUT_WR)  # the master CLI answers once it sees the end
                chunks = []
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
        except OSError as error:
            raise HaproxyUnavailable(f"master CLI {self.path}: {error}") from error
        return b"".join(chunks).decode(errors="replace")

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
        if "Can't find the target PID" in answer:
            raise CommandFailed(f"worker {pid} is gone")
        return answer.strip()


class WorkerApi:
    """The runtime API of one HAProxy worker, through the master CLI."""

    def __init__(self, master: MasterCli, pid: int):
        self.master = master
        self.pid = pid

    def _set(self, command: str, ok_markers: tuple[str, ...] = ()) -> None:
        answer = self.master.worker_command(self.pid, command)
        if answer and not any(marker in answer for marker in ok_markers):
            raise CommandFailed(f"`{command}`: {answer.splitlines()[0]}")
        log.debug("haproxy: worker %s: %s", self.pid, command)

    def servers_state(self) -> dict[tuple[str, str], ServerState]:
        return parse_servers_state(self.master.worker_command(self.pid, "show servers state"))

    def servers_maxconn(self) -> dict[tuple[str, str], int]:
        return parse_server_maxconn(self.master.worker_command(self.pid, "show stat -1 4 -1"))

    def set_addr(self, backend: str, server: str, ip: str, port: int) -> None:
        self._set(f"set server {backend}/{server} addr {ip} port {int(port)}",
                  ok_markers=("changed from", "no need to change"))

    def set_weight(self, backend: str, server: str, weight: int) -> None:
        self._set(f"set weight {backend}/{server} {int(weight)}")

    def set_maxconn(self, backend: str, server: str, maxconn: int | None) -> None:
        self._set(f"set maxconn server {backend}/{server} {int(maxconn or 0)}")

    def set_state(self, backend: str, server: str, state: str) -> None:
        if state not in ("ready", "maint", "drain"):
            raise ValueError(f"unknown server state {state!r}")
        self._set(f"set server {backend}/{server} state {state}")
