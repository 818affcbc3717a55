"""The audit log and revocation without processes: the store's audit and revoked tables, the
in-memory revocations and the deny-list, what each audited RPC records, the API gate on an
in-process gRPC server, the snapshot's deny-list and barred instances, meshctl's expiry
warnings, and the sidecar's serials and TLS failure reasons (a real in-memory handshake)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from control_plane import store as store_mod
from control_plane.audit import (
    AUDITED,
    ApiGate,
    action_of,
    error_result,
    safe_objects,
)
from control_plane.discovery import Publisher, build_snapshot
from control_plane.meshctl_security import (
    EXPIRED,
    EXPIRING,
    audit_doc,
    audit_rows,
    expiry_cell,
    expiry_state,
    expiry_warning,
)
from control_plane.registry import Instance
from control_plane.registry.embedded import EmbeddedRegistry
from control_plane.revocation import DENY_LIST_SKEW_S, Revocations, normalize_serial
from control_plane.store import AuditRow, RevokedRow, Store
from mesh_common.authz import AuthzConfig
from mesh_common.snapshot import Snapshot, merge
from protos.mesh.v1 import control_pb2 as pb
from sidecar.io import serial_of, tls_failure_reason
from tests.support.pki import make_ca

T0 = 1_800_000_000.0
ADMIN = "spiffe://mesh.local/admin/meshctl"
WORKLOAD = "spiffe://mesh.local/service/order"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "data")


# ---------------------------------------------------------------------- the audit table
def test_audit_rows_come_back_newest_first_filtered_and_limited(store: Store) -> None:
    for i, action in enumerate(["apply", "token.create", "apply", "certs.revoke"]):
        store.add_audit(AuditRow(T0 + i, ADMIN, action, f"obj-{i}", "ok"))
    rows = store.list_audit(10)
    assert [r.object for r in rows] == ["obj-3", "obj-2", "obj-1", "obj-0"]
    assert rows[0] == AuditRow(T0 + 3, ADMIN, "certs.revoke", "obj-3", "ok")
    assert [r.object for r in store.list_audit(10, "apply")] == ["obj-2", "obj-0"]
    assert [r.object for r in store.list_audit(1)] == ["obj-3"]
    assert store.list_audit(10, "delete") == []


def test_the_audit_log_is_capped_and_its_fields_cut(store: Store,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "MAX_AUDIT_ROWS", 3)
    for i in range(5):
        store.add_audit(AuditRow(T0 + i, WORKLOAD, "apply", f"o{i}", "x" * 5000))
    rows = store.list_audit(100)
    assert [r.object for r in rows] == ["o4", "o3", "o2"]
    assert len(rows[0].result) == store_mod.MAX_AUDIT_FIELD_CHARS


# ---------------------------------------------------------------------- revocation (store)
def _issue(store: Store, serial: str, instance: str, issued_at: float, *,
           service: str = "order", ttl: float = 3600) -> None:
    store.record_certificate(serial, service, instance, f"spiffe://mesh.local/service/{service}",
                             issued_at + ttl, issued_at)


def test_revoking_records_issued_serials_once(store: Store) -> None:
    _issue(store, "a1", "o-1", T0)
    _issue(store, "b2", "o-2", T0)
    assert store.revoke(["a1", "ffff", "a1"], T0 + 5, ADMIN) == ["a1"]  # unknown: left out
    assert store.revoke(["a1", "b2"], T0 + 6, ADMIN) == ["b2"]            # a1 already
    assert store.list_revoked() == [
        RevokedRow("a1", T0 + 5, ADMIN, "order", "o-1", T0 + 3600),
        RevokedRow("b2", T0 + 6, ADMIN, "order", "o-2", T0 + 3600)]
    assert store.get_certificate("a1") is not None and store.get_certificate("zz") is None


def test_an_instance_is_barred_only_while_its_latest_certificate_is_revoked(store: Store) -> None:
    _issue(store, "a1", "o-1", T0)
    _issue(store, "a2", "o-1", T0 + 100)  # o-1 renewed: a2 is its current certificate
    _issue(store, "c1", "-", T0)          # joined without an instance id
    store.revoke(["a1", "c1"], T0 + 200, ADMIN)
    assert store.barred_instances() == set()  # a1 was superseded; "-" is never barred
    store.revoke(["a2"], T0 + 201, ADMIN)
    assert store.barred_instances() == {("order", "o-1")}


def test_the_unexpired_certificates_of_an_instance(store: Store) -> None:
    _issue(store, "a1", "o-1", T0, ttl=10)
    _issue(store, "a2", "o-1", T0 + 5, ttl=3600)
    _issue(store, "p1", "o-1", T0 + 5, service="payment")
    assert [c.serial for c in store.certificates_of_instance("o-1", T0 + 20)] == ["a2", "p1"]
    assert [c.serial for c in store.certificates_of_instance("o-1", T0 + 20, "order")] == ["a2"]
    assert store.certificates_of_instance("o-9", T0) == []


# ---------------------------------------------------------------------- revocation (memory)
def test_the_deny_list_keeps_serials_until_their_certificates_expired(store: Store) -> None:
    rows = [RevokedRow("b", T0, ADMIN, "order", "o-1", T0 + 100),
            RevokedRow("a", T0, ADMIN, "order", "o-2", T0 + 10)]
    rev = Revocations(rows, [("order", "o-1")])
    assert rev.deny_list(T0) == ("a", "b")
    assert rev.deny_list(T0 + 10 + DENY_LIST_SKEW_S + 1) == ("b",)
    assert rev.is_revoked("a") and not rev.is_revoked("c") and not rev.is_revoked("")
    assert rev.is_barred("order", "o-1") and not rev.is_barred("order", "o-2")
    rev.add([RevokedRow("c", T0, ADMIN, "pay", "p-1", T0 + 50)], [("pay", "p-1")])
    assert rev.is_revoked("c") and rev.barred() == frozenset({("pay", "p-1")})
    assert len(rev) == 3

    _issue(store, "a1", "o-1", T0)
    store.revoke(["a1"], T0, ADMIN)
    loaded = Revocations.load(store)
    assert loaded.is_revoked("a1") and loaded.is_barred("order", "o-1")


@pytest.mark.parametrize(("text", "serial"), [
    ("1F2E", "1f2e"), ("0x00ab", "ab"), ("01:F2:3E", "1f23e"), (" 0 ", "0"), ("00", "0")])
def test_serials_are_normalized_as_the_mesh_writes_them(text: str, serial: str) -> None:
    assert normalize_serial(text) == serial


@pytest.mark.parametrize("text", ["", "xyz", "12 34", "f" * 41, "0x"])
def test_a_malformed_serial_is_refused_in_one_line(text: str) -> None:
    with pytest.raises(ValueError, match="not a certificate serial"):
        normalize_serial(text)


# ---------------------------------------------------------------------- snapshots
def _inst(service: str, iid: str, port: int) -> Instance:
    return Instance(service, iid, f"spiffe://mesh.local/service/{service}",
                    inbound=f"127.0.0.1:{port}", health="SERVING")


def test_the_snapshot_carries_the_deny_list_and_leaves_barred_instances_out() -> None:
    snap = build_snapshot([_inst("echo", "e-1", 7001)], "1", revoked=["b2", "a1", "b2"])
    assert snap.revoked == ("a1", "b2") and snap.to_doc()["revoked"] == ["a1", "b2"]
    assert "revoked" not in build_snapshot([], "1").to_doc()  # absent when empty

    async def publish() -> dict:
        registry = EmbeddedRegistry(10.0, instances=[_inst("echo", "e-1", 7001),
                                                     _inst("echo", "e-2", 7002)])
        pub = Publisher(registry, None, 0.0, "mesh.local", revoked=lambda: ("c3",),
                        excluded=lambda: frozenset({("echo", "e-2")}))
        import json
        return json.loads((await pub.publish_now()).json)

    doc = asyncio.run(publish())
    assert doc["revoked"] == ["c3"]
    [cluster] = doc["clusters"]
    assert [e["instance"] for e in cluster["endpoints"]] == ["e-1"]


def test_a_dynamic_sidecars_merge_keeps_the_control_planes_deny_list_and_authz() -> None:
    static = Snapshot("dynamic-0")
    discovered = Snapshot("7", revoked=("ab",), authz=AuthzConfig(default="deny"))
    merged = merge(static, discovered, "7")
    assert merged.revoked == ("ab",) and merged.authz.default == "deny"
    both = merge(Snapshot("s", revoked=("cd",)), discovered, "7")
    assert both.revoked == ("ab", "cd")


# ---------------------------------------------------------------------- what is recorded
def test_each_audited_rpc_names_its_action_and_objects() -> None:
    apply = AUDITED["ApplyConfig"]
    request = pb.ApplyConfigRequest(documents=[
        pb.ConfigDocument(source="a.yaml", index=1,
                          json='{"kind": "Route", "name": "payment", "spec": {}}'),
        pb.ConfigDocument(source="a.yaml", index=2, json="not json")])
    response = pb.ApplyConfigResponse(results=[
        pb.ConfigResult(kind="Route", name="payment", action="configured"),
        pb.ConfigResult(kind="Fault", name="order", action="unchanged")])
    assert apply.action == "apply"
    assert apply.objects(request, response) == ["Route/payment", "Fault/order (unchanged)"]
    assert apply.objects(request, None) == ["Route/payment, a.yaml #2"]
    assert apply.skip(pb.ApplyConfigRequest(dry_run=True)) and not apply.skip(request)

    token = pb.CreateTokenRequest(service="order")
    assert AUDITED["CreateToken"].objects(token, pb.CreateTokenResponse(token_id="abc")) == [
        "token abc for order"]
    assert AUDITED["DeleteToken"].objects(pb.DeleteTokenRequest(token_id="abc"), None) == [
        "token abc"]
    revoke = pb.RevokeCertificateRequest(instance="web-1")
    assert AUDITED["RevokeCertificate"].objects(
        revoke, pb.RevokeCertificateResponse(serials=["a1", "b2"])) == [
        "instance web-1: serial a1, b2"]
    assert AUDITED["RevokeCertificate"].objects(pb.RevokeCertificateRequest(serial="A1"),
                                                None) == ["serial A1"]
    assert AUDITED["RenewCertificates"].objects(
        pb.RenewCertificatesRequest(), pb.RenewCertificatesResponse(instances=["a"])) == [
        "every sidecar: 1 sidecar(s) told"]
    assert AUDITED["SetAuthzDefault"].objects(pb.SetAuthzDefaultRequest(action="deny"),
                                              None) == ["default deny"]
    assert AUDITED["RotateCA"].objects(pb.RotateCARequest(),
                                       pb.RotateCAResponse(rotation_id="r1")) == [
        "rotation r1 to a new root"]
    assert {a.action for a in AUDITED.values()} >= {
        "apply", "delete", "token.create", "token.delete", "authz.default", "ca.rotate",
        "certs.revoke", "certs.renew"}
    assert action_of("ApplyConfig") == "apply" and action_of("ListTokens") == "Admin.ListTokens"


def test_results_are_one_line_and_a_broken_describer_never_fails_the_rpc() -> None:
    assert error_result(grpc.StatusCode.NOT_FOUND, "no Route\n named  x") == \
        "error: NOT_FOUND: no Route named x"
    assert error_result(None, "") == "error: UNKNOWN"
    assert len(error_result(grpc.StatusCode.INTERNAL, "y" * 5000)) < 600

    def broken(request: object, response: object) -> list[str]:
        raise KeyError("bug")

    assert safe_objects(AUDITED["ApplyConfig"].__class__("apply", broken), object(),
                        None) == ["?"]
    assert safe_objects(None, object(), None) == [""]


# ---------------------------------------------------------------------- the gate, in process
def _gate_server_test(calls: list[tuple[str, str, bytes, str]]) -> list[AuditRow]:
    """Serve fake mesh.v1.Admin and mesh.v1.Discovery methods behind an ApiGate whose
    caller is named by the ``who`` metadata; run ``calls`` (service, method, request bytes,
    who) and return the audit rows written. Errors are collected as rows too."""
    rows: list[AuditRow] = []

    async def record(row: AuditRow) -> None:
        rows.append(row)

    def identify(context: grpc.aio.ServicerContext) -> tuple[str, str]:
        who = dict(context.invocation_metadata()).get("who", "")
        return ("admin" if "/admin/" in who else "service"), who

    async def apply(req: pb.ApplyConfigRequest, context: grpc.aio.ServicerContext
                    ) -> pb.ApplyConfigResponse:
        if req.documents and req.documents[0].source == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        return pb.ApplyConfigResponse(results=[pb.ConfigResult(
            kind="Route", name="r", action="created")])

    async def list_tokens(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b""

    async def tap(request: bytes, context: grpc.aio.ServicerContext):
        for i in range(3):
            yield bytes([i])

    async def main() -> list[str]:
        server = grpc.aio.server(interceptors=[ApiGate(identify, lambda s: False, record,
                                                       lambda: T0)])
        server.add_generic_rpc_handlers([
            grpc.method_handlers_generic_handler("mesh.v1.Admin", {
                "ApplyConfig": grpc.unary_unary_rpc_method_handler(
                    apply, request_deserializer=pb.ApplyConfigRequest.FromString,
                    response_serializer=pb.ApplyConfigResponse.SerializeToString),
                "ListTokens": grpc.unary_unary_rpc_method_handler(list_tokens),
                "Tap": grpc.unary_stream_rpc_method_handler(tap)}),
            grpc.method_handlers_generic_handler("mesh.v1.Discovery", {
                "Echo": grpc.unary_unary_rpc_method_handler(list_tokens)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        out: list[str] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                for service, method, body, who in calls:
                    path = f"/{service}/{method}"
                    try:
                        if method == "Tap":
                            got = [x async for x in ch.unary_stream(path)(
                                body, metadata=(("who", who),), timeout=5)]
                            out.append(f"ok {len(got)}")
                        else:
                            await ch.unary_unary(path)(body, metadata=(("who", who),),
                                                       timeout=5)
                            out.append("ok")
                    except grpc.aio.AioRpcError as exc:
                        out.append(f"{exc.code().name}: {exc.details()}")
        finally:
            await server.stop(0)
        return out

    answers = asyncio.run(main())
    rows.extend(AuditRow(0, "answer", a, "", "") for a in answers)
    return rows


def test_the_gate_refuses_non_admins_and_records_what_changes() -> None:
    doc = pb.ConfigDocument(source="r.yaml", index=1, json='{"kind": "Route", "name": "r"}')
    apply = pb.ApplyConfigRequest(documents=[doc]).SerializeToString()
    dry = pb.ApplyConfigRequest(documents=[doc], dry_run=True).SerializeToString()
    missing = pb.ApplyConfigRequest(documents=[pb.ConfigDocument(source="missing")])
    rows = _gate_server_test([
        ("mesh.v1.Admin", "ApplyConfig", apply, ADMIN),
        ("mesh.v1.Admin", "ApplyConfig", apply, WORKLOAD),
        ("mesh.v1.Admin", "ApplyConfig", dry, ADMIN),
        ("mesh.v1.Admin", "ApplyConfig", missing.SerializeToString(), ADMIN),
        ("mesh.v1.Admin", "ListTokens", b"", ADMIN),
        ("mesh.v1.Admin", "ListTokens", b"", WORKLOAD),
        ("mesh.v1.Admin", "Tap", b"", ADMIN),
        ("mesh.v1.Admin", "Tap", b"", WORKLOAD),
        ("mesh.v1.Discovery", "Echo", b"", WORKLOAD),
    ])
    answers = [r.action for r in rows if r.identity == "answer"]
    audit = [(r.identity, r.action, r.object, r.result) for r in rows if r.identity != "answer"]
    denied = f"{WORKLOAD} may not call Admin.%s (admin identities only)"
    assert answers == [
        "ok", f"PERMISSION_DENIED: {denied % 'ApplyConfig'}", "ok",
        "NOT_FOUND: no such thing", "ok", f"PERMISSION_DENIED: {denied % 'ListTokens'}",
        "ok 3", f"PERMISSION_DENIED: {denied % 'Tap'}", "ok"]
    assert audit == [
        (ADMIN, "apply", "Route/r", "ok"),
        (WORKLOAD, "apply", "Route/r",
         f"error: PERMISSION_DENIED: {denied % 'ApplyConfig'}"),
        (ADMIN, "apply", "missing #0", "error: NOT_FOUND: no such thing"),
        (WORKLOAD, "Admin.ListTokens", "", f"error: PERMISSION_DENIED: {denied % 'ListTokens'}"),
        (WORKLOAD, "Admin.Tap", "", f"error: PERMISSION_DENIED: {denied % 'Tap'}"),
    ]


# ---------------------------------------------------------------------- meshctl
def test_expiry_states_within_the_last_tenth_of_the_lifetime() -> None:
    issued, not_after = T0, T0 + 1000
    assert expiry_state(not_after, T0 + 850, issued) == ""
    assert expiry_state(not_after, T0 + 901, issued) == EXPIRING
    assert expiry_state(not_after, T0 + 1000, issued) == EXPIRED
    assert expiry_state(not_after, T0 + 650, 0) == ""          # unknown lifetime: 5 minutes
    assert expiry_state(not_after, T0 + 750, 0) == EXPIRING
    assert expiry_state(0, T0, issued) == ""
    assert "(EXPIRED)" in expiry_cell(not_after, EXPIRED, T0 + 2000)
    assert "expires in 50s!" in expiry_cell(not_after, EXPIRING, T0 + 950)
    assert expiry_cell(not_after, "", T0) == "2027-01-15T08:16:40Z"
    line = expiry_warning([("a/1", not_after, EXPIRING), ("b/2", not_after, ""),
                           ("c/3", T0, EXPIRED)], T0 + 950)
    assert line is not None and "2 certificate(s)" in line and "\n" not in line
    assert "a/1 expires in 50s" in line and "c/3 expired" in line and "b/2" not in line
    assert expiry_warning([("b/2", not_after, "")], T0) is None


def test_the_audit_document_and_table() -> None:
    resp = pb.ListAuditResponse(entries=[pb.AuditEntry(
        time_unix=T0 + 0.5, identity=ADMIN, action="apply", object="Route/payment",
        result="ok")])
    doc = audit_doc(resp)
    assert doc == [{"time": "2027-01-15T08:00:00Z", "identity": ADMIN, "action": "apply",
                    "object": "Route/payment", "result": "ok"}]
    assert audit_rows(doc) == [["2027-01-15T08:00:00Z", ADMIN, "apply", "Route/payment",
                                "ok"]]


# ---------------------------------------------------------------------- the sidecar
def test_peer_serials_are_written_as_the_deny_list_writes_them() -> None:
    assert serial_of({"serialNumber": "0A1B2C"}) == "a1b2c"
    assert serial_of({"serialNumber": "00"}) == "0"
    assert serial_of({}) == "" and serial_of({"serialNumber": 5}) == ""


def test_tls_failure_reasons_name_an_expired_certificate() -> None:
    expired = ssl.SSLCertVerificationError(1, "certificate verify failed")
    expired.verify_code = 10
    expired.reason = "CERTIFICATE_VERIFY_FAILED"
    assert tls_failure_reason(expired) == "certificate_expired"
    other = ssl.SSLCertVerificationError(1, "x")
    other.verify_code = 20
    other.reason = "CERTIFICATE_VERIFY_FAILED"
    assert tls_failure_reason(other) == "CERTIFICATE_VERIFY_FAILED"
    assert tls_failure_reason(ConnectionResetError()) == "ConnectionResetError"


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> None:
    """Drive a TLS handshake between two in-memory SSLObjects until it completes or fails."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    done = {"srv": False, "cli": False}
    for _ in range(20):
        for name, obj in (("cli", cli), ("srv", srv)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return


def test_an_inbound_handshake_with_an_expired_client_certificate_fails_for_that_reason(
        tmp_path: Path) -> None:
    ca = make_ca(tmp_path, name="unit-ca")
    server_files = ca.issue_workload("echo")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(server_files.cert, server_files.key)
    server.load_verify_locations(cafile=ca.ca_path)
    server.verify_mode = ssl.CERT_REQUIRED
    def client_with(files) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cafile=ca.ca_path)
        ctx.load_cert_chain(files.cert, files.key)
        return ctx

    with pytest.raises(ssl.SSLError) as expired:
        _handshake(server, client_with(ca.issue_expired("client")))
    assert tls_failure_reason(expired.value) == "certificate_expired"
    _handshake(server, client_with(ca.issue_workload("client")))  # a valid one passes
    soon = ca.issue_workload("late", not_before=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
                             not_after=dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))
    with pytest.raises(ssl.SSLError) as early:
        _handshake(server, client_with(soon))
    assert tls_failure_reason(early.value) == "certificate_not_yet_valid"


def test_a_sidecar_view_without_connectors_still_scrapes() -> None:
    from sidecar.metrics import metrics_page
    view = SimpleNamespace(
        boot=SimpleNamespace(service="web"), snapshot=Snapshot("1"), stacks={}, relays={},
        inbound=None, outbound=None, tls_failures={}, cert_not_after=lambda: None,
        traces={}, tracer=None,
        connectors={"outbound": SimpleNamespace(refused={"revoked": 2},
                                                tls_failures={"certificate_expired": 1})})
    text = metrics_page(view).data.decode()  # type: ignore[arg-type]
    assert 'mesh_connections_refused_total{listener="upstream",reason="revoked"} 2.0' in text
    assert 'mesh_upstream_tls_failures_total{reason="certificate_expired"} 1.0' in text
