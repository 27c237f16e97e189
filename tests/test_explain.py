"""`proxymatic explain` as a subprocess: against the real pipeline (services file -> HAProxy) by
port and by name, exit 1 when nothing matches, and against stand-in publishers for what the
file source cannot produce (app ids, excluded tasks, a service set aside, hostile text)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from services.applier import haproxy_launch
from services.common.config import Settings
from services.common.model import ApplyResult, Excluded, Plan, Server, Service
from sim.pipeline import Pipeline
from tests.helpers import TcpBackend, free_port, services_entry, tcp_ask, wait_until, write_services
from tests.launcher_helpers import processes_of
from tests.test_services_page import NODE, StandIn


def explain(run_dir: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "explain", *args, "--run-dir", run_dir,
                           "--node-name", NODE], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(not os.path.exists(haproxy_launch.haproxy_binary()), reason="haproxy is not installed")
def test_explain_against_the_real_pipeline():
    backends = [TcpBackend("b0"), TcpBackend("b1")]
    web, db = free_port(), free_port()
    pipeline = Pipeline(["--status-endpoint", "", "--node-name", NODE], services_file=True,
                        programs=("haproxy", "applier", "planner", "collector"))
    services = [services_entry("web", web, backends[0].port, backends[1].port), services_entry("db", db)]
    services[0]["servers"][1]["weight"] = 250
    write_services(pipeline.services_file, services)
    try:
        pipeline.start()
        try:
            wait_until(lambda: tcp_ask(web) in ("b0", "b1"), timeout=60, message="web served")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{pipeline.log_tails()}") from None

        by_port = explain(pipeline.run_dir, str(web))
        assert by_port.returncode == 0, by_port.stderr
        out = by_port.stdout
        assert f"{web}/tcp web (tcp, from file): served by haproxy on port {web}" in out
        assert "2 servers, 2 UP:" in out
        # the user's weights (HAProxy is told them on its 0..256 scale)
        assert f"127.0.0.1:{backends[0].port}  weight 500  UP" in out
        assert f"127.0.0.1:{backends[1].port}  weight 250  UP" in out
        assert f"node {NODE} applied plan" in out and "NOT ok" not in out and f"{db}/tcp" not in out

        by_name = explain(pipeline.run_dir, "db")
        assert by_name.returncode == 0, by_name.stderr
        assert f"{db}/tcp db (tcp, from file)" in by_name.stdout and "no servers" in by_name.stdout
        assert explain(pipeline.run_dir, f"{web}/tcp").stdout == out
        assert explain(pipeline.run_dir, f"{web}/udp").returncode == 1

        nothing = explain(pipeline.run_dir, "shop")
        assert nothing.returncode == 1 and nothing.stdout == ""
        assert ("nothing known as 'shop': no service port, name or app id matches; 2 services in the plan"
                in nothing.stderr)
    finally:
        run_dir = pipeline.run_dir
        pipeline.cleanup()
        for backend in backends:
            backend.close()
    wait_until(lambda: not processes_of(run_dir), timeout=20, message="every process of the pipeline gone")


def test_explain_names_excluded_tasks_set_aside_services_and_app_ids():
    run_dir = tempfile.mkdtemp(prefix="pmx")
    settings = Settings(run_dir=run_dir)
    planner = StandIn("planner@test", settings.bus("planner"))
    applier = StandIn(f"applier@{NODE}", settings.bus("applier"))
    plan = Plan(
        services=(Service("web.shop", 31000, source="marathon", mode="http",
                          servers=(Server("10.0.0.7", 31002, weight=128),)),
                  Service("cache", 6379, source="registrator", servers=(Server("10.0.0.9", 6379),))),
        sources_ready=("marathon", "registrator"),
        excluded=(
            Excluded("marathon", "health_failing", "health check failing (3 consecutive failures)",
                     app="/shop/web", task="shop_web.1a2b", service="web.shop", key="31000/tcp",
                     address="10.0.0.8:31002"),
            Excluded("marathon", "not_running", "task is TASK_STAGING", app="/shop/web", task="shop_web.9z",
                     service="web.shop", key="31000/tcp"),
            Excluded("marathon", "bad_data", "app has no port definitions \x1b[31mred\x1b[0m", app="/shop/cron"),
            Excluded("planner", "port_taken", "port 6379/tcp went to registrator's cache", app="cache-old",
                     service="cache-old", key="6379/tcp"),
        ))
    planner.publish_plan(plan)
    applier.publish(f"applied.{NODE}", ApplyResult(plan.hash, True, "reload", details={
        "haproxy": {"ok": True, "set_aside": {"6379/tcp": "port 6379 cannot be bound: in use"}}}).to_dict())
    try:
        by_app = explain(run_dir, "/shop/web")
        assert by_app.returncode == 0, by_app.stderr
        out = by_app.stdout
        assert "31000/tcp web.shop (http, from marathon): served by haproxy on port 31000" in out
        assert "10.0.0.7:31002  weight 128  unknown" in out
        assert "not served (2):" in out
        assert ("task shop_web.1a2b of /shop/web at 10.0.0.8:31002: health check failing (3 consecutive "
                "failures) [health_failing, from marathon]") in out
        assert "task shop_web.9z of /shop/web: task is TASK_STAGING [not_running, from marathon]" in out
        assert "HAProxy's server states could not be read" in out  # no HAProxy in this run dir
        assert explain(run_dir, "web.shop").stdout == out and explain(run_dir, "shop_web.9z").stdout == out

        aside = explain(run_dir, "6379")
        assert aside.returncode == 0, aside.stderr
        assert "SET ASIDE by haproxy: port 6379 cannot be bound: in use (not served on this node)" in aside.stdout
        assert "port 6379/tcp went to registrator's cache [port_taken, from planner]" in aside.stdout
        as_json = explain(run_dir, "6379/tcp", "--json")
        assert as_json.returncode == 0, as_json.stderr
        document = json.loads(as_json.stdout)
        assert [s["key"] for s in document["services"]] == ["6379/tcp"] and document["plan"] == plan.hash
        assert document["services"][0]["set_aside_reason"] == "port 6379 cannot be bound: in use"
        assert [e["code"] for e in document["services"][0]["excluded"]] == ["port_taken"]

        keyless = explain(run_dir, "/shop/cron")
        assert keyless.returncode == 0, keyless.stderr
        assert "not attributable to a port (1):" in keyless.stdout
        assert "/shop/cron: app has no port definitions \\x1b[31mred\\x1b[0m [bad_data" in keyless.stdout
        assert "\x1b" not in keyless.stdout

        nothing = explain(run_dir, "/shop/api")
        assert nothing.returncode == 1 and "2 services in the plan" in nothing.stderr
    finally:
        planner.close()
        applier.close()
    try:
        silent = explain(run_dir, "web", "--wait", "1")
        assert silent.returncode == 2
        assert "no plan heard within 1 s" in silent.stderr and "is the planner running?" in silent.stderr
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
