"""Plan -> nginx.conf text for the virtual hosts (pure: no files, no processes).

Every TCP service gets `http://<name>.<VHOST_DOMAIN>/` on VHOST_PORT; when one name has several
ports the lowest port wins. A virtual host does not know the service's servers: it proxies to
the node-local TCP listener of its service, `127.0.0.1:<service port>` (HAProxy, or Pen with
HAPROXY=false), which already balances, drains and health-checks them. So the rendered text
depends only on (server name, service port, timeout_server) per vhost and the settings: a
membership change never changes it, and never reloads nginx.

Nothing taken from a plan reaches the config unchecked: server names must match [a-z0-9.-] (a
name with anything else is left out with a warning), upstream names and listener addresses are
built from port numbers only, checked as integers.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import jinja2

from services.common.model import Plan, Service

_TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
_SAFE_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(_TEMPLATES), undefined=jinja2.StrictUndefined,
                          trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)

# Where a vhost sends its requests: the service's own listener on this node.
LISTENER_HOST = "127.0.0.1"


@dataclass(frozen=True)
class VirtualHost:
    key: str  # port/protocol of the service it routes to
    server_name: str
    upstream: str  # service_<port>
    listener: str  # 127.0.0.1:<service port>
    timeout_server: int | None
    service: str = ""  # the service's name, for messages


# The first line of each vhost's block in the template; the block runs to the next one (or to the
# end of `http`). How an nginx error "in nginx.conf:LINE" is traced back to a vhost.
BLOCK_MARK = re.compile(r"^    # vhost (\d+/tcp) ")


@dataclass(frozen=True)
class Block:
    key: str  # the vhost's service key
    first: int  # line numbers, 1-based, inclusive
    last: int


@dataclass(frozen=True)
class Rendered:
    text: str
    vhosts: tuple[VirtualHost, ...]
    warnings: tuple[str, ...]
    blocks: tuple[Block, ...] = ()


def vhost_blocks(text: str) -> tuple[Block, ...]:
    """Where each vhost's upstream and server block are in `text`."""
    lines = text.splitlines()
    starts = [(number, match[1]) for number, line in enumerate(lines, 1) if (match := BLOCK_MARK.match(line))]
    end = max((n for n, line in enumerate(lines, 1) if line == "}"), default=len(lines))  # closes `http`
    return tuple(Block(key, first, (starts[i + 1][0] if i + 1 < len(starts) else end) - 1)
                 for i, (first, key) in enumerate(starts))


def _int(value, low: int, high: int, what: str) -> int:
    # Only a real int: a string such as "80; evil" never reaches the config.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"bad {what} {value!r}")
    return value


def virtual_hosts(plan: Plan) -> tuple[list[VirtualHost], list[str]]:
    domain = plan.settings.vhost_domain.strip(".").lower()
    vhost_port = _int(plan.settings.vhost_port, 1, 65535, "vhost port")
    warnings: list[str] = []
    tcp = [s for s in plan.services if s.protocol == "tcp"]
    for service in tcp:
        _int(service.port, 1, 65535, f"port of service {service.name!r}")
        if service.timeout_server is not None:
            _int(service.timeout_server, 1, 86400, f"timeout_server of service {service.name!r}")
    by_name: dict[str, Service] = {}
    for service in sorted(tcp, key=lambda s: s.port):
        name = f"{service.name.lower()}.{domain}"
        if not _SAFE_NAME.fullmatch(name) or ".." in name or len(name) > 253:  # `$` alone would allow a final newline
            warnings.append(f"service {service.name!r} ({service.key}): {name!r} is not a valid host name, "
                            "no virtual host")
            continue
        if service.port == vhost_port:
            # its listener would be nginx itself: a request loop
            warnings.append(f"service {service.name!r} ({service.key}): its port is VHOST_PORT, no virtual host")
            continue
        by_name.setdefault(name, service)  # lowest port wins
    vhosts = [VirtualHost(key=f"{service.port}/tcp", server_name=name, upstream=f"service_{service.port}",
                          listener=f"{LISTENER_HOST}:{service.port}",
                          timeout_server=service.timeout_server or None, service=service.name)
              for name, service in sorted(by_name.items(), key=lambda item: item[1].port)]
    return vhosts, warnings


def _bucket_size(vhosts: list[VirtualHost]) -> int:
    longest = max((len(v.server_name) for v in vhosts), default=0)
    size = 64
    while size < longest + 32:
        size *= 2
    return size


def render(plan: Plan, prefix: str, user: str | None = None, exclude: frozenset[str] = frozenset()) -> Rendered:
    """The whole nginx.conf for `plan` (also the bootstrap config: a plan without services).
    `exclude`: vhost keys set aside (left out after names were assigned, so a name whose vhost
    is set aside does not move to another port)."""
    if user is not None and not re.match(r"^[a-z_][a-z0-9_-]*$", user):
        raise ValueError(f"bad user name {user!r}")
    vhosts, warnings = virtual_hosts(plan)
    vhosts = [vhost for vhost in vhosts if vhost.key not in exclude]
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
    return Rendered(text=text, vhosts=tuple(vhosts), warnings=tuple(warnings), blocks=vhost_blocks(text))
