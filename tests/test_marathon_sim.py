"""The Marathon simulator answers in the shapes of real Marathon (compared with the fixtures)."""
from __future__ import annotations

import json
import os
import socket

import pytest
import requests

from sim.marathon import MarathonSim
from tests.helpers import wait_until

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "marathon")


def load(path):
    with open(f"{FIXTURES}/{path}") as handle:
        return json.load(handle)


@pytest.fixture
def sim():
    sim = MarathonSim().start()
    sim.deploy_app("/demo/web", network="BRIDGE", service_ports=[10000], instances=2, health_check=True)
    yield sim
    sim.stop()


def get(sim, path, **kwargs):
    response = requests.get(sim.url + path, timeout=5, **kwargs)
    response.raise_for_status()
    return response.json()


def test_app_and_task_keys_match_marathon_15(sim):
    reference = load("apps/marathon-lb-zdd_app_blue_marathon1.5.json")["apps"][0]
    app = get(sim, "/v2/apps", params={"embed": "apps.tasks"})["apps"][0]
    missing = set(reference) - set(app) - {"acceptedResourceRoles"}
    assert not missing
    assert set(reference["container"]) <= set(app["container"])
    assert set(reference["tasks"][0]) <= set(app["tasks"][0])
    assert set(reference["tasks"][0]["healthCheckResults"][0]) <= set(app["tasks"][0]["healthCheckResults"][0])
    assert "servicePorts" not in app["tasks"][0]  # embedded tasks carry none
    single = get(sim, "/v2/apps/demo/web", params={"embed": "app.tasks"})["app"]
    assert single["id"] == "/demo/web" and len(single["tasks"]) == 2
    bare = get(sim, f"/v2/apps/demo/web/versions/{single['version']}")
    assert bare["id"] == "/demo/web" and "tasks" not in bare


def test_tasks_info_leader_ping(sim):
    reference = load("tasks/marathon-docs-tasks.json")["tasks"][0]
    tasks = get(sim, "/v2/tasks")["tasks"]
    assert len(tasks) == 2
    assert set(reference) - set(tasks[0]) <= {"region", "zone", "role"}
    assert tasks[0]["servicePorts"] == [10000]
    assert get(sim, "/v2/info")["name"] == "marathon"
    assert "leader" in get(sim, "/v2/leader")
    assert requests.get(sim.url + "/ping", timeout=5).text.strip() == "pong"
    assert requests.get(sim.url + "/v2/apps/nope", timeout=5).status_code == 404


def test_host_and_user_shapes_14_and_15():
    for shape in ("1.4", "1.5"):
        with MarathonSim(shape=shape) as sim:
            sim.deploy_app("/h", network="HOST", service_ports=[10001])
            sim.deploy_app("/u", network="USER", service_ports=[10002])
            apps = {a["id"]: a for a in get(sim, "/v2/apps")["apps"]}
            if shape == "1.4":
                assert apps["/h"]["container"]["docker"]["network"] == "HOST" and apps["/h"]["ports"] == [10001]
                assert apps["/u"]["container"]["docker"]["portMappings"][0]["servicePort"] == 10002
            else:
                assert apps["/h"]["networks"] == [{"mode": "host"}]
                assert apps["/u"]["networks"][0]["mode"] == "container"
                assert apps["/u"]["container"]["portMappings"][0]["containerPort"] == 8080


def read_events(sim, count, path="/v2/events"):
    with socket.create_connection(("127.0.0.1", sim.replicas[0].port), timeout=5) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
        data = b""
        while data.count(b"\n\n") < count:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode(), [block for block in body.decode().split("\n\n") if block]


def test_event_stream_framing_and_payloads(sim):
    results = {}

    def kill():
        wait_until(lambda: sim.stream_count() == 1)
        sim.kill_task(sim.task_ids("/demo/web")[0])

    import threading
    threading.Thread(target=kill, daemon=True).start()
    head, blocks = read_events(sim, 5)
    assert "Content-Type: text/event-stream" in head
    for block in blocks:
        event_line, data_line = block.split("\n")
        event_type = event_line.removeprefix("event: ")
        payload = json.loads(data_line.removeprefix("data: "))
        assert payload["eventType"] == event_type
        results.setdefault(event_type, []).append(payload)
    assert "event_stream_attached" in results
    statuses = [e["taskStatus"] for e in results["status_update_event"]]
    assert statuses[:2] == ["TASK_KILLING", "TASK_KILLED"]
    reference = load("events/docs/marathon-1.10/status_update_event.json")
    assert set(reference) <= set(results["status_update_event"][0])
    reference = load("events/docs/marathon-1.10/instance_changed_event.json")
    assert set(reference) <= set(results["instance_changed_event"][0])


def test_health_events_and_filter(sim):
    import threading
    task_id = sim.task_ids("/demo/web")[0]

    def fail():
        wait_until(lambda: sim.stream_count() == 1)
        sim.set_health(task_id, False)

    threading.Thread(target=fail, daemon=True).start()
    _, blocks = read_events(sim, 2, "/v2/events?event_type=health_status_changed_event"
                                    "&event_type=instance_health_changed_event")
    payloads = [json.loads(b.split("data: ", 1)[1]) for b in blocks]
    assert [p["eventType"] for p in payloads] == ["health_status_changed_event", "instance_health_changed_event"]
    assert set(load("events/docs/marathon-1.10/health_status_changed_event.json")) <= set(payloads[0])
    assert set(load("events/docs/marathon-1.10/instance_health_changed_event.json")) <= set(payloads[1])
    task = get(sim, "/v2/apps/demo/web", params={"embed": "app.tasks"})["app"]["tasks"]
    assert any(t["healthCheckResults"][0]["alive"] is False for t in task)


def test_leader_election_clears_results_and_auth():
    with MarathonSim(auth=("admin", "s3cret")) as sim:
        sim.deploy_app("/a", health_check=True, instances=2)
        assert requests.get(sim.replicas[0].url + "/v2/apps", timeout=5).status_code == 401
        assert get(sim, "/v2/apps", params={"embed": "apps.tasks"})["apps"][0]["tasks"][0]["healthCheckResults"]
        sim.leader_election()
        tasks = get(sim, "/v2/apps", params={"embed": "apps.tasks"})["apps"][0]["tasks"]
        assert all("healthCheckResults" not in t for t in tasks)
        sim.restore_health_results()
        assert get(sim, "/v2/tasks")["tasks"][0]["healthCheckResults"][0]["alive"] is True


def test_faults():
    with MarathonSim() as sim:
        replica = sim.replicas[0]
        replica.fault = "503"
        assert requests.get(sim.url + "/v2/apps", timeout=5).status_code == 503
        replica.fault = "malformed"
        with pytest.raises(ValueError):
            requests.get(sim.url + "/v2/apps", timeout=5).json()
        replica.fault = "hang"
        with pytest.raises(requests.Timeout):
            requests.get(sim.url + "/v2/apps", timeout=0.3)
        replica.fault = None
        assert requests.get(sim.url + "/v2/apps", timeout=5).json() == {"apps": []}
