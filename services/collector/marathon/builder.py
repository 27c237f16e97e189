"""The services, built incrementally: one fragment per app, ports re-merged only where
backends changed (`ServiceBuilder`), and its one-shot form (`build_services`).

Pure: host names are resolved through a callable the caller passes in. It never raises out of
`build_services` on bad data: one task, app or port is skipped alone, with a warning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from services.collector.exclusions import excluded as make_excluded
from services.collector.marathon.apps import AppSpec, PortRoute, clip
from services.collector.marathon.tasks import (SERVING_STATES, Backend, health_reason, task_backends, task_excluded,
                                               task_health)
from services.common.model import Excluded, HealthCheck, ModelError, Server, Service, bounded_excluded, validate_name

MAX_WARNINGS = 200


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
                excluded.extend(task_excluded(task, spec, "health_failing", health_reason(task)))
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
        # The keys ("port/protocol") whose service changed since the last `take_changed()`.
        self._changed: set[str] = set()
        self.stats = {"fragments_built": 0, "fragments_reused": 0, "ports_merged": 0}

    def fragment(self, app_id: str) -> AppFragment | None:
        return self._fragments.get(app_id)

    def take_changed(self) -> frozenset[str]:
        """The keys ("port/protocol") whose service was added, changed or removed by the merges
        since the last call (call after `result()`, which merges), and forget them."""
        changed, self._changed = frozenset(self._changed), set()
        return changed

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
                    self._changed.add(f"{key[0]}/{key[1]}")
            elif old is None or old != service:
                keys_changed = keys_changed or old is None
                services_changed = True
                self._services[key] = service
                self._changed.add(f"{key[0]}/{key[1]}")
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
    by_app: dict[str, tuple[list[tuple[Mapping, AppSpec]], tuple[str, ...]]] = {}
    for task, spec in pairs:
        by_app.setdefault(getattr(spec, "app_id", "?"), ([], ()))[0].append((task, spec))
    return build_apps(by_app, resolve, previously_served, extra_warnings, extra_excluded)


def build_apps(apps: Mapping[str, tuple[list[tuple[Mapping, AppSpec]], Iterable[str]]],
               resolve: Callable[[str], str | None], previously_served: frozenset[str] | set[str] = frozenset(),
               extra_warnings: Iterable[str] = (), extra_excluded: Iterable[Excluded] = ()) -> BuildResult:
    """`build_services` with the pairs given per app, each with its own extra warnings."""
    builder = ServiceBuilder()
    for app_id, (app_pairs, app_warnings) in apps.items():
        builder.update(app_id, app_pairs, resolve, app_warnings, previously_served=previously_served)
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
