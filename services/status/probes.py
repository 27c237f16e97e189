"""Is each proxy of this node answering? One bounded check per proxy, and which proxies to check.

A probe is a callable that returns when its proxy answered and raises (any exception, its text
is the reason) when it did not. Every probe has its own socket timeout, so none can hang.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Callable

from services.applier.haproxy_render import HaproxyPaths
from services.applier.haproxy_runtime import MasterCli
from services.applier.pen_control import PenControl
from services.applier.pen_runner import PenFiles
from services.common.config import Settings
from services.common.model import ApplyResult
from services.common.unix_socket import exchange

Probe = Callable[[], None]


class NotAnswering(RuntimeError):
    """The proxy answered, but not what a healthy one says."""


def haproxy_probe(paths: HaproxyPaths, timeout: float) -> Probe:
    """HAProxy's master CLI answers `show proc` and lists a current worker (the one serving), or
    else the worker itself answers `show info` on the admin socket: while the master re-executes
    for a reload its CLI refuses connections, yet the workers keep serving."""
    def probe() -> None:
        try:
            info = MasterCli(paths.master_socket, timeout=timeout).show_proc()
            if info.worker is None:
                raise NotAnswering(f"master {info.master_pid} has no worker")
        except Exception as master_error:
            try:
                answer = exchange(paths.admin_socket, b"show info\n", timeout).decode(errors="replace")
            except OSError as worker_error:
                raise NotAnswering(f"{master_error}; admin socket: {worker_error}") from None
            if "Pid:" not in answer:
                raise NotAnswering(f"{master_error}; admin socket answered {answer[:80]!r}") from None
    return probe


def pen_probe(files: PenFiles, key: str, timeout: float) -> Probe:
    """A Pen answers `pid` on its control socket."""
    def probe() -> None:
        answer = PenControl(files.control(key), timeout=timeout).command("pid").strip()
        if not answer.isdigit():
            raise NotAnswering(f"unexpected answer to `pid`: {answer[:80]!r}")
    return probe


def tcp_probe(port: int, timeout: float) -> Probe:
    """Something accepts connections on 127.0.0.1:`port` (nginx's virtual-host listener)."""
    def probe() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            pass
    return probe


def pen_keys(applied: ApplyResult | None) -> list[str]:
    """The Pen instances (`<port>-<protocol>`) the applied plan serves with Pen, minus services the
    applier set aside (they are reported, never probed: one bad port must not fail the node)."""
    if applied is None:
        return []
    pen = applied.details.get("pen") or {}
    set_aside = {key.replace("/", "-") for key in (pen.get("set_aside") or {})}
    return [key for key in pen.get("instances") or [] if key not in set_aside]


def running_drivers(applied: ApplyResult | None, settings: Settings) -> set[str]:
    """The drivers the applier runs, as its last result says (the plan's settings decide them:
    services/applier/drivers.py); the node's own options until it said."""
    running = ((applied.details.get("drivers") or {}).get("running") if applied is not None else None)
    if isinstance(running, list):
        return {str(name) for name in running}
    return {name for name, wanted in (("haproxy", settings.haproxy), ("nginx", bool(settings.vhost_domain))) if wanted}


@dataclass(frozen=True)
class ProbeTargets:
    """Builds the probes for this node: HAProxy and nginx when the applier runs their drivers,
    one per Pen instance of the applied plan."""

    settings: Settings
    timeout: float = 1.0

    def probes(self, applied: ApplyResult | None) -> dict[str, Probe]:
        probes: dict[str, Probe] = {}
        running = running_drivers(applied, self.settings)
        if "haproxy" in running:
            probes["haproxy"] = haproxy_probe(HaproxyPaths.for_run_dir(self.settings.run_dir), self.timeout)
        files = PenFiles.of(self.settings)
        for key in pen_keys(applied):
            probes[f"pen {key}"] = pen_probe(files, key, self.timeout)
        if "nginx" in running:
            probes["nginx"] = tcp_probe(self.settings.vhost_port, self.timeout)
        return probes
