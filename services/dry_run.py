"""`proxymatic plan`: a dry run (marathon-lb's `--dry`).

Reads every configured source once, with the collector's own source classes (Marathon without
its event stream, registrator's etcd reader, the services file), makes the plan with the
planner's policies (services/planner/policy.py make_plan), and prints it with the configs the
applier would render from it: haproxy.cfg (services/applier/haproxy_render.py), each Pen's
command line and server table (pen_driver / pen_runner), and nginx.conf with VHOST_DOMAIN
(nginx_render.py). `--json` prints the plan alone (Plan.to_dict()).

It starts no process, binds nothing and writes nothing: the configs are rendered as text with
the paths of the configured run dir, so they read exactly as the applier would write them there.
Bounded in time: every source is read in a thread of its own and the whole read ends after
`--timeout` seconds (a Marathon that accepts connections and never answers included). Exit 0
with the plan; exit 1, with the reason on stderr, when a source cannot be read.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass

from services.collector.source import Discovery, Source, SourceError
from services.common.config import ConfigError, Settings
from services.common.model import Plan, SourceSnapshot
from services.common.redact import redact

DEFAULT_TIMEOUT = 20.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the plan alone, as JSON")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"give up reading the sources after SECONDS [default: {DEFAULT_TIMEOUT:g}]")


class PlanError(Exception):
    """A source could not be read: the message says which and why."""


# -- reading the sources once ------------------------------------------------------------------

def build_source(name: str, settings: Settings, timeout: float) -> Source:
    """One configured source, for a single read: the collector's classes, with timeouts that fit
    in `timeout` and no event stream or watch kept open longer than needed."""
    if name == "marathon":
        from services.collector.marathon import MarathonSource
        return MarathonSource(settings, events=False, request_timeout=max(0.1, min(10.0, timeout)),
                              connect_timeout=max(0.1, min(3.0, timeout)))
    if name == "registrator":
        from services.collector.registrator import RegistratorSource
        return RegistratorSource(settings, initial_timeout=timeout, read_timeout=max(0.1, min(10.0, timeout)),
                                 connect_timeout=max(0.1, min(2.0, timeout)))
    if name == "file":
        from services.collector.file_source import FileSource
        return FileSource(settings.services_file)
    raise ValueError(f"unknown source {name!r}")


@dataclass
class _Read:
    name: str
    discovery: Discovery | None = None
    error: str = ""


def _read(name: str, settings: Settings, timeout: float, result: _Read, opened: list[Source]) -> None:
    try:
        source = build_source(name, settings, timeout)
    except (SourceError, ConfigError, ValueError) as error:
        result.error = f"cannot start: {error}"
        return
    opened.append(source)
    try:
        result.discovery = source.current()
    except SourceError as error:
        result.error = str(error)
    except Exception as error:  # noqa: BLE001 - a bug in one source: say so, exit 1
        result.error = f"internal error: {type(error).__name__}: {error}"


def read_sources(settings: Settings, timeout: float) -> dict[str, SourceSnapshot]:
    """One snapshot per configured source, all read at once; PlanError naming every source that
    failed, or did not answer within `timeout` seconds."""
    results = {name: _Read(name) for name in settings.sources}
    opened: list[Source] = []
    threads = [threading.Thread(target=_read, args=(name, settings, timeout, results[name], opened),
                                name=f"plan-{name}", daemon=True) for name in settings.sources]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    failures = []
    for thread, (name, result) in zip(threads, results.items()):
        if thread.is_alive():
            failures.append(f"source {name}: no answer within {timeout:g} s")
        elif result.error:
            failures.append(f"source {name}: {result.error}")
    closers = [threading.Thread(target=_close, args=(source,), daemon=True) for source in list(opened)]
    for closer in closers:
        closer.start()
    closed_by = time.monotonic() + 2.0  # a close that hangs does not hold the exit: the threads are daemons
    for closer in closers:
        closer.join(max(0.0, closed_by - time.monotonic()))
    if failures:
        raise PlanError(redact("; ".join(failures)))
    snapshots = {}
    for name, result in results.items():
        discovery = result.discovery
        assert discovery is not None
        snapshots[name] = SourceSnapshot(
            name, "degraded" if discovery.degraded else "ok", discovery.services,
            error=redact(discovery.degraded), warnings=tuple(redact(w) for w in discovery.warnings),
            **({"excluded": discovery.excluded} if getattr(discovery, "excluded", None) else {}))
    return snapshots


def _close(source: Source) -> None:
    try:
        source.close()
    except Exception:  # noqa: BLE001 - nothing left to do with it
        pass


# -- rendering ---------------------------------------------------------------------------------

def render_haproxy(plan: Plan, settings: Settings) -> str:
    from services.applier.haproxy_launch import fd_limit, run_as
    from services.applier.haproxy_render import HaproxyPaths, assign_slots, haproxy_services, render
    slots = assign_slots(haproxy_services(plan), {})
    return render(plan, HaproxyPaths.for_run_dir(settings.run_dir), slots, fd_limit(), run_as=run_as())


def render_pen(plan: Plan, settings: Settings) -> tuple[str, list[str]]:
    """(instances.json, then per pen its command line and the servers of its table), warnings."""
    from services.applier.pen_driver import assign_slots, choose_servers, pen_services
    from services.applier.pen_runner import PenFiles, PenInstance, pen_argv, render_instances
    files = PenFiles.of(settings)
    instances, lines, warnings = [], [], []
    for service in pen_services(plan):
        instance = PenInstance(port=service.port, protocol=service.protocol, slots=plan.settings.pen_servers,
                               clients=plan.settings.pen_clients, max_connections=plan.settings.max_connections)
        instances.append(instance)
        chosen, more = choose_servers(service, plan.settings.pen_servers)
        warnings += more
        table = assign_slots({}, chosen, plan.settings.pen_servers)
        # The runner starts pens as `nobody` through setpriv when root (pen_runner.pen_user):
        # that check starts a process, so the command line is shown as for the current user.
        lines.append(f"# {service.key} {service.name}: {' '.join(pen_argv(instance, files))}")
        used = [(index, slot) for index, slot in enumerate(table) if slot is not None]
        lines += [slot.command(index, moved=False) for index, slot in used]
        lines.append(f"# ({len(table) - len(used)} empty slots of {len(table)})")
    if not instances:
        return "", warnings
    return render_instances(instances) + "\n".join(lines) + "\n", warnings


def render_nginx(plan: Plan, settings: Settings) -> tuple[str, list[str]]:
    from services.applier.nginx_driver import nginx_user
    from services.applier.nginx_render import render
    rendered = render(plan, settings.path("nginx"), user=nginx_user())
    return rendered.text, list(rendered.warnings)


def describe_plan(plan: Plan, snapshots: dict[str, SourceSnapshot]) -> list[str]:
    lines = [f"plan {plan.hash}: {len(plan.services)} services, "
             f"{sum(len(s.servers) for s in plan.services)} servers, sources ready: "
             f"{', '.join(plan.sources_ready) or 'none'}"]
    for service in plan.services:
        extra = f"mode {service.mode}, from {service.source}"
        if service.health_check:
            extra += f", health check {service.health_check.protocol}"
        lines.append(f"  {service.key} {service.name} ({extra}): "
                     + (", ".join(f"{s.address} weight {s.weight}" + (f" maxconn {s.maxconn}" if s.maxconn else "")
                                  for s in service.servers) or "no servers"))
    for name, snapshot in sorted(snapshots.items()):
        if snapshot.error:
            lines.append(f"source {name}: {snapshot.state}: {snapshot.error}")
        lines += [f"source {name}: warning: {warning}" for warning in snapshot.warnings]
    lines += [f"note: {note}" for note in plan.notes]
    for item in getattr(plan, "excluded", ()):
        where = " ".join(v for v in (item.key, item.service, item.address, item.app, item.task) if v)
        lines.append(f"excluded ({item.source}): {where}: {item.reason}")
    return lines


def section(title: str, text: str) -> str:
    return f"\n# ---- {title} ----\n{text.rstrip()}\n"


def dry_run(settings: Settings, args: argparse.Namespace) -> int:
    from services.planner.policy import make_plan
    timeout = getattr(args, "timeout", DEFAULT_TIMEOUT)
    if not timeout > 0:
        print("proxymatic plan: error: --timeout must be more than 0 seconds", file=sys.stderr)
        return 1
    # What a source warns about is in the output (its warnings) or the error: not twice.
    sources_log = logging.getLogger("proxymatic.collector")
    level = sources_log.level
    if not settings.verbose:
        sources_log.setLevel(logging.ERROR)
    try:
        snapshots = read_sources(settings, timeout)
    except PlanError as error:
        print(f"proxymatic plan: error: {error}", file=sys.stderr)
        return 1
    finally:
        sources_log.setLevel(level)
    plan = make_plan(snapshots, settings)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, sort_keys=True))
        return 0
    out = ["\n".join(describe_plan(plan, snapshots))]
    warnings: list[str] = []
    failed: list[str] = []

    def rendered(proxy: str, title: str, render) -> None:
        try:
            text, more = render(plan, settings)
        except ValueError as error:  # RenderError and the like: the applier would reject the plan
            failed.append(f"{proxy}: cannot render: {error}")
            out.append(section(title, f"# cannot render: {error}"))
            return
        warnings.extend(f"{proxy}: {w}" for w in more)
        if text:
            out.append(section(title, text))

    if settings.haproxy:
        rendered("haproxy", f"HAProxy: {settings.path('haproxy', 'haproxy.cfg')}",
                 lambda p, s: (render_haproxy(p, s), []))
    rendered("pen", f"Pen: {settings.path('pen', 'instances.json')}, then each pen's command line and server table",
             render_pen)
    if settings.vhost_domain:
        rendered("nginx", f"nginx: {settings.path('nginx', 'nginx.conf')}", render_nginx)
    if warnings:
        out.append("\n" + "\n".join(f"warning: {w}" for w in warnings))
    print("\n".join(out), flush=True)
    for failure in failed:
        print(f"proxymatic plan: error: {failure}", file=sys.stderr)
    return 1 if failed else 0
