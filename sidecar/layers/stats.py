"""Stats: counts calls by outcome for the admin ``/stats`` page, and the per-upstream and
per-endpoint deltas the sidecar reports to the control plane (``take_report``).

Per ended call (the hot path) this is a few dict gets, one clock read, one bisect and a few
increments; nothing is allocated per call beyond the latency float. Status names, sums and
the report's shape are computed only when someone asks (``snapshot``, ``take_report``).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from sidecar.http2 import grpc as G
from sidecar.http2.relay import Call

from .base import Layer, ended_s

_NAMES = G.STATUS_NAMES

LATENCY_BOUNDS_MS: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
                                        1000.0, 2500.0, 5000.0, 10000.0)
"""Upper bounds (inclusive, ms) of the latency histogram's buckets; one more bucket counts the
calls above the last bound."""

_ZEROS = [0] * (len(LATENCY_BOUNDS_MS) + 1)


def status_name(code: int | None) -> str:
    """The gRPC status name of ``code``; RESET when the call ended without a status."""
    return "RESET" if code is None else _NAMES.get(code, str(code))


def latency_bucket(latency_ms: float) -> int:
    """Index of the histogram bucket for ``latency_ms``: the first bound >= it, or
    ``len(LATENCY_BOUNDS_MS)`` above the last bound."""
    return bisect_left(LATENCY_BOUNDS_MS, latency_ms)


class UpstreamReport(NamedTuple):
    """Calls to one upstream service in a report's interval."""

    by_code: dict[str, int]
    """gRPC status name (RESET when none) -> calls."""
    latency_counts: tuple[int, ...]
    """Histogram over ``LATENCY_BOUNDS_MS``: ``len(LATENCY_BOUNDS_MS) + 1`` counts."""

    @property
    def calls(self) -> int:
        return sum(self.by_code.values())


class EndpointReport(NamedTuple):
    """Calls whose last attempt went to one endpoint address in a report's interval."""

    requests: int
    failures: int
    """Of ``requests``, those that did not end OK."""


@dataclass(frozen=True)
class StatsReport:
    """What happened since the previous ``take_report``: only upstreams and endpoints that
    carried calls appear."""

    interval_s: float
    upstreams: Mapping[str, UpstreamReport]
    endpoints: Mapping[str, EndpointReport]
    """Keyed by the endpoint's address (``HOST:PORT``, ``[v6]:PORT``)."""
    bounds_ms: tuple[float, ...] = LATENCY_BOUNDS_MS


class _Upstream:
    __slots__ = ("by_code", "latency", "total")

    def __init__(self) -> None:
        self.by_code: dict[int | None, int] = {}  # since the last report
        self.latency: list[int] = list(_ZEROS)     # since the last report
        self.total = 0                             # since start (``by_route``)


class _EndpointCounts:
    __slots__ = ("endpoint", "requests", "failures")

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint
        self.requests = 0
        self.failures = 0


class Stats(Layer):
    """Counts ended calls: ``by_status`` (gRPC status name, RESET when none was seen) and
    ``by_route`` since start; per routed upstream service the calls by status and a latency
    histogram, and per endpoint requests and failures, since the last ``take_report``.

    ``clock`` is the relay's clock (seconds, the one ``call.started_s`` was read from):
    latency is from the call's start to its end.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._by_code: dict[int | None, int] = {}
        self._upstreams: dict[str, _Upstream] = {}
        # Keyed by id(endpoint): the entry holds the endpoint, so the id cannot be reused while
        # the entry lives (and hashing the frozen dataclass per call would cost more).
        self._endpoints: dict[int, _EndpointCounts] = {}
        self._reported_at = clock()

    def on_end(self, call: Call) -> None:
        code = call.grpc_status
        by_code = self._by_code
        by_code[code] = by_code.get(code, 0) + 1
        route = call.route
        if not route:
            return
        up = self._upstreams.get(route)
        if up is None:
            up = self._upstreams[route] = _Upstream()
        up.total += 1
        by_code = up.by_code
        by_code[code] = by_code.get(code, 0) + 1
        up.latency[bisect_left(LATENCY_BOUNDS_MS, (ended_s(call, self.clock) - call.started_s) * 1e3)] += 1
        ep = call.endpoint
        if ep is not None:
            counts = self._endpoints.get(id(ep))
            if counts is None:
                counts = self._endpoints[id(ep)] = _EndpointCounts(ep)
            counts.requests += 1
            if code != 0:
                counts.failures += 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Totals since start, for ``/stats``: ``by_status`` and ``by_route``."""
        return {"by_status": {status_name(c): n for c, n in self._by_code.items()},
                "by_route": {r: up.total for r, up in self._upstreams.items() if up.total}}

    def take_report(self) -> StatsReport:
        """The deltas since the previous call (or since start), and start new ones."""
        now = self.clock()
        interval_s = max(0.0, now - self._reported_at)
        self._reported_at = now
        upstreams: dict[str, UpstreamReport] = {}
        for route, up in self._upstreams.items():
            if up.by_code:
                upstreams[route] = UpstreamReport(
                    {status_name(c): n for c, n in up.by_code.items()}, tuple(up.latency))
                up.by_code = {}
                up.latency[:] = _ZEROS
        endpoints: dict[str, EndpointReport] = {}
        for counts in self._endpoints.values():
            address = counts.endpoint.address
            prev = endpoints.get(address)  # the same address in several snapshots' endpoints
            endpoints[address] = EndpointReport(
                counts.requests + (prev.requests if prev else 0),
                counts.failures + (prev.failures if prev else 0))
        self._endpoints = {}  # also lets go of the endpoints of replaced snapshots
        return StatsReport(interval_s, upstreams, endpoints)
