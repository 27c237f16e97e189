"""The live state of HAProxy's servers, read from its admin socket (`show stat`), for the
services page and `proxymatic explain`.

Backends are named from the service key (`svc_<port>_<proto>`, possibly followed by `_<name>`)
and servers by generic slot names (`s0`, `s1`...), so a row is matched to a plan server by its
address. Empty slots are `disabled` (MAINT) with a placeholder address, and a removed server
stays in its slot in MAINT until the slot is reused: when one address shows in several slots,
the one not in maintenance wins.

A read never raises: a missing, slow or odd socket gives a `HaproxyLive` with `ok=False` and the
error, and the page shows the servers' state as unknown. `HaproxyStateCache` keeps a read for
about a second and lets one caller read at a time, so a storm of page refreshes costs HAProxy
one `show stat` a second at most.
"""
from __future__ import annotations

import csv
import io
import threading
import time
from dataclasses import dataclass, field

from services.applier.haproxy_render import key_of_backend
from services.common.unix_socket import exchange

READ_TIMEOUT = 1.0
CACHE_SECONDS = 1.0
MAX_ANSWER = 64 * 1024 * 1024  # a CSV larger than this is not HAProxy's answer to us

# Ranking of rows sharing an address: in service first, maintenance last.
_RANK = {"UP": 0, "NOLB": 1, "DRAIN": 2, "DOWN": 3, "MAINT": 4}


@dataclass(frozen=True)
class LiveServer:
    """One server slot as HAProxy shows it."""

    backend: str
    slot: str
    address: str  # "ip:port" or "[ipv6]:port"
    state: str  # UP, DOWN, DRAIN, MAINT, NOLB (or the first word HAProxy wrote)
    status: str  # HAProxy's words: "UP", "UP 1/3" (going down), "DOWN 1/2" (going up), "no check"...
    check: str  # check_status: L4OK, L4CON, L7STS... ("" without a check)
    check_desc: str  # "Layer4 connection problem"
    last_check: str  # "Connection refused"
    weight: int | None  # the effective weight HAProxy uses now
    sessions: int | None  # current connections

    def to_dict(self) -> dict:
        return {"slot": self.slot, "state": self.state, "status": self.status, "check": self.check,
                "check_desc": self.check_desc, "last_check": self.last_check, "live_weight": self.weight,
                "sessions": self.sessions}


@dataclass(frozen=True)
class HaproxyLive:
    """One read: service key -> address -> the row that serves it."""

    ok: bool
    error: str = ""
    read_at: float = 0.0  # Unix time
    servers: dict[str, dict[str, LiveServer]] = field(default_factory=dict)

    def server(self, key: str, address: str) -> LiveServer | None:
        return self.servers.get(key, {}).get(address)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "error": self.error, "read_at": self.read_at}


def backend_key(name: str) -> str | None:
    """`svc_1234_tcp` or `svc_1234_tcp_shop.web` -> "1234/tcp"; anything else -> None."""
    key = key_of_backend(name)
    return key if key is not None and 1 <= int(key.partition("/")[0]) <= 65535 else None


def state_of(status: str) -> str:
    """HAProxy's status words -> one state word. "no check" means serving, unchecked."""
    status = status.strip()
    if status.lower() == "no check":
        return "UP"
    word = status.split(" ", 1)[0].upper()
    return word or "UNKNOWN"


def _int_or_none(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if text.isdigit() else None


def normalize_address(address: str) -> str:
    """HAProxy writes IPv6 as `[::1]:80`, like Server.address; IPv4 as `1.2.3.4:80`."""
    return address.strip()


def parse_show_stat(text: str, read_at: float = 0.0) -> HaproxyLive:
    """`show stat` CSV (any type filter) -> HaproxyLive. Raises ValueError on an answer that is
    not a stat CSV."""
    lines = text.strip("\n").splitlines()
    if not lines or not lines[0].startswith("# pxname,"):
        raise ValueError(f"unexpected `show stat` answer: {text[:120]!r}")
    reader = csv.DictReader(io.StringIO("\n".join([lines[0][2:], *lines[1:]])))
    servers: dict[str, dict[str, LiveServer]] = {}
    for row in reader:
        backend, slot = row.get("pxname") or "", row.get("svname") or ""
        if slot in ("FRONTEND", "BACKEND") or not slot:
            continue
        key = backend_key(backend)
        address = normalize_address(row.get("addr") or "")
        if key is None or not address:
            continue
        status = (row.get("status") or "").strip()
        live = LiveServer(
            backend=backend, slot=slot, address=address, state=state_of(status), status=status,
            check=(row.get("check_status") or "").strip().lstrip("* ").strip(),
            check_desc=(row.get("check_desc") or "").strip(), last_check=(row.get("last_chk") or "").strip(),
            weight=_int_or_none(row.get("weight")), sessions=_int_or_none(row.get("scur")))
        by_address = servers.setdefault(key, {})
        known = by_address.get(address)
        if known is None or _RANK.get(live.state, 5) < _RANK.get(known.state, 5):
            by_address[address] = live
    return HaproxyLive(True, "", read_at, servers)


def read_haproxy(admin_socket: str, timeout: float = READ_TIMEOUT) -> HaproxyLive:
    """One `show stat` (servers only) on the admin socket. Never raises."""
    now = time.time()
    try:
        answer = exchange(admin_socket, b"show stat -1 4 -1\n", timeout=timeout)
        if len(answer) > MAX_ANSWER:
            raise ValueError(f"answer of {len(answer)} bytes")
        return parse_show_stat(answer.decode("utf-8", errors="replace"), now)
    except (OSError, ValueError) as error:
        why = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return HaproxyLive(False, f"{admin_socket}: {why}"[:300], now)


class HaproxyStateCache:
    """The newest read, kept `max_age` seconds. One caller reads at a time; the others wait for
    that read (at most the read timeout) and share it."""

    def __init__(self, admin_socket: str, max_age: float = CACHE_SECONDS, timeout: float = READ_TIMEOUT,
                 reader=read_haproxy):
        self.admin_socket = admin_socket
        self.max_age = max_age
        self.timeout = timeout
        self._reader = reader
        self._lock = threading.Lock()
        self._last: HaproxyLive | None = None
        self._last_at = 0.0  # monotonic
        self.reads = 0

    def get(self) -> HaproxyLive:
        with self._lock:
            if self._last is None or time.monotonic() - self._last_at >= self.max_age:
                self._last = self._reader(self.admin_socket, self.timeout)
                self._last_at = time.monotonic()
                self.reads += 1
            return self._last
