"""Which virtual hosts make `nginx -t` fail: so one bad vhost is set aside, not the whole plan.

Two ways, both pure here (the caller supplies `nginx -t`):
  - nginx names the line: "... in <rendered nginx.conf>:57" is mapped to the vhost block around
    line 57 (`nginx_render.Block`);
  - it does not (e.g. "could not build server_names_hash"), or the line is outside any vhost:
    bisect, testing subsets of the vhosts, to find those that fail on their own.
A failure the config without any vhost has too, or one no single vhost explains (two vhosts
that only fail together), is not isolated: the caller rejects the whole config.
"""
from __future__ import annotations

import re
import time
from typing import Callable, Iterable

from services.applier.nginx_render import Block

# How the nginx driver names the file it tested in messages (see NginxDriver.test).
CONFIG_NAME = "<rendered nginx.conf>"
_LINE = re.compile(re.escape(CONFIG_NAME) + r":(\d+)")

# `test(keys)` runs nginx -t on the config holding only the vhosts `keys`: nginx's message, or "".
Tester = Callable[[list[str]], str]


class TooManyTests(Exception):
    """The search needed more nginx -t runs than allowed (each one takes tens of ms)."""


def error_lines(message: str) -> list[int]:
    """The config line numbers nginx's message points at."""
    return [int(number) for number in _LINE.findall(message)]


def blocks_at(lines: Iterable[int], blocks: Iterable[Block]) -> list[str]:
    """The vhost keys whose blocks contain any of `lines`, in block order."""
    lines = set(lines)
    return [block.key for block in blocks if any(block.first <= line <= block.last for line in lines)]


def bisect_failing(keys: list[str], test: Tester, error: str) -> dict[str, str]:
    """The vhosts among `keys` (which fail together with `error`) that fail on their own, each
    with nginx's message. Halves are tested in turn; a half that passes is cleared at once."""
    found: dict[str, str] = {}

    def search(group: list[str], message: str) -> None:
        if len(group) == 1:
            found[group[0]] = message
            return
        middle = len(group) // 2
        for part in (group[:middle], group[middle:]):
            problem = test(part)
            if problem:
                search(part, problem)

    search(list(keys), error)
    return found


def counted(test: Tester, limit: int, seconds: float, clock: Callable[[], float] = time.monotonic) -> Tester:
    """`test`, raising TooManyTests on call number `limit + 1` or once `seconds` have passed
    since the first call: bounds a search (the applier applies nothing else meanwhile)."""
    calls = 0
    deadline: float | None = None

    def limited(keys: list[str]) -> str:
        nonlocal calls, deadline
        calls += 1
        now = clock()
        deadline = now + seconds if deadline is None else deadline
        if calls > limit or now > deadline:
            raise TooManyTests(f"more than {limit} nginx -t runs or {seconds:.0f}s")
        return test(keys)

    return limited
