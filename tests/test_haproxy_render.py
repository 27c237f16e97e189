"""haproxy.cfg rendering: pure functions, plus `haproxy -c` on what they produce."""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile

import pytest

from services.applier import haproxy_launch, haproxy_render
from services.applier.haproxy_launch import check_config
from services.applier.haproxy_render import (
    ConfigRenderer, HaproxyPaths, RenderError, RunAs, assign_slots, extra_fds, global_maxconn, haproxy_services,
    quote_path, render, skeleton_hash, slot_capacity,
)
from services.common.model import HealthCheck, Plan, ProxySettings, Server, Service, content_hash, proxy_weight

PATHS = HaproxyPaths.for_run_dir("/run/pm")
needs_haproxy = pytest.mark.skipif(not os.path.exists("/usr/sbin/haproxy") and not shutil.which("haproxy"),
                                   reason="haproxy is not installed")


def service(port=8080, servers=((("10.0.0.1", 80, 100, None)),), **extra) -> Service:
    data = {"name": "web", "port": port,
            "servers": [{"ip": ip, "port": p, "weight": w, "maxconn": m} for ip, p, w, m in servers], **extra}
    return Service.from_dict(data)


def rendered(*services: Service, **settings) -> str:
    plan = Plan(tuple(services), ProxySettings(**settings))
    return render(plan, PATHS, assign_slots(haproxy_services(plan), {}))


def section(text: str, name: str) -> str:
    match = re.search(rf"^listen {name}\n((?:    .*\n)*)", text, re.M)
    assert match, f"no listen {name} in:\n{text}"
    return match.group(1)


def render_skeleton(plan: Plan, paths: HaproxyPaths, slots, fd_limit=None, run_as=None, set_aside=()) -> str:
    """The config with every slot empty: what only a reload can change (the reference the
    renderer's skeleton hash is checked against)."""
    return render(plan, paths, {bid: (None,) * len(entries) for bid, entries in slots.items()}, fd_limit,
                  run_as=run_as, set_aside=set_aside)


def test_deterministic_and_independent_of_input_order():
    one = service(8080, [("10.0.0.2", 80, 1, None), ("10.0.0.1", 80, 2, 5)])
    two = service(8080, [("10.0.0.1", 80, 2, 5), ("10.0.0.2", 80, 1, None)])
    other = service(9000)
    assert rendered(one, other) == rendered(other, two)
    assert rendered(one) == rendered(one)


def test_one_listen_per_tcp_service_with_weights_maxconn_timeouts():
    text = rendered(
        service(8080, [("10.0.0.1", 80, 1000, 10), ("10.0.0.2", 81, 0, None)], timeout_client=7, timeout_server=9),
        service(53, protocol="udp"),  # Pen's
        max_connections=321,
    )
    assert re.findall(r"^listen (\S+)", text, re.M) == ["stats", "svc_8080_tcp_web"]
    body = section(text, "svc_8080_tcp_web")
    assert "    bind 0.0.0.0:8080\n" in body
    assert "    mode tcp\n" in body and "    balance leastconn\n" in body
    assert "    maxconn 321\n" in body
    assert "    timeout client 7s\n" in body and "    timeout server 9s\n" in body
    assert "    server s0 10.0.0.1:80 weight 256 maxconn 10\n" in body
    assert "    server s1 10.0.0.2:81 weight 0\n" in body
    assert "    server s2 127.0.0.1:1 weight 1 disabled\n" in body
    assert "    server s3 127.0.0.1:1 weight 1 disabled\n" in body
    assert f"    maxconn {global_maxconn(321)}\n" in text
    assert "option httpchk" not in text and " check" not in body


def test_default_timeouts_http_mode_and_health_checks():
    text = rendered(
        service(8080, mode="http", health_check={"protocol": "http", "path": "/health", "interval_seconds": 2,
                                                 "timeout_seconds": 3, "fall": 4}),
        service(5432, health_check={"protocol": "tcp"}),
    )
    web = section(text, "svc_8080_tcp_web")
    assert "    mode http\n" in web and "    option forwardfor except 127.0.0.0/8\n" in web
    assert "    option httpchk GET '/health'\n" in web
    assert "    timeout check 3s\n" in web
    assert f"    server s0 10.0.0.1:80 weight {proxy_weight(100)} check inter 2s fall 4 rise 2\n" in web
    assert "    timeout client 300s\n" in web and "    timeout server 300s\n" in web
    db = section(text, "svc_5432_tcp_web")
    assert "httpchk" not in db and "forwardfor" not in db
    assert f"    server s0 10.0.0.1:80 weight {proxy_weight(100)} check inter 10s fall 3 rise 2\n" in db
    assert "    server s1 127.0.0.1:1 weight 1 check inter 10s fall 3 rise 2 disabled\n" in db


