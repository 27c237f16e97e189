"""The one place that says what a valid name, host name, health-check path, domain or integer
is, for every module that reads them from outside (the model, the sources' parsers, the options,
the renderers). Every pattern ends with `\\Z`, never `$`: `$` also matches before a trailing
newline, which would carry a newline into a config line.
"""
from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from typing import Any

# The patterns as text too: the model declares them as msgspec constraints (`anchored`), so a
# name is checked by the same expression wherever it comes from.
# A service name: a DNS-ish label sequence; it becomes a virtual host name and appears in logs.
NAME_PATTERN = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,253}[A-Za-z0-9])?\Z"
# A server's host name as a source gave it (shown, never resolved by a proxy); may be empty.
HOSTNAME_PATTERN = r"[A-Za-z0-9_.:-]{0,255}\Z"
# A URL path for `option httpchk`: printable, no spaces, no quotes but `'`, no `#`.
CHECK_PATH_PATTERN = r"/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]{0,1023}\Z"
# A DNS domain (VHOST_DOMAIN).
DOMAIN_PATTERN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\Z"
# One label of a host name to resolve (registrator's `host:port`; `_` allowed, as Docker names).
RESOLVABLE_LABEL_PATTERN = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z"
# One line of text (no CR, no LF), for what is shown on a page or in a log line.
ONE_LINE_PATTERN = r"[^\r\n]*\Z"

NAME_RE = re.compile(NAME_PATTERN)
HOSTNAME_RE = re.compile(HOSTNAME_PATTERN)
CHECK_PATH_RE = re.compile(CHECK_PATH_PATTERN)
DOMAIN_RE = re.compile(DOMAIN_PATTERN)
RESOLVABLE_LABEL_RE = re.compile(RESOLVABLE_LABEL_PATTERN)
# An integer written as text: ASCII digits only (str.isdigit() and int() also take "²", "٣",
# "1_000"), short enough for int().
DIGITS_RE = re.compile(r"[0-9]{1,12}\Z")

MAX_IP_TEXT = 45  # the longest IP address text: IPv6 with an IPv4 tail


def anchored(pattern: str) -> str:
    """`pattern` for a matcher that searches (msgspec's Meta(pattern=...)) instead of matching."""
    return r"\A" + pattern


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


def is_resolvable_host(value: Any) -> bool:
    """A host name that may be looked up in DNS: at most 253 characters of valid labels."""
    return (isinstance(value, str) and len(value) <= 253
            and all(RESOLVABLE_LABEL_RE.match(label) for label in value.rstrip(".").split(".")))


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


def ip_text(value: Any) -> str | None:
    """An IP address written as text, in its normal form (str(ipaddress.ip_address())), or None.
    Only a string: ip_address() also takes integers (1 -> "0.0.0.1") and bytes. No IPv6 zone
    ("fe80::1%eth0"): ip_address() accepts any text after the `%`, newlines and spaces too, and
    str() gives it back, straight into a proxy config line."""
    if type(value) is not str or len(value) > MAX_IP_TEXT or "%" in value:
        return None
    return _ip_text(value)


@lru_cache(maxsize=65536)  # short strings only (MAX_IP_TEXT): at most a few MB
def _ip_text(value: str) -> str | None:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None
