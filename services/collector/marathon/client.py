"""Talking to Marathon: replicas with failover, basic auth, the `/v2/events` SSE stream.

Any replica answers (a non-leader proxies to the leader), so a request goes to the replica that
answered last and fails over to the others on connection errors, timeouts and 5xx. Credentials
from `user:password@` in a URL become an Authorization header and never appear in a log line or
an error message (`Replica.display`).

The event stream runs in its own thread with a read timeout as its watchdog: a stream that stays
silent longer than `watchdog` seconds (the common failure: a half-open connection that never
closes) is dropped and reopened, with exponential backoff, rotating through the replicas.
"""
from __future__ import annotations

import base64
import http.client
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote, unquote, urlencode, urlsplit

import requests

from services.collector.source import SourceError
from services.common.backoff import Backoff
from services.common.redact import redact

log = logging.getLogger("proxymatic.collector.marathon")

# Events that may change routing; every other type is dropped before its JSON is parsed.
ROUTING_EVENTS = frozenset({
    "status_update_event", "health_status_changed_event", "api_post_event", "instance_changed_event",
    "instance_health_changed_event", "failed_health_check_event", "app_terminated_event",
    "deployment_info", "deployment_success", "deployment_failed", "deployment_step_success",
    "deployment_step_failure",
})
_EVENT_TYPE_RE = re.compile(rb'"eventType"\s*:\s*"([A-Za-z_]+)"')
MAX_EVENT_BYTES = 8 * 1024 * 1024  # a data-only event bigger than this is not parsed
READ_CHUNK = 64 * 1024
MIN_STREAM_LIFE = 1.0  # a stream that ends sooner counts as a failed attempt (no hot loop)


class NotFound(Exception):
    """404 from a replica: a real answer (the app or version does not exist)."""


@dataclass(frozen=True)
class Replica:
    base: str  # scheme://host:port/prefix, without credentials, no trailing slash
    auth: tuple[str, str] | None
    display: str  # for logs: the password replaced by ***

    @property
    def authorization(self) -> str | None:
        if not self.auth:
            return None
        return "Basic " + base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()


def parse_replicas(text: str) -> list[Replica]:
    replicas = []
    for raw in (part.strip() for part in text.split(",")):
        if not raw:
            continue
        parts = urlsplit(raw)
        try:
            port = parts.port  # raises on a bad port, quoting it: it may hold a password
        except ValueError:
            port = -1
        # An `@` left in the path: a password with an unencoded `/` (it must not become a path).
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or "@" in parts.path:
            raise ValueError(f"not a Marathon URL: {shown_url(raw)!r}")
        netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        if port:
            netloc += f":{port}"
        base = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"
        auth = (unquote(parts.username or ""), unquote(parts.password or "")) if parts.username else None
        display = f"{parts.scheme}://{quote(auth[0]) + ':***@' if auth else ''}{netloc}{parts.path.rstrip('/')}"
        replicas.append(Replica(base, auth, display))
    if not replicas:
        raise ValueError("no Marathon URL given")
    return replicas


def shown_url(raw: str) -> str:
    """A URL that may be malformed, safe to show: everything before its last `@` is hidden
    (an unencoded `@`, `/` or `:` in a password defeats any finer redaction)."""
    if "@" not in raw:
        return raw
    scheme, sep, _ = raw.partition("://")
    return f"{scheme}{sep}***@{raw.rsplit('@', 1)[1]}" if sep else "***@" + raw.rsplit("@", 1)[1]


class MarathonClient:
    """JSON GETs with failover. Counts requests (`requests_made`) for tests and benchmarks."""

    def __init__(self, replicas: list[Replica], timeout: float = 10.0, connect_timeout: float = 3.0):
        self.replicas = replicas
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.preferred = 0
        self.requests_made = 0
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxies or .netrc from the environment
            self._local.session = session
        return session

    def get_json(self, path: str, params: dict | None = None) -> Any:
        """GET `path` from the first replica that answers. Raises NotFound on 404 and
        SourceError when no replica gives a usable answer."""
        errors = []
        order = list(range(self.preferred, len(self.replicas))) + list(range(self.preferred))
        for index in order:
            replica = self.replicas[index]
            url = replica.base + path + (("?" + urlencode(params)) if params else "")
            headers = {"Accept": "application/json"}
            if replica.authorization:
                headers["Authorization"] = replica.authorization
            self.requests_made += 1
            try:
                response = self._session().get(url, headers=headers, timeout=(self.connect_timeout, self.timeout))
            except requests.RequestException as error:
                errors.append(f"{replica.display}: {type(error).__name__}")
                log.warning("marathon: %s%s failed (%s); trying the next replica", replica.display, path,
                            type(error).__name__)
                continue
            if response.status_code == 404:
                self.preferred = index
                raise NotFound(path)
            if response.status_code != 200:
                errors.append(f"{replica.display}: HTTP {response.status_code}")
                log.warning("marathon: %s%s answered HTTP %d; trying the next replica", replica.display, path,
                            response.status_code)
                continue
            try:
                data = response.json()
            except ValueError:
                errors.append(f"{replica.display}: malformed JSON")
                log.warning("marathon: %s%s answered malformed JSON; trying the next replica", replica.display, path)
                continue
            if index != self.preferred:
                log.info("marathon: now using replica %s", replica.display)
            self.preferred = index
            return data
        raise SourceError(f"no Marathon replica answered {path}: {'; '.join(errors)}")

    def close(self) -> None:
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()


