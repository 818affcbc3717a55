"""The one place that orders the layers of the inbound and outbound request paths.

outbound:  stats → route → balance → endpoint pool (mTLS to the endpoint's inbound)
inbound:   stats → local app pool (h2c over loopback)

Later layers (metrics, tracing, fault, timeout, retry, breaker, authorize) slot into these
lists; nothing else needs to know the order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mesh_common.snapshot import Endpoint, Snapshot

from .http2.pool import Pool
from .http2.relay import Call, LocalReply
from .layers.balance import RoundRobin
from .layers.base import Decision, Layer
from .layers.route import Route
from .layers.stats import Stats


class Stack:
    """Composes layers around a terminal that returns where the call goes (Finagle's andThen)."""

    def __init__(self, layers: Sequence[Layer], terminal: Callable[[Call], Decision]) -> None:
        self.layers = tuple(layers)
        fn = terminal
        for layer in reversed(self.layers):
            fn = _bind(layer, fn)
        self._entry = fn

    def on_request(self, call: Call) -> Pool | LocalReply:
        return self._entry(call)

    def on_response(self, call: Call) -> None:
        for layer in self.layers:
            layer.on_response(call)

    def on_end(self, call: Call) -> None:
        for layer in self.layers:
            layer.on_end(call)


def _bind(layer: Layer, next_fn: Callable[[Call], Decision]) -> Callable[[Call], Decision]:
    def run(call: Call) -> Decision:
        return layer.on_request(call, next_fn)
    return run


def outbound_stack(snapshot: Callable[[], Snapshot], stats: Stats,
                   endpoint_pool: Callable[[Endpoint, str], Pool]) -> Stack:
    def endpoint(call: Call) -> Decision:
        return endpoint_pool(call.tags["endpoint"], call.route)
    return Stack([stats, Route(snapshot), RoundRobin()], endpoint)


def inbound_stack(stats: Stats, app_pool: Pool) -> Stack:
    return Stack([stats], lambda call: app_pool)
