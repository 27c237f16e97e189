"""A faithful-enough Marathon for tests, benchmarks and `make demo`.

    sim = MarathonSim().start()                 # one replica on a free port
    sim.deploy_app("/demo/web", network="BRIDGE", service_ports=[10000], instances=2)
    sim.url                                     # "http://127.0.0.1:<port>"
    second = sim.add_replica()                  # another replica of the same cluster
    sim.replicas[0].fault = "hang"              # partition the first one
    sim.stop()

Run standalone: `python -m sim.marathon --port 8080 --apps-file demo.json`.
"""
from __future__ import annotations

from typing import Any

from sim.marathon.cluster import Cluster, SimApp, SimError, SimTask
from sim.marathon.server import Replica

__all__ = ["Cluster", "MarathonSim", "Replica", "SimApp", "SimError", "SimTask"]


class MarathonSim:
    """A Cluster plus its replicas. Cluster methods (deploy_app, scale, kill_task, set_health,
    leader_election, ...) are available directly on the sim."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", auth: tuple[str, str] | None = None,
                 cluster: Cluster | None = None, **cluster_kwargs: Any):
        self.cluster = cluster or Cluster(**cluster_kwargs)
        self._host = host
        self.auth = auth
        self.replicas: list[Replica] = [Replica(self.cluster, port, host, auth)]

    def start(self) -> "MarathonSim":
        for replica in self.replicas:
            if replica.server is None:
                replica.start()
        return self

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()

    def add_replica(self, port: int = 0) -> Replica:
        replica = Replica(self.cluster, port, self._host, self.auth).start()
        self.replicas.append(replica)
        return replica

    @property
    def url(self) -> str:
        """The first replica's URL, with credentials when auth is on."""
        return self.replicas[0].url_with_auth()

    @property
    def urls(self) -> str:
        """All replicas, comma-separated: a MARATHON_URL value."""
        return ",".join(r.url_with_auth() for r in self.replicas)

    def api_requests(self) -> list[str]:
        return [path for replica in self.replicas for path in replica.api_requests()]

    def drop_streams(self) -> None:
        for replica in self.replicas:
            replica.drop_streams()

    def stall_streams(self, stalled: bool = True) -> None:
        for replica in self.replicas:
            replica.stall = stalled

    def refuse_streams(self, status: int | None = 503) -> None:
        """Every replica answers /v2/events with `status` (None: streams again); open streams
        are dropped, so the client has to ask again."""
        for replica in self.replicas:
            replica.refuse_events = status
        if status:
            self.drop_streams()

    def stream_count(self) -> int:
        return sum(r.stream_count() for r in self.replicas)

    def __getattr__(self, name: str) -> Any:
        # deploy_app, scale, kill_task, set_health, leader_election, emit, emit_raw, ...
        return getattr(self.cluster, name)

    def __enter__(self) -> "MarathonSim":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
