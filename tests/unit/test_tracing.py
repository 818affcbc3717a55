"""Tracing without sockets: W3C ``traceparent`` parsing (hostile values too), parent-based
sampling, ids and the ``traceparent`` each side sends on, unsampled calls that build nothing,
the layers' decisions as span events, the finished span's attributes, the OTLP encoding
(decoded back) and the export pipeline on the event loop (batches and their delay, a full
queue dropping its oldest, counted failures, a new channel for renewed credentials, closing
flushes), and the header splice in ``HeaderBlock.forwardable`` (scanned and decoded blocks;
property test) and in the relay (every attempt of a retried call)."""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hpack import Encoder
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1 import trace_pb2

from mesh_common.snapshot import (
    CircuitLimits,
    Cluster,
    FaultRule,
    RetryPolicy,
    RouteRule,
    Snapshot,
)
from sidecar import tracing
from sidecar.http2 import grpc as G
from sidecar.http2.headers import HeaderReader, encode_block
from sidecar.http2.relay import Call, LocalReply
from sidecar.layers import trace as trace_module
from sidecar.layers.base import note
from sidecar.layers.stats import Stats
from sidecar.layers.trace import (
    FinishedSpan,
    SpanRecord,
    Trace,
    finish,
    format_traceparent,
    parse_traceparent,
)
from sidecar.stack import Stack, inbound_stack, outbound_stack
from sidecar.tls import TlsFiles
from sidecar.tracing import (
    MAX_BATCH_SPANS,
    ChannelExport,
    OtlpTarget,
    Tracer,
    encode,
    parse_otlp_endpoint,
)
from tests.unit import test_retry as R
from tests.unit.test_frames_headers import (
    BIG,
    _encode,
    _forwarded,
    _fresh_decode,
    header_lists,
)
from tests.unit.test_routing_layers import SAY, FakePool, ep, exact, make_call, rule, snap

FAST = settings(deadline=None, max_examples=40)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE}-{PARENT}-01"
UNSAMPLED = f"00-{TRACE}-{PARENT}-00"
HEX = set("0123456789abcdef")
CALLER = "spiffe://mesh.local/service/web"


# ====================================================================== traceparent parsing
def test_a_valid_traceparent_gives_its_trace_parent_and_sampled_flag() -> None:
    assert parse_traceparent(SAMPLED) == (TRACE, PARENT, True)
    assert parse_traceparent(UNSAMPLED) == (TRACE, PARENT, False)
    # Only bit 0 of the flags is "sampled"; other bits are ignored.
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-03") == (TRACE, PARENT, True)
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-fe") == (TRACE, PARENT, False)


def test_a_later_version_may_carry_more_fields_after_a_dash() -> None:
    assert parse_traceparent(f"01-{TRACE}-{PARENT}-01-extra") == (TRACE, PARENT, True)
    assert parse_traceparent(f"01-{TRACE}-{PARENT}-01") == (TRACE, PARENT, True)
    assert parse_traceparent(f"01-{TRACE}-{PARENT}-01x") is None


@pytest.mark.parametrize("value", [
    None, "", "00", SAMPLED[:-1], SAMPLED + "-", SAMPLED + "0",  # lengths
    SAMPLED.upper(), f"00-{TRACE.upper()}-{PARENT}-01",          # upper-case hex
    f"00-{'0' * 32}-{PARENT}-01", f"00-{TRACE}-{'0' * 16}-01",   # all-zero ids
    f"ff-{TRACE}-{PARENT}-01",                                   # the forbidden version
    f"00_{TRACE}-{PARENT}-01", f"00-{TRACE}_{PARENT}-01",        # separators
    f"00-{TRACE[:-1]}g-{PARENT}-01", f"0x-{TRACE}-{PARENT}-01",  # not hex
    f" 00-{TRACE}-{PARENT}-01", f"00-{TRACE}-{PARENT}-01 ",      # blanks
    f"00-{TRACE}-{PARENT}-1", "00-" + "a" * 10_000,              # short flags, huge
    f"01-{TRACE}-{PARENT}-01-" + "x" * 600,                      # a later version, too long
    "\x00" * 55, "é" * 55,
])
def test_invalid_or_hostile_traceparents_count_as_absent(value: str | None) -> None:
    assert parse_traceparent(value) is None


@FAST
@given(st.text(max_size=80) | st.from_regex(r"\A[0-9a-fA-F-]{50,60}\Z"))
def test_parsing_never_raises_and_accepts_only_well_formed_values(value: str) -> None:
    parsed = parse_traceparent(value)
    if parsed is not None:
        trace_id, span_id, _ = parsed
        assert len(trace_id) == 32 and len(span_id) == 16
        assert set(trace_id) <= HEX and set(span_id) <= HEX
        assert value[3:35] == trace_id and value[36:52] == span_id


@FAST
@given(trace=st.integers(1, 2**128 - 1), span=st.integers(1, 2**64 - 1), sampled=st.booleans())
def test_formatted_traceparents_parse_back(trace: int, span: int, sampled: bool) -> None:
    value = format_traceparent(f"{trace:032x}", f"{span:016x}", sampled)
    assert parse_traceparent(value) == (f"{trace:032x}", f"{span:016x}", sampled)


# ====================================================================== the trace layer
class Sink(list):
    """Collects finished spans (the exporter's place)."""

    def __call__(self, span: FinishedSpan) -> None:
        self.append(span)


def traced_call(*headers: tuple[str, str], path: str = SAY, authority: str = "echo",
                peer: str | None = None) -> Call:
    call = make_call(path, authority, tuple(headers))
    call.peer_id = peer
    return call


def run(layer: Trace, call: Call) -> Any:
    """The layer alone over a terminal that answers with a pool; then the call ends."""
    stack = Stack([layer, layer.ending()], lambda c: FakePool(ep(1)))
    decision = stack.on_request(call)
    call.grpc_status = 0
    stack.on_end(call)
    return decision


