"""`python -m sim.marathon --port 8080 [--apps-file apps.json] [--auth user:password]`

The apps file is a JSON list of objects with the arguments of Cluster.deploy_app, e.g.
[{"app_id": "/demo/web", "network": "HOST", "service_ports": [10001], "instances": 2,
  "host_ports": [[8001], [8002]], "labels": {"com.meltwater.proxymatic.port.0.mode": "http"}}]
(`id` is accepted for `app_id`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from sim.marathon import MarathonSim
from sim.stopping import stop_event


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.marathon", description="a simulated Marathon")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--apps-file", help="JSON list of apps to deploy at start")
    parser.add_argument("--auth", help="user:password required as HTTP basic auth")
    parser.add_argument("--shape", choices=("1.4", "1.5"), default="1.5", help="JSON shape of app definitions")
    parser.add_argument("--agent-host", action="append", help="host name/IP tasks run on (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sim.marathon %(message)s")
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    sim = MarathonSim(port=args.port, host=args.host, auth=auth, shape=args.shape,
                      hosts=args.agent_host or ["127.0.0.1"]).start()
    if args.apps_file:
        with open(args.apps_file) as handle:
            apps = json.load(handle)
        for app in apps if isinstance(apps, list) else apps.get("apps", []):
            app = dict(app)
            app.setdefault("app_id", app.pop("id", None))
            sim.deploy_app(**app)
    logging.info("serving Marathon on %s with %d apps", sim.replicas[0].url, len(sim.cluster.apps))
    done = stop_event()
    done.wait()
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
