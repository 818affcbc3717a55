"""The one place that orders the layers of the inbound and outbound request paths.

outbound:  stats → metrics → trace → route → fault → limits → retry → timeout → balance →
           endpoint pool (mTLS to the endpoint's inbound); outlier detection is fed by the
           balancer; then calllog and the trace's ending (end hooks only)
inbound:   stats → metrics → trace → authorize → local app pool (h2c over loopback); then
           calllog and the trace's ending

Metrics (Prometheus counts) and calllog (access log, taps) only act at a call's end; they
are given ready-made by the process (they belong to it: the admin port and the discovery
stream read them) and are left out when None. So is trace (``layers.trace.Trace``: starts or
continues the call's W3C trace at request headers, so every layer below can note its
decisions on the span); calllog and the trace's ending (``Trace.ending()``) sit after every
other layer, so the log line, the tap event and the span hold what the layers noted up to
the call's end (an ejection, say).

Fault comes right after routing and before timeouts, retries and the balancer, as in Envoy:
an injected abort never reaches an endpoint. Limits come before retry, so a call they refuse
is answered at once and never retried; the retry layer runs timeout and balance again for
each attempt. Outlier detection sits on no call's path: the balancer reports every ended
attempt to it (``on_outcome``) and skips the endpoints it holds out; both share the
per-endpoint and per-upstream state of one ``Upstreams``. Authorize comes last before the
app, so a denied call is still counted, traced and logged (PERMISSION_DENIED, with the
``denied`` span event) and never reaches the app. Later layers slot into these lists;
nothing else needs to know the order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from mesh_common.snapshot import Endpoint, Snapshot

from .http2.pool import Pool
from .http2.relay import Call
from .layers.authorize import Authorize
from .layers.balance import DECAY_S, Balance
from .layers.base import Decision, Layer
from .layers.calllog import CallLog
from .layers.fault import Fault
from .layers.limits import UpstreamLimits
from .layers.metrics import Metrics
from .layers.outlier import OutlierDetection
from .layers.retry import Retry
from .layers.route import Route
from .layers.stats import Stats
from .layers.timeout import Timeout
from .layers.trace import Trace
from .upstream import Upstreams

L = TypeVar("L", bound=Layer)


class Stack:
    """Composes layers around a terminal that returns where the call goes (Finagle's andThen)."""

    def __init__(self, layers: Sequence[Layer], terminal: Callable[[Call], Decision]) -> None:
        self.layers = tuple(layers)
        fn = terminal
        for layer in reversed(self.layers):
            if type(layer).on_request is not Layer.on_request:
                fn = _bind(layer, fn)
        self.on_request: Callable[[Call], Decision] = fn
        # Only the layers that implement a hook are called for it.
        self._on_response = tuple(x.on_response for x in self.layers
                                  if type(x).on_response is not Layer.on_response)
        self._on_end = tuple(x.on_end for x in self.layers if type(x).on_end is not Layer.on_end)

    def on_response(self, call: Call) -> None:
        for hook in self._on_response:
            hook(call)

    def on_end(self, call: Call) -> None:
        for hook in self._on_end:
            hook(call)

    def layer(self, kind: type[L]) -> L | None:
        """The first layer of type ``kind``, or None."""
        for layer in self.layers:
            if isinstance(layer, kind):
                return layer
        return None

    def counters(self) -> dict[str, Any]:
        """Every layer's ``/stats`` sections, merged (computed now, not per call)."""
        out: dict[str, Any] = {}
        for layer in self.layers:
            out.update(layer.counters())
        return out


def _bind(layer: Layer, next_fn: Callable[[Call], Decision]) -> Callable[[Call], Decision]:
    on_request = layer.on_request  # bound once, not per call

    def run(call: Call) -> Decision:
        return on_request(call, next_fn)
    return run


def outbound_stack(snapshot: Callable[[], Snapshot], stats: Stats,
                   endpoint_pool: Callable[[Endpoint, str], Pool],
                   rng: random.Random | None = None, *,
                   clock: Callable[[], float] | None = None,
                   upstreams: Upstreams | None = None, metrics: Metrics | None = None,
                   calllog: CallLog | None = None, trace: Trace | None = None,
                   ewma_decay_s: float = DECAY_S) -> Stack:
    """The outbound path; ``snapshot`` returns the snapshot in force (read once per call by
    each layer that needs it), ``rng`` drives the weighted splits and fault rolls (the
    balancers draw from a generator seeded from it, so a seeded stack is reproducible),
    ``clock`` is the relay's (default: the stats layer's), ``upstreams`` the shared
    per-endpoint and per-upstream state (default: a new one); ``metrics``/``calllog``/
    ``trace`` the process's layers for this direction (None: left out); ``ewma_decay_s`` the
    time constant (seconds, > 0) of the balancer's peak-EWMA latency estimates."""
    pools: dict[int, tuple[Endpoint, Pool]] = {}

    def endpoint(call: Call) -> Decision:
        ep = call.endpoint
        hit = pools.get(id(ep))
        if hit is None or hit[0] is not ep or hit[1].closed:  # closed: retired by a snapshot
            if len(pools) >= 4096:  # endpoints of old snapshots
                pools.clear()
            hit = pools[id(ep)] = (ep, endpoint_pool(ep, call.route))
        return hit[1]
    rng = rng or random.Random()
    clock = clock or stats.clock
    upstreams = upstreams if upstreams is not None else Upstreams()
    # Seeded from rng's state without drawing from it: the route and fault draws stay as
    # they were, and the balancers' draws are not the same numbers as theirs.
    balance_rng = random.Random(hash(rng.getstate()))
    outlier = OutlierDetection(snapshot, upstreams, clock)
    # calllog only observes the end: it comes after outlier detection so the access log and
    # tap carry its notes (ejected, half-open probe) too.
    return Stack([*_present(stats, metrics, trace),
                  Route(snapshot, rng),
                  Fault(snapshot, rng),
                  UpstreamLimits(snapshot, upstreams),
                  Retry(snapshot, random.Random(hash(rng.getstate()) ^ 1), clock),
                  Timeout(snapshot),
                  Balance(snapshot, upstreams, clock, balance_rng, on_outcome=outlier.observe,
                          decay_s=ewma_decay_s),
                  outlier,
                  *_present(calllog, trace.ending() if trace is not None else None)],
                 endpoint)


def inbound_stack(stats: Stats, app_pool: Pool, *, metrics: Metrics | None = None,
                  calllog: CallLog | None = None, trace: Trace | None = None,
                  authorize: Authorize | None = None) -> Stack:
    """The inbound path to the local app (``app_pool``); ``metrics``/``calllog``/``trace``
    as outbound, ``authorize`` the process's authorization layer (None: left out, every
    caller reaches the app)."""
    return Stack(_present(stats, metrics, trace, authorize, calllog,
                          trace.ending() if trace is not None else None), lambda call: app_pool)


def _present(*layers: Layer | None) -> list[Layer]:
    """The layers given, in order, without the Nones."""
    return [x for x in layers if x is not None]