def layer(outbound: bool = True, rate: float = 1.0, sink: Sink | None = None,
          seed: int = 1) -> Trace:
    return Trace(outbound=outbound, service="web", sample_rate=rate,
                 sink=sink if sink is not None else Sink(), rng=random.Random(seed))


def test_a_call_without_a_parent_starts_a_sampled_root_span_and_sends_a_child_traceparent() -> None:
    sink = Sink()
    call = traced_call()
    run(layer(sink=sink), call)
    (span,) = sink
    assert len(call.trace_id) == 32 and set(call.trace_id) <= HEX
    assert span.trace_id == call.trace_id and span.parent_id == "" and span.outbound
    assert len(span.span_id) == 16 and set(span.span_id) <= HEX
    assert call.traceparent_out == f"00-{call.trace_id}-{span.span_id}-01"
    assert parse_traceparent(call.traceparent_out) == (call.trace_id, span.span_id, True)


def test_a_span_ends_when_the_relay_ended_the_call_not_when_the_end_hooks_run() -> None:
    """The relay stamps a call's end (``call.ended_s``) as its answer is queued; the end
    hooks run after the read's writes. The span lasts from its start for the relay's
    measure of the call, so a server span never seems to outlast its client's."""
    sink = Sink()
    now_ns = [1_000_000_000]
    trace = Trace(outbound=False, service="echo", sample_rate=1.0, sink=sink,
                  rng=random.Random(1), clock_ns=lambda: now_ns[0])
    stack = Stack([trace, trace.ending()], lambda c: FakePool(ep(1)))
    call = traced_call(("traceparent", SAMPLED), peer="spiffe://mesh.local/service/web")
    call.started_s = 50.0
    stack.on_request(call)
    call.grpc_status = 0
    call.ended_s = 50.000_250  # 250 us after the call came in
    now_ns[0] += 5_000_000  # the end hooks run 5 ms later
    stack.on_end(call)
    (span,) = sink
    assert span.start_ns == 1_000_000_000
    assert span.end_ns == 1_000_250_000
    # A call the relay has not ended (a layer driven by hand) ends at the hook's time.
    other = traced_call(("traceparent", SAMPLED))
    stack.on_request(other)
    stack.on_end(other)
    assert sink[1].end_ns == now_ns[0]


def test_a_sampled_parent_is_continued_and_the_next_hop_is_our_child() -> None:
    for outbound in (True, False):
        sink = Sink()
        call = traced_call(("traceparent", SAMPLED))
        run(layer(outbound, rate=0.0, sink=sink), call)  # the parent decides, not the rate
        (span,) = sink
        assert call.trace_id == TRACE and span.trace_id == TRACE and span.parent_id == PARENT
        assert span.span_id != PARENT and span.outbound is outbound
        assert call.traceparent_out == f"00-{TRACE}-{span.span_id}-01"


def test_an_unsampled_parent_is_forwarded_unchanged_and_builds_nothing() -> None:
    for outbound in (True, False):
        sink = Sink()
        call = traced_call(("traceparent", UNSAMPLED))
        run(layer(outbound, rate=1.0, sink=sink), call)  # the parent decides, not the rate
        assert sink == [] and call.span is None and call.traceparent_out is None
        assert call.trace_id == TRACE


def test_an_unsampled_new_trace_tells_the_next_hop_not_to_sample_it_outbound_only() -> None:
    sink = Sink()
    out = traced_call()
    run(layer(True, rate=0.0, sink=sink), out)
    parsed = parse_traceparent(out.traceparent_out)
    assert parsed is not None and parsed[0] == out.trace_id and not parsed[2]
    assert out.span is None and sink == []
    inbound = traced_call(peer=CALLER)
    run(layer(False, rate=0.0, sink=sink), inbound)
    assert inbound.traceparent_out is None and inbound.span is None and sink == []
    assert len(inbound.trace_id) == 32  # a trace id all the same (for the access log)


@pytest.mark.parametrize("bad", ["garbage", f"00-{'0' * 32}-{PARENT}-01", SAMPLED.upper()])
def test_an_invalid_parent_is_replaced_by_a_new_trace(bad: str) -> None:
    sink = Sink()
    call = traced_call(("traceparent", bad))
    run(layer(sink=sink), call)
    (span,) = sink
    assert span.parent_id == "" and span.trace_id not in bad.lower()
    assert call.traceparent_out == f"00-{span.trace_id}-{span.span_id}-01"


def test_new_traces_are_sampled_at_the_rate() -> None:
    sink = Sink()
    trace = layer(rate=0.25, sink=sink, seed=3)
    ids = set()
    for _ in range(2000):
        call = traced_call()
        run(trace, call)
        ids.add(call.trace_id)
    assert 400 < len(sink) < 600 and trace.sampled == len(sink)
    assert len(ids) == 2000  # every call its own trace


def test_unsampled_calls_allocate_no_span_record(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Any] = []

    class Counting(SpanRecord):
        __slots__ = ()

        def __init__(self, *args: Any, **kw: Any) -> None:
            made.append(1)
            super().__init__(*args, **kw)
    monkeypatch.setattr(trace_module, "SpanRecord", Counting)
    h = TracedStack(snap(rule("v2", ({"version": "v2"}, 100), method=exact(SAY))), rate=0.0)
    for headers in ((), (("traceparent", UNSAMPLED),)):
        call, _ = h.send(headers=headers)
        # The layers noted their decisions as before; nothing else was built.
        assert call.span is None and call.notes == ["rule v2 → subset version=v2 (weight 100)"]
    assert made == [] and h.sink == []
    h.send(headers=(("traceparent", SAMPLED),))
    assert len(made) == 1 and len(h.sink) == 1


