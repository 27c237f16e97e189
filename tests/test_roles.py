"""ROLE=all|central|node (docs/roles.md): what the launcher runs in each role, the options each
role accepts, and (for real, on loopback) a central feeding a node: traffic through the node,
the central stopped (the node keeps serving and says the planner is unreachable), the central
back with a changed services file (the node converges)."""
from __future__ import annotations

import argparse
import os
import signal

import pytest

from services.common.config import ConfigError, Settings, add_options, settings_from
from services.launcher import programs, render_supervisord_conf
from tests.helpers import free_port, services_entry, tcp_ask, wait_until
from tests.launcher_helpers import Run, http_get, port_free


def settings(*argv: str, **environ: str) -> Settings:
    parser = argparse.ArgumentParser()
    add_options(parser)
    return settings_from(parser.parse_args(list(argv)), environ)


def names(s: Settings) -> list[str]:
    return [program.name for program in programs(s)]


def test_all_runs_every_stage_and_the_proxies():
    assert names(settings()) == ["haproxy", "pen", "collector", "planner", "applier", "status"]
    assert names(settings("--vhost-domain", "x.test", "--no-haproxy")) == \
        ["pen", "nginx", "collector", "planner", "applier", "status"]


def test_central_runs_no_proxy_and_no_applier():
    assert names(settings("--role", "central", "--vhost-domain", "x.test")) == ["collector", "planner", "status"]


def test_node_runs_the_proxies_the_applier_and_status():
    node = settings("--role", "node", "--planner-bus", "tcp://10.0.0.1:7100", "--vhost-domain", "x.test")
    assert names(node) == ["haproxy", "pen", "nginx", "applier", "status"]
    assert names(settings("--no-haproxy", ROLE="node", PLANNER_BUS="tcp://c:7100")) == ["pen", "applier", "status"]


@pytest.mark.parametrize("role", ["all", "central", "node"])
def test_each_role_keeps_the_lifecycle_rules(role):
    """Proxies start first and stop last (soft-stop signals), publishers before subscribers."""
    s = settings("--role", role, "--planner-bus", "tcp://127.0.0.1:7100")
    listed = programs(s)
    priorities = [program.priority for program in listed]
    assert priorities == sorted(priorities)
    by_name = {program.name: program for program in listed}
    if "haproxy" in by_name:
        assert (by_name["haproxy"].stopsignal, by_name["haproxy"].stopwaitsecs) == ("USR1", 35)
    conf = render_supervisord_conf(s)
    assert [line for line in conf.splitlines() if line.startswith("[program:")] == \
        [f"[program:{name}]" for name in by_name]
    assert conf.count("stopasgroup=true") == len(listed) and conf.count("autorestart=true") == len(listed)


def test_the_template_comes_with_the_package():
    from importlib import resources
    assert resources.files("services").joinpath("templates", "supervisord.conf.j2").is_file()


def test_planner_bus_lists_and_roles():
    node = settings("--role", "node", "--planner-bus", "tcp://c1:7100, tcp://c2:7100")
    assert node.planner_bus == "tcp://c1:7100,tcp://c2:7100"
    assert [e.pub for e in node.buses("planner")] == ["tcp://c1:7100", "tcp://c2:7100"]
    assert [e.snapshot for e in node.buses("planner")] == ["tcp://c1:7101", "tcp://c2:7101"]
    with pytest.raises(ConfigError, match="binds one"):
        node.bus("planner")
    one = settings("--planner-bus", "tcp://0.0.0.0:7100")
    assert one.buses("planner") == (one.bus("planner"),)
    assert settings("--run-dir", "/r").buses("applier")[0].pub == "ipc:///r/bus/applier.pub"
    for argv, message in ((["--planner-bus", "tcp://c1:7100,tcp://c2:7100"], "only ROLE=node"),
                          (["--role", "central", "--planner-bus", "tcp://c1:7100,tcp://c2:7100"], "only ROLE=node"),
                          (["--role", "node"], "PLANNER_BUS must name"),
                          (["--role", "node", "--planner-bus", "tcp://c1:7100,tcp://c1:7100"], "twice"),
                          (["--role", "node", "--planner-bus", "tcp://c1:7100,bogus"], "--planner-bus"),
                          (["--collector-bus", "tcp://a:7000,tcp://b:7000"], "COLLECTOR_BUS")):
        with pytest.raises(ConfigError, match=message):
            settings(*argv)


# -- for real: a central feeding a node on loopback ---------------------------------------------

def free_pair() -> int:
    """A port whose next port is free too (a tcp bus endpoint is a port and port+1)."""
    for _ in range(50):
        port = free_port()
        if port < 65000 and port_free(port + 1):
            return port
    raise AssertionError("no free pair of ports")


def test_a_central_feeds_a_node_which_outlives_it_and_converges_when_it_returns(backends):
    a, b = backends
    bus = f"tcp://127.0.0.1:{free_pair()}"
    central = Run(role="central", planner_bus=bus)
    node = Run(role="node", planner_bus=bus)
    try:
        web, api = free_port(), free_port()
        central.write([services_entry("web", web, a)])
        first = central.start()
        node.start()
        node.wait_ok()
        wait_until(lambda: tcp_ask(web) == "a", timeout=30, message="traffic through the node's HAProxy")
        assert names_running(central) == {"collector", "planner", "status"}
        assert names_running(node) == {"haproxy", "pen", "applier", "status"}
        central.wait_ok()
        details = central.details()
        assert details["role"] == "central" and details["applied"] is None and details["proxies"] == {}
        details = node.details()
        assert details["role"] == "node" and details["planner_reachable"] and details["warnings"] == []
        assert set(details["planners"]) == {f"planner@{node_name()}"}

        # The central goes: the node keeps serving and says its planner is unreachable.
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)
        wait_until(lambda: not central.processes(), timeout=15, message="the central's processes gone")
        details = wait_until(lambda: (d := node.details())["warnings"] and d, timeout=15,
                             message="/status/details saying the planner is unreachable")
        assert details["status"] == "OK" and not details["planner_reachable"]
        assert details["warnings"][0].startswith("planner unreachable:") and details["plan"]["age_seconds"] >= 0
        assert node.status()[0] == 200 and tcp_ask(web) == "a"
        metrics = http_get(node.url("/metrics"))[1]
        assert "proxymatic_planner_last_heard_seconds{planner=" in metrics and "proxymatic_plan_age_seconds " in metrics

        # Changed while the central was down; it comes back (a new epoch): the node converges.
        central.write([services_entry("web", web, b), services_entry("api", api, a)])
        central.start()
        wait_until(lambda: tcp_ask(api) == "a", timeout=60, message="the new service through the node")
        wait_until(lambda: tcp_ask(web) == "b", timeout=30, message="the changed service through the node")
        wait_until(lambda: node.details()["planner_reachable"] and not node.details()["warnings"], timeout=15,
                   message="the planner reachable again")
        assert node.status()[0] == 200
    finally:
        node.close()
        central.close()
    assert not node.processes() and not central.processes()


def node_name() -> str:
    return os.uname().nodename


def names_running(run: Run) -> set[str]:
    """The programs supervisord runs for this run (supervisorctl status)."""
    return {line.split()[0] for line in run.supervisorctl("status").splitlines() if "RUNNING" in line}
