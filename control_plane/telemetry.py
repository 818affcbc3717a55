"""Live state the sidecars report, kept for a short window, and the topology computed from it.

Each sidecar sends a ``StateReport`` every few seconds: per upstream service, the calls by
gRPC status and a latency histogram since its previous report, and its circuit breakers' live
state (per upstream endpoint: outlier detection's state; per upstream: the limits in use).
``Telemetry`` keeps each sidecar's reports for ``window_s`` seconds and computes the topology:
services with their instances and golden signals (the calls made TO them: rps, success rate,
p50/p99 from the merged histograms of their in-edges), and the edges (caller service ->
upstream service) that carried traffic, each with the number of the destination's endpoints
whose breaker the caller's sidecars report OPEN or HALF_OPEN; and each sidecar's latest
breaker state (``breakers``), for as long as the sidecar is in the registry.

Pure: values in, values out, the clock passed in (``now``, unix seconds); no I/O.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from control_plane.registry import NO_APP, Instance, Key

OK = "OK"
OPEN_STATES = frozenset({"OPEN", "HALF_OPEN"})
"""Breaker states that count as open on an edge (``Edge.open_breakers``)."""
MAX_REPORTS_PER_SIDECAR = 512  # the oldest go first; rates stay right (over covered time)
LIMITS = ("max_connections", "max_pending", "max_requests", "max_retries")
_LIMIT_ORDER = {name: i for i, name in enumerate(LIMITS)}


@dataclass(frozen=True)
class Histogram:
    """``counts[i]`` = calls with latency in ``(bounds_ms[i-1], bounds_ms[i]]`` (from 0 for
    ``i = 0``); ``counts[-1]`` = calls above the last bound. ``len(counts) == len(bounds_ms)
    + 1``, bounds strictly increasing and >= 0, counts >= 0 (``valid``)."""

    bounds_ms: tuple[float, ...]
    counts: tuple[int, ...]

    @property
    def valid(self) -> bool:
        b, c = self.bounds_ms, self.counts
        return (len(b) >= 1 and len(c) == len(b) + 1 and all(math.isfinite(x) for x in b)
                and b[0] >= 0 and all(x < y for x, y in zip(b, b[1:], strict=False))
                and all(n >= 0 for n in c))

    @property
    def total(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True)
class UpstreamSample:
    """Calls from one sidecar to one upstream service over one report's interval."""

    service: str
    by_code: Mapping[str, int]
    latency: Histogram | None = None

    @property
    def requests(self) -> int:
        return sum(n for n in self.by_code.values() if n > 0)

    @property
    def ok(self) -> int:
        return max(0, self.by_code.get(OK, 0))


@dataclass(frozen=True)
class EndpointBreaker:
    """Outlier detection's state of one upstream endpoint as one sidecar sees it: ``state``
    CLOSED, OPEN or HALF_OPEN ("" = the sidecar reports none), sick answers in a row, times
    ejected, and seconds from the report until an OPEN endpoint goes HALF_OPEN."""

    upstream: str
    address: str
    instance: str = ""
    state: str = ""
    consecutive_errors: int = 0
    ejections: int = 0
    half_open_in_s: float = 0.0
    last_transition_unix: float = 0.0
    """When the state last changed (unix s); 0 = never."""


@dataclass(frozen=True)
class LimitUse:
    """One circuit limit of one sidecar towards ``upstream``: ``in_use`` against ``max``, and
    the calls it refused since the sidecar started."""

    upstream: str
    limit: str
    in_use: int
    max: int
    fast_fails: int = 0


@dataclass(frozen=True)
class Report:
    """One StateReport as kept: received ``at`` (unix s), covering ``interval_s`` seconds,
    with the sidecar's breakers and limits at that time."""

    at: float
    interval_s: float
    upstreams: tuple[UpstreamSample, ...] = ()
    breakers: tuple[EndpointBreaker, ...] = ()
    limits: tuple[LimitUse, ...] = ()