def test_global_section_sockets_and_stats_listener():
    text = rendered()
    assert "    master-worker\n" in text
    assert "    stats socket /run/pm/haproxy/admin.sock mode 600 level admin expose-fd listeners\n" in text
    assert "    hard-stop-after 30s\n" in text
    stats = section(text, "stats")
    assert "    bind unix@/run/pm/haproxy/stats.sock mode 600\n" in stats
    assert "    mode http\n" in stats and "    stats enable\n" in stats and "    stats uri /\n" in stats


def test_haproxy_switched_off_renders_no_service():
    assert re.findall(r"^listen (\S+)", rendered(service(8080), haproxy=False), re.M) == ["stats"]


def test_names_and_hostnames_never_reach_the_config():
    # Built directly, bypassing the model's validation, as a hostile source would wish.
    evil = "x\n    bind :22\n#'\""
    svc = Service(name=evil, port=8080, servers=(Server("10.0.0.1", 80, hostname=evil, weight=1),))
    text = rendered(svc)
    assert "x\n" not in text.replace("\nlisten", "") and ":22" not in text and "\"" not in text
    assert re.findall(r"^listen (\S+)", text, re.M) == ["stats", "svc_8080_tcp_x_bind_22_"]


@pytest.mark.parametrize("server", [
    Server("10.0.0.1 backup\n    bind :22", 80, weight=1),
    Server("10.0.0.1", 0, weight=1),
    Server("10.0.0.1", 65536, weight=1),
    Server("10.0.0.1", 80, weight=1, maxconn=-1),
    Server("fe80::1%x\n    bind :22", 80, weight=1),  # an IPv6 zone is free text
])
def test_unsafe_or_out_of_range_server_values_are_refused(server):
    with pytest.raises(RenderError, match="8080/tcp"):
        rendered(Service(name="web", port=8080, servers=(server,)))


@pytest.mark.parametrize("path", ["/x\n    bind :22", "/a b", "/#", "relative", '/"', "/\\x41", "/\n"])
def test_unsafe_health_check_paths_are_refused(path):
    svc = Service(name="web", port=8080, mode="http", servers=(Server("10.0.0.1", 80, weight=1),),
                  health_check=HealthCheck(protocol="http", path=path))
    with pytest.raises(RenderError, match="health check path"):
        rendered(svc)


def test_health_check_path_is_one_quoted_word():
    # HAProxy expands nothing in single quotes; a quote is closed, escaped and reopened.
    assert quote_path("/a'b$x;(1)") == "'/a'\\''b$x;(1)'"
    assert quote_path("/health?full=1&x=%20") == "'/health?full=1&x=%20'"


def test_slots_are_stable_and_reuse_freed_slots_last():
    def svc(*ports):
        return service(8080, [("10.0.0.1", p, 1, None) for p in ports])

    first = assign_slots([svc(1, 2, 3)], {})["svc_8080_tcp_web"]
    assert len(first) == 16 and [s.port if s else None for s in first[:4]] == [1, 2, 3, None]
    # 2 leaves, 4 arrives: 4 takes a never-used slot, not the one 2 just freed.
    second = assign_slots([svc(1, 3, 4)], {"svc_8080_tcp_web": first})["svc_8080_tcp_web"]
    assert [s.port if s else None for s in second[:4]] == [1, None, 3, 4]
    # With every never-used slot taken, a freed slot is reused.
    full = assign_slots([svc(1, 3, 4, *range(10, 23))], {"svc_8080_tcp_web": second})["svc_8080_tcp_web"]
    assert len(full) == 16 and all(full) and [s.port for s in full[:1] + full[2:4]] == [1, 3, 4]
    # Growing past the capacity makes room for twice the servers; existing servers keep their slots.
    grown = assign_slots([svc(1, 3, 4, *range(10, 24))], {"svc_8080_tcp_web": full})["svc_8080_tcp_web"]
    assert len(grown) == 64 and grown[:16] == full and grown[16].port == 23
    # Shrinking never shrinks the capacity (that would need a reload).
    fewer = assign_slots([svc(3)], {"svc_8080_tcp_web": grown})["svc_8080_tcp_web"]
    assert len(fewer) == 64 and fewer[2].port == 3