def test_without_a_sink_only_a_valid_parent_sets_the_trace_id() -> None:
    quiet = Trace(outbound=True, service="web", sample_rate=1.0, sink=None)
    call = traced_call(("traceparent", SAMPLED))
    run(quiet, call)
    assert call.trace_id == TRACE and call.span is None and call.traceparent_out is None
    call = traced_call()
    run(quiet, call)
    assert call.trace_id == "" and call.span is None and call.traceparent_out is None
    assert quiet.sampled == 0


def test_the_sample_rate_must_be_a_share() -> None:
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="0..1"):
            Trace(outbound=True, service="web", sample_rate=bad)


def test_a_failing_sink_is_counted_and_never_breaks_the_call() -> None:
    def broken(span: FinishedSpan) -> None:
        raise RuntimeError("exporter gone")
    trace = Trace(outbound=True, service="web", sample_rate=1.0, sink=broken)
    call = traced_call()
    assert isinstance(run(trace, call), FakePool)
    assert trace.sink_errors == 1


# ====================================================================== decisions as events
class TracedStack:
    """The real outbound stack with the trace layer (rate ``rate``) and a sink."""

    def __init__(self, snapshot: Snapshot, rate: float = 1.0, seed: int = 7) -> None:
        self.snapshot = snapshot
        self.sink = Sink()
        self.trace = Trace(outbound=True, service="web", sample_rate=rate, sink=self.sink,
                           rng=random.Random(seed))
        self.stack = outbound_stack(lambda: self.snapshot, Stats(),
                                    lambda e, route: FakePool(e),  # type: ignore[arg-type,return-value]
                                    random.Random(seed), trace=self.trace)

    def send(self, status: int = 0, headers: tuple[tuple[str, str], ...] = ()
             ) -> tuple[Call, Any]:
        call = make_call(SAY, "echo", headers)
        decision = self.stack.on_request(call)
        if isinstance(decision, LocalReply):
            call.local_reply = decision
            call.grpc_status = decision.status
            call.grpc_message = decision.message
        else:
            call.pool = decision  # bound, as the relay does
            call.grpc_status = status
        self.stack.on_end(call)
        return call, decision


def kinds(span: FinishedSpan) -> list[str]:
    return [kind for _, kind, _, _ in span.events]


def test_the_route_and_the_endpoint_picked_are_span_events() -> None:
    h = TracedStack(snap(rule("canary", ({"version": "v2"}, 100), method=exact(SAY))))
    call, _ = h.send()
    (span,) = h.sink
    assert kinds(span) == ["route", "endpoint"]
    (t1, _, text, attrs), (t2, _, picked, ep_attrs) = span.events
    assert text == call.notes[0] == "rule canary → subset version=v2 (weight 100)"
    assert attrs == {"mesh.rule": "canary", "mesh.subset": "version=v2", "mesh.weight": 100}
    assert ep_attrs == {"mesh.attempt": 1, "mesh.endpoint": call.endpoint.address,
                        "mesh.balancer": "peak_ewma"}
    assert picked == f"attempt 1: endpoint {call.endpoint.address}"
    assert span.start_ns <= t1 <= t2 <= span.end_ns
    assert call.notes == [text]  # the endpoint event is not a note


def test_an_injected_abort_is_a_fault_event_and_the_span_an_error() -> None:
    route = RouteRule("echo", "echo", faults=(FaultRule("boom", abort_code=G.UNAVAILABLE,
                                                        abort_percent=100.0),))
    h = TracedStack(Snapshot("1", clusters=(Cluster("echo", (ep(1),)),), routes=(route,)))
    call, decision = h.send()
    assert isinstance(decision, LocalReply)
    (span,) = h.sink
    assert kinds(span) == ["fault"]
    assert span.events[0][3] == {"mesh.fault": "boom", "mesh.fault.abort_code": 14}
    assert span.error == f"UNAVAILABLE: {decision.message}"
    assert span.attributes["rpc.grpc.status_code"] == 14
    assert span.attributes["mesh.local_reply"] is True


def test_a_fast_fail_is_an_event_naming_the_limit() -> None:
    route = RouteRule("echo", "echo", limits=CircuitLimits(max_requests=0))
    h = TracedStack(Snapshot("1", clusters=(Cluster("echo", (ep(1),)),), routes=(route,)))
    h.send()
    (span,) = h.sink
    assert kinds(span) == ["fast_fail"]
    assert span.events[0][3] == {"mesh.limit": "max_requests", "mesh.limit.max": 0,
                                 "mesh.upstream": "echo"}


def test_a_retry_and_its_new_pick_are_events_and_attempts_are_counted() -> None:
    a, b = ep(1), ep(2)
    route = RouteRule("echo", "echo", load_balancer="round_robin",
                      retries=RetryPolicy(max_attempts=2, backoff_base_ms=1))
    h = TracedStack(Snapshot("1", clusters=(Cluster("echo", (a, b)),), routes=(route,)))
    call = make_call()
    first = h.stack.on_request(call)
    assert isinstance(first, FakePool)
    call.attempts = 1
    call.grpc_status = G.UNAVAILABLE  # the relay asks the retry layer, as after a failure
    again = call.retry.again(call, "status", G.UNAVAILABLE)
    assert again is not None
    call.attempts = 2
    call.grpc_status = G.UNAVAILABLE
    assert call.retry.again(call, "status", G.UNAVAILABLE) is None  # max_attempts reached
    h.stack.on_end(call)
    (span,) = h.sink
    # The retry's pick comes first: the retry event names the endpoint it went to.
    assert kinds(span) == ["endpoint", "endpoint", "retry", "not_retried"]
    retry_attrs = span.events[2][3]
    assert retry_attrs["mesh.retry"] == 1 and retry_attrs["mesh.attempt"] == 2
    assert retry_attrs["mesh.retry.reason"] == "UNAVAILABLE"
    assert {retry_attrs["mesh.retry.from"], retry_attrs["mesh.endpoint"]} == {a.address, b.address}
    assert span.events[1][3]["mesh.attempt"] == 2
    assert span.events[1][3]["mesh.endpoint"] == retry_attrs["mesh.endpoint"]
    assert span.events[3][3]["mesh.retry.refused"] == "max_attempts"
    assert span.attributes["mesh.attempts"] == 2
    assert [t for _, _, t, _ in span.events if not t.startswith("attempt")] == call.notes


