"""The sidecar's Prometheus metrics, sans-IO: the per-call ``Metrics`` layer (labels by
direction, the capped method label, the latency histogram) and the ``/metrics`` collector
over real outbound layers (route, limits, retry, balance, outlier detection) driven by a fake
clock, its output parsed with prometheus_client's own text parser."""

from __future__ import annotations

import random
import re
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh_common.snapshot import (
    CircuitLimits,
    Cluster,
    Destination,
    OutlierPolicy,
    RouteMatch,
    RouteRule,
    Rule,
    Snapshot,
    StringMatch,
)
from sidecar.http2 import grpc as G
from sidecar.http2.relay import LocalReply
from sidecar.layers.metrics import MAX_LEARNED_METHODS, OTHER, Metrics, Series
from sidecar.layers.retry import Retry
from sidecar.layers.route import Route
from sidecar.layers.stats import LATENCY_BOUNDS_MS
from sidecar.metrics import CONTENT_TYPE, metrics_page
from sidecar.stack import Stack
from tests.unit.resilience_support import SAY, Clock, Mesh, ep, snapshot

TD = "mesh.local"
UNARY = "/meshtest.Echo/Unary"
FAILED_PRECONDITION = 9


def ended(layer: Metrics, clock: Clock, *, path: str = UNARY, route: str = "echo",
          status: int | None = G.OK, latency_ms: float = 3.0, peer: str | None = None,
          local: bool = False) -> None:
    """One call of ``path`` that started ``latency_ms`` ago ends now with ``status``
    (``local``: answered by the sidecar itself)."""
    call = SimpleNamespace(path=path, route=route, grpc_status=status, peer_id=peer,
                           started_s=clock.now - latency_ms / 1e3, ended_s=clock.now,
                           local_reply=LocalReply(status or 0, "x") if local else None)
    layer.on_end(call)  # type: ignore[arg-type]


def by_labels(layer: Metrics) -> dict[tuple[str, str, str, str], Series]:
    return {(s.source, s.destination, s.method, s.code): s for s in layer.series()}


# ---------------------------------------------------------------------- the layer
def test_outbound_calls_are_labelled_from_this_service_to_the_routed_one() -> None:
    clock = Clock()
    layer = Metrics("outbound", "web", lambda: Snapshot("1"), clock)
    ended(layer, clock)
    ended(layer, clock)
    ended(layer, clock, status=G.UNAVAILABLE)
    ended(layer, clock, route="", status=G.UNAVAILABLE, local=True)  # no route
    ended(layer, clock, status=None)  # reset: no status
    got = {k: s.count for k, s in by_labels(layer).items()}
    assert got == {("web", "echo", UNARY, "OK"): 2,
                   ("web", "echo", UNARY, "UNAVAILABLE"): 1,
                   ("web", "unknown", OTHER, "UNAVAILABLE"): 1,
                   ("web", "echo", UNARY, "RESET"): 1}


def test_inbound_calls_are_labelled_from_the_callers_spiffe_service_to_this_one() -> None:
    clock = Clock()
    layer = Metrics("inbound", "echo", lambda: Snapshot("1"), clock)
    ended(layer, clock, route="", peer=f"spiffe://{TD}/service/web")
    ended(layer, clock, route="", peer=f"spiffe://{TD}/service/web")
    ended(layer, clock, route="", peer=f"spiffe://{TD}/service/order")
    ended(layer, clock, route="", peer="spiffe://elsewhere/not/a/service")
    ended(layer, clock, route="", peer=None)
    got = {k: s.count for k, s in by_labels(layer).items()}
    assert got == {("web", "echo", UNARY, "OK"): 2, ("order", "echo", UNARY, "OK"): 1,
                   ("unknown", "echo", UNARY, "OK"): 2}


def test_a_bad_direction_is_refused() -> None:
    with pytest.raises(ValueError, match="direction"):
        Metrics("sideways", "web", lambda: Snapshot("1"))


