"""Plan -> haproxy.cfg text, and the server-slot layout that makes runtime changes possible.

Pure functions: no sockets, no processes. The driver (haproxy_driver.py) decides what to do
with the text; this module only decides what it says.

Every backend has a fixed number of server *slots* (`s0`, `s1`, ...): a power of two of at least
MIN_SLOTS and twice its servers when created or grown. A slot holds one server or is empty (rendered `disabled`), so adding, removing or
re-weighting a server is a runtime API call on an existing slot, never a reload. A server keeps
its slot for as long as it stays in the plan (`assign_slots`).

Nothing from a plan reaches the config as free text: identifiers come from port/protocol, slot
numbers and the service name reduced to [a-z0-9_.-] (backend_id), addresses are re-parsed as IP
addresses, numbers are checked integers, and the one string (the HTTP health-check path) is
checked against a strict character set and quoted.
"""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import compress, count
from operator import is_not
from typing import Collection, Iterable, Mapping

import jinja2

from services.common.model import PROXY_MAX_WEIGHT, Plan, ProxySettings, Server, Service, content_hash
from services.common.validate import is_check_path

MIN_SLOTS = 16  # disabled slots are cheap; each growth costs a reload

TIMEOUT_CONNECT = 5
DEFAULT_TIMEOUT_CLIENT = 300
DEFAULT_TIMEOUT_SERVER = 300
TIMEOUT_TUNNEL = 3600
# Address rendered for an empty slot; the slot is `disabled`, so nothing ever connects to it.
PLACEHOLDER_ADDRESS = "127.0.0.1:1"
# File descriptors HAProxy needs besides two per connection (listeners, checks, logs...).
FD_RESERVE = 1024

# What a slot layout is: backend id -> one entry per slot, a Server or None (empty).
Slots = Mapping[str, tuple["Server | None", ...]]

_ACCOUNT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")


class RenderError(ValueError):
    """A plan value that cannot be rendered safely; the message names the service key."""


@dataclass(frozen=True)
class HaproxyPaths:
    """Every HAProxy file lives under <run_dir>/haproxy/."""

    dir: str

    @classmethod
    def for_run_dir(cls, run_dir: str) -> "HaproxyPaths":
        return cls(os.path.join(run_dir, "haproxy"))

    @property
    def config(self) -> str:
        return os.path.join(self.dir, "haproxy.cfg")

    @property
    def candidate(self) -> str:
        """Where a new config is written and validated before it replaces `config`."""
        return os.path.join(self.dir, "haproxy.cfg.new")

    @property
    def subset_candidate(self) -> str:
        """Where configs with part of the services are validated, to find a rejected one."""
        return os.path.join(self.dir, "haproxy.cfg.subset")

    @property
    def state(self) -> str:
        """The driver's slot layout for the config on disk (see haproxy_driver.py)."""
        return os.path.join(self.dir, "slots.json")

    @property
    def admin_socket(self) -> str:
        return os.path.join(self.dir, "admin.sock")

    @property
    def master_socket(self) -> str:
        return os.path.join(self.dir, "master.sock")

    @property
    def stats_socket(self) -> str:
        """HTTP statistics page (unix socket); the status stage proxies requests to it."""
        return os.path.join(self.dir, "stats.sock")

    @property
    def pidfile(self) -> str:
        return os.path.join(self.dir, "haproxy.pid")


@dataclass(frozen=True)
class RunAs:
    """The account HAProxy's workers drop to (`user` / `group` in the global section); the
    master keeps root, so it can still bind any port at a reload."""

    user: str
    group: str

    def __post_init__(self) -> None:
        for what, name in (("user", self.user), ("group", self.group)):
            if not isinstance(name, str) or not _ACCOUNT_RE.match(name):
                raise RenderError(f"HAProxy {what} {name!r} is not a valid account name")


MAX_NAME_PART = 60  # characters of the service name in a backend id
_NAME_PART_DROP = re.compile(r"[^a-z0-9_.-]+")
# A backend id as backend_id writes it: svc_<port>_<tcp|udp>_<name part>. The name part is
# optional here so configs of older versions (svc_<port>_tcp) are still recognized.
BACKEND_ID_RE = re.compile(r"svc_(\d{1,5})_(tcp|udp)(?:_[a-z0-9_.-]{1,%d})?" % MAX_NAME_PART)


