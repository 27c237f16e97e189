"""The pure Marathon rules: fixtures in, services out (no sockets)."""
from __future__ import annotations

import glob
import json
import os

import pytest

from services.collector.marathon.apps import network_mode, parse_app, service_name
from services.collector.marathon.builder import build_services
from services.collector.marathon.client import SSEParser
from services.collector.marathon.mirror import build_from_payloads
from services.common.model import HealthCheck, Service

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "marathon")
PREFIX = "com.meltwater.proxymatic.port.0."


def resolve(host: str) -> str | None:
    return {"localhost": "127.0.0.1", "agent-1": "10.0.0.1", "agent-2": "10.0.0.2"}.get(host, host if host[0].isdigit() else None)


def load(path: str):
    with open(path) as handle:
        return json.load(handle)


def apps_of(document) -> list:
    if isinstance(document, dict) and "apps" in document:
        return document["apps"]
    if isinstance(document, dict) and "app" in document:
        return [document["app"]]
    return [document]


def proxymatic_case(case: str, tasks_file: str) -> tuple[Service, ...]:
    versions = {}
    for path in glob.glob(f"{FIXTURES}/apps/proxymatic/{case}/*.json"):
        app = load(path)
        versions[(app["id"], app["version"])] = app
    result = build_from_payloads([], load(f"{FIXTURES}/tasks/proxymatic/{case}/{tasks_file}")["tasks"],
                                    versions, resolve)
    assert result.warnings == ()
    return result.services


# --- every fixture -------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(glob.glob(f"{FIXTURES}/apps/**/*.json", recursive=True)),
                         ids=os.path.basename)
def test_every_app_fixture_parses(path):
    document = load(path)
    for app in apps_of(document):
        spec = parse_app(app)
        assert spec.app_id.startswith("/")
    result = build_from_payloads(apps_of(document), resolve=resolve)
    for service in result.services:
        assert Service.from_dict(service.to_dict()) == service  # valid per the model


@pytest.mark.parametrize("path", sorted(glob.glob(f"{FIXTURES}/tasks/**/*.json", recursive=True)),
                         ids=os.path.basename)
def test_every_task_fixture_parses(path):
    tasks = load(path)["tasks"]
    apps = {}
    for task in tasks:  # a host-networking definition for each app, port numbers from the task
        app_id = task.get("appId", "/unknown")
        apps[app_id] = {"id": app_id, "version": task.get("version"),
                        "portDefinitions": [{"port": 20000 + i} for i in range(len(task.get("ports", [])))]}
    result = build_from_payloads(apps.values(), tasks, resolve=resolve)
    assert isinstance(result.services, tuple)


def test_fixture_expectations():
    # marathon-lb's 1.4 blue/green: tasks embedded without servicePorts, versions since the last config change
    result = build_from_payloads(apps_of(load(f"{FIXTURES}/apps/marathon-lb-zdd_apps.json")), resolve=resolve)
    by_key = {s.key: s for s in result.services}
    assert by_key["10000/tcp"].name == "nginx-green"
    assert len(by_key["10000/tcp"].servers) == 3
    # openwhisk: TASK_LOST tasks failing their checks are out, the 3 alive ones in
    apps = [{"id": "/myapp", "version": "2017-11-11T01:11:56.467Z", "portDefinitions": [{"port": 10000}],
             "healthChecks": [{"protocol": "HTTP"}]}]
    result = build_from_payloads(apps, load(f"{FIXTURES}/tasks/openwhisk-app-tasks-mixed-health.json")["tasks"],
                                    resolve=resolve)
    assert sorted(s.port for s in result.services[0].servers) == [11089, 11170, 11199]
    # marathon-consul: one task has no results yet although checks are defined: left out
    result = build_from_payloads(apps_of(load(f"{FIXTURES}/apps/marathon-consul-apps.json")), resolve=resolve)
    assert [s.address for s in result.services[0].servers] == ["192.168.2.114:31315"]
    # 1.5 container/bridge with a fixed host port
    result = build_from_payloads(apps_of(load(f"{FIXTURES}/apps/gestalt-dcos-marathon-app-response.json")),
                                    resolve=resolve)
    assert [(s.key, [x.address for x in s.servers]) for s in result.services] == [("10127/tcp", ["67.207.85.232:5432"])]


