"""No partial plans reach the proxies: a plan that lacks a source the served plan had is held.

A source is missing from a plan when the planner has not heard from it (a planner restarted
while the collector had not delivered it, a collector restarted without its saved state):
applying such a plan would take every service of that source out of the proxies although
the source never said they were gone. So the applier keeps serving its current plan until a
plan arrives in which that source is ready again (even with no services left: then they are
really gone). Pure functions; the stage (main.py) logs and publishes what they say.
"""
from __future__ import annotations

from services.common.model import ApplyResult, Plan

HELD = "held"


def missing_sources(serving: Plan | None, incoming: Plan) -> tuple[str, ...]:
    """Sources ready in the plan being served that the incoming plan has not heard from."""
    if serving is None:
        return ()
    return tuple(sorted(set(serving.sources_ready) - set(incoming.sources_ready)))


def hold_note(incoming: Plan, serving: Plan, missing: tuple[str, ...]) -> str:
    return (f"plan {incoming.hash} held: it lacks source(s) {', '.join(missing)} that the served plan "
            f"{serving.hash} has; serving that plan until they report")


def held_result(incoming: Plan, serving: Plan, missing: tuple[str, ...]) -> ApplyResult:
    """What the applier publishes for a held plan: not applied (ok false), action `held`, and
    why in details["held"] (the wire form adds it as `notes`, see main.result_payload)."""
    return ApplyResult(
        plan_hash=incoming.hash, ok=False, action=HELD,
        details={HELD: {"note": hold_note(incoming, serving, missing), "missing_sources": list(missing),
                        "serving": serving.hash}},
    )
