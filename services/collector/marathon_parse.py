"""Pure functions from Marathon JSON (app definitions and tasks) to proxymatic services.

Nothing here does I/O: host names are resolved through a callable the caller passes in, so the
rules of docs/marathon.md are tested without sockets. Every function accepts whatever a Marathon
1.x (or a hostile test) sends: a bad value skips the smallest thing it can (one label, one task,
one app) and says why in a warning; it never raises out of `build_services`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from services.collector.exclusions import address as address_text, excluded as make_excluded
from services.common.model import (clip as clip_value, DEFAULT_WEIGHT, MAX_WEIGHT, Excluded, HealthCheck, ModelError, Server,
                                   Service, bounded_excluded, validate_ip, validate_name)
from services.common.validate import integer, is_hostname

LABEL_PREFIX = "com.meltwater.proxymatic.port."
# States in which a task is serving. `state` is absent from old Marathon (1.1 and the 1.4 docs).
SERVING_STATES = (None, "TASK_RUNNING")
# States after which a task never serves again: an event carrying one removes the task.
TERMINAL_STATES = frozenset({
    "TASK_FINISHED", "TASK_FAILED", "TASK_KILLED", "TASK_LOST", "TASK_ERROR", "TASK_DROPPED",
    "TASK_GONE", "TASK_GONE_BY_OPERATOR", "TASK_UNKNOWN",
})
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]+")
MAX_WARNINGS = 200
# Marathon health check protocols HAProxy can reproduce from outside the task (plain HTTP or a
# TCP connect), and Marathon's defaults for the fields it leaves out.
CHECK_PROTOCOLS = {"HTTP": "http", "MESOS_HTTP": "http", "TCP": "tcp", "MESOS_TCP": "tcp"}
CHECK_DEFAULTS = {"intervalSeconds": 60, "timeoutSeconds": 20, "maxConsecutiveFailures": 3}


class AppError(ValueError):
    """An app definition proxymatic cannot use at all (the app is skipped alone)."""


def clip(value: Any, limit: int = 60) -> str:
    """A value made safe for a one-line warning: repr (no raw newlines), bounded length."""
    return clip_value(value, limit)


@dataclass(frozen=True)
class PortRoute:
    """One exposed port of an app version, with its label options already validated."""

    index: int
    service_port: int  # 0: not proxied
    protocol: str  # "tcp" | "udp"
    container_port: int | None
    weight: int = DEFAULT_WEIGHT
    maxconn: int | None = None
    mode: str | None = None  # None: not set by a label
    timeout_client: int | None = None
    timeout_server: int | None = None
    overridden: bool = False  # servicePort came from a label
    health_check: HealthCheck | None = None  # the app's Marathon check on this port, for HAProxy


@dataclass(frozen=True)
class AppSpec:
    """What proxymatic needs from one (immutable) app version."""

    app_id: str
    version: str
    name: str | None  # None: the id gives no valid service name; the app is skipped
    network: str  # "host" | "bridge" | "container"
    routes: tuple[PortRoute, ...]
    health_checks: int
    warnings: tuple[str, ...] = ()
    # What of the definition is not used: a label ignored (`invalid_label`), a port or the whole
    # app skipped (`bad_data`). The app's fragments carry these for every version they use.
    excluded: tuple[Excluded, ...] = ()


# ---------------------------------------------------------------------------------------------
# app definitions

def service_name(app_id: str) -> tuple[str | None, str | None]:
    """`/product/system/service` -> `service.system.product`. Returns (name, warning)."""
    name = ".".join(reversed([part for part in app_id.split("/") if part]))
    try:
        return validate_name(name), None
    except ModelError:
        pass
    cleaned = _NAME_BAD.sub("-", name).strip("-._")[:255].strip("-._")
    try:
        validate_name(cleaned)
    except ModelError:
        return None, f"app {clip(app_id)}: id gives no valid service name; app skipped"
    return cleaned, f"app {clip(app_id)}: service name sanitised to {cleaned!r}"


def network_mode(app: Mapping) -> str:
    """host | bridge | container, for both the 1.4 (`container.docker.network`, `ipAddress`)
    and the 1.5+ (`networks`) shapes."""
    networks = app.get("networks")
    if isinstance(networks, list) and networks:
        # only string modes: a hostile `"mode": []` is unhashable
        modes = {n.get("mode") for n in networks if isinstance(n, dict) and isinstance(n.get("mode"), str)}
        if "container/bridge" in modes:
            return "bridge"
        if "container" in modes:
            return "container"
        return "host"
    container = app.get("container") if isinstance(app.get("container"), dict) else {}
    docker = container.get("docker") if isinstance(container.get("docker"), dict) else {}
    network = str(docker.get("network") or "").upper()
    if network == "BRIDGE":
        return "bridge"
    if network == "USER":
        return "container"
    if network == "HOST":
        return "host"
    if isinstance(app.get("ipAddress"), dict):
        return "container"
    return "host"


def _port_mappings(app: Mapping) -> list:
    container = app.get("container") if isinstance(app.get("container"), dict) else {}
    mappings = container.get("portMappings")
    if not mappings and isinstance(container.get("docker"), dict):
        mappings = container["docker"].get("portMappings")
    return mappings if isinstance(mappings, list) else []


def _raw_ports(app: Mapping, network: str) -> list[tuple[Any, Any, Any, Any]]:
    """(servicePort, protocol, containerPort, hostPort) per exposed port index. On HOST the
    declared port is both the service port and (with requirePorts) the host port."""
    bad = (None, None, None, None)
    if network in ("bridge", "container"):
        mappings = _port_mappings(app)
        if mappings or network == "bridge":
            return [(m.get("servicePort", 0), m.get("protocol", "tcp"), m.get("containerPort"), m.get("hostPort"))
                    if isinstance(m, dict) else bad for m in mappings]
        discovery = (app.get("ipAddress") or {}).get("discovery") if isinstance(app.get("ipAddress"), dict) else None
        ports = discovery.get("ports") if isinstance(discovery, dict) else None
        return [(0, p.get("protocol", "tcp"), p.get("number"), None) if isinstance(p, dict) else bad
                for p in (ports if isinstance(ports, list) else [])]
    definitions = app.get("portDefinitions")
    if isinstance(definitions, list) and definitions:
        return [(d.get("port", 0), d.get("protocol", "tcp"), None, d.get("port")) if isinstance(d, dict) else bad
                for d in definitions]
    legacy = app.get("ports")
    return [(p, "tcp", None, p) for p in legacy] if isinstance(legacy, list) else []


def _label_int(labels: Mapping, key: str, low: int, high: int, app_id: str, warnings: list,
               problems: list | None = None) -> int | None:
    if key not in labels:
        return None
    value = labels[key]
    number = integer(value, low, high, floats=True)
    if number is None:
        warnings.append(f"app {clip(app_id)}: label {key}={clip(value)} ignored "
                        f"(expected an integer {low}..{high})")
        if problems is not None:
            problems.append((key, value, f"expected an integer {low}..{high}"))
        return None
    return number


def _protocol(value: Any) -> str | None:
    """Marathon's protocol field: tcp, udp or "udp,tcp". One port number is one service: tcp
    wins when both are exposed (interface.md)."""
    if not isinstance(value, str):
        return "tcp" if value is None else None
    parts = {p.strip().lower() for p in value.split(",") if p.strip()}
    if not parts or "tcp" in parts:
        return "tcp" if parts <= {"tcp", "udp"} else None
    return "udp" if parts == {"udp"} else None


def _port_number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536 else None


def _check_seconds(check: Mapping, key: str, low: int, high: int, app_id: str, warnings: list) -> int:
    """A numeric field of a Marathon health check, clamped to what HAProxy accepts. Absent:
    Marathon's default; not an integer (Marathon never sends one): the default, with a warning."""
    value = check.get(key)
    if value is None:
        value = CHECK_DEFAULTS[key]
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, bool) or not isinstance(value, int):
        warnings.append(f"app {clip(app_id)}: health check {key}={clip(value)} ignored (expected an integer)")
        value = CHECK_DEFAULTS[key]
    if key == "maxConsecutiveFailures" and value == 0:
        value = CHECK_DEFAULTS[key]  # 0 is "never kill" in Marathon: HAProxy needs a number
    return max(low, min(high, value))


