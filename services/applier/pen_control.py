"""Client for Pen's control socket (the protocol `penctl` speaks).

One command per connection: send the command line, read the reply until Pen closes the socket.
Pen answers nothing for a command it accepted silently and `do_cmd: ignoring ...` for one it
did not understand, so callers verify the effect by reading the state back (`servers`).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from services.common.model import Server
from services.common.unix_socket import exchange

# An unused slot: Pen skips servers whose address is 0.0.0.0 (or that were never set).
EMPTY_ADDRESS = "0.0.0.0"

_SERVER_LINE = re.compile(
    r"^(?P<slot>\d+) addr (?P<addr>\S+|\(unknown address family \d+) port (?P<port>\d+) conn (?P<conn>\d+) "
    r"max (?P<max>\d+) hard \d+ weight (?P<weight>\d+)"
)
_ROW = re.compile(r"<tr>\s*((?:<td>[^<]*</td>\s*)+)</tr>")
_CELL = re.compile(r"<td>([^<]*)</td>")


class PenControlError(OSError):
    """The control socket could not be reached or answered something unexpected."""


@dataclass(frozen=True)
class Slot:
    """What one Pen server slot points at. `None` in a slot table means an unused slot."""

    ip: str
    port: int
    weight: int
    maxconn: int  # 0: unlimited

    @classmethod
    def of(cls, server: Server) -> "Slot":
        # Re-parsed so that nothing but an address and numbers ever reaches a pen command. An IPv6
        # zone ("fe80::1%eth0") is refused: ipaddress keeps any text after the %, newlines included.
        address = ipaddress.ip_address(server.ip)
        if getattr(address, "scope_id", None) is not None:
            raise ValueError(f"an address with a zone is not supported: {server.ip!r}")
        return cls(ip=str(address), port=int(server.port), weight=int(server.proxy_weight),
                   maxconn=int(server.maxconn or 0))

    def command(self, index: int, moved: bool) -> str:
        # `blacklist 0` clears a blacklisting earned by the slot's previous occupant.
        return (f"server {index} address {self.ip} port {self.port} max {self.maxconn} weight {self.weight}"
                + (" blacklist 0" if moved else ""))


def empty_command(index: int) -> str:
    return f"server {index} address {EMPTY_ADDRESS} port 0 max 0 weight 0"


class PenControl:
    def __init__(self, path: str, timeout: float = 2.0):
        self.path = path
        self.timeout = timeout

    def command(self, line: str) -> str:
        if "\n" in line or "\r" in line:
            raise ValueError(f"a pen command is one line, got {line!r}")
        try:
            reply = exchange(self.path, line.encode() + b"\n", self.timeout).decode(errors="replace")
        except OSError as error:
            raise PenControlError(f"pen control socket {self.path}: {error}") from error
        if reply.startswith("do_cmd: ignoring"):
            raise PenControlError(f"pen rejected {line!r}: {reply.strip()}")
        return reply

    def pid(self) -> int:
        return int(self.command("pid").strip())

    def servers(self) -> dict[int, Slot | None]:
        """The slot table as Pen sees it: index -> Slot, or None for an unused slot."""
        return parse_servers(self.command("servers"))

    def connections(self) -> list[tuple[int, int]]:
        """(connection, server slot) for every open connection (needs pen started with -w)."""
        return parse_connections(self.command("status"))

    def close_connection(self, connection: int) -> None:
        self.command(f"close {connection}")


def parse_servers(text: str) -> dict[int, Slot | None]:
    slots: dict[int, Slot | None] = {}
    for line in text.splitlines():
        match = _SERVER_LINE.match(line.strip())
        if not match:
            continue
        addr, port = match["addr"], int(match["port"])
        index = int(match["slot"])
        if addr.startswith("(") or addr in (EMPTY_ADDRESS, "::") or port == 0:
            slots[index] = None
        else:
            slots[index] = Slot(ip=addr, port=port, weight=int(match["weight"]), maxconn=int(match["max"]))
    return slots


def parse_connections(status_html: str) -> list[tuple[int, int]]:
    _, sep, table = status_html.partition("Active connections")
    if not sep:
        return []
    result = []
    for row in _ROW.findall(table):
        cells = _CELL.findall(row)
        # connection, downfd, upfd, pending down, pending up, client, server
        if len(cells) >= 7 and cells[0].isdigit() and cells[6].lstrip("-").isdigit():
            result.append((int(cells[0]), int(cells[6])))
    return result
