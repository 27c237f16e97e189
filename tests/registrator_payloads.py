"""A whole etcd GET ?recursive=true answer → (services, warnings), through the source's own
parsing steps (parse_tree, discovery_all): for tests and benches that start from a payload. The
source itself reads etcd with python-etcd, whose typed errors it handles."""
from __future__ import annotations

from typing import Any, Mapping

from services.collector.registrator_parse import (Entry, Resolver, caching_resolver, discovery_all, parse_tree,
                                                  resolve_host)
from services.common.model import Service, clip


def discovery_parts(entries: Mapping[str, Entry], entry_warnings: Mapping[str, str]
                    ) -> tuple[tuple[Service, ...], tuple[str, ...]]:
    """Services plus every warning (bad entries by key order, then port conflicts)."""
    services, warnings, _ = discovery_all(entries, entry_warnings, {})
    return services, warnings


def parse_response(prefix: str, payload: Mapping[str, Any],
                   resolve: Resolver = resolve_host) -> tuple[tuple[Service, ...], tuple[str, ...]]:
    """A whole GET ?recursive=true response body (as JSON) → (services, warnings). Raises
    ValueError for an etcd error (other than "key not found": no services) or a body that is
    not an etcd answer."""
    if not isinstance(payload, Mapping):
        raise ValueError(f"etcd answered {clip(payload, 60)}, not an object")
    if "errorCode" in payload:
        if payload.get("errorCode") == 100:
            return (), ()
        raise ValueError(f"etcd error {payload.get('errorCode')}: {payload.get('message')}")
    entries, warnings = parse_tree(prefix, payload.get("node"), caching_resolver(resolve))
    return discovery_parts(entries, warnings)
