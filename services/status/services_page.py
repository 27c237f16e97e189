"""`GET /services` (HTML) and `/services.json`: what this node serves and what it does not, and
why. `proxymatic explain` prints the same facts (services/explain.py), built by the same
function, `describe`.

For every service of the newest plan: its key, name, mode, source, the proxy that serves it
(HAProxy for TCP, Pen for UDP or when HAProxy is off) and its nginx virtual host, whether this
node's applier set it aside and why, its servers with their weights and their live state read
from HAProxy's admin socket (haproxy_state.py; "unknown" when that read fails, never an error
page), and the tasks or entries that are not served, with their reasons (`Plan.excluded`,
grouped by service key; those without a key are listed apart). A key that only has excluded
entries (every task failing its health check, a reserved port) is listed too, "not served".

The HTML is rendered by jinja2 with autoescaping on: names, reasons and app ids come from
labels and files and are shown as text, never as markup. It refreshes itself every 5 seconds
and needs no JavaScript.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Iterable

import jinja2

from services.applier.haproxy_render import HaproxyPaths
from services.common.config import Settings
from services.common.model import ApplyResult, Excluded, Plan, Service
from services.status.haproxy_state import HaproxyLive, HaproxyStateCache
from services.status.state import PipelineState

REFRESH_SECONDS = 5
PROXY_DRIVERS = ("haproxy", "pen", "nginx")

# A service's state, worst first, with the words the page shows.
STATE_TEXT = {
    "set_aside": "set aside",
    "down": "all DOWN",
    "no_servers": "no servers",
    "not_served": "not served",
    "degraded": "some DOWN",
    "unknown": "state unknown",
    "unchecked": "not checked",
    "up": "all UP",
}
PROBLEM_STATES = ("set_aside", "down", "no_servers", "not_served", "degraded", "unknown")

_TEMPLATES = os.path.join(os.path.dirname(__file__), "templates")
_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(_TEMPLATES), autoescape=True,
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def proxy_for(service: Service, plan: Plan) -> str:
    """Which proxy listens on the service's port (nginx only adds a virtual host in front)."""
    return "haproxy" if service.protocol == "tcp" and plan.settings.haproxy else "pen"


def vhost_urls(plan: Plan) -> dict[str, str]:
    """Service key -> its nginx virtual host URL, exactly the vhosts nginx is given."""
    if not plan.settings.vhost_domain:
        return {}
    from services.applier.nginx_render import virtual_hosts
    try:
        vhosts, _warnings = virtual_hosts(plan)
    except ValueError:
        return {}
    port = plan.settings.vhost_port
    suffix = "" if port == 80 else f":{port}"
    return {v.key: f"http://{v.server_name}{suffix}/" for v in vhosts}


