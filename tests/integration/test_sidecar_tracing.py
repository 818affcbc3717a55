"""Tracing with real processes: two standalone sidecars (web, outbound only; echo, in front of
an echo app) export their spans to this test's OTLP collector, a real
``opentelemetry.proto.collector.trace.v1.TraceService/Export`` server in the test process:
the web sidecar over mTLS with its workload certificate (``--otlp-endpoint HOST:PORT``), the
echo sidecar in plaintext (``--otlp-endpoint http://HOST:PORT``).

One call makes a CLIENT span (web) and a SERVER span (echo) of one trace, the SERVER span a
child of the CLIENT span, and the app sees a ``traceparent`` whose parent is the SERVER
span; a caller's sampled ``traceparent`` is continued; flag 00 makes no span anywhere; a
retried call's CLIENT span holds the retry, with one SERVER span per attempt.

The app is the echo servicer of ``tests.support.echo_server`` served in this process, so the
test can read the metadata each call brought it.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from protos.meshtest import echo_pb2, echo_pb2_grpc
from tests.support import procs
from tests.support.echo_server import EchoServicer, Sickness
from tests.support.pki import CA, spiffe_id
from tests.support.sidecar import inbound_addr, start_sidecar

pytestmark = pytest.mark.timeout(120)

UNARY = "/meshtest.Echo/Unary"
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
SERVER = trace_pb2.Span.SPAN_KIND_SERVER
ERROR = trace_pb2.Status.STATUS_CODE_ERROR
EXPORT_DELAY_MS = 50


# ---------------------------------------------------------------------- the test's collector
@dataclass
class Received:
    """One span as the collector got it: its resource's service, who sent it (the client
    certificate's SPIFFE ID, "" over plaintext) and the span."""

    service: str
    peer: str
    span: trace_pb2.Span

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    def attrs(self) -> dict[str, Any]:
        return {kv.key: _value(kv.value) for kv in self.span.attributes}

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        return [(e.name, {kv.key: _value(kv.value) for kv in e.attributes})
                for e in self.span.events]


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _peer_spiffe_id(context: grpc.ServicerContext) -> str:
    for pem in context.auth_context().get("x509_pem_cert", []):
        cert = x509.load_pem_x509_certificate(pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            return uri
    return ""


class Collector(otlp_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver that keeps every span it is sent, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received: list[Received] = []

    def Export(self, request: otlp_pb.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> otlp_pb.ExportTraceServiceResponse:
        peer = _peer_spiffe_id(context)
        got = []
        for rs in request.resource_spans:
            service = next((kv.value.string_value for kv in rs.resource.attributes
                            if kv.key == "service.name"), "")
            for ss in rs.scope_spans:
                got += [Received(service, peer, s) for s in ss.spans]
        with self._lock:
            self.received += got
        return otlp_pb.ExportTraceServiceResponse()

    def spans(self, trace_id: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.trace_id == trace_id]

    def trace(self, trace_id: str, n: int) -> list[Received]:
        """The spans of ``trace_id`` once ``n`` of them have arrived (fails after 10 s)."""
        return procs.wait_for(lambda: (s := self.spans(trace_id)) and len(s) >= n and s, 10,
                              what=f"{n} spans of trace {trace_id} at the collector")


# ---------------------------------------------------------------------- the app
class RecordingEcho(EchoServicer):
    """The echo app, keeping the ``traceparent`` each Unary call brought (None: none)."""

    def __init__(self, sickness: Sickness) -> None:
        super().__init__("echo-traced", sickness)
        self.traceparents: list[str | None] = []

    def Unary(self, request: Any, context: Any) -> Any:
        seen = dict(context.invocation_metadata()).get("traceparent")
        self.traceparents.append(seen)
        return super().Unary(request, context)


@dataclass
class TracedMesh:
    collector: Collector
    app: RecordingEcho
    sickness: Sickness
    web: procs.Proc
    echo: procs.Proc
    channel: grpc.Channel
    stub: echo_pb2_grpc.EchoStub
    servers: list[grpc.Server] = field(default_factory=list)

    def call(self, traceparent: str | None = None) -> None:
        metadata = [("traceparent", traceparent)] if traceparent else None
        resp = self.stub.Unary(echo_pb2.EchoRequest(payload=b"traced"), timeout=10,
                               metadata=metadata)
        assert resp.server_id == "echo-traced"


@pytest.fixture(scope="module")
def mesh(pki: CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TracedMesh]:
    tmp = tmp_path_factory.mktemp("tracing")
    collector = Collector()
    otlp = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp"),
                       options=[("grpc.so_reuseport", 0)])
    otlp_grpc.add_TraceServiceServicer_to_server(collector, otlp)
    plain_port = otlp.add_insecure_port("127.0.0.1:0")
    tls = pki.issue_workload("collector")
    creds = grpc.ssl_server_credentials([(tls.key.read_bytes(), tls.cert.read_bytes())],
                                        root_certificates=tls.ca.read_bytes(),
                                        require_client_auth=True)
    tls_port = otlp.add_secure_port("127.0.0.1:0", creds)
    otlp.start()
    sickness = Sickness("echo-traced")
    app = RecordingEcho(sickness)
    app_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="app"),
                             options=[("grpc.so_reuseport", 0)])
    echo_pb2_grpc.add_EchoServicer_to_server(app, app_server)
    app_port = app_server.add_insecure_port("127.0.0.1:0")
    app_server.start()
    flags = ("--trace-sample-rate", "1.0", "--trace-export-delay-ms", str(EXPORT_DELAY_MS))
    started: list[procs.Proc] = []
    channel: grpc.Channel | None = None
    try:
        echo = start_sidecar(tmp, service="echo", tls=pki.issue_workload("echo"),
                             app_port=app_port,
                             extra_args=(*flags, "--otlp-endpoint",
                                         f"http://127.0.0.1:{plain_port}"))
        started.append(echo)
        host, port = inbound_addr(echo)
        web = start_sidecar(tmp, service="web", tls=pki.issue_workload("web"),
                            clusters={"echo": [(f"{host}:{port}", spiffe_id("echo"))]},
                            extra_args=(*flags, "--otlp-endpoint", f"127.0.0.1:{tls_port}"))
        started.append(web)
        channel = grpc.insecure_channel(web.ready["outbound"],
                                        options=[("grpc.default_authority", "echo")])
        yield TracedMesh(collector, app, sickness, web, echo, channel,
                         echo_pb2_grpc.EchoStub(channel), [otlp, app_server])
    finally:
        if channel is not None:
            channel.close()
        codes = [proc.stop(timeout_s=5) for proc in started]
        app_server.stop(0)
        otlp.stop(0)
    # SIGTERM: the exporters flush and stop within the drain, and the sidecars exit 0.
    assert codes == [0, 0], [p.log_tail() for p in started]


