"""Which drivers a node runs: one rule, from the plan's settings.

The plan's ProxySettings decide what the drivers render (HAProxy serves TCP when
`settings.haproxy`, Pen serves UDP and the TCP HAProxy does not, nginx has virtual hosts with
`settings.vhost_domain`), so they decide which drivers run too: `drivers_for` is the rule, and
the applier starts and stops drivers when a plan's settings change (`DriverSet`). The node's own
options (HAPROXY, VHOST_DOMAIN) only pick the drivers until the first plan: when they disagree
with the plan, the plan wins and the applier logs a WARNING once naming both, and says so in
its results (`details.drivers`) and heartbeat (`drivers`, `drivers_note`).
"""
from __future__ import annotations

import logging
from typing import Callable

from services.applier.driver import ProxyDriver

log = logging.getLogger("proxymatic.applier")

ORDER = ("haproxy", "pen", "nginx")  # the order drivers apply in: HAProxy frees ports before Pen binds them


def drivers_for(settings) -> tuple[str, ...]:
    """The drivers `settings` (a plan's ProxySettings, or the node's Settings) ask for: HAProxy
    when `haproxy`, Pen always (UDP, and TCP without HAProxy), nginx with a `vhost_domain`."""
    names = []
    if settings.haproxy:
        names.append("haproxy")
    names.append("pen")
    if settings.vhost_domain:
        names.append("nginx")
    return tuple(names)


def make_driver(name: str, settings) -> ProxyDriver:
    """One driver of this node, by name."""
    if name == "haproxy":
        from services.applier.haproxy_driver import HaproxyDriver
        return HaproxyDriver(settings, defer_writes=True)
    if name == "pen":
        from services.applier.pen_driver import PenDriver
        return PenDriver(settings)
    if name == "nginx":
        from services.applier.nginx_driver import NginxDriver
        return NginxDriver(settings)
    raise ValueError(f"no driver {name!r}")


def disagreement(local: tuple[str, ...], planned: tuple[str, ...], plan_settings) -> str:
    """What to warn about when the node's options and the plan's settings ask for different
    drivers ("" when they agree)."""
    if local == planned:
        return ""
    return (f"this node's options ask for drivers {', '.join(local)} but the plan's settings "
            f"(haproxy={bool(plan_settings.haproxy)}, vhost_domain={plan_settings.vhost_domain!r}) ask for "
            f"{', '.join(planned)}: the plan wins")


class DriverSet:
    """The drivers of this node. Until the first plan, those the node's options ask for; then
    those each plan's settings ask for (`for_plan`): a driver a plan needs is made, a driver it no
    longer needs is applied that plan once more (HAProxy then renders no service and releases its
    ports before Pen binds them) and then closed (`retire`)."""

    def __init__(self, settings, factory: Callable[[str, object], ProxyDriver] = make_driver):
        self.settings = settings
        self.factory = factory
        self.local = drivers_for(settings)
        self.active: dict[str, ProxyDriver] = {name: factory(name, settings) for name in self.local}
        self.leaving: dict[str, ProxyDriver] = {}
        self.note = ""  # the disagreement with the newest plan, if any

    @property
    def drivers(self) -> list[ProxyDriver]:
        """Every driver held (the ones leaving included), in the order they apply."""
        return [d for name in ORDER for d in (self.leaving.get(name), self.active.get(name)) if d is not None]

    def for_plan(self, plan) -> list[ProxyDriver]:
        """The drivers to apply `plan` with: the ones its settings ask for (made when missing),
        after the ones it no longer needs (applied once more, see `retire`)."""
        planned = drivers_for(plan.settings)
        note = disagreement(self.local, planned, plan.settings)
        if note and note != self.note:
            log.warning("applier: %s", note)
        self.note = note
        for name in list(self.active):
            if name not in planned:
                log.info("applier: the plan no longer needs the %s driver; applying it once more, then stopping it",
                         name)
                self.leaving[name] = self.active.pop(name)
        for name in planned:
            if name not in self.active:
                log.info("applier: starting the %s driver (the plan's settings ask for it)", name)
                self.active[name] = self.leaving.pop(name, None) or self.factory(name, self.settings)
        return self.drivers

    def retire(self) -> list[ProxyDriver]:
        """After an apply: the leaving drivers (each was applied the plan once more) are dropped;
        returns them, for the caller to close."""
        leaving, self.leaving = list(self.leaving.values()), {}
        return leaving

    def details(self) -> dict:
        return {"running": [d.name for d in self.drivers], "local": list(self.local), "note": self.note}