def test_weight_changes_do_not_move_servers_and_keep_the_skeleton():
    plan_a = Plan((service(8080, [("10.0.0.1", 80, 1, None), ("10.0.0.2", 80, 1, None)]),))
    plan_b = Plan((service(8080, [("10.0.0.1", 80, 9, 4), ("10.0.0.3", 80, 1, None)]),))
    slots_a = assign_slots(haproxy_services(plan_a), {})
    slots_b = assign_slots(haproxy_services(plan_b), slots_a)
    assert slots_b["svc_8080_tcp_web"][0].weight == 9
    assert render(plan_a, PATHS, slots_a) != render(plan_b, PATHS, slots_b)
    assert render_skeleton(plan_a, PATHS, slots_a) == render_skeleton(plan_b, PATHS, slots_b)
    plan_c = Plan((service(8080, [("10.0.0.1", 80, 1, None)], timeout_server=5),))
    assert render_skeleton(plan_c, PATHS, assign_slots(haproxy_services(plan_c), slots_a)) != \
        render_skeleton(plan_a, PATHS, slots_a)


def test_capacity_and_global_maxconn():
    assert [slot_capacity(n) for n in (0, 1, 8, 9, 16, 100)] == [16, 16, 16, 32, 32, 256]
    assert global_maxconn(8192) == 16384
    assert global_maxconn(8192, fd_limit=20000) == (20000 - 1024) // 2
    assert global_maxconn(10, fd_limit=20000) == 20


@needs_haproxy
def test_haproxy_accepts_the_rendering():
    run_dir = tempfile.mkdtemp(prefix="pm")
    try:
        paths = HaproxyPaths.for_run_dir(run_dir)
        os.makedirs(paths.dir)
        plan = Plan((
            service(8080, [("10.0.0.1", 80, 10, 5), ("::1", 81, 1, None)], mode="http",
                    health_check={"protocol": "http", "path": "/a'b$x;(1)"}),
            service(5432, [("10.0.0.2", 5432, 0, None)], health_check={"protocol": "tcp"}, timeout_client=1),
        ), ProxySettings(max_connections=100))
        with open(paths.config, "w") as handle:
            handle.write(render(plan, paths, assign_slots(haproxy_services(plan), {})))
        valid, message = check_config(paths.config)
        assert valid, message
        with open(paths.config, "a") as handle:
            handle.write("    not_a_keyword 1\n")
        valid, message = check_config(paths.config)
        assert not valid and "not_a_keyword" in message
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _random_service(rng: random.Random, port: int) -> Service:
    servers = [{"ip": f"10.0.{rng.randrange(3)}.{rng.randrange(1, 30)}", "port": rng.choice((80, 81)),
                "weight": rng.choice((0, 1, 10, 256)), "maxconn": rng.choice((None, None, 5))}
               for _ in range(rng.choice((0, 1, 3, 5, 5, 9, 20)))]
    extra = {}
    if rng.random() < 0.2:
        extra["mode"] = "http"
    if rng.random() < 0.2:
        extra["health_check"] = rng.choice(({"protocol": "tcp"}, {"protocol": "http", "path": "/h'x"},
                                            {"protocol": "tcp", "path": "/unused", "fall": 2}))
    if rng.random() < 0.2:
        extra["timeout_client"] = rng.choice((300, 7))
    return Service.from_dict({"name": f"app{port}", "port": port, "servers": servers, **extra})


