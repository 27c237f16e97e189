"""Last good state of each source, kept on disk in the run dir.

A collector restarted while a source is down would otherwise have nothing to say about it but
"initializing", and the plan would lose every service of that source: missing is not failing.
So the last good services are saved, and published as `degraded` at start until the source
itself answers.
"""
from __future__ import annotations

import json
import logging
import os
import time

import orjson

from services.common.files import write_atomic
from services.common.model import ModelError, SourceSnapshot, services_from_list, services_to_list

log = logging.getLogger("proxymatic.collector")

# Saving is at most this often per source, so a burst of changes is not a burst of disk writes.
SAVE_INTERVAL = 1.0


class SourceCache:
    def __init__(self, directory: str):
        self.directory = directory
        self._saved_at: dict[str, float] = {}
        self._pending: dict[str, SourceSnapshot] = {}
        os.makedirs(directory, exist_ok=True)

    def _path(self, source: str) -> str:
        return os.path.join(self.directory, f"{source}.json")

    def load(self, source: str) -> SourceSnapshot | None:
        try:
            with open(self._path(source), encoding="utf-8") as handle:
                document = json.load(handle)
            services = services_from_list(document["services"])
            saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(document["saved_at"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, ModelError) as error:
            log.warning("source %s: ignoring unreadable saved state: %s", source, error)
            return None
        return SourceSnapshot(source, "degraded", services,
                              error=f"not answered since the collector started; serving its last good state from {saved}")

    def remember(self, snapshot: SourceSnapshot) -> None:
        """Save these services as the source's last good state (the caller passes only a
        source's own current answers, never a failure's kept state)."""
        self._pending[snapshot.source] = snapshot

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        for source, snapshot in list(self._pending.items()):
            if force or now - self._saved_at.get(source, 0.0) >= SAVE_INTERVAL:
                document = {"saved_at": time.time(), "services": services_to_list(snapshot.services)}
                try:
                    # orjson: the stdlib took ~50 ms for 1,000 services, time a change arriving
                    # meanwhile waited for (the publish loop saves when idle, not in a thread)
                    write_atomic(self._path(source), orjson.dumps(document, option=orjson.OPT_SORT_KEYS).decode(),
                                 skip_if_same=False)
                except OSError as error:
                    log.warning("source %s: cannot save state: %s", source, error)
                self._saved_at[source] = now
                del self._pending[source]
