"""docker-compose.yml, real and tested: valid against the Compose Specification, every option of
proxymatic passed through with its default, and the whole file run the way Compose would run it.

No container engine runs here, so the end-to-end test runs exactly what each container would:
every service's ENTRYPOINT (from its Dockerfile) + `command`, with its `environment` after
Compose's `${VAR:-default}` interpolation (done by `interpolate` below, with the demo profile's
env file, deploy/demo.env), as separate local processes sharing one temp directory as the `run`
volume, on free ports. It checks traffic through HAProxy (TCP) and nginx (virtual host), runs the
status service's healthcheck command, then stops every service with its stop signal and checks
that no process of the run is left.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import yaml

from services.cli import PROXIES
from services.common.config import OPTIONS, STAGES
from tests.helpers import free_port, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPOSE_FILE = os.path.join(ROOT, "docker-compose.yml")
DEMO_ENV_FILE = os.path.join(ROOT, "deploy", "demo.env")
VENV_BIN = os.path.dirname(sys.executable)
RUNTIME_IMAGE = "proxymatic:latest"
# Each image's Dockerfile (the ENTRYPOINT and WORKDIR the container would run with).
DOCKERFILES = {"deploy/Dockerfile": RUNTIME_IMAGE, "deploy/Dockerfile.demo": "proxymatic-demo:latest"}
# The interface of the original proxymatic (services/common/config.py lists it first).
SEED_OPTIONS = tuple(option.env for option in OPTIONS[:[o.env for o in OPTIONS].index("VERBOSE") + 1])
MARKER = "PROXYMATIC_COMPOSE_TEST"  # in every process's environment: finds leftovers


# -- Compose's interpolation -------------------------------------------------------------------
_VARIABLE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: str, env: dict[str, str]) -> str:
    """`$VAR`, `${VAR}`, `${VAR:-default}` (unset or empty), `${VAR-default}` (unset), `$$`;
    anything else (`${VAR:?err}`, nesting) is refused, so the file keeps to what this handles."""
    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, default = match.group(2), match.group(3)
        if operator == ":-":
            return env.get(name) or default
        if operator == "-":
            return env.get(name, default)
        return env.get(name, "")

    result = _VARIABLE.sub(substitute, value)
    if "${" in _VARIABLE.sub("", value):
        raise ValueError(f"unsupported interpolation in {value!r}")
    return result


def resolve(node, env: dict[str, str]):
    """Every string of a parsed Compose document, interpolated."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    return node


def read_env_file(path: str, shell: dict[str, str]) -> dict[str, str]:
    """`docker compose --env-file`: KEY=VALUE lines; a value is interpolated with the shell's
    variables first, then the file's earlier ones. The shell wins over the file."""
    values: dict[str, str] = {}
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path}: bad line {line!r}"
            values[key] = interpolate(value, {**values, **shell})
    return {**values, **shell}


def test_interpolation_follows_compose():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d}/${EMPTY:-d}/${UNSET:-d}", env) == "x/d/d"
    assert interpolate("${SET-d}/${EMPTY-d}/${UNSET-d}", env) == "x//d"
    assert interpolate("$SET ${SET} $$SET ${UNSET}", env) == "x x $SET "
    assert interpolate("run:${RUN_DIR:-/run/proxymatic}", {}) == "run:/run/proxymatic"
    with pytest.raises(ValueError):
        interpolate("${UNSET:?required}", env)


# -- the file ----------------------------------------------------------------------------------
def load() -> dict:
    with open(COMPOSE_FILE) as handle:
        return yaml.safe_load(handle)  # merge keys (<<) included


def runtime_services(document: dict) -> dict[str, dict]:
    return {name: service for name, service in document["services"].items() if service["image"] == RUNTIME_IMAGE}


def dockerfile(image: str) -> tuple[list[str], str]:
    """(ENTRYPOINT, last WORKDIR) of the image's Dockerfile."""
    path = next(path for path, name in DOCKERFILES.items() if name == image)
    entrypoint, workdir = [], "/"
    with open(os.path.join(ROOT, path)) as handle:
        for line in handle:
            if line.startswith("ENTRYPOINT "):
                entrypoint = json.loads(line.split(None, 1)[1])
            elif line.startswith("WORKDIR "):
                workdir = line.split(None, 1)[1].strip()
    return entrypoint, workdir


def test_the_file_follows_the_compose_specification():
    checker = os.path.join(VENV_BIN, "check-jsonschema")
    result = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", COMPOSE_FILE],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_service_per_stage_and_proxy_sharing_the_run_dir_and_the_host_network():
    document = load()
    services = runtime_services(document)
    assert set(services) == set(STAGES) | set(PROXIES)
    assert document["volumes"] == {"run": {}}
    for name, service in services.items():
        assert service["command"] == [name], name
        assert service["network_mode"] == "host", name
        assert service["pid"] == "host", name  # the applier signals nginx and the Pen runner
        assert service["restart"] == "unless-stopped", name
        assert service["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}, name
        for env in ({}, {"RUN_DIR": "/srv/pm"}):
            resolved = resolve(service, env)
            assert resolved["volumes"] == [f"run:{resolved['environment']['RUN_DIR']}"], name
    # nginx only where there are virtual hosts to serve; the demo serves some
    assert services["nginx"]["profiles"] == ["vhost", "demo"]
    assert all("profiles" not in service for name, service in services.items() if name != "nginx")
    for name, service in document["services"].items():
        if name not in services:
            assert service["profiles"] == ["demo"] and service["build"]["dockerfile"] == "deploy/Dockerfile.demo", name
            assert all(env.startswith("DEMO_") for env in service.get("environment", {})), name
    healthcheck = services["status"]["healthcheck"]
    assert healthcheck["test"] == ["CMD", "proxymatic", "healthcheck"]
    # the image's HEALTHCHECK (/status, the node's answer) is reported by the status service alone
    assert all(service["healthcheck"] == {"disable": True} for name, service in services.items() if name != "status")


def test_every_option_is_passed_through_with_its_default():
    options = {option.env: option.default for option in OPTIONS}
    for name, service in runtime_services(load()).items():
        environment = dict(service["environment"])
        # not an option: tini (the image's init) reaps as a subreaper, not being PID 1 (pid: host)
        assert environment.pop("TINI_SUBREAPER") == "1", name
        unknown = set(environment) - set(options)
        assert not unknown, f"{name}: not options of proxymatic: {sorted(unknown)}"
        missing = [env for env in SEED_OPTIONS if env not in environment]
        assert not missing, f"{name}: the original's options missing: {missing}"
        assert set(environment) == set(options), f"{name}: missing {sorted(set(options) - set(environment))}"
        for env, value in environment.items():
            # passed through from the shell, with the default when it is unset or empty
            assert value == f"${{{env}:-{options[env]}}}", (name, env, value)
            assert interpolate(value, {}) == options[env]
            assert interpolate(value, {env: "given"}) == "given"


def test_the_demo_env_file_sets_options_only():
    options = {option.env for option in OPTIONS}
    values = read_env_file(DEMO_ENV_FILE, {})
    assert set(values) <= options, sorted(set(values) - options)
    assert values["MARATHON_URL"] == "http://127.0.0.1:18080"
    assert read_env_file(DEMO_ENV_FILE, {"DEMO_MARATHON_PORT": "1"})["MARATHON_URL"] == "http://127.0.0.1:1"


# -- the stack, run as Compose would run it ---------------------------------------------------
def start_order(services: dict[str, dict]) -> list[str]:
    """The demo's services, then the proxies, then each service after what it depends on."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for dependency in services[name].get("depends_on", []):
                visit(dependency)
            order.append(name)

    for name in sorted(services, key=lambda n: (services[n]["image"] == RUNTIME_IMAGE, n not in PROXIES, n)):
        visit(name)
    return order


def command_line(service: dict) -> tuple[list[str], str]:
    """What the container runs: the image's ENTRYPOINT + `command`, and its work dir. An init
    in front (`tini --`) only forwards signals and reaps: here each service is a process group
    of its own that the test signals and reaps, as tini would."""
    entrypoint, workdir = dockerfile(service["image"])
    if entrypoint and "--" in entrypoint and not shutil.which(entrypoint[0]):
        entrypoint = entrypoint[entrypoint.index("--") + 1:]
    # The images' work dirs: the demo's holds sim/ (here: the repository); the runtime image
    # runs from / with nothing but the installed package.
    return entrypoint + list(service["command"]), ROOT if workdir != "/" else "/"


def process_environment(service: dict, marker: str) -> dict[str, str]:
    """A container's environment: its image's PATH (the venv first) and the service's."""
    return {"PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
            **{key: str(value) for key, value in (service.get("environment") or {}).items()},
            MARKER: marker}


def processes_of_run(marker: str) -> list[int]:
    """Processes of this run: the marker in their environment, or a file of the run's temp
    directory (`marker`) open or on their command line (nginx overwrites its environment's
    memory with its process titles)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environ = handle.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().decode(errors="replace")
            descriptors = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        opened = []
        for descriptor in descriptors:
            try:
                opened.append(os.readlink(f"/proc/{entry}/fd/{descriptor}"))
            except OSError:
                continue
        if f"{MARKER}={marker}".encode() in environ or marker + os.sep in cmdline \
                or any(path.startswith(marker + os.sep) for path in opened):
            found.append(int(entry))
    return found


def http_get(port: int, path: str = "/", host: str | None = None) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        connection.request("GET", path, headers={"Host": host} if host else {})
        response = connection.getresponse()
        return response.status, response.read().decode().strip()
    finally:
        connection.close()


class Stack:
    def __init__(self, services: dict[str, dict], logs: str, marker: str):
        self.services = services
        self.logs = logs
        self.marker = marker
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> None:
        argv, cwd = command_line(self.services[name])
        with open(os.path.join(self.logs, f"{name}.log"), "ab") as log:
            self.processes[name] = subprocess.Popen(
                argv, cwd=cwd, env=process_environment(self.services[name], self.marker),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def running(self) -> None:
        dead = {name: process.returncode for name, process in self.processes.items() if process.poll() is not None}
        assert not dead, f"services exited: {dead}\n{self.log_tails()}"

    def log_tails(self) -> str:
        parts = []
        for name in self.processes:
            with open(os.path.join(self.logs, f"{name}.log"), errors="replace") as handle:
                parts.append(f"--- {name}\n" + "".join(handle.readlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> list[str]:
        """`docker compose down`: each service gets its stop signal, in reverse start order;
        SIGKILL for its group after the grace. Returns the services that needed SIGKILL."""
        killed = []
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            stop_signal = getattr(signal, self.services[name].get("stop_signal", "SIGTERM"))
            try:
                os.killpg(process.pid, stop_signal)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                killed.append(name)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return killed


def test_the_demo_profile_runs_and_traffic_flows(tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    backends = [free_port() for _ in range(4)]
    overrides = {  # the shell of `docker compose --env-file deploy/demo.env --profile demo up`
        "RUN_DIR": str(run_dir), "STATUS_ENDPOINT": f"127.0.0.1:{free_port()}", "VHOST_PORT": str(free_port()),
        "DEMO_MARATHON_PORT": str(free_port()), "DEMO_ETCD_PORT": str(free_port()),
        "DEMO_ETCD_PEER_PORT": str(free_port()), "DEMO_ETCD_DATA_DIR": str(tmp_path / "etcd"),
        "DEMO_WEB_PORT": str(free_port()), "DEMO_API_PORT": str(free_port()),
        "DEMO_WEB_BACKENDS": ",".join(f"127.0.0.1:{port}" for port in backends[:2]),
        "DEMO_API_BACKENDS": ",".join(f"127.0.0.1:{port}" for port in backends[2:]),
    }
    env = read_env_file(DEMO_ENV_FILE, overrides)
    services = resolve(load()["services"], env)  # every profile's: the demo profile is all of them
    for name, service in services.items():  # the volume is the run dir, for every service that mounts it
        assert service.get("volumes", [f"run:{run_dir}"]) == [f"run:{run_dir}"], name
    marker = str(tmp_path)
    stack = Stack(services, str(logs), marker)
    status = services["status"]
    healthcheck = status["healthcheck"]["test"]
    assert healthcheck[0] == "CMD"

    def healthy() -> subprocess.CompletedProcess:
        stack.running()
        return subprocess.run(healthcheck[1:], env=process_environment(status, marker), capture_output=True,
                              text=True, timeout=float(status["healthcheck"]["timeout"].rstrip("s")) + 5)

    try:
        for name in start_order(services):
            stack.start(name)
        wait_until(lambda: healthy().returncode == 0, timeout=90, interval=0.5,
                   message="the status service's healthcheck")
        result = healthy()
        assert result.returncode == 0 and result.stdout.strip() == "200 OK", result

        # HAProxy, TCP: the Marathon app's tasks, and the service registered in etcd
        web, api = int(env["DEMO_WEB_PORT"]), int(env["DEMO_API_PORT"])
        wait_until(lambda: {http_get(web)[1] for _ in range(8)} == {"web-a", "web-b"}, timeout=30,
                   message="HAProxy to balance the web backends")
        wait_until(lambda: {http_get(api)[1] for _ in range(8)} == {"api-a", "api-b"}, timeout=30,
                   message="HAProxy to balance the api backends")
        # nginx: one virtual host per service
        vhost_port, domain = int(env["VHOST_PORT"]), env["VHOST_DOMAIN"]
        wait_until(lambda: http_get(vhost_port, host=f"demo-api.{domain}") in {(200, "api-a"), (200, "api-b")},
                   timeout=30, message="nginx to serve demo-api's virtual host")
        names = set()
        for _ in range(8):
            code, body = http_get(vhost_port, host=f"web.demo.{domain}")  # Marathon's /demo/web
            assert code == 200, body
            names.add(body)
        assert names == {"web-a", "web-b"}
        stack.running()
        # what the leftover check looks for: every service, and the workers and pens they started
        alive = set(processes_of_run(marker))
        assert {process.pid for process in stack.processes.values()} < alive
    finally:
        killed = stack.stop()
        deadline = time.monotonic() + 15
        while processes_of_run(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftovers = processes_of_run(marker)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left behind: {leftovers}"
    assert not killed, f"needed SIGKILL to stop: {killed}"
    for port in (web, api, vhost_port, int(env["STATUS_ENDPOINT"].rpartition(":")[2])):
        with socket.socket() as probe:  # nothing listens there any more (TIME_WAIT aside)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))



# -- the healthcheck command ------------------------------------------------------------------
@pytest.mark.parametrize("code, body, expected", [(200, "OK", 0), (503, "INITIALIZING", 1),
                                                   (503, "UNAVAILABLE: nginx not answering: refused", 1)])
def test_healthcheck_passes_only_on_200(code, body, expected):
    asked = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(code)
            self.send_header("Content-Length", str(len(body) + 1))
            self.end_headers()
            self.wfile.write(body.encode() + b"\n")

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # an all-interfaces STATUS_ENDPOINT (the default 0.0.0.0:9090) is asked on the loopback
        result = subprocess.run([os.path.join(VENV_BIN, "proxymatic"), "healthcheck"], capture_output=True, text=True,
                                timeout=30, env={**os.environ, "STATUS_ENDPOINT": f"0.0.0.0:{server.server_port}"})
    finally:
        server.shutdown()
        server.server_close()
    assert (result.returncode, result.stdout.strip()) == (expected, f"{code} {body}")
    assert asked == ["/status"]


def test_healthcheck_fails_when_status_does_not_answer():
    port = free_port()
    result = subprocess.run([os.path.join(VENV_BIN, "proxymatic"), "healthcheck", "--timeout", "1"], capture_output=True,
                            text=True, timeout=30, env={**os.environ, "STATUS_ENDPOINT": f"127.0.0.1:{port}"})
    assert result.returncode == 1 and f"127.0.0.1:{port}/status" in result.stdout
    result = subprocess.run([os.path.join(VENV_BIN, "proxymatic"), "healthcheck"], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "STATUS_ENDPOINT": ""})
    assert result.returncode == 1 and "disabled" in result.stdout
