"""Which virtual hosts make `nginx -t` fail: so one bad vhost is set aside, not the whole plan.

Two ways (the caller, nginx_driver.py, supplies `nginx -t`):
  - nginx names the line: "... in <rendered nginx.conf>:57" is mapped to the vhost block around
    line 57 (`nginx_render.Block`), here;
  - it does not (e.g. "could not build server_names_hash"), or the line is outside any vhost:
    the driver searches subsets of the vhosts for those that fail on their own (culprits.find
    with `together=False`, bounded like every such search).
A failure the config without any vhost has too, or one no single vhost explains (two vhosts
that only fail together), is not isolated: the caller rejects the whole config.
"""
from __future__ import annotations

import re
from typing import Iterable

from services.applier.nginx_render import Block

# How the nginx driver names the file it tested in messages (see NginxDriver.test).
CONFIG_NAME = "<rendered nginx.conf>"
_LINE = re.compile(re.escape(CONFIG_NAME) + r":(\d+)")


def error_lines(message: str) -> list[int]:
    """The config line numbers nginx's message points at."""
    return [int(number) for number in _LINE.findall(message)]


def blocks_at(lines: Iterable[int], blocks: Iterable[Block]) -> list[str]:
    """The vhost keys whose blocks contain any of `lines`, in block order."""
    lines = set(lines)
    return [block.key for block in blocks if any(block.first <= line <= block.last for line in lines)]