def name_part(name: str) -> str:
    """A service name as it appears in a backend id: lowercase, every run of characters other
    than [a-z0-9_.-] one `_` (model names have none), at most MAX_NAME_PART characters."""
    return _NAME_PART_DROP.sub("_", str(name).lower())[:MAX_NAME_PART]


def backend_id(service: Service) -> str:
    """`svc_<port>_<tcp|udp>_<name>`, e.g. `svc_1234_tcp_shop.web`: the port and protocol make it
    unique (and are all the driver reads back, see key_of_backend), the name makes the
    statistics page readable. A service renamed on the same port gets a new id (a reload)."""
    return _backend_id(service.port, service.protocol, service.name)


@lru_cache(maxsize=65536)
def _backend_id(port: int, protocol: str, name: str) -> str:
    base = f"svc_{int(port)}_{'udp' if protocol == 'udp' else 'tcp'}"
    reduced = name_part(name)
    return f"{base}_{reduced}" if reduced else base


def key_of_backend(backend: str) -> str | None:
    """svc_1234_tcp_shop.web (or an older svc_1234_tcp) -> "1234/tcp"; None for anything else
    (HAProxy's own proxies: stats)."""
    match = BACKEND_ID_RE.fullmatch(backend)
    return f"{int(match.group(1))}/{match.group(2)}" if match else None


def slot_name(index: int) -> str:
    return f"s{int(index)}"


def slot_capacity(servers: int) -> int:
    """The smallest power of two >= max(MIN_SLOTS, 2 * servers): room to double without a reload."""
    capacity = MIN_SLOTS
    while capacity < 2 * servers:
        capacity *= 2
    return capacity


def haproxy_services(plan: Plan, set_aside: Collection[str] = ()) -> list[Service]:
    """The part of a plan HAProxy serves: TCP services, unless HAProxy is switched off, minus
    the services `set_aside` (service keys, "port/protocol") the driver leaves out."""
    if not plan.settings.haproxy:
        return []
    if set_aside:
        return sorted((s for s in plan.services if s.protocol == "tcp" and s.key not in set_aside),
                      key=lambda s: s.port)
    return sorted((s for s in plan.services if s.protocol == "tcp"), key=lambda s: s.port)


def unique_servers(service: Service) -> list[Server]:
    """A service's servers, one per ip:port (the first wins), in the model's order."""
    seen: set[tuple[str, int]] = set()
    out = []
    for server in service.servers:
        if (server.ip, server.port) not in seen:
            seen.add((server.ip, server.port))
            out.append(server)
    return out


def assign_slots(services: Iterable[Service], previous: Slots) -> dict[str, tuple[Server | None, ...]]:
    """Place every server in a slot, keeping the slot a server already had.

    New servers take slots that were already empty before slots freed by this change, so a
    removed server's slot is only reused when nothing else is free. A backend only grows when its
    servers do not fit (then to room for twice as many); growing needs a reload.
    """
    layout: dict[str, tuple[Server | None, ...]] = {}
    for service in services:
        bid = backend_id(service)
        servers = unique_servers(service)
        old = list(previous.get(bid, ()))
        capacity = len(old) if len(servers) <= len(old) else slot_capacity(len(servers))
        old += [None] * (capacity - len(old))
        where = {(s.ip, s.port): i for i, s in enumerate(old) if s is not None}
        slots: list[Server | None] = [None] * capacity
        newcomers = []
        for server in servers:
            index = where.get((server.ip, server.port))
            if index is None:
                newcomers.append(server)
            else:
                slots[index] = server
        never_used = [i for i in range(capacity) if old[i] is None]
        freed = [i for i in range(capacity) if old[i] is not None and slots[i] is None]
        for server, index in zip(newcomers, never_used + freed):
            slots[index] = server
        layout[bid] = tuple(slots)
    return layout


