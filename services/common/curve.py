"""Bus security: CURVE on tcp:// bus endpoints, with pyzmq's own authenticator (docs/security.md).

A publisher's tcp:// sockets (PUB and its ROUTER snapshot socket) are CURVE servers with this
process's certificate (BUS_SECRET_KEY); `zmq.auth`'s ThreadAuthenticator, one per context,
accepts the subscribers whose public certificate is in BUS_AUTHORIZED_KEYS (and the publisher's
own, so the central's planner can follow its own collector). A subscriber's tcp:// sockets (SUB
and its DEALER) are CURVE clients with this process's certificate and the publishers' public
one (BUS_SERVER_KEY). ipc:// endpoints are left alone: file permissions protect them.

A refusal is logged once per peer and reason (WARNING), on both sides: by the authenticator for
a key not authorized (address and key), and from socket monitor events for a handshake that
failed before it (a peer without keys, a wrong BUS_SERVER_KEY), where ZeroMQ does not say which
peer, so those are logged once per endpoint and reason.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import queue
import stat
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

if TYPE_CHECKING:
    from services.common.config import Settings

log = logging.getLogger("proxymatic.bus")

# The authorized keys directory is read again on a handshake at most this often, so a node's
# certificate dropped in (or removed) takes effect on its next connection, without a restart.
RELOAD_INTERVAL = 1.0
# Refusals remembered for logging once: beyond that (a scan), further ones go to DEBUG.
REFUSALS_REMEMBERED = 1024
_MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                   | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_MONITOR_STOPPED)
# Which stages each command runs (ROLE for `run`), for the startup check.
ROLE_STAGES = {"all": ("collector", "planner", "applier", "status"),
               "central": ("collector", "planner", "status"),
               "node": ("applier", "status")}
SUBSCRIBES = {"collector": (), "planner": ("collector",), "applier": ("planner",),
              "status": ("collector", "planner", "applier")}
PUBLISHES = {"collector": ("collector",), "planner": ("planner",), "applier": ("applier",), "status": ()}


class SecurityError(ValueError):
    """A key option that cannot be used (ConfigError's message form: it names the option)."""


def load_certificate(path: str, option: str, secret: bool = False) -> tuple[bytes, bytes | None]:
    """(public, secret) z85 keys of a certificate file; SecurityError naming `option` if unusable."""
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as error:
        raise SecurityError(f"{option}: cannot read a CURVE certificate from {path!r}: {error}") from None
    if len(public) != 40 or (secret and (secret_key is None or len(secret_key) != 40)):
        what = "secret certificate (NAME.key_secret)" if secret else "public certificate (NAME.key)"
        raise SecurityError(f"{option}: {path!r} is not a CURVE {what} from `proxymatic keygen`")
    return public, secret_key


@dataclass(frozen=True)
class BusSecurity:
    """What this process uses on tcp:// bus endpoints (from Settings: `from_settings`)."""

    public_key: bytes | None = None        # this process's certificate (BUS_SECRET_KEY)...
    secret_key: bytes | None = None
    server_key: bytes | None = None        # the publishers' public key (BUS_SERVER_KEY)
    authorized_keys: str = ""              # directory of accepted *.key (BUS_AUTHORIZED_KEYS)
    insecure: bool = False                 # BUS_INSECURE
    secret_key_file: str = ""
    server_key_file: str = ""

    @classmethod
    def from_settings(cls, settings: "Settings") -> "BusSecurity":
        public = secret = server = None
        if settings.bus_secret_key:
            public, secret = load_certificate(settings.bus_secret_key, "BUS_SECRET_KEY", secret=True)
            mode = os.stat(settings.bus_secret_key).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("bus: BUS_SECRET_KEY %s is readable by others (mode %o): chmod 600 it",
                            settings.bus_secret_key, stat.S_IMODE(mode))
        if settings.bus_server_key:
            server, _ = load_certificate(settings.bus_server_key, "BUS_SERVER_KEY")
        directory = settings.bus_authorized_keys
        if directory:
            if not os.path.isdir(directory):
                raise SecurityError(f"BUS_AUTHORIZED_KEYS: {directory!r} is not a directory")
            directory = os.path.abspath(directory)
        return cls(public, secret, server, directory, settings.bus_insecure,
                   settings.bus_secret_key, settings.bus_server_key)

    @property
    def serves(self) -> bool:
        """A publisher's tcp:// sockets are CURVE servers."""
        return self.secret_key is not None and bool(self.authorized_keys)

    @property
    def connects(self) -> bool:
        """A subscriber's tcp:// sockets are CURVE clients."""
        return self.secret_key is not None and self.server_key is not None


def is_tcp(address: str) -> bool:
    return address.startswith("tcp://")


def is_loopback(address: str) -> bool:
    """Whether a tcp:// endpoint's host is a loopback address (127.0.0.0/8, ::1, localhost);
    `*`, 0.0.0.0, interface names and other host names are not."""
    host = address[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoints(security: BusSecurity, publishes: Iterable[tuple[str, str]],
                    subscribes: Iterable[tuple[str, str]]) -> None:
    """SecurityError for a tcp:// endpoint on a non-loopback address without the keys it needs
    (unless BUS_INSECURE). Each endpoint comes with the option that names it."""
    if security.insecure:
        return
    for option, address in publishes:
        if is_tcp(address) and not is_loopback(address) and not security.serves:
            missing = [name for name, value in (("BUS_SECRET_KEY", security.secret_key),
                                                ("BUS_AUTHORIZED_KEYS", security.authorized_keys)) if not value]
            raise SecurityError(
                f"{option} {address} is not a loopback address: set {' and '.join(missing)} so it "
                "only serves authorized subscribers (CURVE, docs/security.md), or BUS_INSECURE=true")
    for option, address in subscribes:
        if is_tcp(address) and not is_loopback(address) and not security.connects:
            missing = [name for name, value in (("BUS_SECRET_KEY", security.secret_key),
                                                ("BUS_SERVER_KEY", security.server_key)) if not value]
            raise SecurityError(
                f"{option} {address} is not a loopback address: set {' and '.join(missing)} to "
                "subscribe with CURVE (docs/security.md), or BUS_INSECURE=true")


def stage_endpoints(settings: "Settings", stages: Iterable[str]) -> tuple[list, list]:
    """(publishes, subscribes): the (option, address) pairs the stages bind and connect to."""
    publishes, subscribes = [], []
    for stage in stages:
        publishes += [(f"{s.upper()}_BUS", settings.bus(s).pub) for s in PUBLISHES[stage]]
        subscribes += [(f"{s.upper()}_BUS", e.pub) for s in SUBSCRIBES[stage] for e in settings.buses(s)]
    return publishes, subscribes


def check_settings(settings: "Settings", command: str, buses: Iterable[str] = ()) -> BusSecurity:
    """The startup check of every stage, `proxymatic run` (the stages of ROLE) and the tools
    (`buses`: their --bus endpoints, or the run dir's): SecurityError when a key option is
    unusable or a non-loopback tcp:// endpoint has no keys. Returns the BusSecurity."""
    security = BusSecurity.from_settings(settings)
    buses = list(buses)
    if command == "run":
        stages = ROLE_STAGES.get(settings.role, ())
    elif command in SUBSCRIBES:
        stages = (command,)
    else:
        stages = ()
    publishes, subscribes = stage_endpoints(settings, stages)
    if command in ("tap", "explain"):
        subscribes = [("--bus", b) for b in buses] if buses else \
            stage_endpoints(settings, ("status",))[1]
    check_endpoints(security, publishes, subscribes)
    return security


# --- applying it to sockets -------------------------------------------------------------------

def apply_server(ctx: zmq.Context, socket: zmq.Socket, address: str, security: BusSecurity | None,
                 label: str) -> None:
    """Make a publisher's socket a CURVE server if `address` is tcp:// and keys are set (before
    bind): its authenticator is started, refusals are logged once under `label`."""
    if security is None or not is_tcp(address) or not security.serves:
        return
    guard = guard_for(ctx)
    domain = guard.authorize(security.authorized_keys, security.public_key)
    socket.curve_secretkey = security.secret_key
    socket.curve_publickey = security.public_key
    socket.curve_server = True
    socket.zap_domain = domain.encode()
    guard.watch(socket, label, "server", security)


def apply_client(ctx: zmq.Context, socket: zmq.Socket, address: str, security: BusSecurity | None,
                 label: str) -> None:
    """Make a subscriber's socket a CURVE client if `address` is tcp:// and keys are set (before
    connect). A failed handshake is logged once under `label` (its publisher's endpoint)."""
    if security is None or not is_tcp(address):
        return
    if security.connects:
        socket.curve_secretkey = security.secret_key
        socket.curve_publickey = security.public_key
        socket.curve_serverkey = security.server_key
    guard_for(ctx).watch(socket, label, "client", security)


def secured(address: str, security: BusSecurity | None) -> bool:
    """Whether a subscriber's socket to `address` uses CURVE."""
    return security is not None and is_tcp(address) and security.connects


# --- refusals, logged once --------------------------------------------------------------------

class _Once:
    def __init__(self) -> None:
        self._seen: set = set()
        self._lock = threading.Lock()

    def first(self, key: tuple) -> bool:
        with self._lock:
            if key in self._seen or len(self._seen) >= REFUSALS_REMEMBERED:
                return False
            self._seen.add(key)
            return True


def _short(key: bytes | str) -> str:
    text = key.decode("ascii", "replace") if isinstance(key, bytes) else key
    return text[:12] + "..."


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP authenticator: one CURVE domain per authorized keys directory (plus each
    publisher's own key), re-read at most every RELOAD_INTERVAL, refusals logged once a peer."""

    def __init__(self, ctx: zmq.Context, once: _Once):
        super().__init__(ctx)
        self._once = once
        self._own: dict[str, set[bytes]] = {}
        self._loaded: dict[str, float] = {}
        self._request: tuple[str, bytes, bytes] | None = None
        self._domains_lock = threading.Lock()  # publishers add domains while the thread reads them

    def add_domain(self, directory: str, own_key: bytes | None) -> None:
        with self._domains_lock:
            self._own.setdefault(directory, set()).update([own_key] if own_key else [])
            self._load(directory)

    def _load(self, directory: str) -> None:
        """Read `directory` again (with `_domains_lock` held)."""
        try:
            certs = zmq.auth.load_certificates(directory)
        except (OSError, ValueError) as error:
            log.warning("bus: cannot read BUS_AUTHORIZED_KEYS %s: %s (keeping the keys read before)",
                        directory, error)
            certs = dict(self.certs.get(directory, {}))
        for key in self._own.get(directory, ()):
            certs[key] = True
        self.certs[directory] = certs  # replaced whole: the auth thread reads it
        self._loaded[directory] = time.monotonic()

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # version, request id, domain, address, identity, mechanism, credentials...
        self._request = (msg[3].decode(errors="replace"), msg[5], msg[6]) if len(msg) >= 7 else None
        if len(msg) >= 3:
            domain = msg[2].decode(errors="replace")
            with self._domains_lock:
                if domain in self._own and time.monotonic() - self._loaded.get(domain, 0.0) >= RELOAD_INTERVAL:
                    self._load(domain)
        try:
            await super().handle_zap_message(msg)
        finally:
            self._request = None

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = "anonymous") -> None:
        if status_code != b"200" and self._request is not None:
            address, mechanism, credential = self._request
            key = zmq.utils.z85.encode(credential).decode() if mechanism == b"CURVE" and len(credential) == 32 else "?"
            if self._once.first(("zap", address, key)):
                reason = "not in BUS_AUTHORIZED_KEYS" if status_text == b"Unknown key" else \
                    status_text.decode(errors="replace")
                log.warning("bus: refused a subscriber from %s (key %s): %s", address, key, reason)
            else:
                log.debug("bus: refused a subscriber from %s (key %s) again", address, _short(key))
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


def _protocol_error(value: int) -> str:
    try:
        return zmq.Event(value).name
    except ValueError:
        return f"error {value:#x}"


class _Watcher(threading.Thread):
    """Reads the monitor events of every secured bus socket of one context (one thread) and logs
    each kind of failed handshake once per endpoint."""

    def __init__(self, once: _Once):
        super().__init__(name="bus-security", daemon=True)
        self._once = once
        self._new: queue.Queue = queue.Queue()
        self._stopping = threading.Event()

    def add(self, monitor: zmq.Socket, label: str, side: str, security: BusSecurity) -> None:
        self._new.put((monitor, label, side, security))

    def run(self) -> None:
        poller = zmq.Poller()
        watched: dict[zmq.Socket, tuple] = {}
        try:
            while not self._stopping.is_set():
                while True:
                    try:
                        item = self._new.get_nowait()
                    except queue.Empty:
                        break
                    watched[item[0]] = item[1:]
                    poller.register(item[0], zmq.POLLIN)
                for monitor, _ in poller.poll(100):
                    try:
                        event = recv_monitor_message(monitor, zmq.NOBLOCK)
                    except zmq.Again:
                        continue
                    if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                        poller.unregister(monitor)
                        monitor.close()
                        del watched[monitor]
                        continue
                    self._report(event, *watched[monitor])
        finally:
            for monitor in watched:
                monitor.close(linger=0)
            while not self._new.empty():
                self._new.get_nowait()[0].close(linger=0)

    def _report(self, event: dict, label: str, side: str, security: BusSecurity) -> None:
        kind, value = event["event"], event["value"]
        if side == "server":
            if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return  # refused by the authenticator, which logged it with address and key
            if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                # a peer gone mid-handshake (`value` is an errno: EPIPE, ECONNRESET...), most
                # often the one refused just before closing its side: no news for an operator
                log.debug("bus: a subscriber on %s left during the handshake: %s", label, os.strerror(value))
                return
            if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                reason = "it has no CURVE keys (set BUS_SECRET_KEY and BUS_SERVER_KEY on it)"
            elif value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
                reason = "its BUS_SERVER_KEY is not this publisher's public certificate"
            else:
                reason = f"handshake failed ({_protocol_error(value)})"
            if self._once.first(("server", label, value)):
                log.warning("bus: refused a subscriber on %s: %s (ZeroMQ does not say which peer "
                            "before the key exchange)", label, reason)
            else:
                log.debug("bus: refused a subscriber on %s again: %s", label, reason)
            return
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            reason = (f"refused this subscriber's key {security.public_key.decode() if security.public_key else '?'}"
                      f" ({security.secret_key_file}): add its public certificate to the publisher's "
                      "BUS_AUTHORIZED_KEYS")
        elif value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            reason = ("does not use CURVE, and this subscriber does" if security.connects else
                      "requires CURVE: set BUS_SECRET_KEY and BUS_SERVER_KEY")
        else:
            detail = os.strerror(value) if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL else _protocol_error(value)
            reason = (f"did not complete the CURVE handshake ({detail}): is BUS_SERVER_KEY "
                      f"({security.server_key_file}) its public certificate?")
        if self._once.first(("client", label, kind, value)):
            log.warning("bus: the publisher at %s %s", label, reason)
        else:
            log.debug("bus: the publisher at %s %s (again)", label, reason)

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=5)


class _Guard:
    """One context's authenticator (started on the first secured publisher) and watcher."""

    def __init__(self, ctx: zmq.Context):
        self.ctx = ctx
        self.once = _Once()
        self._lock = threading.Lock()
        self._auth: _Authenticator | None = None
        self._watcher: _Watcher | None = None
        self._serial = 0

    def authorize(self, directory: str, own_key: bytes | None) -> str:
        """Start the authenticator if needed; make `directory` (and `own_key`) a CURVE domain of
        it. Returns the ZAP domain for the server socket."""
        with self._lock:
            if self._auth is None:
                self._auth = _Authenticator(self.ctx, self.once)
                self._auth.start()
            self._auth.add_domain(directory, own_key)
        return directory

    def watch(self, socket: zmq.Socket, label: str, side: str, security: BusSecurity) -> None:
        with self._lock:
            if self._watcher is None:
                self._watcher = _Watcher(self.once)
                self._watcher.start()
            self._serial += 1
            address = f"inproc://proxymatic-bus-monitor-{id(self)}-{self._serial}"
        # Connected here, before the socket binds or connects: no event is lost.
        self._watcher.add(socket.get_monitor_socket(_MONITOR_EVENTS, address), label, side, security)

    def stop(self) -> None:
        with self._lock:
            if self._watcher is not None:
                self._watcher.stop()
                self._watcher = None
            if self._auth is not None:
                self._auth.stop()
                self._auth = None


_guards: dict[int, _Guard] = {}
_guards_lock = threading.Lock()


def guard_for(ctx: zmq.Context) -> _Guard:
    with _guards_lock:
        guard = _guards.get(id(ctx))
        if guard is None or guard.ctx is not ctx:
            guard = _guards[id(ctx)] = _Guard(ctx)
        return guard


def stop(ctx: zmq.Context) -> None:
    """Stop `ctx`'s authenticator and watcher (before ctx.term(): their sockets would hold it).
    Close the bus's sockets first. A process that exits needs not call it."""
    with _guards_lock:
        guard = _guards.pop(id(ctx), None)
    if guard is not None:
        guard.stop()


# --- keygen -----------------------------------------------------------------------------------

def keygen(directory: str, name: str, force: bool = False) -> tuple[str, str]:
    """Write DIR/NAME.key (public, 0644) and DIR/NAME.key_secret (0600); SecurityError if the
    pair exists (unless `force`) or NAME is not a plain file name."""
    if not name or name in (".", "..") or "/" in name or name.startswith("."):
        raise SecurityError(f"keygen: NAME must be a plain file name, got {name!r}")
    public_file = os.path.join(directory, name + ".key")
    secret_file = os.path.join(directory, name + ".key_secret")
    existing = [p for p in (public_file, secret_file) if os.path.lexists(p)]
    if existing and not force:
        raise SecurityError(f"keygen: {' and '.join(existing)} exist(s): --force to overwrite")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for path in existing:  # a fresh file under our umask, never an old file's mode or a link
        os.unlink(path)
    umask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        public_file, secret_file = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(umask)
    os.chmod(secret_file, 0o600)
    os.chmod(public_file, 0o644)
    return public_file, secret_file
