"""The one interface every discovery source implements (after confd's backend client).

A source answers two questions: what is there now (`current`), and "tell me when that may
have changed" (`wait_for_change`). The collector runs each source in its own thread, so a
source may block on the network as long as it honours `stop` and its own timeouts; one source
hanging never delays another.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass

from services.common.model import Service


class SourceError(Exception):
    """Discovery failed (unreachable, malformed answer...). The collector keeps the last good
    state of the source and reports it degraded with this message."""


@dataclass(frozen=True)
class Discovery:
    """What a source found: services, plus entries it skipped and why (never fatal).
    `degraded` says why the answer may be late although it is current (e.g. an event stream
    that is down, so changes only arrive with the next poll); "" when all is well."""

    services: tuple[Service, ...]
    warnings: tuple[str, ...] = ()
    degraded: str = ""


class Source(ABC):
    #: "marathon" | "registrator" | "file": also the planner's precedence key.
    name: str

    @abstractmethod
    def current(self) -> Discovery:
        """Return the full current state. Raise SourceError when it cannot be known."""

    @abstractmethod
    def wait_for_change(self, timeout: float, stop: threading.Event) -> None:
        """Block until the state may have changed, `timeout` seconds pass, or `stop` is set.
        May raise SourceError (the collector backs off, then calls `current` again)."""

    def close(self) -> None:
        """Release connections; called once when the collector stops."""


class SourceBroken(SourceError):
    """The source cannot work at all until its configuration changes (e.g. a URL that does not
    parse): retrying does not help, so the collector publishes it `degraded` at once, with no
    services (or its saved last good ones), instead of `initializing` forever."""


class BrokenSource(Source):
    """Stands in for a source that could not be built (a bad URL...): every `current()` raises
    SourceBroken with the reason, so that source alone is published degraded while the other
    sources run normally."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason

    def current(self) -> Discovery:
        raise SourceBroken(self.reason)

    def wait_for_change(self, timeout: float, stop: threading.Event) -> None:
        stop.wait(timeout)

