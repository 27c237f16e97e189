"""Marathon events, as one pure step: `step(state, event_type, event) -> (state, changes, problem)`.

The step checks the event (`event_problem`: one check per event type, for every field it uses:
ids are non-empty strings up to 1,024 characters, ports integers 0-65535, `ipAddresses` a list
of objects with an `ipAddress` string...), then applies it to the mirror (`MarathonState`) when
it carries the change (a status update has host, ports, state and version; a health change has
the verdict), or names the apps to fetch again, or asks for a full resync. It returns a new
state and leaves the one it was given as it was; an event it cannot use (malformed, or a bug
while applying it) leaves the state unchanged and says why (`problem`), so the caller drops it
alone with a warning and carries on with the stream.

`Changes` names only what changed: the apps whose tasks changed in the mirror (`touched`:
rebuild), those to fetch (`fetch`) and whether to resync fully. An event that changes nothing
(a status Marathon repeats, a task already gone) gives no changes. No I/O, threads or clocks.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

from services.collector.marathon.mirror import MarathonState
from services.collector.marathon.tasks import TERMINAL_STATES

_DEPLOYMENT_APP_RE = re.compile(rb'"app"\s*:\s*"(/[^"\\]{1,512})"')
_GONE_CONDITIONS = frozenset({"Killed", "Finished", "Failed", "Gone", "Dropped", "Error", "Unknown",
                              "UnreachableInactive"})


@dataclass(frozen=True)
class Changes:
    """What one event changed (or asks for). False when nothing."""

    touched: frozenset[str] = frozenset()  # apps whose tasks changed in the mirror: rebuild them
    fetch: frozenset[str] = frozenset()  # apps to fetch again (the event does not carry the change)
    resync: bool = False  # fetch everything (the event does not say which apps)

    def __bool__(self) -> bool:
        return bool(self.touched or self.fetch or self.resync)

    @property
    def apps(self) -> frozenset[str]:
        return self.touched | self.fetch


NOTHING = Changes()


def _touched(app_id: str) -> Changes:
    return Changes(touched=frozenset((app_id,)))


def _fetch(app_id: str) -> Changes:
    return Changes(fetch=frozenset((app_id,)))


# ---------------------------------------------------------------------------------------------
# validation

_MAX_ID = 1024  # longer ids are not Marathon's


def _bad_id(event: dict, key: str, required: bool) -> str | None:
    if key not in event or (not required and event[key] is None):
        return f"no {key}" if required else None
    value = event[key]
    if not isinstance(value, str) or not value or len(value) > _MAX_ID:
        return f"{key} is not an id string"
    return None


def _bad_ports(value: Any) -> str | None:
    if not isinstance(value, list):
        return "ports is not a list"
    for port in value:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            return "ports holds a value that is not a port (0-65535)"
    return None


def _bad_ip_addresses(value: Any) -> str | None:
    if not isinstance(value, list):
        return "ipAddresses is not a list"
    for entry in value:
        if not isinstance(entry, dict) or not isinstance(entry.get("ipAddress"), str):
            return "ipAddresses holds an entry without an ipAddress string"
    return None


def _first(*problems: str | None) -> str | None:
    return next((problem for problem in problems if problem), None)


def _check_status_update(event: dict) -> str | None:
    problem = _first(_bad_id(event, "appId", True), _bad_id(event, "taskId", True))
    if problem:
        return problem
    if not isinstance(event.get("taskStatus"), str):
        return "taskStatus is not a string"
    if "host" in event and not isinstance(event["host"], str):
        return "host is not a string"
    if "version" in event and not isinstance(event["version"], str):
        return "version is not a string"
    return _first(_bad_ports(event["ports"]) if "ports" in event else None,
                  _bad_ip_addresses(event["ipAddresses"]) if "ipAddresses" in event else None)


def _check_health_changed(event: dict) -> str | None:
    app_key = "appId" if "appId" in event else "runSpecId"
    problem = _first(_bad_id(event, app_key, True), _bad_id(event, "taskId", False),
                     _bad_id(event, "instanceId", False))
    if problem:
        return problem
    alive = event.get("alive", event.get("healthy"))
    if alive is not None and not isinstance(alive, bool):
        return "alive/healthy is not a boolean"
    return None


def _check_instance_changed(event: dict) -> str | None:
    problem = _first(_bad_id(event, "runSpecId", True), _bad_id(event, "instanceId", True))
    if problem:
        return problem
    if not isinstance(event.get("condition"), str):
        return "condition is not a string"
    return None


def _check_failed_health_check(event: dict) -> str | None:
    return _first(_bad_id(event, "appId", True), _bad_id(event, "taskId", False),
                  _bad_id(event, "instanceId", False))


def _check_api_post(event: dict) -> str | None:
    definition = event.get("appDefinition")
    if definition is None:
        return None  # a group change: resynced fully
    if not isinstance(definition, dict):
        return "appDefinition is not an object"
    return _bad_id(definition, "id", False)


def _check_app_terminated(event: dict) -> str | None:
    return _bad_id(event, "appId", True)


def event_problem(event_type: str, event: Any) -> str | None:
    """Why this decoded event cannot be applied, or None when its fields are usable."""
    if not isinstance(event, dict):
        return "not a JSON object"
    handler = _STEPS.get(event_type)
    return handler.check(event) if handler else None


# ---------------------------------------------------------------------------------------------
# the step

def decode_event(data: bytes) -> dict | None:
    """An event's JSON data -> the event (None: not a JSON object)."""
    try:
        event = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return event if isinstance(event, dict) else None


