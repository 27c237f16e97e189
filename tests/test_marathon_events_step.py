"""The pure event step (services/collector/marathon/events.py): state in, state and changes out.
No processes, no network, no clocks."""
from __future__ import annotations

import copy
import json

import pytest

from services.collector.marathon.events import NOTHING, Changes, step, step_data
from services.collector.marathon.mirror import MarathonState, take_app

WEB = {"id": "/shop/web", "version": "v1", "portDefinitions": [{"port": 10000}],
       "healthChecks": [{"protocol": "HTTP", "portIndex": 0}],
       "tasks": [{"id": "shop_web.t1", "host": "agent-1", "ports": [31001], "state": "TASK_RUNNING",
                  "version": "v1", "healthCheckResults": [{"alive": True}]},
                 {"id": "shop_web.t2", "host": "agent-2", "ports": [31002], "state": "TASK_RUNNING",
                  "version": "v1", "healthCheckResults": [{"alive": True}]}]}
DB = {"id": "/shop/db", "version": "v1", "portDefinitions": [{"port": 10001}],
      "tasks": [{"id": "shop_db.t1", "host": "agent-1", "ports": [31003], "state": "TASK_RUNNING", "version": "v1"}]}


def state_of(*apps) -> MarathonState:
    found, tasks = {}, {}
    for app in apps:
        app_id, entry, app_tasks = take_app(app, {}, [], [])
        found[app_id], tasks[app_id] = entry, app_tasks
    return MarathonState(found, tasks)


@pytest.fixture
def state():
    return state_of(WEB, DB)


def frozen(state: MarathonState):
    """A deep copy to compare with: the step must leave its input as it was."""
    return copy.deepcopy((dict(state.apps), {k: dict(v) for k, v in state.tasks.items()}))


def touched(*apps) -> Changes:
    return Changes(touched=frozenset(apps))


def fetch(*apps) -> Changes:
    return Changes(fetch=frozenset(apps))


def status(task_id="shop_web.t3", status="TASK_RUNNING", app_id="/shop/web", **extra) -> dict:
    return {"eventType": "status_update_event", "appId": app_id, "taskId": task_id, "taskStatus": status,
            "host": "agent-3", "ports": [31005], "version": "v1", **extra}


# --- status updates ----------------------------------------------------------------------------

def test_a_running_task_is_added_to_its_app_only(state):
    before = frozen(state)
    new, changes, problem = step(state, "status_update_event", status())
    assert problem is None and changes == touched("/shop/web")
    assert new.tasks["/shop/web"]["shop_web.t3"] == {"id": "shop_web.t3", "appId": "/shop/web", "host": "agent-3",
                                                     "ports": [31005], "version": "v1", "state": "TASK_RUNNING"}
    assert frozen(state) == before  # the input is left as it was
    assert new.tasks["/shop/db"] is state.tasks["/shop/db"] and new.apps is state.apps  # shared, not copied


def test_a_killed_task_is_removed(state):
    new, changes, problem = step(state, "status_update_event", status("shop_web.t1", "TASK_KILLED"))
    assert problem is None and changes == touched("/shop/web")
    assert list(new.tasks["/shop/web"]) == ["shop_web.t2"]
    assert "shop_web.t1" in state.tasks["/shop/web"]


def test_a_killing_task_stays_with_its_new_state(state):
    new, changes, _ = step(state, "status_update_event", status("shop_web.t1", "TASK_KILLING"))
    assert changes == touched("/shop/web") and new.tasks["/shop/web"]["shop_web.t1"]["state"] == "TASK_KILLING"


def test_a_killed_task_we_never_had_changes_nothing(state):
    new, changes, problem = step(state, "status_update_event", status("shop_web.gone", "TASK_KILLED"))
    assert (new, changes, problem) == (state, NOTHING, None) and new is state


def test_a_status_repeated_changes_nothing(state):
    new, changes, _ = step(state, "status_update_event", status())
    again, changes_again, problem = step(new, "status_update_event", status())
    assert changes and not changes_again and again is new and problem is None


def test_a_task_of_an_unknown_app_asks_for_that_app(state):
    new, changes, problem = step(state, "status_update_event", status("new_app.t1", app_id="/new/app"))
    assert new is state and changes == fetch("/new/app") and problem is None


# --- health --------------------------------------------------------------------------------------

