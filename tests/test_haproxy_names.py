"""HAProxy's section names carry the service's name (`svc_<port>_<protocol>_<name>`), so its
statistics are readable at a glance; everything that parses them back agrees (a real HAProxy)."""
from __future__ import annotations

import csv
import io
import os

import pytest

from services.applier import haproxy_driver, haproxy_launch, haproxy_render
from services.applier.haproxy_driver import HaproxyDriver
from services.applier.haproxy_render import backend_id, key_of_backend, name_part
from services.applier.haproxy_runtime import parse_listener_ports
from services.common.model import Service
from services.common.unix_socket import exchange
from tests.helpers import free_port
from tests.test_haproxy_driver import (  # noqa: F401  (haproxy, backends: fixtures)
    assert_serving, backends, haproxy, make_plan)

pytestmark = pytest.mark.skipif(not os.path.exists(haproxy_launch.haproxy_binary()), reason="haproxy is not installed")


def named(name: str, port: int, backends) -> Service:
    return Service.from_dict({"name": name, "port": port, "servers": [
        {"ip": "127.0.0.1", "port": b.port, "weight": 10} for b in backends]})


def show_stat(haproxy) -> list[dict]:
    """`show stat` on the admin socket, one dict per CSV row."""
    text = exchange(haproxy.paths.admin_socket, b"show stat\n", timeout=5).decode()
    lines = text.strip().splitlines()
    assert lines and lines[0].startswith("# "), text[:200]
    return list(csv.DictReader(io.StringIO("\n".join([lines[0][2:], *lines[1:]]))))


def proxies(haproxy) -> set[str]:
    return {row["pxname"] for row in show_stat(haproxy) if row["pxname"] != "stats"}


def test_names_are_reduced_lowercase_and_bounded():
    assert backend_id(Service(name="shop.web", port=1234)) == "svc_1234_tcp_shop.web"
    assert backend_id(Service(name="Shop.Web-V2", port=53, protocol="udp")) == "svc_53_udp_shop.web-v2"
    long = "a" * 100 + ".b"
    assert backend_id(Service(name=long, port=1)) == "svc_1_tcp_" + "a" * 60
    # built bypassing the model's validation: nothing but [a-z0-9_.-] reaches the config
    assert name_part("x\n    bind :22#'\"") == "x_bind_22_"
    assert backend_id(Service(name="", port=7)) == "svc_7_tcp"
    for bid in ("svc_1234_tcp_shop.web", "svc_1234_tcp", "svc_1_tcp_" + "a" * 60):
        assert key_of_backend(bid) == bid.split("_")[1] + "/tcp"
    assert key_of_backend("stats") is None and key_of_backend("svc_1_tcp_" + "a" * 61) is None
    csv_text = "# pxname,svname,x\nsvc_81_tcp_shop.web,FRONTEND,\nsvc_82_tcp,FRONTEND,\nstats,FRONTEND,\n"
    assert parse_listener_ports(csv_text) == {81, 82}


def test_statistics_show_the_service_name_and_a_rename_converges(haproxy, backends):
    port, other = free_port(), free_port()
    driver = HaproxyDriver(haproxy.settings)
    result = driver.apply(make_plan(named("shop.web", port, backends[:1]), named("Cart", other, backends[1:2])))
    assert result.ok and result.action == "reload", result
    rows = show_stat(haproxy)
    assert {(r["pxname"], r["svname"]) for r in rows} >= {
        (f"svc_{port}_tcp_shop.web", "FRONTEND"), (f"svc_{port}_tcp_shop.web", "BACKEND"),
        (f"svc_{port}_tcp_shop.web", "s0"), (f"svc_{other}_tcp_cart", "FRONTEND")}
    assert_serving(port, {"b0"})

    # Membership changes stay runtime changes under the named backend.
    result = driver.apply(make_plan(named("shop.web", port, backends[:2]), named("Cart", other, backends[1:2])))
    assert result.ok and result.action == "runtime", result
    assert_serving(port, {"b0", "b1"})

    # Renamed on the same port: a reload under the new name, the old one is gone, traffic goes on.
    reloads = haproxy.proc().reloads
    result = driver.apply(make_plan(named("shop.web-v2", port, backends[2:3]), named("Cart", other, backends[1:2])))
    assert result.ok and result.action == "reload" and not result.set_aside, result
    assert proxies(haproxy) == {f"svc_{port}_tcp_shop.web-v2", f"svc_{other}_tcp_cart"}
    assert haproxy.proc().reloads == reloads + 1
    assert_serving(port, {"b2"})

    # A restarted applier adopts the named backends without a reload.
    again = HaproxyDriver(haproxy.settings).apply(
        make_plan(named("shop.web-v2", port, backends[2:3]), named("Cart", other, backends[1:2])))
    assert again.ok and again.action == "none", again
    assert haproxy.proc().reloads == reloads + 1


@pytest.mark.parametrize("layout_kept", [True, False])
def test_a_haproxy_running_a_config_without_names_is_taken_over(haproxy, backends, monkeypatch, layout_kept):
    """An older version's config (svc_<port>_tcp) running: the ports it holds are known as held
    (from slots.json, or from `show stat` without it), so the reload to named sections sets
    nothing aside."""
    port = free_port()
    plan = make_plan(named("web", port, backends[:1]))
    with monkeypatch.context() as patch:
        def unnamed(service):
            return f"svc_{service.port}_tcp"
        patch.setattr(haproxy_render, "backend_id", unnamed)
        patch.setattr(haproxy_driver, "backend_id", unnamed)
        assert HaproxyDriver(haproxy.settings).apply(plan).ok
    assert proxies(haproxy) == {f"svc_{port}_tcp"}
    if not layout_kept:
        os.unlink(haproxy.paths.state)

    result = HaproxyDriver(haproxy.settings).apply(make_plan(named("web", port, backends[:2])))
    assert result.ok and result.action == "reload" and not result.set_aside, result
    assert proxies(haproxy) == {f"svc_{port}_tcp_web"}
    assert_serving(port, {"b0", "b1"})
