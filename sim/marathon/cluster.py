"""The simulated Marathon cluster: apps, versions, tasks, health results, and the events each
change emits, rendered in the JSON shapes of real Marathon (1.5+ by default, 1.4 on request;
compare with tests/fixtures/marathon).

Several HTTP replicas (sim.marathon.server) can serve one Cluster; events go to every
subscriber of every replica.
"""
from __future__ import annotations

import copy
import datetime
import itertools
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

TERMINAL = ("TASK_KILLED", "TASK_FINISHED", "TASK_FAILED", "TASK_LOST")


class SimError(KeyError):
    pass


def _agent_id(host: str) -> str:
    return "20170714-151334-" + str(abs(hash(host)) % 100000) + "-5050-1-S0"


@dataclass
class SimTask:
    id: str
    instance_id: str
    app_id: str
    version: str
    host: str
    ports: list[int]
    ip: str
    state: str = "TASK_RUNNING"
    alive: bool | None = None  # the health verdict; None = no result yet
    results_visible: bool = True  # False after a leader election, until results come back
    staged_at: str = ""
    started_at: str = ""
    consecutive_failures: int = 0


@dataclass
class SimApp:
    id: str
    network: str  # HOST | BRIDGE | USER
    service_ports: list[int]
    protocols: list[str]
    container_ports: list[int]
    instances: int
    labels: dict
    health_checks: list[dict]
    version: str
    last_config_change: str
    host_port_fixed: list[int] | None = None  # requirePorts-style fixed host ports
    versions: dict[str, dict] = field(default_factory=dict)  # version -> rendered bare app