def test_latency_histogram_counts_each_call_in_its_bucket_and_sums_milliseconds() -> None:
    clock = Clock()
    layer = Metrics("outbound", "web", lambda: Snapshot("1"), clock)
    for ms in (0.5, 1.0, 3.0, 3.0, 40.0, 20_000.0):
        ended(layer, clock, latency_ms=ms)
    [s] = layer.series()
    assert s.count == 6 and s.sum_ms == pytest.approx(20_047.5)
    assert len(s.buckets) == len(LATENCY_BOUNDS_MS) + 1
    expected = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    for i in (0, 0, 2, 2, 5, len(LATENCY_BOUNDS_MS)):  # <=1, <=1, <=5, <=5, <=50, overflow
        expected[i] += 1
    assert list(s.buckets) == expected


def test_latency_runs_to_the_relays_end_stamp_not_to_when_the_end_hook_runs() -> None:
    """The relay stamps a call's end (``call.ended_s``) as its answer is queued; the end
    hooks run after the read's writes, later. Latency runs to the stamp; a call without
    one (a layer driven by hand) ends when its hook runs."""
    clock = Clock()
    layer = Metrics("outbound", "web", lambda: Snapshot("1"), clock)
    call = SimpleNamespace(path=UNARY, route="echo", grpc_status=G.OK, peer_id=None,
                           started_s=clock.now - 0.004, ended_s=clock.now - 0.003,
                           local_reply=None)
    layer.on_end(call)  # type: ignore[arg-type]
    call.ended_s = None
    layer.on_end(call)  # type: ignore[arg-type]
    [s] = layer.series()
    assert s.count == 2 and s.sum_ms == pytest.approx(1.0 + 4.0)


def test_a_method_is_known_when_a_route_rule_names_it_exactly() -> None:
    rules = (Rule("exact", RouteMatch(StringMatch("exact", "/pkg.Svc/Named")),
                  (Destination((), 100),)),
             Rule("prefix", RouteMatch(StringMatch("prefix", "/pkg.Other/")),
                  (Destination((), 100),)))
    snap = Snapshot("1", (Cluster("echo", ()),), (RouteRule("echo", "echo", rules),))
    clock = Clock()
    layer = Metrics("outbound", "web", lambda: snap, clock)
    # Named exactly: its label even when never answered (UNIMPLEMENTED, local replies).
    ended(layer, clock, path="/pkg.Svc/Named", status=G.UNIMPLEMENTED)
    ended(layer, clock, path="/pkg.Svc/Named", status=G.UNAVAILABLE, local=True)
    # A prefix names no method: a call under it is other until it is answered.
    ended(layer, clock, path="/pkg.Other/Any", status=G.UNIMPLEMENTED)
    got = {(k[2], k[3]) for k in by_labels(layer)}
    assert got == {("/pkg.Svc/Named", "UNIMPLEMENTED"), ("/pkg.Svc/Named", "UNAVAILABLE"),
                   (OTHER, "UNIMPLEMENTED")}


def test_a_method_is_learned_only_from_a_real_answer_that_is_not_unimplemented() -> None:
    clock = Clock()
    layer = Metrics("outbound", "web", lambda: Snapshot("1"), clock)
    ended(layer, clock, path="/a.S/Local", status=G.UNAVAILABLE, local=True)  # the sidecar's
    ended(layer, clock, path="/a.S/Missing", status=G.UNIMPLEMENTED)
    ended(layer, clock, path="/a.S/Reset", status=None)
    ended(layer, clock, path="/a.S/Failed", status=FAILED_PRECONDITION)  # a real answer
    ended(layer, clock, path="/a.S/Failed", status=G.UNIMPLEMENTED)  # known from now on
    got = {(k[2], k[3]): s.count for k, s in by_labels(layer).items()}
    assert got == {(OTHER, "UNAVAILABLE"): 1, (OTHER, "UNIMPLEMENTED"): 1, (OTHER, "RESET"): 1,
                   ("/a.S/Failed", "FAILED_PRECONDITION"): 1,
                   ("/a.S/Failed", "UNIMPLEMENTED"): 1}
    assert layer.learned_methods() == {"echo": frozenset({"/a.S/Failed"})}