def deployment_apps(data: bytes) -> set[str]:
    """The app ids a deployment event (or one too large to keep) names, found without parsing
    it (plans can be megabytes)."""
    return {m.decode("utf-8", "replace") for m in _DEPLOYMENT_APP_RE.findall(data)} if data else set()


def is_deployment(event_type: str) -> bool:
    return event_type.startswith("deployment_") or event_type == "unknown_large_event"


def step_data(state: MarathonState, event_type: str, data: bytes) -> tuple[MarathonState, Changes, str | None]:
    """`step` for an event as it came off the stream (its JSON data, b"" when it was too large
    to keep). Deployment events are not parsed: the apps they name are fetched (none named:
    a full resync); an event without data asks for a full resync."""
    if is_deployment(event_type):
        apps = deployment_apps(data)
        return state, Changes(fetch=frozenset(apps)) if apps else Changes(resync=True), None
    if not data:  # too big to keep: we cannot tell what changed
        return state, Changes(resync=True), None
    event = decode_event(data)
    if event is None:
        return state, NOTHING, f"not a JSON object: {data[:200]!r}"
    return step(state, event_type, event)


def step(state: MarathonState, event_type: str, event: Any) -> tuple[MarathonState, Changes, str | None]:
    """One decoded event applied to `state`: (the new state, what changed, None), or (`state`,
    no changes, why the event cannot be used)."""
    if is_deployment(event_type):
        if not isinstance(event, dict):
            return state, NOTHING, "not a JSON object"
        return step_data(state, event_type, json.dumps(event).encode())
    problem = event_problem(event_type, event)
    if problem:
        return state, NOTHING, problem
    handler = _STEPS.get(event_type)
    if handler is None:
        return state, NOTHING, None  # a type that never changes routing
    try:
        new, changes = handler.apply(state, event)
    except Exception as error:  # noqa: BLE001 - a bug with one event drops that event alone
        return state, NOTHING, f"{type(error).__name__}: {error}"
    return new, changes, None


def find_task(tasks: Mapping[str, Mapping[str, dict]], app_id: Any, task_id: Any = None,
              instance_id: Any = None) -> dict | None:
    """The task of `app_id` an event names, by task id or instance id (any Marathon 1.x)."""
    app_tasks = tasks.get(app_id) if isinstance(app_id, str) else None
    if not app_tasks:
        return None
    if isinstance(task_id, str) and task_id in app_tasks:
        return app_tasks[task_id]
    instance_id = instance_id if isinstance(instance_id, str) else task_id
    if not isinstance(instance_id, str):
        return None
    # Instance ids are <app>.marathon-<uuid> (or instance-); legacy task ids <app>.<uuid>;
    # 1.5+ task ids embed the instance id.
    legacy = re.sub(r"\.(marathon|instance)-", ".", instance_id, count=1)
    if legacy in app_tasks:
        return app_tasks[legacy]
    prefix = instance_id + "."
    for candidate_id, task in app_tasks.items():
        if candidate_id.startswith(prefix):
            return task
        results = task.get("healthCheckResults")
        if isinstance(results, list) and any(isinstance(r, dict) and r.get("instanceId") == instance_id
                                             for r in results):
            return task
    return None


