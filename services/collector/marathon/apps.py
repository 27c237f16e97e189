"""App definitions (any Marathon 1.x shape) -> `AppSpec`: ports, labels and health checks.

Pure: nothing here does I/O. A bad value skips the smallest thing it can (one label, one port,
one app) and says why in a warning and an Excluded entry; see docs/marathon.md, The rules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from services.collector.exclusions import excluded as make_excluded
from services.common.model import (clip as clip_value, DEFAULT_WEIGHT, MAX_WEIGHT, Excluded, HealthCheck, ModelError,
                                   validate_name)
from services.common.validate import integer

LABEL_PREFIX = "com.meltwater.proxymatic.port."
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]+")
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


def app_skipped(app: Any, error: Exception) -> Excluded:
    """The Excluded of an app definition that cannot be used at all."""
    app_id = app.get("id") if isinstance(app, dict) else None
    return make_excluded("marathon", "bad_data", f"app skipped: {clip(str(error), 200)}",
                         app=app_id if isinstance(app_id, str) else "")
