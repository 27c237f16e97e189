"""Hypothesis strategies for hostile discovery input and for valid-but-hostile plans.

Two ways to get hostile data: generate payloads of the right shape with values of any type
(`marathon_app`, `marathon_task`, `marathon_event`, `etcd_entry`, `services_document`), and
take a real upstream payload from tests/fixtures and `mutate` it (replace or delete a few values
anywhere in the tree). `valid_service` builds services through `Service.from_dict` only, with
the nastiest values the model accepts (names full of `.`/`_`/`-`, path characters such as
`;`, `'`, `$`, `%`, `?`, the extreme numbers).
"""
from __future__ import annotations

import glob
import ipaddress
import json
import os
import re
import zlib
from typing import Any

from hypothesis import strategies as st

from services.common.model import Service

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
LABEL = "com.meltwater.proxymatic.port."
LABEL_FIELDS = ("servicePort", "weight", "maxconn", "mode", "timeout.client", "timeout.server")

# Text that breaks config lines, logs, number parsing or regexes anchored with `$`.
NASTY_TEXT = [
    "", " ", "\n", "\r\n", "\t", "\x00", "#", "{", "}", ";", "'", '"', "\\", "$", "%", "web\n", "web\r",
    "a b", "a#b", "a;b", "a{b}", "x\nbind :80", "web'; evil", "}\nserver evil;{", "/health\n", "/a b",
    "/a#b", "/%0a", "²", "٨٠", "８０", "0x50", "80.0", "1e400", "-1", "+80", " 80 ", "80\n", "00080",
    "1" * 30, "é", "☃", "\u2028", "\ufeff", "TCP", "udp", "UDP,TCP", "tcp,udp,sctp", "http", " HTTP ",
    "HTTPS", "MESOS_HTTP", "COMMAND", "TASK_RUNNING", "TASK_KILLING", "BRIDGE", "USER", "HOST",
    "container/bridge", "container", "host", "fe80::1%eth0", "fe80::1%x\nbind", "::1", "10.0.0.1", "x" * 3000,
    "9" * 5000, "/" + "a" * 2000, "\n" * 500,
    "10.0.0.1\n", "256.0.0.1", "localhost", "agent-1", "/", "//", "/a//b", "/.", "/-", "/a/b/c",
]
NASTY_INTS = [0, -1, -80, 1, 80, 65535, 65536, 2**31, 2**63, 10**30, -(10**30), 86400, 86401, 1000, 1001]


def _ascii_digits(max_size: int = 6) -> st.SearchStrategy[str]:
    return st.text("0123456789", min_size=1, max_size=max_size)


text_hostile = st.one_of(st.sampled_from(NASTY_TEXT), st.text(max_size=20))
int_hostile = st.one_of(st.sampled_from(NASTY_INTS), st.integers())
float_hostile = st.one_of(st.floats(), st.sampled_from([80.0, 1.5, -0.0, 1e300]))
scalar = st.one_of(st.none(), st.booleans(), int_hostile, float_hostile, text_hostile)
json_value = st.recursive(scalar, lambda children: st.one_of(
    st.lists(children, max_size=3), st.dictionaries(text_hostile, children, max_size=3)), max_leaves=6)


def anything_or(strategy: st.SearchStrategy, weight_other: int = 1) -> st.SearchStrategy:
    """Mostly `strategy`, sometimes any JSON value at all."""
    return st.one_of(*([strategy] * 3), *([json_value] * weight_other))


port_like = anything_or(st.one_of(st.integers(0, 65535), st.integers(31000, 31010), _ascii_digits(5),
                                  st.sampled_from([0, -1, 65536, "80", " 80", "²", True])))
ip_like = anything_or(st.one_of(st.ip_addresses().map(str), st.sampled_from(
    ["10.0.0.1", "10.0.0.2", "::1", "fe80::1%eth0", "fe80::1%x\n#", "1.2.3", "", "10.0.0.1 "])))
host_like = anything_or(st.sampled_from(["agent-1", "agent-2", "localhost", "10.0.0.1", "10.0.0.3", "::1", "unresolvable",
                                         "", "agent-1\n", "a b", "fe80::1%x", "x" * 300, "\x00"]))


def resolve(host: str) -> str | None:
    """A deterministic stand-in for DNS that also answers hostile text (like a getaddrinfo that
    accepts IPv6 zones would): names of the test cluster, IP literals as they are, else None."""
    known = {"agent-1": "10.0.0.1", "agent-2": "10.0.0.2", "localhost": "127.0.0.1", "unresolvable": None}
    if host in known:
        return known[host]
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if re.fullmatch(r"[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})*", host):  # the fixtures' agents
        digest = zlib.crc32(host.encode())
        return f"10.{digest >> 16 & 255}.{digest >> 8 & 255}.{digest & 255}"
    return None


