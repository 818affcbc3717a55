"""The control plane's view of the sidecars' circuit breakers, without sockets: each sidecar's
latest reported breakers and limits, filtered by service, with the time to HALF_OPEN counted
down, forgotten with the instance; and the StateReport fields they come from."""

from __future__ import annotations

from control_plane.discovery_service import report_from_pb
from control_plane.telemetry import EndpointBreaker, LimitUse, Report, Telemetry, UpstreamSample
from protos.mesh.v1 import control_pb2 as pb

WEB1, WEB2, ORDER1 = ("web", "web-1"), ("web", "web-2"), ("order", "order-1")


def report(at: float, *breakers: EndpointBreaker, limits: tuple[LimitUse, ...] = (),
           calls: int = 0) -> Report:
    ups = (UpstreamSample("echo", {"OK": calls}),) if calls else ()
    return Report(at, 1.0, ups, breakers, limits)


def test_the_latest_report_of_each_sidecar_wins_and_counts_down_to_half_open() -> None:
    t = Telemetry(60)
    t.add(WEB1, report(100.0, EndpointBreaker("echo", "10.0.0.1:1", "echo-1", "OPEN", 5, 1, 4.0)))
    t.add(WEB1, report(101.0, EndpointBreaker("echo", "10.0.0.1:1", "echo-1", "OPEN", 5, 2, 8.0),
                       EndpointBreaker("echo", "10.0.0.2:1", "echo-2", "CLOSED")))
    b = t.breakers(now=104.0)
    assert [(r.instance, r.endpoint.instance, r.endpoint.state, r.endpoint.ejections,
             r.endpoint.half_open_in_s, r.reported_at) for r in b.endpoints] == [
        ("web-1", "echo-1", "OPEN", 2, 5.0, 101.0), ("web-1", "echo-2", "CLOSED", 0, 0.0, 101.0)]
    # Past the time: 0, never negative.
    assert t.breakers(now=200.0).endpoints[0].endpoint.half_open_in_s == 0.0


def test_live_state_outlives_the_report_window_until_the_instance_is_forgotten() -> None:
    t = Telemetry(10)
    t.add(WEB1, report(100.0, EndpointBreaker("echo", "a:1", "echo-1", "CLOSED"),
                       limits=(LimitUse("echo", "max_requests", 1, 2),), calls=3))
    assert t.edges(now=200.0) == []  # the calls are out of the window ...
    b = t.breakers(now=200.0)  # ... the last known breakers are not
    assert len(b.endpoints) == 1 and [x.limit for x in b.limits] == [
        LimitUse("echo", "max_requests", 1, 2)]
    t.forget(WEB1)
    assert t.breakers(now=200.0).endpoints == () and t.breakers(now=200.0).limits == ()


def test_rows_are_sorted_and_filtered_by_the_caller_or_the_upstream_service() -> None:
    t = Telemetry(60)
    lims = tuple(LimitUse(up, name, 0, 9) for up in ("payment", "echo")
                 for name in ("max_retries", "max_requests", "max_connections", "max_pending"))
    t.add(WEB2, report(1.0, EndpointBreaker("echo", "b:1", "echo-2"),
                       EndpointBreaker("echo", "a:1", "echo-1")))
    t.add(WEB1, report(1.0, EndpointBreaker("echo", "a:1", "echo-1"), limits=lims))
    t.add(ORDER1, report(1.0, EndpointBreaker("payment", "p:1", "payment-1")))
    b = t.breakers(now=2.0)
    assert [(r.instance, r.endpoint.instance) for r in b.endpoints] == [
        ("order-1", "payment-1"), ("web-1", "echo-1"), ("web-2", "echo-1"), ("web-2", "echo-2")]
    assert [(r.limit.upstream, r.limit.limit) for r in b.limits] == [
        ("echo", "max_connections"), ("echo", "max_pending"), ("echo", "max_requests"),
        ("echo", "max_retries"), ("payment", "max_connections"), ("payment", "max_pending"),
        ("payment", "max_requests"), ("payment", "max_retries")]
    assert {r.instance for r in t.breakers(2.0, "web").endpoints} == {"web-1", "web-2"}
    payment = t.breakers(2.0, "payment")
    assert [r.instance for r in payment.endpoints] == ["order-1"]
    assert {(r.instance, r.limit.upstream) for r in payment.limits} == {("web-1", "payment")}
    assert t.breakers(2.0, "nosuch").endpoints == ()


def test_a_state_report_carries_breakers_and_limits_into_telemetry() -> None:
    msg = pb.StateReport(interval_s=0.5, endpoints=[
        pb.EndpointState(service="echo", address="a:1", instance="echo-1", healthy=True,
                         breaker="OPEN", consecutive_errors=3, ejections=2, half_open_in_s=1.5,
                         last_transition_unix=99.0),
        pb.EndpointState(service="echo", address="b:1", instance="echo-2", breaker="CLOSED"),
        pb.EndpointState(service="echo", address="c:1", instance="echo-3"),  # no breaker
    ], limits=[pb.LimitState(upstream="echo", limit="max_requests", in_use=2, max=2,
                             fast_fails=4)])
    r = report_from_pb(msg, now=100.0)
    assert r.breakers == (EndpointBreaker("echo", "a:1", "echo-1", "OPEN", 3, 2, 1.5, 99.0),
                          EndpointBreaker("echo", "b:1", "echo-2", "CLOSED"))
    assert r.limits == (LimitUse("echo", "max_requests", 2, 2, 4),)
    t = Telemetry(60)
    t.add(WEB1, r)
    (first, _), (limit,) = t.breakers(now=101.0).endpoints, t.breakers(now=101.0).limits
    assert first.endpoint.half_open_in_s == 0.5 and limit.limit.fast_fails == 4