def _check_ports(checks: Any, network: str, raw_ports: list[tuple[Any, Any, Any, Any]], app_id: str,
                 warnings: list) -> dict[int, HealthCheck]:
    """Marathon health checks -> the HAProxy check of each exposed port index that has one.

    A check applies to port N when its `portIndex` is N (absent with no `port`: 0, as in
    Marathon), or its fixed `port` is the port it reaches: the declared port on HOST, the host
    port (HTTP, TCP: Marathon connects to the agent) or the container port (MESOS_*: Mesos
    checks inside the task's network) on BRIDGE, the container port on USER networks. HTTP
    wins over TCP on one port, then the first listed. COMMAND and HTTPS checks give none. One
    HTTP path the model would refuse (it ends up in the HAProxy config) disables the HAProxy
    checks of the whole app, with a warning."""
    if not isinstance(checks, list):
        return {}
    found: dict[int, HealthCheck] = {}
    for check in checks:
        if not isinstance(check, dict):
            continue
        marathon_protocol = check.get("protocol", "HTTP")  # Marathon's default protocol
        protocol = CHECK_PROTOCOLS.get(marathon_protocol.upper()) if isinstance(marathon_protocol, str) else None
        if protocol is None:
            continue  # COMMAND, HTTPS, MESOS_HTTPS, garbage: Marathon's verdict alone
        path = check.get("path") if protocol == "http" else None
        interval = _check_seconds(check, "intervalSeconds", 1, 3600, app_id, warnings)
        try:
            health = HealthCheck.from_dict({
                "protocol": protocol, "path": path or "/", "interval_seconds": interval,
                "timeout_seconds": min(interval, _check_seconds(check, "timeoutSeconds", 1, 3600, app_id, warnings)),
                "fall": _check_seconds(check, "maxConsecutiveFailures", 1, 100, app_id, warnings)})
        except ModelError:
            warnings.append(f"app {clip(app_id)}: health check path {clip(path)} cannot be used by the proxy; "
                            "no proxy health checks for this app (Marathon's results still apply)")
            return {}
        index, port = check.get("portIndex"), _port_number(check.get("port"))
        if index is None and check.get("port") is None:
            index = 0
        for number, (_, _, container_port, host_port) in enumerate(raw_ports):
            if isinstance(index, int) and not isinstance(index, bool):
                applies = index == number
            elif network == "host" or (network == "bridge" and not marathon_protocol.upper().startswith("MESOS_")):
                applies = port is not None and _port_number(host_port) == port
            else:
                applies = port is not None and _port_number(container_port) == port
            if applies and (number not in found or (found[number].protocol == "tcp" and protocol == "http")):
                found[number] = health
    return found


