"""`proxymatic plan`: a dry run. Stub: filled in by the dry-run work."""
from __future__ import annotations

import argparse

from services.common.config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the plan alone, as JSON")


def dry_run(settings: Settings, args: argparse.Namespace) -> int:
    print("proxymatic plan: not implemented yet")
    return 1
