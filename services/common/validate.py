"""The one place that says what a valid name, host name, health-check path, domain or integer
is, for every module that reads them from outside (the model, the sources' parsers, the options,
the renderers). Every pattern ends with `\\Z`, never `$`: `$` also matches before a trailing
newline, which would carry a newline into a config line.
"""
from __future__ import annotations

import re
from typing import Any

# A service name: a DNS-ish label sequence; it becomes a virtual host name and appears in logs.
NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,253}[A-Za-z0-9])?\Z")
# A server's host name as a source gave it (shown, never resolved by a proxy); may be empty.
HOSTNAME_RE = re.compile(r"[A-Za-z0-9_.:-]{0,255}\Z")
# A URL path for `option httpchk`: printable, no spaces, no quotes but `'`, no `#`.
CHECK_PATH_RE = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]{0,1023}\Z")
# A DNS domain (VHOST_DOMAIN).
DOMAIN_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\Z")
# An integer written as text: ASCII digits only (str.isdigit() and int() also take "²", "٣",
# "1_000"), short enough for int().
DIGITS_RE = re.compile(r"[0-9]{1,12}\Z")


def integer(value: Any, low: int, high: int, floats: bool = False) -> int | None:
    """`value` as an integer in [low, high], or None: an int (never a bool), ASCII digits in a
    string (spaces around allowed), and with `floats` a float with no fraction (JSON 8080.0)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif floats and isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and DIGITS_RE.match(value.strip()):
        number = int(value.strip())
    else:
        return None
    return number if low <= number <= high else None


def is_name(value: Any) -> bool:
    return isinstance(value, str) and NAME_RE.match(value) is not None


def is_hostname(value: Any) -> bool:
    return isinstance(value, str) and HOSTNAME_RE.match(value) is not None


def is_check_path(value: Any) -> bool:
    return isinstance(value, str) and CHECK_PATH_RE.match(value) is not None


def is_domain(value: Any) -> bool:
    return isinstance(value, str) and DOMAIN_RE.match(value) is not None


def port_text(text: str) -> int | None:
    """A port written as text, strictly (no sign, no spaces): 1..65535, else None."""
    if not isinstance(text, str) or not DIGITS_RE.match(text) or len(text) > 5:
        return None
    number = int(text)
    return number if 1 <= number <= 65535 else None
