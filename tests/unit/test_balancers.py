"""The balancers without sockets: round robin, random, least request (power of two choices)
and peak EWMA, over a fake clock and seeded draws; what they skip (ejected endpoints, the
endpoints an earlier attempt tried), how outcomes feed them back, and what survives a
snapshot swap. The property test: no balancer ever picks an ejected endpoint."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_common.snapshot import LOAD_BALANCERS, OutlierPolicy
from sidecar.http2 import grpc as G
from sidecar.http2.relay import LocalReply
from sidecar.layers.balance import (
    DECAY_S,
    PENALTY_CAP_S,
    ewma_cost,
    ewma_observe,
    failure_sample,
)
from sidecar.layers.outlier import CLOSED, HALF_OPEN, OPEN, Breaker
from sidecar.upstream import DEFAULT_RTT_S, EndpointState
from tests.unit.resilience_support import Mesh, ep, snapshot

A, B, C = ep(1), ep(2), ep(3)
NO_EJECTIONS = OutlierPolicy(consecutive_errors=0)


# ====================================================================== the four balancers
def test_round_robin_takes_the_endpoints_in_turn() -> None:
    m = Mesh(snapshot((A, B, C), lb="round_robin"))
    assert [m.one() for _ in range(6)] == [A.address, B.address, C.address] * 2


def test_random_spreads_calls_evenly() -> None:
    m = Mesh(snapshot((A, B, C), lb="random"), seed=3)
    counts = m.spread(6000)
    assert all(abs(counts[e.address] - 2000) < 200 for e in (A, B, C)), counts


def test_least_request_prefers_the_endpoint_with_fewer_calls_in_flight() -> None:
    m = Mesh(snapshot((A, B, C), lb="least_request"))
    m.state(A).in_flight = 5  # busy with calls of an earlier moment
    counts = m.spread(300)
    assert counts[A.address] == 0 and counts[B.address] > 100 and counts[C.address] > 100


def test_least_request_keeps_two_endpoints_level_under_concurrency() -> None:
    m = Mesh(snapshot((A, B), lb="least_request"))
    held = [m.start()[0] for _ in range(21)]
    per = Counter(call.endpoint.address for call in held)
    assert sorted(per.values()) == [10, 11]


@pytest.mark.parametrize("lb", LOAD_BALANCERS)
def test_every_balancer_counts_calls_in_flight_and_releases_them_at_the_end(lb: str) -> None:
    m = Mesh(snapshot((A, B, C), lb=lb))
    held = [m.start()[0] for _ in range(30)]
    assert sum(m.state(e).in_flight for e in (A, B, C)) == 30
    for call in held:
        m.end(call)
    assert [m.state(e).in_flight for e in (A, B, C)] == [0, 0, 0]


# ====================================================================== peak EWMA
def test_peak_ewma_moves_load_away_from_a_slow_endpoint() -> None:
    m = Mesh(snapshot((A, B, C), outlier=NO_EJECTIONS))
    counts = m.spread(2000, latency_s={A.address: 0.100, B.address: 0.010, C.address: 0.010})
    assert counts[A.address] < 40, counts  # under 2%: a few, as its estimate decays
    assert abs(counts[B.address] - counts[C.address]) < 400, counts


def test_peak_ewma_does_not_favour_an_endpoint_that_fails_fast() -> None:
    m = Mesh(snapshot((A, B), outlier=NO_EJECTIONS))
    counts = m.spread(2000, latency_s={A.address: 0.001, B.address: 0.050},
                     status={A.address: G.UNAVAILABLE})
    assert counts[A.address] < 40, counts
    assert m.state(A).ewma_s > m.state(B).ewma_s


def test_business_answers_are_latencies_like_any_other() -> None:
    m = Mesh(snapshot((A, B), outlier=NO_EJECTIONS))
    counts = m.spread(2000, latency_s={A.address: 0.001, B.address: 0.050},
                     status={A.address: 5})  # NOT_FOUND
    assert counts[A.address] > 1900, counts  # NOT_FOUND fast is just fast


def test_peak_ewma_spreads_equal_endpoints_by_calls_in_flight() -> None:
    m = Mesh(snapshot((A, B, C)))
    held = [m.start()[0] for _ in range(60)]
    per = Counter(call.endpoint.address for call in held)
    assert max(per.values()) - min(per.values()) <= 3, per


def test_a_slow_endpoint_that_heals_wins_its_share_back() -> None:
    m = Mesh(snapshot((A, B), outlier=NO_EJECTIONS))
    m.spread(500, latency_s={A.address: 0.200, B.address: 0.010})
    assert m.state(A).ewma_s == pytest.approx(0.200)
    m.spread(5000, latency_s={A.address: 0.005, B.address: 0.010})  # ~50 s: A healed
    recent = m.spread(1000, latency_s={A.address: 0.005, B.address: 0.010})
    assert recent[A.address] > 500, recent


def test_a_stream_does_not_feed_the_latency_estimate() -> None:
    m = Mesh(snapshot((A,), outlier=NO_EJECTIONS))
    call, _ = m.start()
    call.resp_messages = 40  # a server stream: its length is not the endpoint's speed
    m.clock.now += 60.0
    m.end(call)
    assert m.state(A).ewma_s == DEFAULT_RTT_S and m.state(A).in_flight == 0


def test_the_estimate_jumps_to_a_peak_and_decays_when_left_alone() -> None:
    st_ = EndpointState("x", 0.0)
    ewma_observe(st_, 0.5, 1.0)
    assert st_.ewma_s == 0.5  # a slower answer replaces the estimate
    ewma_observe(st_, 0.1, 1.0 + DECAY_S)
    assert st_.ewma_s == pytest.approx(0.5 * math.exp(-1) + 0.1 * (1 - math.exp(-1)))
    idle = ewma_cost(st_, 1.0 + 3 * DECAY_S)
    assert idle == pytest.approx(st_.ewma_s * math.exp(-2))
    st_.in_flight = 3
    assert ewma_cost(st_, st_.stamp_s) == pytest.approx(4 * st_.ewma_s)


def test_a_sick_answer_counts_as_at_least_twice_the_estimate_up_to_a_cap() -> None:
    st_ = EndpointState("x", 0.0)
    st_.ewma_s = 0.040
    assert failure_sample(st_, 0.001) == pytest.approx(0.080)
    assert failure_sample(st_, 0.300) == pytest.approx(0.300)
    st_.ewma_s = 8.0
    assert failure_sample(st_, 0.001) == PENALTY_CAP_S


def test_the_two_choice_comparison_needs_no_clock() -> None:
    """The picker compares costs through the stamps' difference: the same answer as
    ``ewma_cost`` at any time."""
    m = Mesh(snapshot((A, B)))
    sa, sb = m.state(A), m.state(B)
    sa.ewma_s, sa.stamp_s, sa.in_flight = 0.200, 100.0, 0
    sb.ewma_s, sb.stamp_s, sb.in_flight = 0.020, 130.0, 1
    pick = m.balance._pickers["peak_ewma"]
    cand = type("C", (), {"rr": 0})()
    for now in (130.0, 200.0, 900.0):
        expected = 0 if ewma_cost(sa, now) < ewma_cost(sb, now) else 1
        assert pick(cand, (sa, sb)) == expected  # type: ignore[arg-type]


# ====================================================================== what is skipped
def test_a_retry_prefers_an_endpoint_not_tried() -> None:
    m = Mesh(snapshot((A, B, C), lb="round_robin"))
    for _ in range(20):
        call, _ = m.start()
        first = call.endpoint
        call.grpc_status = G.UNAVAILABLE
        call.tried = (first,)  # what the retry layer leaves for the next pick
        decision = m.balance.on_request(call, m._pool)  # the layers below retry, again
        assert call.endpoint != first and decision.key == call.endpoint.address
        m.end(call)
    assert all(m.state(e).in_flight == 0 for e in (A, B, C))


def test_a_retry_goes_back_to_a_tried_endpoint_when_no_other_is_left() -> None:
    m = Mesh(snapshot((A,), lb="random"))
    call, _ = m.start()
    call.tried = (A,)
    m.balance.on_request(call, m._pool)
    assert call.endpoint == A


def test_a_retry_settles_the_previous_attempt_before_it_picks_again() -> None:
    m = Mesh(snapshot((A, B), lb="round_robin", outlier=OutlierPolicy(consecutive_errors=1)))
    call, _ = m.start()
    assert call.endpoint == A and m.state(A).in_flight == 1
    call.grpc_status = G.UNAVAILABLE  # a trailers-only answer the retry layer retries
    m.balance.on_request(call, m._pool)
    assert call.endpoint == B and call.tried == (A,)
    assert m.state(A).in_flight == 0 and m.state(B).in_flight == 1
    assert m.breaker(A).state == OPEN  # the failed attempt counted against A
    m.end(call)
    assert m.state(B).in_flight == 0 and m.breaker(B) is None  # an OK needs no breaker


def test_an_unprocessed_stream_is_no_verdict_on_the_endpoint() -> None:
    class RetryRecord:
        attempts = [(A.address, "goaway", G.UNAVAILABLE)]

    m = Mesh(snapshot((A, B), lb="round_robin", outlier=OutlierPolicy(consecutive_errors=1)))
    call, _ = m.start()
    call.retry = RetryRecord()
    call.grpc_status = G.UNAVAILABLE
    m.balance.on_request(call, m._pool)
    assert m.breaker(A) is None or m.breaker(A).state == CLOSED


def test_ejected_endpoints_are_skipped_and_a_subset_of_ejected_ones_is_unavailable() -> None:
    v1, v2 = ep(1, version="v1"), ep(2, version="v2")
    m = Mesh(snapshot((v1, v2), subset={"version": "v2"}))
    b = Breaker(v2.address)
    b.eject(m.clock.now, OutlierPolicy(), "test")
    m.upstreams.set_gate(m.state(v2), b)
    call, decision = m.start()
    assert isinstance(decision, LocalReply) and decision.status == G.UNAVAILABLE
    assert decision.message == ("service 'echo': every endpoint of the subset is ejected by "
                                "outlier detection")
    m.end(call)
    m.snap = snapshot((v1, v2), version="2")
    assert m.spread(20) == {v1.address: 20}


def test_no_endpoint_or_no_healthy_endpoint_is_unavailable() -> None:
    m = Mesh(snapshot(()))
    assert m.start()[1].message == "service 'echo' has no endpoints"
    m.snap = snapshot((ep(1, healthy=False),), version="2")
    assert m.start()[1].message == "service 'echo' has no healthy endpoints"


def test_endpoint_state_survives_a_snapshot_swap() -> None:
    m = Mesh(snapshot((A, B), outlier=NO_EJECTIONS))
    m.spread(200, latency_s={A.address: 0.150})
    before = m.state(A).ewma_s
    m.snap = snapshot((ep(1), ep(2), C), outlier=NO_EJECTIONS, version="2")  # new objects
    assert m.state(A).ewma_s == before
    counts = m.spread(300, latency_s={A.address: 0.150})
    assert counts[A.address] < 15, counts


def test_an_endpoint_healthy_again_starts_its_estimate_over() -> None:
    m = Mesh(snapshot((A, B), outlier=NO_EJECTIONS))
    m.spread(50, latency_s={A.address: 0.150}, status={A.address: G.UNAVAILABLE})
    assert m.state(A).ewma_s > 0.1  # slow failures count
    m.snap = snapshot((ep(1, healthy=False), B), outlier=NO_EJECTIONS, version="2")
    m.one()
    assert m.state(A).ewma_s > 0.1  # still unhealthy: nothing forgotten
    m.snap = snapshot((ep(1), B), outlier=NO_EJECTIONS, version="3")
    m.one()
    assert m.state(A).ewma_s == DEFAULT_RTT_S


def test_an_endpoint_whose_breaker_closes_starts_its_estimate_over() -> None:
    m = Mesh(snapshot((A, B), outlier=OutlierPolicy(consecutive_errors=2, base_ejection_ms=1000)))
    while m.breaker(A) is None or m.breaker(A).state != OPEN:
        m.one(latency_s={A.address: 0.3}, status={A.address: G.UNAVAILABLE})
    assert m.state(A).ewma_s >= 0.3
    m.clock.now += 1.5  # ejection over: half-open probes go to A and succeed
    for _ in range(50):
        m.one()
        if m.breaker(A).state == CLOSED:
            break
    assert m.breaker(A).state == CLOSED
    assert m.state(A).ewma_s < 0.3  # the penalties are gone with the breaker


def test_endpoints_that_left_are_forgotten_unless_calls_are_in_flight() -> None:
    m = Mesh(snapshot((A, B)))
    held, _ = m.start()
    gone = held.endpoint
    m.one()
    m.snap = snapshot((C,), version="2")
    m.one()
    assert set(m.upstreams.endpoints) == {gone.address, C.address}
    m.end(held)
    assert m.upstreams.endpoints[gone.address].in_flight == 0


def test_a_service_without_a_route_uses_peak_ewma() -> None:
    m = Mesh(snapshot((A, B), route=False))
    counts = m.spread(1000, latency_s={A.address: 0.100})
    assert counts[A.address] < 30
    assert m.balance.counters()["balancers"]["services"] == {"echo": "peak_ewma"}


def test_the_balancers_counters_show_each_endpoint() -> None:
    m = Mesh(snapshot((A, B), lb="least_request"))
    held, _ = m.start()
    section = m.balance.counters()["balancers"]
    assert section["services"] == {"echo": "least_request"}
    assert section["endpoints"][held.endpoint.address]["in_flight"] == 1
    assert set(section["endpoints"][A.address]) == {"in_flight", "ewma_ms", "cost_ms"}
    assert section["ewma_decay_s"] == m.balance.decay_s == 10.0


# ====================================================================== property
@st.composite
def held_out(draw: st.DrawFn) -> tuple[int, list[str], list[int], int]:
    """n endpoints; per endpoint CLOSED, OPEN (time left), HALF_OPEN with k of max probes
    used; which of them earlier attempts tried."""
    n = draw(st.integers(1, 6))
    kinds = draw(st.lists(st.sampled_from([CLOSED, OPEN, HALF_OPEN]), min_size=n, max_size=n))
    used = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    tried_mask = draw(st.integers(0, 2 ** n - 1))
    return n, kinds, used, tried_mask


@settings(deadline=None, max_examples=300)
@given(case=held_out(), lb=st.sampled_from(LOAD_BALANCERS), seed=st.integers(0, 2 ** 32 - 1),
       picks=st.integers(1, 6))
def test_no_balancer_ever_picks_an_ejected_endpoint(
        case: tuple[int, list[str], list[int], int], lb: str, seed: int, picks: int) -> None:
    n, kinds, used, tried_mask = case
    eps = tuple(ep(i + 1) for i in range(n))
    policy = OutlierPolicy(half_open_probes=2)
    m = Mesh(snapshot(eps, lb=lb, outlier=policy), seed=seed)
    for e, kind, k in zip(eps, kinds, used, strict=True):
        if kind is CLOSED:
            continue
        b = Breaker(e.address)
        b.eject(m.clock.now - (31.0 if kind is HALF_OPEN else 0.0), policy, "test")
        m.upstreams.set_gate(m.state(e), b)
        m.state(e).outlier = b
        if kind is HALF_OPEN:
            assert b.admits(m.clock.now) and b.state is HALF_OPEN
            for _ in range(k):
                b.admit(object(), m.clock.now)
    tried = tuple(e for i, e in enumerate(eps) if tried_mask >> i & 1)
    for _ in range(picks):
        allowed = [e for e in eps if (g := m.state(e).gate) is None or g.admits(m.clock.now)]
        call, decision = m.start(tried=tried)
        if not allowed:
            assert isinstance(decision, LocalReply) and decision.status == G.UNAVAILABLE
            continue
        chosen = call.endpoint
        assert chosen in allowed
        fresh = [e for e in allowed if e not in tried]
        if fresh:
            assert chosen in fresh
        gate = m.state(chosen).gate
        if gate is not None:  # HALF_OPEN: it took a probe slot, never more than the max
            assert len(gate.probes) + gate.probe_oks <= policy.half_open_probes
