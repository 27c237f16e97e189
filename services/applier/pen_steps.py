"""The Pen driver's decisions as pure steps: no sockets, no files, no processes.

- `desired(plan)`: the pens a plan asks for (one per port Pen serves), the servers each gets
  (at most PEN_SERVERS, with a warning beyond), or the error for a value Pen must never get.
- `step(previous, wanted) -> (state, PenStep)`: from the pens instances.json asked for before and the pens wanted
  now, which pens keep running (their membership converges over the control socket), which are
  started (new), restarted (any setting of theirs changed) and stopped (gone).
- `life_step(life, running, now) -> (life, PenLifeStep)` (the runner): whether a pen that died is started again now or
  after its backoff.
- `slot_changes(live, table)`: the control-socket commands that move a running pen's slots to
  the wanted table, and the slots whose backend changed hands (their UDP flows are closed).

pen_driver.PenDriver performs them (files, the runner's SIGHUP, the control sockets, waiting for
pens to come up); pen_runner.PenRunner starts and stops the processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.applier.pen_control import Slot, empty_command
from services.common.model import Plan, Service

if TYPE_CHECKING:
    from services.applier.pen_runner import PenInstance

# The runner's restarts of a pen that died: MIN_BACKOFF doubling to MAX_BACKOFF, back to
# MIN_BACKOFF once a pen ran STABLE_AFTER seconds.
MIN_BACKOFF = 1.0
MAX_BACKOFF = 30.0
STABLE_AFTER = 10.0

Table = list  # list[Slot | None], one entry per server slot


def pen_services(plan: Plan) -> list[Service]:
    """The services Pen serves in this plan, by port then protocol."""
    return sorted((s for s in plan.services if s.protocol == "udp" or not plan.settings.haproxy),
                  key=lambda s: (s.port, s.protocol))


def choose_servers(service: Service, slots: int) -> tuple[list[Slot], list[str]]:
    """The servers that fit in `slots`, and a warning when some did not."""
    chosen = [Slot.of(server) for server in service.servers[:slots]]
    warnings = []
    if len(service.servers) > slots:
        left = ", ".join(server.address for server in service.servers[slots:])
        warnings.append(f"service {service.name!r} ({service.key}) has {len(service.servers)} servers but "
                        f"PEN_SERVERS is {slots}: left out {left}")
    return chosen, warnings


@dataclass(frozen=True)
class Desired:
    """The pens a plan asks for, by pen key (`<port>-<protocol>`)."""

    instances: dict[str, PenInstance]
    chosen: dict[str, list[Slot]]
    services: dict[str, Service]
    warnings: tuple[str, ...] = ()
    error: str = ""  # a value the model should have refused: nothing is applied

    def without(self, keys) -> "Desired":
        """The same without the pens `keys` (set aside)."""
        return Desired({k: v for k, v in self.instances.items() if k not in keys},
                       {k: v for k, v in self.chosen.items() if k not in keys}, self.services, self.warnings)


def desired(plan: Plan) -> Desired:
    from services.applier.pen_runner import PenInstance  # pen_runner imports this module

    settings = plan.settings
    instances: dict[str, PenInstance] = {}
    chosen: dict[str, list[Slot]] = {}
    by_key: dict[str, Service] = {}
    warnings: list[str] = []
    for service in pen_services(plan):
        instance = PenInstance(port=service.port, protocol=service.protocol, slots=settings.pen_servers,
                               clients=settings.pen_clients, max_connections=settings.max_connections)
        instances[instance.key] = instance
        by_key[instance.key] = service
        try:
            chosen[instance.key], more = choose_servers(service, settings.pen_servers)
        except ValueError as error:  # something the model should have refused: never sent to pen
            return Desired({}, {}, {}, (), f"service {service.key}: {error}")
        warnings += more
    return Desired(instances, chosen, by_key, tuple(warnings))


@dataclass(frozen=True)
class PenStep:
    """What converging the pens takes: `keep` run on (membership over the control socket),
    `start` are new, `restart` changed settings (a new process), `stop` are no longer wanted."""

    keep: tuple[str, ...]
    start: tuple[str, ...]
    restart: tuple[str, ...]
    stop: tuple[str, ...]

    @property
    def replaced(self) -> tuple[str, ...]:
        """The pens a process is (re)started for."""
        return tuple(sorted((*self.start, *self.restart)))


def step(previous: dict[str, PenInstance], wanted: dict[str, PenInstance]
         ) -> tuple[dict[str, PenInstance], PenStep]:
    """(the pens instances.json asks for once the step is performed: `wanted`, what it takes)."""
    keep = tuple(sorted(k for k, v in wanted.items() if previous.get(k) == v))
    start = tuple(sorted(k for k in wanted if k not in previous))
    restart = tuple(sorted(k for k, v in wanted.items() if k in previous and previous[k] != v))
    stop = tuple(sorted(k for k in previous if k not in wanted))
    return dict(wanted), PenStep(keep, start, restart, stop)


def assign_slots(previous: dict[int, Slot | None], servers: list[Slot], size: int) -> Table:
    """Place `servers` into a table of `size` slots, keeping each one where it already was."""
    table: Table = [None] * size
    wanted = {(s.ip, s.port): s for s in servers}
    placed = set()
    for index, slot in sorted(previous.items()):
        if slot is not None and index < size and (slot.ip, slot.port) in wanted \
                and (slot.ip, slot.port) not in placed:
            table[index] = wanted[(slot.ip, slot.port)]
            placed.add((slot.ip, slot.port))
    free = (i for i in range(size) if table[i] is None)
    for server in servers:
        if (server.ip, server.port) not in placed:
            table[next(free)] = server
            placed.add((server.ip, server.port))
    return table


def render_table(table: Table) -> str:
    """The penctl commands that set every slot: Pen's -F file."""
    return "".join((slot.command(i, moved=False) if slot else empty_command(i)) + "\n"
                   for i, slot in enumerate(table))