def set_aside_by_key(result: ApplyResult | None) -> dict[str, dict[str, str]]:
    """Service key -> {driver: reason} for every port the applier set aside."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for driver, detail in (result.details if result else {}).items():
        aside = detail.get("set_aside") if isinstance(detail, dict) else None
        if isinstance(aside, dict):
            for key, reason in aside.items():
                out[str(key)][str(driver)] = str(reason)
    return dict(out)


def group_excluded(excluded: Iterable[Excluded]) -> tuple[dict[str, list[dict]], list[dict]]:
    """Excluded entries by service key, and those without a key ("not attributable to a port")."""
    by_key: dict[str, list[dict]] = defaultdict(list)
    apart: list[dict] = []
    for item in excluded:
        (by_key[item.key] if item.key else apart).append(item.to_dict())
    return dict(by_key), apart


def _key_sort(key: str) -> tuple:
    port, _, protocol = key.partition("/")
    return (int(port) if port.isdigit() else 1 << 20, protocol, key)


def _server_view(service: Service, server, proxy: str, live: HaproxyLive | None) -> dict:
    out = {"address": server.address, "ip": server.ip, "port": server.port, "hostname": server.hostname,
           "weight": server.weight, "maxconn": server.maxconn}
    if proxy != "haproxy":
        return {**out, "state": "unchecked", "check": "", "detail": f"{proxy} does not report a state"}
    if live is None or not live.ok:
        return {**out, "state": "unknown", "check": "", "detail": "HAProxy's state could not be read"}
    row = live.server(service.key, server.address)
    if row is None:
        return {**out, "state": "unknown", "check": "", "detail": "not in HAProxy (yet)"}
    detail = row.status if row.status.upper() != row.state else ""
    if row.last_check and row.check not in ("L4OK", "L6OK", "L7OK"):
        detail = f"{detail}; {row.last_check}" if detail else row.last_check
    return {**out, **row.to_dict(), "detail": detail}


def _service_state(servers: list[dict], aside: bool) -> str:
    if aside:
        return "set_aside"
    if not servers:
        return "no_servers"
    states = [s["state"] for s in servers]
    if all(state == "unchecked" for state in states):
        return "unchecked"
    if any(state == "unknown" for state in states):
        return "unknown"
    up = sum(state == "UP" for state in states)
    return "up" if up == len(states) else "down" if up == 0 else "degraded"


def describe(plan: Plan | None, result: ApplyResult | None, live: HaproxyLive | None) -> dict:
    """Every service of `plan` (and every key only excluded entries name) with its servers,
    live state, set-aside reason and excluded entries; plus the entries without a key. The one
    grouping of these facts: the page, /services.json and `proxymatic explain` all use it."""
    if plan is None:
        return {"services": [], "excluded_apart": []}
    by_key, apart = group_excluded(plan.excluded)
    aside = set_aside_by_key(result)
    vhosts = vhost_urls(plan)
    services = []
    for service in sorted(plan.services, key=lambda s: (s.port, s.protocol)):
        proxy = proxy_for(service, plan)
        reasons = aside.get(service.key, {})
        servers = [_server_view(service, server, proxy, live) for server in service.servers]
        state = _service_state(servers, proxy in reasons)
        services.append({
            "key": service.key, "port": service.port, "protocol": service.protocol, "name": service.name,
            "mode": service.mode, "source": service.source, "in_plan": True, "proxy": proxy,
            "vhost_url": vhosts.get(service.key, "") if "nginx" not in reasons else "",
            "set_aside": proxy in reasons, "set_aside_reason": reasons.get(proxy, ""),
            "set_aside_by": dict(reasons), "state": state, "state_text": STATE_TEXT[state],
            "servers": servers, "servers_up": sum(s["state"] == "UP" for s in servers),
            "servers_known": sum(s["state"] not in ("unknown", "unchecked") for s in servers),
            "excluded": by_key.get(service.key, []),
        })
    planned = {service.key for service in plan.services}
    for key in sorted(set(by_key) - planned, key=_key_sort):
        entries = by_key[key]
        port, _, protocol = key.partition("/")
        names = sorted({e["service"] for e in entries if e["service"]})
        services.append({
            "key": key, "port": int(port) if port.isdigit() else None, "protocol": protocol,
            "name": ", ".join(names), "mode": "", "source": ", ".join(sorted({e["source"] for e in entries})),
            "in_plan": False, "proxy": "", "vhost_url": "", "set_aside": False, "set_aside_reason": "",
            "set_aside_by": aside.get(key, {}), "state": "not_served", "state_text": STATE_TEXT["not_served"],
            "servers": [], "servers_up": 0, "servers_known": 0, "excluded": entries,
        })
    services.sort(key=lambda s: _key_sort(s["key"]))
    return {"services": services, "excluded_apart": apart}


def counts(services: list[dict], apart: list[dict]) -> dict:
    servers = [server for service in services for server in service["servers"]]
    by_state: dict[str, int] = defaultdict(int)
    for server in servers:
        by_state[server["state"]] += 1
    return {
        "services": sum(s["in_plan"] for s in services),
        "servers": len(servers),
        "servers_by_state": dict(sorted(by_state.items())),
        "servers_up": by_state.get("UP", 0),
        "set_aside": sum(s["set_aside"] for s in services),
        "not_served": sum(not s["in_plan"] for s in services),
        "needing_attention": sum(s["state"] in PROBLEM_STATES for s in services),
        "excluded": sum(len(s["excluded"]) for s in services) + len(apart),
    }


# --- the status stage's side ----------------------------------------------------------------

def haproxy_cache(settings: Settings) -> HaproxyStateCache:
    """This node's HAProxy state reader; the status stage makes one and keeps it (its 1 s cache
    is what spares the admin socket a page-refresh storm)."""
    return HaproxyStateCache(HaproxyPaths.for_run_dir(settings.run_dir).admin_socket)


def services_view(state: PipelineState, settings: Settings, haproxy: HaproxyStateCache | None = None) -> dict:
    node = settings.node
    with state.lock:
        plan = state.plan
        result = state.applied.get(node)
        applied_at = state.applied_at.get(node)
    uses_haproxy = plan is not None and plan.settings.haproxy and any(s.protocol == "tcp" for s in plan.services)
    live = (haproxy or haproxy_cache(settings)).get() if uses_haproxy else None
    described = describe(plan, result, live)
    return {
        "node": node,
        "generated_at": time.time(),
        "plan": None if plan is None else {
            "hash": plan.hash, "sources_ready": list(plan.sources_ready), "notes": list(plan.notes),
            "changed_at": plan.changed_at or None,
            "vhost_domain": plan.settings.vhost_domain, "vhost_port": plan.settings.vhost_port,
            "haproxy": plan.settings.haproxy},
        "applied": None if result is None else {
            "plan_hash": result.plan_hash, "ok": result.ok, "action": result.action,
            "errors": [str(e) for e in result.errors], "at": applied_at,
            "current": plan is not None and result.plan_hash == plan.hash},
        "haproxy": live.to_dict() if live is not None else None,
        "counts": counts(described["services"], described["excluded_apart"]),
        **described,
    }


# --- HTML --------------------------------------------------------------------------------------

def _clock(value: float | None) -> str:
    if not value:
        return "unknown"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))


def _ago(value: float | None, now: float | None = None) -> str:
    if not value:
        return ""
    seconds = max(0, int((now or time.time()) - value))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


_ENV.filters["clock"] = _clock
_ENV.filters["ago"] = _ago


def render_services_page(view: dict) -> str:
    return _ENV.get_template("services.html.j2").render(
        view=view, refresh=REFRESH_SECONDS, problem_states=PROBLEM_STATES)