def test_health_status_changed_sets_the_verdict(state):
    event = {"eventType": "health_status_changed_event", "appId": "/shop/web", "taskId": "shop_web.t2", "alive": False}
    new, changes, problem = step(state, "health_status_changed_event", event)
    assert problem is None and changes == touched("/shop/web")
    assert new.tasks["/shop/web"]["shop_web.t2"]["healthCheckResults"] == [{"alive": False}]
    assert new.tasks["/shop/web"]["shop_web.t1"] is state.tasks["/shop/web"]["shop_web.t1"]
    assert state.tasks["/shop/web"]["shop_web.t2"]["healthCheckResults"][0]["alive"] is True
    # the same verdict again: nothing
    _, again, _ = step(new, "health_status_changed_event", event)
    assert again == NOTHING


def test_health_of_an_instance_is_found_by_instance_id():
    app = {**WEB, "tasks": [{"id": "shop_web.marathon-1234.1", "host": "agent-1", "ports": [31001],
                             "state": "TASK_RUNNING", "version": "v1", "healthCheckResults": [{"alive": True}]}]}
    state = state_of(app)
    event = {"runSpecId": "/shop/web", "instanceId": "shop_web.marathon-1234", "healthy": False}
    new, changes, _ = step(state, "instance_health_changed_event", event)
    assert changes == touched("/shop/web")
    assert new.tasks["/shop/web"]["shop_web.marathon-1234.1"]["healthCheckResults"] == [{"alive": False}]


def test_health_of_a_task_we_do_not_know_asks_for_its_app(state):
    event = {"appId": "/shop/web", "taskId": "shop_web.unknown", "alive": True}
    assert step(state, "health_status_changed_event", event) == (state, fetch("/shop/web"), None)


def test_a_failed_health_check_takes_the_task_out(state):
    new, changes, _ = step(state, "failed_health_check_event", {"appId": "/shop/db", "taskId": "shop_db.t1"})
    assert changes == touched("/shop/db") and new.tasks["/shop/db"]["shop_db.t1"]["healthCheckResults"] == [{"alive": False}]


def test_instance_changed_killing_and_gone(state):
    killing = {"runSpecId": "/shop/web", "instanceId": "shop_web.t1", "condition": "Killing"}
    new, changes, _ = step(state, "instance_changed_event", killing)
    assert changes == touched("/shop/web") and new.tasks["/shop/web"]["shop_web.t1"]["state"] == "TASK_KILLING"
    gone, changes, _ = step(new, "instance_changed_event", {**killing, "condition": "Killed"})
    assert changes == touched("/shop/web") and "shop_web.t1" not in gone.tasks["/shop/web"]
    assert step(state, "instance_changed_event", {**killing, "condition": "Running"}) == (state, NOTHING, None)


# --- apps and deployments --------------------------------------------------------------------

def test_app_terminated_removes_the_app(state):
    new, changes, problem = step(state, "app_terminated_event", {"appId": "/shop/db"})
    assert problem is None and changes == touched("/shop/db")
    assert "/shop/db" not in new.apps and "/shop/db" not in new.tasks and "/shop/db" in state.apps
    assert step(new, "app_terminated_event", {"appId": "/shop/db"}) == (new, NOTHING, None)


def test_api_post_asks_for_the_app_or_a_resync(state):
    assert step(state, "api_post_event", {"appDefinition": {"id": "shop/web"}}) == (state, fetch("/shop/web"), None)
    assert step(state, "api_post_event", {"groupId": "/shop"}) == (state, Changes(resync=True), None)


def test_deployment_events_ask_for_the_apps_they_name(state):
    event = {"plan": {"steps": [{"actions": [{"action": "ScaleApplication", "app": "/shop/web"},
                                             {"action": "StartApplication", "app": "/shop/new"}]}]}}
    expected = (state, fetch("/shop/web", "/shop/new"), None)
    assert step(state, "deployment_info", event) == expected
    assert step_data(state, "deployment_step_success", json.dumps(event).encode()) == expected
    # none named (or too large to keep): everything
    assert step(state, "deployment_success", {"id": "d1"}) == (state, Changes(resync=True), None)
    assert step_data(state, "status_update_event", b"") == (state, Changes(resync=True), None)


def test_other_event_types_change_nothing(state):
    assert step(state, "framework_message_event", {"anything": 1}) == (state, NOTHING, None)


