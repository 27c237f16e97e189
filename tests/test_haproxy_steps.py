"""The HAProxy driver's pure decision step (haproxy_steps.py) and the renderer's changed-only
path, without HAProxy, sockets or files."""
from __future__ import annotations

from services.applier import haproxy_steps as steps
from services.applier.haproxy_isolation import SetAside
from services.applier.haproxy_render import ConfigRenderer, HaproxyPaths, render
from services.common.model import Plan, ProxySettings, Server, Service, content_hash

PATHS = HaproxyPaths("/run/proxymatic/haproxy")


def svc(port: int, *hosts: int, name: str = "web", mode: str = "tcp") -> Service:
    return Service(name=name, port=port, mode=mode,
                   servers=tuple(Server(f"10.0.0.{h}", 80) for h in hosts))


def plan_of(*services: Service) -> Plan:
    return Plan(tuple(sorted(services, key=lambda s: (s.port, s.protocol))), ProxySettings())


def running(renderer: ConfigRenderer, plan: Plan) -> tuple[steps.HaproxyState, object]:
    """A HAProxy known to run `plan` (as after a confirmed reload)."""
    rendering = renderer.update(plan, {})
    return steps.HaproxyState(worker=7, trusted=True, slots=rendering.slots, config=rendering,
                              skeleton_hash=rendering.skeleton_hash), rendering


def decide(state, rendering, proc_seen):
    """The step's one action (the state it returns is checked where it changes)."""
    after, actions = steps.step(state, rendering, proc_seen)
    assert len(actions) == 1
    if not isinstance(actions[0], steps.RuntimeChange):
        assert after == state
    return actions[0]


def test_the_same_plan_is_a_no_op_once_the_worker_was_checked():
    renderer = ConfigRenderer(PATHS)
    plan = plan_of(svc(8080, 1, 2), svc(8081, 3))
    state, _ = running(renderer, plan)
    again = renderer.update(plan, state.slots)
    # A resync first looks at the master (HAProxy may have been restarted behind our back)...
    assert isinstance(decide(state, again, proc_seen=False), steps.CheckWorker)
    # ...then has nothing to do.
    assert isinstance(decide(state, again, proc_seen=True), steps.Unchanged)
    assert again.changed == frozenset()


def test_a_membership_change_is_runtime_commands_only_for_the_changed_backend():
    renderer = ConfigRenderer(PATHS)
    web, db = svc(8080, 1, 2), svc(8081, 3, name="db")
    state, _ = running(renderer, plan_of(web, db))
    new = renderer.update(plan_of(web.with_servers([*web.servers, Server("10.0.0.9", 80)]), db), state.slots)
    assert new.changed == {"svc_8080_tcp_web"}
    action = decide(state, new, proc_seen=False)
    assert isinstance(action, steps.RuntimeChange)
    assert action.show_proc  # `show proc` rides on the same CLI line
    assert action.changes == 1
    texts = [c.text for c in action.commands]
    assert texts == ["set server svc_8080_tcp_web/s2 addr 10.0.0.9 port 80",
                     f"set weight svc_8080_tcp_web/s2 {Server('10.0.0.9', 80).proxy_weight}",
                     "set maxconn server svc_8080_tcp_web/s2 0",
                     "set server svc_8080_tcp_web/s2 state ready"]
    # What the driver records once the commands went through: the new layout and config.
    assert action.state.slots is new.slots and action.state.config is new and action.state.trusted
    assert steps.step(state, new, proc_seen=False)[0] == action.state
    # The text is the full render's, assembled only on demand.
    assert new.text == render(plan_of(web.with_servers([*web.servers, Server("10.0.0.9", 80)]), db), PATHS,
                              new.slots)


def test_removals_go_after_additions():
    renderer = ConfigRenderer(PATHS)
    state, _ = running(renderer, plan_of(svc(8080, 1, 2)))
    new = renderer.update(plan_of(svc(8080, 2, 3)), state.slots)
    action = decide(state, new, proc_seen=True)
    assert isinstance(action, steps.RuntimeChange) and not action.show_proc
    texts = [c.text for c in action.commands]
    assert texts[-1] == "set server svc_8080_tcp_web/s0 state maint"
    assert any("addr 10.0.0.3" in t for t in texts[:-1])