@dataclass(frozen=True)
class BreakerRow:
    """One row of ``breakers``: sidecar ``service``/``instance`` x its upstream endpoint;
    ``half_open_in_s`` counted down to ``now``; ``reported_at`` when the sidecar said so."""

    service: str
    instance: str
    endpoint: EndpointBreaker
    reported_at: float


@dataclass(frozen=True)
class LimitRow:
    service: str
    instance: str
    limit: LimitUse
    reported_at: float


@dataclass(frozen=True)
class Breakers:
    endpoints: tuple[BreakerRow, ...]
    limits: tuple[LimitRow, ...]


@dataclass(frozen=True)
class TopologyInstance:
    instance: str
    address: str
    healthy: bool


@dataclass(frozen=True)
class TopologyService:
    """A service with its instances and the golden signals of the calls made TO it within
    the window (all 0 when nobody called it): ``rps`` in calls per second, ``success_rate``
    0..1, ``p50_ms``/``p99_ms`` in milliseconds from its in-edges' merged histograms."""

    name: str
    instances: tuple[TopologyInstance, ...]
    requests: int = 0
    rps: float = 0.0
    success_rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0


@dataclass(frozen=True)
class Edge:
    """Traffic from ``source``'s sidecars to ``destination`` within the window. ``rps`` in
    calls per second, ``success_rate`` in 0..1 (OK / all), latencies in milliseconds;
    ``open_breakers`` = endpoints of ``destination`` (distinct addresses) whose breaker is
    OPEN or HALF_OPEN in the latest report of at least one of ``source``'s sidecars."""

    source: str
    destination: str
    requests: int
    rps: float
    success_rate: float
    p50_ms: float
    p99_ms: float
    open_breakers: int = 0


@dataclass(frozen=True)
class Topology:
    services: tuple[TopologyService, ...]
    edges: tuple[Edge, ...]
    window_s: float


def merge_histograms(hists: Iterable[Histogram]) -> Histogram | None:
    """Sum the valid histograms that share the most common bounds (weighted by calls); the
    others are left out (bounds are fixed per sidecar build, so a mix is rare and brief).
    None when there is no valid histogram with calls."""
    by_bounds: dict[tuple[float, ...], list[int]] = {}
    for h in hists:
        if not h.valid or h.total == 0:
            continue
        acc = by_bounds.setdefault(h.bounds_ms, [0] * len(h.counts))
        for i, n in enumerate(h.counts):
            acc[i] += n
    if not by_bounds:
        return None
    bounds, counts = max(by_bounds.items(), key=lambda kv: (sum(kv[1]), kv[0]))
    return Histogram(bounds, tuple(counts))


def percentile_ms(hist: Histogram | None, q: float) -> float:
    """The ``q`` quantile (0..1) of a histogram, in ms: linear within the bucket that holds it
    (the first bucket starts at 0); a quantile above the last bound reports the last bound.
    0.0 for None or an empty histogram."""
    if hist is None or hist.total == 0:
        return 0.0
    q = min(1.0, max(0.0, q))
    rank = q * hist.total
    cum = 0
    for i, n in enumerate(hist.counts):
        if n == 0:
            continue
        if cum + n >= rank:
            if i >= len(hist.bounds_ms):
                return hist.bounds_ms[-1]
            lower = hist.bounds_ms[i - 1] if i > 0 else 0.0
            upper = hist.bounds_ms[i]
            return lower + (upper - lower) * max(0.0, rank - cum) / n
        cum += n
    return hist.bounds_ms[-1]


def instance_healthy(inst: Instance) -> bool:
    """Healthy in the topology: its app is SERVING; an outbound-only sidecar without an app
    (a client, a gateway) has nothing to be unhealthy and counts as healthy."""
    return inst.serving or (inst.health == NO_APP and not inst.inbound)


