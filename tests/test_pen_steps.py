"""The Pen driver's and runner's pure steps (pen_steps.py): no pens, sockets or files."""
from __future__ import annotations

from services.applier import pen_steps
from services.applier.pen_control import Slot
from services.applier.pen_runner import PenInstance
from services.applier.pen_steps import (
    MAX_BACKOFF, MIN_BACKOFF, STABLE_AFTER, PenLife, desired, life_step, slot_changes, step,
)
from services.common.model import Plan, ProxySettings, Server, Service


def svc(port: int, protocol: str = "udp", hosts=(1,)) -> Service:
    return Service(name=f"s{port}", port=port, protocol=protocol,
                   servers=tuple(Server(f"10.0.0.{h}", 53) for h in hosts))


def instance(port: int, protocol: str = "udp", slots: int = 4, clients: int = 64, maxconn: int = 64):
    return PenInstance(port, protocol, slots, clients, maxconn)


def settings(**extra) -> ProxySettings:
    return ProxySettings(**{"pen_servers": 4, "pen_clients": 64, "max_connections": 64, **extra})


def test_desired_pens_udp_always_tcp_only_without_haproxy():
    plan = Plan((svc(53), svc(8080, "tcp")), settings())
    want = desired(plan)
    assert sorted(want.instances) == ["53-udp"] and want.instances["53-udp"] == instance(53)
    want = desired(Plan((svc(53), svc(8080, "tcp")), settings(haproxy=False)))
    assert sorted(want.instances) == ["53-udp", "8080-tcp"]


def test_desired_keeps_pen_servers_and_warns_beyond():
    want = desired(Plan((svc(53, hosts=range(1, 7)),), settings()))
    assert len(want.chosen["53-udp"]) == 4 and "PEN_SERVERS is 4" in want.warnings[0]


def test_a_value_pen_must_not_get_is_an_error_not_an_instance():
    bad = Service(name="x", port=53, protocol="udp", servers=(Server("fe80::1%eth0", 53),))
    want = desired(Plan((bad,), settings()))
    assert want.error.startswith("service 53/udp:") and want.instances == {}


def test_pens_kept_started_restarted_and_stopped():
    previous = {"53-udp": instance(53), "54-udp": instance(54), "55-udp": instance(55)}
    wanted = {"53-udp": instance(53), "54-udp": instance(54, clients=128), "56-udp": instance(56)}
    state, got = step(previous, wanted)
    assert state == wanted  # what instances.json says once performed
    assert got.keep == ("53-udp",)  # membership over the control socket: no restart
    assert got.restart == ("54-udp",)  # a setting of its own changed
    assert got.start == ("56-udp",)
    assert got.stop == ("55-udp",)
    assert got.replaced == ("54-udp", "56-udp")
    # The same instances: nothing is started or stopped.
    _, same = step(wanted, dict(wanted))
    assert same.start == same.restart == same.stop == () and len(same.keep) == 3


def test_set_aside_pens_are_left_out():
    want = desired(Plan((svc(53), svc(54)), settings())).without({"54-udp"})
    assert sorted(want.instances) == ["53-udp"] and sorted(want.chosen) == ["53-udp"]
    assert "54-udp" in want.services  # still known: its reason names the service


def test_slot_changes_move_only_what_differs_and_flag_moved_backends():
    a, b, c = Slot("10.0.0.1", 53, 1, 0), Slot("10.0.0.2", 53, 1, 0), Slot("10.0.0.3", 53, 1, 0)
    live = {0: a, 1: b, 2: None, 3: None}
    table = pen_steps.assign_slots(live, [a, c], 4)
    assert table == [a, c, None, None]  # a keeps its slot, c takes the one freed
    changes = slot_changes(live, table)
    assert [(ch.index, ch.moved) for ch in changes] == [(1, True)]  # b's UDP flows are closed
    assert changes[0].command == "server 1 address 10.0.0.3 port 53 max 0 weight 1 blacklist 0"
    reweighted = [Slot("10.0.0.1", 53, 9, 0), c, None, None]
    changes = slot_changes(dict(enumerate(table)), reweighted)
    assert [(ch.index, ch.moved) for ch in changes] == [(0, False)]
    assert slot_changes(dict(enumerate(table)), table) == ()
    # A live slot beyond the table is emptied.
    assert [ch.index for ch in slot_changes({**dict(enumerate(table)), 5: a}, table)] == [5]


def test_runner_restarts_a_dead_pen_with_backoff_and_resets_once_stable():
    life = PenLife(started=100.0, backoff=MIN_BACKOFF)
    # Running: nothing to do.
    assert life_step(life, True, 101.0) == (life, pen_steps.PenLifeStep(False, False))
    # Died soon after its start: wait MIN_BACKOFF, then double.
    life, turn = life_step(life, False, 102.0)
    assert turn.died and not turn.start and turn.delay == MIN_BACKOFF
    assert life.restart_at == 102.0 + MIN_BACKOFF and life.backoff == 2 * MIN_BACKOFF and life.started == 0.0
    life, turn = life_step(life, False, 102.5)
    assert not turn.died and not turn.start  # waiting
    life, turn = life_step(life, False, 103.0)
    assert turn.start
    # It keeps dying: the backoff grows up to MAX_BACKOFF.
    now = 103.0
    for _ in range(10):
        life = PenLife(started=now, backoff=life.backoff)
        life, turn = life_step(life, False, now + 1)
        now = life.restart_at
    assert life.backoff == MAX_BACKOFF
    # A pen that ran STABLE_AFTER seconds is back to MIN_BACKOFF.
    stable = PenLife(started=now, backoff=MAX_BACKOFF)
    life, turn = life_step(stable, True, now + STABLE_AFTER + 1)
    assert life.backoff == MIN_BACKOFF and not turn.start


def test_an_adopted_pen_that_died_waits_its_backoff_a_new_one_starts_at_once():
    life, turn = life_step(PenLife(adopted=True), False, 50.0)
    assert turn.died and turn.delay == MIN_BACKOFF and not turn.start
    # never started nor adopted: started at once
    life, turn = life_step(PenLife(), False, 50.0)
    assert turn.start and not turn.died