def test_incremental_rendering_equals_a_full_render_over_random_plans():
    """ConfigRenderer assembles the file from cached per-service sections: over a random plan
    sequence (and the ways the driver moves `previous`: committed, rejected, re-read from disk,
    lost) it gives exactly what assign_slots + render + render_skeleton give from scratch."""
    rng = random.Random(20240611)
    renderer = ConfigRenderer(PATHS)
    services = {port: _random_service(rng, port) for port in rng.sample(range(8000, 8030), 10)}
    settings = ProxySettings(max_connections=100)
    previous: dict = {}
    for step in range(400):
        op = rng.random()
        if op < 0.5 and services:  # one service's servers: the common case
            port = rng.choice(sorted(services))
            svc = services[port]
            servers = list(svc.servers)
            if servers and rng.random() < 0.5:
                servers.pop(rng.randrange(len(servers)))
            if rng.random() < 0.5:
                servers.append(Server(f"10.0.9.{rng.randrange(1, 200)}", 80, weight=rng.choice((1, 7))))
            if servers and rng.random() < 0.3:
                i = rng.randrange(len(servers))
                old = servers[i]
                servers[i] = Server(old.ip, old.port, old.hostname, weight=rng.choice((0, 3, 256)),
                                    maxconn=rng.choice((None, 9)))
            services[port] = svc.with_servers(servers)
        elif op < 0.6:
            services[rng.choice(range(8000, 8030))] = _random_service(rng, rng.choice(range(8000, 8030)))
            services = {s.port: s for s in services.values()}
        elif op < 0.7 and services:
            services.pop(rng.choice(sorted(services)))
        elif op < 0.75:
            settings = ProxySettings(max_connections=rng.choice((100, 200)), haproxy=rng.random() < 0.9)
        elif op < 0.8:  # equal content, new objects (as from a decoder that does not reuse them)
            services = {p: Service.from_dict(s.to_dict()) for p, s in services.items()}
        if rng.random() < 0.05 and services:  # a value the renderer refuses
            port = rng.choice(sorted(services))
            bad = services[port].with_servers([Server("10.0.0.1", 0)])
            plan = Plan(tuple({**services, port: bad}.values()), settings)
            with pytest.raises(RenderError):
                renderer.update(plan, previous)
        if rng.random() < 0.03:  # a second service on the same port
            dup = next(iter(services.values()), None)
            if dup is not None:
                with pytest.raises(RenderError, match="more than one"):
                    renderer.update(Plan((dup, Service.from_dict({**dup.to_dict(), "name": "other"})), settings),
                                    previous)
        order = list(services.values())
        rng.shuffle(order)
        plan = Plan(tuple(order), settings)

        got = renderer.update(plan, previous)
        slots = assign_slots(haproxy_services(plan), previous)
        assert got.slots == slots, step
        assert got.text == render(plan, PATHS, slots), step
        assert got.skeleton_hash == content_hash(render_skeleton(plan, PATHS, slots)), step

        fate = rng.random()
        if fate < 0.75:  # applied
            previous = got.slots
        elif fate < 0.85:  # rejected: the driver keeps its layout
            pass
        elif fate < 0.95:  # adopted from slots.json: equal values, new objects
            previous = {bid: tuple(None if s is None else Server.from_dict(s.to_dict()) for s in entries)
                        for bid, entries in got.slots.items()}
        else:  # state lost: the next reload starts from scratch
            previous = {}


