"""Retries done by the mesh (gRFC A6), sans-IO: the relay between in-memory peers (the harness
of ``test_relay``) with the outbound layers composed around the retry layer, two endpoints
whose backends answer as each test scripts them, fake time. Last, the retry budget alone and
its property: whatever the traffic, the retries granted in any window of the budget's length
stay within 20% of that window's requests plus 10 per second of it."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_common.limits import Limits
from mesh_common.snapshot import (
    CircuitLimits,
    Cluster,
    Endpoint,
    FaultRule,
    RetryPolicy,
    RouteRule,
    Snapshot,
    StringMatch,
)
from sidecar.http2 import frames as F
from sidecar.http2 import grpc as G
from sidecar.http2.connection import H2Connection
from sidecar.http2.headers import encode_block
from sidecar.http2.pool import Pool
from sidecar.http2.relay import Call, LocalReply
from sidecar.layers.base import Decision, Layer, Next
from sidecar.layers.fault import Fault
from sidecar.layers.retry import Retry, RetryState, parse_pushback
from sidecar.layers.route import Route
from sidecar.layers.stats import Stats
from sidecar.layers.timeout import Timeout
from sidecar.retry_budget import RetryBudget
from sidecar.stack import Stack, outbound_stack
from sidecar.upstream import Upstream
from tests.unit.test_relay import Backend, Hooks, Link, Mesh, grpc_message, request_block

SAY = "/echo.Echo/Say"
A = Endpoint("10.0.0.1", 15006, "spiffe://mesh.local/service/echo", "echo-1")
B = Endpoint("10.0.0.2", 15006, "spiffe://mesh.local/service/echo", "echo-2")
C = Endpoint("10.0.0.3", 15006, "spiffe://mesh.local/service/echo", "echo-3")


# ================================================================ scripted endpoints
def trailers_only(status: int, pushback: str | None = None) -> bytes:
    fields = [(":status", "200"), ("content-type", "application/grpc"),
              ("grpc-status", str(status)), ("grpc-message", "endpoint says no")]
    if pushback is not None:
        fields.append(("grpc-retry-pushback-ms", pushback))
    return encode_block(fields)


class Scripted(Backend):
    """A backend that answers as its endpoint's mode says (else echoes, as ``Backend``):

    * ``unavailable``: trailers-only UNAVAILABLE at once (``pushback`` adds the header);
    * ``unavailable_at_end``: the same, once the whole request has arrived;
    * ``committed_error``: response headers at once, then UNAVAILABLE in trailers;
    * ``silent``: never answers; ``refuse``: RST_STREAM REFUSED_STREAM at once."""

    def __init__(self, limits: Limits, mode: str, pushback: str | None, log: list) -> None:
        super().__init__(limits)
        self.mode = mode
        self.pushback = pushback
        self.log = log  # (mode, path) of every stream any scripted backend saw, in order

    def handle(self, events: list) -> None:
        from sidecar.http2.events import DataReceived, HeadersReceived
        rest = []
        for ev in events:
            t = type(ev)
            if self.mode == "ok" or self.dead:
                rest.append(ev)
                continue
            sid = ev.stream_id if hasattr(ev, "stream_id") else 0
            if t is HeadersReceived and ev.first:
                self.paths[sid] = ev.headers.get(":path") or ""
                self.received[sid] = bytearray()
                self.log.append((self.mode, self.paths[sid]))
                if self.mode == "unavailable":
                    self.conn.send_headers(sid, trailers_only(G.UNAVAILABLE, self.pushback), True)
                elif self.mode == "refuse":
                    self.conn.reset_stream(sid, F.REFUSED_STREAM)
                elif self.mode == "committed_error":
                    self.conn.send_headers(sid, encode_block([(":status", "200"), (
                        "content-type", "application/grpc")]), False)
                if ev.end_stream:
                    self._ended(sid)
            elif t is DataReceived:
                self.received.setdefault(sid, bytearray()).extend(ev.data)
                self.conn.ack_data(sid, len(ev.data))
                if ev.end_stream:
                    self._ended(sid)
            elif t is HeadersReceived:
                self._ended(sid)
            else:
                rest.append(ev)
        if rest:
            super().handle(rest)

    def _ended(self, sid: int) -> None:
        self.ended_requests.add(sid)
        if sid in self.conn.streams and not self.conn.streams[sid].send_closed:
            if self.mode == "unavailable_at_end":
                self.conn.send_headers(sid, trailers_only(G.UNAVAILABLE), True)
            elif self.mode == "committed_error":
                self.conn.send_trailers(sid, encode_block([("grpc-status", str(G.UNAVAILABLE)),
                                                           ("grpc-message", "late failure")]))


class StackHooks(Hooks):
    """The test relay's hooks (recording calls, checking ids) around a real ``Stack``."""

    def __init__(self, mesh: Mesh, stack: Stack) -> None:
        super().__init__(mesh)
        self.stack = stack

    def on_request(self, call: Call) -> Decision:  # type: ignore[override]
        self.calls.append(call)
        return self.stack.on_request(call)

    def on_response(self, call: Call) -> None:
        super().on_response(call)
        self.stack.on_response(call)

    def on_end(self, call: Call) -> None:
        super().on_end(call)
        self.stack.on_end(call)


