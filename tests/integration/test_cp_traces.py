"""The control plane's embedded OTLP receiver as a real process: the OpenTelemetry SDK's own
OTLP/gRPC exporter sends spans over mTLS (meshctl's admin credentials), and they come back
through Admin.ListTraces / Admin.GetTrace; clients without a mesh certificate, malformed spans
and oversized requests do not get in the way of good spans."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc
from tests.integration.test_control_plane import (
    ControlPlaneProc,
    Workload,
    admin_channel,
    join,
    rpc_error,
    start_cp,
)
from tests.support.sidecar import REPO_ROOT


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProc]:
    base = tmp_path_factory.mktemp("cp-traces")
    c = start_cp(base / "ca", base / "data", "--otlp-listen", "127.0.0.1:0")
    yield c
    assert c.proc.stop() == 0, c.proc.log_tail()


@pytest.fixture(scope="module")
def admin(cp: ControlPlaneProc) -> Iterator[pb_grpc.AdminStub]:
    with admin_channel(cp) as ch:
        yield pb_grpc.AdminStub(ch)


def admin_creds(cp: ControlPlaneProc) -> grpc.ChannelCredentials:
    d = cp.ca_dir
    return grpc.ssl_channel_credentials(root_certificates=(d / "ca.pem").read_bytes(),
                                        private_key=(d / "admin-key.pem").read_bytes(),
                                        certificate_chain=(d / "admin.pem").read_bytes())


def otlp_stub(cp: ControlPlaneProc, creds: grpc.ChannelCredentials
              ) -> tuple[grpc.Channel, otlp_grpc.TraceServiceStub]:
    ch = grpc.secure_channel(cp.proc.ready["otlp"], creds,
                             options=[("grpc.max_send_message_length", 16 * 1024 * 1024)])
    return ch, otlp_grpc.TraceServiceStub(ch)


class Recorder:
    """Spans made with the SDK by one service (its resource), collected in memory."""

    def __init__(self, service: str) -> None:
        self.memory = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        self.provider.add_span_processor(SimpleSpanProcessor(self.memory))
        self.tracer = self.provider.get_tracer("test")

    def spans(self) -> list[ReadableSpan]:
        return list(self.memory.get_finished_spans())


def export(cp: ControlPlaneProc, spans: list[ReadableSpan]) -> SpanExportResult:
    exporter = OTLPSpanExporter(endpoint=cp.proc.ready["otlp"], credentials=admin_creds(cp),
                                timeout=10)
    try:
        return exporter.export(spans)
    finally:
        exporter.shutdown()


def traced_call(method: str, grpc_code: int) -> tuple[str, list[ReadableSpan]]:
    """A call as the mesh traces it: the gateway's server span, its sidecar's client span with
    a retry event, payment's server span under it. Returns the trace id and the spans."""
    gateway, payment = Recorder("gateway"), Recorder("payment")
    with gateway.tracer.start_as_current_span(
            "gateway", kind=SpanKind.SERVER,
            attributes={"rpc.method": method, "rpc.grpc.status_code": grpc_code}) as root:
        with gateway.tracer.start_as_current_span("outbound", kind=SpanKind.CLIENT) as out:
            out.add_event("retry", {"attempt": 2, "reason": "UNAVAILABLE"})
            ctx = trace.set_span_in_context(out)
            with payment.tracer.start_as_current_span(
                    "inbound", context=ctx, kind=SpanKind.SERVER,
                    attributes={"rpc.grpc.status_code": grpc_code}) as inbound:
                if grpc_code:
                    inbound.set_status(Status(StatusCode.ERROR))
        tid = format(root.get_span_context().trace_id, "032x")
    return tid, gateway.spans() + payment.spans()


def test_sdk_spans_are_listed_and_fetched_with_their_tree_and_events(
        cp: ControlPlaneProc, admin: pb_grpc.AdminStub) -> None:
    tid, spans = traced_call("/order.Order/CreateOrder", 0)
    assert export(cp, spans) == SpanExportResult.SUCCESS

    listed = {t.trace_id: t for t in admin.ListTraces(pb.ListTracesRequest(), timeout=5).traces}
    t = listed[tid]
    assert (t.root_service, t.method, t.status, t.spans, t.error) == \
        ("gateway", "/order.Order/CreateOrder", "OK", 3, False)
    assert t.duration_ms > 0 and t.start_unix > 0

    got = admin.GetTrace(pb.GetTraceRequest(trace_id=tid.upper()), timeout=5)
    assert got.summary.trace_id == tid
    by_name = {s.name: s for s in got.spans}
    assert set(by_name) == {"gateway", "outbound", "inbound"}
    assert by_name["gateway"].parent_span_id == "" and by_name["gateway"].kind == "SERVER"
    assert by_name["outbound"].parent_span_id == by_name["gateway"].span_id
    assert by_name["inbound"].parent_span_id == by_name["outbound"].span_id
    assert by_name["inbound"].service == "payment" and by_name["outbound"].service == "gateway"
    (event,) = by_name["outbound"].events
    assert event.name == "retry" and json.loads(event.attributes_json) == \
        {"attempt": 2, "reason": "UNAVAILABLE"}
    assert json.loads(by_name["gateway"].attributes_json)["rpc.method"] == \
        "/order.Order/CreateOrder"
    assert all(len(s.span_id) == 16 and s.trace_id == tid for s in got.spans)


