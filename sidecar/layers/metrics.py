"""Metrics: counts every ended call by (source service, destination service, method label,
gRPC code) with a latency histogram of the same labels, for Prometheus (``sidecar.metrics``
turns the counts into ``mesh_requests_total`` and ``mesh_request_duration_seconds`` at
scrape time; nothing here knows prometheus_client).

One layer per direction:

* outbound: source = this sidecar's service, destination = the routed service
  (``call.route``; ``unknown`` when the call was not routed);
* inbound: source = the service of the caller's SPIFFE ID (``call.peer_id``, parsed once per
  peer id; ``unknown`` when it has none or it does not parse), destination = this service.

**The method label is capped**, so a hostile caller cannot explode the number of series by
calling made-up methods. A call's label is its gRPC path only when the method is *known* for
its destination service, else ``other``. Known means either

* an exact method match (``match.method`` of kind ``exact``) in a rule of the route for that
  service in the snapshot in force, or
* a method the destination really answered: an upstream response (not a reply the sidecar
  made itself, ``call.local_reply is None``) with a grpc-status other than UNIMPLEMENTED.
  At most ``MAX_LEARNED_METHODS`` (64) methods are learned per destination service, kept
  for the life of the process; once full, other methods are ``other``.

Unknown gRPC codes (above 16) are counted as UNKNOWN, a call that ended without a status as
RESET.

Per ended call (the hot path): one clock read, two dict gets to label the method (a third,
and a set insert, the first time a method is learned), one tuple key, one dict get and three
increments. Names, cumulative buckets and seconds are computed only at scrape time.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import NamedTuple

from mesh_common.snapshot import Snapshot
from mesh_common.spiffe import SpiffeError, SpiffeId
from sidecar.http2 import grpc as G
from sidecar.http2.relay import Call

from .base import Layer, ended_s
from .stats import LATENCY_BOUNDS_MS, status_name

MAX_LEARNED_METHODS = 64
"""Methods learned from answers, per destination service; more fold into ``other``."""
OTHER = "other"
UNKNOWN_SERVICE = "unknown"
OUTBOUND, INBOUND = "outbound", "inbound"
_MAX_PEERS = 4096
"""Peer ids whose service is cached (the cache starts over when full)."""
_MAX_CODE = 16
_UNIMPLEMENTED = G.UNIMPLEMENTED
_N_BUCKETS = len(LATENCY_BOUNDS_MS) + 1
_EMPTY: frozenset[str] = frozenset()


class Series(NamedTuple):
    """One labelled series as counted since start (what the collector exports)."""

    source: str
    destination: str
    method: str
    """The gRPC path, or ``other``."""
    code: str
    """gRPC status name (OK, UNAVAILABLE, ...; RESET when the call ended without one)."""
    count: int
    sum_ms: float
    buckets: tuple[int, ...]
    """Calls per latency bucket (not cumulative): ``buckets[i]`` counts the calls with
    ``LATENCY_BOUNDS_MS[i-1] < latency_ms <= LATENCY_BOUNDS_MS[i]``; the last one those above
    the last bound."""


def peer_service(peer_id: str | None) -> str:
    """The service of a SPIFFE ID (``spiffe://td/service/<name>``), or ``unknown``."""
    if not peer_id:
        return UNKNOWN_SERVICE
    try:
        return SpiffeId.parse(peer_id).service
    except SpiffeError:
        return UNKNOWN_SERVICE


def exact_methods(snapshot: Snapshot) -> dict[str, frozenset[str]]:
    """Per routed service of ``snapshot``: the exact methods its route's rules name."""
    out: dict[str, frozenset[str]] = {}
    for route in snapshot.routes:
        names = frozenset(r.match.method.value for r in route.rules
                          if r.match.method is not None and r.match.method.kind == "exact")
        if names:
            out[route.service] = names
    return out


class Metrics(Layer):
    """Counts the calls of one direction (``outbound`` or ``inbound``) of the sidecar of
    ``service``; ``snapshot`` returns the snapshot in force (its routes' exact methods are
    known methods), ``clock`` is the relay's clock (seconds, the one ``call.started_s`` was
    read from). Never raises for any call."""

    def __init__(self, direction: str, service: str, snapshot: Callable[[], Snapshot],
                 clock: Callable[[], float] = time.monotonic) -> None:
        if direction not in (OUTBOUND, INBOUND):
            raise ValueError(f"direction must be {OUTBOUND} or {INBOUND}, got {direction!r}")
        self.direction = direction
        self.service = service
        self.snapshot = snapshot
        self.clock = clock
        self._snap: Snapshot | None = None
        self._routed: dict[str, frozenset[str]] = {}
        self._learned: dict[str, set[str]] = {}
        self._peers: dict[str | None, str] = {}
        # (source, destination, method label, code) -> [count, sum_ms, bucket counts...]
        self._series: dict[tuple[str, str, str, int | None], list[float]] = {}
        self.on_end = self._outbound if direction == OUTBOUND else self._inbound  # type: ignore[method-assign]

    def on_end(self, call: Call) -> None:  # replaced per instance by the direction's
        (self._outbound if self.direction == OUTBOUND else self._inbound)(call)

    def _outbound(self, call: Call) -> None:
        self._count(call, self.service, call.route or UNKNOWN_SERVICE)

    def _inbound(self, call: Call) -> None:
        peer = call.peer_id
        source = self._peers.get(peer)
        if source is None:
            if len(self._peers) >= _MAX_PEERS:
                self._peers.clear()
            source = self._peers[peer] = peer_service(peer)
        self._count(call, source, self.service)

    def _count(self, call: Call, source: str, destination: str) -> None:
        latency_ms = (ended_s(call, self.clock) - call.started_s) * 1e3
        code = call.grpc_status
        if code is not None and not 0 <= code <= _MAX_CODE:
            code = G.UNKNOWN
        path = call.path
        learned = self._learned.get(destination)
        if learned is not None and path in learned:
            method = path
        else:
            method = self._label(call, destination, path, code)
        key = (source, destination, method, code)
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = [0, 0.0] + [0] * _N_BUCKETS
        s[0] += 1
        s[1] += latency_ms
        s[2 + bisect_left(LATENCY_BOUNDS_MS, latency_ms)] += 1

    def _label(self, call: Call, destination: str, path: str, code: int | None) -> str:
        """A method not learned yet: routed, learned now, or ``other``."""
        snap = self.snapshot()
        if snap is not self._snap:
            self._routed = exact_methods(snap)
            self._snap = snap
        if path in self._routed.get(destination, _EMPTY):
            return path
        if code is None or code == _UNIMPLEMENTED or call.local_reply is not None or not path:
            return OTHER
        learned = self._learned.get(destination)
        if learned is None:
            learned = self._learned[destination] = set()
        if len(learned) >= MAX_LEARNED_METHODS:
            return OTHER
        learned.add(path)
        return path

    # ------------------------------------------------------------ reporting
    def series(self) -> Iterator[Series]:
        """Every series counted since start (computed now, never per call)."""
        for (source, destination, method, code), s in list(self._series.items()):
            yield Series(source, destination, method, status_name(code), int(s[0]), s[1],
                         tuple(int(n) for n in s[2:]))

    def learned_methods(self) -> dict[str, frozenset[str]]:
        """Per destination service, the methods learned from its answers."""
        return {d: frozenset(m) for d, m in self._learned.items()}