def test_ten_thousand_made_up_methods_cannot_explode_the_label_set() -> None:
    rng = random.Random(7)
    clock = Clock()
    layer = Metrics("inbound", "echo", lambda: Snapshot("1"), clock)
    out = Metrics("outbound", "web", lambda: Snapshot("1"), clock)
    peer = f"spiffe://{TD}/service/web"
    for _ in range(10_000):
        path = f"/evil.{rng.getrandbits(64):x}/M{rng.getrandbits(32)}"
        ended(layer, clock, path=path, status=G.UNIMPLEMENTED, peer=peer)
        ended(out, clock, path=path, status=G.UNIMPLEMENTED)
    assert {k[2] for k in by_labels(layer)} == {OTHER}
    assert {k[2] for k in by_labels(out)} == {OTHER}
    assert sum(s.count for s in layer.series()) == 10_000
    # Even methods that do answer are capped per destination service.
    for _ in range(10_000):
        ended(out, clock, path=f"/ok.S/M{rng.getrandbits(32)}", status=G.OK)
    methods = {k[2] for k in by_labels(out) if k[1] == "echo"}
    assert len(methods) == MAX_LEARNED_METHODS + 1 and OTHER in methods
    assert len(list(out.series())) <= MAX_LEARNED_METHODS + 2


# ---------------------------------------------------------------------- the collector
def _outbound_world() -> tuple[Mesh, Stack, Metrics]:
    """The outbound layers over two echo endpoints: max_requests 1, ejection after two
    sick answers in a row; a Metrics layer on top and a Retry layer under the limits."""
    a, b = ep(1), ep(2)
    snap = snapshot((a, b), limits=CircuitLimits(max_requests=1),
                    outlier=OutlierPolicy(consecutive_errors=2), version="42")
    m = Mesh(snap)
    metrics = Metrics("outbound", "web", lambda: m.snap, m.clock)
    stack = Stack([metrics, Route(lambda: m.snap, random.Random(1)), m.limits,
                   Retry(lambda: m.snap, random.Random(2), m.clock), m.balance, m.outlier],
                  m._pool)
    m.stack = stack
    return m, stack, metrics


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _samples(fam: Any, name: str | None = None) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in fam.samples
            if name is None or s.name == name}


