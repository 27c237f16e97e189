"""The Pen driver: UDP services always, TCP services too when HAProxy is off (HAPROXY=false).

Pen 0.34 has one process per listening port. The driver owns the desired state:
  - which pens exist (`<run_dir>/pen/instances.json`, read by `proxymatic pen`, see pen_runner),
  - what every server slot of each pen points at (`<key>.cfg`, and live through `<key>.ctl`).
Membership changes go through Pen's control socket, so a pen keeps running (and keeps its
UDP flows to backends that stay) while backends come and go; only a change of the port set or
of the pen settings (PEN_SERVERS, PEN_CLIENTS, MAX_CONNECTIONS) starts or restarts a pen.

A server keeps its slot while it stays in the plan; new servers take the lowest free slots.
A service with more servers than PEN_SERVERS gets the first PEN_SERVERS of them in the plan's
order (ip, port) and a warning. Pen keeps a UDP flow on the backend it first chose, so the flows
of a slot whose backend changed are closed and the client's next datagram is balanced afresh;
TCP connections are left to finish.

A port Pen cannot bind (another program holds it) sets aside that service only: the port is
probed before its pen is requested, and a pen that does not come up is probed too. So is, on
every apply (the applier's resync included, even with an unchanged plan), a pen that should run
but does not (its pid file names no running pen: a cheap check, no socket): one that died and
whose port another program took meanwhile would otherwise crash-loop in the runner for good. A
set-aside service is left out of instances.json (the runner does not crash-loop on it) and
reported in `DriverResult.set_aside`; every other pen is applied. The applier re-applies the
plan every few seconds while anything is set aside: each retry probes only the ports of pens not
running, and one found free is started then, without touching the other pens. The warning is
logged when a reason appears or changes, not on every retry.
"""
from __future__ import annotations

import logging
import os
import time

from services.applier.bindable import bind_error, unbindable_reason
from services.applier.driver import DriverResult, ProxyDriver
from services.applier.pen_control import PenControl, PenControlError, Slot, parse_servers
from services.applier.pen_steps import (
    Table, assign_slots, choose_servers, desired, pen_services, render_table, slot_changes, step, table_matches,
)
from services.applier.pen_runner import (
    PenFiles, PenInstance, own_pen, read_instances, render_instances, runner_alive, signal_runner, write_cfg,
)
from services.common.files import write_atomic
from services.common.model import Plan, Service, content_hash

log = logging.getLogger("proxymatic.applier.pen")

# Pen listens on every address of the host.
LISTEN_HOST = "0.0.0.0"
# The pure parts live in pen_steps.py; these names stay importable from here (dry_run, tests).
__all__ = ["PenDriver", "assign_slots", "choose_servers", "pen_services", "render_table", "table_matches"]


