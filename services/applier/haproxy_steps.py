"""The HAProxy driver's decisions as pure steps: no sockets, no files, no processes, no clock.

`step(state, rendering, proc_seen) -> (state, actions)` decides what converging to a rendered plan takes, from
what the driver knows of the running HAProxy (`HaproxyState`): nothing, a look at the master
first (`show proc`: the worker may have changed behind the driver's back), runtime API commands
only (the skeleton is unchanged: slot contents differ), or a reload (the skeleton changed), unless
that very config was rejected as a whole before (reported again, not validated again).
`carry_set_aside` decides which services set aside before stay aside and which must be probed
again. haproxy_driver.HaproxyDriver performs what they return.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Collection, Mapping

from services.applier import haproxy_runtime as runtime
from services.applier.haproxy_isolation import SetAside
from services.applier.haproxy_render import Rendering, Slots, backend_id, key_of_backend, slot_name
from services.applier.haproxy_runtime import Command
from services.common.model import Server, Service, content_hash


@dataclass(frozen=True)
class SlotView:
    """What one slot currently serves, as far as the runtime is concerned."""

    ip: str | None
    port: int | None
    weight: int | None
    maxconn: int | None  # 0: no limit
    maint: bool

    @classmethod
    def of(cls, server: Server | None) -> "SlotView":
        if server is None:
            return cls(None, None, None, None, True)
        return cls(server.ip, server.port, server.proxy_weight, server.maxconn or 0, False)


def same_ip(a: str | None, b: str | None) -> bool:
    try:
        return a is not None and b is not None and ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def _key(backend: str) -> str:
    """svc_1234_tcp_web -> 1234/tcp, for log messages."""
    return key_of_backend(backend) or backend


def slot_commands(out: list[Command], bid: str, index: int, view: SlotView, server: Server | None) -> str:
    """Append the commands that move one slot from `view` to `server`; returns what they do,
    for the log."""
    slot = slot_name(index)
    if server is None:
        if view.maint:
            return ""
        out.append(runtime.set_state(bid, slot, "maint"))
        return f"{_key(bid)}: server {view.ip}:{view.port} removed (slot {slot} drained in maintenance)"
    maint = view.maint
    moved = not (same_ip(view.ip, server.ip) and view.port == server.port)
    if moved and not maint:
        out.append(runtime.set_state(bid, slot, "maint"))
        maint = True
    if moved:
        out.append(runtime.set_addr(bid, slot, server.ip, server.port))
    if view.weight != server.proxy_weight or moved:
        out.append(runtime.set_weight(bid, slot, server.proxy_weight))
    if view.maxconn != (server.maxconn or 0) or moved:
        out.append(runtime.set_maxconn(bid, slot, server.maxconn))
    if maint:
        out.append(runtime.set_state(bid, slot, "ready"))
    return (f"{_key(bid)}: server {server.address} in slot {slot}: weight {server.proxy_weight}, "
            f"maxconn {server.maxconn or 'unlimited'}{' (added)' if moved else ''}")


def runtime_commands(known: Slots, wanted: Slots, only: Collection[str] | None = None
                     ) -> tuple[list[Command], list[str], int]:
    """The runtime API commands that move every slot from `known` to `wanted` (only the
    backends `only` when given: the others are known unchanged), what they do (for the log),
    and the number of slots changed. Additions first, removals last, so a service never has
    fewer ready servers than before or after the change."""
    work = []
    for bid in (wanted if only is None else [b for b in only if b in wanted]):
        entries = wanted[bid]
        current = known.get(bid, ())
        if current is entries:  # unchanged services keep their layout objects
            continue
        for index, server in enumerate(entries):
            old = current[index] if index < len(current) else None
            if old != server:
                work.append((bid, index, SlotView.of(old), server))
    work.sort(key=lambda item: (item[3] is None, not item[2].maint))
    commands: list[Command] = []
    messages = []
    for bid, index, view, server in work:
        message = slot_commands(commands, bid, index, view, server)
        if message:
            messages.append(message)
    return commands, messages, len(work)


@dataclass(frozen=True)
class HaproxyState:
    """What the driver knows of the running HAProxy. `trusted`: worker `worker` runs exactly
    `slots` under the config `config` (a Rendering, or the text read back from the file)."""

    worker: int | None = None
    trusted: bool = False
    slots: Slots = None  # type: ignore[assignment]
    config: Rendering | str | None = None
    skeleton_hash: str | None = None
    # The hash of the last config rejected as a whole by `haproxy -c` (see the driver's _rejected).
    rejected_digest: str | None = None


# The actions a step asks for.
@dataclass(frozen=True)
class CheckWorker:
    """`show proc` first: HAProxy may have been restarted or reloaded behind the driver's back;
    then decide again."""


@dataclass(frozen=True)
class Unchanged:
    """The running config is the plan's: nothing to send or write."""


