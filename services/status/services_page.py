"""`GET /services` (HTML) and `/services.json`: what this node serves and what it does not, and
why. Stub: filled in by the services-page work."""
from __future__ import annotations

from services.common.config import Settings
from services.status.state import PipelineState


def services_view(state: PipelineState, settings: Settings) -> dict:
    return {"services": [], "excluded": []}


def render_services_page(view: dict) -> str:
    return "<!doctype html><title>proxymatic services</title>"
