"""`GET /metrics`: Prometheus text format, built with prometheus-client from what the stages
report in their heartbeats (see docs/bus.md, "Counters in heartbeats"). Stub: filled in by the
metrics work."""
from __future__ import annotations

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from services.common.config import Settings
from services.status.state import PipelineState

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


def render_metrics(state: PipelineState, settings: Settings) -> bytes:
    return b""