def global_maxconn(max_connections: int, fd_limit: int | None = None, extra_fds: int = 0) -> int:
    """Twice the per-service limit, capped so HAProxy can get the file descriptors it needs
    (two per proxied connection, plus `extra_fds`: one per listener and one per health-checked
    server slot) below the hard RLIMIT_NOFILE: asking for more makes HAProxy refuse to start."""
    wanted = max_connections * 2
    if fd_limit:
        wanted = min(wanted, max(64, (fd_limit - FD_RESERVE - extra_fds) // 2))
    return wanted


def extra_fds(services: Iterable[Service], slots: Slots) -> int:
    """File descriptors besides connections: a listener per service, a check per checked slot."""
    return sum(1 + (len(slots.get(backend_id(s), ())) if s.health_check else 0) for s in services)


def _address(server: Server, what: str) -> str:
    try:
        ip = ipaddress.ip_address(server.ip)
    except ValueError:
        raise RenderError(f"{what}: server ip {server.ip!r} is not an IP address") from None
    if getattr(ip, "scope_id", None) is not None:  # an IPv6 zone is free text: it could hold a newline
        raise RenderError(f"{what}: server ip {server.ip!r} has an IPv6 zone, which HAProxy is not given")
    port = _checked_int(server.port, 1, 65535, f"{what}: server port")
    return f"ipv6@{ip}:{port}" if ip.version == 6 else f"{ip}:{port}"


def _checked_int(value: object, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RenderError(f"{what} must be an integer between {low} and {high}, got {value!r}")
    return value


def quote_path(path: str, what: str = "health check path") -> str:
    """Quote a URL path as one HAProxy config word.

    The path is checked against the URL path character set first (no spaces, no quotes other
    than `'`, no backslash, no control characters); inside single quotes HAProxy expands
    nothing (`#`, `$` are literal), and a `'` is written as `'\\''`.
    """
    if not is_check_path(path):
        raise RenderError(f"{what} {path!r} is not a valid URL path")
    return "'" + path.replace("'", "'\\''") + "'"


def service_context(service: Service, slots: tuple[Server | None, ...], max_connections: int) -> dict:
    key = f"{service.port}/{service.protocol}"
    if service.protocol != "tcp" or service.mode not in ("tcp", "http"):
        raise RenderError(f"service {key}: HAProxy serves TCP services in tcp or http mode only")
    check = None
    if service.health_check is not None:
        hc = service.health_check
        check = {
            "http_path": quote_path(hc.path, f"service {key}: health check path") if hc.protocol == "http" else None,
            "inter": _checked_int(hc.interval_seconds, 1, 3600, f"service {key}: health check interval"),
            "timeout": _checked_int(hc.timeout_seconds, 1, 3600, f"service {key}: health check timeout"),
            "fall": _checked_int(hc.fall, 1, 100, f"service {key}: health check fall"),
        }
    servers = []
    for index, server in enumerate(slots):
        if server is None:
            servers.append({"name": slot_name(index), "address": PLACEHOLDER_ADDRESS, "weight": 1,
                            "maxconn": None, "enabled": False})
            continue
        what = f"service {key} server {index}"
        servers.append({
            "name": slot_name(index),
            "address": _address(server, what),
            "weight": _checked_int(server.proxy_weight, 0, PROXY_MAX_WEIGHT, f"{what}: weight"),
            "maxconn": None if server.maxconn is None
            else _checked_int(server.maxconn, 1, 1_000_000, f"{what}: maxconn"),
            "enabled": True,
        })
    return {
        "id": backend_id(service),
        "port": _checked_int(service.port, 1, 65535, f"service {key}: port"),
        "mode": service.mode,
        "maxconn": max_connections,
        "timeout_client": _checked_int(service.timeout_client or DEFAULT_TIMEOUT_CLIENT, 1, 86400,
                                       f"service {key}: timeout_client"),
        "timeout_server": _checked_int(service.timeout_server or DEFAULT_TIMEOUT_SERVER, 1, 86400,
                                       f"service {key}: timeout_server"),
        "check": check,
        "servers": servers,
    }


_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(os.path.join(os.path.dirname(__file__), "templates")),
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
    auto_reload=False,  # the templates ship with the code: no stat() of the file per section
)


def render(plan: Plan, paths: HaproxyPaths, slots: Slots, fd_limit: int | None = None,
           reserved_fds: int | None = None, run_as: RunAs | None = None, set_aside: Collection[str] = ()) -> str:
    """The complete haproxy.cfg for `plan` with servers placed as in `slots`, without the
    services `set_aside` (service keys), HAProxy's workers running as `run_as` when given.

    `slots` must hold an entry for every HAProxy service of the plan (see assign_slots).
    Deterministic: the same arguments always give the same text.
    """
    max_connections = _checked_int(plan.settings.max_connections, 1, 1_000_000, "max_connections")
    served = haproxy_services(plan, set_aside)
    services = []
    for service in served:
        bid = backend_id(service)
        if bid not in slots:
            raise RenderError(f"service {service.key}: no slot layout for {bid}")
        services.append(service_context(service, tuple(slots[bid]), max_connections))
    for path in (paths.admin_socket, paths.stats_socket):
        if any(c in path for c in " \t\r\n#'\"\\$"):
            raise RenderError(f"run directory path {path!r} contains characters HAProxy cannot take")
    text = _ENV.get_template("haproxy.cfg.j2").render(
        paths=paths,
        run_as=run_as,
        services=services,
        global_maxconn=global_maxconn(max_connections, fd_limit, extra_fds(served, slots)
                                      if reserved_fds is None else reserved_fds),
        timeout_connect=TIMEOUT_CONNECT,
        default_timeout_client=DEFAULT_TIMEOUT_CLIENT,
        default_timeout_server=DEFAULT_TIMEOUT_SERVER,
        timeout_tunnel=TIMEOUT_TUNNEL,
    )
    return text if text.endswith("\n") else text + "\n"


_SECTION_START = re.compile(r"\nlisten (svc_\d+_tcp(?:_[a-z0-9_.-]+)?)\n")
_SERVER_LINE = re.compile(r"^(    server s\d+) \S+ weight \d+(?: maxconn \d+)?(.*?)(?: disabled)?$", re.M)


def split_sections(text: str) -> tuple[str, dict[str, str]]:
    """A config as `render` writes it -> (its header, backend id -> that service's section,
    starting with its newline): header + sections + newline is the text again."""
    body = text[:-1] if text.endswith("\n") else text
    starts = [(match.start(), match.group(1)) for match in _SECTION_START.finditer(body)]
    sections = {}
    for index, (start, bid) in enumerate(starts):
        end = starts[index + 1][0] if index + 1 < len(starts) else len(body)
        sections[bid] = body[start:end]
    return (body[:starts[0][0]] if starts else body), sections


def section_skeleton(section: str) -> str:
    """A section without what slot contents change (addresses, weights, maxconn, disabled)."""
    return _SERVER_LINE.sub(r"\1\2", section)


def skeleton_hash(skeleton_text: str) -> str:
    """The skeleton's identity, as slots.json records it."""
    return content_hash(skeleton_text)


def skeleton_key(service: Service, capacity: int) -> tuple:
    """Everything of one service its skeleton section depends on (the config rendered with every slot empty): equal
    keys give equal skeleton text. Stricter than the text (a tcp check's unused path, a default
    timeout spelled out), never looser: the key only saves re-rendering and re-hashing."""
    return (backend_id(service), service.port, service.protocol, service.mode, service.timeout_client,
            service.timeout_server, service.health_check, capacity)


class Rendering:
    """A plan rendered by ConfigRenderer: the slot layout, the full config text (== `render`) and
    the hash of its skeleton (== the hash of `render` with every slot empty). `text` is `header`, then
    each service's section in `sections` (service key, text starting with its newline), then a
    newline: what lets the driver tell which service a line of the file belongs to, and validate
    the config with a subset of the services (haproxy_isolation.py).

    `text` is joined on first use only: a membership change goes out through the runtime API and
    compares renderings with `same_text` (section by section, unchanged sections are the same
    objects), so the whole file is assembled when it is written or validated, not per change.
    `servers` counts the filled slots; `changed` names the backends whose slots differ from the
    `previous` layout the renderer was given (None: not known, compare every backend)."""

    __slots__ = ("slots", "skeleton_hash", "header", "sections", "servers", "changed", "_text")

    def __init__(self, slots: dict[str, tuple[Server | None, ...]], text: str | None = None,
                 skeleton_hash: str = "", header: str = "", sections: tuple[tuple[str, str], ...] = (),
                 servers: int | None = None, changed: frozenset[str] | None = None):
        self.slots, self.skeleton_hash, self.header, self.sections = slots, skeleton_hash, header, sections
        self.servers = servers if servers is not None else sum(1 for e in slots.values() for s in e if s is not None)
        self.changed = changed
        self._text = text

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.header + "".join([text for _, text in self.sections]) + "\n"
        return self._text

    def same_text(self, other: "Rendering") -> bool:
        """Whether both render the same file, without assembling it when both are assembled from
        sections (equal sections are mostly the very same objects: compared by identity first)."""
        if self._text is not None and other._text is not None:
            return self._text == other._text
        return self.header == other.header and self.sections == other.sections

    def replace(self, **changes) -> "Rendering":
        values = {"slots": self.slots, "text": self._text, "skeleton_hash": self.skeleton_hash,
                  "header": self.header, "sections": self.sections, "servers": self.servers,
                  "changed": self.changed}
        values.update(changes)
        return Rendering(**values)

    def subset_text(self, keys: Collection[str]) -> str:
        """The config with only the services `keys` (the header's numbers unchanged)."""
        return self.header + "".join([text for key, text in self.sections if key in keys]) + "\n"


class _Block:
    """One service's section: the slots it was given from which previous slots, its text, and
    its skeleton section (rendered on demand)."""

    __slots__ = ("service", "before", "slots", "max_connections", "text", "key", "skeleton", "section",
                 "fds", "servers")

    def __init__(self, service: Service, before: tuple, slots: tuple, max_connections: int, text: str,
                 key: tuple, skeleton: str | None):
        self.service, self.before, self.slots = service, before, slots
        self.max_connections, self.text, self.key, self.skeleton = max_connections, text, key, skeleton
        self.section = (service.key, text)  # what Rendering.sections holds
        self.fds = 1 + (len(slots) if service.health_check else 0)  # see extra_fds
        self.servers = sum(1 for s in slots if s is not None)


class ConfigRenderer:
    """`render` and the skeleton hash, incrementally: each service's section is rendered on its
    own and kept with the service and slots it was rendered from; the file is assembled from the
    sections. A plan that changes one service's servers re-runs assign_slots and the template for
    that service only, and reuses the skeleton hash when no skeleton key changed.

    `render` stays the reference: the assembled text is byte-identical to them
    (tests/test_haproxy_render.py checks it over random plan sequences).
    """

    def __init__(self, paths: HaproxyPaths, fd_limit: int | None = None, run_as: RunAs | None = None):
        self.paths = paths
        self.fd_limit = fd_limit
        self.run_as = run_as
        self._blocks: dict[str, _Block] = {}
        self._header: tuple[int, str] | None = None  # (max_connections, text without the last newline)
        self._skeleton: tuple[tuple, str] | None = None  # (skeleton key of the whole plan, its hash)
        # The last rendering and what it came from: (plan.services, (haproxy, max_connections,
        # set-aside keys), the rendering, backend id -> index in its sections, reserved fds).
        self._last: tuple | None = None

    def update(self, plan: Plan, previous: Slots, set_aside: Collection[str] = ()) -> Rendering:
        """Render `plan` without the services `set_aside` (service keys), slots assigned from
        `previous` (see assign_slots). Raises RenderError."""
        max_connections = _checked_int(plan.settings.max_connections, 1, 1_000_000, "max_connections")
        source = (plan.settings.haproxy, max_connections, frozenset(set_aside))
        quick = self._changed_only(plan.services, previous, source)
        if quick is not None:
            return quick
        services = haproxy_services(plan, set_aside)
        cached = self._blocks
        blocks: dict[str, _Block] = {}
        keys: set[str] = set()
        for service in services:
            bid = backend_id(service)
            if service.key in keys:
                raise RenderError(f"service {service.key}: more than one service for port {service.port}")
            keys.add(service.key)
            before = previous.get(bid, ())
            block = cached.get(bid)
            if block is None or block.max_connections != max_connections \
                    or not (before is block.slots or before is block.before) \
                    or not (block.service is service or block.service == service):
                block = self._render_block(service, bid, before, max_connections, block)
            blocks[bid] = block
        self._blocks = blocks
        # extra_fds() from the blocks (no second pass over backend ids)
        reserved = sum(b.fds for b in blocks.values())
        header = self._header_text(max_connections, reserved)
        key = (max_connections, header, tuple([b.key for b in blocks.values()]))
        if self._skeleton is None or self._skeleton[0] != key:
            skeleton = header + "".join([self._skeleton_text(b) for b in blocks.values()]) + "\n"
            self._skeleton = (key, skeleton_hash(skeleton))
        slots = {bid: b.slots for bid, b in blocks.items()}
        changed = frozenset(bid for bid, entries in slots.items() if previous.get(bid) is not entries) \
            | frozenset(bid for bid in previous if bid not in slots)
        rendering = Rendering(slots, None, self._skeleton[1], header, tuple([b.section for b in blocks.values()]),
                              sum(b.servers for b in blocks.values()), changed)
        self._last = (plan.services, source, rendering, {bid: i for i, bid in enumerate(blocks)}, reserved)
        return rendering

    def _changed_only(self, services: tuple[Service, ...], previous: Slots, source: tuple) -> Rendering | None:
        """The rendering when `previous` is the layout of the last one and the plan differs from
        the last plan in a few services' contents only (the same keys in the same places, the
        unchanged services the same objects): only those sections are rendered again, the rest
        is reused as it is. None when that does not hold (then everything is compared)."""
        if self._last is None:
            return None
        old_services, old_source, last, positions, reserved = self._last
        if previous is not last.slots or source != old_source or len(services) != len(old_services):
            return None
        changed_at = list(compress(count(), map(is_not, services, old_services)))
        if not changed_at:
            self._last = (services, source, last, positions, reserved)
            return last if last.changed == frozenset() else last.replace(changed=frozenset())
        haproxy, max_connections, set_aside = source
        updates: list[tuple[str, _Block, _Block]] = []
        for index in changed_at:
            old, new = old_services[index], services[index]
            if old.key != new.key:
                return None
            if not haproxy or new.protocol != "tcp" or new.key in set_aside:
                continue  # not HAProxy's
            bid = backend_id(new)
            block = self._blocks.get(bid)
            if block is None or block.service is not old:
                return None  # renamed, or not the block rendered from the last plan
            updates.append((bid, block, self._render_block(new, bid, previous.get(bid, ()), max_connections, block)))
        slots = dict(last.slots)
        sections = list(last.sections)
        servers, skeleton_kept, changed = last.servers, True, set()
        for bid, old_block, block in updates:
            self._blocks[bid] = block
            slots[bid] = block.slots
            sections[positions[bid]] = block.section
            servers += block.servers - old_block.servers
            reserved += block.fds - old_block.fds
            skeleton_kept = skeleton_kept and block.key == old_block.key
            if block.slots is not old_block.slots:
                changed.add(bid)
        header = self._header_text(max_connections, reserved)
        if not skeleton_kept or header != last.header:
            blocks = self._blocks.values()
            key = (max_connections, header, tuple([b.key for b in blocks]))
            if self._skeleton is None or self._skeleton[0] != key:
                skeleton = header + "".join([self._skeleton_text(b) for b in blocks]) + "\n"
                self._skeleton = (key, skeleton_hash(skeleton))
        rendering = Rendering(slots, None, self._skeleton[1], header, tuple(sections), servers, frozenset(changed))
        self._last = (services, source, rendering, positions, reserved)
        return rendering

    def _header_text(self, max_connections: int, reserved_fds: int) -> str:
        if self._header is None or self._header[0] != (max_connections, reserved_fds):
            text = render(Plan((), ProxySettings(max_connections=max_connections)), self.paths, {}, self.fd_limit,
                          reserved_fds, self.run_as)
            self._header = ((max_connections, reserved_fds), text[:-1])
        return self._header[1]

    def _render_block(self, service: Service, bid: str, before: tuple, max_connections: int,
                      old: _Block | None) -> _Block:
        slots = assign_slots([service], {bid: before})[bid]
        if old is not None and old.max_connections == max_connections and old.slots == slots \
                and old.service == service:
            # Same section (e.g. `previous` re-read from slots.json): keep the text and objects.
            return _Block(service, before, old.slots, max_connections, old.text, old.key, old.skeleton)
        key = skeleton_key(service, len(slots))
        same_skeleton = old is not None and old.key == key and old.max_connections == max_connections
        skeleton = old.skeleton if same_skeleton else None
        return _Block(service, before, slots, max_connections, _render_section(service, slots, max_connections),
                      key, skeleton)

    def _skeleton_text(self, block: _Block) -> str:
        if block.skeleton is None:
            block.skeleton = _render_section(block.service, (None,) * len(block.slots), block.max_connections)
        return block.skeleton


def _render_section(service: Service, slots: tuple[Server | None, ...], max_connections: int) -> str:
    """One `listen` section exactly as `render` writes it (starting with its newline)."""
    template = _ENV.get_template("haproxy.cfg.j2")
    context = template.new_context({"svc": service_context(service, slots, max_connections)})
    return "".join(template.blocks["listen"](context))
