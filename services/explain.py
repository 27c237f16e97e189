"""`proxymatic explain PORT|NAME|APP_ID`: what is served there and what is not, and why, read
from the live bus.

It subscribes to the planner's plan (rebuilt from its key messages by a PlanFeed) and the
appliers' `applied.*` (the snapshot answers with every key and the newest of each at once), waits until both publishers' snapshots are complete (at most
`--wait` seconds, 5 by default), reads HAProxy's server states from this run dir's admin socket
when it can, and prints, in plain words, the services matching the query with their servers,
weights and states, whether the applier set them aside and why, and every task or entry not
served with its reason. The facts are grouped by services_page.describe, the same function
behind the status stage's /services page.

Exit status: 0 when something matches, 1 when nothing does, 2 when no plan was heard.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

import zmq

from services.applier.haproxy_render import HaproxyPaths
from services.applier.plan_feed import PlanFeed
from services.common.bus import Endpoint, Subscriber
from services.common.curve import BusSecurity
from services.common.config import Settings
from services.common.model import ApplyResult, ModelError, Plan
from services.common.wire import PLAN_PREFIX
from services.status.haproxy_state import HaproxyLive, read_haproxy
from services.status.services_page import describe

DEFAULT_WAIT = 5.0
_PORT_RE = re.compile(r"(\d{1,5})(?:/(tcp|udp))?\Z", re.I)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", metavar="PORT|NAME|APP_ID",
                        help="a service port (1234 or 1234/udp), a service name, a Marathon app id "
                             "(/shop/web) or a task id")
    parser.add_argument("--bus", action="append", default=[], metavar="ENDPOINT",
                        help="PUB endpoint of the planner or an applier (repeatable) "
                             "[default: the run dir's planner and applier]")
    parser.add_argument("--wait", type=float, default=DEFAULT_WAIT, metavar="SECONDS",
                        help=f"how long to wait for the plan [default: {DEFAULT_WAIT:g}]")
    parser.add_argument("--json", action="store_true", help="print what matches as one JSON document")
    parser.epilog = "Exit status: 0 something matches, 1 nothing matches, 2 no plan was heard."


def plain(value: object) -> str:
    """A value for the terminal: control characters (escape sequences) shown, never sent."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in str(value))


def read_bus(endpoints: list[Endpoint], wait: float, security: BusSecurity | None = None
             ) -> tuple[Plan | None, dict[str, ApplyResult], list[str]]:
    """The newest plan and every node's newest ApplyResult heard within `wait` seconds (less
    once every publisher's snapshot is complete), and the problems met (undecodable messages).
    `security`: the keys for tcp:// endpoints (services/common/curve.py)."""
    subscriber = Subscriber(zmq.Context.instance(), endpoints, [PLAN_PREFIX, "applied."], security=security)
    problems: list[str] = []
    plans = PlanFeed(subscriber, "explain",
                     on_drop=lambda message, reason: problems.append(f"{message.topic} from {message.sender}: {reason}"))
    plan: Plan | None = None
    results: dict[str, ApplyResult] = {}
    deadline = time.monotonic() + max(0.0, wait)
    try:
        while True:
            messages = subscriber.poll(min(0.2, max(0.0, deadline - time.monotonic())))
            plan = plans.feed(messages) or plan
            for message in messages:
                if message.is_heartbeat or plans.owns(message):
                    continue
                try:
                    if message.topic.startswith("applied."):
                        results[message.topic[len("applied."):]] = ApplyResult.from_dict(message.payload)
                except (ModelError, ValueError, TypeError) as error:
                    problems.append(f"{message.topic} from {message.sender}: {error}")
            if plan is not None and subscriber.snapshot_complete():
                break
            if time.monotonic() >= deadline:
                break
    finally:
        subscriber.close()
    return plan, results, problems


def pick_result(results: dict[str, ApplyResult], node: str) -> tuple[str, ApplyResult | None]:
    if node in results:
        return node, results[node]
    if len(results) == 1:
        return next(iter(results.items()))
    return node, None


def _app(value: str) -> str:
    return "/" + value.strip().strip("/").lower()


def match(query: str, described: dict) -> tuple[list[dict], list[dict]]:
    """The services (as `describe` gives them) and keyless excluded entries `query` names: a
    port (`1234`, `1234/udp`), a service name, a Marathon app id or a task id."""
    query = query.strip()
    port = _PORT_RE.match(query)
    if port:
        number, protocol = int(port.group(1)), (port.group(2) or "").lower()
        return ([s for s in described["services"]
                 if s["port"] == number and (not protocol or s["protocol"] == protocol)], [])
    from services.collector.marathon.apps import service_name
    needle, app = query.lower(), _app(query)
    from_app = (service_name(app)[0] or "").lower()

    def names_it(entry: dict) -> bool:
        return (entry["service"].lower() == needle or (entry["app"] and _app(entry["app"]) == app)
                or (entry["task"] and entry["task"] == query))

    services = [s for s in described["services"]
                if s["name"].lower() in (needle, from_app) or any(names_it(e) for e in s["excluded"])]
    return services, [e for e in described["excluded_apart"] if names_it(e)]


