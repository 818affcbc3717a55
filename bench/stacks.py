"""The sidecar's outbound and inbound layer stacks, built in this process as
``sidecar.process`` builds them, for the in-process benches (``layer_cost``, ``cold``).

The sidecar's modules are imported only when called: the rest of the bench drives the mesh
from outside.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any


def sidecar_stacks(snapshot: Any, pool: Callable[[str], Any],
                   sink: Callable[[Any], None] | None = None, *, client: str = "client",
                   server: str = "echo") -> tuple[Any, Any]:
    """(outbound stack of ``client``'s sidecar, inbound stack of ``server``'s) over
    ``snapshot``, every layer a sidecar runs by default (stats, metrics, trace at its
    default 0.1 sampling, the outbound policy layers, authorize, calllog). ``pool(label)``
    gives the pool for an endpoint (one per endpoint address) and for the local app; sampled
    spans go to ``sink`` (None: dropped)."""
    from sidecar.layers.authorize import Authorize
    from sidecar.layers.calllog import CallLog, Taps
    from sidecar.layers.metrics import Metrics
    from sidecar.layers.stats import Stats
    from sidecar.layers.trace import Trace
    from sidecar.stack import inbound_stack, outbound_stack

    snap = lambda: snapshot  # noqa: E731
    pools: dict[str, Any] = {}

    def endpoint_pool(ep: Any, route: str) -> Any:
        hit = pools.get(ep.address)
        if hit is None:
            hit = pools[ep.address] = pool(f"{ep.address} ({route})")
        return hit

    out_stats = Stats(clock=time.monotonic)
    outbound = outbound_stack(
        snap, out_stats, endpoint_pool, random.Random(14),
        metrics=Metrics("outbound", client, snap, out_stats.clock),
        calllog=CallLog("outbound", client, Taps(), None, clock=out_stats.clock),
        trace=Trace(outbound=True, service=client, sample_rate=0.1, sink=sink,
                    rng=random.Random(1)))
    in_stats = Stats(clock=time.monotonic)
    inbound = inbound_stack(
        in_stats, pool(f"127.0.0.1:1 (local app of {server})"),
        metrics=Metrics("inbound", server, snap, in_stats.clock),
        calllog=CallLog("inbound", server, Taps(), None, clock=in_stats.clock),
        trace=Trace(outbound=False, service=server, sample_rate=0.1, sink=sink,
                    rng=random.Random(2)),
        authorize=Authorize(snap, server))
    return outbound, inbound
