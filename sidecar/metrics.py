"""The sidecar's ``/metrics``: Prometheus text format through prometheus_client.

``SidecarCollector`` is a custom collector: nothing is counted in prometheus_client objects
on the data path; at each scrape it reads what the sidecar already counts and yields metric
families (Prometheus naming, base units):

* ``mesh_requests_total{direction,source,destination,method,grpc_code}`` and
  ``mesh_request_duration_seconds`` (histogram, same labels; buckets
  ``sidecar.layers.stats.LATENCY_BOUNDS_MS`` in seconds), from each direction's ``Metrics``
  layer (the method label is capped: see ``sidecar.layers.metrics``);
* ``mesh_retries_total{destination,reason}`` (the retry layer's retries by reason: a status
  name, refused_stream, goaway, connect_failure, connection_lost, per_try_timeout);
* ``mesh_fast_fails_total{destination,limit}`` (calls, or retries for max_retries, refused by
  a circuit limit);
* ``mesh_outlier_ejections_total{destination,endpoint}`` and
  ``mesh_breaker_state{destination,endpoint,state}`` (1 for the breaker's state, 0 for the
  two others; ``destination`` is the endpoint's cluster), for the endpoints of the snapshot
  in force;
* ``mesh_authz_decisions_total{decision,policy,mode}`` (the inbound side's authorization:
  ``allow``/``deny``, the policy that decided, ``(default)`` for the mesh default or ``(no
  rule)`` when the service's ALLOW rules matched nothing, and ``enforce``/``dry_run``; from
  ``sidecar.layers.authorize``);
* ``mesh_tls_handshakes_total`` and ``mesh_tls_handshake_failures_total{reason}`` (the
  inbound listener's, by reason: ``certificate_expired`` / ``certificate_not_yet_valid``
  for a peer certificate outside its validity, else OpenSSL's reason; failures that never
  reached the handshake's verdict as ``other``);
* ``mesh_connections_refused_total{listener,reason}``: connections the ``inbound`` and
  ``outbound`` listeners refused: at accept (``max_connections_per_peer``,
  ``max_connections``: counted from accept, handshakes in progress included), for a TLS
  handshake or HTTP/2 preface not done within the handshake timeout (``handshake_timeout``),
  and after the handshake (``revoked``: the peer's certificate serial is in the snapshot's
  deny-list; ``foreign_trust_domain``, ``no_spiffe_id``, ``no_alpn_h2``, ...); and as
  ``listener="upstream"`` upstream endpoints the sidecar refused (``revoked``,
  ``wrong_identity``, ``no_alpn_h2``);
* ``mesh_connections_terminated_total{listener,reason}``: connections the sidecar ended for
  the peer's misbehaviour: the HTTP/2 core's error kind (``rapid_reset``, ``control_flood``,
  ``empty_frame_flood``, ``continuation_flood``, ``header_block_too_large``, ``frame_size``,
  ``bad_hpack``, ``bad_preface``, ``flow_control``, ``protocol_error``) or ``stall`` (no
  flow-control window opened for ``stall_timeout_s`` while DATA waited); ``listener`` is
  ``inbound``/``outbound`` for downstream connections, ``upstream`` for the sidecar's own
  connections to endpoints and local apps;
* ``mesh_calls_refused_total{listener,reason}``: single calls refused by a limit:
  ``message_too_large`` (either way), ``header_list_too_large`` (request or response
  headers), ``pending_calls`` (``max_pending_calls`` waiting already),
  ``max_concurrent_streams`` (streams refused with REFUSED_STREAM);
* ``mesh_upstream_tls_failures_total{reason}``: failed handshakes to upstream endpoints
  (``certificate_expired`` when the endpoint's certificate has expired);
* ``mesh_active_calls{direction}``;
* ``mesh_certificate_expiry_timestamp_seconds`` (Unix seconds; absent when unreadable);
* ``mesh_snapshot_version`` (the version as a number, absent when it is not digits) and
  ``mesh_snapshot_info{version,hash}`` = 1.

Served by ``metrics_page`` with the sidecar's own ``CollectorRegistry`` (never the global
one) as ``text/plain; version=0.0.4; charset=utf-8``. This module is imported on the first
scrape only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from .admin import Raw
from .layers.authorize import Authorize
from .layers.limits import UpstreamLimits
from .layers.metrics import Metrics
from .layers.outlier import CLOSED, HALF_OPEN, OPEN, OutlierDetection
from .layers.retry import Retry
from .layers.stats import LATENCY_BOUNDS_MS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BREAKER_STATES = (CLOSED, OPEN, HALF_OPEN)
REQUEST_LABELS = ("direction", "source", "destination", "method", "grpc_code")
_LE = tuple(floatToGoString(b / 1000) for b in LATENCY_BOUNDS_MS) + ("+Inf",)


class _Listener(Protocol):
    name: str
    handshakes: int
    handshake_failures: int
    rejected: dict[str, int]
    terminated: dict[str, int]
    """Reason -> connections ended for the peer's misbehaviour (may be absent: none)."""
    refused_calls: Mapping[str, int]
    """Reason -> calls refused by a limit (may be absent: none)."""