@dataclass(frozen=True)
class RuntimeChange:
    """Slot contents only: send `commands` (with `show proc` on the same line when
    `show_proc`), then record `state` (the new layout and config) and write the files."""

    commands: tuple[Command, ...]
    messages: tuple[str, ...]
    changes: int
    show_proc: bool
    state: HaproxyState


@dataclass(frozen=True)
class Reload:
    """The skeleton changed: probe new listeners, validate with `haproxy -c`, reload."""

    digest: str


@dataclass(frozen=True)
class RejectedBefore:
    """The same config was rejected as a whole before: report that again, validate nothing."""

    digest: str


def same_config(config: Rendering | str | None, rendering: Rendering) -> bool:
    if config is None:
        return False
    if isinstance(config, Rendering):
        return rendering.same_text(config)
    return rendering.text == config


def step(state: HaproxyState, rendering: Rendering, proc_seen: bool) -> tuple[HaproxyState, tuple]:
    """What converging to `rendering` takes: (the state once the actions went through, the
    actions: one of CheckWorker, Unchanged, RuntimeChange, Reload, RejectedBefore).
    `proc_seen`: `show proc` was read during this apply (the worker is the one in `state`)."""
    unchanged = state.trusted and same_config(state.config, rendering)
    runtime_only = state.trusted and rendering.skeleton_hash == state.skeleton_hash
    if not proc_seen and (unchanged or not runtime_only):
        # Nothing to send (a resync) or a reload ahead: first see whether the worker changed.
        return state, (CheckWorker(),)
    if unchanged:
        return state, (Unchanged(),)
    if runtime_only:
        known = state.slots or {}
        only = rendering.changed if rendering.changed is not None else None
        commands, messages, changes = runtime_commands(known, rendering.slots, only)
        after = HaproxyState(state.worker, True, rendering.slots, rendering, rendering.skeleton_hash,
                             state.rejected_digest)
        return after, (RuntimeChange(tuple(commands), tuple(messages), changes, not proc_seen, after),)
    digest = content_hash(rendering.text)
    if state.rejected_digest == digest:
        return state, (RejectedBefore(digest),)
    # The driver records the new state itself: it depends on how the reload went.
    return state, (Reload(digest),)


def carry_set_aside(previous: Mapping[str, SetAside], services: Mapping[str, Service], slots: Slots
                    ) -> tuple[dict[str, SetAside], dict[str, Service]]:
    """Of the services set aside before: those that stay aside as they are (a section HAProxy
    rejected, the service unchanged) and those whose listener must be probed again (a freed port
    is served now). A service gone from the plan, or served meanwhile, is dropped."""
    kept: dict[str, SetAside] = {}
    probe: dict[str, Service] = {}
    for key, entry in previous.items():
        service = services.get(key)
        if service is None or backend_id(service) in slots:
            continue
        if entry.kind == "config":
            if service == entry.service:
                kept[key] = entry
            continue
        probe[key] = service
    return kept, probe
