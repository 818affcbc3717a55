"""The embedded OTLP/gRPC trace receiver: ``opentelemetry.proto.collector.trace.v1.
TraceService/Export`` on its own listener (``mesh-control-plane --otlp-listen``), behind the
same mTLS as the API (a client certificate from the mesh CA is required; any workload or admin
identity may export), storing what it gets in the ``TraceStore``.

Hostile input is bounded, never fatal:

* a request larger than ``MAX_OTLP_MESSAGE_BYTES`` is refused by gRPC (RESOURCE_EXHAUSTED)
  before it is decoded;
* a malformed span (a trace id that is not 16 bytes or all zero, a span id that is not 8
  bytes or all zero, a parent id that is neither empty nor 8 bytes, a time past int64) is
  skipped and counted; the good spans of the same request are kept, and the answer carries
  ``partial_success.rejected_spans`` with the first reasons, as OTLP says;
* names, attributes, values and events are cut to fixed bounds (``MAX_*`` below) rather than
  refused.

``decode_export`` is pure; ``TraceReceiver.Export`` writes in a worker thread (one transaction
per request), so the event loop never waits on SQLite.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from control_plane.traces import ERROR, OK, UNSET, Span, SpanEvent, TraceStore, span_status

log = logging.getLogger("mesh.control_plane.otlp")

MAX_OTLP_MESSAGE_BYTES = 4 * 1024 * 1024   # one Export request
MAX_NAME_CHARS = 256           # span, event and service names
MAX_ATTRIBUTES = 128           # per span, per event, per resource (the rest are dropped)
MAX_KEY_CHARS = 256
MAX_VALUE_CHARS = 4096         # string values (and hex of bytes values) are cut to this
MAX_ARRAY_ITEMS = 128
MAX_VALUE_DEPTH = 4            # nested arrays / key-value lists deeper than this become null
MAX_EVENTS = 128               # per span
MAX_REASONS = 5                # malformed-span reasons reported in partial_success
MAX_INT64 = 2**63 - 1
LOG_EVERY_REJECTING_EXPORT = 100  # exports with malformed spans: the 1st, 101st, ... are logged
OTLP_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_OTLP_MESSAGE_BYTES),
    ("grpc.max_send_message_length", 64 * 1024),
    ("grpc.so_reuseport", 0),  # a port another process holds is an error, not a shared port
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
]
_KIND_PREFIX = "SPAN_KIND_"
_STATUS = {trace_pb2.Status.STATUS_CODE_UNSET: UNSET, trace_pb2.Status.STATUS_CODE_OK: OK,
           trace_pb2.Status.STATUS_CODE_ERROR: ERROR}


@dataclass
class Decoded:
    """What one Export request holds: the spans to keep, how many were rejected and the first
    few reasons why."""

    spans: list[Span] = field(default_factory=list)
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)

    def reject(self, reason: str) -> None:
        self.rejected += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit]


def any_value(v: common_pb2.AnyValue, depth: int = 0) -> Any:
    """An OTLP ``AnyValue`` as a JSON-able value, bounded (strings cut, arrays and maps
    capped, nesting beyond ``MAX_VALUE_DEPTH`` -> None; bytes as hex; a non-finite double as
    its string). Pure."""
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return _cut(v.string_value, MAX_VALUE_CHARS)
    if kind == "bool_value":
        return v.bool_value
    if kind == "int_value":
        return v.int_value
    if kind == "double_value":
        return v.double_value if math.isfinite(v.double_value) else str(v.double_value)
    if kind == "bytes_value":
        return _cut(v.bytes_value.hex(), MAX_VALUE_CHARS)
    if depth >= MAX_VALUE_DEPTH:
        return None
    if kind == "array_value":
        return [any_value(x, depth + 1) for x in v.array_value.values[:MAX_ARRAY_ITEMS]]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values, depth + 1)
    return None


def attributes(kvs: Any, depth: int = 0) -> dict[str, Any]:
    """OTLP ``KeyValue``s as a dict: at most ``MAX_ATTRIBUTES``, keys cut, the last of a
    repeated key wins. Pure."""
    out: dict[str, Any] = {}
    for kv in kvs[:MAX_ATTRIBUTES]:
        out[_cut(kv.key, MAX_KEY_CHARS)] = any_value(kv.value, depth)
    return out


def _resource_service(resource_attrs: Any) -> str:
    for kv in resource_attrs:
        if kv.key == "service.name" and kv.value.WhichOneof("value") == "string_value":
            return _cut(kv.value.string_value, MAX_NAME_CHARS)
    return "unknown_service"


def _span_problem(s: trace_pb2.Span) -> str:
    """Why ``s`` cannot be kept; "" when it can."""
    if len(s.trace_id) != 16 or not any(s.trace_id):
        return f"trace_id is {len(s.trace_id)} bytes" if len(s.trace_id) != 16 \
            else "trace_id is all zero"
    if len(s.span_id) != 8 or not any(s.span_id):
        return f"span_id is {len(s.span_id)} bytes" if len(s.span_id) != 8 \
            else "span_id is all zero"
    if len(s.parent_span_id) not in (0, 8):
        return f"parent_span_id is {len(s.parent_span_id)} bytes"
    if s.start_time_unix_nano > MAX_INT64 or s.end_time_unix_nano > MAX_INT64:
        return "a time is past 2^63 ns"
    return ""


def decode_span(s: trace_pb2.Span, service: str) -> Span:
    """One well-formed OTLP span (``_span_problem`` is "") of ``service`` as kept. Pure."""
    attrs = attributes(s.attributes)
    status, error = span_status(attrs, _STATUS.get(s.status.code, UNSET))
    kind_name = trace_pb2.Span.SpanKind.Name(s.kind) \
        if s.kind in trace_pb2.Span.SpanKind.values() else "SPAN_KIND_UNSPECIFIED"
    parent = s.parent_span_id.hex() if any(s.parent_span_id) else ""
    events = tuple(
        SpanEvent(min(e.time_unix_nano, MAX_INT64), _cut(e.name, MAX_NAME_CHARS),
                  attributes(e.attributes))
        for e in s.events[:MAX_EVENTS])
    return Span(s.trace_id.hex(), s.span_id.hex(), parent, service, _cut(s.name, MAX_NAME_CHARS),
                kind_name.removeprefix(_KIND_PREFIX), s.start_time_unix_nano,
                s.end_time_unix_nano, status, error, attrs, events)


def decode_export(request: otlp_pb.ExportTraceServiceRequest) -> Decoded:
    """Every span of an Export request, with its resource's ``service.name`` (else
    ``unknown_service``, as the SDK names it); malformed spans are counted in ``rejected``
    with the first reasons. Pure."""
    out = Decoded()
    for rs in request.resource_spans:
        service = _resource_service(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                problem = _span_problem(s)
                if problem:
                    out.reject(f"span {s.span_id.hex()[:16] or '-'} of trace "
                               f"{s.trace_id.hex()[:32] or '-'}: {problem}")
                    continue
                out.spans.append(decode_span(s, service))
    return out


class TraceReceiver(otlp_grpc.TraceServiceServicer):
    """``TraceService/Export`` into ``store``. ``identity(context)`` names the caller's kind
    ("service", "admin", "" = anything else, refused PERMISSION_DENIED): the TLS layer already
    refused clients without a mesh certificate. Counters (since start) for metrics:
    ``exports``, ``spans_accepted``, ``spans_rejected``, ``exports_failed`` (the store
    failed), ``exports_with_rejections``."""

    def __init__(self, store: TraceStore,
                 identity: Callable[[grpc.aio.ServicerContext], tuple[str, str]],
                 clock: Callable[[], float]) -> None:
        self.store = store
        self.identity = identity
        self.clock = clock
        self.exports = 0
        self.spans_accepted = 0
        self.spans_rejected = 0
        self.exports_failed = 0
        self.exports_with_rejections = 0

    async def Export(self, request: otlp_pb.ExportTraceServiceRequest,
                     context: grpc.aio.ServicerContext) -> otlp_pb.ExportTraceServiceResponse:
        kind, uri = self.identity(context)
        if kind not in ("service", "admin"):
            log.warning("refused an OTLP export from %s", uri)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{uri} may not export spans (workload or admin identities only)")
        decoded = decode_export(request)
        self.exports += 1
        if decoded.spans:
            try:
                await asyncio.to_thread(self.store.insert, decoded.spans, self.clock())
            except sqlite3.Error as exc:
                self.exports_failed += 1
                log.error("could not store %d span(s) from %s: %s", len(decoded.spans), uri, exc)
                # UNAVAILABLE is retryable for OTLP exporters: they send the batch again
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"the trace store failed: {exc}")
        self.spans_accepted += len(decoded.spans)
        if not decoded.rejected:
            return otlp_pb.ExportTraceServiceResponse()
        self.spans_rejected += decoded.rejected
        self.exports_with_rejections += 1
        message = (f"{decoded.rejected} malformed span(s) rejected: "
                   + "; ".join(decoded.reasons))
        if self.exports_with_rejections % LOG_EVERY_REJECTING_EXPORT == 1:  # no log flood
            log.warning("OTLP export from %s: %s (%d export(s) with rejected spans so far)",
                        uri, message, self.exports_with_rejections)
        return otlp_pb.ExportTraceServiceResponse(partial_success=otlp_pb.ExportTracePartialSuccess(
            rejected_spans=decoded.rejected, error_message=message))


def add_to_server(receiver: TraceReceiver, server: grpc.aio.Server) -> None:
    """Serve ``receiver`` as ``opentelemetry.proto.collector.trace.v1.TraceService``."""
    otlp_grpc.add_TraceServiceServicer_to_server(receiver, server)