def parse_app(app: Any) -> AppSpec:
    """One app definition (any 1.x shape) -> AppSpec. Raises AppError if unusable."""
    if not isinstance(app, dict):
        raise AppError(f"app definition must be an object, got {type(app).__name__}")
    app_id = app.get("id")
    if not isinstance(app_id, str) or not app_id.strip("/"):
        raise AppError(f"app without a valid id ({clip(app_id)})")
    if not app_id.startswith("/"):
        app_id = "/" + app_id
    warnings: list[str] = []
    name, warning = service_name(app_id)
    if warning:
        warnings.append(warning)
    # (port index or None, label, value, why) per label ignored; (port index, why) per port skipped
    label_problems: list[tuple[int | None, str, Any, str]] = []
    port_problems: list[tuple[int, str]] = []
    version = app.get("version")
    if not isinstance(version, str):
        info = app.get("versionInfo") if isinstance(app.get("versionInfo"), dict) else {}
        version = info.get("lastConfigChangeAt") if isinstance(info.get("lastConfigChangeAt"), str) else ""
    labels = app.get("labels") if isinstance(app.get("labels"), dict) else {}
    if app.get("labels") not in (None, {}) and not isinstance(app.get("labels"), dict):
        warnings.append(f"app {clip(app_id)}: labels must be an object; ignored")
        label_problems.append((None, "labels", app.get("labels"), "labels must be an object; all ignored"))
    network = network_mode(app)
    routes: list[PortRoute] = []
    raw_ports = _raw_ports(app, network)
    checks = app.get("healthChecks")
    health_checks = _check_ports(checks, network, raw_ports, app_id, warnings)
    for index, (service_port, protocol_value, container_port, _) in enumerate(raw_ports):
        prefix = f"{LABEL_PREFIX}{index}."
        protocol = _protocol(protocol_value)
        if protocol is None:
            warnings.append(f"app {clip(app_id)}: port {index} has protocol {clip(protocol_value)}; skipped")
            port_problems.append((index, f"port {index} has protocol {clip(protocol_value)}; port skipped"))
            continue
        problems: list = []
        if isinstance(service_port, bool) or not isinstance(service_port, int) or not 0 <= service_port <= 65535:
            warnings.append(f"app {clip(app_id)}: port {index} has servicePort {clip(service_port)}; skipped")
            port_problems.append((index, f"port {index} has servicePort {clip(service_port)}; "
                                         "not proxied unless a servicePort label gives one"))
            service_port = 0
        override = _label_int(labels, prefix + "servicePort", 1, 65535, app_id, warnings, problems)
        if isinstance(container_port, bool) or not isinstance(container_port, int) or not 0 < container_port < 65536:
            container_port = None
        mode = labels.get(prefix + "mode")
        if mode is not None:
            if isinstance(mode, str) and mode.strip().lower() in ("tcp", "http"):
                mode = mode.strip().lower()
            else:
                warnings.append(f"app {clip(app_id)}: label {prefix}mode={clip(mode)} ignored (expected tcp or http)")
                problems.append((prefix + "mode", mode, "expected tcp or http"))
                mode = None
        routes.append(PortRoute(
            index=index,
            service_port=override if override is not None else service_port,
            protocol=protocol,
            container_port=container_port,
            weight=_label_int(labels, prefix + "weight", 1, MAX_WEIGHT, app_id, warnings, problems) or DEFAULT_WEIGHT,
            maxconn=_label_int(labels, prefix + "maxconn", 1, 1_000_000, app_id, warnings, problems),
            mode=mode,
            timeout_client=_label_int(labels, prefix + "timeout.client", 1, 86400, app_id, warnings, problems),
            timeout_server=_label_int(labels, prefix + "timeout.server", 1, 86400, app_id, warnings, problems),
            overridden=override is not None,
            health_check=health_checks.get(index) if protocol == "tcp" else None,
        ))
        label_problems.extend((index, label, value, why) for label, value, why in problems)
    # One port number is one service: when it is listed twice (TCP and UDP), the TCP one stays.
    chosen: dict[int, PortRoute] = {}
    for route in routes:
        if route.service_port and (route.service_port not in chosen
                                   or (route.protocol == "tcp" and chosen[route.service_port].protocol != "tcp")):
            chosen[route.service_port] = route
    routes = [r for r in routes if not r.service_port or chosen[r.service_port] is r]
    return AppSpec(app_id=app_id, version=version, name=name, network=network, routes=tuple(routes),
                   health_checks=len(checks) if isinstance(checks, list) else 0, warnings=tuple(warnings),
                   excluded=_spec_excluded(app_id, name, routes, label_problems, port_problems))


def _spec_excluded(app_id: str, name: str | None, routes: list[PortRoute],
                   label_problems: list[tuple[int | None, str, Any, str]],
                   port_problems: list[tuple[int, str]]) -> tuple[Excluded, ...]:
    """The Excluded entries of one app version: the app skipped (no service name), each port
    skipped, each label ignored (naming the label, its value and why; the app is still
    served)."""
    if not label_problems and not port_problems and name is not None:
        return ()
    keys = {route.index: f"{route.service_port}/{route.protocol}" for route in routes if route.service_port}
    found: list[Excluded] = []
    if name is None:
        found.append(make_excluded("marathon", "bad_data", "app id gives no valid service name; app skipped",
                                   app=app_id))
    for index, why in port_problems:
        found.append(make_excluded("marathon", "bad_data", why, app=app_id, service=name or "",
                                   key=keys.get(index, "")))
    for index, label, value, why in label_problems:
        found.append(make_excluded("marathon", "invalid_label", f"label {label}={clip(value)} ignored ({why})",
                                   app=app_id, service=name or "", key=keys.get(index, "") if index is not None else ""))
    return tuple(dict.fromkeys(found))