@pytest.mark.parametrize("name,expected", [
    ("bridge-net-old", "bridge"), ("bridge-net-new", "bridge"), ("host-net-old", "host"), ("host-net-new", "host"),
    ("user-net-old", "container"), ("user-net-new", "container"), ("user-net-multi", "container")])
def test_network_shapes(name, expected):
    assert network_mode(load(f"{FIXTURES}/apps/network-api-migration/{name}.json")) == expected


# --- the proxymatic fixtures (the original's own tests) -------------------------------------

def test_canary():
    (service,) = proxymatic_case("testCanary", "_v2_tasks.json")
    assert (service.name, service.key, service.mode) == ("webapp.demo", "1234/tcp", "http")
    assert [(s.address, s.weight) for s in service.servers] == [("127.0.0.1:31468", 500), ("127.0.0.1:31469", 100)]
    # both versions define the same HTTP check on port 0: HAProxy checks it too
    assert service.health_check == STATUS_CHECK and not service.host_network


STATUS_CHECK = HealthCheck(protocol="http", path="/_status", interval_seconds=15, timeout_seconds=5, fall=3)


def test_load_balancer_options():
    (service,) = proxymatic_case("testLoadBalancerOptions", "_v2_tasks.json")
    assert (service.name, service.key, service.mode) == ("webapp.demo", "1234/tcp", "http")
    assert service.health_check == STATUS_CHECK
    assert [(s.address, s.weight, s.maxconn) for s in service.servers] == [
        ("127.0.0.1:31468", 100, 150), ("127.0.0.1:31469", 500, None)]
    assert (service.timeout_client, service.timeout_server) == (100, 200)  # JSON numbers accepted


def test_refresh():
    (first,) = proxymatic_case("testRefresh", "_v2_tasks_0.json")
    assert [s.address for s in first.servers] == ["127.0.0.1:31478"] and first.mode == "tcp"
    assert first.health_check == STATUS_CHECK  # an HTTP check in a tcp-mode service: option httpchk
    (second,) = proxymatic_case("testRefresh", "_v2_tasks_1.json")
    assert [s.address for s in second.servers] == ["127.0.0.1:31478", "127.0.0.1:31479"]


# --- the rules ------------------------------------------------------------------------------

def host_app(app_id="/product/system/service", ports=(1234,), labels=None, checks=0, **extra):
    return {"id": app_id, "version": "v1", "networks": [{"mode": "host"}], "labels": labels or {},
            "portDefinitions": [{"port": p, "protocol": "tcp"} for p in ports],
            "healthChecks": [{"protocol": "HTTP", "path": "/"}] * checks, **extra}


def task(task_id="t1", host="agent-1", ports=(31000,), **extra):
    return {"id": task_id, "host": host, "ports": list(ports), "version": "v1", **extra}


def build(app, tasks, served=frozenset()):
    spec = parse_app(app)
    return build_services([(t, spec) for t in tasks], resolve, served)


def test_name_is_reversed_app_id_and_sanitised():
    assert service_name("/product/system/service") == ("service.system.product", None)
    name, warning = service_name("/bad name/with\nnewline")
    assert name == "with-newline.bad-name" and "sanitised" in warning
    assert service_name("/###/!!!")[0] is None


def test_states_and_health():
    app = host_app(checks=1)
    tasks = [task("ok", healthCheckResults=[{"alive": True}]),
             task("killing", ports=(31001,), state="TASK_KILLING", healthCheckResults=[{"alive": True}]),
             task("failing", ports=(31002,), healthCheckResults=[{"alive": True}, {"alive": False}]),
             task("unanswered", ports=(31003,)),
             task("staging", ports=(31004,), state="TASK_STAGING", healthCheckResults=[{"alive": True}])]
    result = build(app, tasks)
    assert [s.port for s in result.services[0].servers] == [31000]
    assert result.served == {"ok"}
    # after a leader election results are missing: a task already served stays, a new one does not
    result = build(app, [task("ok"), task("new", ports=(31005,))], served=frozenset({"ok"}))
    assert [s.port for s in result.services[0].servers] == [31000]


