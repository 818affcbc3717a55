"""The echo server test double, exercised directly (no sidecar) over h2c."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.meshtest import echo_pb2, echo_pb2_grpc
from tests.support.echo_server import FAIL_DETAIL, FAIL_DETAIL_BIN

METADATA = (("x-request-tag", "abc"), ("x-blob-bin", b"\x00\xffbin"), ("other", "not-echoed"))


@pytest.fixture
def stub(echo_server, grpc_channel):
    srv = echo_server("echo-a")
    return echo_pb2_grpc.EchoStub(grpc_channel(srv.address))


def test_ready_line_reports_the_bound_port_and_health_is_serving(echo_server, grpc_channel):
    srv = echo_server("echo-h")
    assert srv.port > 0 and srv.proc.ready == {"port": srv.port}
    health = health_pb2_grpc.HealthStub(grpc_channel(srv.address))
    for service in ("", "meshtest.Echo"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_unary_echoes_payload_server_id_and_peer(stub):
    resp = stub.Unary(echo_pb2.EchoRequest(payload=b"hello"), timeout=5)
    assert resp.payload == b"hello"
    assert resp.server_id == "echo-a"
    assert resp.peer.startswith("ipv4:127.0.0.1:")


def test_unary_response_bytes_overrides_payload(stub):
    resp = stub.Unary(echo_pb2.EchoRequest(payload=b"x", response_bytes=100_000), timeout=5)
    assert len(resp.payload) == 100_000


def test_unary_echoes_x_metadata_in_headers_and_trailers(stub):
    resp, call = stub.Unary.with_call(echo_pb2.EchoRequest(payload=b"m"), metadata=METADATA, timeout=5)
    assert resp.payload == b"m"
    initial = dict(call.initial_metadata())
    trailing = dict(call.trailing_metadata())
    for md in (initial, trailing):
        assert md["x-echo-request-tag"] == "abc"
        assert md["x-echo-blob-bin"] == b"\x00\xffbin"
        assert "x-echo-other" not in md and "other" not in md
    assert trailing["x-trailer"] == "done"


def test_server_stream_sends_count_responses(stub):
    call = stub.ServerStream(echo_pb2.EchoRequest(payload=b"s", count=5), metadata=METADATA, timeout=5)
    responses = list(call)
    assert [r.payload for r in responses] == [b"s"] * 5
    assert all(r.server_id == "echo-a" for r in responses)
    assert dict(call.initial_metadata())["x-echo-request-tag"] == "abc"
    assert dict(call.trailing_metadata())["x-trailer"] == "done"


def test_client_stream_concatenates_payloads(stub):
    reqs = [echo_pb2.EchoRequest(payload=bytes([i]) * 1000) for i in range(10)]
    resp, call = stub.ClientStream.with_call(iter(reqs), timeout=5)
    assert resp.payload == b"".join(r.payload for r in reqs)
    assert dict(call.trailing_metadata())["x-total-bytes"] == "10000"


def test_bidi_answers_each_request_as_it_arrives(stub):
    import queue

    outbox: queue.Queue = queue.Queue()

    def requests():
        while (item := outbox.get()) is not None:
            yield item

    call = stub.Bidi(requests(), metadata=METADATA, timeout=10)
    for i in range(3):
        outbox.put(echo_pb2.EchoRequest(payload=f"msg-{i}".encode(), sleep_ms=10))
        assert next(call).payload == f"msg-{i}".encode()  # answered before the next is sent
    outbox.put(None)
    assert list(call) == []
    assert call.code() == grpc.StatusCode.OK
    assert dict(call.initial_metadata())["x-echo-blob-bin"] == b"\x00\xffbin"


def test_fail_code_aborts_with_message_and_detail_trailers(stub):
    with pytest.raises(grpc.RpcError) as ei:
        stub.Unary(
            echo_pb2.EchoRequest(fail_code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], fail_message="no more"),
            metadata=METADATA,
            timeout=5,
        )
    err = ei.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details() == "no more"
    trailing = dict(err.trailing_metadata())
    assert trailing["x-fail-detail-bin"] == FAIL_DETAIL_BIN
    assert trailing["x-fail-detail"] == FAIL_DETAIL
    assert trailing["x-trailer"] == "done"
    # headers were sent before the failure, so this was not a trailers-only response
    assert dict(err.initial_metadata())["x-echo-request-tag"] == "abc"


def test_trailers_only_failure_has_no_initial_metadata(stub):
    with pytest.raises(grpc.RpcError) as ei:
        stub.Unary(
            echo_pb2.EchoRequest(trailers_only=True, fail_code=grpc.StatusCode.UNAVAILABLE.value[0], fail_message="gone"),
            metadata=METADATA,
            timeout=5,
        )
    err = ei.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE and err.details() == "gone"
    assert "x-echo-request-tag" not in dict(err.initial_metadata())
    trailing = dict(err.trailing_metadata())
    assert trailing["x-echo-request-tag"] == "abc"
    assert trailing["x-fail-detail-bin"] == FAIL_DETAIL_BIN


def test_server_stream_fails_after_count_messages(stub):
    call = stub.ServerStream(
        echo_pb2.EchoRequest(payload=b"p", count=2, fail_code=grpc.StatusCode.ABORTED.value[0], fail_message="mid"),
        timeout=5,
    )
    got = []
    with pytest.raises(grpc.RpcError) as ei:
        for r in call:
            got.append(r.payload)
    assert got == [b"p", b"p"]
    assert ei.value.code() == grpc.StatusCode.ABORTED


def test_sigterm_exits_zero(echo_server):
    srv = echo_server("echo-term")
    assert srv.stop(timeout_s=10) == 0