def test_metrics_page_parses_and_carries_every_family_with_its_counts() -> None:
    m, stack, _ = _outbound_world()
    # A call in flight holds the only request slot: the next one fails fast.
    held, _ = m.start()
    refused, decision = m.start()
    assert isinstance(decision, LocalReply) and refused.fast_fail
    m.end(refused)
    # The held call fails before commit with UNAVAILABLE and is retried once, then answers.
    assert held.retry.again(held, "status", G.UNAVAILABLE) is not None
    m.clock.now += 0.004
    m.end(held, G.OK)
    # Sick answers from both endpoints: one of them gets ejected (at most half of two).
    for _ in range(6):
        m.one(status={ep(1).address: G.UNAVAILABLE, ep(2).address: G.UNAVAILABLE})
    clock = Clock()
    inbound_metrics = Metrics("inbound", "web", lambda: m.snap, clock)
    ended(inbound_metrics, clock, path="/web.Web/Get", route="",
          peer=f"spiffe://{TD}/service/gateway", latency_ms=7.0)
    sidecar = SimpleNamespace(
        boot=SimpleNamespace(service="web"), snapshot=m.snap,
        stacks={"outbound": stack, "inbound": Stack([inbound_metrics], lambda c: None)},
        relays={"outbound": SimpleNamespace(active=2), "inbound": SimpleNamespace(active=0)},
        inbound=SimpleNamespace(name="inbound", handshakes=5, handshake_failures=4,
                                rejected={"no_spiffe_id": 1}),
        outbound=SimpleNamespace(name="outbound", handshakes=0, handshake_failures=0,
                                 rejected={"max_connections": 2}),
        tls_failures={"CERTIFICATE_VERIFY_FAILED": 3},
        cert_not_after=lambda: 1_800_000_000.0,
        traces={"outbound": SimpleNamespace(sampled=4)},
        tracer=SimpleNamespace(stats=lambda: {"spans_exported": 3, "spans_dropped": 1,
                                              "spans_dropped_queue_full": 0}))

    page = metrics_page(sidecar)  # type: ignore[arg-type]
    assert page.content_type == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    fams = _families(page.data.decode())

    req = _samples(fams["mesh_requests"], "mesh_requests_total")
    out_ok = (("destination", "echo"), ("direction", "outbound"), ("grpc_code", "OK"),
              ("method", SAY), ("source", "web"))
    assert req[out_ok] == 1
    fast = (("destination", "echo"), ("direction", "outbound"), ("grpc_code", "UNAVAILABLE"),
            ("method", OTHER), ("source", "web"))  # a fast-fail teaches no method
    assert req[fast] == 1
    inbound = (("destination", "web"), ("direction", "inbound"), ("grpc_code", "OK"),
               ("method", "/web.Web/Get"), ("source", "gateway"))
    assert req[inbound] == 1
    assert fams["mesh_requests"].type == "counter"
    assert _samples(fams["mesh_spans_sampled"])[(("direction", "outbound"),)] == 4
    assert _samples(fams["mesh_spans_exported"])[()] == 3
    assert _samples(fams["mesh_spans_dropped"])[(("reason", "export_failed"),)] == 1

    hist = fams["mesh_request_duration_seconds"]
    assert hist.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in hist.samples
               if s.name.endswith("_bucket") and s.labels["direction"] == "inbound"}
    assert buckets["0.005"] == 0 and buckets["0.01"] == 1 and buckets["+Inf"] == 1
    assert len(buckets) == len(LATENCY_BOUNDS_MS) + 1
    counts = _samples(hist, "mesh_request_duration_seconds_count")
    sums = _samples(hist, "mesh_request_duration_seconds_sum")
    assert counts[inbound] == 1 and sums[inbound] == pytest.approx(0.007)
    assert counts[out_ok] == 1 and sums[out_ok] == pytest.approx(0.004)

    assert _samples(fams["mesh_retries"]) == {
        (("destination", "echo"), ("reason", "UNAVAILABLE")): 1}
    fast_fails = _samples(fams["mesh_fast_fails"])
    assert fast_fails[(("destination", "echo"), ("limit", "max_requests"))] == 1
    assert set(fast_fails) >= {(("destination", "echo"), ("limit", x)) for x in (
        "max_connections", "max_pending", "max_retries")}

    ejections = _samples(fams["mesh_outlier_ejections"])
    assert set(ejections) == {(("destination", "echo"), ("endpoint", e.address))
                              for e in (ep(1), ep(2))}
    assert sum(ejections.values()) == 1
    states = _samples(fams["mesh_breaker_state"])
    assert len(states) == 6 and sum(states.values()) == 2  # one state per endpoint
    assert sum(v for k, v in states.items() if ("state", "OPEN") in k) == 1

    assert _samples(fams["mesh_tls_handshakes"]) == {(): 5}
    assert _samples(fams["mesh_tls_handshake_failures"]) == {
        (("reason", "CERTIFICATE_VERIFY_FAILED"),): 3, (("reason", "other"),): 1}
    assert _samples(fams["mesh_connections_refused"]) == {
        (("listener", "inbound"), ("reason", "no_spiffe_id")): 1,
        (("listener", "outbound"), ("reason", "max_connections")): 2}
    assert _samples(fams["mesh_active_calls"]) == {
        (("direction", "inbound"),): 0, (("direction", "outbound"),): 2}
    assert _samples(fams["mesh_certificate_expiry_timestamp_seconds"]) == {(): 1.8e9}
    assert _samples(fams["mesh_snapshot_version"]) == {(): 42}
    assert _samples(fams["mesh_snapshot_info"]) == {
        (("hash", m.snap.content_hash()), ("version", "42")): 1}
    # Base units and suffixes: no milliseconds anywhere in the names.
    assert not [n for n in fams if re.search(r"_ms\b|millis", n)]


def test_a_version_that_is_not_digits_has_info_but_no_number() -> None:
    sidecar = SimpleNamespace(
        boot=SimpleNamespace(service="web"), snapshot=Snapshot("static"), stacks={},
        relays={}, inbound=None, outbound=None, tls_failures={}, cert_not_after=lambda: None,
        traces={}, tracer=None)
    fams = _families(metrics_page(sidecar).data.decode())  # type: ignore[arg-type]
    assert _samples(fams["mesh_snapshot_version"]) == {}
    assert _samples(fams["mesh_snapshot_info"])[(("hash", Snapshot("static").content_hash()),
                                                 ("version", "static"))] == 1
    assert _samples(fams["mesh_certificate_expiry_timestamp_seconds"]) == {}
    assert _samples(fams["mesh_requests"]) == {}
    assert _samples(fams["mesh_spans_sampled"]) == {} and "mesh_spans_exported" not in fams