def _replace(state: MarathonState, task: dict, new: dict | None) -> tuple[MarathonState, Changes]:
    """`task` (of the mirror) replaced by `new` (None: removed), when that changes it."""
    if new == task:
        return state, NOTHING
    app_id = task["appId"]
    return state.with_task(app_id, task["id"], new), _touched(app_id)


def _apply_status_update(state: MarathonState, event: dict) -> tuple[MarathonState, Changes]:
    app_id, task_id, status = event["appId"], event["taskId"], event["taskStatus"]
    if app_id not in state.apps:
        return state, _fetch(app_id)  # a new app (or one we missed): its definition is needed
    task = state.tasks.get(app_id, {}).get(task_id)
    if status in TERMINAL_STATES:
        return (state, NOTHING) if task is None else _replace(state, task, None)
    new = dict(task) if task is not None else {"id": task_id, "appId": app_id}
    for key in ("host", "ports", "ipAddresses", "version"):
        if key in event:
            new[key] = event[key]
    new["state"] = status
    if task is None:
        return state.with_task(app_id, task_id, new), _touched(app_id)
    return _replace(state, task, new)


def _apply_health_changed(state: MarathonState, event: dict) -> tuple[MarathonState, Changes]:
    app_id = event.get("appId", event.get("runSpecId"))
    alive = event.get("alive", event.get("healthy"))
    task = find_task(state.tasks, app_id, event.get("taskId"), event.get("instanceId"))
    if task is None or not isinstance(alive, bool):
        if isinstance(app_id, str) and alive is not None:
            return state, _fetch(app_id)
        return state, NOTHING
    return _replace(state, task, {**task, "healthCheckResults": [{"alive": alive}]})


def _apply_instance_changed(state: MarathonState, event: dict) -> tuple[MarathonState, Changes]:
    condition = event.get("condition")
    task = find_task(state.tasks, event.get("runSpecId"), None, event.get("instanceId"))
    if task is None:
        return state, NOTHING  # the status_update_event that goes with it carries the details
    if condition == "Killing":
        return _replace(state, task, {**task, "state": "TASK_KILLING"})
    if condition in _GONE_CONDITIONS or condition == "Unreachable":
        return _replace(state, task, None)
    return state, NOTHING


def _apply_failed_health_check(state: MarathonState, event: dict) -> tuple[MarathonState, Changes]:
    # Marathon's `alive` is "last success after last failure": one failed check makes the task
    # not alive in /v2/apps too. `taskId` holds the instance id on 1.4+.
    app_id = event.get("appId")
    task = find_task(state.tasks, app_id, event.get("taskId"), event.get("instanceId", event.get("taskId")))
    if task is not None:
        return _replace(state, task, {**task, "healthCheckResults": [{"alive": False}]})
    return state, _fetch(app_id)


def _apply_api_post(state: MarathonState, event: dict) -> tuple[MarathonState, Changes]:
    definition = event.get("appDefinition")
    app_id = definition.get("id") if isinstance(definition, dict) else None
    if isinstance(app_id, str):
        return state, _fetch(app_id if app_id.startswith("/") else "/" + app_id)
    return state, Changes(resync=True)  # a group change: we cannot tell which apps


def _apply_app_terminated(state: MarathonState, event: dict) -> tuple[MarathonState, Changes]:
    app_id = event["appId"]
    if app_id in state.apps or app_id in state.tasks:
        return state.without_app(app_id), _touched(app_id)
    return state, NOTHING


class EventHandler(NamedTuple):
    """What to check in an event of one type, and how it changes the state."""

    check: Callable[[dict], str | None]
    apply: Callable[[MarathonState, dict], tuple[MarathonState, Changes]]


# The event types that change routing; any other type is read and ignored.
_STEPS = {
    "status_update_event": EventHandler(_check_status_update, _apply_status_update),
    "health_status_changed_event": EventHandler(_check_health_changed, _apply_health_changed),
    "instance_health_changed_event": EventHandler(_check_health_changed, _apply_health_changed),
    "instance_changed_event": EventHandler(_check_instance_changed, _apply_instance_changed),
    "failed_health_check_event": EventHandler(_check_failed_health_check, _apply_failed_health_check),
    "api_post_event": EventHandler(_check_api_post, _apply_api_post),
    "app_terminated_event": EventHandler(_check_app_terminated, _apply_app_terminated),
}
