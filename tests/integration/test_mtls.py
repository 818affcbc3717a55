"""Mutual TLS between sidecars: a peer without a certificate from the mesh's CA (or with one
for another trust domain) is never served, and the outbound side refuses an upstream whose
SPIFFE ID is not the one the endpoint expects.

With TLS 1.3 the server's refusal of a client certificate can arrive after the client's side
of the handshake has completed, so "the handshake succeeded" proves nothing either way: what
is asserted is that no HTTP/2 HEADERS frame ever comes back and the app never sees a call.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from protos.meshtest import echo_pb2, echo_pb2_grpc
from tests.support import h2probe
from tests.support.pki import CA, make_ca, spiffe_id
from tests.support.procs import wait_for
from tests.support.sidecar import inbound_addr, outbound_addr

MESSAGE = echo_pb2.EchoRequest(payload=b"raw-h2").SerializeToString()


@pytest.fixture
def echo_mesh(pki: CA, echo_server, sidecar):
    """An echo server behind its sidecar: (echo_server, echo_sidecar)."""
    srv = echo_server("echo-mtls")
    es = sidecar(service="echo", tls=pki.issue_workload("echo"), app_port=srv.port)
    return srv, es


def assert_never_served(es, attempt: h2probe.Attempt) -> None:
    assert not attempt.headers_frames, f"a response came back: {attempt.describe()}"
    inbound = h2probe.stats(es)["inbound"]
    assert inbound["counters"].get("calls_total", 0) == 0, inbound
    assert inbound["calls"]["by_status"] == {}, inbound
    assert inbound["upstream_connections"] == 0, f"the local app was dialed: {inbound}"


def test_valid_mesh_client_gets_a_response(pki: CA, echo_mesh):
    """Control for the refusals below: the same raw client with a good certificate is served."""
    _, es = echo_mesh
    ctx = h2probe.client_context(pki.ca_path, pki.issue_workload("client"))
    attempt = h2probe.grpc_attempt(inbound_addr(es), ctx, message=MESSAGE)
    assert attempt.alpn == "h2"
    assert attempt.headers_frames, attempt.describe()
    assert attempt.read_end == "response complete", attempt.describe()
    assert h2probe.stats(es)["inbound"]["counters"]["calls_total"] == 1


def _bad_client_cert(kind: str, pki: CA, tmp_path: Path):
    if kind == "no_client_cert":
        return None
    if kind == "other_ca":
        return make_ca(tmp_path / "other-ca", name="other-ca").issue_workload("client")
    if kind == "expired":
        return pki.issue_expired("client")
    if kind == "foreign_trust_domain":
        return pki.issue_workload("client", trust_domain="evil.example")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no_client_cert", "other_ca", "expired", "foreign_trust_domain"])
def test_inbound_never_serves_a_peer_without_a_mesh_identity(
    kind: str, pki: CA, echo_mesh, tmp_path: Path
):
    _, es = echo_mesh
    ctx = h2probe.client_context(pki.ca_path, _bad_client_cert(kind, pki, tmp_path))
    attempt = h2probe.grpc_attempt(inbound_addr(es), ctx, message=MESSAGE, read_timeout_s=3)
    assert_never_served(es, attempt)
    assert es.alive()
    if kind != "foreign_trust_domain":  # refused in the handshake itself: counted as such
        wait_for(lambda: h2probe.stats(es)["tls"]["handshake_failures"], timeout_s=5,
                 what="the refused handshake counted in /stats tls.handshake_failures")
    else:  # a valid chain from a foreign trust domain: refused after the handshake
        assert h2probe.stats(es)["inbound"]["refused_connections"] == {"foreign_trust_domain": 1}
    # ... and it keeps serving everyone else.
    good = h2probe.client_context(pki.ca_path, pki.issue_workload("client"))
    ok = h2probe.grpc_attempt(inbound_addr(es), good, message=MESSAGE)
    assert ok.headers_frames and ok.read_end == "response complete", ok.describe()


def test_plaintext_h2c_on_the_inbound_tls_port_is_never_served(echo_mesh):
    _, es = echo_mesh
    attempt = h2probe.grpc_attempt(inbound_addr(es), None, message=MESSAGE, read_timeout_s=3)
    assert not attempt.frames or attempt.not_http2, attempt.describe()
    assert_never_served(es, attempt)
    assert es.alive()


def test_outbound_refuses_an_upstream_presenting_another_spiffe_id(
    pki: CA, echo_mesh, sidecar, grpc_channel
):
    _, es = echo_mesh
    host, port = inbound_addr(es)
    expected = spiffe_id("other")
    cs = sidecar(
        service="client",
        tls=pki.issue_workload("client"),
        clusters={
            "echo": [(f"{host}:{port}", expected)],
            "echo-right": [(f"{host}:{port}", spiffe_id("echo"))],
        },
    )
    out_host, out_port = outbound_addr(cs)

    def stub(authority: str) -> echo_pb2_grpc.EchoStub:
        ch = grpc_channel(f"{out_host}:{out_port}", options=[("grpc.default_authority", authority)])
        return echo_pb2_grpc.EchoStub(ch)

    with pytest.raises(grpc.RpcError) as err:
        stub("echo").Unary(echo_pb2.EchoRequest(payload=b"x"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    details = err.value.details() or ""
    assert spiffe_id("echo") in details and expected in details, details
    inbound = h2probe.stats(es)["inbound"]
    assert inbound["counters"].get("calls_total", 0) == 0, inbound
    assert inbound["upstream_connections"] == 0, inbound

    # Control: the same address with the right expected identity is served.
    resp = stub("echo-right").Unary(echo_pb2.EchoRequest(payload=b"y"), timeout=10)
    assert resp.payload == b"y" and resp.server_id == "echo-mtls"
