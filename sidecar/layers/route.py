"""Route: pick the upstream service (cluster) from the call's ``:authority``."""

from __future__ import annotations

from collections.abc import Callable

from mesh_common.snapshot import Cluster, Snapshot
from sidecar.http2 import grpc as G
from sidecar.http2.relay import Call, LocalReply

from .base import Decision, Layer, Next


def service_of(authority: str) -> str:
    """``payment``, ``payment:443`` and ``[::1]:80`` style authorities → the host part."""
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


class Route(Layer):
    """Sets ``call.route`` and ``call.cluster``; an unknown service gets UNAVAILABLE."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def on_request(self, call: Call, next: Next) -> Decision:
        snap = self.snapshot()
        name = service_of(call.authority)
        cluster: Cluster | None = snap.cluster(name)
        if cluster is None:
            return LocalReply(G.UNAVAILABLE,
                              f"no route to service {name!r} (:authority {call.authority!r})")
        call.route = name
        call.cluster = cluster
        return next(call)