def test_service_and_errors_filters(cp: ControlPlaneProc, admin: pb_grpc.AdminStub) -> None:
    ok_tid, ok_spans = traced_call("/p.P/Fine", 0)
    bad_tid, bad_spans = traced_call("/p.P/Broken", 14)
    assert export(cp, ok_spans + bad_spans) == SpanExportResult.SUCCESS

    errors = {t.trace_id: t for t in
              admin.ListTraces(pb.ListTracesRequest(errors=True, limit=100), timeout=5).traces}
    assert bad_tid in errors and ok_tid not in errors
    assert errors[bad_tid].status == "UNAVAILABLE" and errors[bad_tid].error
    of_payment = {t.trace_id for t in admin.ListTraces(
        pb.ListTracesRequest(service="payment", limit=100), timeout=5).traces}
    assert {ok_tid, bad_tid} <= of_payment
    assert admin.ListTraces(pb.ListTracesRequest(service="nobody"), timeout=5).traces == []
    newest = admin.ListTraces(pb.ListTracesRequest(limit=1), timeout=5).traces
    assert len(newest) == 1 and newest[0].trace_id == bad_tid


def test_unknown_and_malformed_trace_ids_get_clear_errors(admin: pb_grpc.AdminStub) -> None:
    err = rpc_error(lambda: admin.GetTrace(pb.GetTraceRequest(trace_id="ab" * 16), timeout=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "ab" * 16 in err.details()
    err = rpc_error(lambda: admin.GetTrace(pb.GetTraceRequest(trace_id="xyz"), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "32 hex digits" in err.details()
    err = rpc_error(lambda: admin.ListTraces(pb.ListTracesRequest(limit=-1), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_client_without_a_mesh_certificate_cannot_export(cp: ControlPlaneProc) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=(cp.ca_dir / "ca.pem").read_bytes())
    ch, stub = otlp_stub(cp, creds)
    with ch:
        err = rpc_error(lambda: stub.Export(otlp_pb.ExportTraceServiceRequest(), timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def _kv(key: str, text: str) -> common_pb2.KeyValue:
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=text))


def _request(*spans: trace_pb2.Span) -> otlp_pb.ExportTraceServiceRequest:
    return otlp_pb.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource_pb2.Resource(attributes=[_kv("service.name", "raw")]),
        scope_spans=[trace_pb2.ScopeSpans(spans=list(spans))])])


def test_malformed_spans_are_rejected_as_partial_success_and_good_ones_kept(
        cp: ControlPlaneProc, admin: pb_grpc.AdminStub) -> None:
    tid = "5e" * 16
    good = trace_pb2.Span(trace_id=bytes.fromhex(tid), span_id=b"\x07" * 8, name="good",
                          start_time_unix_nano=1, end_time_unix_nano=2)
    bad = [trace_pb2.Span(trace_id=b"\x01" * 3, span_id=b"\x07" * 8, name="short trace id"),
           trace_pb2.Span(trace_id=bytes.fromhex(tid), span_id=b"\x07" * 9, name="long id")]
    ch, stub = otlp_stub(cp, admin_creds(cp))
    with ch:
        resp = stub.Export(_request(bad[0], good, bad[1]), timeout=5)
        assert resp.partial_success.rejected_spans == 2
        assert "trace_id is 3 bytes" in resp.partial_success.error_message

        # more than 4 MiB in one request: refused whole, and the receiver keeps serving
        huge = trace_pb2.Span(trace_id=bytes.fromhex("6f" * 16), span_id=b"\x08" * 8,
                              attributes=[_kv("blob", "x" * (5 * 1024 * 1024))])
        err = rpc_error(lambda: stub.Export(_request(huge), timeout=10))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not stub.Export(_request(good), timeout=5).HasField("partial_success")

    got = admin.GetTrace(pb.GetTraceRequest(trace_id=tid), timeout=5)
    assert [s.name for s in got.spans] == ["good"] and got.spans[0].service == "raw"
    err = rpc_error(lambda: admin.GetTrace(pb.GetTraceRequest(trace_id="6f" * 16), timeout=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_a_join_names_the_otlp_endpoint(cp: ControlPlaneProc, admin: pb_grpc.AdminStub) -> None:
    token = admin.CreateToken(pb.CreateTokenRequest(service="payment", uses=1), timeout=5).token
    resp = join(token, Workload(), csr_service="payment")
    assert resp.otlp_endpoint == cp.proc.ready["otlp"] != ""


def test_an_otlp_address_that_is_taken_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = f"127.0.0.1:{held.getsockname()[1]}"
        r = subprocess.run([sys.executable, "-m", "control_plane.main", "--listen", "127.0.0.1:0",
                            "--bootstrap-listen", "127.0.0.1:0", "--admin-http", "127.0.0.1:0",
                            "--otlp-listen", taken, "--ca-dir", str(tmp_path / "ca"),
                            "--data-dir", str(tmp_path / "data")],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("mesh-control-plane: error: ")
    assert taken in r.stderr


def test_without_otlp_listen_there_is_no_receiver_and_traces_say_so(tmp_path: Path) -> None:
    c = start_cp(tmp_path / "ca", tmp_path / "data", "--otlp-listen", "",
                 "--admin-http", "127.0.0.1:0")
    try:
        assert c.proc.ready["otlp"] == ""
        with admin_channel(c) as ch:
            err = rpc_error(lambda: pb_grpc.AdminStub(ch).ListTraces(pb.ListTracesRequest(),
                                                                     timeout=5))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        assert c.proc.stop() == 0, c.proc.log_tail()
