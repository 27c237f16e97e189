"""The normalized data model every stage exchanges: services, source snapshots, plans.

Every message of the bus schema is one `msgspec.Struct` declaration (frozen, typed): its field
types and constraints (`Annotated[int, Meta(ge=1, le=65535)]`, `Literal[...]`, patterns from
services/common/validate.py) are what `from_dict` checks, in one `msgspec.convert` call, so a
value that reaches a proxy renderer has already been checked once here. A constructor checks
nothing (as a dataclass would): a source builds its values from checked parts, and the
renderers check again what they write (tests/test_properties.py). What a type cannot say (an
IP address in its normal form, servers in order) is checked after the conversion, and an error
names the field's path and the value: `service 'web'.servers[0].port must be between 1 and
65535, got 70000`. Serialization is deterministic (sorted keys, no whitespace) so that a content
hash tells "nothing changed" cheaply. See docs/bus.md for the schema, docs/schema.md for how
it is declared and checked.
"""
from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from typing import Annotated, Any, Iterable, Literal

import msgspec
import msgspec.inspect as mi
from msgspec import Meta, Struct

from services.common.validate import (CHECK_PATH_PATTERN, DOMAIN_PATTERN, HOSTNAME_PATTERN, NAME_PATTERN,
                                      ONE_LINE_PATTERN, anchored, integer, ip_text, is_name)

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


# -- the field types: each constraint declared once ---------------------------------------------
# `extra={"error": ...}` is the message for a value that does not fit (instead of msgspec's, which
# would show the regular expression).

def _int(low: int, high: int) -> Any:
    return Annotated[int, Meta(ge=low, le=high)]


Port = _int(1, 65535)
Weight = _int(0, MAX_WEIGHT)
MaxConn = _int(1, 1_000_000)
CheckSeconds = _int(1, 3600)
TimeoutSeconds = _int(1, 86400)
Name = Annotated[str, Meta(pattern=anchored(NAME_PATTERN), extra={
    "error": "is not a valid service name (letters, digits, '.', '_', '-'; at most 255 characters)"})]
Hostname = Annotated[str, Meta(pattern=anchored(HOSTNAME_PATTERN), extra={"error": "is not a valid host name",
                                                                          "null_is_empty": True})]
IPText = Annotated[str, Meta(extra={"error": "must be an IP address"})]  # and ip_text() after decoding
CheckPath = Annotated[str, Meta(pattern=anchored(CHECK_PATH_PATTERN), extra={"error": "is not a valid URL path"})]
Domain = Annotated[str, Meta(pattern=r"\A(?:\Z|" + DOMAIN_PATTERN + ")", extra={"error": "is not a valid domain name"})]
OneLine = Annotated[str, Meta(max_length=1024, pattern=anchored(ONE_LINE_PATTERN),
                              extra={"error": "must be a one-line string"})]
Timestamp = Annotated[float, Meta(ge=0, lt=1e11, extra={"error": "must be a Unix time in seconds"})]
Protocol = Literal[PROTOCOLS]
Mode = Literal[MODES]
SourceName = Literal[SOURCES]
SourceState = Literal[SOURCE_STATES]


# -- decoding: msgspec.convert, then clear errors ------------------------------------------------

_TYPE_INFO: dict[Any, Any] = {}
_LOCATION = re.compile(r" - at `\$(.*)`\Z", re.S)
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\[\.\.\.\]")
_UNKNOWN = "Object contains unknown field"
_MISSING = re.compile(r"Object missing required field `(.*)`", re.S)


def _info(type_: Any) -> Any:
    info = _TYPE_INFO.get(type_)
    if info is None:
        info = _TYPE_INFO[type_] = mi.type_info(type_)
    return info


def _unwrap(info: Any) -> tuple[Any, dict]:
    """(the type, its `extra`) without Annotated metadata and without `| None`."""
    extra: dict = {}
    while True:
        if isinstance(info, mi.Metadata):
            extra = {**(info.extra or {}), **extra}
            info = info.type
        elif isinstance(info, mi.UnionType):
            members = [m for m in info.types if not isinstance(m, mi.NoneType)]
            if len(members) != 1:
                return info, extra
            info = members[0]
        else:
            return info, extra