# ---------------------------------------------------------------------------------------------
# mutating real payloads

def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, prefix + (index,))
    return found


def _replace(value: Any, path: tuple, new: Any, delete: bool) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        copy = dict(value)
        if delete and not rest:
            copy.pop(head, None)
        else:
            copy[head] = _replace(value[head], rest, new, delete)
        return copy
    copy = list(value)
    if delete and not rest:
        del copy[head]
    else:
        copy[head] = _replace(value[head], rest, new, delete)
    return copy


@st.composite
def mutate(draw, document: Any, max_mutations: int = 4) -> Any:
    """`document` with a few values replaced by hostile ones, or deleted."""
    for _ in range(draw(st.integers(1, max_mutations))):
        paths = _paths(document)
        candidates = paths[1:] or paths
        path = candidates[draw(st.integers(0, len(candidates) - 1))]
        document = _replace(document, path, draw(json_value), delete=bool(path) and draw(st.booleans()))
    return document


def _load(path: str) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def fixture_apps() -> list[dict]:
    """Every app definition in tests/fixtures/marathon/apps (embedded tasks included)."""
    apps = []
    for path in sorted(glob.glob(f"{FIXTURES}/marathon/apps/**/*.json", recursive=True)):
        document = _load(path)
        if isinstance(document, dict) and isinstance(document.get("apps"), list):
            apps += document["apps"]
        elif isinstance(document, dict) and isinstance(document.get("app"), dict):
            apps.append(document["app"])
        elif isinstance(document, dict) and "id" in document:
            apps.append(document)
    return [app for app in apps if isinstance(app, dict)]


def fixture_tasks() -> list[dict]:
    tasks = []
    for path in sorted(glob.glob(f"{FIXTURES}/marathon/tasks/**/*.json", recursive=True)):
        document = _load(path)
        if isinstance(document, dict) and isinstance(document.get("tasks"), list):
            tasks += [t for t in document["tasks"] if isinstance(t, dict)]
    return tasks


def fixture_events() -> list[dict]:
    events = []
    for path in sorted(glob.glob(f"{FIXTURES}/marathon/events/docs/**/*.json", recursive=True)):
        events.append(_load(path))
    with open(f"{FIXTURES}/marathon/events/captures/ptc-marathon-event-logger-1.4.jsonl", encoding="utf-8") as f:
        events += [json.loads(line) for line in f if line.strip()]
    return [e for e in events if isinstance(e, dict)]


FIXTURE_APPS = fixture_apps()
FIXTURE_TASKS = fixture_tasks()
FIXTURE_EVENTS = fixture_events()


# ---------------------------------------------------------------------------------------------
# Marathon payloads of the right shape, with values of any type

app_id_like = anything_or(st.one_of(
    st.lists(st.one_of(st.sampled_from(["demo", "web", "api", "canary", "a.b", "x_y", "-", "."]), text_hostile),
             min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts)),
    st.sampled_from(["/demo/web", "/demo/web-canary", "demo/api", "/", "", "/a b/c", "/web\n", "/é"])))
protocol_like = anything_or(st.sampled_from(["tcp", "udp", "udp,tcp", "TCP", "sctp", "", None]))
mode_like = anything_or(st.sampled_from(["tcp", "http", "HTTP ", " tcp", "https", "http\n", "http;"]))


_label_index = st.sampled_from([0, 0, 1, 2, 9, -1])
_label_field = st.sampled_from(LABEL_FIELDS)
_label_number = anything_or(st.one_of(st.integers(-5, 70000), _ascii_digits(), st.sampled_from(NASTY_TEXT)))
_label_extra = st.dictionaries(text_hostile, json_value, max_size=2)


@st.composite
def labels(draw) -> dict:
    result = {}
    for _ in range(draw(st.integers(0, 5))):
        field = draw(_label_field)
        result[f"{LABEL}{draw(_label_index)}.{field}"] = draw(mode_like if field == "mode" else _label_number)
    if draw(st.booleans()):
        result.update(draw(_label_extra))
    return result


