"""HaproxyDriver: converges a running HAProxy (master-worker, see haproxy_launch.py) to a plan.

Membership changes (servers added, removed, re-weighted, new maxconn) go through the runtime API
on pre-allocated server slots: no reload, no dropped connection. A reload (master CLI `reload`,
listeners handed over to the new worker) happens only when the config *skeleton* changes:
services, listeners, modes, timeouts, health checks, settings, or a backend outgrowing its slots.

Invariants:
- One service HAProxy cannot take never keeps the others from being served: a listener that
  cannot be bound (probed before a reload, or named by a reload HAProxy refused) or a section
  `haproxy -c` rejects sets that service aside (`DriverResult.set_aside`, culprits found by
  haproxy_isolation.py) and the rest is applied. A set-aside port is probed again on every apply.
- Every config with a new skeleton is validated with `haproxy -c` before it replaces haproxy.cfg;
  a config that fails even without any service, or whose culprits a bounded search (culprits.py:
  40 runs, 10 s) does not find, is reported (`rejected`), the last good config keeps serving and
  the same rendering is not validated (nor logged) again. Changes of slot contents only are typed
  values in an accepted skeleton and skip it.
- haproxy.cfg always equals the state the runtime converged to, so HAProxy restarted from the
  file serves the same backends. It is rewritten (atomically) after runtime changes too: right
  after the commands, which go first, as one master CLI line with `show proc` in front.
- The rendering is incremental (haproxy_render.ConfigRenderer): a change to one service's servers
  re-renders that service only; the text is byte-identical to a from-scratch render.
- slots.json beside it records the slot layout of haproxy.cfg, so a restarted applier adopts a
  running HAProxy: it compares `show servers state` with the layout and fixes only differences.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from typing import Collection

from services.applier import culprits
from services.applier.bindable import bind_error, unbindable_reason
from services.applier.driver import DriverResult, ProxyDriver
from services.applier.haproxy_isolation import (
    ProgramLog, SetAside, bind_failures, blame_alerts, rejected_reason, section_lines,
)
from services.applier.haproxy_launch import check_config_alerts, fd_limit, run_as, summary
from services.applier.haproxy_render import (
    ConfigRenderer, HaproxyPaths, RenderError, Rendering, Slots, backend_id, haproxy_services,
    section_skeleton, slot_name, split_sections,
)
from services.applier import haproxy_steps as steps
from services.applier.haproxy_steps import SlotView, runtime_commands, same_ip, slot_commands
from services.applier.haproxy_runtime import (
    Command, CommandFailed, HaproxyUnavailable, MasterCli, ProcInfo, WorkerApi,
)
from services.common.config import Settings
from services.common.files import fsync_directory, read_text_or_none, write_atomic
from services.common.model import ModelError, Plan, Server, Service, content_hash

log = logging.getLogger("proxymatic.applier.haproxy")

STATE_VERSION = 1
LISTEN_HOST = "0.0.0.0"  # every service listener binds here (templates/haproxy.cfg.j2)
# How long a failed reload's messages may take to reach HAProxy's log (through supervisord).
RELOAD_LOG_WAIT = 2.0
# Bounds the search for the sections `haproxy -c` rejects: every `haproxy -c` of an apply after
# the first one that failed (subsets, then the configs without the culprits found) counts.
MAX_ISOLATION_CHECKS = culprits.MAX_RUNS
MAX_ISOLATION_SECONDS = culprits.MAX_SECONDS


class _PlanHash:
    """A plan's hash for log messages, computed only if the message is emitted."""

    __slots__ = ("plan",)

    def __init__(self, plan: Plan):
        self.plan = plan

    def __str__(self) -> str:
        return self.plan.hash


class _Services:
    """A plan's HAProxy services by key, computed only when needed (a runtime change never
    needs them)."""

    __slots__ = ("plan", "_by_key")

    def __init__(self, plan: Plan):
        self.plan = plan
        self._by_key: dict[str, Service] | None = None

    @property
    def by_key(self) -> dict[str, Service]:
        if self._by_key is None:
            self._by_key = {s.key: s for s in haproxy_services(self.plan)}
        return self._by_key


