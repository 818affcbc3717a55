"""The relay's side of traffic policy, sans-IO (the in-memory mesh of ``test_relay``): a
``Delayed`` decision holds the request and forwards it after the delay, the caller's deadline
keeps running during a delay, and a route timeout (``call.route_timeout_s``) shorter than the
caller's deadline wins, counted from dispatch, with the remaining time sent on as
``grpc-timeout``. Last, the real outbound stack (fault delay, route timeout) driving the relay."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from mesh_common.snapshot import (
    Cluster,
    Destination,
    Endpoint,
    FaultRule,
    RouteMatch,
    RouteRule,
    Rule,
    Snapshot,
)
from sidecar.http2 import frames as F
from sidecar.http2 import grpc as G
from sidecar.http2.pool import Pool
from sidecar.http2.relay import Call, Delayed, LocalReply
from sidecar.layers.stats import Stats
from sidecar.stack import outbound_stack
from tests.unit.test_relay import Hooks, Mesh, grpc_message, request_block

Decide = Callable[[Call, Pool], "Pool | LocalReply | Delayed"]


class PolicyHooks(Hooks):
    """The test relay's hooks, with the decision made by ``decide(call, pool)``."""

    def __init__(self, mesh: Mesh, decide: Decide) -> None:
        super().__init__(mesh)
        self.decide = decide

    def on_request(self, call: Call) -> Pool | LocalReply | Delayed:  # type: ignore[override]
        self.calls.append(call)
        return self.decide(call, self.mesh.pool)


def mesh_with(decide: Decide) -> Mesh:
    mesh = Mesh()
    mesh.hooks = PolicyHooks(mesh, decide)
    mesh.relay.hooks = mesh.hooks
    return mesh


def forwarded_timeout_s(mesh: Mesh) -> float | None:
    (link,) = mesh.links
    (up_sid,) = link.backend.timeouts
    value = link.backend.timeouts[up_sid]
    return None if value is None else G.parse_timeout(value)


# ====================================================================== delays
def test_a_delayed_decision_holds_the_request_and_forwards_it_after_the_delay() -> None:
    mesh = mesh_with(lambda call, pool: Delayed(0.2, pool))
    caller = mesh.caller()
    sid = caller.start()
    caller.send(sid, grpc_message(b"later"), end=True)
    mesh.pump()
    assert mesh.links == [] and mesh.connects == []  # nothing left for the upstream yet
    (call,) = mesh.hooks.calls
    assert b"".join(call.pending) == grpc_message(b"later")  # held, not dropped
    mesh.timers.advance(0.199)
    mesh.pump()
    assert mesh.links == [] and caller.headers[sid] == []
    mesh.timers.advance(0.002)
    mesh.pump()
    (link,) = mesh.links
    assert bytes(link.backend.received[1]) == grpc_message(b"later")
    assert caller.status(sid) == ("0", "") and bytes(caller.body[sid]) == grpc_message(b"later")
    assert mesh.relay.stats["delayed"] == 1
    mesh.assert_quiet_and_done()


def test_a_delayed_local_reply_answers_after_the_delay() -> None:
    mesh = mesh_with(lambda call, pool: Delayed(0.1, LocalReply(G.UNAVAILABLE, "injected")))
    caller = mesh.caller()
    sid = caller.start(end=True)
    mesh.pump()
    assert caller.headers[sid] == []
    mesh.timers.advance(0.1)
    mesh.pump()
    assert caller.status(sid) == (str(G.UNAVAILABLE), "injected")
    assert mesh.links == []
    mesh.assert_quiet_and_done()


def test_the_callers_deadline_fires_during_a_delay_and_nothing_is_sent_on() -> None:
    mesh = mesh_with(lambda call, pool: Delayed(0.5, pool))
    caller = mesh.caller()
    sid = caller.start(request_block(timeout="100m"), end=True)
    mesh.pump()
    mesh.timers.advance(0.1)
    mesh.pump()
    code, message = caller.status(sid)
    assert code == str(G.DEADLINE_EXCEEDED) and "after 100 ms" in message
    mesh.timers.advance(1)  # the delay ends: the call is over, so it goes nowhere
    mesh.pump()
    assert mesh.links == [] and mesh.connects == []
    assert mesh.relay.stats["deadlines_exceeded"] == 1
    mesh.assert_quiet_and_done()


def test_a_caller_that_resets_during_a_delay_is_never_sent_on() -> None:
    mesh = mesh_with(lambda call, pool: Delayed(0.3, pool))
    caller = mesh.caller()
    sid = caller.start()
    mesh.pump()
    caller.conn.reset_stream(sid, F.CANCEL)
    mesh.pump()
    mesh.timers.advance(0.5)
    mesh.pump()
    assert mesh.links == [] and mesh.connects == []
    mesh.assert_quiet_and_done()


def test_a_pool_retired_during_the_delay_gives_unavailable_instead_of_waiting_forever() -> None:
    mesh = mesh_with(lambda call, pool: Delayed(0.2, pool))
    caller = mesh.caller()
    sid = caller.start(end=True)
    mesh.pump()
    mesh.pool.closed = True  # its endpoint left the snapshot meanwhile
    mesh.timers.advance(0.2)
    mesh.pump()
    code, message = caller.status(sid)
    assert code == str(G.UNAVAILABLE) and "left the mesh" in message
    mesh.assert_quiet_and_done()


# ====================================================================== route timeouts
def with_route_timeout(timeout_s: float, delay_s: float = 0.0) -> Decide:
    def decide(call: Call, pool: Pool) -> Pool | Delayed:
        call.route_timeout_s = timeout_s
        return Delayed(delay_s, pool) if delay_s else pool
    return decide


