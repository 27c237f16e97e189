"""Pure parsing of what gliderlabs/registrator writes to etcd (v2) into proxymatic services.

Layout (docs/registrator.md):

    <prefix>/<service-name>[@<service-port>]/<host>:<container>:<exposed-port>[:udp] = <ip>:<port>

* the service port is the key's third field (the container's exposed port), or `@<port>`
  after the service name, which wins;
* `:udp` at the end of the key makes the service UDP;
* the value is the backend, `ip:port`, `[v6]:port` or `hostname:port` (resolved to an IP);
* entries with the same service port and protocol are one service with several servers.

Nothing here touches the network except the resolver passed in (`resolve_host` by default).
A bad entry raises EntryError naming the key; callers turn it into a warning and carry on.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import unquote

from services.collector.exclusions import excluded as make_excluded
from services.collector.resolve import lookup_address
from services.common.model import Excluded, ModelError, clip as clip_value, Server, Service, validate_name
from services.common.redact import redact
from services.common.validate import is_hostname, is_resolvable_host, port_text as parse_port

SOURCE = "registrator"
DEFAULT_ETCD_PORT = 2379  # registrator's own default (etcd/etcd.go Factory.New)

# registrator's own service-ID shape (bridge/bridge.go L24), with the port and `udp` captured.
# `\Z`, never `$` (which also matches before a final newline); ports are ASCII digits only
# (str.isdigit() is true for "²", which int() refuses, and for "٨٠", which it reads as 80).
_ID_RE = re.compile(r"^(?P<host>.+?):(?P<container>[a-zA-Z0-9][a-zA-Z0-9_.-]+):(?P<port>[0-9]{1,10})(?::(?P<udp>udp))?\Z")
_ADDRESS_RE = re.compile(r"[A-Za-z0-9_.:\[\]-]{1,260}:[0-9]{1,5}\Z")  # what an Excluded shows as its address

Resolver = Callable[[str], str]


class EntryError(ValueError):
    """One etcd entry that cannot become a backend; the message names the key. What was
    understood of it before it failed (service name, port, value) is kept for `excluded()`."""

    def __init__(self, message: str, key: Any = "", code: str = "bad_data", name: str = "", service_key: str = "",
                 address: str = "", detail: str = ""):
        super().__init__(message)
        self.etcd_key, self.code, self.name, self.service_key = key, code, name, service_key
        self.address, self.detail = address, detail or message

    def excluded(self) -> Excluded:
        """This entry as an Excluded (`unresolvable` or `bad_data`)."""
        return make_excluded(SOURCE, self.code, self.detail, app=self.name, task=self.etcd_key,
                             service=self.name, key=self.service_key, address=self.address)


class Unresolvable(ValueError):
    """A backend host name that does not resolve."""


@dataclass(frozen=True)
class Entry:
    """One registrator key, parsed: a backend of service `port/protocol`."""

    key: str
    name: str
    port: int
    protocol: str
    server: Server

    @property
    def service_key(self) -> tuple[int, str]:
        return (self.port, self.protocol)


# -- URL -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EtcdUrl:
    """A parsed REGISTRATOR_URL. `username`/`password` ("" when absent) are sent to every
    endpoint (HTTP basic auth, etcd v2 auth); `repr` never shows the password."""

    endpoints: tuple[tuple[str, int], ...]
    prefix: str
    username: str = ""
    password: str = field(default="", repr=False)


def parse_registrator_url(url: str) -> tuple[tuple[tuple[str, int], ...], str]:
    """`etcd://h1:p1,h2:p2/prefix` (or `etcd://h1:p1/prefix,etcd://h2:p2/prefix`) →
    (((host, port), ...), "/prefix"). The prefix is "" for the root. Raises ValueError."""
    parsed = parse_etcd_url(url)
    return parsed.endpoints, parsed.prefix


def parse_etcd_url(url: str) -> EtcdUrl:
    """The same as `parse_registrator_url`, with the credentials: any host may be written
    `user:password@host[:port]` (percent-encode `/ , :` and `%` in either); they are one
    cluster's, so every host that gives them must give the same, and they apply to all hosts.
    Raises ValueError; its message never contains the password."""
    text = url.strip()
    if not text:
        raise ValueError("registrator URL is empty")
    shown = shown_url(text)
    endpoints: list[tuple[str, int]] = []
    prefixes: set[str] = set()
    credentials: set[tuple[str, str]] = set()
    # Split into URLs: a part that starts with etcd:// begins a new URL, others are extra hosts.
    groups: list[list[str]] = []
    for part in text.split(","):
        part = part.strip()
        if part.lower().startswith("etcd://") or not groups:
            groups.append([part])
        else:
            groups[-1].append(part)
    for group in groups:
        first = group[0]
        if not first.lower().startswith("etcd://"):
            raise ValueError(f"registrator URL must start with etcd://, got {shown!r}")
        rest = first[len("etcd://"):]
        hosts = [rest] + group[1:]
        # The path follows the last host of the group: etcd://h1:p1,h2:p2/prefix
        last_host, slash, path = hosts[-1].partition("/")
        hosts[-1] = last_host
        for hostpart in hosts:
            if "/" in hostpart:
                raise ValueError(f"registrator URL {shown!r}: a path may only follow the last host")
            userinfo, at, hostport = hostpart.rpartition("@")
            if at:
                credentials.add(_credentials(userinfo, shown))
            endpoints.append(_parse_host_port(hostport if at else hostpart, shown, text))
        prefixes.add(normalize_prefix(path if slash else ""))
    if len(prefixes) > 1:
        got = "" if "@" in text else f", got {sorted(prefixes)}"  # a path may hold a piece of a password
        raise ValueError(f"registrator URL {shown!r}: all endpoints must use the same prefix{got}")
    if len(credentials) > 1:
        raise ValueError(f"registrator URL {shown!r}: all endpoints must use the same user and password")
    username, password = credentials.pop() if credentials else ("", "")
    return EtcdUrl(tuple(dict.fromkeys(endpoints)), prefixes.pop(), username, password)


def _credentials(userinfo: str, shown: str) -> tuple[str, str]:
    user, colon, password = userinfo.partition(":")
    if not user or not colon or not password:
        # python-etcd sends basic auth only with both
        raise ValueError(f"registrator URL {shown!r}: credentials must be user:password@ (both non-empty)")
    if "%" in userinfo and not re.fullmatch(r"(?:[^%]|%[0-9A-Fa-f]{2})*", userinfo):
        raise ValueError(f"registrator URL {shown!r}: percent-encode / , : and % in the user and password")
    return unquote(user), unquote(password)


def shown_url(url: str) -> str:
    """`url` fit for an error message or a log line: the password hidden, whatever the URL's
    shape. `redact` when the URL parses as scheme://user:password@host...; when an `@` is left
    after that (a password with `/`, `,` or `@` in it), everything before the last `@` but the
    scheme and the first user name is hidden."""
    text = redact(url)
    if "@" not in text.replace(":***@", ""):
        return text
    head, _, tail = text.rpartition("@")
    match = re.match(r"\s*([A-Za-z][A-Za-z0-9+.-]*://)?([^:@/,\s]*)", head)
    scheme, user = (match.group(1) or "", match.group(2)) if match else ("", "")
    return f"{scheme}{user}:***@{tail}" if user else f"{scheme}***@{tail}"


def _parse_host_port(text: str, url: str, raw: str) -> tuple[str, int]:
    """One `host[:port]`; `url` is the URL as shown in errors (redacted), `raw` the URL."""

    def piece(value: str) -> str:
        # A piece that could be part of a password (found before the URL's last `@`, e.g. when
        # an unencoded `/` or `,` in a password split the URL in the wrong place) is hidden.
        return "'***'" if value and "@" in raw and raw.find(value) < raw.rfind("@") else repr(value)

    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"registrator URL {url!r}: bad host {piece(text)}")
        port_text = rest[1:] if rest else ""
    else:
        host, colon, port_text = text.partition(":")
        if colon and not port_text:
            raise ValueError(f"registrator URL {url!r}: missing port after {piece(host)}")
    if not host or not is_hostname(host):
        raise ValueError(f"registrator URL {url!r}: bad host {piece(text)}")
    if not port_text:
        return host, DEFAULT_ETCD_PORT
    if parse_port(port_text) is None:
        raise ValueError(f"registrator URL {url!r}: bad port {piece(port_text)}")
    return host, int(port_text)


def normalize_prefix(path: str) -> str:
    """"services/" → "/services"; "" or "/" → "" (the root)."""
    parts = [p for p in path.split("/") if p]
    return "/" + "/".join(parts) if parts else ""


# -- values --------------------------------------------------------------------------------

def resolve_host(host: str) -> str:
    """A host name → one IP address (IPv4 preferred). Raises OSError when it does not resolve."""
    address = lookup_address(host)
    if address is None:
        raise OSError(f"{host} does not resolve")
    return address


def caching_resolver(resolve: Resolver) -> Resolver:
    """One lookup per host name for the lifetime of the returned function (one full read)."""
    cache: dict[str, str | Exception] = {}

    def cached(host: str) -> str:
        if host not in cache:
            try:
                cache[host] = resolve(host)
            except Exception as error:  # noqa: BLE001 - remembered, re-raised below
                cache[host] = error
        result = cache[host]
        if isinstance(result, Exception):
            raise result
        return result

    return cached


def parse_backend(value: Any, resolve: Resolver = resolve_host) -> tuple[str, int]:
    """`ip:port`, `[v6]:port` or `hostname:port` → (ip, port). Raises ValueError."""
    if not isinstance(value, str):
        raise ValueError("has no value")
    text = value.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"value {value!r} is not <ip>:<port>")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise ValueError(f"value {value!r} is not <ip>:<port>")
        if ":" in host:
            raise ValueError(f"value {value!r}: an IPv6 address must be written [addr]:port")
    if parse_port(port_text) is None:
        raise ValueError(f"value {value!r} has a bad port {port_text!r} (1-65535)")
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        if text.startswith("[") or not is_resolvable_host(host):
            raise ValueError(f"value {value!r}: {host!r} is neither an IP address nor a host name") from None
        try:
            ip = resolve(host)
        except (OSError, UnicodeError) as error:
            raise Unresolvable(f"value {value!r}: cannot resolve {host!r} ({error})") from None
    return ip, int(port_text)


def _clip(value: Any, limit: int = 60) -> str:
    """repr (one line whatever the value), bounded."""
    return clip_value(value, limit)


# -- keys ----------------------------------------------------------------------------------

def relative_key(prefix: str, key: str) -> str | None:
    """The part of `key` below `prefix`, or None when the key is not under it."""
    if not prefix:
        return key.lstrip("/")
    if key.startswith(prefix + "/"):
        return key[len(prefix) + 1:]
    return None


def parse_entry(prefix: str, key: str, value: Any, resolve: Resolver = resolve_host) -> Entry:
    """One etcd key/value under `prefix` → Entry. Raises EntryError naming the key."""
    understood: dict[str, str] = {}
    try:
        return _parse_entry(prefix, key, value, resolve, understood)
    except (ValueError, ModelError) as error:
        # repr'd and bounded: a hostile key or value of megabytes must not flood the logs
        detail = str(error)
        detail = detail if len(detail) <= 400 else detail[:397] + "..."
        raise EntryError(f"registrator key {_clip(key, 200)}: {detail}", key=key,
                         code="unresolvable" if isinstance(error, Unresolvable) else "bad_data",
                         name=understood.get("name", ""), service_key=understood.get("service_key", ""),
                         address=value.strip() if isinstance(value, str) and _ADDRESS_RE.match(value.strip()) else "",
                         detail=detail) from None


def _parse_entry(prefix: str, key: str, value: Any, resolve: Resolver, understood: dict | None = None) -> Entry:
    understood = {} if understood is None else understood
    relative = relative_key(prefix, key)
    if relative is None:
        raise ValueError(f"not under the prefix {prefix or '/'!r}")
    parts = relative.split("/")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ValueError("expected <prefix>/<service-name>/<host>:<container>:<port>[:udp]")
    service, service_id = parts
    name, at, port_override = service.partition("@")
    if at and parse_port(port_override) is None:
        raise ValueError(f"service port override {port_override!r} in {service!r} is not a port (1-65535)")
    try:
        validate_name(name, "service name")
    except ModelError as error:
        raise ValueError(str(error)) from None
    understood["name"] = name
    if at:
        understood["service_key"] = f"{int(port_override)}/{'udp' if service_id.endswith(':udp') else 'tcp'}"

    match = _ID_RE.match(service_id)
    if match:
        hostname = match["host"] if is_hostname(match["host"]) else ""
        protocol = "udp" if match["udp"] else "tcp"
        id_port = int(match["port"])
        if not at and not 0 < id_port < 65536:
            raise ValueError(f"exposed port {match['port']} is not a port (1-65535)")
    elif at:
        # A SERVICE_ID override replaces the whole ID (no structure, no `:udp` added by
        # registrator); the `@port` in the name still says which service port it serves.
        hostname, id_port = "", 0
        protocol = "udp" if service_id.endswith(":udp") else "tcp"
    else:
        raise ValueError(f"service id {service_id!r} is not <host>:<container>:<port>[:udp] "
                         f"(and the service name has no @<port>)")
    port = int(port_override) if at else id_port
    understood["service_key"] = f"{port}/{protocol}"
    ip, backend_port = parse_backend(value, resolve)
    server = Server.from_dict({"ip": ip, "port": backend_port, "hostname": hostname})
    return Entry(key=key, name=name, port=port, protocol=protocol, server=server)


# -- trees and services --------------------------------------------------------------------

def parse_tree(prefix: str, node: Mapping[str, Any] | None,
               resolve: Resolver = resolve_host, excluded: dict[str, Excluded] | None = None
               ) -> tuple[dict[str, Entry], dict[str, str]]:
    """An etcd v2 `node` (from GET <prefix>?recursive=true) → (entries by key, warnings by key).
    Empty directories are ignored; `nodes` may be absent (etcd omits it for empty dirs).
    `excluded`, when given, gets the Excluded of every key that has a warning (same keys)."""
    excluded = {} if excluded is None else excluded
    entries: dict[str, Entry] = {}
    warnings: dict[str, str] = {}
    if not node:
        return entries, warnings
    stack = [node]
    while stack:
        current = stack.pop()
        # etcd only sends objects with a string key here, but a hostile or broken answer must
        # cost one warning, not the whole read (the warning's key sorts it among the others).
        if not isinstance(current, Mapping) or not isinstance(current.get("key", ""), str):
            text = f"registrator: malformed etcd node {_clip(current)} skipped"
            warnings[f"\uffff{text}"] = text
            excluded[f"\uffff{text}"] = make_excluded(SOURCE, "bad_data", f"malformed etcd node {_clip(current)} skipped")
            continue
        key = current.get("key", "")
        if current.get("dir"):
            children = current.get("nodes") or []  # etcd omits `nodes` for an empty dir
            if isinstance(children, list):
                stack.extend(children)
            else:
                warnings[key] = f"registrator directory {_clip(key, 200)}: malformed nodes {_clip(children)} skipped"
                excluded[key] = make_excluded(SOURCE, "bad_data", f"malformed nodes {_clip(children)} skipped",
                                              task=key)
            continue
        if normalize_prefix(key) == prefix:
            warnings[key] = f"registrator prefix {_clip(key, 200)} is a key, not a directory"
            excluded[key] = make_excluded(SOURCE, "bad_data", "the prefix is a key, not a directory", task=key)
            continue
        try:
            entries[key] = parse_entry(prefix, key, current.get("value"), resolve)
        except EntryError as error:
            warnings[key] = str(error)
            excluded[key] = error.excluded()
    return entries, warnings


def build_services(entries: Iterable[Entry]) -> tuple[tuple[Service, ...], tuple[str, ...]]:
    """Group entries by service port/protocol. When several names claim one port the
    alphabetically first name wins (deterministic, whatever the order of events) and the
    others' entries are skipped with a warning."""
    services, warnings, _ = build_services_excluded(entries)
    return services, warnings


