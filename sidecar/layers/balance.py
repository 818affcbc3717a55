"""Balance: pick one endpoint of the routed cluster (round robin for now)."""

from __future__ import annotations

from mesh_common.snapshot import Cluster
from sidecar.http2 import grpc as G
from sidecar.http2.relay import Call, LocalReply

from .base import Decision, Layer, Next


class RoundRobin(Layer):
    """Sets ``call.endpoint``, rotating per cluster over its healthy endpoints."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def on_request(self, call: Call, next: Next) -> Decision:
        cluster: Cluster = call.cluster
        eps = cluster.healthy
        if not eps:
            why = "no healthy endpoints" if cluster.endpoints else "no endpoints"
            return LocalReply(G.UNAVAILABLE, f"service {cluster.name!r} has {why}")
        i = self._next.get(cluster.name, 0)
        self._next[cluster.name] = i + 1
        call.endpoint = eps[i % len(eps)]
        return next(call)