def test_a_route_timeout_shorter_than_the_callers_deadline_wins() -> None:
    mesh = mesh_with(with_route_timeout(0.3))
    caller = mesh.caller()
    sid = caller.start(request_block("/test/Silent", timeout="2S"), end=True)
    mesh.pump()
    assert forwarded_timeout_s(mesh) == pytest.approx(0.3, abs=1e-5)  # the remaining time
    mesh.timers.advance(0.299)
    mesh.pump()
    assert caller.headers[sid] == []
    mesh.timers.advance(0.002)
    mesh.pump()
    code, message = caller.status(sid)
    assert code == str(G.DEADLINE_EXCEEDED)
    assert message == "deadline exceeded at the sidecar after 300 ms (the route's timeout of 300 ms)"
    (link,) = mesh.links
    assert link.backend.resets == {1: F.CANCEL}
    assert mesh.relay.stats["route_timeouts"] == 1
    mesh.timers.advance(5)  # the caller's own deadline is gone with the call
    mesh.pump()
    assert mesh.relay.stats["deadlines_exceeded"] == 1
    mesh.assert_quiet_and_done()


def test_a_sooner_callers_deadline_wins_over_the_route_timeout() -> None:
    mesh = mesh_with(with_route_timeout(1.0))
    caller = mesh.caller()
    sid = caller.start(request_block("/test/Silent", timeout="200m"), end=True)
    mesh.pump()
    assert forwarded_timeout_s(mesh) == pytest.approx(0.2, abs=1e-5)
    mesh.timers.advance(0.2)
    mesh.pump()
    code, message = caller.status(sid)
    assert code == str(G.DEADLINE_EXCEEDED) and "route" not in message
    assert mesh.relay.stats["route_timeouts"] == 0
    mesh.assert_quiet_and_done()


def test_a_route_timeout_without_a_caller_deadline_is_sent_on() -> None:
    mesh = mesh_with(with_route_timeout(0.4))
    caller = mesh.caller()
    sid = caller.start(request_block("/test/Silent"), end=True)
    mesh.pump()
    assert forwarded_timeout_s(mesh) == pytest.approx(0.4, abs=1e-5)
    mesh.timers.advance(0.4)
    mesh.pump()
    assert caller.status(sid)[0] == str(G.DEADLINE_EXCEEDED)
    mesh.assert_quiet_and_done()


def test_a_route_timeout_runs_from_dispatch_and_the_remaining_deadline_goes_on() -> None:
    """Delayed 0.5 s, then a 1 s route timeout against a 1.2 s caller deadline: at dispatch
    the caller has 0.7 s left, which is sooner, so 0.7 s is sent on and fires."""
    mesh = mesh_with(with_route_timeout(1.0, delay_s=0.5))
    caller = mesh.caller()
    sid = caller.start(request_block("/test/Silent", timeout="1200m"), end=True)
    mesh.pump()
    mesh.timers.advance(0.5)
    mesh.pump()
    assert forwarded_timeout_s(mesh) == pytest.approx(0.7, abs=1e-5)
    mesh.timers.advance(0.699)
    mesh.pump()
    assert caller.headers[sid] == []
    mesh.timers.advance(0.002)
    mesh.pump()
    assert caller.status(sid)[0] == str(G.DEADLINE_EXCEEDED)
    mesh.assert_quiet_and_done()


def test_a_route_timeout_does_not_cut_a_call_that_completes() -> None:
    mesh = mesh_with(with_route_timeout(0.5))
    caller = mesh.caller()
    sid = caller.start(request_block(timeout="5S"))
    caller.send(sid, grpc_message(b"ok"), end=True)
    mesh.pump()
    assert caller.status(sid) == ("0", "")
    assert not mesh.timers.live
    mesh.assert_quiet_and_done()


# ====================================================================== the real stack
def test_the_outbound_stack_delays_by_fault_then_sends_the_route_timeout_on() -> None:
    """Fault delay 250 ms and a rule timeout of 400 ms, through the real layers: nothing
    reaches the backend for 250 ms, then it sees grpc-timeout 400 ms (no caller deadline)."""
    endpoint = Endpoint("10.0.0.1", 15006, "spiffe://mesh.local/service/echo", "echo-1",
                        (("version", "v2"),))
    snapshot = Snapshot("1", clusters=(Cluster("echo", (endpoint,)),), routes=(RouteRule(
        "echo", "echo",
        (Rule("v2", RouteMatch(), (Destination((("version", "v2"),), 100),), timeout_ms=400),),
        faults=(FaultRule("slow", None, delay_ms=250, delay_percent=100),)),))
    mesh = Mesh()
    picked: list[Endpoint] = []

    def endpoint_pool(ep: Endpoint, route: str) -> Pool:
        picked.append(ep)
        return mesh.pool

    stack = outbound_stack(lambda: snapshot, Stats(mesh.clock), endpoint_pool, random.Random(1))
    mesh.relay.hooks = stack
    caller = mesh.caller()
    sid = caller.start(request_block("/test/Silent"), end=True)
    mesh.pump()
    assert mesh.links == []
    mesh.timers.advance(0.25)
    mesh.pump()
    assert picked == [endpoint]
    assert forwarded_timeout_s(mesh) == pytest.approx(0.4, abs=1e-5)
    mesh.timers.advance(0.4)
    mesh.pump()
    code, message = caller.status(sid)
    assert code == str(G.DEADLINE_EXCEEDED) and "after 650 ms (the route's timeout of 400 ms)" \
        in message
    assert stack.counters()["faults"] == {"echo": {"abort": 0, "delay": 1}}
    assert mesh.relay.active == 0 and not mesh.timers.live
