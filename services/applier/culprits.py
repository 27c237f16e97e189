"""Which members of a set make a test fail: the one search both drivers use to set aside what
their proxy refuses (HAProxy services whose sections `haproxy -c` rejects, haproxy_driver.py;
nginx vhosts `nginx -t` rejects, nginx_driver.py), bounded in runs and in seconds: the applier
applies nothing else meanwhile.

A test checks the config holding only some members: `test(keys)` is "" when it passes, else
the proxy's message. Pure, apart from the clock.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

Test = Callable[[list[str]], str]

# The default bound of one search (each run of `haproxy -c` or `nginx -t` takes tens of ms).
MAX_RUNS = 40
MAX_SECONDS = 10.0


class OverBudget(Exception):
    """The search needed more runs, or more time, than its budget allows."""


class Budget:
    """Runs and seconds a search may spend; the seconds count from the first run."""

    def __init__(self, runs: int = MAX_RUNS, seconds: float = MAX_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.runs, self.seconds, self.clock = runs, seconds, clock
        self.spent = 0
        self._deadline: float | None = None

    def spend(self) -> None:
        """Account for one run; OverBudget on run number `runs + 1` or once `seconds` have passed."""
        self.spent += 1
        now = self.clock()
        if self._deadline is None:
            self._deadline = now + self.seconds
        if self.spent > self.runs or now > self._deadline:
            raise OverBudget(f"more than {self.runs} runs or {self.seconds:g}s")

    def bound(self, test: Test) -> Test:
        """`test`, spending one run of this budget per call."""
        def limited(keys: list[str]) -> str:
            self.spend()
            return test(keys)
        return limited


def bounded(test: Test, runs: int = MAX_RUNS, seconds: float = MAX_SECONDS,
            clock: Callable[[], float] = time.monotonic) -> Test:
    """`test` with a budget of its own: raises OverBudget on call `runs + 1` or after `seconds`."""
    return Budget(runs, seconds, clock).bound(test)


def find(keys: Sequence[str], test: Test, failure: str | None = None,
         together: bool = True) -> dict[str, str] | None:
    """The members to leave out so that the rest of `keys` passes, each with the test's message
    for it, in the order found; {} when `keys` pass as they are. `failure`: the message of
    `test(keys)` when the caller already has it (spares that run).

    None when leaving members out does not explain the failure: the test fails without any
    member too, or (`together=False`) a member is to blame only together with others.

    While the remaining members fail, bisects for the shortest failing prefix of them: its last
    member is a culprit (it fails with the members before it, which pass), the message that of
    that prefix. About log2(n) + 1 runs per culprit. `together=True` blames such a member even
    when it passes alone (two sections that conflict: the later one is left out);
    `together=False` requires it to fail on its own (one run more per culprit, whose message is
    the one reported). Supersets of a failing set are assumed to fail; the answer is checked
    all the same (the rest passed its last run). Raises what `test` raises (OverBudget from a
    `bounded` test).
    """
    rest = list(keys)
    message = test(rest) if failure is None else failure
    if not message:
        return {}
    if test([]):
        return None
    found: dict[str, str] = {}
    while message:
        good, bad = 0, len(rest)  # test(rest[:good]) passes, test(rest[:bad]) fails with `message`
        while bad - good > 1:
            middle = (good + bad) // 2
            why = test(rest[:middle])
            if why:
                bad, message = middle, why
            else:
                good = middle
        culprit = rest.pop(bad - 1)
        if not together:
            message = test([culprit])
            if not message:
                return None
        found[culprit] = message
        message = test(rest) if rest else ""  # without any member it passed
    return found
