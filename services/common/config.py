"""Every option of proxymatic: command-line flag, environment variable, default, validation.

The table in docs (README "Options") is this module. A flag wins over the environment; a bad
value raises ConfigError with a message naming the option, and the CLI exits 1 with it.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping

from services.common.bus import Endpoint
from services.common.model import ProxySettings
from services.common.redact import redact
from services.common.validate import integer, is_domain


class ConfigError(ValueError):
    pass


def parse_bool(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise ConfigError(f"{name}: expected true/false/1/0, got {value!r}")


def parse_int(low: int, high: int) -> Callable[[str, str], int]:
    def parse(value: str, name: str) -> int:
        number = integer(value, 0, 10**12)  # ASCII digits only: int() also reads "٣" and "1_000"
        if number is None:
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if not low <= number <= high:
            raise ConfigError(f"{name}: must be between {low} and {high}, got {number}")
        return number
    return parse


def parse_host_port(value: str, name: str) -> str:
    """`ip:port`, or empty to disable."""
    value = value.strip()
    if not value:
        return ""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}: expected ip:port, got {value!r}")
    return f"{host or '0.0.0.0'}:{int(port)}"


def parse_urls(scheme: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(value: str, name: str) -> str:
        value = value.strip()
        if not value:
            return ""
        # `http://m1:8080,http://m2:8080` lists URLs; `etcd://h1:2379,h2:2379/prefix` lists hosts.
        for url in re.split(r",(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)", value):
            if not re.match(rf"^({'|'.join(scheme)})://[^/\s]+", url.strip()):
                raise ConfigError(f"{name}: expected {' or '.join(s + '://host:port' for s in scheme)}..., "
                                  f"got {redact(url.strip())!r}")  # an error message is logged
        return value
    return parse


def parse_log_format(value: str, name: str) -> str:
    value = value.strip().lower()
    if value not in ("text", "json"):
        raise ConfigError(f"{name} must be text or json, got {value!r:.60}")
    return value


def parse_text(value: str, name: str) -> str:
    return value.strip()


def parse_path(value: str, name: str) -> str:
    """A directory path, normalized (`/tmp/pm/` and `/tmp/pm` are one run dir: one lock, one
    instance marker)."""
    value = value.strip()
    return os.path.normpath(value) if value else value


def parse_domain(value: str, name: str) -> str:
    value = value.strip().strip(".")
    if value and not is_domain(value):
        raise ConfigError(f"{name}: {value!r} is not a valid domain name")
    return value.lower()


ROLES = ("all", "central", "node")


def parse_role(value: str, name: str) -> str:
    value = value.strip().lower()
    if value not in ROLES:
        raise ConfigError(f"{name} must be one of {', '.join(ROLES)}, got {value!r:.40}")
    return value


def parse_endpoint(value: str, name: str) -> str:
    """A bus endpoint, or a comma-separated list of them (`tcp://c1:7100,tcp://c2:7100`: the
    centrals a node's applier and status follow; only PLANNER_BUS on a node may be a list, see
    check()). Normalized: no spaces, each endpoint once."""
    if not value.strip():
        return ""
    endpoints: list[str] = []
    for item in re.split(r",(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)", value.strip()):
        item = item.strip()
        try:
            Endpoint.parse(item)
        except ValueError as error:
            raise ConfigError(f"{name}: {error}") from None
        if item in endpoints:
            raise ConfigError(f"{name}: {item!r} is listed twice")
        endpoints.append(item)
    return ",".join(endpoints)


def endpoint_list(value: str) -> list[str]:
    """The endpoints of a parsed (normalized) bus option."""
    return value.split(",") if value else []


@dataclass(frozen=True)
class Option:
    dest: str
    flags: tuple[str, ...]
    env: str
    default: str
    parse: Callable[[str, str], object]
    help: str
    is_flag: bool = False  # a boolean that also has --no-<name>


# The interface of the original (../shared/seed/interface.md) first, then proxymatic 2 additions.
OPTIONS: tuple[Option, ...] = (
    Option("marathon", ("-m", "--marathon"), "MARATHON_URL", "", parse_urls(("http", "https")),
           "comma-separated Marathon replicas, e.g. http://m1:8080/,http://m2:8080/"),
    Option("registrator", ("-r", "--registrator"), "REGISTRATOR_URL", "", parse_urls(("etcd",)),
           "where registrator publishes services, e.g. etcd://localhost:4001/services"),
    Option("refresh_interval", ("-i", "--refresh-interval"), "REFRESH_INTERVAL", "60", parse_int(1, 86400),
           "seconds between full polls (a safety resync for event-driven sources)"),
    Option("expose_host", ("-e", "--expose-host"), "EXPOSE_HOST", "false", parse_bool,
           "also proxy services running with host networking", is_flag=True),
    Option("status_endpoint", ("--status-endpoint",), "STATUS_ENDPOINT", "0.0.0.0:9090", parse_host_port,
           "ip:port serving /status and the HAProxy statistics; empty disables it"),
    Option("group_size", ("--group-size",), "GROUP_SIZE", "1", parse_int(1, 10000),
           "number of proxymatic instances; per-container maxconn is divided by it"),
    Option("max_connections", ("--max-connections",), "MAX_CONNECTIONS", "8192", parse_int(1, 1_000_000),
           "max connections per service"),
    Option("pen_servers", ("--pen-servers",), "PEN_SERVERS", "64", parse_int(1, 10000),
           "max backends per Pen (UDP) service"),
    Option("pen_clients", ("--pen-clients",), "PEN_CLIENTS", "8192", parse_int(1, 1_000_000),
           "max connection-tracked clients per Pen service"),
    Option("haproxy", ("--haproxy",), "HAPROXY", "true", parse_bool,
           "HAProxy serves TCP services; false sends everything through Pen", is_flag=True),
    Option("vhost_domain", ("--vhost-domain",), "VHOST_DOMAIN", "", parse_domain,
           "enable nginx with one virtual host per service under this domain"),
    Option("vhost_port", ("--vhost-port",), "VHOST_PORT", "80", parse_int(1, 65535),
           "port nginx serves the virtual hosts on"),
    Option("proxy_protocol", ("--proxy-protocol",), "PROXY_PROTOCOL", "false", parse_bool,
           "accept the PROXY protocol on the nginx vhost port", is_flag=True),
    Option("verbose", ("-v", "--verbose"), "VERBOSE", "false", parse_bool, "debug logging", is_flag=True),
    # proxymatic 2 additions
    Option("services_file", ("--services-file",), "SERVICES_FILE", "", parse_text,
           "static services JSON file, re-read when it changes (see docs/services-file.md)"),
    Option("run_dir", ("--run-dir",), "RUN_DIR", "/run/proxymatic", parse_path,
           "directory for rendered configs, bus sockets, pid files and logs"),
    Option("collector_bus", ("--collector-bus",), "COLLECTOR_BUS", "", parse_endpoint,
           "collector PUB endpoint [default: ipc://RUN_DIR/bus/collector.pub]"),
    Option("planner_bus", ("--planner-bus",), "PLANNER_BUS", "", parse_endpoint,
           "planner PUB endpoint [default: ipc://RUN_DIR/bus/planner.pub]"),
    Option("applier_bus", ("--applier-bus",), "APPLIER_BUS", "", parse_endpoint,
           "applier PUB endpoint [default: ipc://RUN_DIR/bus/applier.pub]"),
    Option("node_name", ("--node-name",), "NODE_NAME", "", parse_text,
           "name of this node on the bus [default: the host name]"),
    Option("log_format", ("--log-format",), "LOG_FORMAT", "text", parse_log_format,
           "text, or json: every log line of every stage one JSON object (ts, level, stage, msg, fields)"),
    Option("shutdown_grace", ("--shutdown-grace",), "SHUTDOWN_GRACE", "0", parse_int(0, 3600),
           "seconds to keep forwarding with /status TERMINATING after SIGTERM (0: until killed or a second signal)"),
    # Deployment modes (docs/deploying.md)
    Option("role", ("--role",), "ROLE", "all", parse_role,
           "all: every stage and proxy; central: collector, planner and status; node: applier, status and the proxies"),
    Option("bus_secret_key", ("--bus-secret-key",), "BUS_SECRET_KEY", "", parse_path,
           "this process's CURVE certificate (NAME.key_secret, from `proxymatic keygen`) for tcp:// buses"),
    Option("bus_server_key", ("--bus-server-key",), "BUS_SERVER_KEY", "", parse_path,
           "the public certificate (NAME.key) of the tcp:// publishers this process subscribes to"),
    Option("bus_authorized_keys", ("--bus-authorized-keys",), "BUS_AUTHORIZED_KEYS", "", parse_path,
           "directory of the public certificates (*.key) a tcp:// publisher accepts subscribers with"),
    Option("bus_insecure", ("--bus-insecure",), "BUS_INSECURE", "false", parse_bool,
           "allow a tcp:// bus on a non-loopback address without CURVE keys", is_flag=True),
)

STAGES = ("collector", "planner", "applier", "status")
TOOLS = ("tap", "explain", "plan")  # commands that read or compute and start nothing


@dataclass(frozen=True)
class Settings:
    marathon: str = ""
    registrator: str = ""
    refresh_interval: int = 60
    expose_host: bool = False
    status_endpoint: str = "0.0.0.0:9090"
    group_size: int = 1
    max_connections: int = 8192
    pen_servers: int = 64
    pen_clients: int = 8192
    haproxy: bool = True
    vhost_domain: str = ""
    vhost_port: int = 80
    proxy_protocol: bool = False
    verbose: bool = False
    log_format: str = "text"
    services_file: str = ""
    run_dir: str = "/run/proxymatic"
    collector_bus: str = ""
    planner_bus: str = ""
    applier_bus: str = ""
    node_name: str = ""
    shutdown_grace: int = 0
    role: str = "all"
    bus_secret_key: str = ""
    bus_server_key: str = ""
    bus_authorized_keys: str = ""
    bus_insecure: bool = False

    @property
    def sources(self) -> tuple[str, ...]:
        """Configured discovery sources, in precedence order (highest first)."""
        return tuple(name for name, value in (("marathon", self.marathon), ("registrator", self.registrator),
                                              ("file", self.services_file)) if value)

    def bus(self, stage: str) -> Endpoint:
        """The one endpoint `stage` publishes on (binds); ConfigError when several are listed
        (only a node's PLANNER_BUS may list several centrals: see `buses`)."""
        endpoints = self.buses(stage)
        if len(endpoints) != 1:
            raise ConfigError(f"{stage.upper()}_BUS lists {len(endpoints)} endpoints: the {stage} binds one "
                              "(a list is for ROLE=node, whose applier and status follow several centrals)")
        return endpoints[0]

    def buses(self, stage: str) -> tuple[Endpoint, ...]:
        """Every endpoint of `stage` a subscriber follows: the configured list (PLANNER_BUS on a
        node may name several centrals), else the run dir's ipc endpoint."""
        configured = endpoint_list(getattr(self, f"{stage}_bus"))
        return tuple(Endpoint.parse(item) for item in configured) or (
            Endpoint.parse(f"ipc://{os.path.join(self.run_dir, 'bus', stage)}.pub"),)

    @property
    def node(self) -> str:
        return self.node_name or os.uname().nodename

    def proxy_settings(self) -> ProxySettings:
        return ProxySettings(
            max_connections=self.max_connections, pen_servers=self.pen_servers, pen_clients=self.pen_clients,
            haproxy=self.haproxy, vhost_domain=self.vhost_domain, vhost_port=self.vhost_port,
            proxy_protocol=self.proxy_protocol,
        )

    def path(self, *parts: str) -> str:
        return os.path.join(self.run_dir, *parts)


def add_options(parser: argparse.ArgumentParser) -> None:
    for option in OPTIONS:
        text = f"{option.help} [env {option.env}, default: {option.default or 'none'}]"
        if option.is_flag:
            # `--expose-host` alone means true; `--expose-host=false` and `--no-expose-host` work too.
            parser.add_argument(*option.flags, dest=option.dest, nargs="?", const="true", default=None,
                                metavar="BOOL", help=text)
            long_flag = [f for f in option.flags if f.startswith("--")][0]
            parser.add_argument("--no-" + long_flag[2:], dest=option.dest, action="store_const",
                                const="false", help=argparse.SUPPRESS)
        else:
            parser.add_argument(*option.flags, dest=option.dest, default=None, help=text)


def settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    values: dict[str, object] = {}
    for option in OPTIONS:
        raw = getattr(args, option.dest, None)
        name = [f for f in option.flags if f.startswith("--")][0]
        if raw is None:
            raw = environ.get(option.env)
            name = option.env
        if raw is None:
            raw = option.default
        values[option.dest] = option.parse(raw, name)
    settings = Settings(**values)  # type: ignore[arg-type]
    check(settings)
    return settings


def settings_environ(settings: Settings) -> dict[str, str]:
    """Every option as its environment variable, so that `settings_from(<no flags>, this)` gives
    `settings` back. The launcher hands settings to its programs this way, never on a command
    line: a Marathon password in argv would show in `ps` and in supervisord.conf."""
    environ = {}
    for option in OPTIONS:
        value = getattr(settings, option.dest)
        environ[option.env] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return environ


def check(settings: Settings) -> None:
    if settings.vhost_domain and settings.status_endpoint and \
            settings.status_endpoint.endswith(f":{settings.vhost_port}"):
        raise ConfigError(f"VHOST_PORT {settings.vhost_port} collides with STATUS_ENDPOINT {settings.status_endpoint}")
    if not os.path.isabs(settings.run_dir):
        raise ConfigError(f"RUN_DIR must be an absolute path, got {settings.run_dir!r}")
    for stage in ("collector", "applier"):
        if len(endpoint_list(getattr(settings, f"{stage}_bus"))) > 1:
            raise ConfigError(f"{stage.upper()}_BUS: one endpoint (the {stage} binds it), got a list")
    planners = endpoint_list(settings.planner_bus)
    if len(planners) > 1 and settings.role != "node":
        raise ConfigError(f"PLANNER_BUS lists {len(planners)} endpoints: only ROLE=node follows several centrals "
                          f"(ROLE={settings.role} runs a planner, which binds one endpoint)")
    if settings.role == "node" and not planners:
        raise ConfigError("ROLE=node runs no planner: PLANNER_BUS must name the central's, e.g. "
                          "--planner-bus tcp://central:7100 (several, comma-separated, for two centrals)")


def reserved_ports(settings: Settings) -> dict[int, str]:
    """Ports proxymatic itself listens on, which no service may take."""
    ports: dict[int, str] = {}
    if settings.status_endpoint:
        ports[int(settings.status_endpoint.rpartition(":")[2])] = "STATUS_ENDPOINT"
    if settings.vhost_domain:
        ports[settings.vhost_port] = "VHOST_PORT"
    return ports