health_check_like = anything_or(st.fixed_dictionaries({}, optional={
    "protocol": anything_or(st.sampled_from(["HTTP", "TCP", "MESOS_HTTP", "MESOS_TCP", "HTTPS", "COMMAND", "http"])),
    "path": anything_or(st.one_of(st.sampled_from(["/", "/health", "/h?x=1;y='2'", "/a b", "/h\n", "x", "/#"]),
                                  st.text(max_size=12).map(lambda t: "/" + t))),
    "portIndex": anything_or(st.integers(0, 3)),
    "port": port_like,
    "intervalSeconds": anything_or(st.integers(-5, 5000)),
    "timeoutSeconds": anything_or(st.integers(-5, 5000)),
    "maxConsecutiveFailures": anything_or(st.integers(-1, 200)),
    "gracePeriodSeconds": json_value,
}))

port_mapping = anything_or(st.fixed_dictionaries({}, optional={
    "containerPort": port_like, "hostPort": port_like, "servicePort": port_like, "protocol": protocol_like,
    "name": text_hostile, "labels": json_value}))
port_definition = anything_or(st.fixed_dictionaries({}, optional={
    "port": port_like, "protocol": protocol_like, "name": text_hostile, "labels": json_value}))

VERSIONS = ["2016-10-04T12:48:17.435Z", "2016-10-04T12:58:17.435Z"]
_shape = st.sampled_from(["host", "bridge14", "user14", "bridge15", "user15", "ipaddress"])
_docker_network = anything_or(st.sampled_from(["BRIDGE", "USER", "HOST", "bridge", "NONE"]))
_mappings = anything_or(st.lists(port_mapping, max_size=3))
_definitions = anything_or(st.lists(port_definition, max_size=3))
_legacy_ports = anything_or(st.lists(port_like, max_size=3))
_networks = {mode: anything_or(st.lists(
    st.fixed_dictionaries({"mode": anything_or(st.sampled_from([mode, "host", "container"]))},
                          optional={"name": text_hostile}), max_size=2)) for mode in ("container/bridge", "container")}
_ip_address = anything_or(st.fixed_dictionaries({"discovery": anything_or(
    st.fixed_dictionaries({"ports": anything_or(st.lists(anything_or(st.fixed_dictionaries(
        {"number": port_like, "protocol": protocol_like, "name": text_hostile})), max_size=3))}))}))
_health_checks = anything_or(st.lists(health_check_like, max_size=3))
_version = anything_or(st.sampled_from(VERSIONS))
_version_info = anything_or(st.fixed_dictionaries(
    {"lastConfigChangeAt": anything_or(st.sampled_from([VERSIONS[0], ""]))}))
_task_id = anything_or(st.sampled_from(["t1", "t2", "demo_web.1", "web.marathon-1"]))
_task_ports = anything_or(st.lists(port_like, max_size=3))
_task_state = anything_or(st.sampled_from(["TASK_RUNNING", "TASK_RUNNING", "TASK_KILLING", "TASK_STAGING"]))
_ip_addresses = anything_or(st.lists(anything_or(st.fixed_dictionaries(
    {"ipAddress": ip_like, "protocol": anything_or(st.sampled_from(["IPv4", "IPv6"]))})), max_size=2))
_health_results = anything_or(st.lists(anything_or(st.fixed_dictionaries(
    {"alive": anything_or(st.booleans())}, optional={"instanceId": text_hostile})), max_size=2))


@st.composite
def marathon_task(draw, app_ids: st.SearchStrategy | None = None) -> dict:
    task = {"id": draw(_task_id), "host": draw(host_like), "ports": draw(_task_ports), "state": draw(_task_state),
            "version": draw(_version)}
    if app_ids is not None:
        task["appId"] = draw(app_ids)
    if draw(st.booleans()):
        task["ipAddresses"] = draw(_ip_addresses)
    if draw(st.booleans()):
        task["healthCheckResults"] = draw(_health_results)
    return task


_embedded_tasks = anything_or(st.lists(marathon_task(), max_size=3))


@st.composite
def marathon_app(draw) -> dict:
    app: dict = {"id": draw(app_id_like)}
    shape = draw(_shape)
    if shape == "host":
        app["portDefinitions"] = draw(_definitions)
        if draw(st.booleans()):
            app["ports"] = draw(_legacy_ports)
    elif shape in ("bridge14", "user14"):
        app["container"] = {"type": "DOCKER", "docker": {"network": draw(_docker_network),
                                                         "portMappings": draw(_mappings)}}
    elif shape in ("bridge15", "user15"):
        app["networks"] = draw(_networks["container/bridge" if shape == "bridge15" else "container"])
        app["container"] = {"type": "DOCKER", "portMappings": draw(_mappings)}
    else:
        app["ipAddress"] = draw(_ip_address)
    app["labels"] = draw(anything_or(labels()))
    if draw(st.booleans()):
        app["healthChecks"] = draw(_health_checks)
    app["version"] = draw(_version)
    if draw(st.booleans()):
        app["versionInfo"] = draw(_version_info)
    if draw(st.booleans()):
        app["tasks"] = draw(_embedded_tasks)
    return app