# ---------------------------------------------------------------------------------------------
# tasks

def task_health(task: Mapping, spec: AppSpec) -> str:
    """"up" | "down" | "unknown". Any result not alive is down; an app with health checks and
    no result yet is unknown (the caller decides with its memory of served tasks)."""
    results = task.get("healthCheckResults")
    results = [r for r in results if isinstance(r, dict)] if isinstance(results, list) else []
    if any(r.get("alive") is not True for r in results):
        return "down"
    if spec.health_checks and not results:
        return "unknown"
    return "up"


def _is_ip(value: Any) -> bool:
    """An address the model takes (no IPv6 zone), so a usable one is never passed over for it."""
    try:
        validate_ip(value)
        return True
    except ModelError:
        return False


def _container_ip(task: Mapping) -> str | None:
    addresses = task.get("ipAddresses")
    if not isinstance(addresses, list):
        return None
    found = [a.get("ipAddress") for a in addresses if isinstance(a, dict) and isinstance(a.get("ipAddress"), str)]
    found = [ip for ip in found if _is_ip(ip)]
    v4 = [ip for ip in found if ":" not in ip]
    return (v4 or found or [None])[0]


@dataclass(frozen=True)
class Backend:
    route: PortRoute
    server: Server
    host_network: bool


def proxied_routes(spec: AppSpec) -> list[PortRoute]:
    """The routes a task of this version serves, one per service port number."""
    seen: set[int] = set()
    routes = []
    for route in spec.routes:
        if route.service_port and route.service_port not in seen:
            seen.add(route.service_port)
            routes.append(route)
    return routes


def task_address(task: Mapping, spec: AppSpec, route: PortRoute) -> str:
    """Where the task would serve `route`, as Marathon says it (the agent's host name as given,
    not resolved: this is for Excluded entries, which never cost a lookup); "" if unknown."""
    if spec.network == "container":
        return address_text(_container_ip(task), route.container_port)
    ports = task.get("ports")
    port = ports[route.index] if isinstance(ports, list) and route.index < len(ports) else None
    host = task.get("host")
    return address_text(host, port) if is_hostname(host) else ""


def task_excluded(task: Mapping, spec: AppSpec, code: str, reason: str,
                  routes: Iterable[PortRoute] | None = None) -> list[Excluded]:
    """One Excluded per service the task would serve (all its proxied ports, or `routes`)."""
    task_id = task.get("id") if isinstance(task.get("id"), str) else clip(task.get("id"))
    return [make_excluded("marathon", code, reason, app=spec.app_id, task=task_id, service=spec.name or "",
                          key=f"{route.service_port}/{route.protocol}", address=task_address(task, spec, route))
            for route in (proxied_routes(spec) if routes is None else routes)]


def _health_reason(task: Mapping) -> str:
    """"health check failing", with what Marathon says about it when it says something."""
    results = task.get("healthCheckResults")
    failing = [r for r in results if isinstance(r, dict) and r.get("alive") is not True] \
        if isinstance(results, list) else []
    details = []
    for result in failing[:1]:
        failures = result.get("consecutiveFailures")
        if isinstance(failures, int) and not isinstance(failures, bool) and failures > 0:
            details.append(f"{failures} consecutive failures")
        cause = result.get("lastFailureCause")
        if isinstance(cause, str) and cause:
            details.append(f"last: {clip(cause, 120)}")
    return "health check failing" + (f" ({', '.join(details)})" if details else "")


def task_backends(task: Mapping, spec: AppSpec, resolve: Callable[[str], str | None],
                  warnings: list[str], excluded: list[Excluded] | None = None) -> list[Backend]:
    """The backends one serving task contributes, one per proxied port of its app version.
    What it cannot contribute is said in `warnings` and, when given, `excluded`."""
    task_id = clip(task.get("id"))
    host = task.get("host")
    host_ip: str | None = None
    if excluded is None:
        excluded = []
    if spec.network != "container":
        if not isinstance(host, str) or not host:
            warnings.append(f"app {clip(spec.app_id)}: task {task_id} has no host; skipped")
            excluded.extend(task_excluded(task, spec, "bad_data", "task has no host; skipped"))
            return []
        host_ip = resolve(host)
        if host_ip is None:
            warnings.append(f"app {clip(spec.app_id)}: task {task_id} host {clip(host)} does not resolve; skipped")
            excluded.extend(task_excluded(task, spec, "unresolvable", f"host {clip(host)} does not resolve"))
            return []
    hostname = host if is_hostname(host) else ""
    ports = task.get("ports") if isinstance(task.get("ports"), list) else []
    backends: list[Backend] = []
    seen: set[int] = set()
    for route in spec.routes:
        if route.service_port == 0 or route.service_port in seen:
            continue  # not proxied / one port number is one service
        seen.add(route.service_port)
        if spec.network == "container":
            ip, port = _container_ip(task), route.container_port
            if ip is None or port is None:
                warnings.append(f"app {clip(spec.app_id)}: task {task_id} has no container address "
                                f"for port {route.index}; skipped")
                excluded.extend(task_excluded(task, spec, "bad_data", f"no container address for port {route.index}",
                                              [route]))
                continue
        else:
            ip = host_ip
            port = ports[route.index] if route.index < len(ports) else None
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                warnings.append(f"app {clip(spec.app_id)}: task {task_id} has no host port "
                                f"for port {route.index}; skipped")
                excluded.extend(task_excluded(task, spec, "bad_data", f"no host port for port {route.index}",
                                              [route]))
                continue
        try:
            server = Server.from_dict({"ip": ip, "port": port, "hostname": hostname, "weight": route.weight,
                                       "maxconn": route.maxconn})
        except ModelError as error:
            warnings.append(f"app {clip(spec.app_id)}: task {task_id}: {error}; skipped")
            excluded.extend(task_excluded(task, spec, "bad_data", str(error), [route]))
            continue
        backends.append(Backend(route, server, spec.network == "host" and port == route.service_port))
    return backends


