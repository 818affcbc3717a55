"""The trace store (SQLite, in a tmp dir) and the OTLP decoding, without a network: spans go in,
summaries and traces come out; roots, statuses, filters and retention by count and by age."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp_pb
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from control_plane.otlp import MAX_ATTRIBUTES, MAX_VALUE_CHARS, decode_export
from control_plane.traces import (
    Span,
    SpanEvent,
    SpanHead,
    TraceStore,
    find_root,
    grpc_status_name,
    normalize_trace_id,
    span_method,
    span_status,
    summarize,
)

T1 = "0af7651916cd43dd8448eb211c80319c"
T2 = "1bf7651916cd43dd8448eb211c80319d"
T3 = "2cf7651916cd43dd8448eb211c80319e"
SEC = 1_000_000_000


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def span(trace: str, sid: int, parent: int = 0, *, service: str = "order", start_s: float = 1.0,
         ms: float = 10.0, status: str = "OK", error: bool = False, name: str = "",
         attrs: dict | None = None, events: tuple[SpanEvent, ...] = ()) -> Span:
    start = int(start_s * SEC)
    return Span(trace, f"{sid:016x}", f"{parent:016x}" if parent else "", service,
                name or f"span-{sid}", "CLIENT", start, start + int(ms * 1e6), status, error,
                attrs or {}, events)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[TraceStore]:
    s = TraceStore(tmp_path / "traces.sqlite", retention_s=100, max_spans=1000,
                   prune_every_spans=1, clock=clock)
    yield s
    s.close()


# ---------------------------------------------------------------------- pure helpers
def test_grpc_status_names_come_from_codes_digits_or_names() -> None:
    assert grpc_status_name(0) == "OK"
    assert grpc_status_name(14) == "UNAVAILABLE"
    assert grpc_status_name("9") == "FAILED_PRECONDITION"
    assert grpc_status_name("reset") == "RESET"
    assert grpc_status_name(99) is None
    assert grpc_status_name(True) is None
    assert grpc_status_name("not a status!") is None


def test_span_status_prefers_the_grpc_code_and_an_otlp_error_always_errs() -> None:
    assert span_status({"rpc.grpc.status_code": 0}, "UNSET") == ("OK", False)
    assert span_status({"rpc.grpc.status_code": 14}, "UNSET") == ("UNAVAILABLE", True)
    assert span_status({"rpc.grpc.status_code": 0}, "ERROR") == ("OK", True)
    assert span_status({}, "ERROR") == ("ERROR", True)
    assert span_status({}, "UNSET") == ("UNSET", False)


def test_span_method_is_rpc_method_joined_with_the_service_else_the_name() -> None:
    assert span_method({"rpc.method": "/order.Order/Create"}, "x") == "/order.Order/Create"
    assert span_method({"rpc.method": "Create", "rpc.service": "order.Order"}, "x") \
        == "/order.Order/Create"
    assert span_method({}, "outbound /a.B/C") == "outbound /a.B/C"


def test_the_root_is_the_parentless_span_else_the_earliest_orphan() -> None:
    def head(sid: str, parent: str, start: int) -> SpanHead:
        return SpanHead(sid, parent, "s", "m", start, start + 1, "OK", False)

    with_root = [head("b", "a", 1), head("a", "", 5), head("c", "b", 2)]
    assert find_root(with_root).span_id == "a"
    orphans = [head("b", "gone", 3), head("c", "b", 4), head("d", "gone2", 2)]
    assert find_root(orphans).span_id == "d"
    assert find_root([]) is None


def test_a_trace_summary_takes_the_roots_method_service_status_and_duration() -> None:
    root = span(T1, 1, service="gateway", ms=250, status="UNSET",
                attrs={"rpc.method": "/order.Order/CreateOrder"}).head()
    child = span(T1, 2, 1, service="payment", start_s=1.1, ms=5, status="UNAVAILABLE",
                 error=True).head()
    s = summarize(T1, [child, root])
    assert (s.root_service, s.method, s.status, s.spans, s.error) == \
        ("gateway", "/order.Order/CreateOrder", "ERROR", 2, True)
    assert s.duration_ms == pytest.approx(250)
    assert s.start_unix == pytest.approx(1.0)
    ok_root = span(T1, 1, status="OK").head()
    assert summarize(T1, [ok_root, child]).status == "OK"  # the root's own status wins


def test_trace_ids_are_32_hex_digits_not_all_zero() -> None:
    assert normalize_trace_id(T1.upper()) == T1
    for bad in ("", "abc", "z" * 32, "0" * 32, T1 + "0"):
        with pytest.raises(ValueError):
            normalize_trace_id(bad)


# ---------------------------------------------------------------------- the store
def test_spans_round_trip_with_attributes_and_events(store: TraceStore) -> None:
    ev = SpanEvent(1_500_000_000, "retry", {"attempt": 2, "reason": "UNAVAILABLE"})
    a = span(T1, 1, attrs={"rpc.method": "/a.B/C", "rpc.grpc.status_code": 0}, events=(ev,))
    b = span(T1, 2, 1, service="payment", start_s=1.002)
    assert store.insert([a, b]) == 2
    summary, spans = store.get_trace(T1)
    assert summary.spans == 2 and summary.root_service == "order" and summary.method == "/a.B/C"
    assert [s.span_id for s in spans] == [a.span_id, b.span_id]
    assert spans[0].events == (ev,)
    assert dict(spans[0].attributes) == {"rpc.method": "/a.B/C", "rpc.grpc.status_code": 0}
    assert spans[1].parent_span_id == a.span_id
    assert store.get_trace(T2) is None


def test_a_span_sent_twice_is_kept_once(store: TraceStore) -> None:
    a = span(T1, 1)
    assert store.insert([a]) == 1
    assert store.insert([a, span(T1, 2, 1)]) == 1
    assert store.count_spans() == 2 and store.duplicate_spans == 1


def test_the_root_arriving_later_becomes_the_root(store: TraceStore) -> None:
    store.insert([span(T1, 2, 1, service="payment", start_s=1.01)])
    assert store.list_traces()[0].root_service == "payment"  # an orphan stands in
    store.insert([span(T1, 1, service="gateway")])
    (t,) = store.list_traces()
    assert (t.root_service, t.spans) == ("gateway", 2)


def test_list_is_newest_first_and_limited(store: TraceStore) -> None:
    store.insert([span(T1, 1, start_s=1), span(T2, 1, start_s=3), span(T3, 1, start_s=2)])
    assert [t.trace_id for t in store.list_traces()] == [T2, T3, T1]
    assert [t.trace_id for t in store.list_traces(limit=2)] == [T2, T3]
    assert len(store.list_traces(limit=0)) == 3  # 0 = the default


def test_the_errors_filter_keeps_traces_where_any_span_erred(store: TraceStore) -> None:
    store.insert([span(T1, 1), span(T1, 2, 1, service="payment", status="UNAVAILABLE",
                                    error=True),
                  span(T2, 1)])
    (t,) = store.list_traces(errors=True)
    assert t.trace_id == T1 and t.error and t.status == "OK"  # the root answered OK (a retry)


def test_the_service_filter_keeps_traces_with_a_span_of_that_service(store: TraceStore) -> None:
    store.insert([span(T1, 1, service="order"), span(T1, 2, 1, service="payment"),
                  span(T2, 1, service="order"), span(T3, 1, service="inventory")])
    assert {t.trace_id for t in store.list_traces(service="payment")} == {T1}
    assert {t.trace_id for t in store.list_traces(service="order")} == {T1, T2}
    assert store.list_traces(service="nobody") == []


def test_over_max_spans_the_oldest_traces_are_dropped_whole(tmp_path: Path, clock: Clock) -> None:
    store = TraceStore(tmp_path / "t.sqlite", retention_s=1000, max_spans=5,
                       prune_every_spans=1, clock=clock)
    try:
        ids = [f"{i + 1:032x}" for i in range(4)]
        for i, tid in enumerate(ids):  # received one after another, 2 spans each
            clock.now += 1
            store.insert([span(tid, 1, start_s=10 - i), span(tid, 2, 1, start_s=10 - i)])
        assert store.count_spans() <= 5
        kept = {t.trace_id for t in store.list_traces()}
        assert kept == {ids[3], ids[2]}  # received last, whatever their start times
        assert store.get_trace(ids[0]) is None
        assert store.evicted_spans == 4
    finally:
        store.close()


def test_traces_past_retention_are_not_listed_and_are_deleted(store: TraceStore,
                                                              clock: Clock) -> None:
    store.insert([span(T1, 1)])
    clock.now += 60
    store.insert([span(T2, 1)])
    clock.now += 50  # T1 is 110 s old, T2 50 s
    assert [t.trace_id for t in store.list_traces()] == [T2]
    assert store.get_trace(T1) is None
    assert store.prune() == 1
    assert store.count_spans() == 1


def test_a_trace_that_keeps_receiving_spans_stays(store: TraceStore, clock: Clock) -> None:
    store.insert([span(T1, 1)])
    clock.now += 90
    store.insert([span(T1, 2, 1)])
    clock.now += 20
    store.prune()
    assert store.get_trace(T1)[0].spans == 2


def test_the_store_survives_a_reopen(tmp_path: Path, clock: Clock) -> None:
    s = TraceStore(tmp_path / "t.sqlite", clock=clock)
    s.insert([span(T1, 1)])
    s.close()
    s = TraceStore(tmp_path / "t.sqlite", clock=clock)
    try:
        assert s.get_trace(T1)[0].spans == 1
    finally:
        s.close()


# ---------------------------------------------------------------------- OTLP decoding
def _kv(key: str, value: object) -> common_pb2.KeyValue:
    v = common_pb2.AnyValue()
    if isinstance(value, bool):
        v.bool_value = value
    elif isinstance(value, int):
        v.int_value = value
    elif isinstance(value, float):
        v.double_value = value
    else:
        v.string_value = str(value)
    return common_pb2.KeyValue(key=key, value=v)


def _request(*spans: trace_pb2.Span, service: str = "order") -> otlp_pb.ExportTraceServiceRequest:
    return otlp_pb.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource_pb2.Resource(attributes=[_kv("service.name", service)]),
        scope_spans=[trace_pb2.ScopeSpans(spans=list(spans))])])


def test_decoding_keeps_ids_kind_status_attributes_and_events() -> None:
    s = trace_pb2.Span(
        trace_id=bytes.fromhex(T1), span_id=bytes.fromhex("00f067aa0ba902b7"),
        parent_span_id=bytes.fromhex("00000000000000aa"), name="outbound",
        kind=trace_pb2.Span.SPAN_KIND_CLIENT, start_time_unix_nano=5, end_time_unix_nano=9,
        attributes=[_kv("rpc.grpc.status_code", 14), _kv("rpc.method", "/a.B/C"),
                    _kv("net.peer", "127.0.0.1:1"), _kv("ratio", 0.5), _kv("ok", True)],
        events=[trace_pb2.Span.Event(time_unix_nano=7, name="retry",
                                     attributes=[_kv("attempt", 2)])],
        status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_ERROR))
    d = decode_export(_request(s, service="payment"))
    assert d.rejected == 0
    (x,) = d.spans
    assert (x.trace_id, x.span_id, x.parent_span_id) == (T1, "00f067aa0ba902b7",
                                                          "00000000000000aa")
    assert (x.service, x.kind, x.status, x.error) == ("payment", "CLIENT", "UNAVAILABLE", True)
    assert (x.start_unix_nano, x.end_unix_nano, x.method) == (5, 9, "/a.B/C")
    assert x.attributes["ratio"] == 0.5 and x.attributes["ok"] is True
    assert x.events == (SpanEvent(7, "retry", {"attempt": 2}),)


def test_malformed_spans_are_rejected_and_counted_and_good_ones_kept() -> None:
    good = trace_pb2.Span(trace_id=bytes.fromhex(T1), span_id=b"\x01" * 8, name="good")
    bad = [
        trace_pb2.Span(trace_id=b"\x01" * 15, span_id=b"\x01" * 8),
        trace_pb2.Span(trace_id=b"\x00" * 16, span_id=b"\x01" * 8),
        trace_pb2.Span(trace_id=b"\x01" * 16, span_id=b"\x01" * 7),
        trace_pb2.Span(trace_id=b"\x01" * 16, span_id=b"\x00" * 8),
        trace_pb2.Span(trace_id=b"\x01" * 16, span_id=b"\x01" * 8, parent_span_id=b"\x01" * 3),
        trace_pb2.Span(trace_id=b"\x01" * 16, span_id=b"\x01" * 8, end_time_unix_nano=2**64 - 1),
    ]
    d = decode_export(_request(bad[0], good, *bad[1:]))
    assert [s.name for s in d.spans] == ["good"]
    assert d.rejected == len(bad)
    assert "trace_id is 15 bytes" in d.reasons[0] and len(d.reasons) <= 5


def test_decoding_bounds_attributes_and_values() -> None:
    s = trace_pb2.Span(trace_id=bytes.fromhex(T1), span_id=b"\x01" * 8,
                       attributes=[_kv(f"k{i}", "v" * (MAX_VALUE_CHARS + 10))
                                   for i in range(MAX_ATTRIBUTES + 50)])
    (x,) = decode_export(_request(s, service="")).spans
    assert len(x.attributes) == MAX_ATTRIBUTES
    assert all(len(v) == MAX_VALUE_CHARS for v in x.attributes.values())
    assert x.service == ""  # an empty service.name is kept as sent


def test_a_resource_without_service_name_is_unknown_service() -> None:
    req = otlp_pb.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        scope_spans=[trace_pb2.ScopeSpans(spans=[trace_pb2.Span(
            trace_id=bytes.fromhex(T1), span_id=b"\x01" * 8)])])])
    assert decode_export(req).spans[0].service == "unknown_service"
