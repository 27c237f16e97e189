"""Credentials never leave the process that needs them: URLs and texts are redacted before
they reach a log line, a bus message, /status/details or a command line."""
from __future__ import annotations

import re

# scheme://user:password@host -> scheme://user:***@host. The password runs to the last `@` that
# is followed by a host (no `@`, `/` or `,` before the path, a comma or the end), so a password
# holding an unencoded `/` or `@` is hidden whole; a comma ends it (lists of URLs).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s,]*):(?P<password>[^\s,]*)@"
                       r"(?=[^@\s/,]*(?:[/\s,?#]|$))")


def redact(text: str) -> str:
    """`text` with every URL password replaced by `***`."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:***@", text)