class SidecarView(Protocol):
    """What the collector reads of a ``sidecar.process.Sidecar``."""

    boot: Any
    """``.service``: this sidecar's service."""
    snapshot: Any
    """The snapshot in force: ``.version``, ``.content_hash()``."""
    stacks: Mapping[str, Any]
    """Direction -> ``Stack`` (``.layer(kind)``)."""
    relays: Mapping[str, Any]
    """Direction -> relay (``.active``: calls in flight)."""
    inbound: _Listener | None
    outbound: _Listener | None
    tls_failures: Mapping[str, int]
    tracer: Any
    """The span exporter (``sidecar.tracing.Tracer``: ``.stats()``), or None."""
    traces: Mapping[str, Any]
    """Direction -> trace layer (``.sampled``: calls that got a span)."""

    def cert_not_after(self) -> float | None: ...


class SidecarCollector:
    """A prometheus_client collector over one sidecar (see the module's docstring)."""

    def __init__(self, sidecar: SidecarView) -> None:
        self.sidecar = sidecar

    def describe(self) -> list[Metric]:
        return []  # registering must not scrape

    def collect(self) -> Iterator[Metric]:
        sc = self.sidecar
        yield from self._requests()
        outbound = sc.stacks.get("outbound")
        retry = outbound.layer(Retry) if outbound is not None else None
        limits = outbound.layer(UpstreamLimits) if outbound is not None else None
        outlier = outbound.layer(OutlierDetection) if outbound is not None else None

        retries = CounterMetricFamily("mesh_retries", "Retries made by the mesh, by reason.",
                                      labels=("destination", "reason"))
        if retry is not None:
            for service, row in sorted(retry.counters().get("retries", {}).items()):
                for reason, n in sorted(row.get("retried", {}).items()):
                    retries.add_metric((service, reason), n)
        yield retries

        fast = CounterMetricFamily("mesh_fast_fails", "Calls (retries for max_retries) "
                                   "refused at once by a circuit limit.",
                                   labels=("destination", "limit"))
        if limits is not None:
            for v in limits.limit_views():
                fast.add_metric((v.upstream, v.limit), v.fast_fails)
        yield fast

        ejections = CounterMetricFamily("mesh_outlier_ejections", "Times outlier detection "
                                        "ejected an endpoint.",
                                        labels=("destination", "endpoint"))
        breaker = GaugeMetricFamily("mesh_breaker_state", "Outlier detection state per "
                                    "endpoint: 1 for the current state, 0 for the others.",
                                    labels=("destination", "endpoint", "state"))
        if outlier is not None:
            for cluster, rows in sorted(outlier.counters().get("breakers", {}).items()):
                for address, row in sorted(rows.items()):
                    ejections.add_metric((cluster, address), row.get("ejections", 0))
                    for state in BREAKER_STATES:
                        breaker.add_metric((cluster, address, state),
                                           1.0 if row.get("state") == state else 0.0)
        yield ejections
        yield breaker
        yield self._authz()

        inbound = sc.inbound
        handshakes = inbound.handshakes if inbound is not None else 0
        yield CounterMetricFamily("mesh_tls_handshakes", "TLS handshakes completed on the "
                                  "inbound listener.", value=handshakes)
        failures = CounterMetricFamily("mesh_tls_handshake_failures", "TLS handshakes that "
                                       "failed, by reason.", labels=("reason",))
        by_reason = dict(sc.tls_failures)
        for reason, n in sorted(by_reason.items()):
            failures.add_metric((reason,), n)
        unexplained = (inbound.handshake_failures if inbound is not None else 0) - sum(
            by_reason.values())
        if unexplained > 0:
            failures.add_metric(("other",), unexplained)
        yield failures

        refused = CounterMetricFamily("mesh_connections_refused", "Connections refused after "
                                      "accept, by listener and reason.",
                                      labels=("listener", "reason"))
        for listener in (sc.inbound, sc.outbound):
            if listener is not None:
                for reason, n in sorted(listener.rejected.items()):
                    refused.add_metric((listener.name, reason), n)
        connectors: Mapping[str, Any] = getattr(sc, "connectors", {})
        upstream = connectors.get("outbound")
        if upstream is not None:
            for reason, n in sorted(upstream.refused.items()):
                refused.add_metric(("upstream", reason), n)
        yield refused
        yield from self._terminated_and_refused_calls(connectors)
        upstream_tls = CounterMetricFamily("mesh_upstream_tls_failures", "TLS handshakes to "
                                           "upstream endpoints that failed, by reason.",
                                           labels=("reason",))
        if upstream is not None:
            for reason, n in sorted(upstream.tls_failures.items()):
                upstream_tls.add_metric((reason,), n)
        yield upstream_tls

        active = GaugeMetricFamily("mesh_active_calls", "Calls in flight.",
                                   labels=("direction",))
        for direction, relay in sorted(sc.relays.items()):
            active.add_metric((direction,), relay.active)
        yield active

        expiry = GaugeMetricFamily("mesh_certificate_expiry_timestamp_seconds",
                                   "When this sidecar's certificate expires (Unix seconds).")
        not_after = sc.cert_not_after()
        if not_after is not None:
            expiry.add_metric((), not_after)
        yield expiry

        snap = sc.snapshot
        version = str(snap.version)
        number = GaugeMetricFamily("mesh_snapshot_version", "The version of the snapshot in "
                                   "force, as a number (absent when it is not digits).")
        if version.isascii() and version.isdigit():
            number.add_metric((), float(version))
        yield number
        info = GaugeMetricFamily("mesh_snapshot_info", "The snapshot in force: version and "
                                 "content hash.", labels=("version", "hash"))
        info.add_metric((version, snap.content_hash()), 1.0)
        yield info
        yield from self._spans()

    def _terminated_and_refused_calls(self, connectors: Mapping[str, Any]) -> Iterator[Metric]:
        sc = self.sidecar
        terminated = CounterMetricFamily("mesh_connections_terminated", "Connections the "
                                         "sidecar ended for the peer's misbehaviour, by "
                                         "listener and reason.", labels=("listener", "reason"))
        calls = CounterMetricFamily("mesh_calls_refused", "Calls refused by a limit, by "
                                    "listener and reason.", labels=("listener", "reason"))
        for listener in (sc.inbound, sc.outbound):
            if listener is None:
                continue
            for reason, n in sorted(getattr(listener, "terminated", {}).items()):
                terminated.add_metric((listener.name, reason), n)
            for reason, n in sorted(getattr(listener, "refused_calls", {}).items()):
                calls.add_metric((listener.name, reason), n)
        upstream: dict[str, int] = {}
        for connector in connectors.values():
            for reason, n in getattr(connector, "terminated", {}).items():
                upstream[reason] = upstream.get(reason, 0) + n
        for reason, n in sorted(upstream.items()):
            terminated.add_metric(("upstream", reason), n)
        yield terminated
        yield calls

    def _authz(self) -> Metric:
        decisions = CounterMetricFamily("mesh_authz_decisions", "Inbound authorization "
                                        "decisions, by decision, deciding policy and mode "
                                        "(dry_run: counted, never enforced).",
                                        labels=("decision", "policy", "mode"))
        inbound = self.sidecar.stacks.get("inbound")
        layer = inbound.layer(Authorize) if inbound is not None else None
        if layer is not None:
            for decision, policy, mode, n in layer.counts():
                decisions.add_metric((decision, policy, mode), n)
        return decisions

    def _spans(self) -> Iterator[Metric]:
        sampled = CounterMetricFamily("mesh_spans_sampled", "Calls that got a span, by "
                                      "direction.", labels=("direction",))
        for direction, trace in sorted(self.sidecar.traces.items()):
            sampled.add_metric((direction,), trace.sampled)
        yield sampled
        tracer = self.sidecar.tracer
        if tracer is None:
            return
        st = tracer.stats()
        yield CounterMetricFamily("mesh_spans_exported", "Spans the OTLP exporter delivered.",
                                  value=st["spans_exported"])
        dropped = CounterMetricFamily("mesh_spans_dropped", "Spans lost, by reason.",
                                      labels=("reason",))
        dropped.add_metric(("export_failed",), st["spans_dropped"])
        dropped.add_metric(("queue_full",), st["spans_dropped_queue_full"])
        yield dropped

    def _requests(self) -> Iterator[Metric]:
        total = CounterMetricFamily("mesh_requests", "Calls ended, by direction, source and "
                                    "destination service, method and gRPC status.",
                                    labels=REQUEST_LABELS)
        duration = HistogramMetricFamily("mesh_request_duration_seconds", "Call latency, "
                                         "from request headers to the call's end.",
                                         labels=REQUEST_LABELS)
        for direction, stack in sorted(self.sidecar.stacks.items()):
            layer = stack.layer(Metrics)
            if layer is None:
                continue
            for s in sorted(layer.series()):
                labels = (direction, s.source, s.destination, s.method, s.code)
                total.add_metric(labels, s.count)
                cumulative = 0
                buckets = []
                for le, n in zip(_LE, s.buckets, strict=True):
                    cumulative += n
                    buckets.append((le, cumulative))
                duration.add_metric(labels, buckets, s.sum_ms / 1000)
        yield total
        yield duration


def registry_for(sidecar: SidecarView) -> CollectorRegistry:
    """A registry of its own (never the global one) holding the sidecar's collector; cheap
    enough to make at each scrape, so the sidecar keeps no prometheus_client state."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SidecarCollector(sidecar))
    return registry


def metrics_page(sidecar: SidecarView) -> Raw:
    """The body of ``GET /metrics`` now."""
    return Raw(CONTENT_TYPE, generate_latest(registry_for(sidecar)))
