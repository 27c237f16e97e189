"""The status stage: `GET /status` for upstream load balancers, `/status/details` (JSON) for
operators, and every other path proxied to HAProxy's statistics page, all on STATUS_ENDPOINT.

It listens to the whole bus (the plan, rebuilt from its key messages by a PlanFeed; applied
results; heartbeats, which carry the sources' states and each stage's pid) and probes this
node's proxies about once a second (health.py, probes.py). By ROLE it follows what runs
(`upstreams`): a central its collector and planner, a node every central's planner and its own
applier; a central probes no proxy (docs/roles.md).
TERMINATING comes from the marker file the launcher writes on SIGTERM (`<run_dir>/terminating`),
so it survives a restart of this stage. `/status/details` is redacted: no URL password leaves.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import zmq

from services.applier.plan_feed import PlanFeed
from services.common.bus import Endpoint, Message, Subscriber
from services.common.curve import BusSecurity
from services.common.config import Settings
from services.common.model import ApplyResult
from services.common.redact import redact
from services.common.unix_socket import exchange
from services.common.wire import PLAN_PREFIX
from services.status.health import ProbeStatus, Prober
from services.status.metrics import METRICS_CONTENT_TYPE, render_metrics
from services.status.probes import ProbeTargets
from services.status.services_page import haproxy_cache, render_services_page, services_view
from services.status.state import OK, PipelineState, StageLiveness

log = logging.getLogger("proxymatic.status")


def terminating_marker(settings: Settings) -> str:
    return settings.path("terminating")


def haproxy_stats_socket(settings: Settings) -> str:
    return settings.path("haproxy", "stats.sock")


def absorb(state: PipelineState, pids: dict[str, int | None], message: Message) -> None:
    """Take what /status needs from one bus message other than the plan's (call with the
    state's lock held)."""
    payload = message.payload
    if message.is_heartbeat:
        state.heartbeat_payloads[message.sender] = payload
        pids[message.sender] = payload.get("pid") if isinstance(payload.get("pid"), int) else None
        busy = payload.get("busy_seconds")
        if isinstance(busy, (int, float)) and not isinstance(busy, bool):
            state.busy[message.sender] = float(busy)
        if payload.get("stage") == "collector" and isinstance(payload.get("sources"), dict):
            state.sources.update({name: summary for name, summary in payload["sources"].items()
                                  if isinstance(name, str) and isinstance(summary, dict)})
        elif payload.get("stage") == "applier" and message.sender.startswith("applier@"):
            state.served_sources[message.sender[len("applier@"):]] = strings(payload.get("served_sources", []))
    elif message.topic.startswith("applied."):
        node = message.topic[len("applied."):]
        state.applied[node] = applied_result(payload)
        state.applied_at[node] = message.ts


def follow_plan(state: PipelineState, plans: PlanFeed, messages: list[Message]) -> None:
    """The plan's messages among `messages`: the plan rebuilt from its keys when a summary
    matches (built outside the state's lock; a message that does not decode is dropped and
    counted by the subscriber; a summary that disagrees makes the feed resync)."""
    plan = plans.feed(messages)
    if plan is not None:
        with state.lock:
            state.plan = plan


def strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"expected a list of strings, got {type(value).__name__}")
    return tuple(value)


def applied_result(payload: dict) -> ApplyResult:
    """An `applied.<node>` payload, checked as far as /status reads it: one malformed result is
    dropped, it never breaks the probes or /status/details."""
    result = ApplyResult.from_dict(payload)
    for driver, detail in result.details.items():
        if not isinstance(detail, dict):
            raise ValueError(f"details of driver {driver!r} is not an object")
        set_aside = detail.get("set_aside", {})
        if not isinstance(set_aside, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in set_aside.items()):
            raise ValueError(f"details.{driver}.set_aside is not an object of strings")
    strings(list(result.errors))
    return result


def upstreams(settings: Settings) -> list[Endpoint]:
    """The publishers this role has (docs/roles.md): `all` every stage of this node; `central`
    its collector and planner (no applier); `node` every central's planner (PLANNER_BUS may list
    several) and its own applier (no collector)."""
    endpoints: list[Endpoint] = []
    if settings.role in ("all", "central"):
        endpoints.append(settings.bus("collector"))
    endpoints += settings.buses("planner")
    if settings.role in ("all", "node"):
        endpoints.append(settings.bus("applier"))
    return endpoints


