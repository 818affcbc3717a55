"""Limits: Envoy's circuit-breaking thresholds, per upstream service per sidecar.

For each call to a service (``call.route``), under the service's ``RouteRule.limits`` (the
defaults without a route):

* ``max_requests``: calls in flight. Checked before anything below runs.
* ``max_pending``: calls waiting for a connection in the service's endpoint pools. Checked
  once the endpoint is picked, when its pool cannot take the call at once (no connection
  yet, or calls already waiting).
* ``max_connections``: connections open or opening to the service's endpoints, counted over
  the pools its calls went to. A call that would make its endpoint's pool open a connection
  (the pool has none, none opening) while the service is at the limit is refused; calls
  that fit on connections already open are never refused by it. Pools are not capped.
* ``max_retries``: retries in flight. The retry layer takes and gives back a slot through
  ``call.upstream`` (``take_retry``/``release_retry``); a retry over it is not made.

Over a limit the call is answered at once: UNAVAILABLE "fast-fail: <limit> limit of <n>
reached for <service>", with ``call.fast_fail`` set (it is not retried and never counts
against an endpoint), counted per limit and noted on the call.

A call admitted past ``max_requests`` holds its request slot in ``call.upstream`` until
``on_end`` (the relay ends each call exactly once), whatever answers it; a call refused by
``max_requests`` holds none and has no ``call.upstream``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mesh_common.snapshot import CircuitLimits, Snapshot
from sidecar.http2 import grpc as G
from sidecar.http2.pool import Pool
from sidecar.http2.relay import Call, LocalReply
from sidecar.upstream import LIMIT_NAMES, LimitView, Upstream, Upstreams

from .base import FAST_FAIL, Decision, Layer, Next, note

_DEFAULT = CircuitLimits()


class UpstreamLimits(Layer):
    """Sets ``call.upstream`` (the service's ``Upstream`` in ``upstreams``) and enforces its
    limits (see the module's docstring). Never raises."""

    def __init__(self, snapshot: Callable[[], Snapshot], upstreams: Upstreams) -> None:
        self.snapshot = snapshot
        self.upstreams = upstreams
        self._snap: Snapshot | None = None
        self._by_service: dict[str, Upstream] = {}

    def _build(self, snap: Snapshot) -> None:
        routes = {r.service: r.limits for r in snap.routes}
        names = {c.name for c in snap.clusters} | set(routes)
        self._by_service = {n: self.upstreams.service(n, routes.get(n, _DEFAULT)) for n in names}
        self._snap = snap

    def on_request(self, call: Call, next: Next) -> Decision:
        snap = self.snapshot()
        if snap is not self._snap:
            self._build(snap)
        up = self._by_service.get(call.route)
        if up is None:  # routed, yet not a service of the snapshot: the defaults
            up = self._by_service[call.route] = self.upstreams.service(call.route, _DEFAULT)
        if up.requests >= up.limits.max_requests:
            return self._refuse(call, up, "max_requests")
        up.requests += 1
        call.upstream = up
        decision = next(call)
        if type(decision) is Pool:
            pools = up.pools
            if pools.get(decision.key) is not decision:
                pools[decision.key] = decision
            if decision.waiting or not decision.conns:  # the call would wait for a connection
                if up.pending() >= up.limits.max_pending:
                    return self._refuse(call, up, "max_pending")
                if (not decision.conns and not decision.connecting
                        and up.connections() >= up.limits.max_connections):
                    return self._refuse(call, up, "max_connections")
        return decision

    def on_end(self, call: Call) -> None:
        up = call.upstream
        if up is not None:
            up.requests -= 1

    @staticmethod
    def _refuse(call: Call, up: Upstream, limit: str) -> LocalReply:
        up.fast_fails[limit] += 1
        call.fast_fail = True
        message = up.fast_fail_message(limit)
        note(call, message, FAST_FAIL,
             {"mesh.limit": limit, "mesh.limit.max": getattr(up.limits, limit),
              "mesh.upstream": up.service} if call.span is not None else None)
        return LocalReply(G.UNAVAILABLE, message)

    # ------------------------------------------------------------ reporting
    def limit_views(self) -> tuple[LimitView, ...]:
        """Every limit of every service of the snapshot in force: in use against its max,
        and the fast-fails it caused since start."""
        snap = self.snapshot()
        if snap is not self._snap:
            self._build(snap)
        return tuple(LimitView(name, limit, up.in_use(limit), getattr(up.limits, limit),
                               up.fast_fails[limit])
                     for name, up in sorted(self._by_service.items()) for limit in LIMIT_NAMES)

    def counters(self) -> dict[str, Any]:
        """``{"limits": {service: {limit: {"in_use", "max", "fast_fails"}}}}`` for the
        services of the snapshot in force, ``limit`` one of max_connections, max_pending,
        max_requests, max_retries."""
        out: dict[str, dict[str, Any]] = {}
        for v in self.limit_views():
            out.setdefault(v.upstream, {})[v.limit] = {"in_use": v.in_use, "max": v.max,
                                                        "fast_fails": v.fast_fails}
        return {"limits": out}
