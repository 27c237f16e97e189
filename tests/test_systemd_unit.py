"""deploy/proxymatic.service: systemd accepts it, it stops only after the drain is over, and what
it runs exists (the docker options it uses, the settings it forwards, the image's entrypoint).

`systemd-analyze verify` wants every ExecStart binary to exist; docker is not installed on the
test machines, so a copy of the unit whose /usr/bin/docker is a stub is verified beside a stub
docker.service (the [X-Fleet]
section is kept: systemd ignores `X-` sections, and the test asserts that).
"""
from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from services.common.config import OPTIONS, Settings
from services.launcher import programs

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "proxymatic.service"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
HAPROXY_TEMPLATE = REPO / "services" / "applier" / "templates" / "haproxy.cfg.j2"
DOCKER = "/usr/bin/docker"
# docker run's options the unit may use (docker is not here to ask)
DOCKER_RUN_OPTIONS = {"--rm", "--name", "--network", "--net", "--stop-timeout", "-e", "--env", "--env-file",
                      "--volume", "-v", "--init", "--restart", "--log-driver", "--log-opt", "--pull"}


def sections() -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values (a key may repeat), continuation lines joined, comments dropped."""
    result: dict[str, dict[str, list[str]]] = {}
    current = None
    pending = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("["):
            current = result.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, line
        current.setdefault(key.strip(), []).append(value.strip())
    return result


def environment() -> dict[str, str]:
    env = {}
    for line in sections()["Service"].get("Environment", []):
        for word in shlex.split(line):
            name, _, value = word.partition("=")
            env[name] = value
    return env


def expand(command: str) -> list[str]:
    env = environment()
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word) for word in shlex.split(command)]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|sec|min|m)?", value.strip())
    assert match, f"a time span systemd reads: {value!r}"
    return int(match.group(1)) * (60 if match.group(2) in ("min", "m") else 1)


def hard_stop_after() -> int:
    match = re.search(r"^\s*hard-stop-after\s+(\d+)s\s*$", HAPROXY_TEMPLATE.read_text(), re.M)
    assert match, "hard-stop-after in the HAProxy template"
    return int(match.group(1))


def test_systemd_analyze_verify_is_clean(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed (systemd)")
    stub = tmp_path / "docker"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    # the docker.service it requires, as Docker's packages install it (verify looks beside the unit)
    (tmp_path / "docker.service").write_text(f"[Unit]\nDescription=Docker\n[Service]\nExecStart={stub}\n")
    copy = tmp_path / "proxymatic.service"
    copy.write_text(UNIT.read_text().replace(DOCKER, str(stub)))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), \
        result.stdout + result.stderr


def test_x_fleet_section_schedules_on_every_node():
    assert sections()["X-Fleet"] == {"Global": ["true"]}
    # systemd skips X- sections silently; the standard ones are all there
    assert {"Unit", "Service", "Install", "X-Fleet"} == set(sections())
    configparser.ConfigParser(strict=False, interpolation=None).read_string(UNIT.read_text())


def test_restarts_always_and_every_command_is_docker():
    service = sections()["Service"]
    assert service["Restart"] == ["always"]
    for key in ("ExecStartPre", "ExecStart", "ExecStop"):
        for command in service[key]:
            assert expand(command.lstrip("-"))[0] == DOCKER, command


def test_stop_timeout_exceeds_the_drain():
    service = sections()["Service"]
    env = environment()
    grace = int(env["SHUTDOWN_GRACE"])
    # what the code waits for after the grace: HAProxy's old workers and supervisord's stopwaitsecs
    waits = [program.stopwaitsecs for program in programs(Settings(vhost_domain="example.com"))]
    drain = grace + max([hard_stop_after(), *waits])
    assert grace + hard_stop_after() <= drain
    stop = expand(service["ExecStop"][0])
    assert stop[1] == "stop"
    docker_stop_time = int(stop[stop.index("--time") + 1])
    start = expand(service["ExecStart"][0])
    assert int(start[start.index("--stop-timeout") + 1]) == docker_stop_time
    timeout_stop = seconds(service["TimeoutStopSec"][0])
    assert drain < docker_stop_time < timeout_stop, (drain, docker_stop_time, timeout_stop)
    assert "-e" in start and start[start.index("SHUTDOWN_GRACE") - 1] == "-e"  # the grace reaches it


def test_exec_start_runs_the_image_with_real_options():
    start = expand(sections()["Service"]["ExecStart"][0])
    assert start[:2] == [DOCKER, "run"]
    image = environment()["IMAGE"]
    position = start.index(image)
    options, after = start[2:position], start[position + 1:]
    envs = {option.env for option in OPTIONS}
    flags = {flag for option in OPTIONS for flag in option.flags}
    index = 0
    while index < len(options):
        word = options[index]
        assert word.split("=")[0] in DOCKER_RUN_OPTIONS, f"docker run {word}?"
        if word in ("-e", "--env"):
            index += 1
            name = options[index]
            assert "=" not in name, f"-e {name}: a value belongs in /etc/default/proxymatic, not argv"
            assert name in envs, f"-e {name}: not a proxymatic setting"
        elif word in ("--name", "--network", "--net", "--stop-timeout", "--volume", "-v", "--env-file"):
            index += 1
        index += 1
    assert "--network" in options and options[options.index("--network") + 1] == "host"
    for word in after:  # anything after the image goes to proxymatic (its ENTRYPOINT)
        assert word.split("=")[0] in flags, f"proxymatic {word}?"
    assert 'ENTRYPOINT ["tini", "--", "proxymatic"]' in DOCKERFILE.read_text()
    # the settings the unit sets itself are proxymatic's, or its own (IMAGE, NAME, STOP_TIME)
    assert set(environment()) <= envs | {"IMAGE", "NAME", "STOP_TIME"}
