"""Plan -> nginx.conf text for the virtual hosts (pure: no files, no processes).

Every TCP service gets `http://<name>.<VHOST_DOMAIN>/` on VHOST_PORT; when one name has several
ports the lowest port wins. Nothing taken from a plan reaches the config unchecked: server names
must match [a-z0-9.-] (a name with anything else is left out with a warning), upstream names are
built from port numbers only, and server addresses are re-parsed as IP addresses.
"""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

import jinja2

from services.common.model import Plan, Service

_TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
_SAFE_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(_TEMPLATES), undefined=jinja2.StrictUndefined,
                          trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)


@dataclass(frozen=True)
class UpstreamServer:
    address: str  # ip:port or [ipv6]:port
    weight: int  # 1..256
    max_conns: int  # 0: unlimited


@dataclass(frozen=True)
class VirtualHost:
    key: str  # port/protocol of the service it routes to
    server_name: str
    upstream: str
    servers: tuple[UpstreamServer, ...]
    timeout_server: int | None


@dataclass(frozen=True)
class Rendered:
    text: str
    vhosts: tuple[VirtualHost, ...]
    warnings: tuple[str, ...]


def _address(ip: str, port: int) -> str:
    parsed = ipaddress.ip_address(ip)  # raises for anything that is not an address
    if not 0 < int(port) < 65536:
        raise ValueError(f"bad port {port!r}")
    return f"[{parsed}]:{int(port)}" if parsed.version == 6 else f"{parsed}:{int(port)}"


def virtual_hosts(plan: Plan) -> tuple[list[VirtualHost], list[str]]:
    domain = plan.settings.vhost_domain.strip(".").lower()
    warnings: list[str] = []
    by_name: dict[str, Service] = {}
    for service in sorted(plan.services, key=lambda s: s.port):
        if service.protocol != "tcp":
            continue
        name = f"{service.name.lower()}.{domain}"
        if not _SAFE_NAME.match(name) or ".." in name or len(name) > 253:
            warnings.append(f"service {service.name!r} ({service.key}): {name!r} is not a valid host name, "
                            "no virtual host")
            continue
        by_name.setdefault(name, service)  # lowest port wins
    vhosts = []
    for name, service in sorted(by_name.items(), key=lambda item: item[1].port):
        servers = []
        for server in service.servers:
            if server.weight <= 0:
                continue  # draining: no new requests
            servers.append(UpstreamServer(address=_address(server.ip, server.port),
                                          weight=min(int(server.weight), 256),
                                          max_conns=int(server.maxconn or 0)))
        vhosts.append(VirtualHost(key=f"{int(service.port)}/tcp", server_name=name,
                                  upstream=f"service_{int(service.port)}", servers=tuple(servers),
                                  timeout_server=int(service.timeout_server) if service.timeout_server else None))
    return vhosts, warnings


def _bucket_size(vhosts: list[VirtualHost]) -> int:
    longest = max((len(v.server_name) for v in vhosts), default=0)
    size = 64
    while size < longest + 32:
        size *= 2
    return size


def render(plan: Plan, prefix: str, user: str | None = None) -> Rendered:
    """The whole nginx.conf for `plan` (also the bootstrap config: a plan without services)."""
    if user is not None and not re.match(r"^[a-z_][a-z0-9_-]*$", user):
        raise ValueError(f"bad user name {user!r}")
    vhosts, warnings = virtual_hosts(plan)
    text = _ENV.get_template("nginx.conf.j2").render(
        prefix=prefix.replace("\n", " "),
        user=user,
        # a proxied request holds two connections (client and upstream)
        worker_connections=max(1024, 2 * int(plan.settings.max_connections)),
        port=int(plan.settings.vhost_port),
        listen_options=" proxy_protocol" if plan.settings.proxy_protocol else "",
        proxy_protocol=bool(plan.settings.proxy_protocol),
        names_bucket_size=_bucket_size(vhosts),
        names_max_size=max(512, 2 * len(vhosts)),
        vhosts=vhosts,
    )
    return Rendered(text=text, vhosts=tuple(vhosts), warnings=tuple(warnings))