class _Search:
    """One apply's search for the sections `haproxy -c` rejects. It starts at the first config
    of the apply that fails (`digest`, HAProxy's `message` for it); each `haproxy -c` after that
    one spends from `budget`."""

    __slots__ = ("digest", "message", "budget", "cacheable")

    def __init__(self):
        self.digest: str | None = None
        self.message = ""
        self.budget: culprits.Budget | None = None
        self.cacheable = False  # the apply ended rejected by `haproxy -c` itself (see _apply)

    def start(self, digest: str, alerts: list[str]) -> None:
        self.digest, self.message = digest, summary(alerts)
        self.budget = culprits.Budget(MAX_ISOLATION_CHECKS, MAX_ISOLATION_SECONDS)


class HaproxyDriver(ProxyDriver):
    name = "haproxy"

    def __init__(self, settings: Settings, binary: str | None = None, reload_timeout: float = 15.0,
                 defer_writes: bool = False):
        self.paths = HaproxyPaths.for_run_dir(settings.run_dir)
        self.master = MasterCli(self.paths.master_socket)
        self.binary = binary
        self.reload_timeout = reload_timeout
        self.fd_limit = fd_limit()
        # What the running HAProxy serves, as far as this driver knows. `_trusted` is true when
        # the runtime of worker `_worker` equals `_slots` and the config on disk `_config_text`.
        self._worker: int | None = None
        self._trusted = False
        self._slots: dict[str, tuple[Server | None, ...]] = {}
        # haproxy.cfg as last converged to: the Rendering it came from (assembled on demand, see
        # Rendering.text) or the text read back from the file.
        self._config_text: Rendering | str | None = None
        self._skeleton_hash: str | None = None
        self._renderer = ConfigRenderer(self.paths, self.fd_limit, run_as())
        # Services left out of the config (listener cannot be bound, section rejected), by key;
        # see _apply. Kept to log changes once and to re-probe only those on a retry.
        self._set_aside: dict[str, SetAside] = {}
        # The last config rejected as a whole by `haproxy -c` (no service to blame, or the search
        # over its bound): (hash of the apply's first failing config, the result). The same
        # rendering again (the stage's resync every 15 s) gets that result with no `haproxy -c`
        # and no log line; a different one is validated.
        self._rejected: tuple[str, DriverResult] | None = None
        self._program_log = ProgramLog(os.path.join(settings.run_dir, "logs", "haproxy.log"))
        self._state_lines: dict[str, tuple[tuple, str]] = {}  # see _write_state
        self._active: dict[str, tuple[tuple, int]] = {}  # servers per backend, see _details
        self._unwritten: tuple[str, Slots, str] | None = None  # see _commit_runtime
        # The applier stage calls `flush` right after publishing a result; direct callers
        # (tests, tools) get the files written before `apply` returns.
        self._defer_writes = defer_writes
        # Reloads this driver asked HAProxy for (failed ones included): the applier's heartbeat
        # carries it as `haproxy_reloads`.
        self.reloads = 0

    # -- public -------------------------------------------------------------------------------

    def apply(self, plan: Plan) -> DriverResult:
        try:
            return self._apply(plan)
        except HaproxyUnavailable as error:
            self._worker = None
            log.warning("haproxy: not reachable, plan %s not applied yet: %s", _PlanHash(plan), error)
            return DriverResult(self.name, False, "none", errors=(f"HAProxy is not reachable: {error}",))
        except CommandFailed as error:
            self._worker = None
            log.warning("haproxy: runtime API error, will resync: %s", error)
            return DriverResult(self.name, False, "none", errors=(f"HAProxy runtime API: {error}",))

    # -- the algorithm ------------------------------------------------------------------------

    def _apply(self, plan: Plan) -> DriverResult:
        """Converge with every service HAProxy can take. A round that finds services it cannot
        (a listener that cannot be bound, a section `haproxy -c` rejects, a reload that fails on
        a listener) sets them aside and the next round applies the rest; each round sets aside
        at least one more service, so there are at most as many rounds as services."""
        services = _Services(plan)
        aside = self._still_set_aside(services.by_key) if self._set_aside else {}
        search = _Search()
        for _ in range(len(plan.services) + 1):
            outcome = self._converge(plan, services, aside, search)
            if isinstance(outcome, DriverResult):
                break
            if not outcome.keys() - aside.keys():  # no progress: never expected, never looped on
                outcome = DriverResult(self.name, False, "rejected", details=self._details(0), errors=(
                    "HAProxy keeps refusing the config: " + "; ".join(e.reason for e in outcome.values()),))
                break
            aside.update(outcome)
        else:
            outcome = DriverResult(self.name, False, "rejected", errors=("HAProxy refused every service",),
                                   details=self._details(0))
        if outcome.action == "rejected":
            if search.cacheable and search.digest is not None:
                self._rejected = (search.digest, outcome)
            return outcome  # nothing changed; the next plan (not a retry) tries again
        self._note_set_aside(aside)
        return replace(outcome, set_aside={key: entry.reason for key, entry in sorted(aside.items())})

    def _converge(self, plan: Plan, services: _Services, aside: dict[str, SetAside],
                  search: _Search) -> DriverResult | dict[str, SetAside]:
        """One round of _apply: the result, or the services newly found to be set aside."""
        proc: ProcInfo | None = None  # `show proc` as seen during this apply
        fixes = 0
        if not self._trusted or self._worker is None:
            proc = self.master.show_proc()
            fixes += self._sync_worker(proc)
        reload_reason = ""
        for _ in range(3):
            try:
                rendering = self._renderer.update(plan, self._slots, aside.keys())
            except RenderError as error:
                log.error("haproxy: plan %s rejected: %s", _PlanHash(plan), error)
                return DriverResult(self.name, False, "rejected", errors=(f"cannot render HAProxy config: {error}",),
                                    details=self._details(fixes))
            _, (action,) = steps.step(self._state(), rendering, proc is not None)
            if isinstance(action, steps.CheckWorker):
                proc = self.master.show_proc()
                fixes += self._sync_worker(proc)
                continue
            if isinstance(action, steps.Unchanged):
                return DriverResult(self.name, True, "runtime" if fixes else "none", details=self._details(fixes))
            if not isinstance(action, steps.RuntimeChange):
                break
            # Only slot contents differ from a config HAProxy already accepted, and those are typed
            # values (re-parsed addresses, checked integers): no `haproxy -c`. The commands go out
            # first (with `show proc` on the same line when not seen yet), the files follow.
            seen, errors = WorkerApi(self.master, self._worker).run(list(action.commands), show_proc=action.show_proc)
            if seen is not None:
                proc = seen
                if seen.worker != self._worker:
                    # HAProxy restarted or reloaded meanwhile: adopt its worker and start over.
                    fixes += self._sync_worker(seen)
                    continue
            if not errors:
                for message in action.messages:
                    log.info("haproxy: %s", message)
                self._commit_runtime(rendering, rendering.slots, rendering.skeleton_hash)
                log.info("haproxy: plan %s applied at runtime (%d changes, no reload)", _PlanHash(plan), action.changes)
                return DriverResult(self.name, True, "runtime", details=self._details(fixes + action.changes, rendering))
            reload_reason = "; ".join(errors[:3])
            log.warning("haproxy: runtime update failed (%s); reloading instead", reload_reason)
            self._trusted = False
            _, (action,) = steps.step(self._state(), rendering, True)
            break
        else:
            raise HaproxyUnavailable("HAProxy changed workers during every attempt to apply the plan")

        # A reload ahead. Listeners HAProxy does not hold yet must be bindable, or their services
        # are set aside: one port taken by another program must not fail the whole reload.
        new_listeners = self._new_listeners(rendering, services.by_key, proc)
        unbindable = self._unbindable(new_listeners)
        if unbindable:
            return unbindable
        text, digest, slots = rendering.text, action.digest, rendering.slots
        if isinstance(action, steps.RejectedBefore) and self._rejected is not None:
            # Rejected as a whole before (a resync of the same plan): not validated nor logged again.
            return replace(self._rejected[1], details=self._details(fixes))
        try:
            if search.budget is not None:
                search.budget.spend()
            valid, alerts = self._validate(text)
            if not valid:
                if search.budget is None:
                    search.start(digest, alerts)
                rejected = self._rejected_services(rendering, services.by_key, alerts, search.budget)
                if rejected:
                    return rejected
        except culprits.OverBudget:
            message = (f"{search.message} (the services to blame were not found within "
                       f"{MAX_ISOLATION_CHECKS} runs of haproxy -c or {MAX_ISOLATION_SECONDS:g}s)")
        else:
            message = summary(alerts) if not valid else ""
        if message:
            # `haproxy -c` that could not run is no verdict on the config: tried again on a resync.
            search.cacheable = not message.startswith("could not run haproxy -c")
            log.error("haproxy: plan %s rejected, haproxy -c: %s", _PlanHash(plan), message)
            error = f"HAProxy rejected the new config: {message}" if reload_reason else \
                f"HAProxy rejected the new config, the previous one keeps serving: {message}"
            return DriverResult(self.name, False, "rejected", errors=(error,), details=self._details(fixes))
        self._membership_first(rendering, services.by_key)
        return self._reload(plan, text, slots, rendering.skeleton_hash, proc, new_listeners)

    def _membership_first(self, rendering: Rendering, services: dict[str, Service]) -> None:
        """Before a reload: the servers of services whose sections keep their skeleton change
        through the runtime API now, and the config on disk says so. Traffic follows them without
        waiting for the reload, and a reload HAProxy refuses leaves them applied."""
        if not self._trusted or self._config_text is None or self._worker is None:
            return
        header, running = split_sections(self._config_str())
        new = {backend_id(services[key]): text for key, text in rendering.sections if key in services}
        moved = {bid: rendering.slots[bid] for bid, text in new.items()
                 if bid in running and text != running[bid]
                 and len(rendering.slots[bid]) == len(self._slots.get(bid, ()))
                 and section_skeleton(text) == section_skeleton(running[bid])}
        if not moved:
            return
        _, changes, errors = self._runtime_update(moved, show_proc=False)
        if errors:  # the reload applies them; a failed one is followed by a re-adoption
            log.info("haproxy: runtime changes before the reload failed (%s)", "; ".join(errors[:3]))
            return
        text = header + "".join([new[bid] if bid in moved else section for bid, section in running.items()]) + "\n"
        self._commit_runtime(text, {**self._slots, **moved}, self._skeleton_hash)
        log.info("haproxy: %d servers changed at runtime ahead of the reload", changes)

    def _sync_worker(self, proc: ProcInfo) -> int:
        """After `show proc`: adopt its worker when it is not the one we synced with. Returns
        the number of slots fixed."""
        if proc.worker is None:
            raise HaproxyUnavailable("HAProxy has no worker process")
        if proc.worker == self._worker:
            return 0
        return self._adopt(proc.worker)

    def _validate(self, text: str) -> tuple[bool, list[str]]:
        write_atomic(self.paths.candidate, text)
        valid, alerts = check_config_alerts(self.paths.candidate, self.binary)
        if not valid:
            # Kept for operators; never read back.
            os.replace(self.paths.candidate, self.paths.config + ".rejected")
        return valid, alerts

    # -- services set aside (see haproxy_isolation.py) ----------------------------------------

    def _still_set_aside(self, services: dict[str, Service]) -> dict[str, SetAside]:
        """The services set aside before that still cannot be served: a listener still not
        bindable (probed again: a freed port is served now), a rejected section unchanged."""
        out, probe = steps.carry_set_aside(self._set_aside, services, self._slots)
        for key, service in probe.items():
            error = bind_error(LISTEN_HOST, service.port, service.protocol)
            if error is not None:
                out[key] = SetAside(service, unbindable_reason(service, error), "bind")
        return out

    def _new_listeners(self, rendering: Rendering, services: dict[str, Service],
                       proc: ProcInfo | None) -> dict[str, Service]:
        """The services of `rendering` whose listener the running HAProxy does not hold (its own
        listeners cannot be probed: they are bound)."""
        if self._trusted:
            held = {int(bid.split("_")[1]) for bid in self._slots}
        elif proc is not None and proc.worker is not None:
            held = WorkerApi(self.master, proc.worker).listener_ports()
        else:
            held = set()
        return {key: services[key] for key, _ in rendering.sections
                if key in services and services[key].port not in held}

    @staticmethod
    def _unbindable(listeners: dict[str, Service]) -> dict[str, SetAside]:
        out = {}
        for key, service in listeners.items():
            error = bind_error(LISTEN_HOST, service.port, service.protocol)
            if error is not None:
                out[key] = SetAside(service, unbindable_reason(service, error), "bind")
        return out

    def _rejected_services(self, rendering: Rendering, services: dict[str, Service], alerts: list[str],
                           budget: culprits.Budget) -> dict[str, SetAside]:
        """The services whose sections made `haproxy -c` fail: those its alerts point at, else
        found by validating subsets (culprits.find, spending from `budget`: OverBudget beyond
        it). Empty when the config fails without any service too."""
        keys = [key for key, _ in rendering.sections if key in services]
        if not keys:
            return {}
        blamed = blame_alerts(alerts, section_lines(rendering.header, rendering.sections), self.paths.candidate)
        if not blamed:
            def check(subset: list[str]) -> str:
                write_atomic(self.paths.subset_candidate, rendering.subset_text(set(subset)))
                valid, found = check_config_alerts(self.paths.subset_candidate, self.binary)
                return "" if valid else summary(found) or "haproxy -c failed"
            try:
                blamed = culprits.find(keys, budget.bound(check), failure=summary(alerts) or "haproxy -c failed") or {}
            finally:
                self._remove(self.paths.subset_candidate)
        return {key: SetAside(services[key], rejected_reason(services[key], message), "config")
                for key, message in blamed.items() if key in services}

    def _reload_culprits(self, listeners: dict[str, Service], log_offset: int) -> dict[str, SetAside]:
        """After a failed reload: the new listeners HAProxy could not bind, as its startup
        messages name them, or as a probe finds them now (taken since the first probe)."""
        if not listeners:
            return {}
        found: dict[str, str] = {}
        deadline = time.monotonic() + RELOAD_LOG_WAIT
        while os.path.exists(self._program_log.path):
            text = self._program_log.since(log_offset)
            found = bind_failures(text)
            if found or "Loading failure" in text or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        out = {key: SetAside(listeners[key], unbindable_reason(listeners[key], error), "bind")
               for key, error in found.items() if key in listeners}
        for key, entry in self._unbindable(listeners).items():
            out.setdefault(key, entry)
        return out

    def _note_set_aside(self, aside: dict[str, SetAside]) -> None:
        """Log what changed since the last apply, once: a retry that finds the same ports taken
        logs nothing."""
        for key, entry in sorted(aside.items()):
            previous = self._set_aside.get(key)
            if previous is None or previous.reason != entry.reason:
                log.warning("haproxy: set aside %s; every other service is served", entry.reason)
        for key in sorted(self._set_aside.keys() - aside.keys()):
            log.info("haproxy: service %s (%s) is no longer set aside", self._set_aside[key].service.name, key)
        self._set_aside = aside

    def _state(self) -> steps.HaproxyState:
        return steps.HaproxyState(self._worker, self._trusted, self._slots, self._config_text, self._skeleton_hash,
                                  self._rejected[0] if self._rejected is not None else None)

    def _config_str(self) -> str | None:
        config = self._config_text
        return config.text if isinstance(config, Rendering) else config

    def _commit_runtime(self, text: Rendering | str, slots: Slots, skeleton_hash: str) -> None:
        """After runtime changes: haproxy.cfg (no validation needed, see _apply) and slots.json
        are written by `flush`, once the result is out (the writes and their fsyncs are the
        slowest part of a membership change). A restarted applier re-adopts from the files."""
        self._unwritten = (text, slots, skeleton_hash)
        self._slots = slots  # layouts are never changed in place
        if not self._defer_writes:
            self.flush()
        self._config_text = text
        self._skeleton_hash = skeleton_hash

    def flush(self) -> None:
        """Write the config and slot layout of the last runtime change, if not written yet."""
        if self._unwritten is not None:
            config, slots, skeleton_hash = self._unwritten
            self._unwritten = None
            text = config.text if isinstance(config, Rendering) else config
            write_atomic(self.paths.config, text, skip_if_same=False)
            self._write_state(text, slots, skeleton_hash, True)

    def _commit(self, text: str, slots: Slots, skeleton_hash: str, confirmed: bool = True) -> None:
        """The validated candidate becomes haproxy.cfg; slots.json describes it."""
        os.replace(self.paths.candidate, self.paths.config)
        fsync_directory(self.paths.dir)
        self._write_state(text, slots, skeleton_hash, confirmed)
        self._slots = slots
        self._config_text = text
        self._skeleton_hash = skeleton_hash

    def _reload(self, plan: Plan, text: str, slots: Slots, skeleton_hash: str, before: ProcInfo,
                listeners: dict[str, Service]) -> DriverResult | dict[str, SetAside]:
        """Reload with the committed config; when HAProxy refuses it, the previous config goes back
        on disk and the new `listeners` it could not bind are returned, to be set aside."""
        self.flush()  # the files must describe what runs before they are replaced or restored
        previous = (read_text_or_none(self.paths.config), dict(self._slots), self._skeleton_hash, self._trusted)
        # Not confirmed until the new worker runs: an applier restarted in between reloads again.
        self._commit(text, slots, skeleton_hash, confirmed=False)
        self._trusted = False
        self._worker = None
        log.info("haproxy: reloading for plan %s (worker %s)", _PlanHash(plan), before.worker)
        log_offset = self._program_log.offset()
        self.reloads += 1
        self.master.reload()
        try:
            after = self.master.wait_for_reload(before, self.reload_timeout)
        except CommandFailed as error:
            # HAProxy could not load it (a port already in use...): the old worker still serves
            # the previous config; put that config (and its layout) back on disk.
            log.error("haproxy: reload for plan %s failed: %s; restoring the previous config", _PlanHash(plan), error)
            self._restore(previous)
            culprits = self._reload_culprits(listeners, log_offset)
            if culprits:
                return culprits
            return DriverResult(self.name, False, "rejected", errors=(f"reload failed: {error}",),
                                details=self._details(0))
        self._write_state(text, slots, skeleton_hash, confirmed=True)
        self._worker = after.worker
        self._trusted = True
        log.info("haproxy: reloaded for plan %s, new worker %s", _PlanHash(plan), after.worker)
        return DriverResult(self.name, True, "reload", details=self._details(0))

    def _restore(self, previous: tuple) -> None:
        """Put the config (and layout) from before a failed reload back on disk. The next apply
        re-adopts the running worker against it (or reloads, when it was not known to match)."""
        text, slots, skeleton_hash, trusted = previous
        if text is None:
            return
        write_atomic(self.paths.config, text)
        if skeleton_hash is None:
            self._remove(self.paths.state)
        else:
            self._write_state(text, slots, skeleton_hash, confirmed=trusted)
        self._slots = slots
        self._config_text = text
        self._skeleton_hash = skeleton_hash

    # -- runtime changes ----------------------------------------------------------------------

    def _runtime_update(self, slots: Slots, show_proc: bool,
                        only: Collection[str] | None = None) -> tuple[ProcInfo | None, int, list[str]]:
        """Move every slot from its known state to `slots`, in one batch of runtime API commands
        to the current worker. Returns `show proc` (taken first on the same line when asked), the
        number of slots changed and the failed commands. Additions first, removals last, so a
        service never has fewer ready servers than before or after the change."""
        commands, messages, changes = runtime_commands(self._slots, slots, only)
        proc, errors = WorkerApi(self.master, self._worker).run(commands, show_proc=show_proc)
        if not errors and (proc is None or proc.worker == self._worker):
            for message in messages:
                log.info("haproxy: %s", message)
        return proc, changes, errors

    # -- adopting a running HAProxy -----------------------------------------------------------

    def _adopt(self, worker: int) -> int:
        """Sync with a worker we have not seen (first apply, HAProxy restarted or reloaded by
        someone else). Returns the number of slots fixed; leaves `_trusted` false when only a
        reload can make the running HAProxy match the config on disk."""
        self.flush()  # adoption compares the running worker with the files
        self._worker = worker
        self._trusted = False
        state = self._read_state()
        if state is None:
            log.info("haproxy: no usable %s; the next plan reloads HAProxy", self.paths.state)
            self._config_text = None
            return 0
        slots, skeleton_hash, confirmed = state
        self._slots, self._skeleton_hash = slots, skeleton_hash
        self._config_text = read_text_or_none(self.paths.config)
        if not confirmed:
            log.info("haproxy: the last reload was not confirmed; the next plan reloads HAProxy")
            self._config_text = None
            return 0
        api = WorkerApi(self.master, worker)
        running = api.servers_state()
        expected = {(bid, slot_name(i)) for bid, entries in slots.items() for i in range(len(entries))}
        actual = {key for key in running if key[0].startswith("svc_")}
        if expected != actual:
            log.info("haproxy: worker %s runs other backends than %s; the next plan reloads HAProxy",
                     worker, self.paths.config)
            self._config_text = None
            return 0
        maxconn = api.servers_maxconn()
        fixes = 0
        commands: list[Command] = []
        messages = []
        for bid, entries in slots.items():
            for index, server in enumerate(entries):
                name = slot_name(index)
                st = running[(bid, name)]
                view = SlotView(st.ip, st.port, st.weight, maxconn.get((bid, name), 0), st.in_maintenance)
                if server is None and view.maint:
                    continue
                if server is not None and not view.maint and same_ip(view.ip, server.ip) and \
                        (view.port, view.weight, view.maxconn) == (server.port, server.proxy_weight, server.maxconn or 0):
                    continue
                fixes += 1
                messages.append(slot_commands(commands, bid, index, view, server))
        api.run_all(commands)
        for message in messages:
            if message:
                log.info("haproxy: %s", message)
        self._trusted = True
        log.info("haproxy: adopted running worker %s (%d slots fixed)", worker, fixes)
        return fixes

    # -- files --------------------------------------------------------------------------------

    def _write_state(self, text: str, slots: Slots, skeleton_hash: str, confirmed: bool) -> None:
        """slots.json (what _read_state reads back): one line per backend, each line kept while
        the backend's layout object stays the same, so a membership change re-encodes only the
        backends it touched."""
        fragments = {}
        lines = []
        for bid in sorted(slots):
            entries = slots[bid]
            cached = self._state_lines.get(bid)
            if cached is None or cached[0] is not entries:
                cached = (entries, f"  {json.dumps(bid)}: "
                          + json.dumps([s.to_dict() if s else None for s in entries], sort_keys=True))
            fragments[bid] = cached
            lines.append(cached[1])
        self._state_lines = fragments
        head = json.dumps({"confirmed": confirmed, "config_hash": content_hash(text),
                           "skeleton_hash": skeleton_hash}, sort_keys=True)[:-1]
        body = ",\n".join(lines)
        write_atomic(self.paths.state, f'{head}, "slots": {{\n{body}\n}}, "version": {STATE_VERSION}}}\n')

    def _read_state(self) -> tuple[dict[str, tuple[Server | None, ...]], str, bool] | None:
        raw = read_text_or_none(self.paths.state)
        text = read_text_or_none(self.paths.config)
        if raw is None or text is None:
            return None
        try:
            data = json.loads(raw)
            if data.get("version") != STATE_VERSION or data.get("config_hash") != content_hash(text):
                log.info("haproxy: %s does not describe %s", self.paths.state, self.paths.config)
                return None
            slots = {
                str(bid): tuple(None if s is None else Server.from_dict(s) for s in entries)
                for bid, entries in dict(data["slots"]).items()
            }
            result = (slots, str(data["skeleton_hash"]), bool(data.get("confirmed")))
        except (ValueError, KeyError, TypeError, ModelError) as error:
            log.warning("haproxy: ignoring unreadable %s: %s", self.paths.state, error)
            return None
        return result

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _details(self, changes: int, rendering: Rendering | None = None) -> dict:
        if rendering is not None and rendering.slots is self._slots:
            return {"worker_pid": self._worker, "services": len(self._slots), "servers": rendering.servers,
                    "changes": changes, "config": self.paths.config}
        counts, active = {}, 0
        for bid, entries in self._slots.items():
            cached = self._active.get(bid)
            if cached is None or cached[0] is not entries:
                cached = (entries, sum(1 for s in entries if s is not None))
            counts[bid] = cached
            active += cached[1]
        self._active = counts
        return {"worker_pid": self._worker, "services": len(self._slots), "servers": active,
                "changes": changes, "config": self.paths.config}