class Cluster:
    """State plus the Python API tests drive. All methods are thread-safe."""

    def __init__(self, shape: str = "1.5", data_only_events: bool = False, heavy_plans: bool = False,
                 hosts: Iterable[str] = ("127.0.0.1",), health_shape: str | None = None):
        self.shape = shape  # "1.5" (networks + container.portMappings) or "1.4" (docker.network)
        self.data_only_events = data_only_events
        self.heavy_plans = heavy_plans
        self.hosts = list(hosts)
        self.health_key = health_shape or ("instanceId" if shape != "1.3" else "taskId")
        self.apps: dict[str, SimApp] = {}
        self.tasks: dict[str, SimTask] = {}
        self.lock = threading.RLock()
        self._subscribers: list[tuple[queue.Queue, frozenset[str] | None, bool]] = []
        self._port_counter = itertools.count(31000)
        self._ip_counter = itertools.count(2)
        self._host_cycle = itertools.count()
        self._last_ts = 0.0
        self.events_emitted = 0

    # ---------------------------------------------------------------------------------------
    # time, ids

    def timestamp(self) -> str:
        with self.lock:
            now = max(time.time(), self._last_ts + 0.001)
            self._last_ts = now
        return datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

    @staticmethod
    def _task_base(app_id: str) -> str:
        return app_id.strip("/").replace("/", "_")

    # ---------------------------------------------------------------------------------------
    # events

    def subscribe(self, types: frozenset[str] | None, light: bool) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        with self.lock:
            self._subscribers.append((q, types, light))
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self.lock:
            self._subscribers = [s for s in self._subscribers if s[0] is not q]

    def frame(self, event_type: str, payload: dict) -> bytes:
        data = json.dumps(payload, separators=(",", ":"))
        if self.data_only_events:
            return f"data: {data}\n\n".encode()
        return f"event: {event_type}\ndata: {data}\n\n".encode()

    def emit(self, event_type: str, payload: dict, light_payload: dict | None = None) -> None:
        payload = {**payload, "eventType": event_type, "timestamp": payload.get("timestamp") or self.timestamp()}
        heavy = self.frame(event_type, payload)
        light = self.frame(event_type, {**light_payload, "eventType": event_type,
                                        "timestamp": payload["timestamp"]}) if light_payload else heavy
        with self.lock:
            self.events_emitted += 1
            for q, types, wants_light in self._subscribers:
                if types is None or event_type in types:
                    q.put(light if wants_light else heavy)

    def emit_raw(self, text: str) -> None:
        """Send bytes as they are (malformed events, comments...) to every subscriber."""
        with self.lock:
            for q, _, _ in self._subscribers:
                q.put(text.encode())

    # ---------------------------------------------------------------------------------------
    # rendering

    def render_app(self, app: SimApp, version: str | None = None) -> dict:
        """The bare app definition, as /v2/apps/{id}/versions/{version} returns it."""
        if version is not None and version != app.version:
            if version not in app.versions:
                raise SimError(version)
            return copy.deepcopy(app.versions[version])
        return self._render_definition(app)

    def _render_definition(self, app: SimApp) -> dict:
        protocol_of = lambda i: app.protocols[i] if i < len(app.protocols) else "tcp"  # noqa: E731
        body: dict[str, Any] = {
            "id": app.id, "backoffFactor": 1.15, "backoffSeconds": 1, "cmd": None,
            "container": {"type": "DOCKER", "docker": {"forcePullImage": False, "image": "example/app:1",
                                                        "parameters": [], "privileged": False},
                          "volumes": []},
            "cpus": 0.1, "disk": 0, "env": {}, "executor": "", "instances": app.instances,
            "labels": copy.deepcopy(app.labels), "maxLaunchDelaySeconds": 3600, "mem": 128, "gpus": 0,
            "healthChecks": copy.deepcopy(app.health_checks), "requirePorts": app.host_port_fixed is not None,
            "upgradeStrategy": {"maximumOverCapacity": 1, "minimumHealthCapacity": 1},
            "version": app.version,
            "versionInfo": {"lastScalingAt": app.version, "lastConfigChangeAt": app.last_config_change},
            "killSelection": "YOUNGEST_FIRST",
            "unreachableStrategy": {"inactiveAfterSeconds": 300, "expungeAfterSeconds": 600},
        }
        if app.network == "HOST":
            body["portDefinitions"] = [{"port": p, "protocol": protocol_of(i), "name": f"port{i}", "labels": {}}
                                       for i, p in enumerate(app.service_ports)]
            if self.shape == "1.4":
                body["ports"] = list(app.service_ports)
                body["container"]["docker"]["network"] = "HOST"
                body["ipAddress"] = None
            else:
                body["networks"] = [{"mode": "host"}]
        else:
            mappings = []
            for i, port in enumerate(app.service_ports):
                mapping = {"containerPort": app.container_ports[i], "labels": {}, "name": f"port{i}",
                           "protocol": protocol_of(i), "servicePort": port}
                if app.network == "BRIDGE":
                    mapping["hostPort"] = app.host_port_fixed[i] if app.host_port_fixed else 0
                mappings.append(mapping)
            if self.shape == "1.4":
                body["container"]["docker"]["network"] = app.network
                body["container"]["docker"]["portMappings"] = mappings
                body["ipAddress"] = {"networkName": "dcos", "groups": [], "labels": {},
                                     "discovery": {"ports": []}} if app.network == "USER" else None
                body["portDefinitions"] = []
                body["ports"] = []
            else:
                body["container"]["portMappings"] = mappings
                body["networks"] = ([{"mode": "container/bridge"}] if app.network == "BRIDGE"
                                    else [{"mode": "container", "name": "dcos"}])
        return body

    def render_task(self, task: SimTask, service_ports: bool) -> dict:
        app = self.apps.get(task.app_id)
        body: dict[str, Any] = {
            "ipAddresses": [{"ipAddress": task.ip, "protocol": "IPv4"}],
            "stagedAt": task.staged_at, "state": task.state, "ports": list(task.ports),
            "startedAt": task.started_at, "version": task.version, "id": task.id, "appId": task.app_id,
            "slaveId": _agent_id(task.host), "host": task.host,
        }
        if service_ports and app and app.service_ports:
            body["servicePorts"] = list(app.service_ports)
        if task.alive is not None and task.results_visible:
            body["healthCheckResults"] = [{
                "alive": task.alive, "consecutiveFailures": task.consecutive_failures,
                "firstSuccess": task.started_at if task.alive else None,
                "lastFailure": None if task.alive else self.timestamp(),
                "lastSuccess": task.started_at if task.alive else None,
                "lastFailureCause": None if task.alive else "ConnectException: Connection refused",
                self.health_key: task.instance_id if self.health_key == "instanceId" else task.id,
            }]
        return body

    def tasks_by_app(self) -> dict[str, list[SimTask]]:
        """Every task grouped by app id, in one pass (rendering every app's tasks stays
        O(tasks), not O(apps x tasks): /v2/apps at 1,000 apps took seconds otherwise)."""
        grouped: dict[str, list[SimTask]] = {}
        for task in self.tasks.values():
            grouped.setdefault(task.app_id, []).append(task)
        return grouped

    def render_app_with_tasks(self, app: SimApp, embed: bool, tasks: list[SimTask] | None = None) -> dict:
        """`tasks`: the app's tasks when the caller grouped them already (tasks_by_app)."""
        body = self._render_definition(app)
        running = tasks if tasks is not None else [t for t in self.tasks.values() if t.app_id == app.id]
        body.update({
            "tasksStaged": 0, "tasksRunning": sum(t.state == "TASK_RUNNING" for t in running),
            "tasksHealthy": sum(t.alive is True for t in running),
            "tasksUnhealthy": sum(t.alive is False for t in running), "deployments": [],
        })
        if embed:
            body["tasks"] = [self.render_task(t, service_ports=False) for t in running]
        return body

    # ---------------------------------------------------------------------------------------
    # the API tests drive

    def deploy_app(self, app_id: str, network: str = "BRIDGE", service_ports: Iterable[int] = (10000,),
                   instances: int = 1, labels: dict | None = None, health_check: bool = False,
                   healthy_on_start: bool = True, protocols: Iterable[str] = (),
                   container_ports: Iterable[int] | None = None, host_ports: list[list[int]] | None = None,
                   host: str | None = None, fixed_host_ports: list[int] | None = None) -> dict:
        """Create (or replace) an app and start its tasks. `host_ports`: explicit host ports per
        instance (for demos with real backends); `fixed_host_ports`: every task binds these host
        ports (requirePorts; with HOST networking and the service ports, the expose-host case);
        `host`: run every task on this agent host."""
        network = network.upper()
        if network not in ("HOST", "BRIDGE", "USER"):
            raise ValueError(f"network must be HOST, BRIDGE or USER, got {network!r}")
        app_id = "/" + app_id.strip("/")
        service_ports = list(service_ports)
        with self.lock:
            existing = self.apps.get(app_id)
            version = self.timestamp()
            app = SimApp(
                id=app_id, network=network, service_ports=service_ports, protocols=list(protocols),
                container_ports=list(container_ports) if container_ports is not None else [8080 + i for i in range(len(service_ports))],
                instances=0, labels=dict(labels or {}),
                health_checks=[{"gracePeriodSeconds": 300, "intervalSeconds": 10, "maxConsecutiveFailures": 3,
                                "path": "/health", "portIndex": 0, "protocol": "MESOS_HTTP" if self.shape != "1.4" else "HTTP",
                                "timeoutSeconds": 5, "delaySeconds": 15}] if health_check else [],
                version=version, last_config_change=version,
                host_port_fixed=list(fixed_host_ports) if fixed_host_ports else None)
            app.versions = existing.versions if existing else {}
            self.apps[app_id] = app
            app.versions[version] = self._render_definition(app)
            self.emit("api_post_event", {"clientIp": "127.0.0.1", "uri": "/v2/apps" + app_id,
                                         "appDefinition": app.versions[version]})
            old = [t.id for t in self.tasks.values() if t.app_id == app_id]
            self._deployment(app, "RestartApplication" if existing else "StartApplication", lambda: (
                [self._kill(task_id) for task_id in old],
                self._scale_to(app, instances, healthy_on_start, host_ports, host)))
            return self.render_app(app)

    def update_app(self, app_id: str, **changes: Any) -> dict:
        """Redeploy with changed settings (a new config version; tasks replaced)."""
        with self.lock:
            app = self._app(app_id)
            current = dict(network=app.network, service_ports=app.service_ports, instances=app.instances,
                           labels=app.labels, health_check=bool(app.health_checks), protocols=app.protocols,
                           container_ports=app.container_ports, fixed_host_ports=app.host_port_fixed)
            current.update(changes)
            return self.deploy_app(app.id, **current)

    def scale(self, app_id: str, instances: int, healthy_on_start: bool = True, host: str | None = None) -> list[str]:
        """Scale to `instances`; returns the ids of the tasks started. Makes a new version
        (lastScalingAt) but not a new config (lastConfigChangeAt), like Marathon."""
        with self.lock:
            app = self._app(app_id)
            before = {t.id for t in self.tasks.values() if t.app_id == app.id}
            version = self.timestamp()
            app.versions[version] = {**self._render_definition(app), "version": version}
            app.version = version
            self._deployment(app, "ScaleApplication", lambda: self._scale_to(app, instances, healthy_on_start, None, host))
            return [t.id for t in self.tasks.values() if t.app_id == app.id and t.id not in before]

    def remove_app(self, app_id: str) -> None:
        with self.lock:
            app = self._app(app_id)
            self._deployment(app, "StopApplication", lambda: [self._kill(t.id) for t in list(self.tasks.values())
                                                              if t.app_id == app.id])
            del self.apps[app.id]
            self.emit("app_terminated_event", {"appId": app.id})

    def kill_task(self, task_id: str, finish: bool = True) -> None:
        """TASK_KILLING (+ instance Killing), then, unless finish=False, TASK_KILLED."""
        with self.lock:
            task = self._task(task_id)
            task.state = "TASK_KILLING"
            self._status(task, "Killing")
            if finish:
                self._kill(task_id)

    def finish_kill(self, task_id: str) -> None:
        with self.lock:
            self._kill(task_id)

    def set_health(self, task_id: str, alive: bool) -> None:
        """A health check verdict changes: health_status_changed_event + instance_health_changed_event
        (and failed_health_check_event when failing)."""
        with self.lock:
            task = self._task(task_id)
            app = self.apps[task.app_id]
            task.alive = alive
            task.results_visible = True
            task.consecutive_failures = 0 if alive else 3
            if not alive:
                self.emit("failed_health_check_event", {"appId": app.id, "taskId": task.instance_id,
                                                        "healthCheck": app.health_checks[0] if app.health_checks else {},
                                                        "instanceId": task.instance_id})
            self._health_events(task)

    def leader_election(self, drop_streams: bool = True) -> None:
        """A new leader knows no health results yet: every task comes back without
        healthCheckResults (until restore_health_results). Event streams are closed."""
        with self.lock:
            for task in self.tasks.values():
                task.results_visible = False
            if drop_streams:
                self.emit_control("drop")

    def restore_health_results(self) -> None:
        with self.lock:
            for task in self.tasks.values():
                task.results_visible = True

    def emit_control(self, what: str) -> None:
        """Stream control messages to every subscriber: "drop" closes, "stall" goes silent."""
        with self.lock:
            for q, _, _ in self._subscribers:
                q.put(what)

    def task_ids(self, app_id: str | None = None) -> list[str]:
        with self.lock:
            wanted = None if app_id is None else "/" + app_id.strip("/")
            return sorted(t.id for t in self.tasks.values() if wanted is None or t.app_id == wanted)

    def task(self, task_id: str) -> SimTask:
        with self.lock:
            return self._task(task_id)

    # ---------------------------------------------------------------------------------------
    # internals

    def _app(self, app_id: str) -> SimApp:
        app = self.apps.get("/" + app_id.strip("/"))
        if app is None:
            raise SimError(app_id)
        return app

    def _task(self, task_id: str) -> SimTask:
        task = self.tasks.get(task_id)
        if task is None:
            raise SimError(task_id)
        return task

    def _deployment(self, app: SimApp, action: str, work) -> None:
        plan_id = str(uuid.uuid4())
        version = app.version
        steps = [{"actions": [{"action": action, "app": app.id}]}]
        light = {"id": plan_id, "steps": steps, "version": version}
        heavy = dict(light)
        if self.heavy_plans:
            group = {"id": "/", "apps": [self._render_definition(a) for a in self.apps.values()], "pods": [],
                     "groups": [], "dependencies": [], "version": version}
            heavy.update({"original": group, "target": group})
        step = {"actions": [{"action": action, "app": app.id, "readinessCheckResults": []}]}
        self.emit("deployment_info", {"plan": heavy, "currentStep": step}, {"plan": light, "currentStep": step})
        work()
        self.emit("deployment_step_success", {"plan": heavy, "currentStep": step}, {"plan": light, "currentStep": step})
        self.emit("deployment_success", {"id": plan_id, "plan": heavy}, {"id": plan_id, "plan": light})

    def _scale_to(self, app: SimApp, instances: int, healthy: bool, host_ports, host) -> None:
        running = [t for t in self.tasks.values() if t.app_id == app.id]
        app.instances = instances
        for task in sorted(running, key=lambda t: t.staged_at, reverse=True)[: max(0, len(running) - instances)]:
            task.state = "TASK_KILLING"
            self._status(task, "Killing")
            self._kill(task.id)
        for n in range(len(running), instances):
            uid = str(uuid.uuid1())
            base = self._task_base(app.id)
            if app.network == "USER":
                ports: list[int] = []
            elif host_ports and n < len(host_ports):
                ports = list(host_ports[n])
            elif app.host_port_fixed:
                ports = list(app.host_port_fixed)
            else:
                ports = [next(self._port_counter) for _ in app.service_ports]
            stamp = self.timestamp()
            task = SimTask(
                id=f"{base}.{uid}", instance_id=f"{base}.marathon-{uid}", app_id=app.id, version=app.version,
                host=host or self.hosts[next(self._host_cycle) % len(self.hosts)], ports=ports,
                ip=f"10.{(n // 250) % 250}.{next(self._ip_counter) % 250}.{n % 250 + 2}",
                staged_at=stamp, started_at=stamp)
            self.tasks[task.id] = task
            self._instance_changed(task, "Created")
            self._status(task, "Running")
            if app.health_checks and healthy:
                task.alive = True
                self._health_events(task)

    def _kill(self, task_id: str) -> None:
        task = self.tasks.pop(task_id, None)
        if task is None:
            return
        task.state = "TASK_KILLED"
        self._status(task, "Killed")

    def _status(self, task: SimTask, condition: str) -> None:
        self.emit("status_update_event", {
            "slaveId": _agent_id(task.host), "taskId": task.id, "taskStatus": task.state, "message": "",
            "appId": task.app_id, "host": task.host,
            "ipAddresses": [{"ipAddress": task.ip, "protocol": "IPv4"}], "ports": list(task.ports),
            "version": task.version})
        self._instance_changed(task, condition)

    def _instance_changed(self, task: SimTask, condition: str) -> None:
        self.emit("instance_changed_event", {
            "instanceId": task.instance_id, "condition": condition, "runSpecId": task.app_id,
            "agentId": _agent_id(task.host), "host": task.host, "runSpecVersion": task.version})

    def _health_events(self, task: SimTask) -> None:
        self.emit("health_status_changed_event", {"appId": task.app_id, "instanceId": task.instance_id,
                                                  "version": task.version, "alive": task.alive})
        self.emit("instance_health_changed_event", {"instanceId": task.instance_id, "runSpecId": task.app_id,
                                                    "runSpecVersion": task.version, "healthy": task.alive})