def any_app() -> st.SearchStrategy:
    return st.one_of(marathon_app(), st.sampled_from(FIXTURE_APPS).flatmap(mutate), json_value)


def any_task(app_ids: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(marathon_task(app_ids), st.sampled_from(FIXTURE_TASKS).flatmap(mutate), json_value)


EVENT_TYPES = ["status_update_event", "health_status_changed_event", "instance_health_changed_event",
               "instance_changed_event", "failed_health_check_event", "api_post_event", "app_terminated_event",
               "deployment_info", "deployment_success", "unknown_large_event"]


@st.composite
def marathon_event(draw, app_ids: st.SearchStrategy, task_ids: st.SearchStrategy) -> tuple[str, Any]:
    """(event type, event object) with well-typed or wrongly-typed fields."""
    event_type = draw(st.sampled_from(EVENT_TYPES))
    event: dict = {"eventType": event_type}
    fields = {
        "appId": app_ids, "runSpecId": app_ids, "taskId": task_ids, "instanceId": task_ids,
        "taskStatus": anything_or(st.sampled_from(["TASK_RUNNING", "TASK_KILLED", "TASK_KILLING", "TASK_LOST"])),
        "host": host_like, "ports": anything_or(st.lists(port_like, max_size=3)),
        "ipAddresses": anything_or(st.lists(st.fixed_dictionaries({"ipAddress": ip_like}), max_size=2)),
        "version": anything_or(st.sampled_from(["2016-10-04T12:48:17.435Z"])),
        "alive": anything_or(st.booleans()), "healthy": anything_or(st.one_of(st.booleans(), st.none())),
        "condition": anything_or(st.sampled_from(["Killing", "Killed", "Running", "Unreachable", "Created"])),
        "appDefinition": anything_or(st.fixed_dictionaries({"id": app_ids})),
    }
    for name in draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=8)):
        event[name] = draw(fields[name])
    return event_type, event


# ---------------------------------------------------------------------------------------------
# etcd / registrator

etcd_name = st.one_of(st.sampled_from(["web", "redis", "dns", "nginx-80", "a.b_c", "web\n", "a b", "-x", "é", "",
                                       "web@8080", "web@0", "web@²", "web@٨٠", "web@99999", "web@"]), text_hostile)
etcd_id = st.one_of(
    st.builds(lambda h, c, p, u: f"{h}:{c}:{p}{u}",
              st.sampled_from(["hostname", "node-1", "h:with:colons", "h\n", "é", "a b", ""]),
              st.sampled_from(["redis.0", "web", "-bad", "c#1", "x"]),
              st.one_of(_ascii_digits(6), st.sampled_from(["²", "٨٠", "-1", "", "80\n"])),
              st.sampled_from(["", "", ":udp", ":UDP", ":udp\n", ":tcp"])),
    text_hostile)
etcd_value = anything_or(st.one_of(
    st.builds(lambda ip, port: f"{ip}:{port}", st.sampled_from(["10.0.0.1", "backend.example", "localhost", "é.x",
                                                                  "a b", "x" * 300, "256.1.1.1", ""]),
              st.one_of(_ascii_digits(6), st.sampled_from(["²", "-1", "80 "]))),
    st.builds(lambda ip, port: f"[{ip}]:{port}", st.sampled_from(["::1", "fe80::1%eth0", "fe80::1%x\n#", "10.0.0.1"]),
              _ascii_digits(5)),
    text_hostile))


@st.composite
def etcd_node(draw, prefix: str = "/services") -> dict:
    """A GET ?recursive=true response: prefix dir -> service dirs -> keys, some hostile."""
    services = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(etcd_name)
        leaves = [{"key": f"{prefix}/{name}/{draw(etcd_id)}", "value": draw(etcd_value)}
                  for _ in range(draw(st.integers(0, 3)))]
        services.append({"key": f"{prefix}/{name}", "dir": True, "nodes": leaves})
    node = {"key": prefix, "dir": True, "nodes": services}
    if draw(st.booleans()):
        node = draw(mutate(node, 2))
    return node


# ---------------------------------------------------------------------------------------------
# services file

