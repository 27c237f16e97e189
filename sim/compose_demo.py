"""The demo profile of docker-compose.yml (`docker compose --profile demo up`): what proxymatic
discovers and proxies there, configured by environment variables.

    python -m sim.compose_demo marathon   the Marathon simulator on DEMO_MARATHON_PORT with one
                                          app, /demo/web (service port DEMO_WEB_PORT, HTTP mode),
                                          whose tasks are the web backends
    python -m sim.compose_demo backends   the HTTP backends: web-a, web-b... on DEMO_WEB_BACKENDS,
                                          api-a, api-b... on DEMO_API_BACKENDS; the api ones are
                                          registered in etcd (DEMO_ETCD_URL) under /services the
                                          way registrator does it: service demo-api, port DEMO_API_PORT

Every backend answers every path with its name (and `X-Backend: <name>`), so a few requests
through the proxies show who served them. Both run until SIGTERM or SIGINT.
"""
from __future__ import annotations

import argparse
import logging
import os
import string
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler

from sim.backends import QuietHTTPServer
from sim.stopping import stop_event

log = logging.getLogger("sim.compose_demo")

DEFAULTS = {
    "DEMO_MARATHON_PORT": "18080",
    "DEMO_WEB_PORT": "10080",
    "DEMO_WEB_BACKENDS": "127.0.0.1:18001,127.0.0.1:18002",
    "DEMO_API_PORT": "10081",
    "DEMO_API_BACKENDS": "127.0.0.1:18011,127.0.0.1:18012",
    "DEMO_ETCD_URL": "http://127.0.0.1:12379",
}
ETCD_PREFIX = "/services"
API_SERVICE = "demo-api"
REGISTER_EVERY = 5.0  # seconds between two checks that the etcd keys are there (etcd may restart)


def setting(name: str) -> str:
    return os.environ.get(name) or DEFAULTS[name]


def addresses(name: str) -> list[tuple[str, int]]:
    result = []
    for item in setting(name).split(","):
        host, _, port = item.strip().rpartition(":")
        result.append((host or "127.0.0.1", int(port)))
    return result


def named(prefix: str, name: str) -> list[tuple[str, str, int]]:
    """(name, host, port) of each backend: web-a, web-b, ..."""
    return [(f"{prefix}-{string.ascii_lowercase[index % 26]}", host, port)
            for index, (host, port) in enumerate(addresses(name))]


def serve_backend(name: str, host: str, port: int) -> QuietHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = name.encode() + b"\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Backend", name)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    QuietHTTPServer.allow_reuse_address = True
    server = QuietHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    log.info("backend %s serving on %s:%d", name, host, port)
    return server


def register(etcd_url: str, keys: dict[str, str]) -> bool:
    """Create each key that is missing (an existing one is left alone: no watch event for the
    collector). True when etcd answered for every key."""
    for key, value in keys.items():
        url = f"{etcd_url.rstrip('/')}/v2/keys{key}?prevExist=false"
        request = urllib.request.Request(url, data=urllib.parse.urlencode({"value": value}).encode(),
                                         method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=2):
                log.info("registered %s = %s in etcd", key, value)
        except urllib.error.HTTPError as error:
            if error.code != 412:  # 412: the key exists already
                log.warning("etcd %s: HTTP %d", key, error.code)
                return False
        except OSError as error:
            log.info("etcd at %s not answering yet: %s", etcd_url, error)
            return False
    return True


def run_backends() -> int:
    servers = [serve_backend(*backend) for backend in named("web", "DEMO_WEB_BACKENDS") + named("api", "DEMO_API_BACKENDS")]
    api_port = int(setting("DEMO_API_PORT"))
    # registrator's layout: <prefix>/<service>/<host>:<container>:<exposed port> = <ip>:<port>
    keys = {f"{ETCD_PREFIX}/{API_SERVICE}/demo:{name}:{api_port}": f"{host}:{port}"
            for name, host, port in named("api", "DEMO_API_BACKENDS")}
    done = stop_event()
    etcd_url = setting("DEMO_ETCD_URL")
    while True:
        register(etcd_url, keys)
        if done.wait(REGISTER_EVERY if keys else 3600):
            break
    for server in servers:
        server.shutdown()
        server.server_close()
    return 0


def run_marathon() -> int:
    from sim.marathon import MarathonSim

    backends = addresses("DEMO_WEB_BACKENDS")
    sim = MarathonSim(port=int(setting("DEMO_MARATHON_PORT")), hosts=sorted({host for host, _ in backends})).start()
    sim.deploy_app("/demo/web", network="BRIDGE", service_ports=[int(setting("DEMO_WEB_PORT"))],
                   instances=len(backends), host_ports=[[port] for _, port in backends],
                   labels={"com.meltwater.proxymatic.port.0.mode": "http"})
    log.info("Marathon simulator on %s: /demo/web on service port %s, tasks %s", sim.replicas[0].url,
             setting("DEMO_WEB_PORT"), ", ".join(f"{h}:{p}" for h, p in backends))
    done = stop_event()
    done.wait()
    sim.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.compose_demo", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("marathon", "backends"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sim.compose_demo %(message)s", stream=sys.stdout)
    return run_marathon() if args.what == "marathon" else run_backends()


if __name__ == "__main__":
    sys.exit(main())