# ---------------------------------------------------------------------------------------------
# services

@dataclass
class BuildResult:
    services: tuple[Service, ...]
    warnings: tuple[str, ...]
    served: frozenset[str]  # task ids that contributed a backend (the health memory)
    excluded: tuple[Excluded, ...] = ()  # what was seen but is not served, and why


PortKey = tuple[int, str]  # (servicePort, protocol)


@dataclass(frozen=True)
class AppFragment:
    """What one app contributes to the services: its backends per service port, its warnings
    and the tasks it serves, plus the inputs it was built from, so that a rebuild can be
    skipped when they did not change (see `ServiceBuilder`)."""

    app_id: str
    inputs: tuple[tuple[Mapping, AppSpec], ...]  # (task, spec of its version) as given
    extra: tuple[str, ...]  # warnings passed in with the inputs (e.g. version fallbacks)
    hosts: tuple[tuple[str, str | None], ...]  # every host looked up, and its answer
    groups: Mapping[PortKey, tuple[tuple[AppSpec, Backend], ...]]
    warnings: tuple[str, ...]
    served: frozenset[str]
    excluded: tuple[Excluded, ...] = ()  # the app's tasks (and labels) not served, and why

    def same_inputs(self, pairs: list[tuple[Mapping, AppSpec]], extra: tuple[str, ...],
                    resolve: Callable[[str], str | None]) -> bool:
        """Whether building from `pairs` now would give this fragment again: same tasks (by
        value), same specs, same extra warnings, and every host still resolves the same."""
        if len(pairs) != len(self.inputs) or extra != self.extra:
            return False
        for (task, spec), (old_task, old_spec) in zip(pairs, self.inputs):
            if (spec is not old_spec and spec != old_spec) or task != old_task:
                return False
        try:
            return all(resolve(host) == address for host, address in self.hosts)
        except Exception:
            return False


def build_fragment(app_id: str, pairs: Iterable[tuple[Mapping, AppSpec]], resolve: Callable[[str], str | None],
                   previously_served: frozenset[str] | set[str] = frozenset(),
                   extra_warnings: Iterable[str] = ()) -> AppFragment:
    """The (task, spec) pairs of one app -> its backends grouped by service port. `pairs` is
    kept as the fragment's inputs: pass copies of tasks that will be mutated later."""
    pairs = tuple(pairs)
    extra = tuple(extra_warnings)
    warnings: list[str] = list(extra)
    served: set[str] = set()
    groups: dict[PortKey, list[tuple[AppSpec, Backend]]] = {}
    hosts: dict[str, str | None] = {}

    def recording_resolve(host: str) -> str | None:
        address = resolve(host)
        hosts[host] = address
        return address

    warned_specs: set[int] = set()
    excluded: list[Excluded] = []
    for task, spec in pairs:
        try:
            if id(spec) not in warned_specs:
                warned_specs.add(id(spec))
                warnings.extend(spec.warnings)
                excluded.extend(spec.excluded)
            if spec.name is None:
                continue
            state = task.get("state")
            if state not in SERVING_STATES:
                # TASK_KILLING, staging, lost...
                shown = state if isinstance(state, str) and len(state) <= 40 and state.isprintable() else clip(state, 40)
                excluded.extend(task_excluded(task, spec, "not_running", f"task is {shown} (not running)"))
                continue
            task_id = task.get("id")
            health = task_health(task, spec)
            if health == "down":
                excluded.extend(task_excluded(task, spec, "health_failing", _health_reason(task)))
                continue
            if health == "unknown" and task_id not in previously_served:
                excluded.extend(task_excluded(task, spec, "health_unknown",
                                              "no health check result yet (served once one is alive)"))
                continue
            backends = task_backends(task, spec, recording_resolve, warnings, excluded)
            if backends and isinstance(task_id, str):
                served.add(task_id)
            for backend in backends:
                groups.setdefault((backend.route.service_port, backend.route.protocol), []).append((spec, backend))
        except Exception as error:  # bad data in one task never breaks the update
            task_id = task.get("id") if isinstance(task, Mapping) else task
            warnings.append(f"app {clip(getattr(spec, 'app_id', '?'))}: task {clip(task_id)} "
                            f"skipped: {clip(str(error), 120)}")
            try:
                excluded.append(make_excluded("marathon", "bad_data", f"task skipped: {clip(str(error), 120)}",
                                              app=getattr(spec, "app_id", app_id),
                                              task=task_id if isinstance(task_id, str) else clip(task_id)))
            except Exception:  # noqa: BLE001 - the warning says it already
                pass
    return AppFragment(app_id=app_id, inputs=pairs, extra=extra, hosts=tuple(hosts.items()),
                       groups={key: tuple(entries) for key, entries in groups.items()},
                       warnings=tuple(warnings), served=frozenset(served),
                       excluded=tuple(dict.fromkeys(excluded)))