def _entry_line(entry: dict) -> str:
    what = f"task {entry['task']}" if entry["task"] else (
        entry["app"] or (f"service {entry['service']}" if entry["service"] else "entry"))
    if entry["task"] and entry["app"]:
        what += f" of {entry['app']}"
    if entry["service"] and not entry["key"] and (entry["task"] or entry["app"]):
        what += f" (service {entry['service']})"
    if entry["address"]:
        what += f" at {entry['address']}"
    return plain(f"{what}: {entry['reason']} [{entry['code']}, from {entry['source']}]")


def _server_line(server: dict) -> str:
    state = server["state"]
    extra = [server["check"]] if server.get("check") else []
    if server.get("detail"):
        extra.append(server["detail"])
    text = f"{server['address']}  weight {server['weight']}  {state}"
    if server.get("hostname"):
        text = f"{server['address']} ({server['hostname']})  weight {server['weight']}  {state}"
    return plain(text + (f"  ({'; '.join(extra)})" if extra else ""))


def format_service(service: dict) -> list[str]:
    lines = []
    name = service["name"] or "(no name)"
    if service["in_plan"]:
        head = (f"{service['key']} {name} ({service['mode']}, from {service['source']}): "
                f"served by {service['proxy']} on port {service['port']}")
        if service["vhost_url"]:
            head += f", nginx virtual host {service['vhost_url']}"
        lines.append(plain(head))
        if service["set_aside"]:
            lines.append(plain(f"  SET ASIDE by {service['proxy']}: {service['set_aside_reason']} "
                               "(not served on this node)"))
        for driver, reason in sorted(service["set_aside_by"].items()):
            if driver != service["proxy"]:
                lines.append(plain(f"  set aside by {driver}: {reason}"))
        servers = service["servers"]
        if servers:
            count = f"{len(servers)} server{'s' if len(servers) != 1 else ''}"
            lines.append(f"  {count}, {service['servers_up']} UP:" if service["servers_known"] else f"  {count}:")
            lines.extend(f"    {_server_line(server)}" for server in servers)
        else:
            lines.append("  no servers: the port is listened on and connections are refused")
    else:
        lines.append(plain(f"{service['key']} {name}: NOT SERVED (not in the plan)"))
    if service["excluded"]:
        lines.append(f"  not served ({len(service['excluded'])}):")
        lines.extend(f"    {_entry_line(entry)}" for entry in service["excluded"])
    return lines


def explain(settings: Settings, args: argparse.Namespace) -> int:
    endpoints = [Endpoint.parse(e) for e in args.bus] or [*settings.buses("planner"), settings.bus("applier")]
    plan, results, problems = read_bus(endpoints, args.wait, BusSecurity.from_settings(settings))
    for problem in problems:
        print(f"proxymatic explain: ignored {plain(problem)}", file=sys.stderr)
    if plan is None:
        print(f"proxymatic explain: no plan heard within {args.wait:g} s on "
              f"{', '.join(e.pub for e in endpoints)}: is the planner running? "
              "(another run dir: --run-dir; another node: --bus)", file=sys.stderr)
        return 2
    node, result = pick_result(results, settings.node)
    live: HaproxyLive | None = None
    if plan.settings.haproxy and any(s.protocol == "tcp" and s.servers for s in plan.services):
        live = read_haproxy(HaproxyPaths.for_run_dir(settings.run_dir).admin_socket)
    wanted, apart = match(args.query, describe(plan, result, live))
    if not wanted and not apart:
        print(f"proxymatic explain: nothing known as {plain(args.query)!r}: no service port, name or app id "
              f"matches; {len(plan.services)} service{'s' if len(plan.services) != 1 else ''} in the plan",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"query": args.query, "plan": plan.hash, "node": node,
                          "applied": result.to_dict() if result else None,
                          "haproxy": live.to_dict() if live else None,
                          "services": wanted, "excluded_apart": apart}, indent=2, sort_keys=True))
        return 0
    lines = []
    for service in wanted:
        lines.extend(format_service(service))
    if apart:
        lines.append(f"not attributable to a port ({len(apart)}):")
        lines.extend(f"    {_entry_line(entry)}" for entry in apart)
    if result is None:
        applied = f"no applier result heard for node {plain(node)}"
    else:
        applied = (f"node {plain(node)} applied plan {result.plan_hash} ({result.action}, "
                   f"{'ok' if result.ok else 'NOT ok'})")
        if result.plan_hash != plan.hash:
            applied += "; the newest plan is not applied yet"
    lines.append(f"plan {plan.hash}; {applied}")
    if live is not None and not live.ok and any(s["proxy"] == "haproxy" and s["servers"] for s in wanted):
        lines.append(plain(f"HAProxy's server states could not be read: {live.error}"))
    print("\n".join(lines))
    return 0