def test_service_port_zero_duplicates_and_override():
    app = {"id": "/dns", "version": "v1", "networks": [{"mode": "container/bridge"}],
           "container": {"portMappings": [{"containerPort": 53, "servicePort": 5353, "protocol": "udp"},
                                          {"containerPort": 53, "servicePort": 5353, "protocol": "tcp"},
                                          {"containerPort": 80, "servicePort": 0, "protocol": "tcp"},
                                          {"containerPort": 81, "servicePort": 9000, "protocol": "udp"}]},
           "labels": {"com.meltwater.proxymatic.port.3.servicePort": "9001"}}
    result = build(app, [task(ports=(31000, 31001, 31002, 31003))])
    assert [(s.key, [x.port for x in s.servers]) for s in result.services] == [
        ("5353/tcp", [31001]), ("9001/udp", [31003])]


def test_labels_strings_numbers_and_invalid_values():
    labels = {PREFIX + "weight": 250, PREFIX + "maxconn": "10", PREFIX + "mode": "HTTP",
              PREFIX + "timeout.client": "30", PREFIX + "timeout.server": 99999999}
    result = build(host_app(labels=labels), [task()])
    (service,) = result.services
    assert (service.servers[0].weight, service.servers[0].maxconn, service.mode) == (250, 10, "http")
    assert service.timeout_client == 30 and service.timeout_server is None
    assert any("/product/system/service" in w and "timeout.server" in w for w in result.warnings)


@pytest.mark.parametrize("value", ["1\n2", " 5 0", "10" * 40, -3, 70000, 0, True, None, {"a": 1}, [1], "0x10", 1.5])
def test_hostile_label_values_are_ignored_with_a_warning(value):
    labels = {PREFIX + "weight": value, PREFIX + "servicePort": value, PREFIX + "mode": value,
              PREFIX + "maxconn": value}
    result = build(host_app(labels=labels), [task()])
    (service,) = result.services
    assert service.port == 1234 and service.servers[0].weight == 500 and service.mode == "tcp"
    assert result.warnings and all("\n" not in w for w in result.warnings)
    assert any("weight" in w for w in result.warnings)


def test_unresolvable_host_skips_only_that_task():
    result = build(host_app(), [task("a"), task("b", host="nowhere.invalid", ports=(31001,))])
    assert [s.port for s in result.services[0].servers] == [31000]
    assert any("nowhere.invalid" in w and "does not resolve" in w for w in result.warnings)


def test_expose_host_detection():
    result = build(host_app(ports=(1234,)), [task(ports=(1234,))])
    assert result.services[0].host_network is True
    result = build(host_app(ports=(1234,)), [task(ports=(31000,))])
    assert result.services[0].host_network is False


def test_container_networking_uses_task_ip_and_container_port():
    app = load(f"{FIXTURES}/apps/network-api-migration/user-net-new.json")
    app["container"]["portMappings"][0]["servicePort"] = 10080
    result = build(app, [task(ports=(), ipAddresses=[{"ipAddress": "9.0.0.7", "protocol": "IPv4"}])])
    assert [s.address for s in result.services[0].servers] == ["9.0.0.7:80"]
    # no address: skipped with a warning
    result = build(app, [task(ports=())])
    assert result.services == () and "no container address" in result.warnings[0]


def test_bridge_task_without_host_ports_is_skipped_with_warning():
    app = load(f"{FIXTURES}/apps/network-api-migration/bridge-net-old.json")
    app["container"]["docker"]["portMappings"][0]["servicePort"] = 10080
    result = build(app, [task(ports=())])
    assert result.services == () and "no host port" in result.warnings[0]


def test_bad_app_or_task_is_skipped_alone():
    good = host_app("/good", ports=(1000,))
    bad_apps = [42, {"id": None}, {"id": "/x", "portDefinitions": "nope", "labels": [1]}, {"id": "/y", "ports": [True]}]
    tasks = [dict(task(), appId="/good"), "garbage", {"id": "t9", "appId": "/good", "version": "v1", "host": None},
             dict(task("t2", ports=("x",)), appId="/good")]
    result = build_from_payloads([good, *bad_apps], tasks, resolve=resolve)
    assert [(s.key, len(s.servers)) for s in result.services] == [("1000/tcp", 1)]
    assert len(result.warnings) >= 3


