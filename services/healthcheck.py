"""`proxymatic healthcheck`: exit 0 when this node's `/status` answers 200, 1 otherwise.

For container health checks (docker-compose.yml, a Dockerfile's HEALTHCHECK): it asks the
status stage on STATUS_ENDPOINT (an all-interfaces address such as `0.0.0.0:9090` is asked on
127.0.0.1), with a short timeout, and prints the status line (`OK`, `INITIALIZING`,
`UNAVAILABLE: ...`) or why it could not ask. No discovery source is needed, nothing is started.
"""
from __future__ import annotations

import argparse
import http.client

from services.common.config import Settings

WILDCARDS = ("0.0.0.0", "::", "[::]", "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=3.0,
                        help="seconds to wait for /status [default: 3]")


def status_address(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if host in WILDCARDS:
        host = "127.0.0.1"
    return host.strip("[]"), int(port)


def healthcheck(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.status_endpoint:
        print("proxymatic healthcheck: STATUS_ENDPOINT is empty: /status is disabled")
        return 1
    host, port = status_address(settings.status_endpoint)
    connection = http.client.HTTPConnection(host, port, timeout=args.timeout)
    try:
        connection.request("GET", "/status")
        response = connection.getresponse()
        body = response.read(512).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException) as error:
        print(f"proxymatic healthcheck: http://{host}:{port}/status: {error or type(error).__name__}")
        return 1
    finally:
        connection.close()
    print(f"{response.status} {body}")
    return 0 if response.status == 200 else 1
