"""Outlier detection without sockets: the breaker of one endpoint (CLOSED → OPEN →
HALF_OPEN → CLOSED) fed through the balancer by the calls' outcomes, over a fake clock; the
cluster's ejection rules; what never counts against an endpoint; what ``/stats`` and the
report to the control plane show. Property tests: half-open never lets more than the
configured probes through; business codes never eject."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_common.snapshot import SICK_CODES, Cluster, OutlierPolicy, Snapshot
from protos.mesh.v1 import control_pb2 as pb
from sidecar.discovery import report_message
from sidecar.http2 import grpc as G
from sidecar.layers.outlier import CLOSED, HALF_OPEN, OPEN, Breaker
from sidecar.layers.stats import StatsReport
from sidecar.upstream import BreakerView, LimitView, ResilienceReport
from tests.unit.resilience_support import WALL_OFFSET_S, Mesh, ep, snapshot

A, B, C, D = ep(1), ep(2), ep(3), ep(4)
FAILED_PRECONDITION, NOT_FOUND, INVALID_ARGUMENT, PERMISSION_DENIED = 9, 5, 3, 7


def sick(*eps: object, code: int = G.UNAVAILABLE) -> dict[str, int]:
    return {e.address: code for e in eps}  # type: ignore[attr-defined]


def policy(**kw: object) -> OutlierPolicy:
    return OutlierPolicy(**kw)  # type: ignore[arg-type]


# ====================================================================== ejection
def test_consecutive_sick_answers_eject_the_endpoint_and_traffic_moves_away() -> None:
    m = Mesh(snapshot((A, B), lb="round_robin"))
    m.spread(9, status=sick(A))  # A: calls 1, 3, 5, 7, 9 → the 5th error ejects it
    b = m.breaker(A)
    assert b.state == OPEN and b.consecutive_errors == 5 and b.ejections == 1
    assert b.half_open_in_s(m.clock.now) == pytest.approx(30.0)
    assert m.spread(50, status=sick(A)) == {B.address: 50}


def test_an_ok_answer_resets_the_errors_in_a_row() -> None:
    m = Mesh(snapshot((A, B), lb="round_robin"))
    for i in range(40):  # A fails 4 times, then answers OK once, and again
        m.one(status=sick(A) if (i // 2) % 5 != 4 else {})
    assert m.breaker(A).state == CLOSED and m.breaker(A).ejections == 0


@pytest.mark.parametrize("code", [FAILED_PRECONDITION, NOT_FOUND, INVALID_ARGUMENT,
                                  PERMISSION_DENIED])
def test_business_answers_never_eject(code: int) -> None:
    m = Mesh(snapshot((A, B), lb="round_robin"))
    m.spread(200, status=sick(A, code=code))
    assert m.breaker(A) is None or m.breaker(A).state == CLOSED
    assert m.state(A).gate is None


@settings(deadline=None, max_examples=60)
@given(codes=st.lists(st.integers(1, 16).filter(lambda c: c not in SICK_CODES), min_size=1,
                      max_size=60))
def test_no_sequence_of_codes_outside_the_sick_ones_ejects(codes: list[int]) -> None:
    m = Mesh(snapshot((A, B), lb="round_robin", outlier=policy(
        consecutive_errors=1, success_rate_min_requests=5, success_rate_threshold=0.99)))
    for code in codes:
        m.one(status=sick(A, B, code=code))
    assert m.upstreams.gated == 0


def test_the_error_codes_are_configurable() -> None:
    m = Mesh(snapshot((A, B), lb="round_robin", outlier=policy(error_codes=(G.INTERNAL,),
                                                                consecutive_errors=2)))
    m.spread(20, status=sick(A))  # UNAVAILABLE is not sick for this service
    assert m.upstreams.gated == 0
    m.spread(4, status=sick(A, code=G.INTERNAL))
    assert m.breaker(A).state == OPEN


def test_a_success_rate_under_the_threshold_ejects() -> None:
    m = Mesh(snapshot((A, B), lb="round_robin", outlier=policy(
        consecutive_errors=0, success_rate_min_requests=10, success_rate_threshold=0.7)))
    for i in range(200):
        m.one(status=sick(A) if i % 4 == 0 else {})  # A fails every other of its calls
        if m.upstreams.gated:
            break
    b = m.breaker(A)
    assert b.state == OPEN and "success rate 50% over the last 10 calls" in b.recent[-1][3]
    assert m.breaker(B) is None or m.breaker(B).state == CLOSED


def test_a_healthy_endpoint_needs_no_breaker_and_is_not_watched() -> None:
    m = Mesh(snapshot((A, B), lb="round_robin"))
    m.spread(100)
    assert m.breaker(A) is None and not m.state(A).watched
    m.one(status=sick(A, B))
    hit = A if m.breaker(A) is not None else B
    assert m.state(hit).watched  # an error in a row: every outcome matters now
    m.spread(20)
    assert not m.state(hit).watched and m.breaker(hit).consecutive_errors == 0


# ====================================================================== half-open
def test_an_ejected_endpoint_returns_after_its_half_open_probe() -> None:
    m = Mesh(snapshot((A, B), lb="round_robin"))
    m.spread(9, status=sick(A))
    m.clock.now += 30.0
    call, _ = m.start()
    assert call.endpoint == A  # the probe goes first
    assert m.breaker(A).state == HALF_OPEN
    other, _ = m.start()
    assert other.endpoint == B  # one probe at a time
    m.end(call)
    m.end(other)
    b = m.breaker(A)
    assert b.state == CLOSED and m.state(A).gate is None and m.upstreams.gated == 0
    assert b.transitions == {"CLOSED->OPEN": 1, "OPEN->HALF_OPEN": 1, "HALF_OPEN->CLOSED": 1}
    assert call.notes[-1] == f"outlier detection: {A.address} is back (CLOSED) after its " \
        "half-open probes"
    assert set(m.spread(10)) == {A.address, B.address}


def test_a_failed_probe_opens_it_again_for_longer_up_to_the_maximum() -> None:
    m = Mesh(snapshot((A, B), lb="round_robin", outlier=policy(
        base_ejection_ms=10_000, max_ejection_ms=25_000)))
    m.spread(9, status=sick(A))
    durations = []
    for _ in range(3):
        m.clock.now += m.breaker(A).half_open_in_s(m.clock.now) + 1e-6
        assert m.one(status=sick(A)) == A.address  # the probe fails
        durations.append(round(m.breaker(A).half_open_in_s(m.clock.now), 3))
    assert durations == [20.0, 25.0, 25.0]
    assert m.breaker(A).ejections == 4
    assert m.breaker(A).transitions["HALF_OPEN->OPEN"] == 3


def test_the_times_in_a_row_wear_off_while_the_endpoint_stays_healthy() -> None:
    b = Breaker("x")
    p = policy(base_ejection_ms=1000, max_ejection_ms=100_000)
    assert b.eject(0.0, p, "t") == 1.0
    b.admits(1.0)
    b.admit("probe", 1.0)
    b.failed("probe", 1.0, p, 14)  # OPEN again: 2 s
    assert b.half_open_in_s(1.0) == 2.0
    b.admits(3.0)
    b.admit("probe2", 3.0)
    b.succeeded("probe2", 3.0, p)
    assert b.state == CLOSED and b.streak == 2
    assert b.eject(3.5, p, "t") == 3.0  # half a base later: still 2 in a row, now 3
    b.admits(6.5)
    b.admit("p3", 6.5)
    b.succeeded("p3", 6.5, p)
    assert b.eject(6.5 + 2.0, p, "t") == 2.0  # two bases healthy: 3 - 2 = 1, now 2


def test_several_probes_must_all_succeed() -> None:
    m = Mesh(snapshot((A, B, C), lb="round_robin", outlier=policy(half_open_probes=3)))
    m.spread(15, status=sick(A))
    m.clock.now += 30.0
    probes = [m.start()[0] for _ in range(5)]
    assert [c.endpoint for c in probes[:3]] == [A, A, A]
    assert A not in [c.endpoint for c in probes[3:]]
    m.end(probes[0])
    m.end(probes[1])
    assert m.breaker(A).state == HALF_OPEN
    m.end(probes[2], G.UNAVAILABLE)
    assert m.breaker(A).state == OPEN


def test_a_probe_that_ends_without_an_answer_frees_its_slot() -> None:
    m = Mesh(snapshot((A, B), lb="round_robin"))
    m.spread(9, status=sick(A))
    m.clock.now += 30.0
    probe, _ = m.start()
    assert probe.endpoint == A
    m.end(probe, None)  # the caller cancelled it: no verdict
    b = m.breaker(A)
    assert b.state == HALF_OPEN and not b.probes
    probe2, _ = m.start()
    assert probe2.endpoint == A


@settings(deadline=None, max_examples=200)
@given(probes=st.integers(1, 4),
       events=st.lists(st.tuples(st.sampled_from(["start", "ok", "fail", "cancel", "wait"]),
                                 st.integers(0, 50)), max_size=80))
def test_half_open_never_lets_more_than_the_configured_probes_through(
        probes: int, events: list[tuple[str, int]]) -> None:
    m = Mesh(snapshot((A, B, C), lb="random", outlier=policy(
        half_open_probes=probes, base_ejection_ms=1000, max_ejection_ms=4000)))
    m.spread(30, status=sick(A))
    assert m.breaker(A).state == OPEN
    live: list = []
    for kind, n in events:
        b = m.breaker(A)
        if kind == "start":
            was = b.current(m.clock.now)
            call = m.start()[0]
            live.append(call)
            if call.endpoint == A and was != CLOSED:
                assert was == HALF_OPEN and any(p is call for p in b.probes)  # only probes
        elif kind == "wait":
            m.clock.now += n / 10
        elif live:
            call = live.pop(n % len(live))
            m.end(call, {"ok": 0, "fail": G.UNAVAILABLE, "cancel": None}[kind])
        if b.state == OPEN:
            assert not b.probes and not b.probe_oks
        if b.state == HALF_OPEN:  # in flight or answered: never more than the probes
            assert len(b.probes) + b.probe_oks <= probes
            assert all(any(p is c for c in live) and p.endpoint == A for p in b.probes)


# ====================================================================== the cluster's rules
def test_at_most_the_max_ejection_percent_is_ejected() -> None:
    m = Mesh(snapshot((A, B, C, D), lb="round_robin"))  # 50%: two of four
    m.spread(80, status=sick(A, B, C))
    states = [m.breaker(e).state for e in (A, B, C)]
    assert states.count(OPEN) == 2 and states.count(CLOSED) == 1
    kept = [e for e in (A, B, C) if m.breaker(e).state == CLOSED][0]
    assert m.breaker(kept).suppressed > 0
    counted = m.outlier.counters()["breakers"]["echo"][kept.address]
    assert counted["suppressed"] == m.breaker(kept).suppressed


def test_at_least_one_endpoint_may_be_ejected_whatever_the_percentage() -> None:
    m = Mesh(snapshot((A, B, C), lb="round_robin", outlier=policy(max_ejection_percent=0)))
    m.spread(60, status=sick(A, B))
    assert sorted(m.breaker(e).state for e in (A, B)) == [CLOSED, OPEN]


def test_never_the_last_endpoint_not_ejected() -> None:
    m = Mesh(snapshot((A, B), lb="round_robin", outlier=policy(max_ejection_percent=100)))
    m.spread(60, status=sick(A, B))
    assert sorted(m.breaker(e).state for e in (A, B)) == [CLOSED, OPEN]
    alone = Mesh(snapshot((A,), outlier=policy(max_ejection_percent=100)))
    alone.spread(30, status=sick(A))
    assert alone.breaker(A).state == CLOSED and alone.breaker(A).suppressed == 26
    call, _ = alone.start()
    alone.end(call, G.UNAVAILABLE)
    assert call.notes[-1] == (f"outlier detection: {A.address} not ejected (31 consecutive "
                              "errors (last UNAVAILABLE)): it is the last endpoint of the "
                              "cluster not ejected")


# ====================================================================== what never counts
def test_a_local_fast_fail_never_counts_against_an_endpoint() -> None:
    m = Mesh(snapshot((A,)))
    for _ in range(10):
        call, _ = m.start()
        call.fast_fail = True  # refused by a limit after the pick
        call.local_reply = object()  # type: ignore[assignment]
        m.end(call, G.UNAVAILABLE)
    assert m.breaker(A) is None or m.breaker(A).consecutive_errors == 0


def test_a_call_that_never_reached_the_pool_never_counts() -> None:
    m = Mesh(snapshot((A, B)))
    for _ in range(10):
        call, _ = m.start()
        call.pool = None  # held by an injected delay; the caller's deadline came first
        m.end(call, G.DEADLINE_EXCEEDED)
    assert all(m.breaker(e) is None or m.breaker(e).consecutive_errors == 0 for e in (A, B))


def test_a_cancelled_call_never_counts() -> None:
    m = Mesh(snapshot((A, B)))
    for _ in range(10):
        m.end(m.start()[0], None)
    assert m.upstreams.gated == 0 and all(m.breaker(e) is None for e in (A, B))


def test_the_sidecars_own_answer_with_a_code_that_is_not_sick_is_no_verdict() -> None:
    m = Mesh(snapshot((A,)))
    m.spread(3, status=sick(A))
    call, _ = m.start()
    call.local_reply = object()  # type: ignore[assignment]  # e.g. message too large
    call.grpc_status = G.RESOURCE_EXHAUSTED
    m.stack.on_end(call)
    assert m.breaker(A).consecutive_errors == 3


def test_an_unreachable_endpoint_counts_its_local_unavailable() -> None:
    m = Mesh(snapshot((A, B), lb="round_robin"))
    for _ in range(10):
        call, _ = m.start()
        if call.endpoint == A:  # the relay answers: upstream A: connection refused
            call.local_reply = object()  # type: ignore[assignment]
            call.grpc_status = G.UNAVAILABLE
        m.end(call, 0)
    assert m.breaker(A).state == OPEN


# ====================================================================== visible
def test_transitions_are_timestamped_counted_and_shown_in_stats() -> None:
    m = Mesh(snapshot((A, B), lb="round_robin"))
    m.spread(9, status=sick(A))
    opened_at = m.clock.now  # the end of the 5th sick answer
    m.clock.now += 10.0
    row = m.outlier.counters()["breakers"]["echo"][A.address]
    assert row["state"] == OPEN and row["ejections"] == 1 and row["consecutive_errors"] == 5
    assert row["half_open_in_s"] == pytest.approx(20.0, abs=0.02)
    assert row["last_transition_unix"] == pytest.approx(WALL_OFFSET_S + opened_at, abs=1e-3)
    assert row["last_transition_ago_s"] == pytest.approx(10.0, abs=0.02)
    assert row["transitions"] == {"CLOSED->OPEN": 1}
    assert row["recent"] == [{"at_unix": pytest.approx(WALL_OFFSET_S + opened_at, abs=1e-3),
                              "from": "CLOSED", "to": "OPEN",
                              "why": "5 consecutive errors (last UNAVAILABLE); ejected for "
                                     "30 s"}]
    m.clock.now += 20.0
    row = m.outlier.counters()["breakers"]["echo"][A.address]
    assert row["state"] == HALF_OPEN and row["half_open_in_s"] == 0.0
    assert m.outlier.counters()["breakers"]["echo"][B.address]["state"] == CLOSED


def test_the_ejecting_call_says_why() -> None:
    m = Mesh(snapshot((A, B), lb="round_robin"))
    calls = []
    for _ in range(10):
        call, _ = m.start()
        m.end(call, G.UNAVAILABLE if call.endpoint == A else 0)
        calls.append(call)
    assert calls[8].notes == [f"outlier detection: ejected {A.address} for 30 s: 5 "
                              "consecutive errors (last UNAVAILABLE)"]


def test_breaker_views_cover_every_endpoint_of_the_snapshot() -> None:
    m = Mesh(snapshot((A, B, C), lb="round_robin"))
    m.spread(15, status=sick(A))
    views = m.outlier.breaker_views()
    assert set(views) == {A.address, B.address, C.address}
    assert views[A.address].state == OPEN and views[A.address].ejections == 1
    assert views[A.address].last_transition_unix > WALL_OFFSET_S
    assert views[C.address] == BreakerView(CLOSED, 0, 0, 0.0, 0.0)


def test_the_state_report_carries_breakers_and_limits() -> None:
    snap = Snapshot("1", clusters=(Cluster("echo", (A, B)),))
    resilience = ResilienceReport(
        {A.address: BreakerView(OPEN, 5, 2, 12.5, WALL_OFFSET_S)},
        (LimitView("echo", "max_requests", 3, 1024, 7),))
    msg = report_message(StatsReport(5.0, {}, {}), snap, health="SERVING",
                         cert_not_after_unix=1, resilience=resilience)
    rep = msg.report
    a, b = rep.endpoints
    assert (a.breaker, a.consecutive_errors, a.ejections, a.half_open_in_s,
            a.last_transition_unix) == (OPEN, 5, 2, 12.5, WALL_OFFSET_S)
    assert b.breaker == "" and b.ejections == 0  # not in the report: none
    assert list(rep.limits) == [pb.LimitState(upstream="echo", limit="max_requests", in_use=3,
                                              max=1024, fast_fails=7)]
    plain = report_message(StatsReport(5.0, {}, {}), snap, health="", cert_not_after_unix=1)
    assert [e.breaker for e in plain.report.endpoints] == ["", ""] and not plain.report.limits