class SSEParser:
    """Incremental text/event-stream parser. Feed it complete lines (bytes, without the line
    ending); it calls `on_event(type, data_bytes)` for relevant events only. The type is the
    `event:` line, else the JSON `eventType` of the data (older data-only framing)."""

    def __init__(self, on_event: Callable[[str, bytes], None], relevant: frozenset[str] = ROUTING_EVENTS):
        self.on_event = on_event
        self.relevant = relevant
        self._type: str | None = None
        self._data: list[bytes] = []
        self._size = 0
        self._skip = False
        self.events_seen = 0
        self.events_ignored = 0

    def skipping(self) -> bool:
        """True when the current event's data can be discarded unread (known, irrelevant type)."""
        return self._skip or (self._type is not None and self._type not in self.relevant)

    def line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
        elif line.startswith(b":"):
            return  # comment / keepalive
        elif line.startswith(b"event:"):
            self._type = line[6:].strip().decode("ascii", "replace")
        elif line.startswith(b"data:"):
            if self.skipping():
                return
            chunk = line[5:]
            if chunk.startswith(b" "):
                chunk = chunk[1:]
            self._size += len(chunk)
            if self._size > MAX_EVENT_BYTES:
                self._skip, self._data = True, []
            else:
                self._data.append(chunk)
        # id:, retry: and unknown fields are ignored

    def discard_data(self) -> None:
        """The rest of a too-long data line was dropped by the reader."""
        self._skip, self._data = True, []

    def _dispatch(self) -> None:
        event_type, data, skip = self._type, b"\n".join(self._data), self._skip
        self._type, self._data, self._size, self._skip = None, [], 0, False
        if event_type is None and not data and not skip:
            return
        self.events_seen += 1
        if skip and event_type is None:
            # an enormous data-only event: its type is unknown, treat it as "something changed"
            self.on_event("unknown_large_event", b"")
            return
        if event_type is None:
            match = _EVENT_TYPE_RE.search(data)
            event_type = match.group(1).decode() if match else ""
        if event_type not in self.relevant or skip:
            self.events_ignored += 1
            if skip and event_type in self.relevant:
                self.on_event(event_type, b"")
            return
        self.on_event(event_type, data)


@dataclass(frozen=True)
class StreamHealth:
    """The event stream as its source reports it: up, or down since when and why."""

    up: bool
    down_since: float | None = None  # wall-clock time it went down (or first failed to open)
    error: str = ""  # the last reason (credentials redacted)
    failed_attempts: int = 0  # attempts that did not open a stream since it went down