def new_traceparent(sampled: bool = True) -> tuple[str, str, str]:
    """A traceparent of a new trace: (value, trace id, parent span id)."""
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent}-{'01' if sampled else '00'}", trace_id, parent


def client_and_server(spans: list[Received]) -> tuple[Received, Received]:
    (client,) = [s for s in spans if s.span.kind == CLIENT]
    (server,) = [s for s in spans if s.span.kind == SERVER]
    return client, server


# ---------------------------------------------------------------------- the tests
def test_a_call_makes_a_client_span_and_a_server_span_of_one_trace(mesh: TracedMesh) -> None:
    mesh.call()
    seen = mesh.app.traceparents[-1]
    assert seen is not None, "the app got no traceparent"
    trace_id = seen.split("-")[1]
    client, server = client_and_server(mesh.collector.trace(trace_id, 2))
    # The outbound side's span is the root; the inbound side's is its child; the app's
    # traceparent names the inbound span as the parent of whatever the app does next.
    assert client.parent_id == "" and server.parent_id == client.span_id
    assert seen == f"00-{trace_id}-{server.span_id}-01"
    assert (client.service, server.service) == ("web", "echo")
    assert client.span.name == server.span.name == UNARY
    # The web sidecar exported over mTLS with its workload certificate, echo in plaintext.
    assert (client.peer, server.peer) == (spiffe_id("web"), "")
    ca, sa = client.attrs(), server.attrs()
    for a, direction in ((ca, "outbound"), (sa, "inbound")):
        assert a["rpc.system"] == "grpc" and a["rpc.method"] == "Unary"
        assert a["rpc.service"] == "meshtest.Echo" and a["rpc.grpc.status_code"] == 0
        assert a["mesh.direction"] == direction and a["mesh.attempts"] == 1
        assert (a["mesh.source"], a["mesh.destination"]) == ("web", "echo")
    assert ca["mesh.endpoint"] == "{}:{}".format(*inbound_addr(mesh.echo))
    assert [name for name, _ in client.events()] == ["endpoint"]
    assert client.span.start_time_unix_nano <= server.span.start_time_unix_nano
    assert server.span.end_time_unix_nano <= client.span.end_time_unix_nano
    assert client.span.status.code != ERROR and server.span.status.code != ERROR


def test_a_callers_sampled_traceparent_is_continued(mesh: TracedMesh) -> None:
    value, trace_id, parent = new_traceparent()
    mesh.call(value)
    client, server = client_and_server(mesh.collector.trace(trace_id, 2))
    assert client.parent_id == parent and server.parent_id == client.span_id
    assert mesh.app.traceparents[-1] == f"00-{trace_id}-{server.span_id}-01"