# --- malformed events: set aside with a reason, state unchanged ----------------------------------

@pytest.mark.parametrize("event_type,event,reason", [
    ("status_update_event", {"taskId": "t", "taskStatus": "TASK_RUNNING"}, "no appId"),
    ("status_update_event", {"appId": 7, "taskId": "t", "taskStatus": "TASK_RUNNING"}, "appId is not an id string"),
    ("status_update_event", {"appId": "/shop/web", "taskId": "t", "taskStatus": ["TASK_RUNNING"]},
     "taskStatus is not a string"),
    ("status_update_event", status(ports="31005"), "ports is not a list"),
    ("status_update_event", status(ports=[70000]), "ports holds a value that is not a port"),
    ("status_update_event", status(ipAddresses=[{"ip": 1}]), "ipAddresses holds an entry without an ipAddress"),
    ("status_update_event", status(host=["agent"]), "host is not a string"),
    ("health_status_changed_event", {"appId": "/shop/web", "taskId": "shop_web.t1", "alive": "yes"},
     "alive/healthy is not a boolean"),
    ("instance_changed_event", {"runSpecId": "/shop/web", "instanceId": "shop_web.t1", "condition": 3},
     "condition is not a string"),
    ("failed_health_check_event", {"appId": "x" * 2000}, "appId is not an id string"),
    ("api_post_event", {"appDefinition": "web"}, "appDefinition is not an object"),
    ("app_terminated_event", {}, "no appId"),
    ("status_update_event", ["not", "an", "object"], "not a JSON object"),
])
def test_malformed_events_are_set_aside_with_a_reason(state, event_type, event, reason):
    before = frozen(state)
    new, changes, problem = step(state, event_type, event)
    assert new is state and changes == NOTHING and problem is not None and reason in problem
    assert frozen(state) == before


@pytest.mark.parametrize("data", [b"{not json", b"\xff\xfe", b"null", b'"text"', b"[1]"])
def test_undecodable_data_is_set_aside(state, data):
    new, changes, problem = step_data(state, "status_update_event", data)
    assert new is state and changes == NOTHING and problem.startswith("not a JSON object")


def test_a_bug_while_applying_sets_the_event_aside(state, monkeypatch):
    from services.collector.marathon import events

    def broken(state, event):
        raise RuntimeError("bug")

    handler = events._STEPS["status_update_event"]
    monkeypatch.setitem(events._STEPS, "status_update_event", handler._replace(apply=broken))
    assert step(state, "status_update_event", status()) == (state, NOTHING, "RuntimeError: bug")


# --- the changed set names only what changed -----------------------------------------------------

def test_a_sequence_of_events_names_each_app_it_changed_only(state):
    sequence = [
        ("status_update_event", status("shop_web.t3"), touched("/shop/web")),
        ("status_update_event", status("shop_web.t3"), NOTHING),
        ("failed_health_check_event", {"appId": "/shop/db", "taskId": "shop_db.t1"}, touched("/shop/db")),
        ("failed_health_check_event", {"appId": "/shop/db", "taskId": "shop_db.t1"}, NOTHING),
        ("status_update_event", status("shop_web.t3", "TASK_FINISHED"), touched("/shop/web")),
    ]
    for event_type, event, expected in sequence:
        new, changes, problem = step(state, event_type, event)
        assert problem is None and changes == expected, (event_type, event)
        for app_id in set(state.tasks) - changes.apps:  # every other app: the very same tasks
            assert new.tasks[app_id] is state.tasks[app_id]
        state = new
    assert sorted(state.tasks["/shop/web"]) == ["shop_web.t1", "shop_web.t2"]


def test_the_mirror_keeps_a_fingerprint_of_a_definition_not_the_definition():
    from services.collector.marathon.mirror import known_spec
    app_id, (record, spec), _ = take_app(WEB, {}, [], [])
    assert set(record) == {"fingerprint", "version", "versionInfo"}  # not Marathon's JSON
    known = {app_id: (record, spec)}
    # counters and embedded tasks change without the definition changing: the spec is reused
    assert known_spec(known, {**WEB, "tasksRunning": 7, "tasks": []}) is spec
    # a changed definition is parsed again
    assert known_spec(known, {**WEB, "labels": {"com.meltwater.proxymatic.port.0.weight": "100"}}) is None
    assert known_spec(known, {**WEB, "portDefinitions": [{"port": 10002}]}) is None