def follow_bus(settings: Settings, state: PipelineState, stop: threading.Event) -> None:
    ctx = zmq.Context.instance()
    # Sources are followed through the collector's heartbeats (a summary per source), not its
    # full snapshots, which would cost a large decode here on every change.
    subscriber = Subscriber(ctx, upstreams(settings),
                            [PLAN_PREFIX, "applied."], security=BusSecurity.from_settings(settings))
    plans = PlanFeed(subscriber, "status")
    pids: dict[str, int | None] = {}
    own_name = f"status@{settings.node}"
    try:
        while not stop.is_set():
            try:
                messages = subscriber.poll(0.2)
            except Exception:  # the bus thread must outlive anything one read can raise
                log.exception("status: reading the bus failed; going on")
                stop.wait(0.2)
                continue
            try:
                follow_plan(state, plans, messages)
            except Exception:  # the bus thread must outlive anything
                log.exception("status: following the plan failed; going on")
            with state.lock:
                state.heartbeats = subscriber.senders()
                for message in messages:
                    if plans.owns(message):
                        continue
                    try:
                        absorb(state, pids, message)
                    except Exception as error:  # one odd message must not stop following the bus
                        log.warning("status: ignoring %s from %s: %s: %s", message.topic, message.sender,
                                    type(error).__name__, error)
                state.stages = {sender: StageLiveness(subscriber.alive(sender), age, pids.get(sender),
                                                      state.busy.get(sender))
                                for sender, age in state.heartbeats.items()}
                state.stages[own_name] = StageLiveness(True, 0.0, os.getpid())
    finally:
        subscriber.close()


def start_prober(settings: Settings, state: PipelineState, stop: threading.Event) -> threading.Thread:
    def applied() -> ApplyResult | None:
        with state.lock:
            return state.applied.get(settings.node)

    def publish(statuses: dict[str, ProbeStatus]) -> None:
        with state.lock:
            state.proxies = dict(statuses)

    targets = ProbeTargets(settings)
    prober = Prober(targets.probes, applied, publish, timeout=targets.timeout)
    thread = threading.Thread(target=prober.run, args=(stop,), name="status-prober", daemon=True)
    thread.start()
    return thread


def proxy_to_unix_http(path: str, request_line: bytes, headers: list[tuple[str, str]]) -> bytes:
    """Forward one HTTP request to a unix-socket HTTP server and return the raw response."""
    head = request_line + b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers
                                   if k.lower() not in ("connection", "keep-alive"))
    return exchange(path, head + b"Connection: close\r\n\r\n", timeout=5)


def make_handler(settings: Settings, state: PipelineState):
    haproxy_live = haproxy_cache(settings)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"
        server_version = "proxymatic"

        def do_GET(self) -> None:
            self._answer(with_body=True)

        def do_HEAD(self) -> None:
            self._answer(with_body=False)

        def _answer(self, with_body: bool) -> None:
            terminating = os.path.exists(terminating_marker(settings))
            if self.path == "/status":
                verdict = state.verdict(settings.node, terminating)
                self._reply(200 if verdict == OK else 503, (verdict + "\n").encode(), "text/plain", with_body)
            elif self.path == "/metrics":
                body = render_metrics(state, settings)
                self._reply(200, body, METRICS_CONTENT_TYPE, with_body)
            elif self.path in ("/services", "/services.json"):
                view = services_view(state, settings, haproxy_live)
                if self.path == "/services.json":
                    body = redact(json.dumps(view, indent=2, sort_keys=True)).encode() + b"\n"
                    self._reply(200, body, "application/json", with_body)
                else:
                    self._reply(200, render_services_page(view).encode(), "text/html; charset=utf-8", with_body)
            elif self.path in ("/status/details", "/status.json"):
                details = state.details(settings.node, terminating)
                # Errors and source states may quote a URL: no password leaves this endpoint.
                body = redact(json.dumps(details, indent=2, sort_keys=True)).encode() + b"\n"
                self._reply(200 if details["status"] == OK else 503, body, "application/json", with_body)
            else:
                self._proxy_stats(self.command)

        def _proxy_stats(self, method: str) -> None:
            request_line = f"{method} {self.path} HTTP/1.0\r\n".encode("latin-1")
            try:
                raw = proxy_to_unix_http(haproxy_stats_socket(settings), request_line, list(self.headers.items()))
            except OSError as error:
                self._reply(502, f"HAProxy statistics unavailable: {error}\n".encode(), "text/plain",
                            method != "HEAD")
                return
            self.wfile.write(raw)

        def _reply(self, code: int, body: bytes, content_type: str, with_body: bool = True) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def log_message(self, fmt: str, *args) -> None:
            log.debug("status: %s " + fmt, self.client_address[0], *args)

    return Handler


def run(settings: Settings, stop: threading.Event) -> None:
    # A node runs no collector: its sources are the central's (the plan's inputs), whatever
    # source options it was given.
    state = PipelineState(configured_sources=settings.sources if settings.role != "node" else (), role=settings.role)
    bus_thread = threading.Thread(target=follow_bus, args=(settings, state, stop), name="status-bus", daemon=True)
    bus_thread.start()
    if settings.role != "central":  # a central runs no proxy
        start_prober(settings, state, stop)
    if not settings.status_endpoint:
        log.info("status: STATUS_ENDPOINT is empty; HTTP endpoint disabled")
        stop.wait()
        return
    host, _, port = settings.status_endpoint.rpartition(":")
    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer((host, int(port)), make_handler(settings, state))
    server.daemon_threads = True
    log.info("status: serving /status on %s", settings.status_endpoint)
    threading.Thread(target=lambda: (stop.wait(), server.shutdown()), daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
