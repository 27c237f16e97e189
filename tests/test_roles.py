"""ROLE=all|central|node (docs/roles.md): what the launcher runs in each role, the options each
role accepts, and (for real, on loopback) a central feeding a node: traffic through the node,
the central stopped (the node keeps serving and says the planner is unreachable), the central
back with a changed services file (the node converges)."""
from __future__ import annotations

import argparse

import pytest

from services.common.config import ConfigError, Settings, add_options, settings_from
from services.launcher import programs, render_supervisord_conf


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