def build_services_excluded(entries: Iterable[Entry]
                            ) -> tuple[tuple[Service, ...], tuple[str, ...], tuple[Excluded, ...]]:
    """`build_services`, plus an Excluded (`port_taken`) per entry skipped for a port conflict."""
    by_port: dict[tuple[int, str], dict[str, list[Entry]]] = {}
    for entry in entries:
        by_port.setdefault(entry.service_key, {}).setdefault(entry.name, []).append(entry)
    services: list[Service] = []
    warnings: list[str] = []
    excluded: list[Excluded] = []
    for (port, protocol), names in sorted(by_port.items()):
        winner = min(names)
        for loser in sorted(names):
            if loser != winner:
                for entry in sorted(names[loser], key=lambda e: e.key):
                    warnings.append(f"registrator key {_clip(entry.key, 200)}: service port {port}/{protocol} is "
                                    f"already used by service {winner!r}; entry of {loser!r} skipped")
                    excluded.append(make_excluded(
                        SOURCE, "port_taken", f"service port {port}/{protocol} is already used by registrator "
                        f"service {winner!r} (the first name in alphabetical order wins)", app=loser, task=entry.key,
                        service=loser, key=f"{port}/{protocol}", address=entry.server.address))
        servers: dict[tuple[str, int], Server] = {}
        for entry in sorted(names[winner], key=lambda e: e.key):
            servers.setdefault((entry.server.ip, entry.server.port), entry.server)
        services.append(Service(name=winner, port=port, protocol=protocol, mode="tcp", source=SOURCE)
                        .with_servers(servers.values()))
    return tuple(services), tuple(warnings), tuple(excluded)


def discovery_all(entries: Mapping[str, Entry], entry_warnings: Mapping[str, str],
                  entry_excluded: Mapping[str, Excluded]
                  ) -> tuple[tuple[Service, ...], tuple[str, ...], tuple[Excluded, ...]]:
    """Services, every warning (bad entries by key order, then port conflicts) and every
    Excluded (bad entries, then entries of a port conflict)."""
    services, conflicts, taken = build_services_excluded(entries.values())
    return (services, tuple(entry_warnings[k] for k in sorted(entry_warnings)) + conflicts,
            tuple(entry_excluded[k] for k in sorted(entry_excluded)) + taken)