def table_matches(live: dict[int, Slot | None], table: Table) -> bool:
    if any(live.get(i) != slot for i, slot in enumerate(table)):
        return False
    return all(slot is None for i, slot in live.items() if i >= len(table))


@dataclass(frozen=True)
class SlotChange:
    index: int
    have: Slot | None
    want: Slot | None
    command: str
    moved: bool  # the slot's backend changed hands (its UDP flows are closed)


def slot_changes(live: dict[int, Slot | None], table: Table) -> tuple[SlotChange, ...]:
    """The control-socket commands that bring a running pen from `live` to `table`."""
    out = []
    for index in range(max(len(table), max(live, default=-1) + 1)):
        want = table[index] if index < len(table) else None
        have = live.get(index)
        if want == have:
            continue
        is_move = have is None or want is None or (have.ip, have.port) != (want.ip, want.port)
        out.append(SlotChange(index, have, want, want.command(index, moved=is_move) if want else empty_command(index),
                              is_move and have is not None))
    return tuple(out)


@dataclass(frozen=True)
class PenLife:
    """The runner's view of one pen's process over time (monotonic seconds)."""

    started: float = 0.0  # when this runner started it (0: not started by it)
    adopted: bool = False  # taken over from a previous runner
    restart_at: float = 0.0  # the next start attempt
    backoff: float = MIN_BACKOFF


@dataclass(frozen=True)
class PenLifeStep:
    start: bool  # start the pen now
    died: bool  # it ran and is gone (the runner forgets its process)
    delay: float = 0.0  # when `died`: the wait before the next start


def life_step(life: PenLife, running: bool, now: float) -> tuple[PenLife, PenLifeStep]:
    """One turn of the runner for one wanted pen whose settings did not change."""
    if running:
        if life.started and now - life.started > STABLE_AFTER:
            life = PenLife(life.started, life.adopted, life.restart_at, MIN_BACKOFF)
        return life, PenLifeStep(False, False)
    died = bool(life.started or life.adopted)
    delay = 0.0
    if died:
        # It ran and died: wait a little before the next try, longer while it keeps dying.
        delay = life.backoff
        backoff = min(MAX_BACKOFF, life.backoff * 2) if now - life.started < STABLE_AFTER else MIN_BACKOFF
        life = PenLife(0.0, False, now + delay, backoff)
    return life, PenLifeStep(now >= life.restart_at, died, delay)