def test_an_ejection_at_the_calls_end_is_on_its_span() -> None:
    from mesh_common.snapshot import OutlierPolicy
    a, b = ep(1), ep(2)
    route = RouteRule("echo", "echo", outlier=OutlierPolicy(consecutive_errors=1,
                                                            max_ejection_percent=100))
    h = TracedStack(Snapshot("1", clusters=(Cluster("echo", (a, b)),), routes=(route,)))
    call, _ = h.send(status=G.UNAVAILABLE)
    (span,) = h.sink
    assert kinds(span)[-1] == "ejected", span.events
    assert span.events[-1][3]["mesh.endpoint"] == call.endpoint.address


def test_notes_on_an_untraced_call_stay_notes() -> None:
    call = traced_call()
    note(call, "why", "retry", {"k": 1})
    assert call.notes == ["why"] and call.span is None


# ====================================================================== the finished span
def test_a_finished_span_carries_the_rpc_and_mesh_attributes() -> None:
    out = traced_call(path="/pkg.Payment/Charge", authority="payment:80")
    out.route = "payment"
    out.endpoint = ep(4)
    out.attempts = 1
    out.grpc_status = 0
    rec = SpanRecord(TRACE, PARENT, "", 100, True)
    rec.add_event("route", "because", {"mesh.rule": "r"})
    span = finish(out, rec, "order", 250)
    assert span.name == "/pkg.Payment/Charge" and span.outbound and span.error is None
    assert (span.start_ns, span.end_ns) == (100, 250)
    assert span.attributes == {
        "rpc.system": "grpc", "rpc.service": "pkg.Payment", "rpc.method": "Charge",
        "rpc.grpc.status_code": 0, "mesh.direction": "outbound", "mesh.source": "order",
        "mesh.destination": "payment", "mesh.attempts": 1, "mesh.endpoint": ep(4).address}
    assert [e[1:] for e in span.events] == [("route", "because", {"mesh.rule": "r"})]

    inbound = traced_call(path="/pkg.Payment/Charge", peer="spiffe://mesh.local/service/order")
    inbound.upstream_label = "127.0.0.1:9 (local app of payment)"
    inbound.attempts = 1
    inbound.grpc_status = None
    span = finish(inbound, SpanRecord(TRACE, PARENT, "aa" * 8, 1, False), "payment", 2)
    assert span.attributes["mesh.direction"] == "inbound"
    assert span.attributes["mesh.source"] == "order"
    assert span.attributes["mesh.destination"] == "payment"
    assert span.attributes["mesh.peer"] == "spiffe://mesh.local/service/order"
    assert span.attributes["mesh.endpoint"] == "127.0.0.1:9 (local app of payment)"
    assert "rpc.grpc.status_code" not in span.attributes and "without a gRPC status" in span.error


def test_the_inbound_stack_traces_with_server_spans() -> None:
    sink = Sink()
    trace = Trace(outbound=False, service="echo", sample_rate=1.0, sink=sink)
    pool: Any = FakePool(ep(1))
    stack = inbound_stack(Stats(), pool, trace=trace)
    call = traced_call(("traceparent", SAMPLED), peer=CALLER)
    assert stack.on_request(call) is pool
    call.grpc_status = 5  # NOT_FOUND
    call.grpc_message = "no such order"
    stack.on_end(call)
    (span,) = sink
    assert not span.outbound and span.parent_id == PARENT
    assert span.error == "NOT_FOUND: no such order" and span.attributes["mesh.source"] == "web"


# ====================================================================== OTLP export
def finished(**kw: Any) -> FinishedSpan:
    base = dict(trace_id=TRACE, span_id="b7ad6b7169203331", parent_id=PARENT, name=SAY,
                outbound=True, start_ns=1_000, end_ns=5_000,
                attributes={"rpc.system": "grpc", "rpc.grpc.status_code": 0},
                error=None,
                events=((2_000, "retry", "retry 1", {"mesh.attempt": 2}),
                        (3_000, "endpoint", "attempt 2", None)))
    base.update(kw)
    return FinishedSpan(**base)  # type: ignore[arg-type]


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return (kind, getattr(v, kind)) if kind else None


def _kvs(kvs: Any) -> list[tuple[str, Any]]:
    return [(kv.key, _value(kv.value)) for kv in kvs]