class Telemetry:
    """Each sidecar's reports of the last ``window_s`` seconds (at most
    ``MAX_REPORTS_PER_SIDECAR`` each)."""

    def __init__(self, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self._reports: dict[Key, deque[Report]] = {}
        self._live: dict[Key, Report] = {}  # each sidecar's latest report (breakers, limits)

    def add(self, key: Key, report: Report) -> None:
        """Keep ``report`` of the sidecar ``key`` = ``(service, instance_id)``; its
        ``interval_s`` is clamped to ``0..window_s`` (a first report may cover a long idle
        time, which would dilute the rate)."""
        interval_s = report.interval_s if math.isfinite(report.interval_s) else 0.0
        interval_s = min(self.window_s, max(0.0, interval_s))
        if interval_s != report.interval_s:
            report = replace(report, interval_s=interval_s)
        self._live[key] = Report(report.at, report.interval_s, (), report.breakers,
                                 report.limits)
        if report.breakers or report.limits:  # the window needs only the call counts
            report = replace(report, breakers=(), limits=())
        q = self._reports.setdefault(key, deque(maxlen=MAX_REPORTS_PER_SIDECAR))
        q.append(report)
        self._expire(key, report.at)

    def forget(self, key: Key) -> None:
        """Drop a sidecar's reports and live state (its instance left the registry)."""
        self._reports.pop(key, None)
        self._live.pop(key, None)

    def breakers(self, now: float, service: str = "") -> Breakers:
        """Each sidecar's latest reported breakers and limits (however old: a sidecar whose
        stream is down keeps its last ones until it leaves the registry), sorted by sidecar,
        upstream, then endpoint or limit; with ``service``, only the rows whose sidecar or
        upstream is that service. ``half_open_in_s`` is counted down from the report to
        ``now`` (at least 0)."""
        eps: list[BreakerRow] = []
        lims: list[LimitRow] = []
        for key in sorted(self._live):
            svc, iid = key
            live = self._live[key]
            elapsed = max(0.0, now - live.at)
            for b in sorted(live.breakers, key=lambda b: (b.upstream, b.instance, b.address)):
                if service and service not in (svc, b.upstream):
                    continue
                left = max(0.0, b.half_open_in_s - elapsed) if b.half_open_in_s > 0 else 0.0
                eps.append(BreakerRow(svc, iid, replace(b, half_open_in_s=left), live.at))
            for lim in sorted(live.limits, key=lambda x: (x.upstream, _LIMIT_ORDER.get(
                    x.limit, len(_LIMIT_ORDER)), x.limit)):
                if service and service not in (svc, lim.upstream):
                    continue
                lims.append(LimitRow(svc, iid, lim, live.at))
        return Breakers(tuple(eps), tuple(lims))

    def _expire(self, key: Key, now: float) -> None:
        q = self._reports.get(key)
        if q is None:
            return
        while q and q[0].at <= now - self.window_s:
            q.popleft()
        if not q:
            del self._reports[key]

    def reports(self, key: Key, now: float) -> list[Report]:
        """The sidecar's reports received within the window ending at ``now``."""
        return [r for r in self._reports.get(key, ()) if now - self.window_s < r.at <= now]

    def edges(self, now: float) -> list[Edge]:
        """The edges that carried calls in the window, by (source, destination).

        Per reporting sidecar, rps = calls in the window / seconds its reports there cover (sum
        of their ``interval_s``); an edge's rps sums its sidecars'. Percentiles come from the
        merged histograms (``merge_histograms``); ``open_breakers`` from the sources' sidecars'
        latest breaker states (``open_breakers``)."""
        open_breakers = self.open_breakers()
        return [_edge(source, dest, e, open_breakers.get((source, dest), 0))
                for (source, dest), e in sorted(self._edge_accs(now).items())]

    def open_breakers(self) -> dict[tuple[str, str], int]:
        """(source service, destination service) -> distinct endpoints of the destination that
        some sidecar of the source reports OPEN or HALF_OPEN in its latest report."""
        seen: dict[tuple[str, str], set[str]] = {}
        for (service, _), live in self._live.items():
            for b in live.breakers:
                if b.state in OPEN_STATES:
                    seen.setdefault((service, b.upstream), set()).add(b.address)
        return {k: len(v) for k, v in seen.items()}

    def _edge_accs(self, now: float) -> dict[tuple[str, str], _EdgeAcc]:
        for key in list(self._reports):
            self._expire(key, now)
        acc: dict[tuple[str, str], _EdgeAcc] = {}
        for key in sorted(self._reports):
            service = key[0]
            reports = self.reports(key, now)
            covered_s = sum(r.interval_s for r in reports)
            per_dest: dict[str, int] = {}
            for r in reports:
                for up in r.upstreams:
                    n = up.requests
                    if n <= 0:
                        continue
                    e = acc.setdefault((service, up.service), _EdgeAcc())
                    e.requests += n
                    e.ok += min(up.ok, n)
                    if up.latency is not None:
                        e.hists.append(up.latency)
                    per_dest[up.service] = per_dest.get(up.service, 0) + n
            for dest, n in per_dest.items():
                if covered_s > 0:
                    acc[(service, dest)].rps += n / covered_s
        return acc

    def topology(self, instances: Iterable[Instance], now: float) -> Topology:
        """Services (by name) with their instances (by id) and golden signals
        (``golden_signals`` of their in-edges), and the edges of ``edges(now)``. A service
        that is called but has no instance in the registry is not listed (its edges are)."""
        by_service: dict[str, list[TopologyInstance]] = {}
        for inst in sorted(instances, key=lambda i: i.key):
            by_service.setdefault(inst.service, []).append(
                TopologyInstance(inst.instance_id, inst.inbound, instance_healthy(inst)))
        accs = self._edge_accs(now)
        open_breakers = self.open_breakers()
        inbound: dict[str, list[_EdgeAcc]] = {}
        for (_, dest), e in accs.items():
            inbound.setdefault(dest, []).append(e)
        services = tuple(replace(golden_signals(name, inbound.get(name, ())),
                                 instances=tuple(insts))
                         for name, insts in sorted(by_service.items()))
        edges = tuple(_edge(source, dest, e, open_breakers.get((source, dest), 0))
                      for (source, dest), e in sorted(accs.items()))
        return Topology(services, edges, self.window_s)


def _edge(source: str, dest: str, e: _EdgeAcc, open_breakers: int) -> Edge:
    merged = merge_histograms(e.hists)
    return Edge(source, dest, e.requests, e.rps, e.ok / e.requests if e.requests else 0.0,
                percentile_ms(merged, 0.5), percentile_ms(merged, 0.99), open_breakers)


def golden_signals(name: str, in_edges: Iterable[_EdgeAcc]) -> TopologyService:
    """The golden signals of the calls TO service ``name`` (no instances filled in): requests
    and rps summed over its in-edges, success rate = OK / all, and p50/p99 from ONE
    histogram merged from every in-edge's histograms (``merge_histograms``), never an
    average of the edges' percentiles. All 0 without calls. Pure."""
    requests = ok = 0
    rps = 0.0
    hists: list[Histogram] = []
    for e in in_edges:
        requests += e.requests
        ok += e.ok
        rps += e.rps
        hists += e.hists
    if requests <= 0:
        return TopologyService(name, ())
    merged = merge_histograms(hists)
    return TopologyService(name, (), requests, rps, ok / requests,
                           percentile_ms(merged, 0.5), percentile_ms(merged, 0.99))


class _EdgeAcc:
    __slots__ = ("requests", "ok", "rps", "hists")

    def __init__(self) -> None:
        self.requests = 0
        self.ok = 0
        self.rps = 0.0
        self.hists: list[Histogram] = []