class ServiceBuilder:
    """Services built incrementally, one fragment per app.

    `update(app_id, pairs, ...)` rebuilds an app's fragment only when its inputs changed; the
    service ports whose backends changed are marked, and `result()` merges only those ports
    again (apps sharing a port, the canary, are merged from their cached fragments). With
    nothing changed, `result()` returns the very same tuples. Not thread-safe: one builder per
    caller, or a lock around it."""

    def __init__(self) -> None:
        self._fragments: dict[str, AppFragment] = {}
        self._members: dict[PortKey, set[str]] = {}  # port -> apps with backends on it
        self._services: dict[PortKey, Service] = {}
        self._port_warnings: dict[PortKey, tuple[str, ...]] = {}
        self._dirty_ports: set[PortKey] = set()
        self._keys: list[PortKey] = []
        self._services_tuple: tuple[Service, ...] = ()
        self._body_stale = True  # fragment or port warnings changed
        self._body: tuple[str, ...] = ()
        self._warnings: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # (extra, result)
        # Excluded entries: per app (only apps that have some) and per port (a merge that
        # failed); the bounded, ordered whole is rebuilt only when one of them changed.
        self._app_excluded: dict[str, tuple[Excluded, ...]] = {}
        self._port_excluded: dict[PortKey, tuple[Excluded, ...]] = {}
        self._excluded_stale = True
        self._excluded: tuple[tuple[Excluded, ...], tuple[Excluded, ...]] | None = None  # (extra, result)
        self.stats = {"fragments_built": 0, "fragments_reused": 0, "ports_merged": 0}

    def fragment(self, app_id: str) -> AppFragment | None:
        return self._fragments.get(app_id)

    def app_ids(self) -> set[str]:
        return set(self._fragments)

    def served(self) -> frozenset[str]:
        return frozenset().union(*(f.served for f in self._fragments.values()))

    def update(self, app_id: str, pairs: list[tuple[Mapping, AppSpec]], resolve: Callable[[str], str | None],
               extra_warnings: Iterable[str] = (), previously_served: frozenset[str] | set[str] | None = None) -> bool:
        """Bring the app's fragment up to date. `previously_served` defaults to the tasks the
        app's last fragment served (the health memory). Returns whether it was rebuilt."""
        extra = tuple(extra_warnings)
        old = self._fragments.get(app_id)
        if old is not None and old.same_inputs(pairs, extra, resolve):
            self.stats["fragments_reused"] += 1
            return False
        if not pairs and not extra:
            return self.remove(app_id)
        if previously_served is None:
            previously_served = old.served if old is not None else frozenset()
        new = build_fragment(app_id, pairs, resolve, previously_served, extra)
        self.stats["fragments_built"] += 1
        self._fragments[app_id] = new
        self._replaced(app_id, old, new)
        return True

    def remove(self, app_id: str) -> bool:
        old = self._fragments.pop(app_id, None)
        if old is None:
            return False
        self._replaced(app_id, old, None)
        return True

    def _replaced(self, app_id: str, old: AppFragment | None, new: AppFragment | None) -> None:
        old_groups = old.groups if old is not None else {}
        new_groups = new.groups if new is not None else {}
        for key in old_groups.keys() | new_groups.keys():
            entries = new_groups.get(key)
            if old_groups.get(key) != entries:
                self._dirty_ports.add(key)
                members = self._members.setdefault(key, set())
                if entries:
                    members.add(app_id)
                else:
                    members.discard(app_id)
        if (old.warnings if old is not None else ()) != (new.warnings if new is not None else ()):
            self._body_stale = True
        old_excluded = old.excluded if old is not None else ()
        new_excluded = new.excluded if new is not None else ()
        if old_excluded != new_excluded:
            self._excluded_stale = True
            if new_excluded:
                self._app_excluded[app_id] = new_excluded
            else:
                self._app_excluded.pop(app_id, None)

    def result(self, extra_warnings: Iterable[str] = ()) -> tuple[tuple[Service, ...], tuple[str, ...]]:
        """(services sorted by port and protocol, warnings): `extra_warnings` first, then the
        apps', then the services' (conflicts), deduplicated, at most MAX_WARNINGS."""
        if self._dirty_ports:
            self._merge_dirty_ports()
        extra = tuple(extra_warnings)
        if self._body_stale:
            self._body = tuple(w for fragment in self._fragments.values() for w in fragment.warnings) + tuple(
                w for key in sorted(self._port_warnings) for w in self._port_warnings[key])
            self._body_stale = False
            self._warnings = None
        if self._warnings is None or self._warnings[0] != extra:
            warnings = list(dict.fromkeys(extra + self._body))
            if len(warnings) > MAX_WARNINGS:
                warnings = warnings[:MAX_WARNINGS] + [f"... and {len(warnings) - MAX_WARNINGS} more warnings"]
            self._warnings = (extra, tuple(warnings))
        return self._services_tuple, self._warnings[1]

    def excluded(self, extra: Iterable[Excluded] = ()) -> tuple[Excluded, ...]:
        """What the apps' tasks and definitions do not serve, and why, plus `extra` (e.g. apps
        skipped while fetching): bounded and ordered (`bounded_excluded`). The same tuple while
        nothing changed. Call after `result()` (which merges the ports)."""
        if self._dirty_ports:
            self._merge_dirty_ports()
        extra = tuple(extra)
        if self._excluded_stale or self._excluded is None or self._excluded[0] != extra:
            entries = [e for entries in self._app_excluded.values() for e in entries]
            entries.extend(e for entries in self._port_excluded.values() for e in entries)
            # each fragment's entries are distinct already, and apps' entries differ by app
            self._excluded = (extra, bounded_excluded(list(extra) + entries))
            self._excluded_stale = False
        return self._excluded[1]

    def _merge_dirty_ports(self) -> None:
        keys_changed = services_changed = False
        for key in self._dirty_ports:
            self.stats["ports_merged"] += 1
            members = self._members.get(key)
            service: Service | None = None
            warnings: list[str] = []
            if members:
                port, protocol = key
                entries = [entry for app_id in sorted(members) for entry in self._fragments[app_id].groups[key]]
                try:
                    service = _service(port, protocol, entries, warnings)
                except (ModelError, ValueError) as error:
                    warnings.append(f"service {port}/{protocol} skipped: {clip(str(error), 160)}")
                    excluded = tuple(dict.fromkeys(
                        make_excluded("marathon", "bad_data", f"service skipped: {clip(str(error), 160)}",
                                      app=spec.app_id, service=spec.name or "", key=f"{port}/{protocol}")
                        for spec, _ in entries))
                    if self._port_excluded.get(key) != excluded:
                        self._port_excluded[key] = excluded
                        self._excluded_stale = True
            else:
                self._members.pop(key, None)
            if service is not None and key in self._port_excluded:
                del self._port_excluded[key]
                self._excluded_stale = True
            elif not members and key in self._port_excluded:
                del self._port_excluded[key]
                self._excluded_stale = True
            old = self._services.get(key)
            if service is None:
                if old is not None:
                    del self._services[key]
                    keys_changed = True
            elif old is None or old != service:
                keys_changed = keys_changed or old is None
                services_changed = True
                self._services[key] = service
            if tuple(warnings) != self._port_warnings.get(key, ()):
                self._body_stale = True
                if warnings:
                    self._port_warnings[key] = tuple(warnings)
                else:
                    self._port_warnings.pop(key, None)
        self._dirty_ports.clear()
        if keys_changed:
            self._keys = sorted(self._services)
        if keys_changed or services_changed:
            self._services_tuple = tuple(self._services[key] for key in self._keys)