class EventStream:
    """Background thread consuming `/v2/events` from whichever replica accepts it. A stream
    that ends is reopened at once; only attempts that fail (or streams that end within
    MIN_STREAM_LIFE) back off, exponentially up to `backoff_max`. Any exception reconnects:
    the thread ends only with `close()`."""

    def __init__(self, replicas: list[Replica], on_event: Callable[[str, bytes], None],
                 on_connect: Callable[[Replica], None], watchdog: float = 60.0, connect_timeout: float = 3.0,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0, server_filter: bool = True,
                 on_status: Callable[[], None] = lambda: None):
        self.replicas = replicas
        self.on_event = on_event
        self.on_connect = on_connect
        self.on_status = on_status  # the stream went up or down, or another attempt failed
        self._health = StreamHealth(up=False)
        self._health_lock = threading.Lock()
        self.watchdog = watchdog
        self.connect_timeout = connect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.server_filter = server_filter
        self.connected = threading.Event()
        self.connects = 0
        self.reconnects_by_watchdog = 0
        self._closing = threading.Event()
        self._conn: http.client.HTTPConnection | None = None
        self._sock: socket.socket | None = None
        self._conn_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="marathon-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        self._abort_connection()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2.0)

    def _abort_connection(self) -> None:
        with self._conn_lock:
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _path(self) -> str:
        params: list[tuple[str, str]] = [("plan-format", "light")]
        if self.server_filter:
            params += [("event_type", t) for t in sorted(ROUTING_EVENTS)]
        return "/v2/events?" + urlencode(params)

    def health(self) -> StreamHealth:
        with self._health_lock:
            return self._health

    def _set_health(self, health: StreamHealth) -> None:
        with self._health_lock:
            changed, self._health = health != self._health, health
        if changed:
            try:
                self.on_status()
            except Exception:  # noqa: BLE001 - a bug in the listener must not end the stream thread
                log.exception("marathon: event stream status listener failed")

    def _run(self) -> None:
        failures = 0  # consecutive failed attempts: they alone back off
        short_streams = 0  # consecutive streams that ended within MIN_STREAM_LIFE
        index = 0
        while not self._closing.is_set():
            replica = self.replicas[index % len(self.replicas)]
            connects, started = self.connects, time.monotonic()
            reason = ""
            try:
                self._consume(replica)
            except Exception as error:  # anything, even a bug: reconnect, never end the thread
                if self._closing.is_set():
                    break
                reason = self._describe(error, replica)
            finally:
                self.connected.clear()
                with self._conn_lock:
                    conn, self._conn, self._sock = self._conn, None, None
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001 - closing a broken connection
                        pass
            if self._closing.is_set():
                break
            reason = reason or "event stream closed"
            connected = self.connects > connects
            if not connected:
                failures, short_streams = failures + 1, 0
                index += 1  # try the next replica
            elif time.monotonic() - started >= MIN_STREAM_LIFE:
                failures, short_streams = 0, 0  # a stream that lasted ended: reopen at once
            else:  # ended at once: the first is reopened at once, the next ones back off
                short_streams += 1
                failures = short_streams - 1
            # Streams that keep ending at once (a proxy closing them) count as failing too.
            self._stream_down(reason, attempt_failed=not connected or short_streams >= 2)
            if failures:
                self._closing.wait(Backoff(self.backoff_initial, self.backoff_max).after(failures))

    def _describe(self, error: Exception, replica: Replica) -> str:
        if isinstance(error, (socket.timeout, TimeoutError)) and self.connected.is_set():
            self.reconnects_by_watchdog += 1
            log.warning("marathon: event stream from %s silent for %.0fs; reconnecting", replica.display,
                        self.watchdog)
            return f"silent for {self.watchdog:.0f}s"
        text = redact(str(error)) or type(error).__name__
        if not isinstance(error, (OSError, http.client.HTTPException, ValueError)):
            log.error("marathon: event stream from %s: unexpected %s: %s; reconnecting", replica.display,
                      type(error).__name__, text)
        else:
            log.warning("marathon: event stream from %s failed: %s", replica.display, text)
        return f"{replica.display}: {text}"

    def _stream_down(self, reason: str, attempt_failed: bool) -> None:
        health = self.health()
        self._set_health(StreamHealth(
            up=False, down_since=health.down_since if not health.up and health.down_since else time.time(),
            error=reason, failed_attempts=health.failed_attempts + (1 if attempt_failed else 0)))

    def _consume(self, replica: Replica) -> None:
        """Read one stream until it ends (it always ends by raising, or by `close()`)."""
        parts = urlsplit(replica.base)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname, parts.port, timeout=self.connect_timeout)
        with self._conn_lock:
            self._conn = conn
        if self._closing.is_set():
            return
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if replica.authorization:
            headers["Authorization"] = replica.authorization
        conn.request("GET", parts.path + self._path(), headers=headers)
        sock = conn.sock  # the response takes it over (Connection: close)
        with self._conn_lock:
            self._sock = sock
        if self._closing.is_set():
            return
        response = conn.getresponse()
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}")
        sock.settimeout(self.watchdog)
        self.connects += 1
        self.connected.set()
        log.info("marathon: subscribed to the event stream of %s", replica.display)
        self.on_connect(replica)
        self._set_health(StreamHealth(up=True))
        parser = SSEParser(self.on_event)
        partial = b""
        discarding = False  # inside a long line whose content does not matter
        while not self._closing.is_set():
            chunk = response.readline(READ_CHUNK)
            if not chunk:
                raise ValueError("event stream closed")
            complete = chunk.endswith(b"\n")
            if discarding:
                discarding = not complete
                continue
            if not complete:
                partial += chunk
                if parser.skipping() and partial.startswith(b"data:"):
                    partial, discarding = b"", True  # a big event of an ignored type: not kept
                elif len(partial) > MAX_EVENT_BYTES:
                    parser.discard_data()
                    partial, discarding = b"", True
                continue
            line, partial = partial + chunk, b""
            parser.line(line.rstrip(b"\r\n"))
