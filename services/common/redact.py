"""Credentials never leave the process that needs them: URLs and texts are redacted before
they reach a log line, a bus message, /status/details or a command line."""
from __future__ import annotations

import re

# scheme://user:password@host -> scheme://user:***@host (also a bare user@ is kept: no secret).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<password>[^@/\s]*)@")


def redact(text: str) -> str:
    """`text` with every URL password replaced by `***`."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:***@", text)