def test_canary_conflicting_modes_are_reported():
    one = host_app("/web", ports=(1234,), labels={PREFIX + "mode": "http"})
    two = host_app("/web-canary", ports=(9999,), labels={PREFIX + "mode": "tcp", PREFIX + "servicePort": "1234",
                                                         PREFIX + "weight": "10"})
    pairs = [(task("a"), parse_app(one)), (task("b", ports=(31001,)), parse_app(two))]
    result = build_services(pairs, resolve)
    (service,) = result.services
    assert (service.name, service.mode) == ("web", "http")
    assert sorted(s.weight for s in service.servers) == [10, 500]
    assert any("disagree on mode" in w for w in result.warnings)


# --- health checks: Marathon's definition, also run by the proxy ---------------------------

def http_check(path="/", interval=60, timeout=20, fall=3):
    return HealthCheck(protocol="http", path=path, interval_seconds=interval, timeout_seconds=timeout, fall=fall)


def tcp_check(interval=60, timeout=20, fall=3):
    return HealthCheck(protocol="tcp", interval_seconds=interval, timeout_seconds=timeout, fall=fall)


@pytest.mark.parametrize("fixture,app_id,expected", [
    # 1.4 BRIDGE, HTTP on portIndex 0 (the Marathon docs' app)
    ("marathon-docs-app.json", "/foo", [http_check("/", 20, 20, 3)]),
    ("marathon-docs-v1.4.13-app.json", "/foo", [http_check("/", 20, 20, 3)]),
    # timeout 15 > interval 3: at most the interval
    ("marathon-lb-zdd_apps.json", "/nginx-green", [http_check("/", 3, 3, 10)]),
    # 1.5 container/bridge, MESOS_HTTP: HAProxy speaks plain HTTP to the same port
    ("marathon-lb-zdd_app_blue_marathon1.5.json", "/nginx-green", [http_check("/", 3, 3, 10)]),
    # TCP checks
    ("gestalt-dcos-marathon-app-response.json", "/gestalt-framework/data-0", [tcp_check(30, 15, 4)]),
    ("gestalt-dcos-marathon14-app-response.json", "/gestalt-framework-tasks/data-0", [tcp_check(30, 15, 4)]),
    # BRIDGE with a UDP second port: no check there (and no portIndex 1 check anyway)
    ("marathon-consul-apps.json", "/bridged-webapp", [http_check("/", 20, 20, 3), None]),
    # HOST, legacy ports: portIndex 0 -> port 0; `port: 8123` matches no declared port
    ("marathon-consul-app.json", "/myapp", [http_check("/", 5, 5, 3), None, None, None]),
    ("marathon-docs-app_list.json", "/myapp", [None, None]),  # healthChecks: []
])
def test_fixture_health_checks(fixture, app_id, expected):
    (app,) = [a for a in apps_of(load(f"{FIXTURES}/apps/{fixture}")) if a["id"] == app_id]
    spec = parse_app(app)
    assert [route.health_check for route in spec.routes] == expected
    assert spec.warnings == ()


def test_fixture_health_check_reaches_the_service():
    result = build_from_payloads(apps_of(load(f"{FIXTURES}/apps/marathon-lb-zdd_apps.json")), resolve=resolve)
    by_key = {s.key: s for s in result.services}
    assert by_key["10000/tcp"].health_check == http_check("/", 3, 3, 10)
    for service in result.services:
        assert Service.from_dict(service.to_dict()) == service


def checked_app(*checks, ports=(1234, 1235), **extra):
    return host_app(ports=ports, healthChecks=list(checks), **extra)


def route_checks(app):
    return [route.health_check for route in parse_app(app).routes]