def test_an_unsampled_traceparent_makes_no_span_anywhere(mesh: TracedMesh) -> None:
    value, trace_id, _ = new_traceparent(sampled=False)
    mesh.call(value)
    assert mesh.app.traceparents[-1] == value  # forwarded as it came, through both sidecars
    # A sampled call after it: once its spans are in, the unsampled one's would be too.
    after, after_id, _ = new_traceparent()
    mesh.call(after)
    mesh.collector.trace(after_id, 2)
    assert mesh.collector.spans(trace_id) == []


def test_a_retried_call_carries_the_retry_and_a_server_span_per_attempt(mesh: TracedMesh) -> None:
    mesh.sickness.set(0.5)  # from now on every second call fails UNAVAILABLE, trailers-only
    try:
        mesh.call()  # the 1st passes ...
        value, trace_id, _ = new_traceparent()
        mesh.call(value)  # ... the 2nd fails and its retry (the 3rd) passes
    finally:
        mesh.sickness.set(0.0)
    spans = mesh.collector.trace(trace_id, 3)
    (client,) = [s for s in spans if s.span.kind == CLIENT]
    servers = sorted((s for s in spans if s.span.kind == SERVER),
                     key=lambda s: s.span.start_time_unix_nano)
    assert len(servers) == 2 and {s.parent_id for s in servers} == {client.span_id}
    assert [s.attrs()["rpc.grpc.status_code"] for s in servers] == [14, 0]
    assert servers[0].span.status.code == ERROR
    events = client.events()
    assert [name for name, _ in events] == ["endpoint", "endpoint", "retry"]
    retry = events[2][1]
    assert retry["mesh.retry"] == 1 and retry["mesh.retry.reason"] == "UNAVAILABLE"
    assert retry["message"].startswith("retry 1 of 2 after UNAVAILABLE")
    assert client.attrs()["mesh.attempts"] == 2 and client.attrs()["rpc.grpc.status_code"] == 0


# ---------------------------------------------------------------------- dynamic sidecars
def test_dynamic_sidecars_export_to_the_control_planes_receiver_by_default(
        tmp_path: Path) -> None:
    from protos.mesh.v1 import control_pb2 as pb
    from tests.integration.test_discovery import Mesh
    from tests.integration.test_dynamic_sidecar import admin_get

    m = Mesh(tmp_path)
    try:
        m.start("echo", "echo-1")  # the default rate: the caller's traceparent decides
        web = m.start("web", "web-1", app=False,
                      extra=("--trace-sample-rate", "1.0", "--trace-export-delay-ms", "50"))
        procs.wait_for(lambda: m.all_synced({"echo-1", "web-1"}), 20, what="both SYNCED")
        def traced_call() -> tuple[str, str]:
            value, trace_id, parent = new_traceparent()
            with grpc.insecure_channel(web.ready["outbound"],
                                       options=[("grpc.default_authority", "echo")]) as ch:
                procs.wait_for(lambda: echo_pb2_grpc.EchoStub(ch).Unary(
                    echo_pb2.EchoRequest(payload=b"x"), timeout=5,
                    metadata=[("traceparent", value)]), 10, what="a call through the mesh")
            return trace_id, parent

        def kept(trace_id: str) -> Any:
            got = m.admin().GetTrace(pb.GetTraceRequest(trace_id=trace_id), timeout=5)
            return len(got.spans) >= 2 and got
        trace_id, parent = traced_call()
        got = procs.wait_for(lambda: kept(trace_id), 15, interval_s=0.2,
                             what=f"trace {trace_id} in the store")
        by_kind = {s.kind: s for s in got.spans}
        client, server = by_kind["CLIENT"], by_kind["SERVER"]
        assert (client.service, server.service) == ("web", "echo")
        assert client.parent_span_id == parent and server.parent_span_id == client.span_id
        assert "endpoint" in [e.name for e in client.events]
        assert admin_get(web, "/stats")[1]["tracing"]["exporters_made"] == 1

        # A renewed certificate: the next batch goes out with it, over a new exporter.
        def renewed() -> bool:
            return admin_get(web, "/stats")[1]["identity"]["renewals"] >= 1
        m.admin().RenewCertificates(pb.RenewCertificatesRequest(service="web"), timeout=5)
        procs.wait_for(renewed, 15, interval_s=0.2, what="web's certificate renewed")
        trace_id, _ = traced_call()
        procs.wait_for(lambda: kept(trace_id), 15, interval_s=0.2,
                       what=f"trace {trace_id} in the store after the renewal")
        tracing = admin_get(web, "/stats")[1]["tracing"]
        assert tracing["exporters_made"] == 2 and tracing["spans_dropped"] == 0
    finally:
        m.close()
