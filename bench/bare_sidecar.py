"""``python -m bench.bare_sidecar [mesh-sidecar arguments...]``

A standalone sidecar with no layers: the relay, the HTTP/2 core, the I/O drivers and mTLS as
``sidecar.main`` runs them, but the inbound stack hands every call to the local app and the
outbound stack to the first endpoint of the cluster named by the call's ``:authority`` (no
stats, metrics, tracing, route rules, faults, limits, retries, timeouts, balancing, outlier
detection, authorization or call log). A diagnostic for ``bench.floor``'s ``mesh-bare`` path,
not a way to run a sidecar: it shows what the relay costs apart from the policy it carries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mesh_common.snapshot import Endpoint, Snapshot
from sidecar import main as sidecar_main
from sidecar import process
from sidecar.http2 import grpc as G
from sidecar.http2.pool import Pool
from sidecar.http2.relay import Call, LocalReply
from sidecar.layers.base import Decision
from sidecar.stack import Stack


def bare_outbound(snapshot: Callable[[], Snapshot], stats: Any,
                  endpoint_pool: Callable[[Endpoint, str], Pool], *args: Any,
                  **kwargs: Any) -> Stack:
    """``outbound_stack``'s signature; every call goes to its cluster's first endpoint."""
    pools: dict[Endpoint, Pool] = {}

    def first_endpoint(call: Call) -> Decision:
        cluster = snapshot().cluster(call.authority)
        if cluster is None or not cluster.endpoints:
            return LocalReply(G.UNAVAILABLE, f"no cluster {call.authority!r}")
        ep = cluster.endpoints[0]
        pool = pools.get(ep)
        if pool is None or pool.closed:
            pool = pools[ep] = endpoint_pool(ep, cluster.name)
        call.route = cluster.name
        call.endpoint = ep
        return pool
    return Stack([], first_endpoint)


def bare_inbound(stats: Any, app_pool: Pool, **kwargs: Any) -> Stack:
    """``inbound_stack``'s signature; every call goes to the local app."""
    return Stack([], lambda call: app_pool)


def main() -> None:
    process.outbound_stack = bare_outbound  # type: ignore[assignment]
    process.inbound_stack = bare_inbound  # type: ignore[assignment]
    sidecar_main.main()


if __name__ == "__main__":
    main()