class PenDriver(ProxyDriver):
    name = "pen"

    def __init__(self, settings, start_timeout: float = 5.0):
        self.files = PenFiles.of(settings)
        self.start_timeout = start_timeout
        self._applied = ""  # fingerprint of the last state converged to successfully
        self._set_aside: dict[str, str] = {}  # service key -> reason, as last reported
        os.makedirs(self.files.directory, exist_ok=True)

    def control(self, key: str) -> PenControl:
        return PenControl(self.files.control(key))

    def apply(self, plan: Plan) -> DriverResult:
        want = desired(plan)  # the decisions: pen_steps.py; what follows performs them
        if want.error:
            return DriverResult(self.name, False, "rejected", errors=(want.error,))
        by_key = want.services
        idle_taken = self._probe_idle(want.instances, by_key)  # before the shortcut: a resync checks too
        want = want.without(idle_taken)
        instances, chosen, warnings = dict(want.instances), dict(want.chosen), list(want.warnings)
        set_aside = {by_key[key].key: reason for key, reason in idle_taken.items()}  # service key -> reason
        fingerprint = _fingerprint(instances, chosen)
        details: dict = {"instances": sorted(instances), "warnings": warnings}
        if fingerprint == self._applied:
            return self._result(True, "none", (), details, set_aside)
        for warning in warnings:
            log.warning("pen: %s", warning)

        previous = self._read_written()
        _, pens = step(previous, instances)
        errors: list[str] = []
        runtime: list[str] = []
        restart: dict[str, int | None] = {}  # key -> pid of the pen being replaced (None: new)
        tables: dict[str, Table] = {}
        for key, instance in instances.items():
            live = None
            if key in pens.keep:
                try:
                    live = self.control(key).servers()
                except PenControlError:
                    live = None  # not running (yet): the runner starts it from the .cfg file
                if live is None:
                    live = self._cfg_table(key)
            else:
                restart[key] = self._pid(key) if key in pens.restart else None
            tables[key] = assign_slots(live or {}, chosen[key], instance.slots)
            # The .cfg goes first: a pen (re)started from here on comes up with this membership.
            write_cfg(self.files.file(key, "cfg"), render_table(tables[key]))

        instances_changed = self._write_instances(instances)
        for key in pens.stop:
            if key not in by_key:
                log.info("pen %s: service gone, the runner stops it", key)
            try:
                os.unlink(self.files.file(key, "cfg"))
            except FileNotFoundError:
                pass
        if instances_changed and not signal_runner(self.files):
            log.info("pen: runner not running; it picks up %s when it starts", self.files.instances)

        for key in sorted(instances):
            if key in restart:
                continue
            try:
                if self._converge(key, instances[key], tables[key]):
                    runtime.append(key)
            except PenControlError as error:
                if runner_alive(self.files):
                    restart[key] = None  # died under us: the runner restarts it from the .cfg
                else:
                    errors.append(f"pen {key}: {error}")
        if restart:
            late = self._await_started(restart, tables)
            # A pen that did not come up because its port is taken (grabbed between the probe and
            # the start, or while it was down): set it aside like one probed before.
            taken = self._taken([key for key in late if self._pid(key) is None], by_key)
            for key, reason in taken.items():
                set_aside[by_key[key].key] = reason
                del instances[key], chosen[key], late[key], restart[key]
            if taken and self._write_instances(instances):
                signal_runner(self.files)
            errors += [late[key] for key in sorted(late)]
            fingerprint = _fingerprint(instances, chosen)

        stopped = sorted(key for key in set(previous) - set(instances) if key not in by_key)
        details.update(instances=sorted(instances), started=sorted(restart), stopped=stopped,
                       changed=sorted(runtime))
        if errors:
            for error in errors:
                log.error("pen: %s", error)
            return self._result(False, "reload" if restart or stopped else "runtime", errors, details, set_aside)
        self._applied = fingerprint
        if restart or stopped:
            action = "reload"
        elif runtime:
            action = "runtime"
        else:
            action = "none"
        if action != "none":
            log.info("pen: %s (started %s, stopped %s, membership changed %s)", action,
                     sorted(restart) or "-", stopped or "-", runtime or "-")
        return self._result(True, action, (), details, set_aside)

    def _probe_idle(self, instances: dict[str, PenInstance], by_key: dict[str, Service]) -> dict[str, str]:
        """The wanted pens that do not run (not requested yet, or down: died, crash-looping)
        and whose port cannot be bound, with the set-aside reason. A running pen holds its own
        port: it is found by its pid file and /proc, with no socket and no probe."""
        return self._taken([key for key, instance in instances.items() if not self._running(key, instance)],
                           by_key)

    def _running(self, key: str, instance: PenInstance) -> bool:
        """Whether the pen of `key` runs: its pid file (written by Pen once it bound its port)
        names a live Pen process of this instance."""
        try:
            with open(self.files.file(key, "pid"), encoding="utf-8") as source:
                pid = int(source.read().strip())
        except (OSError, ValueError):
            return False
        return pid > 0 and own_pen(pid, instance, self.files, "pen")

    def _taken(self, keys, by_key: dict[str, Service]) -> dict[str, str]:
        """Those of the pens `keys` whose port cannot be bound now, with the set-aside reason. A
        pen that answers on its control socket holds the port itself (it came up meanwhile)."""
        taken = {}
        for key in sorted(keys):
            service = by_key[key]
            error = bind_error(LISTEN_HOST, service.port, service.protocol)
            if error and self._pid(key) is None:
                taken[key] = unbindable_reason(service, error)
        return taken

    def _read_written(self) -> dict[str, PenInstance]:
        try:
            return read_instances(self.files.instances)
        except ValueError as error:  # any malformed content: the file is rewritten by this apply
            log.warning("pen: %s; rewriting it", error)
            return {}

    def _write_instances(self, instances: dict[str, PenInstance]) -> bool:
        """Write instances.json; False when it already said so. Compared as bytes: the file
        being replaced may hold anything (write_atomic's check reads it as UTF-8)."""
        text = render_instances(list(instances.values()))
        try:
            with open(self.files.instances, "rb") as current:
                if current.read() == text.encode():
                    return False
        except FileNotFoundError:
            pass
        return write_atomic(self.files.instances, text, skip_if_same=False)

    def _result(self, ok: bool, action: str, errors, details: dict, set_aside: dict[str, str]) -> DriverResult:
        """The result, logging set-aside services when their reason appears or changes (the
        applier retries every few seconds while one is set aside: not a warning every time)."""
        for key, reason in sorted(set_aside.items()):
            if self._set_aside.get(key) != reason:
                log.warning("pen: set aside %s", reason)
        for key in sorted(set(self._set_aside) - set(set_aside)):
            log.info("pen: service %s no longer set aside", key)
        self._set_aside = dict(set_aside)
        return DriverResult(self.name, ok, action, errors=tuple(errors), details=details, set_aside=dict(set_aside))

    def _converge(self, key: str, instance: PenInstance, table: Table) -> bool:
        """Bring a running pen's slots to `table`; True when anything had to change."""
        control = self.control(key)
        live = control.servers()
        if table_matches(live, table):
            return False
        moved = []
        for change in slot_changes(live, table):
            if change.moved:
                moved.append(change.index)
            control.command(change.command)
            log.info("pen %s: slot %d: %s -> %s", key, change.index, _show(change.have), _show(change.want))
        if instance.protocol == "udp" and moved:
            # Pen pins a UDP flow to its first backend; drop the flows of slots that changed hands.
            for connection, slot in control.connections():
                if slot in moved:
                    control.close_connection(connection)
        live = control.servers()
        if not table_matches(live, table):
            raise PenControlError(f"pen did not take the new membership; it reports {live}")
        return True

    def _await_started(self, restart: dict[str, int | None], tables: dict[str, Table]) -> dict[str, str]:
        """Wait (bounded) until the runner has (re)started the pens and they serve `tables`; the
        pens that did not, with the error to report."""
        if not runner_alive(self.files):
            return {key: f"pen {key}: waiting for `proxymatic pen` to start it (runner not running)"
                    for key in restart}
        pending = dict(restart)
        deadline = time.monotonic() + self.start_timeout
        while pending and time.monotonic() < deadline:
            for key, old_pid in list(pending.items()):
                try:
                    control = self.control(key)
                    if control.pid() != old_pid and table_matches(control.servers(), tables[key]):
                        del pending[key]
                except (PenControlError, ValueError):
                    pass
            if pending:
                time.sleep(0.05)
        return {key: f"pen {key}: not running {self.start_timeout:.0f}s after it was requested" for key in pending}

    def _cfg_table(self, key: str) -> dict[int, Slot | None]:
        try:
            with open(self.files.file(key, "cfg"), encoding="utf-8") as source:
                text = source.read()
        except OSError:
            return {}
        # The .cfg holds `server N address A port P max M weight W`; reuse the `servers` parser.
        lines = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 10 and parts[0] == "server":
                lines.append(f"{parts[1]} addr {parts[3]} port {parts[5]} conn 0 max {parts[7]} hard 0 "
                             f"weight {parts[9]}")
        return parse_servers("\n".join(lines))

    def _pid(self, key: str) -> int | None:
        try:
            return self.control(key).pid()
        except (PenControlError, ValueError):
            return None


def _fingerprint(instances: dict[str, PenInstance], chosen: dict[str, list[Slot]]) -> str:
    return content_hash({"instances": render_instances(list(instances.values())),
                         "servers": {k: [repr(s) for s in v] for k, v in chosen.items()}})


def _show(slot: Slot | None) -> str:
    return f"{slot.ip}:{slot.port} weight {slot.weight} max {slot.maxconn}" if slot else "empty"
