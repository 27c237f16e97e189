"""Static discovery: a JSON services file, re-read whenever it changes.

The file may be replaced atomically (rename) or edited in place; both change the (inode,
mtime, size) signature that is polled. Format: docs/services-file.md. A malformed file raises
SourceError, so the collector keeps the last good services and reports the source degraded.
"""
from __future__ import annotations

import json
import os
import threading

from services.collector.source import Discovery, Source, SourceError
from services.common.model import ModelError, Service, field_list

FILE_FIELDS = {"name", "port", "protocol", "mode", "servers", "health_check", "healthCheck",
               "timeout_client", "timeout_server", "timeoutClient", "timeoutServer", "host_network"}
SERVER_FIELDS = {"host", "ip", "port", "hostname", "weight", "maxconn"}


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
        services[service.key] = service
    return tuple(services.values())


class FileSource(Source):
    name = "file"

    def __init__(self, path: str, poll_interval: float = 0.25):
        self.path = path
        self.poll_interval = poll_interval
        self._seen: tuple | None = None

    def _signature(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def current(self) -> Discovery:
        self._seen = self._signature()
        try:
            with open(self.path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as error:
            raise SourceError(f"cannot read services file {self.path}: {error.strerror}") from None
        except UnicodeDecodeError as error:
            raise SourceError(f"services file {self.path} is not UTF-8: {error}") from None
        try:
            return Discovery(parse_services_file(text))
        except ModelError as error:
            raise SourceError(f"services file {self.path}: {error}") from None

    def wait_for_change(self, timeout: float, stop: threading.Event) -> None:
        # Polling the signature is cheap and works for every editor and for atomic renames,
        # unlike inotify on the file itself (a rename replaces the watched inode).
        waited = 0.0
        while waited < timeout and not stop.is_set():
            if self._signature() != self._seen:
                return
            stop.wait(self.poll_interval)
            waited += self.poll_interval
