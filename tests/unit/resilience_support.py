"""A sans-IO outbound path for the resilience tests: route → limits → balance, with outlier
detection fed by the balancer, a fake clock and fake endpoint pools; the test plays the
relay (it starts calls, answers them and ends them)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from mesh_common.limits import Limits
from mesh_common.snapshot import (
    CircuitLimits,
    Cluster,
    Destination,
    Endpoint,
    OutlierPolicy,
    RouteMatch,
    RouteRule,
    Rule,
    Snapshot,
)
from sidecar.http2.connection import H2Connection
from sidecar.http2.headers import HeaderReader, encode_block
from sidecar.http2.pool import Pool
from sidecar.http2.relay import Call, LocalReply
from sidecar.layers.balance import Balance
from sidecar.layers.limits import UpstreamLimits
from sidecar.layers.outlier import OutlierDetection
from sidecar.layers.route import Route
from sidecar.stack import Stack
from sidecar.upstream import Upstreams

TD = "mesh.local"
SAY = "/echo.Echo/Say"
WALL_OFFSET_S = 1_700_000_000.0
_DOWN = H2Connection(client=False, limits=Limits())
_BLOCKS: dict[str, Any] = {}


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ep(i: int, healthy: bool = True, service: str = "echo", **labels: str) -> Endpoint:
    return Endpoint(f"10.0.0.{i}", 15006, f"spiffe://{TD}/service/{service}", f"{service}-{i}",
                    tuple(sorted(labels.items())), healthy)


def snapshot(endpoints: tuple[Endpoint, ...], *, lb: str = "peak_ewma",
             outlier: OutlierPolicy | None = None, limits: CircuitLimits | None = None,
             subset: dict[str, str] | None = None, version: str = "1",
             route: bool = True) -> Snapshot:
    """One service ``echo`` over ``endpoints`` (with a route naming the balancer, the
    outlier policy and the limits, unless ``route`` is False: the defaults); ``subset``: one
    rule sending every call to the endpoints with those labels."""
    rules = ()
    if subset is not None:
        rules = (Rule("sub", RouteMatch(), (Destination(tuple(sorted(subset.items())), 100),)),)
    routes = (RouteRule("echo", "echo", rules, None, lb, outlier=outlier or OutlierPolicy(),
                        limits=limits or CircuitLimits()),) if route else ()
    return Snapshot(version, clusters=(Cluster("echo", endpoints),), routes=routes)


class FakePool:
    """What the endpoint terminal returns: one ready connection, nobody waiting."""

    closed = False

    def __init__(self, endpoint: Endpoint) -> None:
        self.ep = endpoint
        self.key = self.label = endpoint.address
        self.conns = [object()]
        self.waiting: list[Any] = []
        self.connecting = 0


class Mesh:
    """The layers under test over a snapshot that tests may swap (``self.snap``)."""

    def __init__(self, snap: Snapshot, seed: int = 1, real_pools: bool = False) -> None:
        self.snap = snap
        self.clock = Clock()
        self.upstreams = Upstreams()
        self.outlier = OutlierDetection(lambda: self.snap, self.upstreams, self.clock,
                                        wall_clock=lambda: WALL_OFFSET_S + self.clock.now)
        self.balance = Balance(lambda: self.snap, self.upstreams, self.clock,
                               random.Random(seed), on_outcome=self.outlier.observe)
        self.limits = UpstreamLimits(lambda: self.snap, self.upstreams)
        self.real_pools = real_pools
        self.pools: dict[str, Any] = {}
        self.stack = Stack([Route(lambda: self.snap, random.Random(seed)), self.limits,
                            self.balance, self.outlier], self._pool)

    def _pool(self, call: Call) -> Any:
        e = call.endpoint
        pool = self.pools.get(e.address)
        if pool is None:
            pool = self.pools[e.address] = (Pool(e.address, e.address, 4, lambda p: None)
                                            if self.real_pools else FakePool(e))
        return pool

    def start(self, authority: str = "echo",
              tried: tuple[Endpoint, ...] = ()) -> tuple[Call, Any]:
        """A new call (``tried``: as if earlier attempts went there), decided; a pool
        decision is bound to the call as the relay does."""
        block = _BLOCKS.get(authority)
        if block is None:
            block = _BLOCKS[authority] = HeaderReader(1 << 16).read(encode_block(
                [(":method", "POST"), (":scheme", "http"), (":path", SAY),
                 (":authority", authority), ("content-type", "application/grpc"),
                 ("te", "trailers")]))
        call = Call(_DOWN, 1, block, None, self.clock.now)
        call.tried = tried
        decision = self.stack.on_request(call)
        if isinstance(decision, LocalReply):
            call.local_reply = decision
            call.grpc_status = decision.status
        else:
            call.pool = decision
        return call, decision

    def end(self, call: Call, status: int | None = 0) -> None:
        """The call ends now with ``status`` (None: no status, e.g. the caller cancelled);
        a call answered locally keeps its local status."""
        if call.local_reply is None:
            call.grpc_status = status
        self.stack.on_end(call)

    def one(self, latency_s: dict[str, float] | None = None,
            status: dict[str, int] | None = None, default_latency_s: float = 0.01) -> str:
        """One call, answered after its endpoint's latency with its endpoint's status (by
        address; defaults 10 ms and OK); returns the address it went to ("" if none)."""
        call, decision = self.start()
        if isinstance(decision, LocalReply):
            self.end(call)
            return ""
        address = call.endpoint.address
        self.clock.now += (latency_s or {}).get(address, default_latency_s)
        self.end(call, (status or {}).get(address, 0))
        return address

    def spread(self, n: int, **kw: Any) -> Counter[str]:
        return Counter(self.one(**kw) for _ in range(n))

    def state(self, endpoint: Endpoint) -> Any:
        return self.upstreams.endpoint(endpoint.address, self.clock.now)

    def breaker(self, endpoint: Endpoint) -> Any:
        return self.state(endpoint).outlier
