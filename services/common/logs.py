"""Logging for every proxymatic process: text lines, or with LOG_FORMAT=json one JSON object
per line. Stub: the JSON formatter is filled in by the logging work."""
from __future__ import annotations

import logging
import sys

from services.common.config import Settings


def configure_logging(settings: Settings, command: str) -> None:
    logging.basicConfig(
        level=logging.DEBUG if settings.verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s {command}[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )
