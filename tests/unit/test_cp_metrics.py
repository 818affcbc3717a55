"""The control plane's Prometheus metrics and the topology's golden signals, without
sockets: the registry's text parses with a Prometheus parser; discovery's sessions count
pushes, time each version's ACK once and count NACKs; the live gauges are read at scrape
time; a service's golden signals merge its in-edges' histograms (never average their
percentiles) and an edge counts the destination's open breakers once each."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from control_plane.discovery import Published, Session
from control_plane.metrics import ControlPlaneMetrics, LiveState, live_state_of
from control_plane.registry import SERVING, Instance
from control_plane.telemetry import (
    EndpointBreaker,
    Histogram,
    Report,
    Telemetry,
    UpstreamSample,
    merge_histograms,
    percentile_ms,
)

T0 = 1_800_000_000.0


def families(metrics: ControlPlaneMetrics) -> dict[str, Any]:
    text = metrics.exposition().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(metrics: ControlPlaneMetrics, name: str, **labels: str) -> float:
    v = metrics.registry.get_sample_value(name, labels)
    assert v is not None, (name, labels)
    return v


def inst(service: str, iid: str) -> Instance:
    return Instance(service, iid, f"spiffe://mesh.local/service/{service}", "127.0.0.1:1",
                    health=SERVING)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------------- the registry
def test_every_metric_parses_with_prometheus_names_and_types() -> None:
    m = ControlPlaneMetrics(lambda: LiveState({"order": 2}, {"order": 3},
                                              {"SYNCED": 2, "STALE": 1}, 7, 9))
    m.snapshot_pushed()
    m.push_acked(0.02)
    m.push_nacked()
    m.certificate_issued("join")
    m.certificate_issued("renew")
    m.config_applied(True)
    m.config_applied(False)
    m.report_received()
    fams = families(m)
    types = {name: f.type for name, f in fams.items() if not name.endswith("_created")}
    assert types == {
        "mesh_cp_snapshot_pushes": "counter", "mesh_cp_push_ack_seconds": "histogram",
        "mesh_cp_nacks": "counter", "mesh_cp_certificates_issued": "counter",
        "mesh_cp_config_applies": "counter", "mesh_cp_config_apply_errors": "counter",
        "mesh_cp_state_reports": "counter", "mesh_cp_connected_sidecars": "gauge",
        "mesh_cp_registered_instances": "gauge", "mesh_cp_sidecars": "gauge",
        "mesh_cp_stale_sidecars": "gauge", "mesh_cp_snapshot_version": "gauge",
        "mesh_cp_snapshot_publishes": "counter"}
    assert value(m, "mesh_cp_certificates_issued_total", kind="join") == 1
    assert value(m, "mesh_cp_push_ack_seconds_count") == 1
    assert value(m, "mesh_cp_push_ack_seconds_bucket", le="0.025") == 1
    assert value(m, "mesh_cp_push_ack_seconds_bucket", le="0.01") == 0
    assert value(m, "mesh_cp_connected_sidecars", service="order") == 2
    assert value(m, "mesh_cp_registered_instances", service="order") == 3
    assert value(m, "mesh_cp_sidecars", state="NACKED") == 0  # every state, even at 0
    assert value(m, "mesh_cp_stale_sidecars") == 1
    assert value(m, "mesh_cp_snapshot_version") == 7
    assert value(m, "mesh_cp_snapshot_publishes_total") == 9
    assert value(m, "mesh_cp_config_apply_errors_total") == 1
    assert value(m, "mesh_cp_config_applies_total") == 1


def test_both_certificate_kinds_show_from_the_start_and_others_are_refused() -> None:
    m = ControlPlaneMetrics()
    assert value(m, "mesh_cp_certificates_issued_total", kind="join") == 0
    assert value(m, "mesh_cp_certificates_issued_total", kind="renew") == 0
    with pytest.raises(ValueError):
        m.certificate_issued("other")


def test_gauges_follow_the_live_state_at_each_scrape() -> None:
    state = {"n": 1}
    m = ControlPlaneMetrics(lambda: LiveState({"web": state["n"]}))
    assert value(m, "mesh_cp_connected_sidecars", service="web") == 1
    state["n"] = 4
    assert value(m, "mesh_cp_connected_sidecars", service="web") == 4


def test_a_failing_live_read_leaves_the_counters_answering() -> None:
    def broken() -> LiveState:
        raise RuntimeError("boom")
    m = ControlPlaneMetrics(broken)
    m.snapshot_pushed()
    fams = families(m)
    assert "mesh_cp_snapshot_pushes" in fams and "mesh_cp_connected_sidecars" not in fams


def test_two_registries_do_not_clash() -> None:
    a, b = ControlPlaneMetrics(), ControlPlaneMetrics()
    a.push_nacked()
    assert value(a, "mesh_cp_nacks_total") == 1 and value(b, "mesh_cp_nacks_total") == 0


# ---------------------------------------------------------------------- discovery's events
async def _hand_out(session: Session) -> None:
    gen = session.outgoing()
    while not session.queue.empty():
        await anext(gen)


async def test_a_session_counts_its_pushes_times_each_ack_once_and_counts_nacks() -> None:
    m = ControlPlaneMetrics()
    clock = Clock(T0)
    s = Session(inst("web", "web-1"), T0, clock=clock, observer=m)
    s.push_snapshot(Published("5", "h5", "{}"))
    await _hand_out(s)
    assert value(m, "mesh_cp_snapshot_pushes_total") == 1
    s.on_ack("4", "h4", T0 + 0.1)  # an older version: not this push's answer
    assert value(m, "mesh_cp_push_ack_seconds_count") == 0
    s.on_ack("5", "h5", T0 + 0.2)
    s.on_ack("5", "h5", T0 + 0.9)  # a repeated ACK is not a second sample
    assert value(m, "mesh_cp_push_ack_seconds_count") == 1
    assert value(m, "mesh_cp_push_ack_seconds_sum") == pytest.approx(0.2)
    clock.t = T0 + 1
    s.push_snapshot(Published("6", "h6", "{}"))
    await _hand_out(s)
    s.on_nack("6", "clusters[0]: bad", T0 + 1.05)
    assert value(m, "mesh_cp_snapshot_pushes_total") == 2
    assert value(m, "mesh_cp_nacks_total") == 1
    assert value(m, "mesh_cp_push_ack_seconds_count") == 1


def test_a_session_without_an_observer_still_works() -> None:
    s = Session(inst("web", "web-1"), T0)
    s.on_ack("1", "h", T0)
    s.on_nack("2", "x", T0)
    assert (s.acked_version, s.nack_version) == ("1", "2")


def test_live_state_counts_connected_sidecars_and_sync_states() -> None:
    async def build() -> list[Session]:
        a = Session(inst("web", "web-1"), T0, acked_version="3", clock=Clock(T0))
        a.push_snapshot(Published("3", "h", "{}"))
        await _hand_out(a)
        a.on_ack("3", "h", T0)
        b = Session(inst("web", "web-2"), T0, clock=Clock(T0))
        b.close()  # stream down: STALE, not connected
        c = Session(inst("store", "store-1"), T0, clock=Clock(T0))  # nothing sent: SYNCING
        return [a, b, c]
    sessions = asyncio.run(build())
    st = live_state_of(sessions, [inst("web", "web-1"), inst("web", "web-2"),
                                  inst("store", "store-1")], "12", 4, T0, 10.0)
    assert st == LiveState({"web": 1, "store": 1}, {"web": 2, "store": 1},
                           {"SYNCED": 1, "STALE": 1, "SYNCING": 1}, 12, 4)
    assert live_state_of([], [], "", 0, T0, 10.0).snapshot_version == 0


# ---------------------------------------------------------------------- golden signals
BOUNDS = (1.0, 5.0, 10.0, 100.0)


def report(at: float, service: str, ok: int, failed: int, counts: tuple[int, ...],
           *breakers: EndpointBreaker) -> Report:
    by_code = {"OK": ok} | ({"UNAVAILABLE": failed} if failed else {})
    return Report(at, 1.0, (UpstreamSample(service, by_code, Histogram(BOUNDS, counts)),),
                  breakers)


def test_a_services_signals_merge_its_in_edges_histograms() -> None:
    tel = Telemetry(window_s=60)
    # web -> payment: 99 fast calls; order -> payment: 1 slow one, failed.
    tel.add(("web", "web-1"), report(T0, "payment", 99, 0, (99, 0, 0, 0, 0)))
    tel.add(("order", "order-1"), report(T0, "payment", 0, 1, (0, 0, 0, 1, 0)))
    topo = tel.topology([inst("payment", "payment-1"), inst("web", "web-1"),
                         inst("order", "order-1")], T0)
    services = {s.name: s for s in topo.services}
    pay = services["payment"]
    merged = merge_histograms([Histogram(BOUNDS, (99, 0, 0, 0, 0)),
                               Histogram(BOUNDS, (0, 0, 0, 1, 0))])
    assert pay.requests == 100 and pay.rps == pytest.approx(100.0)
    assert pay.success_rate == pytest.approx(0.99)
    assert pay.p50_ms == pytest.approx(percentile_ms(merged, 0.5))
    assert pay.p99_ms == pytest.approx(percentile_ms(merged, 0.99))
    edges = {(e.source, e.destination): e for e in topo.edges}
    mean_of_p99s = (edges[("web", "payment")].p99_ms + edges[("order", "payment")].p99_ms) / 2
    assert pay.p99_ms != pytest.approx(mean_of_p99s)  # merged, not averaged
    assert pay.p99_ms <= 1.0 and mean_of_p99s > 40.0
    assert pay.instances[0].instance == "payment-1"
    # Nobody calls web or order: all zero.
    assert (services["web"].requests, services["web"].rps, services["web"].success_rate,
            services["web"].p99_ms) == (0, 0.0, 0.0, 0.0)


def test_an_edge_counts_the_destinations_open_breakers_once_each() -> None:
    tel = Telemetry(window_s=60)
    opened = EndpointBreaker("payment", "10.0.0.1:1", "payment-1", "OPEN")
    tel.add(("order", "order-1"), report(
        T0, "payment", 5, 5, (10, 0, 0, 0, 0), opened,
        EndpointBreaker("payment", "10.0.0.2:1", "payment-2", "HALF_OPEN"),
        EndpointBreaker("payment", "10.0.0.3:1", "payment-3", "CLOSED")))
    tel.add(("order", "order-2"), report(T0, "payment", 5, 0, (5, 0, 0, 0, 0), opened))
    tel.add(("web", "web-1"), report(T0, "payment", 5, 0, (5, 0, 0, 0, 0)))
    edges = {(e.source, e.destination): e for e in tel.edges(T0)}
    assert edges[("order", "payment")].open_breakers == 2
    assert edges[("web", "payment")].open_breakers == 0
    # A later report of the same sidecar with the breaker closed again: it no longer counts.
    tel.add(("order", "order-1"), report(
        T0 + 1, "payment", 1, 0, (1, 0, 0, 0, 0),
        EndpointBreaker("payment", "10.0.0.1:1", "payment-1", "CLOSED")))
    edges = {(e.source, e.destination): e for e in tel.edges(T0 + 1)}
    assert edges[("order", "payment")].open_breakers == 1  # order-2 still reports it OPEN