_file_server = st.fixed_dictionaries({}, optional={
    "host": ip_like, "ip": ip_like, "port": port_like, "hostname": anything_or(st.sampled_from(["n1", "n\n"])),
    "weight": anything_or(st.integers(-1, 1001)), "maxconn": anything_or(st.integers(0, 10**6 + 1)),
})
_file_service = st.fixed_dictionaries({"name": anything_or(st.sampled_from(["web", "a.b", "web\n", "a b", "x" * 300])),
                                       "port": port_like}, optional={
    "protocol": protocol_like, "mode": mode_like, "servers": anything_or(st.lists(_file_server, max_size=3)),
    "healthCheck": health_check_like, "health_check": anything_or(st.fixed_dictionaries({}, optional={
        "protocol": anything_or(st.sampled_from(["tcp", "http"])),
        "path": anything_or(st.sampled_from(["/", "/h\n", "/a b", "/ok;x='1'"]))})),
    "timeoutClient": anything_or(st.integers(-1, 86401)), "timeout_server": anything_or(st.integers(-1, 86401)),
    "host_network": anything_or(st.booleans()),
})
_file_services = anything_or(st.lists(_file_service, max_size=3))


@st.composite
def services_document(draw) -> Any:
    document = {"services": draw(_file_services)}
    if draw(st.integers(0, 9)) == 0:
        document["extra"] = draw(json_value)
    return draw(anything_or(st.just(document)))


# ---------------------------------------------------------------------------------------------
# valid plans with the nastiest values the model accepts

NAME_CHARS = "abcXYZ019._-"
valid_name = st.one_of(
    st.sampled_from(["web", "a", "demo.web", "Web_App-1", "x" * 255, "a.-_.b", "A--Z", "0", "a..b"]),
    st.builds(lambda a, m, z: a + m + z, st.sampled_from("aZ0"), st.text(NAME_CHARS, max_size=20),
              st.sampled_from("bY9")))
valid_path = st.one_of(st.sampled_from(["/", "/health", "/h?x=1;y='2'", "/$HOME", "/%0a", "/a//b", "/'", "/;",
                                        "/" + "a" * 1023, "/@:+,=!*()~&"]),
                       st.text("abc/._~!$&'()*+,;=:@%?-", max_size=30).map(lambda t: "/" + t))


_valid_server = st.fixed_dictionaries({
    "ip": st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str),
                    st.sampled_from(["10.0.0.1", "::1", "::ffff:10.0.0.1"])),
    "port": st.integers(1, 65535),
    "hostname": st.sampled_from(["", "node-1", "a:b", "x" * 255, "_._"]),
    "maxconn": st.one_of(st.none(), st.integers(1, 1_000_000)),
})
_valid_health = st.one_of(st.none(), st.fixed_dictionaries({
    "protocol": st.sampled_from(["tcp", "http", "HTTP"]), "path": valid_path,
    "interval_seconds": st.integers(1, 3600), "timeout_seconds": st.integers(1, 3600), "fall": st.integers(1, 100),
}))
_valid_fields = st.fixed_dictionaries({
    "name": valid_name, "mode": st.sampled_from(["tcp", "http", "HTTP"]),
    "source": st.sampled_from(["marathon", "file"]), "health_check": _valid_health,
    "timeout_client": st.one_of(st.none(), st.integers(1, 86400)),
    "timeout_server": st.one_of(st.none(), st.integers(1, 86400)),
})
_protocols = st.sampled_from(["tcp", "udp"])
_weights = {256: st.integers(0, 256), 1000: st.integers(0, 1000)}


@st.composite
def valid_service(draw, port: int, protocol: str | None = None, max_weight: int = 256) -> Service:
    """Built through Service.from_dict (so valid by construction), with hostile-but-valid values."""
    weights = _weights[max_weight] if max_weight in _weights else st.integers(0, max_weight)
    servers = [{**server, "weight": draw(weights)} for server in draw(st.lists(_valid_server, max_size=4))]
    return Service.from_dict({**draw(_valid_fields), "port": port, "protocol": protocol or draw(_protocols),
                              "servers": servers})


_ports = st.integers(1, 65535)


@st.composite
def valid_services(draw, max_size: int = 4, protocol: str | None = None, max_weight: int = 256,
                   ports: st.SearchStrategy | None = None) -> tuple[Service, ...]:
    numbers = draw(st.lists(ports if ports is not None else _ports, unique=True, max_size=max_size))
    return tuple(draw(valid_service(port, protocol, max_weight)) for port in numbers)
