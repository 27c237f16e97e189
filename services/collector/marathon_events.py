"""Checks one decoded Marathon event before the mirror uses it.

An event with a field of the wrong type (a `taskStatus` list, an `appId` number, `ports` a
string...) would otherwise raise half-way through applying it, or poison the mirror with values
the service builder chokes on later. `event_problem` names what is wrong, so the source can drop
that event alone with a warning and carry on with the stream.
"""
from __future__ import annotations

from typing import Any

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


def _status_update(event: dict) -> str | None:
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


def _health_changed(event: dict) -> str | None:
    app_key = "appId" if "appId" in event else "runSpecId"
    problem = _first(_bad_id(event, app_key, True), _bad_id(event, "taskId", False),
                     _bad_id(event, "instanceId", False))
    if problem:
        return problem
    alive = event.get("alive", event.get("healthy"))
    if alive is not None and not isinstance(alive, bool):
        return "alive/healthy is not a boolean"
    return None


def _instance_changed(event: dict) -> str | None:
    problem = _first(_bad_id(event, "runSpecId", True), _bad_id(event, "instanceId", True))
    if problem:
        return problem
    if not isinstance(event.get("condition"), str):
        return "condition is not a string"
    return None


def _failed_health_check(event: dict) -> str | None:
    return _first(_bad_id(event, "appId", True), _bad_id(event, "taskId", False),
                  _bad_id(event, "instanceId", False))


def _api_post(event: dict) -> str | None:
    definition = event.get("appDefinition")
    if definition is None:
        return None  # a group change: resynced fully
    if not isinstance(definition, dict):
        return "appDefinition is not an object"
    return _bad_id(definition, "id", False)


def _app_terminated(event: dict) -> str | None:
    return _bad_id(event, "appId", True)


_CHECKS = {
    "status_update_event": _status_update,
    "health_status_changed_event": _health_changed,
    "instance_health_changed_event": _health_changed,
    "instance_changed_event": _instance_changed,
    "failed_health_check_event": _failed_health_check,
    "api_post_event": _api_post,
    "app_terminated_event": _app_terminated,
}


def event_problem(event_type: str, event: Any) -> str | None:
    """Why this decoded event cannot be applied, or None when its fields are usable."""
    if not isinstance(event, dict):
        return "not a JSON object"
    check = _CHECKS.get(event_type)
    return check(event) if check else None