def _walk(info: Any, data: Any, path: str) -> tuple[Any, dict, Any, bool]:
    """Follow msgspec's error path (`.servers[0].port`) through the type and the data: (type,
    extra, value, whether the value was found)."""
    value, found = data, True
    extra: dict = {}
    for match in _PATH_PART.finditer(path):
        info, extra = _unwrap(info)
        name, index = match.group(1), match.group(2)
        if name is not None and isinstance(info, mi.StructType):
            field = next((f for f in info.fields if f.encode_name == name), None)
            info = field.type if field is not None else mi.AnyType()
            if found and isinstance(value, dict) and name in value:
                value = value[name]
            else:
                found = False
        elif index is not None and isinstance(info, (mi.ListType, mi.VarTupleType, mi.SetType, mi.FrozenSetType)):
            info = info.item_type
            if found and isinstance(value, list) and int(index) < len(value):
                value = value[int(index)]
            else:
                found = False
        elif isinstance(info, mi.DictType):  # msgspec does not say which key: `[...]`
            info, found = info.value_type, False
        else:
            return mi.AnyType(), {}, None, False
    info, extra = _unwrap(info)
    return info, extra, value, found


def _shown(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a {value.bit_length()}-bit number"  # str() of an int over 4300 digits raises
    return clip(value)


def _explain(error: msgspec.ValidationError, type_: Any, data: Any, what: str) -> str:
    """msgspec's error as one bounded line naming the field path and, when known, the value."""
    text = str(error)
    location = _LOCATION.search(text)
    path = location.group(1) if location else ""
    message = text[: location.start()] if location else text
    info, extra, value, found = _walk(_info(type_), data, path)
    where = what + path
    got = f", got {_shown(value)}" if found else ""
    if message.startswith(_UNKNOWN) and isinstance(info, mi.StructType) and isinstance(value, dict):
        unknown = set(value) - {f.encode_name for f in info.fields}
        return f"{where} has unknown field(s): {field_list(unknown)}"
    missing = _MISSING.match(message)
    if missing:
        return f"{where}.{missing.group(1)} is missing"
    if "error" in extra:
        return f"{where} {extra['error']}{got}"
    if isinstance(info, mi.IntType):
        if isinstance(value, int) and not isinstance(value, bool) and found:
            return f"{where} must be between {info.ge} and {info.le}, got {_shown(value)}"
        return f"{where} must be an integer{got}"
    if isinstance(info, mi.LiteralType):
        return f"{where} must be one of {', '.join(map(str, info.values))}{got}"
    if isinstance(info, mi.BoolType):
        return f"{where} must be true or false{got}"
    if isinstance(info, mi.StructType):
        return f"{where} must be an object, got {type(value).__name__}" if found else f"{where}: {message}"
    if isinstance(info, (mi.ListType, mi.VarTupleType)):
        if found and isinstance(value, list) and info.max_length is not None and len(value) > info.max_length:
            return f"{where} has {len(value)} entries (at most {info.max_length})"
        return f"{where} must be a list{got}"
    if isinstance(info, mi.DictType):
        return f"{where} must be an object{got}"
    if isinstance(info, mi.StrType):
        return f"{where} must be a string{got}"
    return f"{where}: {message}{got}"


def _one_line(text: str, limit: int = 400) -> str:
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _lenient(info: Any, data: Any) -> tuple[Any, bool]:
    """`data` with what people write by hand in a services file made typed, as from_dict always
    took it: integers as ASCII digits ("8080", " 8080 "), upper-case choices ("TCP"), a null
    host name. (a copy, whether anything changed). Only tried after a strict decode failed."""
    info, extra = _unwrap(info)
    if isinstance(info, mi.StructType) and isinstance(data, dict):
        copy, changed = dict(data), False
        for field in info.fields:
            if field.encode_name in data:
                copy[field.encode_name], one = _lenient(field.type, data[field.encode_name])
                changed = changed or one
        return copy, changed
    if isinstance(info, (mi.ListType, mi.VarTupleType)) and isinstance(data, list):
        items = [_lenient(info.item_type, item) for item in data]
        return [item for item, _ in items], any(one for _, one in items)
    if isinstance(info, mi.IntType) and isinstance(data, str):
        number = integer(data, 0, 10**12)
        return (number, True) if number is not None else (data, False)
    if isinstance(info, mi.LiteralType) and isinstance(data, str) and data.lower() != data:
        return data.lower(), True
    if data is None and extra.get("null_is_empty"):
        return "", True
    return data, False


def _convert(data: Any, type_: Any, what: str) -> Any:
    """`data` (JSON-like, as off the bus) as `type_`, validated, or ModelError naming the field."""
    try:
        return msgspec.convert(data, type_)
    except msgspec.ValidationError as error:
        failed = error
    data, changed = _lenient(_info(type_), data)
    if changed:
        try:
            return msgspec.convert(data, type_)
        except msgspec.ValidationError as error:
            failed = error
    raise ModelError(_one_line(_explain(failed, type_, data, what))) from None


def validate_name(value: Any, what: str = "name") -> str:
    if not is_name(value):
        raise ModelError(
            f"{what} {clip(value)} is not a valid service name "
            "(letters, digits, '.', '_', '-'; at most 255 characters)"
        )
    return value


def validate_ip(value: Any, what: str = "ip") -> str:
    """`value` as an IP address in its normal form (services/common/validate.py: ip_text)."""
    normal = ip_text(value)
    if normal is None:
        raise ModelError(f"{what} must be an IP address, got {clip(value)}")
    return normal


def _choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ModelError(f"{what} must be one of {', '.join(choices)}, got {clip(value)}")
    return value.lower()


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


def _checked_server(server: "Server", what: str) -> "Server":
    """What the type cannot say: the IP address, in its normal form."""
    ip = ip_text(server.ip)
    if ip is None:
        raise ModelError(_one_line(f"{what}.ip must be an IP address, got {clip(server.ip)}"))
    return server if ip == server.ip else msgspec.structs.replace(server, ip=ip)


class Server(Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """One backend instance. `weight` is always the user's weight on the 1..1000 scale (labels,
    registrator, the file); `proxy_weight` is the same weight on the proxies' 0..256 scale,
    computed where a proxy is told, so the one field never changes meaning along the way."""

    ip: IPText
    port: Port
    hostname: Hostname = ""
    weight: Weight = DEFAULT_WEIGHT
    maxconn: MaxConn | None = None

    @property
    def address(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    @property
    def proxy_weight(self) -> int:
        return proxy_weight(self.weight)

    def with_maxconn(self, maxconn: int | None) -> "Server":
        return msgspec.structs.replace(self, maxconn=maxconn)

    def to_dict(self) -> dict:
        return {"ip": self.ip, "port": self.port, "hostname": self.hostname, "weight": self.weight,
                "maxconn": self.maxconn}

    @classmethod
    def from_dict(cls, data: Any, what: str = "server") -> "Server":
        return _checked_server(_convert(data, cls, what), what)


class HealthCheck(Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """How the proxy itself checks a server. `protocol` http uses `path`."""

    protocol: Literal["tcp", "http"] = "tcp"
    path: CheckPath = "/"  # it ends up in an `option httpchk` line: printable, no spaces, no quotes
    interval_seconds: CheckSeconds = 10
    timeout_seconds: CheckSeconds = 5
    fall: _int(1, 100) = 3

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "path": self.path, "interval_seconds": self.interval_seconds,
                "timeout_seconds": self.timeout_seconds, "fall": self.fall}

    @classmethod
    def from_dict(cls, data: Any, what: str = "healthCheck") -> "HealthCheck":
        return _convert(data, cls, what)


class Service(Struct, frozen=True, forbid_unknown_fields=True, dict=True):
    """A proxied service, keyed by `servicePort/protocol`. `dict=True`: room for the cached
    properties (key, wire form, digest)."""

    name: Name
    port: Port
    protocol: Protocol = "tcp"
    mode: Mode = "tcp"
    source: SourceName = "file"
    servers: tuple[Server, ...] = ()
    health_check: HealthCheck | None = None
    timeout_client: TimeoutSeconds | None = None  # seconds
    timeout_server: TimeoutSeconds | None = None  # seconds
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
        name = data.get("name") if isinstance(data, dict) else None
        if is_name(name):
            what = f"service {name!r}"
        return _checked_service(_convert(data, cls, what), what)

    def with_servers(self, servers: Iterable[Server]) -> "Service":
        return msgspec.structs.replace(self, servers=tuple(sorted(servers, key=server_sort_key)))


def _checked_service(service: Service, what: str) -> Service:
    """What the types cannot say about a decoded service: its servers' IP addresses (in their
    normal form) and their order (equal content, equal bytes, equal digest)."""
    servers = service.servers
    if not servers:
        return service
    checked = list(servers)
    for index, server in enumerate(servers):
        ip = ip_text(server.ip)
        if ip != server.ip:
            checked[index] = _checked_server(server, f"{what}.servers[{index}]")
    checked.sort(key=server_sort_key)
    if all(a is b for a, b in zip(checked, servers)):
        return service
    return msgspec.structs.replace(service, servers=tuple(checked))


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
    equal to the one it came from (the same object: the planner's memo tells unchanged services
    by identity), and comparing dicts is cheaper than validating them again. One per subscriber."""

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
ExcluderName = Literal[EXCLUDER_NAMES]
ExclusionCode = Literal[EXCLUSION_CODES]


class Excluded(Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """A task or entry a source saw but does not serve (or a label it ignored), and why.

    Every field but `source`, `code` and `reason` may be empty when it is not known: an app whose
    id gives no name has no `service`, a label ignored for a whole app has no `task`. Every string
    is one line (shown on a page and in logs; escaping is the page's job)."""

    source: ExcluderName  # who excluded it: a source name, "planner" or "applier"
    code: ExclusionCode  # one of EXCLUSION_CODES
    reason: OneLine  # plain words, one line: "health check failing (3 consecutive failures)"
    app: OneLine = ""  # Marathon app id, registrator service name, services-file entry name
    task: OneLine = ""  # Marathon task id, registrator entry (etcd key)
    service: OneLine = ""  # service name
    key: OneLine = ""  # "port/protocol" of the service it would belong to
    address: OneLine = ""  # "ip:port" of the backend it would be

    def to_dict(self) -> dict:
        return {"source": self.source, "code": self.code, "reason": self.reason, "app": self.app,
                "task": self.task, "service": self.service, "key": self.key, "address": self.address}

    @classmethod
    def from_dict(cls, data: Any, what: str = "excluded") -> "Excluded":
        return _convert(data, cls, what)


ExcludedList = Annotated[tuple[Excluded, ...], Meta(max_length=MAX_EXCLUDED)]


def excluded_to_list(excluded: Iterable[Excluded]) -> list[dict]:
    return [item.to_dict() for item in excluded]


def excluded_from_list(value: Any, what: str = "excluded") -> tuple[Excluded, ...]:
    return _convert(value, ExcludedList, what)


class ExcludedDecoder:
    """Decodes a snapshot's `excluded` list, reusing the Excluded decoded last time for an
    entry equal to the one it came from: validating an entry costs ~10 µs, so 2,000 of them
    (a broken cluster) would cost every snapshot 20-30 ms, while most do not change from one
    snapshot to the next. The list is ordered, so an entry is first compared with the one at
    the same place (shifted by what was inserted or removed before it), then looked up by
    identity fields. Validates like `excluded_from_list`. One per subscriber and topic
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
    return _convert(value, Timestamp, what)


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    return _convert(value, tuple[str, ...], what)


def _inputs(value: Any, what: str = "plan.inputs") -> tuple[tuple[str, str], ...]:
    """A plan's `inputs` (source name -> hash), as the plan keeps them: sorted pairs."""
    return tuple(sorted(_convert(value, dict[str, str], what).items()))


class SourceSnapshot(Struct, frozen=True):
    """Everything one discovery source currently knows. When the source is `degraded` the
    services are its last good state: a discovery failure never empties the proxies."""

    source: SourceName
    state: SourceState
    services: tuple[Service, ...] = ()
    error: str = ""
    # Entries this source skipped (bad labels, unresolvable hosts...), for operators.
    warnings: tuple[str, ...] = ()
    # Tasks and entries seen but not served, each with its reason (bounded_excluded).
    excluded: ExcludedList = ()
    # When the collector learned of the newest change in `services` (Unix time; 0: unknown).
    # Carried through the plan to the applier: proxymatic_change_to_applied_seconds.
    changed_at: Timestamp = 0.0

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
        wire = _convert(data, _SnapshotWire, "snapshot")
        return cls(
            source=wire.source, state=wire.state,
            services=(decoder or ServiceDecoder()).decode(wire.services),
            error=wire.error, warnings=wire.warnings,
            excluded=(decoder.excluded.decode(wire.excluded, "snapshot.excluded") if decoder
                      else excluded_from_list(wire.excluded, "snapshot.excluded")),
            changed_at=wire.changed_at,
        )


class _SnapshotWire(Struct, frozen=True):
    """SourceSnapshot.to_dict() read back: services and excluded entries are decoded apart (by a
    ServiceDecoder, which reuses the unchanged ones); `schema` and `hash` are ignored."""

    source: SourceName
    state: SourceState
    services: list = []
    error: str = ""
    warnings: tuple[str, ...] = ()
    excluded: list = []
    changed_at: Timestamp = 0.0


class ProxySettings(Struct, frozen=True, gc=False):
    """The options that shape rendered proxy configs (not discovery). Validated like the options
    they come from (services/common/config.py): a plan read from the bus reaches the renderers,
    so no setting is taken unchecked. Unknown keys are ignored (a newer planner may send more)."""

    max_connections: MaxConn = 8192
    pen_servers: _int(1, 10000) = 64
    pen_clients: MaxConn = 8192
    haproxy: bool = True
    vhost_domain: Domain = ""
    vhost_port: Port = 80
    proxy_protocol: bool = False

    def to_dict(self) -> dict:
        return {"max_connections": self.max_connections, "pen_servers": self.pen_servers,
                "pen_clients": self.pen_clients, "haproxy": self.haproxy, "vhost_domain": self.vhost_domain,
                "vhost_port": self.vhost_port, "proxy_protocol": self.proxy_protocol}

    @classmethod
    def from_dict(cls, data: Any) -> "ProxySettings":
        return _convert(data, cls, "settings")


class Plan(Struct, frozen=True, dict=True):
    """The desired proxy state: what every applier converges to. `dict=True`: room for the
    cached hash."""

    services: tuple[Service, ...]
    settings: ProxySettings = msgspec.field(default_factory=ProxySettings)
    # Source name -> hash of the snapshot the plan was built from, for tracing.
    inputs: tuple[tuple[str, str], ...] = ()
    # Which sources had delivered when the plan was made (the status stage needs it).
    sources_ready: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    # The sources' excluded entries plus the planner's own (host network, port taken...).
    excluded: ExcludedList = ()
    # The newest `changed_at` of the snapshots this plan was built from (0: unknown).
    changed_at: Timestamp = 0.0

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
        wire = _convert(data, _PlanWire, "plan")
        return cls(
            services=(decoder or ServiceDecoder()).decode(wire.services),
            settings=wire.settings, inputs=tuple(sorted(wire.inputs.items())),
            sources_ready=wire.sources_ready, notes=wire.notes,
            excluded=(decoder.excluded.decode(wire.excluded, "plan.excluded") if decoder
                      else excluded_from_list(wire.excluded, "plan.excluded")),
            changed_at=wire.changed_at,
        )


class _PlanWire(Struct, frozen=True):
    """Plan.to_dict() read back (services and excluded entries decoded apart, as for a snapshot)."""

    services: list = []
    settings: ProxySettings = msgspec.field(default_factory=ProxySettings)
    inputs: dict[str, str] = {}
    sources_ready: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    excluded: list = []
    changed_at: Timestamp = 0.0


class ApplyResult(Struct, frozen=True):
    """What an applier did with a plan."""

    plan_hash: str
    ok: bool
    action: str  # "none" | "runtime" | "reload" | "start" | "rejected" | "held"
    errors: tuple[str, ...] = ()
    details: dict = {}

    def to_dict(self) -> dict:
        return {"plan_hash": self.plan_hash, "ok": self.ok, "action": self.action,
                "errors": list(self.errors), "details": self.details}

    @classmethod
    def from_dict(cls, data: Any) -> "ApplyResult":
        """Read leniently: a result is shown and counted, never applied."""
        data = _require_dict(data, "applied")
        return cls(plan_hash=str(data.get("plan_hash", "")), ok=bool(data.get("ok")),
                   action=str(data.get("action", "")), errors=tuple(data.get("errors", [])),
                   details=dict(data.get("details", {})))
