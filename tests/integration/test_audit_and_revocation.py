"""The audit log, the admin-only API, certificate revocation and expiry, with real processes:
control planes, dynamic and standalone sidecars, echo servers and meshctl, on loopback.

* the audit records an apply with its author, token and revocation actions, and the refusal
  of a workload that tries to administer (every Admin RPC, new ones included, is refused to
  it); ``meshctl audit`` prints it as a table and as JSON;
* revocation: a revoked certificate is never renewed nor lets its instance join again; a
  revoked instance leaves the endpoints, its next new connection to a peer is refused (the
  peer counts ``mesh_connections_refused_total{reason="revoked"}``), and an endpoint
  presenting a revoked certificate is refused by its callers;
* expiry: a workload whose certificate expired is refused by its peers at the handshake,
  with the reason in their logs and ``/metrics``; ``meshctl certs`` and ``meshctl status``
  mark certificates near or past expiry and warn on stderr.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from google.protobuf import message_factory
from prometheus_client.parser import text_string_to_metric_families

from control_plane.meshctl_security import audit_doc
from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc
from protos.meshtest import echo_pb2, echo_pb2_grpc
from tests.integration.test_control_plane import (
    ControlPlaneProc,
    Workload,
    admin_channel,
    create_token,
    join,
    meshctl,
    mtls_channel,
    rpc_error,
    start_cp,
)
from tests.integration.test_discovery import Mesh, stub
from tests.support import procs
from tests.support.pki import CA, spiffe_id
from tests.support.sidecar import admin_addr, inbound_addr, outbound_addr

pytestmark = pytest.mark.timeout(120)

TD = "mesh.local"
ADMIN = f"spiffe://{TD}/admin/meshctl"
CALL = echo_pb2.EchoRequest(payload=b"x")


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProc]:
    base = tmp_path_factory.mktemp("audit-cp")
    c = start_cp(base / "ca", base / "data")
    yield c
    assert c.proc.stop() == 0, c.proc.log_tail()


def audit(cp: ControlPlaneProc, action: str = "", limit: int = 100) -> list[dict[str, Any]]:
    """The audit log as ``meshctl audit -o json`` prints it, asked in-process (quicker than a
    meshctl process on a busy machine; one test checks meshctl's own output)."""
    with admin_channel(cp) as ch:
        resp = pb_grpc.AdminStub(ch).ListAudit(pb.ListAuditRequest(limit=limit, action=action),
                                               timeout=10)
    return audit_doc(resp)


def scrape(admin: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict[str, Any], family: str, **labels: str) -> float:
    """The summed value of ``family``'s ``_total`` samples that carry ``labels``."""
    if family not in fams:
        return 0.0
    return sum(s.value for s in fams[family].samples
               if s.name == f"{family}_total" and labels.items() <= s.labels.items())


def serial_of(pem: bytes | str) -> str:
    data = pem.encode() if isinstance(pem, str) else pem
    return format(x509.load_pem_x509_certificate(data).serial_number, "x")


# ---------------------------------------------------------------------- the audit log
def test_the_audit_records_an_apply_with_its_author_and_tokens(cp: ControlPlaneProc,
                                                              tmp_path: Path) -> None:
    started = time.time()
    policy = tmp_path / "policy.yaml"
    policy.write_text("kind: TrafficPolicy\nname: audited\nspec:\n  service: audited\n"
                      "  load_balancer: round_robin\n")
    r = meshctl(cp, "apply", "-f", str(policy))  # as an operator would
    assert r.returncode == 0, r.stderr
    # The other actions in-process (a meshctl process each is slow on a busy machine).
    with admin_channel(cp) as ch:
        admin = pb_grpc.AdminStub(ch)
        dry = pb.ConfigDocument(source="policy.yaml", index=1, json=json.dumps(
            {"kind": "TrafficPolicy", "name": "audited",
             "spec": {"service": "audited", "load_balancer": "least_request"}}))
        admin.ApplyConfig(pb.ApplyConfigRequest(documents=[dry], dry_run=True), timeout=10)
        made = admin.CreateToken(pb.CreateTokenRequest(service="audited"), timeout=10)
        admin.DeleteToken(pb.DeleteTokenRequest(token_id=made.token_id), timeout=10)
        err = rpc_error(lambda: admin.DeleteConfig(pb.DeleteConfigRequest(
            kind="TrafficPolicy", name="never-applied"), timeout=10))
        assert err.code() == grpc.StatusCode.NOT_FOUND
    ids = [made.token_id]

    entries = audit(cp)
    assert entries and set(entries[0]) == {"time", "identity", "action", "object", "result"}
    applies = [e for e in entries if e["action"] == "apply"]
    assert len(applies) == 1, applies  # the dry run is not there
    assert applies[0]["identity"] == ADMIN
    assert applies[0]["object"] == "TrafficPolicy/audited"
    assert applies[0]["result"] == "ok"
    when = time.mktime(time.strptime(applies[0]["time"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert started - 2 <= when <= time.time() + 2, applies[0]
    created = [e for e in entries if e["action"] == "token.create"]
    assert created and created[0]["object"] == f"token {ids[0]} for audited", created
    assert created[0]["identity"] == ADMIN and created[0]["result"] == "ok"
    assert "mesh1." not in json.dumps(entries), "a token string reached the audit log"
    deleted = [e for e in entries if e["action"] == "token.delete"]
    assert deleted and deleted[0]["object"] == f"token {ids[0]}", deleted
    # newest first
    order = [e["action"] for e in entries]
    assert order.index("delete") < order.index("token.delete") < order.index("token.create") \
        < order.index("apply")

    # An error is recorded with its result, and filters and limits work.
    js = meshctl(cp, "audit", "-o", "json", "--action", "delete", "--limit", "1")
    assert js.returncode == 0, js.stderr
    only = json.loads(js.stdout)
    assert len(only) == 1 and only[0]["object"].lower() == "trafficpolicy/never-applied"
    assert only[0]["result"].startswith("error: NOT_FOUND"), only
    assert only[0]["identity"] == ADMIN

    table = meshctl(cp, "audit", "--limit", "5")
    assert table.returncode == 0, table.stderr
    for column in ("TIME", "IDENTITY", "ACTION", "OBJECT", "RESULT"):
        assert column in table.stdout
    assert ADMIN in table.stdout and "never-applied" in table.stdout


def _call_every_admin_rpc(ch: grpc.Channel) -> dict[str, grpc.RpcError | None]:
    """Call each method of mesh.v1.Admin with an empty request; its error (None if none)."""
    out: dict[str, grpc.RpcError | None] = {}
    service = pb.DESCRIPTOR.services_by_name["Admin"]
    for m in service.methods:
        request = message_factory.GetMessageClass(m.input_type)()
        response = message_factory.GetMessageClass(m.output_type)
        path = f"/{service.full_name}/{m.name}"
        try:
            if m.server_streaming:
                call = ch.unary_stream(path, request_serializer=type(request).SerializeToString,
                                       response_deserializer=response.FromString)
                list(call(request, timeout=10))
            else:
                call = ch.unary_unary(path, request_serializer=type(request).SerializeToString,
                                      response_deserializer=response.FromString)
                call(request, timeout=10)
            out[m.name] = None
        except grpc.RpcError as exc:
            out[m.name] = exc
    return out


def test_a_workload_may_call_no_admin_rpc_and_its_refusal_is_audited(
        cp: ControlPlaneProc) -> None:
    wl = Workload()
    join(create_token(cp, "intruder"), wl, csr_service="intruder", instance="intruder-1")
    who = spiffe_id("intruder")
    with mtls_channel(cp, wl) as ch:
        err = rpc_error(lambda: pb_grpc.AdminStub(ch).ApplyConfig(pb.ApplyConfigRequest(
            documents=[pb.ConfigDocument(source="evil.yaml", index=1, json=json.dumps(
                {"kind": "TrafficPolicy", "name": "evil",
                 "spec": {"service": "evil", "load_balancer": "round_robin"}}))]), timeout=10))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert who in err.details(), err.details()
        results = _call_every_admin_rpc(ch)
    for name in ("ListAudit", "RevokeCertificate", "CheckAuthz", "SetAuthzDefault",
                 "RotateCA", "GetCAStatus", "Tap"):
        assert name in results, name
    allowed = {n: e for n, e in results.items()
               if e is None or e.code() != grpc.StatusCode.PERMISSION_DENIED}
    assert not allowed, {n: (e.code(), e.details()) if e else "served" for n, e in
                         allowed.items()}

    refused = [e for e in audit(cp, "apply") if e["identity"] == who
               and e["object"] == "TrafficPolicy/evil"]
    assert refused, "the refused apply is not in the audit log"
    assert refused[0]["result"].startswith("error: PERMISSION_DENIED"), refused[0]
    assert who in refused[0]["result"]
    others = {e["action"] for e in audit(cp, limit=200) if e["identity"] == who}
    assert {"token.create", "certs.revoke", "Admin.ListAudit"} <= others, others


# ---------------------------------------------------------------------- revocation (RPCs)
def test_a_revoked_certificate_is_never_renewed_and_its_instance_cannot_join_again(
        cp: ControlPlaneProc) -> None:
    token = create_token(cp, "rev")
    wl = Workload()
    join(token, wl, csr_service="rev", instance="rev-1")
    serial = serial_of(wl.cert_pem)
    bystander = Workload()
    join(token, bystander, csr_service="rev", instance="rev-2")

    r = meshctl(cp, "certs", "revoke", serial.upper())  # case does not matter
    assert r.returncode == 0, r.stderr
    assert f"revoked certificate serial {serial}" in r.stdout, r.stdout
    again = meshctl(cp, "certs", "revoke", serial)
    assert again.returncode == 1 and "already revoked" in again.stderr, again.stderr
    unknown = meshctl(cp, "certs", "revoke", "abcdef0123")
    assert unknown.returncode == 1 and "issued no certificate" in unknown.stderr
    both = meshctl(cp, "certs", "revoke", serial, "--instance", "rev-1")
    assert both.returncode == 2, both.stderr

    with mtls_channel(cp, wl) as ch:
        err = rpc_error(lambda: pb_grpc.IdentityStub(ch).Renew(
            pb.RenewRequest(csr=wl.csr("rev"), instance_id="rev-1"), timeout=10))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "revoked" in err.details() and serial in err.details(), err.details()
        # ... nor may it open a discovery stream
        err = rpc_error(lambda: next(iter(pb_grpc.DiscoveryStub(ch).Stream(
            iter([pb.SidecarMessage(register=pb.Register(instance_id="rev-1"))]),
            timeout=10))))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = rpc_error(lambda: join(token, Workload(), csr_service="rev", instance="rev-1"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in err.details()
    join(token, Workload(), csr_service="rev", instance="rev-3")  # another id may join

    with mtls_channel(cp, bystander) as ch:  # the other instance renews as before
        resp = pb_grpc.IdentityStub(ch).Renew(
            pb.RenewRequest(csr=bystander.csr("rev"), instance_id="rev-2"), timeout=10)
        assert resp.spiffe_id == spiffe_id("rev")

    entries = audit(cp, limit=50)
    revokes = [e for e in entries if e["action"] == "certs.revoke" and e["identity"] == ADMIN]
    assert revokes[-1]["object"] == f"serial {serial}" and revokes[-1]["result"] == "ok"
    assert any(e["result"].startswith("error: ALREADY_EXISTS") for e in revokes)
    renewals = [e for e in entries if e["action"] == "certs.renew"
                and e["identity"] == spiffe_id("rev")]
    assert renewals and renewals[0]["result"].startswith("error: PERMISSION_DENIED")


def test_revoking_an_instance_revokes_its_unexpired_certificates(cp: ControlPlaneProc) -> None:
    token = create_token(cp, "multi")
    wl = Workload()
    join(token, wl, csr_service="multi", instance="multi-1")
    first = serial_of(wl.cert_pem)
    with mtls_channel(cp, wl) as ch:
        renewed = pb_grpc.IdentityStub(ch).Renew(
            pb.RenewRequest(csr=wl.csr("multi"), instance_id="multi-1"), timeout=10)
    second = serial_of(renewed.certificate_pem)
    r = meshctl(cp, "certs", "revoke", "--instance", "multi/multi-1")
    assert r.returncode == 0, r.stderr
    assert "instance multi/multi-1" in r.stdout
    assert first in r.stdout and second in r.stdout, r.stdout
    none = meshctl(cp, "certs", "revoke", "--instance", "nobody-1")
    assert none.returncode == 1 and "no unexpired certificate" in none.stderr


# ---------------------------------------------------------------------- revocation (mesh)
@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("revocation-mesh"))
    try:
        m.start("echo", "echo-1")
        m.start("web", "web-1")
        m.start("web", "web-2")  # a bystander: its calls must go on through a revocation
        procs.wait_for(lambda: m.all_synced({"echo-1", "web-1", "web-2"}), 30,
                       what="the sidecars registered and SYNCED")
        yield m
    finally:
        m.close()


def _current_serial(m: Mesh, service: str, instance: str) -> str:
    r = meshctl(m.cp, "certs", "-o", "json")
    assert r.returncode == 0, r.stderr
    rows = [c for c in json.loads(r.stdout)  # issue order: the last one is current
            if c["service"] == service and c["instance"] == instance]
    assert rows, r.stdout
    return rows[-1]["serial"]


def _calls_ok(m: Mesh, service: str, caller: str) -> bool:
    ch, st = stub(m, service, caller)
    with ch:
        return st.Unary(CALL, timeout=5).server_id != ""


def _call_error(m: Mesh, service: str, caller: str) -> grpc.RpcError | None:
    ch, st = stub(m, service, caller)
    with ch:
        try:
            st.Unary(CALL, timeout=5)
        except grpc.RpcError as exc:
            return exc
    return None


def test_callers_refuse_an_endpoint_presenting_a_revoked_certificate(mesh: Mesh) -> None:
    m = mesh
    assert _calls_ok(m, "echo", "web-1")  # a pooled connection to echo-1 is open now
    serial = _current_serial(m, "echo", "echo-1")
    doc = m.held("web-1")["snapshot"]
    doc["revoked"] = [serial]  # echo-1 stays an endpoint: only its certificate is denied
    m.admin().TestPushRawSnapshot(pb.TestPushRawSnapshotRequest(
        instance="web-1", json=json.dumps(doc)), timeout=10)
    procs.wait_for(lambda: m.held("web-1")["snapshot"].get("revoked") == [serial], 10,
                   what="web-1 holding the deny-list")
    err = procs.wait_for(lambda: _call_error(m, "echo", "web-1"), 10,
                         what="web-1's call to echo-1 refused")
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert "revoked" in (err.details() or "") and serial in (err.details() or ""), err.details()
    fams = scrape(m.sidecars["web-1"].ready["admin"])
    assert sample(fams, "mesh_connections_refused", listener="upstream", reason="revoked") >= 1
    assert "revoked" in m.sidecars["web-1"].log_text()
    # The real snapshot again: calls flow.
    doc.pop("revoked")
    m.admin().TestPushRawSnapshot(pb.TestPushRawSnapshotRequest(
        instance="web-1", json=json.dumps(doc)), timeout=10)
    procs.wait_for(lambda: _calls_ok(m, "echo", "web-1"), 10, what="calls flowing again")


class _Bystander:
    """Calls ``service`` from ``caller`` on one channel (opened, and one call made, before
    the attack) in a thread, at most ``rate`` per second, until stopped or ``max_s`` passed;
    keeps every call's status."""

    def __init__(self, m: Mesh, service: str, caller: str, rate: float = 20,
                 max_s: float = 60) -> None:
        self.ch, self.stub = stub(m, service, caller)
        assert self.stub.Unary(CALL, timeout=5).server_id
        self.codes: list[grpc.StatusCode] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(rate, max_s), daemon=True)
        self.thread.start()

    def _run(self, rate: float, max_s: float) -> None:
        deadline = time.monotonic() + max_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                self.stub.Unary(CALL, timeout=5)
                self.codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                self.codes.append(exc.code())
            self.stop.wait(1 / rate)

    def finish(self) -> list[grpc.StatusCode]:
        self.stop.set()
        self.thread.join(10)
        self.ch.close()
        return self.codes


def test_a_revoked_instance_can_open_no_new_connection(mesh: Mesh) -> None:
    m = mesh
    assert _calls_ok(m, "echo", "web-1") and _calls_ok(m, "web", "echo-1")
    bystander = _Bystander(m, "echo", "web-2")
    serial = _current_serial(m, "web", "web-1")
    r = meshctl(m.cp, "certs", "revoke", "--instance", "web-1")
    assert r.returncode == 0, r.stderr
    assert serial in r.stdout, r.stdout

    # Every peer holds the deny-list, and web-1 has left the endpoints.
    procs.wait_for(lambda: serial in m.held("echo-1")["snapshot"].get("revoked", []), 10,
                   what="echo-1 holding web-1's serial in its deny-list")
    assert "web-1" not in m.endpoints("echo-1", "web")
    # web-1's next connection to echo-1 is refused (its open one got GOAWAY).
    err = procs.wait_for(lambda: _call_error(m, "echo", "web-1"), 10,
                         what="web-1's calls to echo refused")
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    echo_admin = m.sidecars["echo-1"].ready["admin"]
    procs.wait_for(lambda: sample(scrape(echo_admin), "mesh_connections_refused",
                                  listener="inbound", reason="revoked") >= 1, 10,
                   what="echo-1 counting the refused connection")
    log = m.sidecars["echo-1"].log_text()
    assert f"certificate serial {serial}" in log and "revoked" in log
    # ... and it cannot go on: no discovery stream, no renewal.
    procs.wait_for(lambda: not m.status()["web-1"].connected, 10,
                   what="web-1's discovery stream closed")
    _, stats = _admin_json(m.sidecars["web-1"].ready["admin"], "/stats")
    assert "revoked" in json.dumps(stats), stats
    entries = audit(m.cp, "certs.revoke")
    assert entries[0]["identity"] == ADMIN and entries[0]["result"] == "ok"
    assert entries[0]["object"] == f"instance web-1: serial {serial}"
    # The other instance of web lost nothing meanwhile: at least 10 calls across the
    # revocation (the steps above can take well under the half second 10 calls need).
    procs.wait_for(lambda: len(bystander.codes) >= 10, 10, what="10 calls by the bystander")
    codes = bystander.finish()
    assert len(codes) >= 10 and set(codes) == {grpc.StatusCode.OK}, codes


def _admin_json(admin: str, path: str) -> tuple[int, Any]:
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=5) as resp:
        return resp.status, json.load(resp)


# ---------------------------------------------------------------------- expiry
def test_an_expired_certificate_is_refused_at_the_handshake_with_the_reason(
        pki: CA, echo_server, sidecar, grpc_channel) -> None:
    srv = echo_server("echo-expiry")
    es = sidecar(service="echo", tls=pki.issue_workload("echo"), app_port=srv.port)
    host, port = inbound_addr(es)
    cs = sidecar(service="client", tls=pki.issue_expired("client"),
                 clusters={"echo": [(f"{host}:{port}", spiffe_id("echo"))]})
    out_host, out_port = outbound_addr(cs)
    ch = grpc_channel(f"{out_host}:{out_port}", options=[("grpc.default_authority", "echo")])
    with pytest.raises(grpc.RpcError) as err:
        echo_pb2_grpc.EchoStub(ch).Unary(CALL, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    ehost, eport = admin_addr(es)
    procs.wait_for(lambda: sample(scrape(f"{ehost}:{eport}"), "mesh_tls_handshake_failures",
                                  reason="certificate_expired") >= 1, 10,
                   what="the peer counting the expired certificate by its reason")
    assert "certificate has expired" in es.log_text()

    # The other way round: an endpoint whose certificate expired is refused by its caller.
    stale = sidecar(service="echo", tls=pki.issue_expired("echo"), app_port=srv.port)
    shost, sport = inbound_addr(stale)
    caller = sidecar(service="client", tls=pki.issue_workload("client"),
                     clusters={"echo": [(f"{shost}:{sport}", spiffe_id("echo"))]})
    chost, cport = outbound_addr(caller)
    ch2 = grpc_channel(f"{chost}:{cport}", options=[("grpc.default_authority", "echo")])
    with pytest.raises(grpc.RpcError) as err2:
        echo_pb2_grpc.EchoStub(ch2).Unary(CALL, timeout=10)
    assert err2.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "certificate has expired" in (err2.value.details() or ""), err2.value.details()
    ahost, aport = admin_addr(caller)
    assert sample(scrape(f"{ahost}:{aport}"), "mesh_upstream_tls_failures",
                  reason="certificate_expired") >= 1
    assert srv.proc.alive() and es.alive()


@pytest.fixture(scope="module")
def short_cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProc]:
    base = tmp_path_factory.mktemp("short-ttl-cp")
    c = start_cp(base / "ca", base / "data", "--cert-ttl", "5")
    yield c
    assert c.proc.stop() == 0, c.proc.log_tail()


def test_meshctl_certs_and_status_warn_about_certificates_near_or_past_expiry(
        short_cp: ControlPlaneProc) -> None:
    cp = short_cp
    wl = Workload()
    join(create_token(cp, "order"), wl, csr_service="order", instance="order-7")
    not_after = x509.load_pem_x509_certificate(wl.cert_pem).not_valid_after_utc.timestamp()

    # A connected sidecar that reports a certificate expiring within the warning window.
    outbox: queue.Queue[pb.SidecarMessage | None] = queue.Queue()
    outbox.put(pb.SidecarMessage(register=pb.Register(
        instance_id="order-7", cert_not_after_unix=int(time.time()) + 60)))

    def messages() -> Iterator[pb.SidecarMessage]:
        while (msg := outbox.get()) is not None:
            yield msg

    with mtls_channel(cp, wl) as ch:
        stream = pb_grpc.DiscoveryStub(ch).Stream(messages(), timeout=60)
        try:
            assert next(stream).WhichOneof("msg") == "snapshot"
            r = meshctl(cp, "status")
            assert r.returncode == 0, r.stderr
            assert "order-7" in r.stdout and "expires in" in r.stdout, r.stdout
            assert "warning:" in r.stderr and "order/order-7 expires in" in r.stderr, r.stderr
            js = meshctl(cp, "status", "-o", "json")
            row = [s for s in json.loads(js.stdout) if s["instance"] == "order-7"][0]
            assert row["cert_expiry"] == "expiring"
        finally:
            outbox.put(None)
            stream.cancel()

    # The issued certificate itself (5 s) expires without renewal: certs marks and warns.
    time.sleep(max(0.0, not_after - time.time()) + 0.5)
    r = meshctl(cp, "certs")
    assert r.returncode == 0, r.stderr
    assert "(EXPIRED)" in r.stdout, r.stdout
    assert "warning:" in r.stderr and "order/order-7 expired" in r.stderr, r.stderr
    row = [line for line in r.stdout.splitlines() if "order-7" in line]
    assert len(row) == 1 and "(EXPIRED)" in row[0] and "yes" in row[0], r.stdout
