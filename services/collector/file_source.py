"""Static discovery: a JSON services file, re-read whenever it changes.

The file may be replaced atomically (rename) or edited in place; both change the (inode,
mtime, size) signature that is polled. Format: docs/services-file.md. A malformed file raises
SourceError, so the collector keeps the last good services and reports the source degraded.
"""
from __future__ import annotations

import json
import os
import threading
import time

from services.collector.exclusions import excluded as make_excluded
from services.collector.source import Discovery, Source, SourceError
from services.common.model import ModelError, Service, field_list

FILE_FIELDS = {"name", "port", "protocol", "mode", "servers", "health_check", "healthCheck",
               "timeout_client", "timeout_server", "timeoutClient", "timeoutServer", "host_network"}
SERVER_FIELDS = {"host", "ip", "port", "hostname", "weight", "maxconn"}


class FileEntryError(ModelError):
    """One entry of the file is invalid (the whole file is rejected); says which entry."""

    def __init__(self, message: str, name: str = "", key: str = ""):
        super().__init__(message)
        self.name, self.key = name, key


def _entry_identity(raw: object) -> tuple[str, str]:
    """(name, "port/protocol") of a raw entry, as far as they can be told ("" when not)."""
    if not isinstance(raw, dict):
        return "", ""
    name = raw.get("name") if isinstance(raw.get("name"), str) else ""
    port, protocol = raw.get("port"), raw.get("protocol", "tcp")
    if isinstance(port, str) and port.strip().isascii() and port.strip().isdigit():
        port = int(port.strip())
    key = ""
    if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536 and isinstance(protocol, str) \
            and protocol.lower() in ("tcp", "udp"):
        key = f"{port}/{protocol.lower()}"
    return name, key


def _server_dict(raw: object, what: str) -> dict:
    if not isinstance(raw, dict):
        raise ModelError(f"{what} must be an object")
    unknown = set(raw) - SERVER_FIELDS
    if unknown:
        raise ModelError(f"{what} has unknown field(s): {field_list(unknown)}")
    data = dict(raw)
    # The documented form names the address `host`; it must be an IP address here (no DNS
    # in a static file: a name that stops resolving would silently drop a backend).
    if "host" in data:
        if "ip" in data:
            raise ModelError(f"{what} has both host and ip: give one")
        data["ip"] = data.pop("host")
    return data


def parse_services_file(text: str) -> tuple[Service, ...]:
    """Parse and validate the whole file; any error rejects the whole file (nothing applied)."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelError(f"not valid JSON: {error}") from None
    except (ValueError, RecursionError) as error:
        # json.loads raises plain ValueError for an integer of more than 4300 digits and
        # RecursionError for arrays/objects nested thousands deep: still a bad file.
        raise ModelError(f"not valid JSON: {type(error).__name__}: {str(error)[:200]}") from None
    if not isinstance(document, dict) or not isinstance(document.get("services"), list):
        raise ModelError('expected an object {"services": [...]}')
    unknown_top = set(document) - {"services"}
    if unknown_top:
        raise ModelError(f"unknown top-level field(s): {field_list(unknown_top)}")
    services: dict[str, Service] = {}
    for index, raw in enumerate(document["services"]):
        try:
            service = _parse_entry(index, raw, services)
        except ModelError as error:
            raise FileEntryError(str(error), *_entry_identity(raw)) from None
        services[service.key] = service
    return tuple(services.values())


def _parse_entry(index: int, raw: object, services: dict[str, Service]) -> Service:
    """One entry of the file -> a Service (ModelError naming it when it is invalid)."""
    what = f"services[{index}]"
    if not isinstance(raw, dict):
        raise ModelError(f"{what} must be an object")
    unknown = set(raw) - FILE_FIELDS
    if unknown:
        raise ModelError(f"{what} has unknown field(s): {field_list(unknown)}")
    data = {k: v for k, v in raw.items() if k not in ("healthCheck", "timeoutClient", "timeoutServer")}
    for camel, snake in (("healthCheck", "health_check"), ("timeoutClient", "timeout_client"),
                         ("timeoutServer", "timeout_server")):
        if camel in raw:
            if snake in raw:  # one of them would be ignored silently
                raise ModelError(f"{what} has both {camel} and {snake}: give one")
            data[snake] = raw[camel]
    servers = raw.get("servers", [])
    if not isinstance(servers, list):
        raise ModelError(f"{what}.servers must be a list")
    data["servers"] = [_server_dict(s, f"{what}.servers[{i}]") for i, s in enumerate(servers)]
    data["source"] = "file"
    service = Service.from_dict(data, what)
    if service.key in services:
        raise ModelError(f"{what}: port {service.key} is already used by service {services[service.key].name!r}")
    return service


class FileSource(Source):
    name = "file"

    def __init__(self, path: str, poll_interval: float = 0.25):
        self.path = path
        self.poll_interval = poll_interval
        self._seen: tuple | None = None
        self._read = False  # read once: a new signature is then a change of the file

    def _signature(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def current(self) -> Discovery:
        signature = self._signature()
        self.cause = "file_change" if self._read and signature != self._seen else "poll"
        self.counters.event(self.cause)
        self._seen, self._read = signature, True
        self.received_at = time.time()
        try:
            with open(self.path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as error:
            raise self._failed(f"cannot read services file {self.path}: {error.strerror}") from None
        except UnicodeDecodeError as error:
            raise self._failed(f"services file {self.path} is not UTF-8: {error}") from None
        try:
            return Discovery(parse_services_file(text))
        except ModelError as error:
            name, key = (error.name, error.key) if isinstance(error, FileEntryError) else ("", "")
            failure = self._failed(f"services file {self.path}: {error}")
            # What the file says is not applied: the entry at fault (or the whole file) and why.
            failure.excluded = (make_excluded("file", "bad_data", f"{error}; the whole file is rejected, "
                                              "the last good services are served", app=name, service=name, key=key),)
            raise failure from None

    def _failed(self, message: str) -> SourceError:
        self.counters.error()
        return SourceError(message)

    def wait_for_change(self, timeout: float, stop: threading.Event) -> None:
        # Polling the signature is cheap and works for every editor and for atomic renames,
        # unlike inotify on the file itself (a rename replaces the watched inode).
        waited = 0.0
        while waited < timeout and not stop.is_set():
            if self._signature() != self._seen:
                return
            stop.wait(self.poll_interval)
            waited += self.poll_interval