def test_a_new_service_needs_a_reload_after_looking_at_the_worker():
    renderer = ConfigRenderer(PATHS)
    state, _ = running(renderer, plan_of(svc(8080, 1)))
    new = renderer.update(plan_of(svc(8080, 1), svc(9090, 2, name="api")), state.slots)
    assert isinstance(decide(state, new, proc_seen=False), steps.CheckWorker)
    action = decide(state, new, proc_seen=True)
    assert action == steps.Reload(content_hash(new.text))


def test_a_mode_change_needs_a_reload():
    renderer = ConfigRenderer(PATHS)
    state, _ = running(renderer, plan_of(svc(8080, 1)))
    new = renderer.update(plan_of(svc(8080, 1, mode="http")), state.slots)
    assert isinstance(decide(state, new, proc_seen=True), steps.Reload)


def test_an_untrusted_worker_always_reloads():
    renderer = ConfigRenderer(PATHS)
    state, rendering = running(renderer, plan_of(svc(8080, 1)))
    untrusted = steps.HaproxyState(worker=7, trusted=False, slots=state.slots, config=rendering,
                                   skeleton_hash=rendering.skeleton_hash)
    assert isinstance(decide(untrusted, rendering, proc_seen=True), steps.Reload)


def test_a_config_rejected_before_is_not_validated_again_until_it_changes():
    renderer = ConfigRenderer(PATHS)
    state, _ = running(renderer, plan_of(svc(8080, 1)))
    new = renderer.update(plan_of(svc(8080, 1), svc(9090, 2, name="api")), state.slots)
    rejected = steps.HaproxyState(state.worker, state.trusted, state.slots, state.config, state.skeleton_hash,
                                  rejected_digest=content_hash(new.text))
    assert decide(rejected, new, proc_seen=True) == steps.RejectedBefore(content_hash(new.text))
    other = renderer.update(plan_of(svc(8080, 1), svc(9091, 2, name="api")), state.slots)
    assert isinstance(decide(rejected, other, proc_seen=True), steps.Reload)


def test_a_config_read_back_from_the_file_is_compared_as_text():
    renderer = ConfigRenderer(PATHS)
    plan = plan_of(svc(8080, 1))
    state, rendering = running(renderer, plan)
    from_file = steps.HaproxyState(7, True, state.slots, rendering.text, rendering.skeleton_hash)
    assert isinstance(decide(from_file, renderer.update(plan, state.slots), proc_seen=True), steps.Unchanged)


def test_set_aside_keys_carried_or_probed_again():
    web, api, db = svc(8080, 1), svc(9090, 2, name="api"), svc(5432, 3, name="db")
    previous = {
        "8080/tcp": SetAside(web, "port taken", "bind"),  # probed again
        "9090/tcp": SetAside(api, "rejected section", "config"),  # unchanged: stays aside
        "5432/tcp": SetAside(db, "rejected section", "config"),  # changed: tried again
        "7000/tcp": SetAside(svc(7000, 1), "port taken", "bind"),  # gone from the plan
    }
    changed_db = svc(5432, 4, name="db")
    services = {s.key: s for s in (web, api, changed_db)}
    kept, probe = steps.carry_set_aside(previous, services, {})
    assert kept == {"9090/tcp": previous["9090/tcp"]}
    assert probe == {"8080/tcp": web}
    # A service served meanwhile (it has a backend in the layout) is no longer aside.
    kept, probe = steps.carry_set_aside(previous, services, {"svc_8080_tcp_web": (None,) * 16})
    assert probe == {}


def test_changed_only_rendering_matches_a_full_one_and_falls_back_when_needed():
    renderer = ConfigRenderer(PATHS)
    services = [svc(8000 + i, 1, 2, name=f"app{i}") for i in range(20)]
    state, first = running(renderer, plan_of(*services))
    services[5] = services[5].with_servers([Server("10.0.0.7", 80)])
    second = renderer.update(plan_of(*services), first.slots)
    assert second.changed == {"svc_8005_tcp_app5"}
    assert second.text == render(plan_of(*services), PATHS, second.slots)
    assert second.servers == first.servers - 1
    # A previous layout that is not the last rendering's (a rejected reload, re-read files): the
    # full comparison, same answer.
    third = renderer.update(plan_of(*services), dict(first.slots))
    assert third.slots == second.slots and third.text == second.text
