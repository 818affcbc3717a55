"""Circuit limits per upstream service without sockets: requests in flight, calls waiting
for a connection, connections, concurrent retries. Past a limit a call fails fast with
UNAVAILABLE naming the limit, is marked ``fast_fail`` and never counts against an endpoint;
every slot taken is given back exactly once (property-tested)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_common.snapshot import CircuitLimits
from sidecar.http2 import grpc as G
from sidecar.http2.relay import Call, LocalReply
from sidecar.upstream import LIMIT_NAMES, LimitView, Upstream
from tests.unit.resilience_support import Mesh, ep, snapshot

A, B = ep(1), ep(2)


def limits(**kw: int) -> CircuitLimits:
    return CircuitLimits(**kw)


def upstream(m: Mesh) -> Upstream:
    return m.upstreams.services["echo"]


def test_calls_past_max_requests_fail_fast_naming_the_limit() -> None:
    m = Mesh(snapshot((A, B), limits=limits(max_requests=3)))
    held = [m.start()[0] for _ in range(3)]
    call, decision = m.start()
    assert isinstance(decision, LocalReply) and decision.status == G.UNAVAILABLE
    assert decision.message == "fast-fail: max_requests limit of 3 reached for echo"
    assert call.fast_fail and call.notes == [decision.message]
    assert call.endpoint is None and call.upstream is None  # no slot, no pick
    m.end(call)
    assert upstream(m).requests == 3 and upstream(m).fast_fails["max_requests"] == 1
    m.end(held.pop())
    assert not isinstance(m.start()[1], LocalReply)


def test_a_call_holds_its_request_slot_whatever_answers_it() -> None:
    m = Mesh(snapshot(()))  # no endpoints: the balancer answers UNAVAILABLE
    call, decision = m.start()
    assert isinstance(decision, LocalReply) and call.upstream is upstream(m)
    assert upstream(m).requests == 1
    m.end(call)
    assert upstream(m).requests == 0


def test_calls_waiting_for_a_connection_past_max_pending_fail_fast() -> None:
    m = Mesh(snapshot((A, B), lb="round_robin", limits=limits(max_pending=2)), real_pools=True)
    waiting = []
    for _ in range(2):
        call, pool = m.start()
        pool.waiting.append(call)  # as the relay queues it: no connection yet
        waiting.append(call)
    call, decision = m.start()
    assert isinstance(decision, LocalReply)
    assert decision.message == "fast-fail: max_pending limit of 2 reached for echo"
    assert call.fast_fail and call.endpoint is not None  # refused after the pick
    m.end(call)
    assert sum(m.state(e).in_flight for e in (A, B)) == 2  # the pick was given back
    assert m.breaker(call.endpoint) is None  # never counted against the endpoint
    assert upstream(m).in_use("max_pending") == 2
    for c in waiting:
        m.pools[c.endpoint.address].waiting.remove(c)
        m.pools[c.endpoint.address].conns.append(object())  # connected: nobody waits
        m.end(c)
    assert [upstream(m).in_use(k) for k in ("max_requests", "max_pending")] == [0, 0]
    assert not isinstance(m.start()[1], LocalReply)


def test_a_call_that_would_open_a_connection_past_max_connections_fails_fast() -> None:
    m = Mesh(snapshot((A, B), lb="round_robin", limits=limits(max_connections=1)),
             real_pools=True)
    first, pool_a = m.start()
    assert first.endpoint == A
    pool_a.conns.append(object())  # A's connection is up
    call, decision = m.start()  # to B, which has none: it would open a second one
    assert call.endpoint == B and isinstance(decision, LocalReply)
    assert decision.message == "fast-fail: max_connections limit of 1 reached for echo"
    m.end(call)
    again, pool = m.start()  # to A: fits on the open connection
    assert again.endpoint == A and pool is pool_a
    assert upstream(m).connections() == 1 and upstream(m).fast_fails["max_connections"] == 1


def test_retry_slots_are_limited_and_counted() -> None:
    m = Mesh(snapshot((A,), limits=limits(max_retries=2)))
    call, _ = m.start()
    up = call.upstream
    assert up.max_retries == 2 and up.retries_in_flight == 0
    assert up.take_retry() and up.take_retry()
    assert not up.take_retry()
    assert up.retries_in_flight == 2 and up.fast_fails["max_retries"] == 1
    assert up.fast_fail_message("max_retries") == \
        "fast-fail: max_retries limit of 2 reached for echo"
    up.release_retry()
    up.release_retry()
    up.release_retry()  # one too many: never below zero
    assert up.retries_in_flight == 0


def test_limits_follow_the_snapshot_and_the_counts_carry_over() -> None:
    m = Mesh(snapshot((A,), limits=limits(max_requests=2)))
    held = [m.start()[0] for _ in range(2)]
    m.snap = snapshot((A,), limits=limits(max_requests=3), version="2")
    assert not isinstance(m.start()[1], LocalReply)
    assert isinstance(m.start()[1], LocalReply)
    for c in held:
        m.end(c)
    assert upstream(m).requests == 1


def test_a_service_without_a_route_gets_the_default_limits() -> None:
    m = Mesh(snapshot((A,), route=False))
    call, _ = m.start()
    assert call.upstream.limits == CircuitLimits()


def test_limits_are_counted_for_stats_and_the_report() -> None:
    m = Mesh(snapshot((A,), limits=limits(max_requests=1, max_retries=4)))
    held, _ = m.start()
    m.end(m.start()[0])
    held.upstream.take_retry()
    assert m.limits.counters()["limits"] == {"echo": {
        "max_connections": {"in_use": 0, "max": 1024, "fast_fails": 0},
        "max_pending": {"in_use": 0, "max": 1024, "fast_fails": 0},
        "max_requests": {"in_use": 1, "max": 1, "fast_fails": 1},
        "max_retries": {"in_use": 1, "max": 4, "fast_fails": 0}}}
    assert m.limits.limit_views() == tuple(
        LimitView("echo", k, *v) for k, v in (("max_connections", (0, 1024, 0)),
                                              ("max_pending", (0, 1024, 0)),
                                              ("max_requests", (1, 1, 1)),
                                              ("max_retries", (1, 4, 0))))
    assert [v.limit for v in m.limits.limit_views()] == list(LIMIT_NAMES)


@settings(deadline=None, max_examples=200)
@given(max_requests=st.integers(1, 5), max_retries=st.integers(0, 3),
       ops=st.lists(st.tuples(st.sampled_from(["start", "end", "retry", "done"]),
                              st.integers(0, 20)), max_size=120))
def test_slots_are_taken_within_the_limits_and_given_back_exactly_once(
        max_requests: int, max_retries: int, ops: list[tuple[str, int]]) -> None:
    m = Mesh(snapshot((A, B), limits=limits(max_requests=max_requests,
                                            max_retries=max_retries)))
    admitted: list[Call] = []
    retrying: list[Call] = []
    refused = 0
    for kind, n in ops:
        up = m.upstreams.services.get("echo")
        if kind == "start":
            call, decision = m.start()
            if len(admitted) >= max_requests:
                assert isinstance(decision, LocalReply) and call.fast_fail
                refused += 1
                m.end(call)  # a refused call ends at once; it gives back nothing
            else:
                assert not isinstance(decision, LocalReply)
                admitted.append(call)
        elif kind == "retry" and admitted:
            call = admitted[n % len(admitted)]
            if call not in retrying:
                if call.upstream.take_retry():
                    retrying.append(call)
                else:
                    assert len(retrying) >= max_retries
        elif kind in ("end", "done") and admitted:
            call = admitted.pop(n % len(admitted))
            if call in retrying:  # the retry layer gives its slot back when the call ends
                retrying.remove(call)
                call.upstream.release_retry()
            m.end(call)
        if up is not None:
            assert up.requests == len(admitted) <= max_requests
            assert up.retries_in_flight == len(retrying) <= max_retries
            assert up.fast_fails["max_requests"] == refused
        assert sum(m.state(e).in_flight for e in (A, B)) == len(admitted)
    for call in admitted:
        if call in retrying:
            call.upstream.release_retry()
        m.end(call)
    up = m.upstreams.services.get("echo")
    if up is not None:
        assert up.requests == 0 and up.retries_in_flight == 0
    assert all(m.state(e).in_flight == 0 for e in (A, B))
