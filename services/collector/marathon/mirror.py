"""The mirror of Marathon's apps and tasks, and the pure steps from it to what the builder takes.

`MarathonState` is what MarathonSource knows of the cluster: every app's parsed spec (and a
fingerprint of its definition, to skip parsing it again), and its tasks. Fetches make it (`take_app`), events change it (events.step), and
`pairs_for` gives, per app, the (task, spec of the task's version) pairs `ServiceBuilder`
builds from. Versions a task runs that are not the current definition are looked up in a cache
the caller keeps (`versions`): `missing_versions` says which to load, `load_version` parses
one. Nothing here does I/O.

`build_from_payloads` runs the same steps over whole payloads (apps with embedded tasks,
/v2/tasks entries, the versions' definitions): tests and tools see what the source would.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import orjson

from services.collector.exclusions import excluded as make_excluded
from services.collector.marathon.apps import AppError, AppSpec, app_skipped, clip, parse_app
from services.collector.marathon.builder import BuildResult, build_apps
from services.collector.marathon.tasks import app_uses_current_config
from services.common.model import Excluded

KEEP_TASK_KEYS = ("id", "appId", "host", "ports", "ipAddresses", "version", "state", "healthCheckResults")
# Fields of an app in /v2/apps that change without its definition changing (no new parse).
VOLATILE_APP_KEYS = frozenset({"tasks", "tasksStaged", "tasksRunning", "tasksHealthy", "tasksUnhealthy",
                               "deployments", "lastTaskFailure", "taskStats", "readinessCheckResults"})
# `spec_for`: the task's version is not in the cache yet (load it first)
MISSING = False

# (what is kept of the app's definition: `definition_record`, its spec). Not the definition
# itself: at 10,000 apps Marathon's JSON was most of the collector's memory.
AppEntry = tuple[dict, AppSpec]
VersionKey = tuple[str, str]  # (app id, version)


@dataclass(frozen=True)
class MarathonState:
    """The apps and their tasks. Never changed in place once built: a change makes a new state
    sharing what it did not change (events.step), so a state handed out stays what it was."""

    apps: Mapping[str, AppEntry] = field(default_factory=dict)  # app id -> (definition record, spec)
    tasks: Mapping[str, Mapping[str, dict]] = field(default_factory=dict)  # app id -> task id -> slim task

    def with_task(self, app_id: str, task_id: str, task: dict | None) -> "MarathonState":
        """This state with one task replaced (None: removed)."""
        tasks = dict(self.tasks)
        app_tasks = dict(tasks.get(app_id, {}))
        if task is None:
            app_tasks.pop(task_id, None)
        else:
            app_tasks[task_id] = task
        tasks[app_id] = app_tasks
        return MarathonState(self.apps, tasks)

    def without_app(self, app_id: str) -> "MarathonState":
        apps, tasks = dict(self.apps), dict(self.tasks)
        apps.pop(app_id, None)
        tasks.pop(app_id, None)
        return MarathonState(apps, tasks)

    def with_apps(self, fetched: Mapping[str, AppEntry], fetched_tasks: Mapping[str, Mapping[str, dict]],
                  app_ids: Iterable[str]) -> "MarathonState":
        """This state with `app_ids` replaced by what a fetch said of them (absent: gone)."""
        apps, tasks = dict(self.apps), dict(self.tasks)
        for app_id in app_ids:
            if app_id in fetched:
                apps[app_id] = fetched[app_id]
                tasks[app_id] = fetched_tasks.get(app_id, {})
            else:
                apps.pop(app_id, None)
                tasks.pop(app_id, None)
        return MarathonState(apps, tasks)


def slim(task: dict, app_id: str) -> dict:
    """What the mirror keeps of a task."""
    kept = {key: task[key] for key in KEEP_TASK_KEYS if key in task}
    kept["appId"] = app_id
    return kept


def fingerprint(app: dict) -> str:
    """A digest of the app's definition minus the fields that change without it changing."""
    stable = {key: value for key, value in app.items() if key not in VOLATILE_APP_KEYS}
    try:
        text = orjson.dumps(stable, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # what orjson cannot encode (integers past 64 bits...): still a digest
        text = json.dumps(stable, sort_keys=True, default=repr).encode()
    return hashlib.blake2b(text, digest_size=16).hexdigest()


def definition_record(app: dict) -> dict:
    """What the mirror keeps of a definition: its fingerprint, and what `app_uses_current_config`
    reads (the version and when the config last changed)."""
    info = app.get("versionInfo")
    changed = info.get("lastConfigChangeAt") if isinstance(info, dict) else None
    return {"fingerprint": fingerprint(app), "version": app.get("version"),
            "versionInfo": {"lastConfigChangeAt": changed}}


def known_spec(known: Mapping[str, AppEntry], app: Any) -> AppSpec | None:
    """The spec parsed last time when the app's definition has not changed since (a full sync
    of 1,000 apps then parses only what changed)."""
    if not isinstance(app, dict) or not isinstance(app.get("id"), str):
        return None
    app_id = app["id"] if app["id"].startswith("/") else "/" + app["id"]
    entry = known.get(app_id)
    if entry is None:
        return None
    record, spec = entry
    return spec if record["fingerprint"] == fingerprint(app) else None


def take_app(app: Any, known: Mapping[str, AppEntry], warnings: list[str], excluded: list[Excluded]
             ) -> tuple[str, AppEntry, dict[str, dict]] | None:
    """One app of /v2/apps (tasks embedded) -> (app id, (definition, spec), its slim tasks by
    id), or None when the app cannot be used (said in `warnings` and `excluded`)."""
    try:
        spec = known_spec(known, app) or parse_app(app)
    except AppError as error:
        warnings.append(f"app skipped: {error}")
        excluded.append(app_skipped(app, error))
        return None
    except Exception as error:  # hostile data: skip this app alone
        warnings.append(f"app {clip(app.get('id') if isinstance(app, dict) else app)} skipped: {clip(str(error), 120)}")
        excluded.append(app_skipped(app, error))
        return None
    raw_tasks = app.get("tasks")
    tasks = {}
    for task in raw_tasks if isinstance(raw_tasks, list) else []:
        if isinstance(task, dict) and isinstance(task.get("id"), str):
            tasks[task["id"]] = slim(task, spec.app_id)
        else:
            warnings.append(f"app {clip(spec.app_id)}: malformed task {clip(task)} skipped")
            excluded.append(make_excluded("marathon", "bad_data", f"malformed task {clip(task)} skipped",
                                          app=spec.app_id, service=spec.name or ""))
    return spec.app_id, (definition_record(app), spec), tasks


def spec_for(state: MarathonState, versions: Mapping[VersionKey, AppSpec | None], task: Mapping
             ) -> AppSpec | None | bool:
    """The spec of a task's app version: the current definition when the task runs it, else
    the cached version (None: Marathon has it no more), or MISSING when it must be loaded."""
    app_id, version = task.get("appId"), task.get("version")
    entry = state.apps.get(app_id) if isinstance(app_id, str) else None
    if entry is not None and app_uses_current_config(entry[0], version):
        return entry[1]
    if not isinstance(app_id, str) or not isinstance(version, str):
        return None
    key = (app_id, version)
    if key in versions:
        return versions[key]
    return MISSING


def missing_versions(state: MarathonState, versions: Mapping[VersionKey, AppSpec | None],
                     app_ids: Iterable[str]) -> set[VersionKey]:
    """(app id, version) of the tasks of `app_ids` whose version must be loaded first."""
    return {(task["appId"], task["version"]) for app_id in app_ids
            for task in state.tasks.get(app_id, {}).values() if spec_for(state, versions, task) is MISSING}


def load_version(app: Any) -> tuple[AppSpec | None, str | None]:
    """The definition of `/v2/apps/{id}/versions/{version}` (None: not found) -> (its spec or
    None, why it cannot be used or None)."""
    if app is None:
        return None, None
    try:
        return parse_app(app), None
    except AppError as error:
        return None, str(error)


def pairs_for(state: MarathonState, versions: Mapping[VersionKey, AppSpec | None], app_id: str
              ) -> tuple[list[tuple[dict, AppSpec]], list[str]]:
    """(task copy, spec of its version) for the tasks of one app, and warnings. A version
    Marathon no longer has falls back to the current definition, with a warning."""
    pairs: list[tuple[dict, AppSpec]] = []
    warnings: list[str] = []
    for task in state.tasks.get(app_id, {}).values():
        spec = spec_for(state, versions, task)
        if spec is None and app_id in state.apps:
            # the version is gone from Marathon: the current definition is the best guess
            spec = state.apps[app_id][1]
            warnings.append(f"app {clip(app_id)}: version {clip(task.get('version'))} of task "
                            f"{clip(task.get('id'))} not found; using the current definition")
        if spec:
            # A shallow copy: the fragment's inputs to compare with (tasks are replaced, never
            # changed in place, so this is a snapshot anyway).
            pairs.append((dict(task), spec))
    return pairs, warnings


def build_from_payloads(apps: Iterable[Any], tasks: Iterable[Any] = (),
                        versions: Mapping[VersionKey, Any] | None = None,
                        resolve: Callable[[str], str | None] | None = None,
                        previously_served: frozenset[str] = frozenset()) -> BuildResult:
    """Apps (each possibly with embedded `tasks`) plus /v2/tasks entries -> services, through
    the source's own steps (take_app, missing_versions, load_version, pairs_for, the builder).
    `versions` maps (app id, version) to the bare app of `/v2/apps/{id}/versions/{version}`."""
    from services.collector.resolve import Resolver  # local: keeps this module free of sockets

    resolve = resolve or Resolver()
    versions = versions or {}
    warnings: list[str] = []
    excluded: list[Excluded] = []
    state_apps: dict[str, AppEntry] = {}
    state_tasks: dict[str, dict[str, dict]] = {}
    cache: dict[VersionKey, AppSpec | None] = {}
    for app in apps:
        taken = take_app(app, {}, warnings, excluded)
        if taken:
            app_id, entry, app_tasks = taken
            state_apps[app_id], state_tasks[app_id] = entry, app_tasks
            cache[(app_id, entry[1].version)] = entry[1]
    for task in tasks:  # /v2/tasks entries: each names its app
        app_id = task.get("appId") if isinstance(task, dict) else None
        if not isinstance(task, dict) or not isinstance(task.get("id"), str) or not isinstance(app_id, str):
            warnings.append(f"task skipped: not a task of an app ({clip(task)})")
            excluded.append(make_excluded("marathon", "bad_data", f"task skipped: not a task of an app ({clip(task)})"))
            continue
        version = task.get("version")
        if app_id not in state_apps and not (isinstance(version, str) and (app_id, version) in versions):
            warnings.append(f"task {clip(task.get('id'))}: no definition for app {clip(app_id)} "
                            f"version {clip(task.get('version'))}; skipped")
            excluded.append(make_excluded("marathon", "bad_data", f"no definition for version "
                                          f"{clip(task.get('version'))}; task skipped", app=app_id, task=task["id"]))
            continue
        state_tasks.setdefault(app_id, {})[task["id"]] = slim(task, app_id)
    state = MarathonState(state_apps, state_tasks)
    for key in sorted(missing_versions(state, cache, state.tasks)):
        spec, problem = load_version(versions.get(key))
        if problem:
            warnings.append(f"app {clip(key[0])} version {clip(key[1])} unusable: {problem}")
            excluded.append(make_excluded("marathon", "bad_data", f"version {clip(key[1])} skipped: {problem}",
                                          app=key[0]))
        cache[key] = spec
    return build_apps({app_id: pairs_for(state, cache, app_id) for app_id in state.tasks}, resolve,
                      previously_served, warnings, excluded)