def test_incremental_rendering_redoes_only_the_changed_service(monkeypatch):
    services = [service(9000 + i, [("10.0.0.1", 80 + j, 1, None) for j in range(3)]) for i in range(50)]
    renderer = ConfigRenderer(PATHS)
    first = renderer.update(Plan(tuple(services)), {})

    calls = {"section": 0, "assign": 0, "hash": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(haproxy_render, "_render_section", counting("section", haproxy_render._render_section))
    monkeypatch.setattr(haproxy_render, "assign_slots", counting("assign", haproxy_render.assign_slots))
    monkeypatch.setattr(haproxy_render, "skeleton_hash", counting("hash", haproxy_render.skeleton_hash))
    services[17] = services[17].with_servers([Server("10.0.0.1", 80, weight=1), Server("10.0.0.2", 80, weight=1)])
    second = renderer.update(Plan(tuple(services)), first.slots)
    assert calls == {"section": 1, "assign": 1, "hash": 0}
    assert second.skeleton_hash == first.skeleton_hash
    changed = [bid for bid in second.slots if second.slots[bid] is not first.slots[bid]]
    assert changed == ["svc_9017_tcp_web"]

    # A new timeout changes that service's skeleton: only its skeleton section is rendered anew.
    services[3] = Service.from_dict({**services[3].to_dict(), "timeout_server": 5})
    third = renderer.update(Plan(tuple(services)), second.slots)
    assert calls == {"section": 3, "assign": 2, "hash": 1}
    assert third.skeleton_hash != second.skeleton_hash


def test_global_maxconn_leaves_file_descriptors_for_listeners():
    # HAProxy refuses to start when 2 * maxconn + listeners exceeds the hard fd limit.
    assert global_maxconn(8192, fd_limit=20000, extra_fds=1000) == (20000 - 1024 - 1000) // 2
    assert global_maxconn(8192, fd_limit=20000, extra_fds=0) == (20000 - 1024) // 2
    checked = Service.from_dict({"name": "a", "port": 1, "health_check": {"protocol": "tcp"}})
    unchecked = Service.from_dict({"name": "b", "port": 2})
    assert extra_fds([checked, unchecked], {"svc_1_tcp_a": (None,) * 16, "svc_2_tcp_b": (None,) * 16}) == 2 + 16


def test_services_set_aside_are_left_out_and_the_rest_rendered_as_without_them():
    web, db, cache = service(8080), service(5432), service(6379)
    plan = Plan((web, db, cache), ProxySettings(max_connections=100))
    without_db = Plan((web, cache), ProxySettings(max_connections=100))
    text = render(plan, PATHS, assign_slots(haproxy_services(plan), {}), set_aside={"5432/tcp"})
    assert re.findall(r"^listen (\S+)", text, re.M) == ["stats", "svc_6379_tcp_web", "svc_8080_tcp_web"]
    assert text == render(without_db, PATHS, assign_slots(haproxy_services(without_db), {}))
    assert [s.key for s in haproxy_services(plan, {"5432/tcp", "6379/tcp"})] == ["8080/tcp"]

    # Incrementally: set aside, then served again; always what a full render gives.
    renderer = ConfigRenderer(PATHS)
    previous: dict = {}
    for aside in ({"5432/tcp"}, set(), {"8080/tcp", "6379/tcp"}, {"5432/tcp"}):
        got = renderer.update(plan, previous, aside)
        assert got.text == render(plan, PATHS, got.slots, set_aside=aside), aside
        assert got.skeleton_hash == skeleton_hash(render_skeleton(plan, PATHS, got.slots, set_aside=aside))
        assert [key for key, _ in got.sections] == [s.key for s in haproxy_services(plan, aside)]
        assert got.header + "".join(text for _, text in got.sections) + "\n" == got.text
        previous = got.slots


def test_workers_run_as_the_account_given():
    text = render(Plan((), ProxySettings()), PATHS, {}, run_as=RunAs("haproxy", "haproxy"))
    assert "\nglobal\n    master-worker\n" in text
    assert "\n    user haproxy\n    group haproxy\n" in text
    assert "\n    user " not in render(Plan((), ProxySettings()), PATHS, {})
    renderer = ConfigRenderer(PATHS, run_as=RunAs("nobody", "nogroup"))
    assert "\n    user nobody\n    group nogroup\n" in renderer.update(Plan((service(8080),), ProxySettings()), {}).text
    for bad in ("root\n    bind :22", "", "a b"):
        with pytest.raises(RenderError):
            RunAs(bad, "haproxy")


@needs_haproxy
def test_haproxy_accepts_the_account_it_drops_to():
    account = haproxy_launch.run_as() or RunAs("nobody", "nogroup")
    run_dir = tempfile.mkdtemp(prefix="pm")
    try:
        paths = HaproxyPaths.for_run_dir(run_dir)
        os.makedirs(paths.dir)
        with open(paths.config, "w") as handle:
            handle.write(render(Plan((service(8080),), ProxySettings()), paths,
                                {"svc_8080_tcp_web": (None,) * 16}, run_as=account))
        valid, message = check_config(paths.config)
        assert valid, message
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_split_sections_and_their_skeletons():
    plan = Plan((service(8080, health_check={"protocol": "tcp"}), service(9000)), ProxySettings())
    rendering = ConfigRenderer(PATHS).update(plan, {})
    header, sections = haproxy_render.split_sections(rendering.text)
    assert header == rendering.header and list(sections.items()) == [
        (f"svc_{key.split('/')[0]}_tcp_web", text) for key, text in rendering.sections]
    assert header + "".join(sections.values()) + "\n" == rendering.text
    assert haproxy_render.split_sections(render(Plan((), ProxySettings()), PATHS, {}))[1] == {}

    def skeleton(*services):
        text = ConfigRenderer(PATHS).update(Plan(services, ProxySettings()), {}).text
        return haproxy_render.section_skeleton(haproxy_render.split_sections(text)[1]["svc_8080_tcp_web"])
    checked = {"protocol": "tcp"}
    base = skeleton(service(8080, [("10.0.0.1", 80, 1, None)], health_check=checked))
    # servers moved, re-weighted, limited: the same skeleton (runtime API changes)
    assert base == skeleton(service(8080, [("::1", 81, 256, 7), ("10.0.0.2", 80, 0, None)], health_check=checked))
    # what only a reload changes: a different skeleton
    assert base != skeleton(service(8080, [("10.0.0.1", 80, 1, None)], health_check={**checked, "interval_seconds": 2}))
    assert base != skeleton(service(8080, [("10.0.0.1", 80, 1, None)], health_check=checked, mode="http"))
    assert base != skeleton(service(8080, [("10.0.0.1", 80, 1, None)] * 1 + [(f"10.0.1.{i}", 80, 1, None)
                                                                           for i in range(20)], health_check=checked))