def test_encoding_carries_every_field_of_the_span_and_decodes_back() -> None:
    client = finished(attributes={"rpc.system": "grpc", "rpc.grpc.status_code": 0,
                                  "mesh.retried": True, "mesh.latency_ms": 1.5})
    server = finished(span_id="1" * 16, parent_id="", outbound=False, error="UNAVAILABLE: x",
                      events=((4_000, "denied", "no", {"message": "own text", "k": "v"}),))
    wire = encode([client, server], service="web", instance_id="web-1").SerializeToString()
    request = ExportTraceServiceRequest.FromString(wire)
    (rs,) = request.resource_spans
    assert _kvs(rs.resource.attributes) == [("service.name", ("string_value", "web")),
                                            ("service.instance.id", ("string_value", "web-1"))]
    (ss,) = rs.scope_spans
    assert (ss.scope.name, ss.scope.version) == ("mesh.sidecar", "0.1.0")
    c, s = ss.spans
    assert c.trace_id == bytes.fromhex(TRACE) and c.span_id == bytes.fromhex("b7ad6b7169203331")
    assert c.parent_span_id == bytes.fromhex(PARENT) and c.name == SAY
    assert c.kind == trace_pb2.Span.SPAN_KIND_CLIENT
    assert (c.start_time_unix_nano, c.end_time_unix_nano) == (1_000, 5_000)
    assert _kvs(c.attributes) == [("rpc.system", ("string_value", "grpc")),
                                  ("rpc.grpc.status_code", ("int_value", 0)),
                                  ("mesh.retried", ("bool_value", True)),
                                  ("mesh.latency_ms", ("double_value", 1.5))]
    assert [(e.name, e.time_unix_nano, _kvs(e.attributes)) for e in c.events] == [
        ("retry", 2_000, [("message", ("string_value", "retry 1")),
                          ("mesh.attempt", ("int_value", 2))]),
        ("endpoint", 3_000, [("message", ("string_value", "attempt 2"))])]
    assert c.status.code == trace_pb2.Status.STATUS_CODE_UNSET and c.status.message == ""
    assert c.flags == 0x300  # the parent's remoteness is known, and it is remote
    assert s.kind == trace_pb2.Span.SPAN_KIND_SERVER and s.parent_span_id == b""
    assert s.flags == 0x100 and s.span_id == bytes.fromhex("1" * 16)
    assert (s.status.code, s.status.message) == (trace_pb2.Status.STATUS_CODE_ERROR,
                                                 "UNAVAILABLE: x")
    # ``message`` first; an attribute of that name gives its value, as a dict update would.
    assert [_kvs(e.attributes) for e in s.events] == [
        [("message", ("string_value", "own text")), ("k", ("string_value", "v"))]]


class Export:
    """An injected ``send`` that keeps each request it is given (as span id lists) and, when
    told to, fails or waits for ``release`` first."""

    def __init__(self, fail: BaseException | None = None, hold: bool = False) -> None:
        self.requests: list[list[str]] = []
        self.fail = fail
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.closed = False

    async def __call__(self, request: ExportTraceServiceRequest) -> None:
        self.entered.set()
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        self.requests.append([s.span_id.hex() for rs in request.resource_spans
                              for ss in rs.scope_spans for s in ss.spans])

    async def aclose(self) -> None:
        self.closed = True

    @property
    def spans(self) -> list[str]:
        return [s for r in self.requests for s in r]


