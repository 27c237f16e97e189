"""Excluded entries made by the sources: one factory that keeps every field within the model's
rules (one line, at most 1,024 characters, no credentials), and the collector's last check
before a snapshot goes on the bus.

An entry the planner could not decode would make it drop the source's whole snapshot, so the
sources build every entry through `excluded()` and the collector checks each new one once
(`ExcludedCheck`, by value: entries of unchanged apps are the same objects from one build to
the next and cost a dictionary lookup).
"""
from __future__ import annotations

from typing import Any, Iterable

from services.common.model import EXCLUDER_NAMES, EXCLUSION_CODES, MAX_EXCLUDED, Excluded, ModelError, bounded_excluded
from services.common.redact import redact

FIELD_LIMIT = 1024
REASON_LIMIT = 300  # a reason is a sentence, not a dump of what the source sent


def one_line(value: Any, limit: int = FIELD_LIMIT) -> str:
    """`value` as one printable line without credentials, at most `limit` characters."""
    text = value if isinstance(value, str) else ("" if value is None else repr(value))
    if len(text) > limit * 2:
        text = text[: limit * 2]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if "://" in text and "@" in text:
        text = redact(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def address(ip: Any, port: Any) -> str:
    """"ip:port" ("[v6]:port"), or "" when either is unknown."""
    if not isinstance(ip, str) or not ip or isinstance(port, bool) or not isinstance(port, int):
        return ""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def excluded(source: str, code: str, reason: str, app: Any = "", task: Any = "", service: Any = "",
             key: Any = "", address: Any = "") -> Excluded:
    """An Excluded whose fields are safe whatever the source handed in (hostile ids included)."""
    return Excluded(source=source, code=code if code in EXCLUSION_CODES else "bad_data",
                    reason=one_line(reason, REASON_LIMIT) or code, app=one_line(app), task=one_line(task),
                    service=one_line(service), key=one_line(key), address=one_line(address))


class ExcludedCheck:
    """The collector's check of a source's entries: each new entry is validated once (as the
    planner will decode it) and replaced by a safe copy if it does not pass; then the whole
    list is bounded and ordered (`bounded_excluded`). The same input tuple gives the very same
    output tuple without any work."""

    def __init__(self, source: str):
        self.source = source
        # id(entry) -> (entry, its safe form): by identity, which is cheaper than hashing the
        # entry, and the entries of unchanged apps are the same objects from one build to the next
        self._checked: dict[int, tuple[Any, Excluded]] = {}
        self._last: tuple[Any, tuple[Excluded, ...]] | None = None

    def __call__(self, entries: Iterable[Excluded]) -> tuple[Excluded, ...]:
        if self._last is not None and self._last[0] is entries:
            return self._last[1]
        known = self._checked
        checked: dict[int, tuple[Any, Excluded]] = {}
        out = []
        for entry in entries:
            hit = known.get(id(entry))
            if hit is not None and hit[0] is entry:
                safe = hit[1]
            else:
                safe = self._check(entry)
                if safe is None:
                    continue
            checked[id(entry)] = (entry, safe)
            out.append(safe)
            if len(out) >= 4 * MAX_EXCLUDED:
                break  # a source gone mad: bounded_excluded keeps MAX_EXCLUDED anyway
        self._checked = checked
        result = bounded_excluded(out)
        self._last = (entries, result)
        return result

    def _check(self, entry: Any) -> Excluded | None:
        if not isinstance(entry, Excluded):
            return None
        try:
            Excluded.from_dict(entry.to_dict())
            leaks = any("://" in value and "@" in value and redact(value) != value
                        for value in entry.to_dict().values())
            if entry.source in EXCLUDER_NAMES and not leaks:
                return entry
        except ModelError:
            pass
        return excluded(self.source, entry.code, entry.reason, entry.app, entry.task, entry.service, entry.key,
                        entry.address)