def build_services(pairs: Iterable[tuple[Mapping, AppSpec]], resolve: Callable[[str], str | None],
                   previously_served: frozenset[str] | set[str] = frozenset(),
                   extra_warnings: Iterable[str] = (), extra_excluded: Iterable[Excluded] = ()) -> BuildResult:
    """(task, app spec of the task's version) pairs -> services keyed `servicePort/protocol`.

    Two apps (or versions) on one service port are one service (canary) with each server at its
    own weight. Service attributes (mode, timeouts, name) come from the app that owns the port
    (no servicePort override label), else the lowest app id; a conflict is reported. One-shot
    form of `ServiceBuilder`, which MarathonSource keeps to rebuild only what changed."""
    by_app: dict[str, list[tuple[Mapping, AppSpec]]] = {}
    for task, spec in pairs:
        by_app.setdefault(getattr(spec, "app_id", "?"), []).append((task, spec))
    builder = ServiceBuilder()
    for app_id, app_pairs in by_app.items():
        builder.update(app_id, app_pairs, resolve, previously_served=previously_served)
    services, warnings = builder.result(extra_warnings)
    return BuildResult(services, warnings, builder.served(), builder.excluded(extra_excluded))


def _service(port: int, protocol: str, entries: list[tuple[AppSpec, Backend]], warnings: list[str]) -> Service:
    # The host name breaks ties: two tasks claiming one ip:port (a name and an IP for one agent)
    # must give the same server whatever order Marathon listed them in.
    ranked = sorted(entries, key=lambda e: (e[1].route.overridden, e[0].app_id, e[0].version, e[1].server.hostname))
    name = ranked[0][0].name

    def attribute(get: Callable[[PortRoute], Any], label: str) -> Any:
        values: dict[Any, str] = {}
        for spec, backend in ranked:
            value = get(backend.route)
            if value is not None and value not in values:
                values[value] = spec.app_id
        if len(values) > 1:
            chosen = next(iter(values))
            warnings.append(f"service {port}/{protocol}: apps disagree on {label} "
                            f"({_listing(f'{clip(a)}={v}' for v, a in values.items())}); "
                            f"using {chosen} from {clip(values[chosen])}")
        return next(iter(values), None)

    servers: dict[tuple[str, int], Server] = {}
    for _, backend in ranked:
        servers.setdefault((backend.server.ip, backend.server.port), backend.server)
    return Service(
        name=validate_name(name),
        port=port,
        protocol=protocol,
        mode=attribute(lambda r: r.mode, "mode") or "tcp",
        source="marathon",
        servers=(),
        health_check=_health_check(port, protocol, entries, warnings),
        timeout_client=attribute(lambda r: r.timeout_client, "timeout.client"),
        timeout_server=attribute(lambda r: r.timeout_server, "timeout.server"),
        host_network=any(backend.host_network for _, backend in entries),
    ).with_servers(servers.values())