class FastFail(Layer):
    """Stands for the limits layer: paths under ``/full/`` fail fast; every call gets
    ``upstream`` (``call.upstream``) with a retry limit."""

    def __init__(self, upstream: Any = None) -> None:
        self.upstream = upstream

    def on_request(self, call: Call, next: Next) -> Decision:
        if call.path.startswith("/full/"):
            call.fast_fail = True
            return LocalReply(G.UNAVAILABLE, "service 'echo': max_requests (1) reached")
        call.upstream = self.upstream
        return next(call)


class FirstUntried(Layer):
    """A balancer for these tests: the first endpoint of the cluster an earlier attempt of
    the call did not go to, else the first one (the real balancers prefer untried endpoints
    too, by their own rules)."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict  # only untried endpoints; none left: UNAVAILABLE

    def on_request(self, call: Call, next: Next) -> Decision:
        eps = call.cluster.healthy
        if self.strict and all(e in call.tried for e in eps):
            return LocalReply(G.UNAVAILABLE, "no endpoint left to try")
        call.endpoint = next_ep = next_untried(eps, call.tried)
        assert next_ep is not None
        return next(call)


def next_untried(eps: tuple[Endpoint, ...], tried: tuple[Endpoint, ...]) -> Endpoint | None:
    return next((e for e in eps if e not in tried), eps[0] if eps else None)


def upstream(max_retries: int, in_flight: int = 0) -> Upstream:
    up = Upstream("echo", CircuitLimits(max_retries=max_retries))
    up.retries_in_flight = in_flight
    return up


class RetryMesh(Mesh):
    """The relay with the outbound layers (stats → route → fault → [limits] → retry →
    timeout → first untried endpoint) over endpoints ``eps``; ``modes`` scripts each endpoint by address
    (``connect_fails`` for one whose connects fail)."""

    def __init__(self, policy: RetryPolicy | None = None, eps: tuple[Endpoint, ...] = (A, B),
                 modes: dict[str, str] | None = None, pushback: str | None = None,
                 faults: tuple[FaultRule, ...] = (), upstream: Any = None,
                 limits: Limits | None = None, real_stack: bool = False,
                 strict_balance: bool = False) -> None:
        super().__init__(limits=limits)
        self.modes = modes or {}
        self.pushback = pushback
        self.log: list[tuple[str, str]] = []
        self.pools: dict[str, Pool] = {}
        self.link_endpoint: dict[int, str] = {}
        self.snapshot = Snapshot("1", clusters=(Cluster("echo", eps),), routes=(RouteRule(
            "echo", "echo", faults=faults, retries=policy or RetryPolicy()),))
        rng = random.Random(7)
        stats = Stats(self.clock)
        if real_stack:
            self.stack = outbound_stack(lambda: self.snapshot, stats, self.endpoint_pool, rng)
        else:
            snap = lambda: self.snapshot  # noqa: E731
            self.stack = Stack([stats, Route(snap, rng), Fault(snap, rng), FastFail(upstream),
                                Retry(snap, rng, self.clock), Timeout(snap), FirstUntried(strict_balance)],
                               lambda call: self.endpoint_pool(call.endpoint, call.route))
        self.hooks = StackHooks(self, self.stack)
        self.relay.hooks = self.hooks

    def endpoint_pool(self, ep: Endpoint, route: str) -> Pool:
        pool = self.pools.get(ep.address)
        if pool is None:
            pool = self.pools[ep.address] = Pool(ep.address, f"{ep.address} ({route})", 4,
                                                 self._connect_requested)
        return pool

    def step(self) -> bool:
        moved = False
        while self.connects:  # as Mesh.step, with each endpoint's scripted backend
            moved = True
            pool = self.connects.pop(0)
            mode = self.modes.get(pool.key, "ok")
            if mode == "connect_fails":
                self.relay.pool_failed(pool, "connection refused")
                continue
            up = H2Connection(client=True, limits=self.limits)
            backend = Scripted(self.backend_limits, mode, self.pushback, self.log)
            self.relay.adopt(up)
            up.initiate()
            backend.conn.initiate()
            self.links.append(Link(up, backend))
            self.link_endpoint[id(backend)] = pool.key
            self.relay.pool_connected(pool, up)
        return super().step() or moved

    def backends_of(self, address: str) -> list[Scripted]:
        return [link.backend for link in self.links  # type: ignore[misc]
                if self.link_endpoint[id(link.backend)] == address]

    def streams_at(self, address: str) -> int:
        return sum(len(b.paths) for b in self.backends_of(address))

    def received_at(self, address: str) -> list[bytes]:
        return [bytes(body) for b in self.backends_of(address) for body in b.received.values()]

    def retries(self) -> dict[str, Any]:
        return self.stack.counters()["retries"]["echo"]


def one_call(mesh: RetryMesh, payload: bytes = b"hello", path: str = SAY,
             timeout: str | None = None) -> tuple[int, Call]:
    caller = mesh.caller()
    sid = caller.start(request_block(path, timeout=timeout))
    caller.send(sid, grpc_message(payload), end=True)
    mesh.pump()
    mesh.the_caller = caller  # type: ignore[attr-defined]
    return sid, mesh.hooks.calls[-1]


def status_of(mesh: RetryMesh, sid: int) -> tuple[str | None, str | None]:
    return mesh.the_caller.status(sid)  # type: ignore[attr-defined]


def settle(mesh: RetryMesh, seconds: float = 1.0) -> None:
    """Let backoffs run out (fake time) and the mesh go quiet."""
    for _ in range(int(seconds / 0.05)):
        mesh.timers.advance(0.05)
        mesh.pump()


# ================================================================ retried
def test_trailers_only_unavailable_is_retried_on_another_endpoint_and_the_caller_sees_ok() -> None:
    mesh = RetryMesh(modes={A.address: "unavailable"})
    sid, call = one_call(mesh, b"pay 10")
    assert mesh.the_caller.headers[sid] == []  # type: ignore[attr-defined]  # backing off
    settle(mesh)
    assert status_of(mesh, sid) == ("0", "")
    assert bytes(mesh.the_caller.body[sid]) == grpc_message(b"pay 10")  # type: ignore[attr-defined]
    assert mesh.received_at(B.address) == [grpc_message(b"pay 10")]  # the whole request again
    assert isinstance(call.retry, RetryState)
    assert call.retry.attempts == [(A.address, "UNAVAILABLE", G.UNAVAILABLE),
                                   (B.address, "final", G.OK)]
    assert call.tried == (A,) and call.endpoint is B and call.attempts == 2
    assert any(n.startswith(f"retry 1 of 2 after UNAVAILABLE from {A.address}: to {B.address}")
               for n in call.notes or ())
    counted = mesh.retries()
    assert counted["retried"] == {"UNAVAILABLE": 1}
    assert counted["succeeded_after_retry"] == 1 and counted["budget_exhausted"] == 0
    assert set(counted["not_retried"].values()) == {0}
    assert mesh.relay.stats["retries"] == 1
    mesh.assert_quiet_and_done()


def test_a_call_that_succeeds_at_once_keeps_the_shared_plan_and_records_nothing() -> None:
    mesh = RetryMesh()
    sid, call = one_call(mesh)
    assert status_of(mesh, sid) == ("0", "")
    assert not isinstance(call.retry, RetryState) and call.retry.attempts == ()
    assert call.tried == () and call.notes is None
    assert mesh.retries()["retried"] == {}
    mesh.assert_quiet_and_done()


def test_refused_stream_is_retried_at_once_under_the_same_accounting() -> None:
    mesh = RetryMesh(modes={A.address: "refuse"},
                     policy=RetryPolicy(non_idempotent=(StringMatch("exact", SAY),)))
    sid, call = one_call(mesh, b"charge")
    assert status_of(mesh, sid) == ("0", "")  # no backoff: the endpoint never processed it
    assert mesh.received_at(B.address) == [grpc_message(b"charge")]
    assert call.retry.attempts[0] == (A.address, "refused_stream", G.UNAVAILABLE)
    assert mesh.retries()["retried"] == {"refused_stream": 1}
    mesh.assert_quiet_and_done()


def test_a_connect_failure_is_retried_on_another_endpoint() -> None:
    mesh = RetryMesh(modes={A.address: "connect_fails"})
    sid, call = one_call(mesh, b"x" * 100)
    settle(mesh)
    assert status_of(mesh, sid) == ("0", "")
    assert mesh.received_at(B.address) == [grpc_message(b"x" * 100)]
    assert call.retry.attempts[0] == (A.address, "connect_failure", G.UNAVAILABLE)
    mesh.assert_quiet_and_done()


def test_every_endpoint_refusing_connections_ends_unavailable_after_max_attempts() -> None:
    mesh = RetryMesh(modes={A.address: "connect_fails", B.address: "connect_fails"})
    sid, call = one_call(mesh)
    settle(mesh)
    code, message = status_of(mesh, sid)
    assert code == str(G.UNAVAILABLE)
    assert message == f"upstream {A.address} (echo): connection refused after 3 attempts"
    assert [a[1] for a in call.retry.attempts] == ["connect_failure"] * 3
    mesh.assert_quiet_and_done()


def test_goaway_for_an_unprocessed_stream_is_retried_under_the_same_accounting() -> None:
    mesh = RetryMesh(eps=(A,))
    sid, _ = one_call(mesh)  # a ready connection to A
    assert status_of(mesh, sid) == ("0", "")
    (first,) = mesh.links
    caller = mesh.the_caller  # type: ignore[attr-defined]
    sid = caller.start(request_block())
    caller.send(sid, grpc_message(b"g" * 300))
    mesh.to_relay(caller)  # bound to the ready connection...
    first.backend.conn.goaway()  # ...which A closes before it sees the stream
    mesh.pump()
    caller.send(sid, grpc_message(b"h" * 10), end=True)
    mesh.pump()
    assert caller.status(sid) == ("0", "")
    call = mesh.hooks.calls[-1]
    assert call.retry.attempts[0] == (A.address, "goaway", G.UNAVAILABLE)
    second = mesh.links[-1]
    assert second is not first
    assert bytes(second.backend.received[1]) == grpc_message(b"g" * 300) + grpc_message(b"h" * 10)
    assert mesh.retries()["retried"] == {"goaway": 1}
    assert mesh.relay.stats["streams_resent"] == 0 and mesh.relay.stats["retries"] == 1
    mesh.assert_quiet_and_done()


def test_a_connection_lost_before_any_response_is_retried() -> None:
    mesh = RetryMesh(modes={A.address: "silent"})
    sid, call = one_call(mesh, b"lost?")
    (link,) = mesh.links
    link.closed = True
    mesh.relay.connection_lost(link.up, "connection reset by peer")
    settle(mesh)
    assert status_of(mesh, sid) == ("0", "")
    assert mesh.received_at(B.address) == [grpc_message(b"lost?")]
    assert call.retry.attempts[0] == (A.address, "connection_lost", G.UNAVAILABLE)
    mesh.assert_quiet_and_done()


def test_the_callers_deadline_during_a_backoff_ends_the_call() -> None:
    mesh = RetryMesh(modes={A.address: "unavailable"}, pushback="100")
    sid, call = one_call(mesh, timeout="150m")  # the retry waits 100 ms, then B is silent
    mesh.modes[B.address] = "silent"
    mesh.timers.advance(0.1)
    mesh.pump()
    assert mesh.streams_at(B.address) == 1
    mesh.timers.advance(0.05)
    mesh.pump()
    code, message = status_of(mesh, sid)
    assert code == str(G.DEADLINE_EXCEEDED) and "after 150 ms" in message
    (backend,) = mesh.backends_of(B.address)
    assert backend.resets == {1: F.CANCEL}
    mesh.assert_quiet_and_done()


# ================================================================ never retried
def test_a_committed_call_is_never_retried() -> None:
    mesh = RetryMesh(modes={A.address: "committed_error"})
    sid, call = one_call(mesh)
    settle(mesh)
    assert status_of(mesh, sid) == (str(G.UNAVAILABLE), "late failure")
    assert mesh.streams_at(A.address) == 1 and mesh.streams_at(B.address) == 0
    assert call.committed and call.replay is None  # nothing kept once committed
    counted = mesh.retries()
    assert counted["retried"] == {} and counted["not_retried"]["committed"] == 1
    mesh.assert_quiet_and_done()


def test_a_non_idempotent_method_is_not_retried() -> None:
    mesh = RetryMesh(modes={A.address: "unavailable"},
                     policy=RetryPolicy(non_idempotent=(StringMatch("prefix", "/echo.Echo/"),)))
    sid, call = one_call(mesh)
    settle(mesh)
    assert status_of(mesh, sid) == (str(G.UNAVAILABLE), "endpoint says no")
    assert mesh.streams_at(B.address) == 0
    assert mesh.retries()["not_retried"]["non_idempotent"] == 1
    assert any("marked non-idempotent" in n for n in call.notes or ())
    mesh.assert_quiet_and_done()


def test_other_methods_of_a_service_with_a_non_idempotent_one_are_retried() -> None:
    mesh = RetryMesh(modes={A.address: "unavailable"},
                     policy=RetryPolicy(non_idempotent=(StringMatch("exact", "/echo.Echo/Pay"),)))
    sid, _ = one_call(mesh)
    settle(mesh)
    assert status_of(mesh, sid) == ("0", "")
    mesh.assert_quiet_and_done()


def test_max_attempts_is_respected() -> None:
    mesh = RetryMesh(eps=(A, B, C), policy=RetryPolicy(max_attempts=3),
                     modes={A.address: "unavailable", B.address: "unavailable",
                            C.address: "unavailable"})
    sid, call = one_call(mesh)
    settle(mesh, 2)
    assert status_of(mesh, sid) == (str(G.UNAVAILABLE), "endpoint says no")  # the last answer
    assert [mesh.streams_at(e.address) for e in (A, B, C)] == [1, 1, 1]
    assert [a[0] for a in call.retry.attempts] == [A.address, B.address, C.address]
    counted = mesh.retries()
    assert counted["retried"] == {"UNAVAILABLE": 2}
    assert counted["not_retried"]["max_attempts"] == 1
    mesh.assert_quiet_and_done()


def test_max_attempts_one_never_retries_and_keeps_no_request_bytes() -> None:
    mesh = RetryMesh(policy=RetryPolicy(max_attempts=1), modes={A.address: "unavailable"})
    caller = mesh.caller()
    sid = caller.start(request_block())
    caller.send(sid, grpc_message(b"q"))
    mesh.pump()
    call = mesh.hooks.calls[-1]
    assert call.replay is None
    caller.send(sid, b"", end=True)
    mesh.pump()
    settle(mesh)
    assert caller.status(sid) == (str(G.UNAVAILABLE), "endpoint says no")
    mesh.assert_quiet_and_done()


def test_a_request_larger_than_the_cap_is_not_retried() -> None:
    mesh = RetryMesh(policy=RetryPolicy(max_request_bytes=1000),
                     modes={A.address: "unavailable_at_end"})
    sid, call = one_call(mesh, b"z" * 2000)
    settle(mesh)
    assert status_of(mesh, sid) == (str(G.UNAVAILABLE), "endpoint says no")
    assert mesh.streams_at(B.address) == 0
    assert mesh.retries()["not_retried"]["too_large"] == 1
    mesh.assert_quiet_and_done()


def test_a_request_outgrowing_the_cap_during_the_backoff_is_never_sent_truncated() -> None:
    mesh = RetryMesh(policy=RetryPolicy(max_request_bytes=1000, backoff_base_ms=100,
                                        backoff_max_ms=100),
                     modes={A.address: "unavailable"})
    caller = mesh.caller()
    sid = caller.start(request_block())
    caller.send(sid, grpc_message(b"a" * 500))
    mesh.pump()  # A answers UNAVAILABLE at once: a retry waits for its backoff...
    caller.send(sid, grpc_message(b"b" * 800), end=True)  # ...while the request outgrows the cap
    mesh.pump()
    settle(mesh)
    code, message = caller.status(sid)
    assert code == str(G.UNAVAILABLE) and "outgrew the replay buffer" in message
    assert mesh.received_at(B.address) == []  # never the second message without the first
    mesh.assert_quiet_and_done()


def test_a_fast_fail_is_answered_at_once_and_not_retried() -> None:
    mesh = RetryMesh()
    sid, call = one_call(mesh, path="/full/Method")
    assert status_of(mesh, sid) == (str(G.UNAVAILABLE), "service 'echo': max_requests (1) reached")
    assert call.fast_fail and call.retry is None and mesh.links == []
    sid, other = one_call(mesh)  # a call the limit lets through gets the service's plan
    assert status_of(mesh, sid) == ("0", "")
    call.retry = other.retry  # even asked directly, a fast-failed call is not retried
    assert other.retry.again(call, "status", G.UNAVAILABLE) is None
    call.retry = None
    mesh.assert_quiet_and_done()


def test_an_injected_abort_is_not_retried() -> None:
    mesh = RetryMesh(faults=(FaultRule("boom", abort_code=G.UNAVAILABLE, abort_percent=100),))
    sid, call = one_call(mesh)
    code, message = status_of(mesh, sid)
    assert code == str(G.UNAVAILABLE) and message.startswith("fault injected by the mesh")
    assert call.retry is None and mesh.links == []
    mesh.assert_quiet_and_done()


def test_no_endpoint_for_the_next_attempt_leaves_the_failed_attempts_answer() -> None:
    mesh = RetryMesh(eps=(A,), modes={A.address: "unavailable"}, strict_balance=True)
    sid, call = one_call(mesh)
    assert status_of(mesh, sid) == (str(G.UNAVAILABLE), "endpoint says no")
    assert call.endpoint is A
    assert mesh.retries()["not_retried"]["no_endpoint"] == 1
    assert any("no endpoint left to try" in n for n in call.notes or ())
    mesh.assert_quiet_and_done()


def test_a_status_not_in_retry_on_is_the_answer() -> None:
    mesh = RetryMesh(policy=RetryPolicy(retry_on=(G.RESOURCE_EXHAUSTED,)),
                     modes={A.address: "unavailable"})
    sid, call = one_call(mesh)
    assert status_of(mesh, sid) == (str(G.UNAVAILABLE), "endpoint says no")
    assert not isinstance(call.retry, RetryState) and mesh.streams_at(B.address) == 0
    mesh.assert_quiet_and_done()


def test_no_retry_when_the_backoff_would_end_past_the_callers_deadline() -> None:
    mesh = RetryMesh(modes={A.address: "unavailable"}, pushback="500")
    sid, call = one_call(mesh, timeout="200m")
    code, message = status_of(mesh, sid)
    assert code == str(G.UNAVAILABLE)  # the attempt's own answer, at once
    assert mesh.retries()["not_retried"]["deadline"] == 1
    mesh.assert_quiet_and_done()


def test_no_retry_past_the_upstreams_concurrent_retry_limit() -> None:
    full = upstream(max_retries=2, in_flight=2)
    mesh = RetryMesh(modes={A.address: "unavailable"}, upstream=full)
    sid, _ = one_call(mesh)
    assert status_of(mesh, sid) == (str(G.UNAVAILABLE), "endpoint says no")
    assert mesh.retries()["not_retried"]["limit"] == 1
    assert full.fast_fails["max_retries"] == 1 and full.retries_in_flight == 2
    mesh.assert_quiet_and_done()


def test_a_retry_holds_one_of_the_upstreams_retry_slots_until_the_call_ends() -> None:
    up = upstream(max_retries=2)
    mesh = RetryMesh(modes={A.address: "unavailable"}, upstream=up)
    sid, _ = one_call(mesh)
    assert up.retries_in_flight == 1  # backing off
    settle(mesh)
    assert status_of(mesh, sid) == ("0", "")
    assert up.retries_in_flight == 0
    mesh.assert_quiet_and_done()


# ================================================================ backoff and pushback
def test_the_servers_pushback_sets_the_wait() -> None:
    mesh = RetryMesh(modes={A.address: "unavailable"}, pushback="300")
    sid, call = one_call(mesh)
    mesh.timers.advance(0.299)
    mesh.pump()
    assert mesh.streams_at(B.address) == 0 and mesh.the_caller.headers[sid] == []  # type: ignore[attr-defined]
    mesh.timers.advance(0.002)
    mesh.pump()
    assert status_of(mesh, sid) == ("0", "") and mesh.streams_at(B.address) == 1
    assert any("in 300 ms" in n for n in call.notes or ())
    mesh.assert_quiet_and_done()


@pytest.mark.parametrize("pushback", ["-1", "soon", "1.5", ""])
def test_a_negative_or_malformed_pushback_stops_retries(pushback: str) -> None:
    mesh = RetryMesh(modes={A.address: "unavailable"}, pushback=pushback)
    sid, call = one_call(mesh)
    assert status_of(mesh, sid) == (str(G.UNAVAILABLE), "endpoint says no")
    assert mesh.streams_at(B.address) == 0
    assert mesh.retries()["not_retried"]["pushback"] == 1
    mesh.assert_quiet_and_done()


def test_backoff_is_full_jitter_growing_from_base_to_max() -> None:
    """Every attempt fails: each wait is within [0, min(max, base × 2^n)]."""
    mesh = RetryMesh(eps=(A,), policy=RetryPolicy(max_attempts=6, backoff_base_ms=100,
                                                  backoff_max_ms=300),
                     modes={A.address: "unavailable"})
    delays: list[float] = []
    real = mesh.relay.call_later

    def spy(delay_s: float, fn: Callable[[], None]) -> Any:
        delays.append(delay_s)
        return real(delay_s, fn)
    mesh.relay.call_later = spy  # type: ignore[method-assign]
    sid, call = one_call(mesh)
    settle(mesh, 3)
    assert status_of(mesh, sid)[0] == str(G.UNAVAILABLE)
    assert len(delays) == 5
    for n, d in enumerate(delays):
        assert 0 <= d <= min(0.3, 0.1 * 2 ** n) + 1e-9
    assert mesh.streams_at(A.address) == 6
    mesh.assert_quiet_and_done()


def test_parse_pushback() -> None:
    assert parse_pushback("0") == 0.0 and parse_pushback("250") == 0.25
    for bad in ("-5", "x", "", "1e3", "٣"):
        assert parse_pushback(bad) is None


# ================================================================ per-try timeout
def test_a_per_try_timeout_resets_the_attempt_and_retries() -> None:
    mesh = RetryMesh(policy=RetryPolicy(per_try_timeout_ms=100), modes={A.address: "silent"})
    sid, call = one_call(mesh, b"slow?")
    mesh.timers.advance(0.099)
    mesh.pump()
    assert mesh.streams_at(B.address) == 0
    settle(mesh)
    assert status_of(mesh, sid) == ("0", "")
    (backend,) = mesh.backends_of(A.address)
    assert backend.resets == {1: F.CANCEL}  # the slow attempt was stopped
    assert call.retry.attempts[0] == (A.address, "per_try_timeout", G.DEADLINE_EXCEEDED)
    assert mesh.retries()["retried"] == {"per_try_timeout": 1}
    mesh.assert_quiet_and_done()


def test_per_try_timeouts_on_every_attempt_end_in_deadline_exceeded() -> None:
    mesh = RetryMesh(policy=RetryPolicy(per_try_timeout_ms=100, max_attempts=2),
                     modes={A.address: "silent", B.address: "silent"})
    sid, call = one_call(mesh)
    settle(mesh, 2)
    code, message = status_of(mesh, sid)
    assert code == str(G.DEADLINE_EXCEEDED)
    assert message.startswith("per-try timeout of 100 ms at the sidecar")
    assert message.endswith("after 2 attempts")
    mesh.assert_quiet_and_done()


def test_the_per_try_timeout_stops_at_commit() -> None:
    """A response that has started is not cut by the per-try timeout (only the deadline)."""
    mesh = RetryMesh(policy=RetryPolicy(per_try_timeout_ms=100), modes={A.address: "ok"})
    caller = mesh.caller()
    sid = caller.start(request_block())
    caller.send(sid, grpc_message(b"first"))
    mesh.pump()  # the echo answers headers at once: committed
    mesh.timers.advance(1)
    mesh.pump()
    caller.send(sid, grpc_message(b"second"), end=True)
    mesh.pump()
    assert caller.status(sid) == ("0", "")
    mesh.assert_quiet_and_done()


# ================================================================ the budget
def test_budget_exhaustion_stops_retries_and_is_counted() -> None:
    policy = RetryPolicy(budget_percent=0, budget_min_per_s=0.1, budget_window_s=10)
    mesh = RetryMesh(policy=policy, modes={A.address: "unavailable", B.address: "unavailable"})
    sid1, first = one_call(mesh)
    settle(mesh)
    sid2, second = one_call(mesh)
    settle(mesh)
    counted = mesh.retries()
    assert counted["retried"] == {"UNAVAILABLE": 1}  # the one retry the reserve holds
    assert counted["budget_exhausted"] >= 1
    assert counted["budget_available"] == 0
    assert any("retry budget of echo is exhausted" in n for n in second.notes or ())
    mesh.assert_quiet_and_done()


def test_the_real_outbound_stack_retries() -> None:
    """Through ``outbound_stack`` (whatever balancer it uses): a call whose first attempt
    is refused by its endpoint succeeds on the next, and ``/stats`` shows it."""
    mesh = RetryMesh(real_stack=True, modes={A.address: "unavailable", B.address: "ok"},
                     eps=(A, B))
    ok = 0
    for _ in range(6):
        sid, _ = one_call(mesh)
        settle(mesh)
        ok += status_of(mesh, sid) == ("0", "")
    assert ok == 6
    counted = mesh.stack.counters()["retries"]["echo"]
    assert counted["succeeded_after_retry"] == counted["retried"].get("UNAVAILABLE", 0) >= 1
    mesh.assert_quiet_and_done()


class TestBudget:
    def test_the_reserve_allows_min_per_s_times_the_window(self) -> None:
        budget = RetryBudget(20, 10, 10, clock=lambda: 0.0)
        assert sum(budget.withdraw() for _ in range(150)) == 100
        assert budget.granted == 100 and budget.denied == 50

    def test_requests_add_percent(self) -> None:
        budget = RetryBudget(20, 1, 10)  # a reserve of 10
        for _ in range(50):
            budget.deposit(1.0)
        # A window starting after the requests but holding the retries has none of them:
        # only the reserve is sure (every window of 10 s is bounded, whatever it starts).
        assert sum(budget.withdraw(1.0) for _ in range(30)) == 10
        assert not budget.withdraw(2.0)

    def test_requests_spread_over_the_window_raise_the_allowance(self) -> None:
        budget = RetryBudget(20, 1, 10)
        granted = 0
        for tick in range(200):  # 20 s: 10 requests, then up to 5 retries, every 100 ms
            t = tick / 10
            for _ in range(10):
                budget.deposit(t)
            granted += sum(budget.withdraw(t) for _ in range(5))
        # 2000 requests: about 20% of them, plus the reserve, less one bucket's share.
        assert 0.18 * 2000 <= granted <= 0.2 * 2000 + 2 * 10

    def test_retries_come_back_once_the_window_has_passed(self) -> None:
        budget = RetryBudget(0, 1, 10)
        assert sum(budget.withdraw(0.0) for _ in range(20)) == 10
        assert not budget.withdraw(9.9)
        assert budget.withdraw(10.6)  # the first bucket left every window holding now

    def test_available(self) -> None:
        budget = RetryBudget(20, 1, 10)
        for _ in range(10):
            budget.deposit(0.0)
        assert budget.available(0.0) == 10  # the requests are not in every window yet
        for _ in range(100):
            budget.deposit(0.6)
        assert budget.available(0.6) == 10 and budget.available(1.0) == 10
        budget.withdraw(1.0)
        assert budget.available(1.0) == 9

    def test_bad_terms_are_refused(self) -> None:
        with pytest.raises(ValueError):
            RetryBudget(20, 10, 0)


def _max_excess(events: list[tuple[int, bool]], window_ms: int, percent: float,
                min_per_s: float) -> float:
    """max over every closed window of ``window_ms`` (any start) of retries granted in it −
    (percent % of its requests + min_per_s × its length); ``events``: (time ms, is retry)."""
    per_time: dict[int, list[int]] = {}
    for t, is_retry in events:
        per_time.setdefault(t, [0, 0])[is_retry] += 1
    starts = {s for t in per_time for s in (t, t + 1, t - window_ms, t - window_ms + 1)}
    worst = -float("inf")
    for a in starts:
        b = a + window_ms
        req = ret = 0
        for t, (n_req, n_ret) in per_time.items():
            if a <= t <= b:
                req += n_req
                ret += n_ret
        worst = max(worst, ret - (percent / 100 * req + min_per_s * window_ms / 1000))
    return worst


@settings(deadline=None, max_examples=150)
@given(st.lists(st.tuples(st.integers(0, 3000), st.booleans(), st.integers(1, 40)),
                min_size=1, max_size=60))
def test_budget_property_retries_in_any_window_stay_within_20_percent_plus_10_per_s(
        steps: list[tuple[int, bool, int]]) -> None:
    """Any sequence of requests and retry attempts at arbitrary (non-decreasing) times: the
    retries granted, in every window of 10 s whatever it starts, never exceed 20% of the
    requests in it plus 10/s × 10 s."""
    budget = RetryBudget()  # the defaults: 20%, 10/s, 10 s
    now_ms = 0
    granted: list[tuple[int, bool]] = []
    for gap_ms, is_retry, count in steps:
        now_ms += gap_ms * 7  # gaps up to 21 s: windows both full and empty
        for _ in range(count * (4 if is_retry else 1)):
            if is_retry:
                if budget.withdraw(now_ms / 1000):
                    granted.append((now_ms, True))
            else:
                budget.deposit(now_ms / 1000)
                granted.append((now_ms, False))
    assert _max_excess(granted, 10_000, 20, 10) <= 1e-9
