"""Balance: pick one endpoint of the routed cluster, or of the subset a route rule chose
(round robin for now)."""

from __future__ import annotations

from mesh_common.snapshot import Cluster, Endpoint
from sidecar.http2 import grpc as G
from sidecar.http2.relay import Call, LocalReply

from .base import Decision, Layer, Next

_SUBSET_ENTRIES = 1024


class RoundRobin(Layer):
    """Sets ``call.endpoint``, rotating over ``call.subset`` when the route layer set one,
    else over the cluster's healthy endpoints. Each cluster, and each subset tuple, has its
    own rotation. No endpoint to pick: a ``LocalReply`` UNAVAILABLE naming the service."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}
        # Keyed by id(subset): the entry holds the tuple, so the id cannot be reused while it
        # lives; subsets of replaced snapshots go when the table fills up (hashing the tuple
        # of endpoints per call would cost more).
        self._subsets: dict[int, list] = {}

    def on_request(self, call: Call, next: Next) -> Decision:
        cluster: Cluster = call.cluster
        eps: tuple[Endpoint, ...] | None = call.subset
        if eps is None:
            eps = cluster.healthy
            if not eps:
                why = "no healthy endpoints" if cluster.endpoints else "no endpoints"
                return LocalReply(G.UNAVAILABLE, f"service {cluster.name!r} has {why}")
            i = self._next.get(cluster.name, 0)
            self._next[cluster.name] = i + 1
        else:
            if not eps:
                return LocalReply(G.UNAVAILABLE,
                                  f"service {cluster.name!r}: no healthy endpoint in the subset")
            slot = self._subsets.get(id(eps))
            if slot is None or slot[0] is not eps:
                if len(self._subsets) >= _SUBSET_ENTRIES:
                    self._subsets.clear()
                slot = self._subsets[id(eps)] = [eps, 0]
            i = slot[1]
            slot[1] = i + 1
        call.endpoint = eps[i % len(eps)]
        return next(call)
