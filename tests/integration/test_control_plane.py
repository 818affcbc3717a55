"""The control plane as a real process on loopback: meshctl makes join tokens, a Python client
(playing the sidecar) joins over the plaintext bootstrap listener, then talks mTLS.

Every private key of a workload here stays in memory (the test never writes one to disk).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh_common.jointoken import bundle_matches, join_proof, parse_token
from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc
from tests.support import procs
from tests.support.sidecar import REPO_ROOT

TD = "mesh.local"


@dataclass
class ControlPlaneProc:
    proc: procs.Proc
    ca_dir: Path
    data_dir: Path

    @property
    def api(self) -> str:
        return self.proc.ready["listen"]

    @property
    def bootstrap(self) -> str:
        return self.proc.ready["bootstrap"]


def start_cp(ca_dir: Path, data_dir: Path, *extra: str) -> ControlPlaneProc:
    proc = procs.start([sys.executable, "-m", "control_plane.main", "--listen", "127.0.0.1:0",
                        "--bootstrap-listen", "127.0.0.1:0", "--ca-dir", str(ca_dir),
                        "--data-dir", str(data_dir), "--admin-http", "127.0.0.1:0",
                        "--otlp-listen", "127.0.0.1:0", *extra], cwd=REPO_ROOT)
    return ControlPlaneProc(proc, ca_dir, data_dir)


def meshctl(cp: ControlPlaneProc | None, *args: str, control_plane: str | None = None,
            certs_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["MESH_CONTROL_PLANE"] = control_plane or (cp.api if cp else "127.0.0.1:1")
    env["MESH_CERTS_DIR"] = str(certs_dir or (cp.ca_dir if cp else "/nonexistent"))
    return subprocess.run([sys.executable, "-m", "control_plane.meshctl", *args], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)


def admin_channel(cp: ControlPlaneProc) -> grpc.Channel:
    """A channel to the API listener with meshctl's admin credentials (in-process: quicker
    than a meshctl process for looking)."""
    d = cp.ca_dir
    creds = grpc.ssl_channel_credentials(root_certificates=(d / "ca.pem").read_bytes(),
                                         private_key=(d / "admin-key.pem").read_bytes(),
                                         certificate_chain=(d / "admin.pem").read_bytes())
    return grpc.secure_channel(cp.api, creds)


def create_token(cp: ControlPlaneProc, service: str, *args: str) -> str:
    r = meshctl(cp, "token", "create", service, *args)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mesh1."), r.stdout
    return lines[0]


class Workload:
    """What a sidecar holds: a key in memory and, after joining, its certificate."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert_pem = b""
        self.bundle_pem = b""

    def csr(self, service: str) -> bytes:
        uri = f"spiffe://{TD}/service/{service}"
        return (x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                               critical=False)
                .sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def join(token_str: str, wl: Workload, *, csr_service: str | None = None,
         token_id: str | None = None, secret: bytes | None = None,
         instance: str = "i-1") -> pb.JoinResponse:
    tok = parse_token(token_str)
    # The service a token is bound to is not in the token: the test names it in csr_service.
    csr = wl.csr(csr_service or "")
    proof = join_proof(secret if secret is not None else tok.secret, csr)
    with grpc.insecure_channel(tok.join_address) as ch:
        resp = pb_grpc.BootstrapStub(ch).Join(
            pb.JoinRequest(token_id=token_id or tok.token_id, csr=csr, proof=proof,
                           instance_id=instance), timeout=10)
    wl.cert_pem, wl.bundle_pem = resp.certificate_pem.encode(), resp.trust_bundle_pem.encode()
    return resp


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def mtls_channel(cp: ControlPlaneProc, wl: Workload) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=(cp.ca_dir / "ca.pem").read_bytes(),
                                         private_key=wl.key_pem(), certificate_chain=wl.cert_pem)
    return grpc.secure_channel(cp.api, creds)


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProc]:
    base = tmp_path_factory.mktemp("cp")
    c = start_cp(base / "ca", base / "data")
    yield c
    assert c.proc.stop() == 0, c.proc.log_tail()
    log = c.proc.log_text()
    assert "mesh1." not in log, "a token string reached the log"