def _health_check(port: int, protocol: str, entries: list[tuple[AppSpec, Backend]],
                  warnings: list[str]) -> HealthCheck | None:
    """The proxy's own check of a service: only when every app version on the port defines one
    (a check some servers were never meant to answer would take them out); apps that disagree:
    the lowest app id's (its newest version's), reported. Marathon's results decide membership
    either way."""
    checks: dict[tuple[str, str], HealthCheck | None] = {}
    for spec, backend in entries:
        checks[(spec.app_id, spec.version)] = backend.route.health_check
    if not checks or None in checks.values():
        if any(checks.values()):
            missing = sorted({app_id for (app_id, _), check in checks.items() if check is None})
            warnings.append(f"service {port}/{protocol}: no proxy health check: "
                            f"{_listing(clip(a) for a in missing)} define(s) none for this port")
        return None
    lowest = min(app_id for app_id, _ in checks)
    chosen = checks[(lowest, max(version for app_id, version in checks if app_id == lowest))]
    if len(set(checks.values())) > 1:
        described = {f"{clip(app_id)}={_describe(check)}" for (app_id, _), check in sorted(checks.items())}
        warnings.append(f"service {port}/{protocol}: apps disagree on health check ({_listing(sorted(described))}); "
                        f"using {_describe(chosen)} from {clip(lowest)}")
    return chosen


def _describe(check: HealthCheck | None) -> str:
    if check is None:
        return "none"
    return f"{check.protocol} {clip(check.path, 40)}" if check.protocol == "http" else check.protocol


def _listing(items: Iterable[str], limit: int = 5) -> str:
    """At most `limit` items of a warning's list (a port shared by hundreds of apps must not
    make a warning of kilobytes), then how many more."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


# ---------------------------------------------------------------------------------------------
# whole payloads (tests, tools): apps + tasks the way Marathon returns them

def app_uses_current_config(app: Mapping, task_version: Any) -> bool:
    """Whether a task of `task_version` runs the app's current configuration: the same version,
    or a version since the last config change (scaling makes versions, not new configs)."""
    if not isinstance(task_version, str):
        return True
    if task_version == app.get("version"):
        return True
    info = app.get("versionInfo") if isinstance(app.get("versionInfo"), dict) else {}
    changed = info.get("lastConfigChangeAt")
    return isinstance(changed, str) and task_version >= changed


def services_from_payloads(apps: Iterable[Any], tasks: Iterable[Any] = (),
                           versions: Mapping[tuple[str, str], Any] | None = None,
                           resolve: Callable[[str], str | None] | None = None,
                           previously_served: frozenset[str] = frozenset()) -> BuildResult:
    """Apps (each possibly with embedded `tasks`) plus /v2/tasks entries -> services.
    `versions` maps (app id, version) to the bare app of `/v2/apps/{id}/versions/{version}`."""
    from services.collector.resolve import Resolver  # local: keeps this module pure

    resolve = resolve or Resolver()
    versions = versions or {}
    warnings: list[str] = []
    excluded: list[Excluded] = []
    current: dict[str, tuple[dict, AppSpec]] = {}
    pairs: list[tuple[Mapping, AppSpec]] = []
    loose: list[Any] = list(tasks)
    for app in apps:
        try:
            spec = parse_app(app)
        except AppError as error:
            warnings.append(f"app skipped: {error}")
            excluded.append(app_skipped(app, error))
            continue
        current[spec.app_id] = (app, spec)
        embedded = app.get("tasks")
        for task in embedded if isinstance(embedded, list) else []:
            if isinstance(task, dict):
                loose.append({**task, "appId": spec.app_id})
    version_specs: dict[tuple[str, str], AppSpec | None] = {}
    for task in loose:
        if not isinstance(task, dict):
            warnings.append(f"task skipped: not an object ({clip(task)})")
            excluded.append(make_excluded("marathon", "bad_data", f"task skipped: not an object ({clip(task)})"))
            continue
        app_id, version = task.get("appId"), task.get("version")
        app_entry = current.get(app_id) if isinstance(app_id, str) else None
        spec: AppSpec | None = None
        if app_entry and app_uses_current_config(app_entry[0], version):
            spec = app_entry[1]
        elif isinstance(app_id, str) and isinstance(version, str):
            key = (app_id, version)
            if key not in version_specs:
                raw = versions.get(key)
                try:
                    version_specs[key] = parse_app(raw) if raw is not None else None
                except AppError as error:
                    warnings.append(f"app {clip(app_id)} version {clip(version)} skipped: {error}")
                    excluded.append(make_excluded("marathon", "bad_data", f"version {clip(version)} skipped: {error}",
                                                  app=app_id))
                    version_specs[key] = None
            spec = version_specs[key] or (app_entry[1] if app_entry else None)
        if spec is None:
            warnings.append(f"task {clip(task.get('id'))}: no definition for app {clip(app_id)} "
                            f"version {clip(version)}; skipped")
            excluded.append(make_excluded("marathon", "bad_data", f"no definition for version {clip(version)}; "
                                          "task skipped", app=app_id if isinstance(app_id, str) else clip(app_id),
                                          task=task.get("id") if isinstance(task.get("id"), str) else ""))
            continue
        pairs.append((task, spec))
    return build_services(pairs, resolve, previously_served, warnings, excluded)


def app_skipped(app: Any, error: Exception) -> Excluded:
    """The Excluded of an app definition that cannot be used at all."""
    app_id = app.get("id") if isinstance(app, dict) else None
    return make_excluded("marathon", "bad_data", f"app skipped: {clip(str(error), 200)}",
                         app=app_id if isinstance(app_id, str) else "")
