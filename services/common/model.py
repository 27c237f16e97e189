"""The normalized data model every stage exchanges: services, source snapshots, plans.

Everything is a frozen dataclass built through `from_dict`, which validates, so a value that
reaches a proxy renderer has already been checked once here. Serialization is deterministic
(sorted keys, no whitespace) so that a content hash tells "nothing changed" cheaply.
See docs/bus.md for the schema.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any, Iterable

from services.common.validate import integer, is_check_path, is_domain, is_hostname, is_name

SCHEMA_VERSION = 1

PROTOCOLS = ("tcp", "udp")
MODES = ("tcp", "http")
SOURCES = ("marathon", "registrator", "file")
SOURCE_STATES = ("initializing", "ok", "degraded")

DEFAULT_WEIGHT = 500  # the original's scale: 1..1000
MAX_WEIGHT = 1000
PROXY_MAX_WEIGHT = 256  # HAProxy's and Pen's weight scale



class ModelError(ValueError):
    """A value that does not fit the schema; the message names the field and the value."""


def clip(value: Any, limit: int = 80) -> str:
    """A value for an error message: repr (one line whatever it holds), at most `limit` characters."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int over 4300 digits, a structure nested too deep
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def field_list(names: Iterable[Any], limit: int = 5) -> str:
    """Field names for an error message: repr'd, clipped, at most `limit` of them."""
    names = sorted(names, key=str)
    shown = ", ".join(clip(name, 40) for name in names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def content_hash(data: Any) -> str:
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()[:16]


def _int_in(value: Any, low: int, high: int, what: str) -> int:
    # bool is an int in Python; a JSON `true` is never a valid port or weight.
    if isinstance(value, bool) or not isinstance(value, int):
        number = integer(value, 0, 10**12)  # ASCII digits only (validate.py)
        if number is None:
            raise ModelError(f"{what} must be an integer, got {clip(value)}")
        value = number
    if not low <= value <= high:
        # str() of an integer over 4300 digits raises ValueError: never print one whole
        shown = value if value.bit_length() <= 64 else f"a {value.bit_length()}-bit number"
        raise ModelError(f"{what} must be between {low} and {high}, got {shown}")
    return value


def _optional_int(value: Any, low: int, high: int, what: str) -> int | None:
    return None if value is None else _int_in(value, low, high, what)


def _choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ModelError(f"{what} must be one of {', '.join(choices)}, got {clip(value)}")
    return value.lower()


def validate_name(value: Any, what: str = "name") -> str:
    if not isinstance(value, str) or not is_name(value):
        raise ModelError(
            f"{what} {clip(value)} is not a valid service name "
            "(letters, digits, '.', '_', '-'; at most 255 characters)"
        )
    return value


def validate_ip(value: Any, what: str = "ip") -> str:
    # Only a string: ip_address() also takes integers (1 -> "0.0.0.1") and bytes. No IPv6 zone
    # ("fe80::1%eth0"): ip_address() accepts any text after the `%`, newlines and spaces too,
    # and str() gives it back, straight into a proxy config line.
    if not isinstance(value, str) or "%" in value:
        raise ModelError(f"{what} must be an IP address, got {clip(value)}")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ModelError(f"{what} must be an IP address, got {clip(value)}") from None


def _reject_unknown(data: dict, allowed: Iterable[str], what: str) -> None:
    unknown = set(data) - set(allowed)
    if unknown:
        raise ModelError(f"{what} has unknown field(s): {field_list(unknown)}")


def _require_dict(data: Any, what: str) -> dict:
    if not isinstance(data, dict):
        raise ModelError(f"{what} must be an object, got {type(data).__name__}")
    return data


def proxy_weight(weight: int) -> int:
    """1..1000 onto HAProxy's and Pen's 0..256 keeping proportions; a positive weight never
    becomes 0 (that would drain the server)."""
    if weight <= 0:
        return 0
    return max(1, min(PROXY_MAX_WEIGHT, round(weight * PROXY_MAX_WEIGHT / MAX_WEIGHT)))


@dataclass(frozen=True)
class Server:
    """One backend instance. `weight` is always the user's weight on the 1..1000 scale (labels,
    registrator, the file); `proxy_weight` is the same weight on the proxies' 0..256 scale,
    computed where a proxy is told, so the one field never changes meaning along the way."""

    ip: str
    port: int
    hostname: str = ""
    weight: int = DEFAULT_WEIGHT
    maxconn: int | None = None

    @property
    def address(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    @property
    def proxy_weight(self) -> int:
        return proxy_weight(self.weight)

    def with_maxconn(self, maxconn: int | None) -> "Server":
        return replace(self, maxconn=maxconn)

    def to_dict(self) -> dict:
        return {"ip": self.ip, "port": self.port, "hostname": self.hostname, "weight": self.weight,
                "maxconn": self.maxconn}

    @classmethod
    def from_dict(cls, data: Any, what: str = "server") -> "Server":
        data = _require_dict(data, what)
        _reject_unknown(data, ("ip", "port", "hostname", "weight", "maxconn"), what)
        hostname = data.get("hostname", "") or ""
        if not is_hostname(hostname):
            raise ModelError(f"{what}.hostname {clip(hostname)} is not a valid host name")
        return cls(
            ip=validate_ip(data.get("ip"), f"{what}.ip"),
            port=_int_in(data.get("port"), 1, 65535, f"{what}.port"),
            hostname=hostname,
            weight=_int_in(data.get("weight", DEFAULT_WEIGHT), 0, MAX_WEIGHT, f"{what}.weight"),
            maxconn=_optional_int(data.get("maxconn"), 1, 1_000_000, f"{what}.maxconn"),
        )


@dataclass(frozen=True)
class HealthCheck:
    """How the proxy itself checks a server. `protocol` http uses `path`."""

    protocol: str = "tcp"
    path: str = "/"
    interval_seconds: int = 10
    timeout_seconds: int = 5
    fall: int = 3

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, what: str = "healthCheck") -> "HealthCheck":
        data = _require_dict(data, what)
        _reject_unknown(data, ("protocol", "path", "interval_seconds", "timeout_seconds", "fall"), what)
        path = data.get("path", "/")
        # The path ends up in an `option httpchk` line: printable, no spaces, no quotes.
        if not is_check_path(path):
            raise ModelError(f"{what}.path {clip(path)} is not a valid URL path")
        return cls(
            protocol=_choice(data.get("protocol", "tcp"), ("tcp", "http"), f"{what}.protocol"),
            path=path,
            interval_seconds=_int_in(data.get("interval_seconds", 10), 1, 3600, f"{what}.interval_seconds"),
            timeout_seconds=_int_in(data.get("timeout_seconds", 5), 1, 3600, f"{what}.timeout_seconds"),
            fall=_int_in(data.get("fall", 3), 1, 100, f"{what}.fall"),
        )


@dataclass(frozen=True)
class Service:
    """A proxied service, keyed by `servicePort/protocol`."""

    name: str
    port: int
    protocol: str = "tcp"
    mode: str = "tcp"
    source: str = "file"
    servers: tuple[Server, ...] = ()
    health_check: HealthCheck | None = None
    timeout_client: int | None = None  # seconds
    timeout_server: int | None = None  # seconds
    # Backends run with host networking: their port equals the service port, so a proxy on the
    # same host network would collide with them. Dropped unless EXPOSE_HOST.
    host_network: bool = False

    @cached_property
    def key(self) -> str:
        return f"{self.port}/{self.protocol}"

    def to_dict(self) -> dict:
        """The wire form, computed once per object (services are immutable and most survive
        from one snapshot to the next): callers must not modify it."""
        return self._wire

    @cached_property
    def _wire(self) -> dict:
        # cached_property writes the instance's __dict__ directly: allowed on a frozen dataclass
        return {
            "name": self.name, "port": self.port, "protocol": self.protocol, "mode": self.mode,
            "source": self.source, "servers": [s.to_dict() for s in self.servers],
            "health_check": self.health_check.to_dict() if self.health_check else None,
            "timeout_client": self.timeout_client, "timeout_server": self.timeout_server,
            "host_network": self.host_network,
        }

    @cached_property
    def digest(self) -> str:
        """Content hash of this service, computed once per object."""
        return content_hash(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, what: str = "service") -> "Service":
        data = _require_dict(data, what)
        _reject_unknown(
            data,
            ("name", "port", "protocol", "mode", "source", "servers", "health_check",
             "timeout_client", "timeout_server", "host_network"),
            what,
        )
        name = validate_name(data.get("name"), f"{what}.name")
        what = f"service {name!r}"
        servers = data.get("servers", [])
        if not isinstance(servers, list):
            raise ModelError(f"{what}.servers must be a list")
        health = data.get("health_check")
        host_network = data.get("host_network", False)
        if not isinstance(host_network, bool):
            raise ModelError(f"{what}.host_network must be true or false")
        return cls(
            name=name,
            port=_int_in(data.get("port"), 1, 65535, f"{what}.port"),
            protocol=_choice(data.get("protocol", "tcp"), PROTOCOLS, f"{what}.protocol"),
            mode=_choice(data.get("mode", "tcp"), MODES, f"{what}.mode"),
            source=_choice(data.get("source", "file"), SOURCES, f"{what}.source"),
            servers=tuple(
                sorted(
                    (Server.from_dict(s, f"{what}.servers[{i}]") for i, s in enumerate(servers)),
                    key=server_sort_key,
                )
            ),
            health_check=HealthCheck.from_dict(health, f"{what}.health_check") if health is not None else None,
            timeout_client=_optional_int(data.get("timeout_client"), 1, 86400, f"{what}.timeout_client"),
            timeout_server=_optional_int(data.get("timeout_server"), 1, 86400, f"{what}.timeout_server"),
            host_network=host_network,
        )

    def with_servers(self, servers: Iterable[Server]) -> "Service":
        return replace(self, servers=tuple(sorted(servers, key=server_sort_key)))


def server_sort_key(server: Server) -> tuple:
    return (server.ip, server.port, server.hostname)


def _by_key(services: Iterable[Service]) -> list[Service]:
    return sorted(services, key=lambda s: (s.port, s.protocol))


def services_to_list(services: Iterable[Service]) -> list[dict]:
    return [s.to_dict() for s in _by_key(services)]


def xor_hash(digests: Iterable[str]) -> str:
    """The XOR of 16-hex-digit digests: order-free, so a keyed state's hash is kept up to date
    one key at a time (services/common/keyed.py) and equals this over the whole state."""
    value = 0
    for digest in digests:
        value ^= int(digest, 16)
    return f"{value:016x}"


def services_hash(services: Iterable[Service], *extra: Any) -> str:
    """The XOR of the per-service digests (each cached on its Service), and of `extra`'s
    content hash when given: what a keyed mirror of these services computes incrementally."""
    digests = [s.digest for s in services]
    if extra:
        digests.append(content_hash(list(extra)))
    return xor_hash(digests)


class ServiceDecoder:
    """Decodes lists of service dicts, reusing the Service decoded last time when a dict is
    equal to the one it came from: with full-state messages most services do not change, and
    comparing dicts is much cheaper than validating them again. One per subscriber."""

    def __init__(self) -> None:
        self._known: dict[Any, tuple[dict, Service]] = {}
        self.excluded = ExcludedDecoder()  # the `excluded` list of the same messages

    def decode(self, data: Any, what: str = "services") -> tuple[Service, ...]:
        if not isinstance(data, list):
            raise ModelError(f"{what} must be a list")
        known: dict[Any, tuple[dict, Service]] = {}
        decoded = []
        for index, item in enumerate(data):
            key = (item.get("port"), item.get("protocol"), item.get("source")) if isinstance(item, dict) else None
            try:
                hit = self._known.get(key)
            except TypeError:  # a list or an object where a port belongs: from_dict names it
                key, hit = None, None
            service = hit[1] if hit is not None and hit[0] == item else Service.from_dict(item, f"{what}[{index}]")
            known[key] = (item, service)
            decoded.append(service)
        self._known = known
        return tuple(decoded)


def services_from_list(data: Any, what: str = "services") -> tuple[Service, ...]:
    return ServiceDecoder().decode(data, what)


# Why a task or entry a source saw is not served (the `code` of an Excluded). Plain words are in
# `reason`; the code lets a page or a script group them.
EXCLUSION_CODES = (
    "health_failing",    # a health check result says not alive
    "health_unknown",    # the app has health checks and the task has no result yet
    "not_running",       # TASK_KILLING, staging, lost... (Marathon task state)
    "host_network",      # host networking without EXPOSE_HOST (planner)
    "port_taken",        # the service port went to another source (planner: Marathon > registrator > file)
    "reserved_port",     # the port is one proxymatic itself listens on (planner)
    "unresolvable",      # the host name does not resolve
    "invalid_label",     # a label was ignored (the rest of the app is served)
    "bad_data",          # an app, task or entry skipped for data proxymatic cannot use
    "set_aside",         # the applier could not serve the port (cannot be bound, config rejected)
)
EXCLUDER_NAMES = (*SOURCES, "planner", "applier")
MAX_EXCLUDED = 2000  # per snapshot or plan: a broken cluster must not make every message huge


@dataclass(frozen=True)
class Excluded:
    """A task or entry a source saw but does not serve (or a label it ignored), and why.

    Every field but `source`, `code` and `reason` may be empty when it is not known: an app whose
    id gives no name has no `service`, a label ignored for a whole app has no `task`."""

    source: str  # who excluded it: a source name, "planner" or "applier"
    code: str  # one of EXCLUSION_CODES
    reason: str  # plain words, one line: "health check failing (3 consecutive failures)"
    app: str = ""  # Marathon app id, registrator service name, services-file entry name
    task: str = ""  # Marathon task id, registrator entry (etcd key)
    service: str = ""  # service name
    key: str = ""  # "port/protocol" of the service it would belong to
    address: str = ""  # "ip:port" of the backend it would be

    def to_dict(self) -> dict:
        return {"source": self.source, "code": self.code, "reason": self.reason, "app": self.app,
                "task": self.task, "service": self.service, "key": self.key, "address": self.address}

    @classmethod
    def from_dict(cls, data: Any, what: str = "excluded") -> "Excluded":
        data = _require_dict(data, what)
        _reject_unknown(data, ("source", "code", "reason", "app", "task", "service", "key", "address"), what)
        values = {}
        for name in ("reason", "app", "task", "service", "key", "address"):
            value = data.get(name, "")
            # Shown on a page and in logs: one line, bounded; escaping is the page's job.
            if not isinstance(value, str) or len(value) > 1024 or "\n" in value or "\r" in value:
                raise ModelError(f"{what}.{name} must be a one-line string, got {clip(value)}")
            values[name] = value
        return cls(source=_choice(data.get("source"), EXCLUDER_NAMES, f"{what}.source"),
                   code=_choice(data.get("code"), EXCLUSION_CODES, f"{what}.code"), **values)


def excluded_to_list(excluded: Iterable[Excluded]) -> list[dict]:
    return [item.to_dict() for item in excluded]


def excluded_from_list(value: Any, what: str = "excluded") -> tuple[Excluded, ...]:
    if not isinstance(value, list):
        raise ModelError(f"{what} must be a list")
    if len(value) > MAX_EXCLUDED:
        raise ModelError(f"{what} has {len(value)} entries (at most {MAX_EXCLUDED})")
    return tuple(Excluded.from_dict(item, f"{what}[{index}]") for index, item in enumerate(value))


class ExcludedDecoder:
    """Decodes a snapshot's `excluded` list, reusing the Excluded decoded last time for an
    entry equal to the one it came from: validating an entry costs ~10 µs, so 2,000 of them
    (a broken cluster) would cost every snapshot 20-30 ms, while most do not change from one
    snapshot to the next. The list is ordered, so an entry is first compared with the one at
    the same place (shifted by what was inserted or removed before it), then looked up by
    identity fields. Validates exactly like `excluded_from_list`. One per subscriber and topic
    (ServiceDecoder carries one)."""

    def __init__(self) -> None:
        self._raw: list = []
        self._decoded: tuple[Excluded, ...] = ()

    @staticmethod
    def _identity(raw: dict) -> tuple:
        return (raw.get("task"), raw.get("key"), raw.get("code"), raw.get("app"), raw.get("address"))

    def decode(self, data: Any, what: str = "snapshot.excluded") -> tuple[Excluded, ...]:
        if not isinstance(data, list):
            raise ModelError(f"{what} must be a list")
        if len(data) > MAX_EXCLUDED:
            raise ModelError(f"{what} has {len(data)} entries (at most {MAX_EXCLUDED})")
        previous, decoded_before = self._raw, self._decoded
        index: dict[tuple, int] | None = None
        offset = 0
        decoded = []
        for position, item in enumerate(data):
            at = position + offset
            if 0 <= at < len(previous) and previous[at] == item:
                decoded.append(decoded_before[at])
                continue
            if index is None:  # built once, at the first entry that moved or changed
                index = {}
                for number, raw in enumerate(previous):
                    try:
                        index.setdefault(self._identity(raw), number)
                    except TypeError:
                        pass
            found = None
            if type(item) is dict:
                try:
                    found = index.get(self._identity(item))
                except TypeError:  # an unhashable value: from_dict says what is wrong
                    found = None
            if found is not None and previous[found] == item:
                decoded.append(decoded_before[found])
                offset = found - position
            else:
                decoded.append(Excluded.from_dict(item, f"{what}[{position}]"))
        self._raw, self._decoded = data, tuple(decoded)
        return self._decoded


def bounded_excluded(excluded: Iterable[Excluded]) -> tuple[Excluded, ...]:
    """At most MAX_EXCLUDED, in a stable order (by key, app, task, code)."""
    ordered = sorted(excluded, key=lambda e: (e.key, e.app, e.task, e.code, e.address, e.reason))
    return tuple(ordered[:MAX_EXCLUDED])


def _timestamp(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e11:
        raise ModelError(f"{what} must be a Unix time in seconds, got {clip(value)}")
    return float(value)


@dataclass(frozen=True)
class SourceSnapshot:
    """Everything one discovery source currently knows. When the source is `degraded` the
    services are its last good state: a discovery failure never empties the proxies."""

    source: str
    state: str
    services: tuple[Service, ...] = ()
    error: str = ""
    # Entries this source skipped (bad labels, unresolvable hosts...), for operators.
    warnings: tuple[str, ...] = ()
    # Tasks and entries seen but not served, each with its reason (bounded_excluded).
    excluded: tuple[Excluded, ...] = ()
    # When the collector learned of the newest change in `services` (Unix time; 0: unknown).
    # Carried through the plan to the applier: proxymatic_change_to_applied_seconds.
    changed_at: float = 0.0

    @property
    def hash(self) -> str:
        return services_hash(self.services)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "source": self.source,
            "state": self.state,
            "error": self.error,
            "warnings": list(self.warnings),
            "excluded": excluded_to_list(self.excluded),
            "changed_at": self.changed_at,
            "services": services_to_list(self.services),
            "hash": self.hash,
        }

    @classmethod
    def from_dict(cls, data: Any, decoder: ServiceDecoder | None = None) -> "SourceSnapshot":
        data = _require_dict(data, "snapshot")
        return cls(
            source=_choice(data.get("source"), SOURCES, "snapshot.source"),
            state=_choice(data.get("state"), SOURCE_STATES, "snapshot.state"),
            services=(decoder or ServiceDecoder()).decode(data.get("services", [])),
            error=str(data.get("error", "")),
            warnings=_str_list(data.get("warnings", []), "snapshot.warnings"),
            excluded=(decoder.excluded.decode(data.get("excluded", []), "snapshot.excluded") if decoder
                      else excluded_from_list(data.get("excluded", []), "snapshot.excluded")),
            changed_at=_timestamp(data.get("changed_at", 0.0), "snapshot.changed_at"),
        )


_SETTINGS_INTS = {"max_connections": (1, 1_000_000), "pen_servers": (1, 10000), "pen_clients": (1, 1_000_000),
                  "vhost_port": (1, 65535)}


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ModelError(f"{what} must be a list of strings")
    return tuple(value)


@dataclass(frozen=True)
class ProxySettings:
    """The options that shape rendered proxy configs (not discovery)."""

    max_connections: int = 8192
    pen_servers: int = 64
    pen_clients: int = 8192
    haproxy: bool = True
    vhost_domain: str = ""
    vhost_port: int = 80
    proxy_protocol: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "ProxySettings":
        """Validated like the options they come from (services/common/config.py): a plan read
        from the bus reaches the renderers, so no setting is taken unchecked. Unknown keys are
        ignored (a newer planner may send more)."""
        data = _require_dict(data, "settings")
        values: dict[str, Any] = {}
        for key, (low, high) in _SETTINGS_INTS.items():
            if key in data:
                values[key] = _int_in(data[key], low, high, f"settings.{key}")
        for key in ("haproxy", "proxy_protocol"):
            if key in data:
                if not isinstance(data[key], bool):
                    raise ModelError(f"settings.{key} must be true or false, got {clip(data[key])}")
                values[key] = data[key]
        if "vhost_domain" in data:
            domain = data["vhost_domain"]
            if not isinstance(domain, str) or (domain and not is_domain(domain)):
                raise ModelError(f"settings.vhost_domain {clip(domain)} is not a valid domain name")
            values["vhost_domain"] = domain
        return cls(**values)


@dataclass(frozen=True)
class Plan:
    """The desired proxy state: what every applier converges to."""

    services: tuple[Service, ...]
    settings: ProxySettings = field(default_factory=ProxySettings)
    # Source name -> hash of the snapshot the plan was built from, for tracing.
    inputs: tuple[tuple[str, str], ...] = ()
    # Which sources had delivered when the plan was made (the status stage needs it).
    sources_ready: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    # The sources' excluded entries plus the planner's own (host network, port taken...).
    excluded: tuple[Excluded, ...] = ()
    # The newest `changed_at` of the snapshots this plan was built from (0: unknown).
    changed_at: float = 0.0

    @cached_property
    def hash(self) -> str:
        """Cached like Service.digest: an XOR over every service is ~7 ms at 10,000 services,
        and a stage reads a plan's hash a dozen times per change."""
        return services_hash(self.services, self.settings.to_dict())

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "services": services_to_list(self.services),
            "settings": self.settings.to_dict(),
            "inputs": dict(self.inputs),
            "sources_ready": list(self.sources_ready),
            "notes": list(self.notes),
            "excluded": excluded_to_list(self.excluded),
            "changed_at": self.changed_at,
            "hash": self.hash,
        }

    @classmethod
    def from_dict(cls, data: Any, decoder: ServiceDecoder | None = None) -> "Plan":
        data = _require_dict(data, "plan")
        return cls(
            services=(decoder or ServiceDecoder()).decode(data.get("services", [])),
            settings=ProxySettings.from_dict(data.get("settings", {})),
            inputs=_inputs(data.get("inputs", {})),
            sources_ready=_str_list(data.get("sources_ready", []), "plan.sources_ready"),
            notes=_str_list(data.get("notes", []), "plan.notes"),
            excluded=(decoder.excluded.decode(data.get("excluded", []), "plan.excluded") if decoder
                      else excluded_from_list(data.get("excluded", []), "plan.excluded")),
            changed_at=_timestamp(data.get("changed_at", 0.0), "plan.changed_at"),
        )


def _inputs(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ModelError("plan.inputs must map source names to hashes")
    return tuple(sorted(value.items()))


@dataclass(frozen=True)
class ApplyResult:
    """What an applier did with a plan."""

    plan_hash: str
    ok: bool
    action: str  # "none" | "runtime" | "reload" | "start" | "rejected"
    errors: tuple[str, ...] = ()
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"plan_hash": self.plan_hash, "ok": self.ok, "action": self.action,
                "errors": list(self.errors), "details": self.details}

    @classmethod
    def from_dict(cls, data: Any) -> "ApplyResult":
        data = _require_dict(data, "applied")
        return cls(plan_hash=str(data.get("plan_hash", "")), ok=bool(data.get("ok")),
                   action=str(data.get("action", "")), errors=tuple(data.get("errors", [])),
                   details=dict(data.get("details", {})))