def test_health_check_fields_are_clamped_and_defaulted():
    assert route_checks(checked_app({"protocol": "HTTP", "path": "/health"})) == [http_check("/health"), None]
    assert route_checks(checked_app({"protocol": "HTTP", "path": "/h", "intervalSeconds": 0, "timeoutSeconds": 0,
                                     "maxConsecutiveFailures": 0})) == [http_check("/h", 1, 1, 3), None]
    assert route_checks(checked_app({"path": "/h", "intervalSeconds": 99999, "timeoutSeconds": 5000,
                                     "maxConsecutiveFailures": 1000})) == [http_check("/h", 3600, 3600, 100), None]
    # Marathon's default protocol is HTTP; a missing or empty path is /
    assert route_checks(checked_app({"portIndex": 1}, {"protocol": "TCP", "path": ""})) == [tcp_check(), http_check()]
    # not integers (Marathon never sends these): the defaults, with a warning
    spec = parse_app(checked_app({"protocol": "HTTP", "intervalSeconds": "10", "timeoutSeconds": True,
                                  "maxConsecutiveFailures": 2.0}))
    assert spec.routes[0].health_check == http_check("/", 60, 20, 2)
    assert len(spec.warnings) == 2 and all("health check" in w for w in spec.warnings)


@pytest.mark.parametrize("check", [
    {"protocol": "COMMAND", "command": {"value": "curl -f localhost"}},
    {"protocol": "HTTPS", "path": "/"}, {"protocol": "MESOS_HTTPS", "path": "/"},
    {"protocol": "bogus"}, {"protocol": 7}, {"protocol": "HTTP", "portIndex": 5},
    {"protocol": "HTTP", "portIndex": "0"}, {"protocol": "HTTP", "port": 31000}, "garbage"])
def test_checks_the_proxy_cannot_run_give_none(check):
    app = checked_app(check)
    assert route_checks(app) == [None, None]
    result = build(app, [task(ports=(31000, 31001), healthCheckResults=[{"alive": True}])])
    assert [s.health_check for s in result.services] == [None, None]  # Marathon's results alone


def test_check_port_selects_the_exposed_port():
    # HOST: `port` is the declared (required) port
    assert route_checks(checked_app({"protocol": "TCP", "port": 1235})) == [None, tcp_check()]
    # HTTP wins over TCP on one port, whatever the order; otherwise the first listed
    assert route_checks(checked_app({"protocol": "TCP"}, {"path": "/a"}, {"path": "/b"})) == [http_check("/a"), None]
    bridge = {"id": "/b", "version": "v1", "networks": [{"mode": "container/bridge"}],
              "container": {"portMappings": [{"containerPort": 80, "hostPort": 8080, "servicePort": 10000},
                                             {"containerPort": 81, "hostPort": 0, "servicePort": 10001}]}}
    # BRIDGE: Marathon's HTTP/TCP checks reach the host port, MESOS_* ones the container port
    assert route_checks({**bridge, "healthChecks": [{"protocol": "HTTP", "port": 8080}]}) == [http_check(), None]
    assert route_checks({**bridge, "healthChecks": [{"protocol": "HTTP", "port": 80}]}) == [None, None]
    assert route_checks({**bridge, "healthChecks": [{"protocol": "MESOS_HTTP", "port": 81}]}) == [None, http_check()]
    assert route_checks({**bridge, "healthChecks": [{"protocol": "MESOS_TCP", "portIndex": 1}]}) == [None, tcp_check()]
    # USER networks: the container port
    user = {**bridge, "networks": [{"mode": "container", "name": "dcos"}]}
    assert route_checks({**user, "healthChecks": [{"protocol": "MESOS_HTTP", "port": 81, "path": "/x"}]}) == [
        None, http_check("/x")]
    # a UDP port is never checked by the proxy
    udp = host_app(healthChecks=[{"protocol": "TCP"}])
    udp["portDefinitions"][0]["protocol"] = "udp"
    assert route_checks(udp) == [None]


@pytest.mark.parametrize("path", ["/a b", '/x"y', "/a\nb", "/a\rHost: evil", "health", "/<script>", 42, ["/"],
                                  "/" + "a" * 2000, "/a#frag", "/a\\b", "/é"])
