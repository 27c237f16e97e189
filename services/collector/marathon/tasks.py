"""Which tasks serve, and what they contribute: health, addresses, backends per proxied port.

Pure: host names are resolved through a callable the caller passes in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from services.collector.exclusions import address as address_text, excluded as make_excluded
from services.collector.marathon.apps import AppSpec, PortRoute, clip
from services.common.model import Excluded, ModelError, Server, validate_ip
from services.common.validate import is_hostname

# States in which a task is serving. `state` is absent from old Marathon (1.1 and the 1.4 docs).
SERVING_STATES = (None, "TASK_RUNNING")
# States after which a task never serves again: an event carrying one removes the task.
TERMINAL_STATES = frozenset({
    "TASK_FINISHED", "TASK_FAILED", "TASK_KILLED", "TASK_LOST", "TASK_ERROR", "TASK_DROPPED",
    "TASK_GONE", "TASK_GONE_BY_OPERATOR", "TASK_UNKNOWN",
})


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


def health_reason(task: Mapping) -> str:
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
            missing = "container address" if ip is None or port is None else ""
        else:
            ip = host_ip
            port = ports[route.index] if route.index < len(ports) else None
            missing = "" if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536 else "host port"
        if missing:
            warnings.append(f"app {clip(spec.app_id)}: task {task_id} has no {missing} for port {route.index}; skipped")
            excluded.extend(task_excluded(task, spec, "bad_data", f"no {missing} for port {route.index}", [route]))
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