def test_join_gives_a_spiffe_certificate_and_a_pinned_bundle(cp: ControlPlaneProc) -> None:
    token = create_token(cp, "order")
    tok = parse_token(token)
    assert tok.join_address == cp.bootstrap and tok.api_address == cp.api
    assert tok.ca_key_sha256 == cp.proc.ready["ca_key_sha256"]
    wl = Workload()
    resp = join(token, wl, csr_service="order", instance="order-1")
    assert resp.spiffe_id == f"spiffe://{TD}/service/order"
    assert bundle_matches(wl.bundle_pem, tok.ca_key_sha256)
    cert = x509.load_pem_x509_certificate(wl.cert_pem)
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [f"spiffe://{TD}/service/order"]
    assert cert.public_key().public_numbers() == wl.key.public_key().public_numbers()

    r = meshctl(cp, "certs", "-o", "json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    serial = format(cert.serial_number, "x")
    assert {"service": "order", "instance": "order-1", "serial": serial,
            "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")} in listed
    table = meshctl(cp, "certs")
    assert table.returncode == 0 and serial in table.stdout and "SERVICE" in table.stdout


def test_each_bad_join_gets_its_own_error(cp: ControlPlaneProc) -> None:
    token = create_token(cp, "payment", "--uses", "1")
    tok = parse_token(token)
    wl = Workload()

    err = rpc_error(lambda: join(token, wl, csr_service="payment", token_id="nosuchtoken1"))
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, "unknown join token")

    err = rpc_error(lambda: join(token, wl, csr_service="payment", secret=b"x" * 32))
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED,
                                           "join proof does not match")

    err = rpc_error(lambda: join(token, wl, csr_service="inventory"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "spiffe://mesh.local/service/inventory" in err.details()

    # None of the refusals above used the single use up.
    join(token, wl, csr_service="payment")
    err = rpc_error(lambda: join(token, Workload(), csr_service="payment"))
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, "join token used up")

    listed = json.loads(meshctl(cp, "token", "list", "-o", "json").stdout)
    assert [t["uses_left"] for t in listed if t["id"] == tok.token_id] == [0]


def test_an_expired_token_is_refused(cp: ControlPlaneProc) -> None:
    r = meshctl(cp, "token", "create", "inventory", "--ttl", "1s", "-o", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["service"] == "inventory" and doc["uses_left"] is None and doc["id"]
    token = doc["token"]

    def expired() -> bool:
        try:
            join(token, Workload(), csr_service="inventory")
        except grpc.RpcError as err:
            assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED,
                                                   "join token expired")
            return True
        return False

    procs.wait_for(expired, timeout_s=5, interval_s=0.1, what="the token to expire")


def test_workload_cert_renews_itself_only_and_cannot_administer(cp: ControlPlaneProc) -> None:
    wl = Workload()
    join(create_token(cp, "order"), wl, csr_service="order")
    with mtls_channel(cp, wl) as ch:
        err = rpc_error(lambda: pb_grpc.AdminStub(ch).CreateToken(
            pb.CreateTokenRequest(service="order"), timeout=10))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "spiffe://mesh.local/service/order" in err.details()

        ident = pb_grpc.IdentityStub(ch)
        resp = ident.Renew(pb.RenewRequest(csr=wl.csr("order"), instance_id="order-1"),
                           timeout=10)
        assert resp.spiffe_id == "spiffe://mesh.local/service/order"
        renewed = x509.load_pem_x509_certificate(resp.certificate_pem.encode())
        assert renewed.serial_number != x509.load_pem_x509_certificate(wl.cert_pem).serial_number

        err = rpc_error(lambda: ident.Renew(pb.RenewRequest(csr=wl.csr("payment")), timeout=10))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "spiffe://mesh.local/service/payment" in err.details()

        err = rpc_error(lambda: ident.Renew(pb.RenewRequest(csr=b"garbage"), timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_client_without_a_mesh_certificate_is_not_served(cp: ControlPlaneProc) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=(cp.ca_dir / "ca.pem").read_bytes())
    with grpc.secure_channel(cp.api, creds) as ch:
        err = rpc_error(lambda: pb_grpc.AdminStub(ch).ListTokens(pb.ListTokensRequest(),
                                                                 timeout=5))
        assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_ca_dir_keys_are_private(cp: ControlPlaneProc) -> None:
    for name in ("ca-key.pem", "admin-key.pem"):
        assert stat.S_IMODE((cp.ca_dir / name).stat().st_mode) == 0o600, name
    # The test's workload keys were kept in memory: no key file anywhere but the CA's own.
    keys = [p for p in cp.ca_dir.parent.rglob("*")
            if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    assert sorted(p.name for p in keys) == ["admin-key.pem", "ca-key.pem"]


def test_restart_keeps_ca_and_tokens(tmp_path: Path) -> None:
    ca_dir, data_dir = tmp_path / "ca", tmp_path / "data"
    first = start_cp(ca_dir, data_dir)
    try:
        tok = parse_token(create_token(first, "order", "--uses", "3"))
    finally:
        assert first.proc.stop() == 0
    second = start_cp(ca_dir, data_dir)
    try:
        assert second.proc.ready["ca_key_sha256"] == first.proc.ready["ca_key_sha256"]
        r = meshctl(second, "token", "list", "-o", "json")
        assert r.returncode == 0, r.stderr
        assert [(t["id"], t["service"], t["uses_left"]) for t in json.loads(r.stdout)] == [
            (tok.token_id, "order", 3)]
        assert tok.token_id in meshctl(second, "token", "list").stdout
        d = meshctl(second, "token", "delete", tok.token_id)
        assert d.returncode == 0, d.stderr
        assert json.loads(meshctl(second, "token", "list", "-o", "json").stdout) == []
    finally:
        assert second.proc.stop() == 0


def test_meshctl_errors_are_one_line(cp: ControlPlaneProc, tmp_path: Path) -> None:
    cases = [
        meshctl(cp, "certs", control_plane="127.0.0.1:1"),  # unreachable
        meshctl(cp, "token", "create", "order", "--ttl", "soon"),  # bad flag
        meshctl(cp, "token", "delete", "nosuchtoken1"),  # unknown name
        meshctl(cp, "certs", certs_dir=tmp_path),  # no credentials
    ]
    for r in cases:
        assert r.returncode != 0
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("meshctl: error:") and "Traceback" not in r.stderr
    assert "cannot reach the control plane at 127.0.0.1:1" in cases[0].stderr
    assert "NOT_FOUND" in cases[2].stderr


def test_control_plane_bad_flags_are_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "control_plane.main", "--listen", "nowhere",
                        "--ca-dir", str(tmp_path / "ca"), "--data-dir", str(tmp_path / "d")],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "--listen" in r.stderr, r.stderr


def _org_pki(tmp: Path) -> tuple[Path, Path, x509.Certificate]:
    """An organisation's root and an intermediate for the mesh (chain file: intermediate,
    then root). Returns (chain path, intermediate key path, root certificate)."""
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "org root")])
    root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(root_key, hashes.SHA256()))
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mesh intermediate")]))
             .issuer_name(root_name).public_key(inter_key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=20))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .sign(root_key, hashes.SHA256()))
    chain = tmp / "intermediate-chain.pem"
    chain.write_bytes(inter.public_bytes(serialization.Encoding.PEM)
                      + root.public_bytes(serialization.Encoding.PEM))
    key = tmp / "intermediate-key.pem"
    key.write_bytes(inter_key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    key.chmod(0o600)
    return chain, key, root


def test_an_organisations_intermediate_signs_and_its_chain_is_the_bundle(tmp_path: Path) -> None:
    chain, key, root = _org_pki(tmp_path)
    cp = start_cp(tmp_path / "ca", tmp_path / "data", "--ca-cert", str(chain), "--ca-key", str(key))
    try:
        wl = Workload()
        join(create_token(cp, "order"), wl, csr_service="order")
        cert = x509.load_pem_x509_certificate(wl.cert_pem)
        inter = x509.load_pem_x509_certificates(chain.read_bytes())[0]
        cert.verify_directly_issued_by(inter)  # signed by the intermediate
        assert wl.bundle_pem == chain.read_bytes()  # the whole chain, up to the org's root
        assert root.public_bytes(serialization.Encoding.PEM) in wl.bundle_pem
        with mtls_channel(cp, wl) as ch:  # the API serves the intermediate's workloads
            resp = pb_grpc.IdentityStub(ch).Renew(pb.RenewRequest(csr=wl.csr("order")), timeout=10)
        assert resp.spiffe_id == "spiffe://mesh.local/service/order"
    finally:
        cp.proc.stop()
