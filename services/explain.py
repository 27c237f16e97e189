"""`proxymatic explain PORT|NAME|APP_ID`: what is served there and what is not, and why, read
from the live bus. Stub: filled in by the services-page work."""
from __future__ import annotations

import argparse

from services.common.config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", metavar="PORT|NAME|APP_ID", help="a service port (1234 or 1234/udp), name or app id")


def explain(settings: Settings, args: argparse.Namespace) -> int:
    print("proxymatic explain: not implemented yet")
    return 1