async def until(check: Callable[[], Any], timeout_s: float = 5.0) -> Any:
    """Poll ``check`` on the loop until it is truthy; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (got := check()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)
    return got


def plain_tracer(send: Any, **kw: Any) -> Tracer:
    return Tracer(OtlpTarget("127.0.0.1:4317", plaintext=True), service="web",
                  instance_id="web-1", send=send, **kw)


def span_ids(n: int, start: int = 0) -> list[str]:
    return [f"{i:016x}" for i in range(start + 1, start + n + 1)]


async def test_queued_spans_leave_together_once_the_first_waited_the_delay() -> None:
    export = Export()
    tracer = plain_tracer(export, schedule_delay_ms=300)
    t0 = time.monotonic()
    for sid in span_ids(3):
        tracer.submit(finished(span_id=sid))
    await asyncio.sleep(0.1)
    assert export.requests == []  # still within the delay
    await until(lambda: export.requests)
    assert time.monotonic() - t0 >= 0.29
    assert export.requests == [span_ids(3)]
    stats = tracer.stats()
    assert (stats["spans_submitted"], stats["spans_exported"], stats["exports"],
            stats["spans_dropped"], stats["exporters_made"]) == (3, 3, 1, 0, 0)
    assert await tracer.aclose()


async def test_a_full_batch_is_sent_at_once_and_larger_queues_in_batches_of_the_max() -> None:
    export = Export()
    tracer = plain_tracer(export, schedule_delay_ms=60_000)
    ids = span_ids(MAX_BATCH_SPANS + 100)
    for sid in ids[:MAX_BATCH_SPANS]:
        tracer.submit(finished(span_id=sid))
    await until(lambda: export.requests)  # a full batch: no 60 s wait
    assert export.requests == [ids[:MAX_BATCH_SPANS]]
    for sid in ids[MAX_BATCH_SPANS:]:
        tracer.submit(finished(span_id=sid))
    await asyncio.sleep(0.05)
    assert len(export.requests) == 1  # 100 spans: they wait for the delay
    assert await tracer.flush()
    assert export.requests == [ids[:MAX_BATCH_SPANS], ids[MAX_BATCH_SPANS:]]
    assert await tracer.aclose()


async def test_a_full_queue_drops_its_oldest_spans_and_counts_them() -> None:
    export = Export(hold=True)
    tracer = plain_tracer(export, schedule_delay_ms=60_000, max_queue_spans=4)
    first = span_ids(4)
    for sid in first:  # a full batch: the task takes it and waits on the collector
        tracer.submit(finished(span_id=sid))
    await until(export.entered.is_set)
    later = span_ids(10, start=4)
    for sid in later:  # 4 fit in the queue: the 6 oldest of them are dropped
        tracer.submit(finished(span_id=sid))
    assert tracer.stats()["spans_dropped_queue_full"] == 6
    export.release.set()
    assert await tracer.flush()
    assert export.requests == [first, later[-4:]]
    assert tracer.stats()["spans_exported"] == 8
    assert await tracer.aclose()


class Code(enum.IntEnum):
    UNAVAILABLE = 14


class FakeRpcError(Exception):
    """Shaped as ``sidecar.rpc.RpcError``: ``code`` and ``details``."""

    def __init__(self, code: Code, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


async def test_a_failed_export_drops_its_batch_counts_it_and_warns_once(
        caplog: pytest.LogCaptureFixture) -> None:
    export = Export(fail=FakeRpcError(Code.UNAVAILABLE, "connection refused"))
    tracer = plain_tracer(export, schedule_delay_ms=60_000)
    with caplog.at_level(logging.WARNING, logger="mesh.sidecar.tracing"):
        for _ in range(2):
            for _ in range(3):
                tracer.submit(finished())
            assert await tracer.flush()
    stats = tracer.stats()
    assert (stats["spans_exported"], stats["spans_dropped"], stats["exports"],
            stats["exports_failed"]) == (0, 6, 2, 2)
    assert stats["last_error"] == "UNAVAILABLE: connection refused"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "UNAVAILABLE" in warnings[0].getMessage()
    export.fail = OSError("no route")
    tracer.submit(finished())
    assert await tracer.flush()
    assert tracer.stats()["spans_dropped"] == 7 and "no route" in tracer.stats()["last_error"]
    export.fail = None
    tracer.submit(finished())
    assert await tracer.flush()
    assert tracer.stats()["spans_exported"] == 1  # the next batch goes out as usual
    assert await tracer.aclose()


async def test_an_export_without_an_answer_in_time_is_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "EXPORT_TIMEOUT_S", 0.05)
    export = Export(hold=True)
    tracer = plain_tracer(export, schedule_delay_ms=60_000)
    tracer.submit(finished())
    assert await tracer.flush()
    stats = tracer.stats()
    assert (stats["spans_dropped"], stats["exports_failed"]) == (1, 1)
    assert stats["last_error"].startswith("TimeoutError")
    assert await tracer.aclose()


async def test_submit_never_encodes_so_a_bad_span_fails_only_its_batch() -> None:
    export = Export()
    tracer = plain_tracer(export, schedule_delay_ms=60_000)
    tracer.submit(finished(trace_id="not hex"))  # returns: encoding happens in the task
    assert await tracer.flush()
    assert tracer.stats()["exports_failed"] == 1 and export.requests == []
    assert await tracer.aclose()


async def test_aclose_flushes_what_is_queued_closes_the_sender_and_ignores_later_spans(
        ) -> None:
    export = Export()
    tracer = plain_tracer(export, schedule_delay_ms=60_000)
    for sid in span_ids(3):
        tracer.submit(finished(span_id=sid))
    task = tracer._task
    assert task is not None and not task.done()
    assert await tracer.aclose()
    assert export.requests == [span_ids(3)] and export.closed and task.done()
    tracer.submit(finished())
    assert tracer.stats()["spans_submitted"] == 3 and tracer._task is None


async def test_aclose_gives_up_at_its_timeout_and_counts_what_it_drops() -> None:
    export = Export(hold=True)
    tracer = plain_tracer(export, schedule_delay_ms=60_000, max_queue_spans=2)
    for _ in range(4):  # 2 in flight (stuck), 2 queued
        tracer.submit(finished())
        await asyncio.sleep(0)
    await until(export.entered.is_set)
    t0 = time.monotonic()
    assert not await tracer.aclose(timeout_s=0.2)
    assert time.monotonic() - t0 < 2.0
    stats = tracer.stats()
    assert stats["spans_dropped"] == 4 and stats["spans_exported"] == 0 and export.closed


def test_outside_a_running_loop_spans_wait_until_flush_sends_them() -> None:
    export = Export()
    tracer = plain_tracer(export, schedule_delay_ms=1)
    tracer.submit(finished())
    assert tracer._task is None
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(tracer.flush())
        assert export.spans == ["b7ad6b7169203331"]
        assert loop.run_until_complete(tracer.aclose())
    finally:
        loop.close()


class FakeChannel:
    """Stands in for ``sidecar.rpc.Channel``: keeps its calls; closed or not."""

    def __init__(self, target: OtlpTarget, files: TlsFiles | None) -> None:
        self.target = target
        self.files = files
        self.calls: list[tuple[str, Any, Any, float]] = []
        self.closed = False

    async def unary(self, method: str, request: Any, response_type: Any, *,
                    timeout_s: float) -> Any:
        assert not self.closed
        self.calls.append((method, request, response_type, timeout_s))
        return response_type()

    async def close(self) -> None:
        self.closed = True


async def test_credentials_are_read_per_batch_and_a_change_makes_a_new_channel(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = TlsFiles(cert=str(tmp_path / "cert.pem"), key=str(tmp_path / "key.pem"),
                     ca=str(tmp_path / "ca.pem"))
    for path in (files.cert, files.key, files.ca):
        Path(path).write_bytes(b"first " + path.encode())
    current = [files]
    made: list[FakeChannel] = []

    def connect(target: OtlpTarget, tls_files: TlsFiles | None) -> FakeChannel:
        made.append(FakeChannel(target, tls_files))
        return made[-1]
    target = OtlpTarget("127.0.0.1:4317", plaintext=False)
    send = ChannelExport(target, lambda: current[0], connect=connect)
    tracer = Tracer(target, service="web", instance_id="web-1", send=send,
                    schedule_delay_ms=60_000)
    for _ in range(2):
        tracer.submit(finished())
        assert await tracer.flush()
    assert len(made) == 1 and made[0].files == files and made[0].target == target
    assert len(made[0].calls) == 2
    method, request, response_type, timeout_s = made[0].calls[0]
    assert method == "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    assert isinstance(request, ExportTraceServiceRequest)
    assert response_type is ExportTraceServiceResponse and timeout_s == tracing.EXPORT_TIMEOUT_S

    Path(files.cert).write_bytes(b"renewed certificate")  # same paths, new bytes
    with caplog.at_level(logging.INFO, logger="mesh.sidecar.tracing"):
        tracer.submit(finished())
        assert await tracer.flush()
    assert len(made) == 2 and made[0].closed and len(made[1].calls) == 1
    assert "renewed certificate" in caplog.text
    assert tracer.stats()["exporters_made"] == 2

    current[0] = TlsFiles(cert=str(tmp_path / "gone"), key=files.key, ca=files.ca)
    tracer.submit(finished())
    assert await tracer.flush()
    stats = tracer.stats()
    assert stats["spans_dropped"] == 1 and "FileNotFoundError" in stats["last_error"]
    assert len(made) == 2 and not made[1].closed  # unreadable: the channel stays as it was

    current[0] = files
    tracer.submit(finished())
    assert await tracer.flush()
    assert len(made) == 2 and len(made[1].calls) == 2  # the same bytes again: same channel
    assert await tracer.aclose()
    assert made[1].closed


async def test_a_plaintext_target_gets_one_channel_without_credentials() -> None:
    made: list[FakeChannel] = []

    def connect(target: OtlpTarget, tls_files: TlsFiles | None) -> FakeChannel:
        made.append(FakeChannel(target, tls_files))
        return made[-1]
    target = OtlpTarget("127.0.0.1:4317", plaintext=True)
    tracer = Tracer(target, service="web", instance_id="web-1",
                    send=ChannelExport(target, connect=connect), schedule_delay_ms=60_000)
    for _ in range(3):
        tracer.submit(finished())
        assert await tracer.flush()
    assert len(made) == 1 and made[0].files is None and len(made[0].calls) == 3
    assert await tracer.aclose() and made[0].closed


def test_an_mtls_target_needs_credentials() -> None:
    with pytest.raises(ValueError, match="mTLS"):
        Tracer(OtlpTarget("127.0.0.1:4317", plaintext=False), service="w", instance_id="w")


def test_the_exporter_loads_neither_grpc_nor_the_opentelemetry_sdk() -> None:
    code = ("import sys, sidecar.tracing\n"
            "print([m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', "
            "'opentelemetry.sdk', 'opentelemetry.exporter'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize(("value", "target"), [
    ("127.0.0.1:15012", OtlpTarget("127.0.0.1:15012", False)),
    ("http://127.0.0.1:4317", OtlpTarget("127.0.0.1:4317", True)),
    ("localhost:4317", OtlpTarget("localhost:4317", False)),
])
def test_otlp_endpoints_parse(value: str, target: OtlpTarget) -> None:
    assert parse_otlp_endpoint(value) == target


@pytest.mark.parametrize("value", ["", "4317", "https://h:1", "http://h:1/v1/traces",
                                   "grpc://h:1", "h:0", "h:x", "http://"])
def test_bad_otlp_endpoints_are_refused_in_one_line(value: str) -> None:
    with pytest.raises(ValueError, match="--otlp-endpoint") as err:
        parse_otlp_endpoint(value)
    assert "\n" not in str(err.value)


# ====================================================================== the header splice
NEW = f"00-{TRACE}-{'ab' * 8}-01"


def test_the_traceparent_is_replaced_where_it_was_or_added_when_absent() -> None:
    fields = [(":path", "/a"), ("traceparent", SAMPLED), ("x", "y")]
    for table in (0, 4096):  # a scanned and a decoded block
        enc = Encoder()
        enc.header_table_size = table
        hb = HeaderReader(BIG).read(_encode(enc, fields, True, [False] * 3))
        assert hb.decoded is (table != 0)
        assert hb.get("traceparent") == SAMPLED
        assert _fresh_decode(hb.forwardable(None, NEW)) == [
            (b":path", b"/a"), (b"traceparent", NEW.encode()), (b"x", b"y")]
        assert _fresh_decode(hb.forwardable("5S", NEW)) == [
            (b":path", b"/a"), (b"traceparent", NEW.encode()), (b"x", b"y"),
            (b"grpc-timeout", b"5S")]
        assert _fresh_decode(hb.forwardable()) == _forwarded(fields)  # None: as received
    hb = HeaderReader(BIG).read(encode_block([(":path", "/a")]))
    assert _fresh_decode(hb.forwardable(None, NEW)) == [(b":path", b"/a"),
                                                         (b"traceparent", NEW.encode())]


def test_every_received_copy_of_the_traceparent_gives_way_to_one() -> None:
    block = encode_block([("traceparent", "one"), (":path", "/a"), ("traceparent", "two")])
    out = HeaderReader(BIG).read(block).forwardable(None, NEW)
    assert _fresh_decode(out) == [(b"traceparent", NEW.encode()), (b":path", b"/a")]


@FAST
@given(pairs=header_lists, huffman=st.booleans(), table=st.sampled_from([0, 4096]),
       timeout=st.sampled_from([None, "77m"]), value=st.sampled_from([NEW, "x", ""]))
def test_spliced_blocks_hold_exactly_one_traceparent_where_the_first_was(
        pairs: list[tuple[str, str]], huffman: bool, table: int, timeout: str | None,
        value: str) -> None:
    enc = Encoder()
    enc.header_table_size = table
    hb = HeaderReader(BIG).read(_encode(enc, pairs, huffman, [False] * 12))
    expected = _forwarded(pairs)
    if timeout is not None:  # as test_frames_headers checks it: replaced, else appended
        pos = next((i for i, (n, _) in enumerate(expected) if n == b"grpc-timeout"), None)
        if pos is None:
            expected.append((b"grpc-timeout", timeout.encode()))
        else:
            expected[pos] = (b"grpc-timeout", timeout.encode())
    tp = b"traceparent"
    first = next((i for i, (n, _) in enumerate(expected) if n == tp), None)
    rest = [(n, v) for n, v in expected if n != tp]
    if first is None:
        rest.append((tp, value.encode()))
    else:
        rest.insert(sum(1 for n, _ in expected[:first] if n != tp), (tp, value.encode()))
    assert _fresh_decode(hb.forwardable(timeout, value)) == rest


# ====================================================================== through the relay
def test_every_attempt_of_a_retried_call_carries_the_spans_traceparent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str | None]] = []
    handle = R.Scripted.handle

    def recording(self: R.Scripted, events: list) -> None:
        from sidecar.http2.events import HeadersReceived
        for ev in events:
            if type(ev) is HeadersReceived and ev.first:
                seen.append((self.mode, ev.headers.get("traceparent")))
        handle(self, events)
    monkeypatch.setattr(R.Scripted, "handle", recording)
    for incoming in ((), (("traceparent", SAMPLED),)):
        seen.clear()
        mesh = R.RetryMesh(modes={R.A.address: "unavailable"})
        sink = Sink()
        trace = Trace(outbound=True, service="web", sample_rate=1.0, sink=sink,
                      rng=random.Random(5))
        old = mesh.hooks.stack
        pool_of = mesh.endpoint_pool
        mesh.hooks.stack = Stack([old.layers[0], trace, *old.layers[1:], trace.ending()],
                                 lambda call, pool_of=pool_of: pool_of(call.endpoint, call.route))
        caller = mesh.caller()
        sid = caller.start(R.request_block(SAY, extra=incoming))
        caller.send(sid, R.grpc_message(b"x"), end=True)
        mesh.pump()
        mesh.the_caller = caller  # type: ignore[attr-defined]
        R.settle(mesh)
        assert R.status_of(mesh, sid) == ("0", "")
        (span,) = sink
        want = f"00-{span.trace_id}-{span.span_id}-01"
        assert seen == [("unavailable", want), ("ok", want)]
        assert "retry" in kinds(span) and span.attributes["mesh.attempts"] == 2
        if incoming:
            assert span.trace_id == TRACE and span.parent_id == PARENT


# ====================================================================== reading our traceparent
OURS = f"00-{TRACE}-{'cd' * 8}-01"  # what a sidecar appends: 55 characters, no Huffman


def _same_block(a: Any, b: Any) -> None:
    assert (a.fields, a.list_bytes, a.timeout_span, list(a.strip_spans), a.trace_spans,
            a.decoded) == (b.fields, b.list_bytes, b.timeout_span, list(b.strip_spans),
                           b.trace_spans, b.decoded)
    assert a.forwardable() == b.forwardable()
    assert a.forwardable("1S", NEW) == b.forwardable("1S", NEW)


@FAST
@given(pairs=header_lists, huffman=st.booleans())
def test_a_block_ending_with_our_traceparent_reads_as_a_full_scan(
        pairs: list[tuple[str, str]], huffman: bool) -> None:
    from sidecar.http2.headers import encode_literal
    enc = Encoder()
    enc.header_table_size = 0
    block = _encode(enc, pairs, huffman, [False] * 12) + encode_literal(b"traceparent",
                                                                         OURS.encode())
    full = HeaderReader(BIG)
    full.table_size = 0
    reference = full._scan(block)
    fast = HeaderReader(BIG)
    fast.table_size = 0
    for _ in range(2):  # the second time the head comes from the scan cache
        _same_block(fast.read(block), reference)


def test_a_value_that_only_looks_like_our_traceparent_is_read_whole() -> None:
    from sidecar.http2.headers import encode_literal
    tail = encode_literal(b"traceparent", OURS.encode()).decode("latin-1")
    block = encode_block([(":path", "/a"), ("x-trick", "v" + tail)])
    reader = HeaderReader(BIG)
    reader.table_size = 0
    hb = reader.read(block)
    assert hb.get("traceparent") is None and hb.lookup("x-trick") == "v" + tail
    assert hb.trace_spans == ()


def test_a_list_near_its_limit_is_sized_exactly_with_our_traceparent() -> None:
    from sidecar.http2.headers import HeaderListTooLarge, encode_literal
    block = encode_block([(":path", "/a")]) + encode_literal(b"traceparent", OURS.encode())
    size = (5 + 2 + 32) + (11 + 55 + 32)
    for limit, ok in ((size, True), (size - 1, False)):
        reader = HeaderReader(limit)
        reader.table_size = 0
        if ok:
            assert reader.read(block).list_bytes == size
        else:
            with pytest.raises(HeaderListTooLarge):
                reader.read(block)


def _outcome(reader: HeaderReader, block: bytes, scan_only: bool) -> Any:
    from sidecar.http2.headers import HeaderListTooLarge, HpackError
    try:
        hb = reader._scan(block) if scan_only else reader.read(block)
    except (HpackError, HeaderListTooLarge) as exc:
        return type(exc).__name__
    except Exception as exc:  # the scanner's own "needs the decoder": compare as such
        return type(exc).__name__
    return (hb.fields, hb.list_bytes, hb.trace_spans, hb.forwardable("1S", NEW))


@FAST
@given(pairs=header_lists, huffman=st.booleans(),
       edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 2)),
                      max_size=3),
       limit=st.sampled_from([BIG, 300]))
def test_mangled_heads_before_our_traceparent_read_as_the_full_scan_says(
        pairs: list[tuple[str, str]], huffman: bool, edits: list[tuple[int, int, int]],
        limit: int) -> None:
    from sidecar.http2.headers import encode_literal
    from tests.unit.test_frames_headers import _apply
    enc = Encoder()
    enc.header_table_size = 0
    head = _apply(_encode(enc, pairs, huffman, [False] * 12), edits)
    block = head + encode_literal(b"traceparent", OURS.encode())
    readers = []
    for _ in range(2):
        r = HeaderReader(limit)
        r.table_size = 0
        readers.append(r)
    full = _outcome(readers[0], block, scan_only=True)
    if full == "_NeedsDecoder":
        return  # read() decodes such a block with hpack, as before
    assert _outcome(readers[1], block, scan_only=False) == full