def test_hostile_health_check_path_never_reaches_the_service(path):
    app = checked_app({"protocol": "HTTP", "path": path}, {"protocol": "TCP", "portIndex": 1},
                      labels={PREFIX + "mode": "http"})
    spec = parse_app(app)
    assert [route.health_check for route in spec.routes] == [None, None]  # the whole app: none
    result = build(app, [task(ports=(31000, 31001), healthCheckResults=[{"alive": True}])])
    assert [s.health_check for s in result.services] == [None, None]
    assert len(result.services[0].servers) == 1  # still served by Marathon's verdict
    (warning,) = [w for w in result.warnings if "health check path" in w]
    assert "/product/system/service" in warning and repr(path)[:20] in warning
    assert "\n" not in warning and "\r" not in warning and len(warning) < 300


def test_canary_health_checks():
    def two(web_checks, canary_checks, canary_id="/web-canary"):
        one = host_app("/web", ports=(1234,), healthChecks=web_checks)
        other = host_app(canary_id, ports=(9999,), labels={PREFIX + "servicePort": "1234"}, healthChecks=canary_checks)
        alive = [{"alive": True}]
        pairs = [(task("a", healthCheckResults=alive), parse_app(one)),
                 (task("b", ports=(31001,), healthCheckResults=alive), parse_app(other))]
        result = build_services(pairs, resolve)
        (service,) = result.services
        assert len(service.servers) == 2
        return service.health_check, [w for w in result.warnings if "health check" in w]

    # the same check: used, silently
    assert two([{"path": "/h"}], [{"path": "/h"}]) == (http_check("/h"), [])
    # different checks: the lowest app id's, reported (whichever app owns the port)
    check, (warning,) = two([{"path": "/h"}], [{"path": "/other"}])
    assert check == http_check("/h") and "disagree" in warning and "/web-canary" in warning
    check, (warning,) = two([{"path": "/h"}], [{"path": "/other"}], canary_id="/a-canary")
    assert check == http_check("/other") and "from '/a-canary'" in warning
    check, _ = two([{"path": "/h"}], [{"protocol": "TCP"}])
    assert check == http_check("/h")
    # one app without a check for the port (none, COMMAND...): no proxy check at all, reported
    check, (warning,) = two([{"path": "/h"}], [])
    assert check is None and "/web-canary" in warning
    assert two([{"protocol": "COMMAND"}], [{"path": "/h"}])[0] is None
    assert two([], []) == (None, [])


def test_versions_of_one_app_with_different_checks():
    old = host_app("/web", ports=(1234,), healthChecks=[{"path": "/old"}])
    new = {**host_app("/web", ports=(1234,), healthChecks=[{"path": "/new"}]), "version": "v2"}
    alive = [{"alive": True}]
    pairs = [(task("a", healthCheckResults=alive), parse_app(old)),
             (task("b", ports=(31001,), version="v2", healthCheckResults=alive), parse_app(new))]
    result = build_services(pairs, resolve)
    assert result.services[0].health_check == http_check("/new")  # the newest version of the lowest id
    assert any("disagree on health check" in w for w in result.warnings)


# --- SSE framing ----------------------------------------------------------------------------

def parse_stream(path: str) -> list[tuple[str, bytes]]:
    events: list[tuple[str, bytes]] = []
    parser = SSEParser(lambda t, d: events.append((t, d)))
    with open(path, "rb") as handle:
        for line in handle.read().split(b"\n"):
            parser.line(line.rstrip(b"\r"))
    parser.line(b"")
    return events


def test_sse_framings():
    events = parse_stream(f"{FIXTURES}/events/sse/marathon-docs-events.txt")
    assert [t for t, _ in events] == ["status_update_event", "status_update_event"]  # attached: ignored
    events = parse_stream(f"{FIXTURES}/events/sse/gestalt-dcos-marathon-event-stream.txt")
    types = [t for t, _ in events]
    assert "event_stream_attached" not in types and "group_change_success" not in types
    assert types.count("status_update_event") == 3 and "api_post_event" in types
    # data-only framing: the type comes from the JSON
    seen: list[str] = []
    parser = SSEParser(lambda t, d: seen.append(t))
    for line in [b'data: {"eventType":"status_update_event","taskId":"x"}', b"", b": keepalive", b"",
                 b'data: {"groupId":"/","eventType":"group_change_success"}', b""]:
        parser.line(line)
    assert seen == ["status_update_event"] and parser.events_ignored == 1
