"""The control plane under hostile input, with real processes on loopback: malformed CSRs and
CSRs for another identity, wrong, expired, used-up and foreign join tokens, a sidecar that
never ACKs, one that never reads its stream, thousands of idle connections, and applies of
garbage. Each attack gets a clear status (and is counted), and the control plane keeps
serving everyone else: a healthy sidecar (a real dynamic sidecar with an echo app, connected
before any attack) gets a config push during or after each attack and ACKs it on the very
discovery stream it opened first, and a new join succeeds.

The tests share one control plane and run in file order; each leaves the healthy sidecar
SYNCED. What ``tests/integration/test_control_plane.py`` already proves of each refusal
alone (its status and message) is not repeated; these add the load beside it, the counters
and what must not change.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import random
import re
import resource
import socket
import ssl
import struct
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import hpack
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from control_plane.ca import CertificateAuthority
from mesh_common.jointoken import (
    ANSWER_MAC_METADATA,
    check_answer_mac,
    join_proof,
    parse_token,
)
from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc
from tests.integration.test_control_plane import (
    ControlPlaneProc,
    Workload,
    meshctl,
    start_cp,
)
from tests.integration.test_discovery import CP_FLAGS, STALE_S, Mesh
from tests.integration.test_dynamic_sidecar import admin_get
from tests.support import procs
from tests.support.h2probe import PREFACE, frame

pytestmark = pytest.mark.timeout(180)

TD = "mesh.local"
STALL_S = 4.0           # --stream-stall-timeout-s: a stream not read this long is ended
HANDSHAKE_S = 8.0       # --handshake-timeout-s: TLS handshake and HTTP/2 preface within this
PUSH_DEADLINE_S = 10.0  # a healthy sidecar ACKs a push within this, attack or not
IDLE_CONNECTIONS = 2000
IDLE_TLS_CONNECTIONS = 20
FRAME_SETTINGS, FRAME_PING = 0x4, 0x6
SETTINGS_INITIAL_WINDOW_SIZE = 0x4


class HostileMesh(Mesh):
    """``test_discovery``'s mesh with this module's bounds on the control plane."""

    def _start_cp(self) -> ControlPlaneProc:
        return start_cp(self.base / "ca", self.base / "data",
                        "--listen", f"127.0.0.1:{self.api_port}",
                        "--bootstrap-listen", f"127.0.0.1:{self.boot_port}", *CP_FLAGS,
                        "--stream-stall-timeout-s", str(STALL_S),
                        "--handshake-timeout-s", str(HANDSHAKE_S))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileMesh]:
    m = HostileMesh(tmp_path_factory.mktemp("hostile-cp"))
    try:
        m.start("echo", "echo-1")
        procs.wait_for(lambda: m.all_synced({"echo-1"}), 30, what="echo-1 registered and SYNCED")
        yield m
    finally:
        m.close()
    log = m.cp.proc.log_text()
    assert "mesh1." not in log, "a token string reached the control plane's log"
    assert "Traceback" not in log, log[-3000:]


# ---------------------------------------------------------------------- looking
def cp_metrics(mesh: Mesh) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The control plane's /metrics: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://{mesh.cp.proc.ready['admin_http']}/metrics",
                                timeout=5) as r:
        text = r.read().decode()
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if m is None or line.startswith("#"):
            continue
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(snapshot: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return snapshot.get((name, frozenset(labels.items())), 0.0)


def refusals(mesh: Mesh) -> dict[tuple[str, str], float]:
    """``mesh_cp_identity_refusals_total`` by (rpc, reason)."""
    return {(dict(k[1])["rpc"], dict(k[1])["reason"]): v for k, v in cp_metrics(mesh).items()
            if k[0] == "mesh_cp_identity_refusals_total"}


def delta(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]
          ) -> dict[tuple[str, str], float]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after
            if after.get(k, 0) != before.get(k, 0)}


def certificates(mesh: Mesh) -> set[str]:
    return {c.serial for c in mesh.admin().ListCertificates(pb.ListCertificatesRequest(),
                                                            timeout=5).certificates}


def token(mesh: Mesh, service: str, *, uses: int = 0, ttl_s: int = 0) -> str:
    return mesh.admin().CreateToken(pb.CreateTokenRequest(service=service, uses=uses,
                                                          ttl_s=ttl_s), timeout=5).token


def raw_join(token_str: str, csr: bytes, *, instance: str = "x-1", secret: bytes | None = None,
             token_id: str | None = None) -> tuple[pb.JoinResponse, Any]:
    """A Join of exactly ``csr`` (proven with the token's secret, or ``secret``); returns the
    answer and the call (its trailing metadata). Raises grpc.RpcError."""
    tok = parse_token(token_str)
    proof = join_proof(tok.secret if secret is None else secret, csr)
    with grpc.insecure_channel(tok.join_address) as ch:
        return pb_grpc.BootstrapStub(ch).Join.with_call(
            pb.JoinRequest(token_id=tok.token_id if token_id is None else token_id, csr=csr,
                           proof=proof, instance_id=instance), timeout=10)


def refused(fn: Callable[[], Any], what: object = "") -> grpc.RpcError:
    """The error ``fn()`` raises; fails the test when it succeeds."""
    try:
        result = fn()
    except grpc.RpcError as err:
        return err
    raise AssertionError(f"not refused: {what!r:.300} -> {result!r:.300}")


def joined(mesh: Mesh, service: str, instance: str) -> Workload:
    """A workload of ``service`` joined with a one-use token (its key in memory)."""
    wl = Workload()
    resp, _ = raw_join(token(mesh, service, uses=1), wl.csr(service), instance=instance)
    wl.cert_pem, wl.bundle_pem = resp.certificate_pem.encode(), resp.trust_bundle_pem.encode()
    return wl


def workload_channel(mesh: Mesh, wl: Workload) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=(mesh.cp.ca_dir / "ca.pem").read_bytes(),
                                         private_key=wl.key_pem(), certificate_chain=wl.cert_pem)
    return grpc.secure_channel(mesh.cp.api, creds)


# ---------------------------------------------------------------------- healthy traffic
class Healthy:
    """The healthy sidecar echo-1 as an attack finds it: its discovery stream (``/stats``:
    reconnects, failures) taken before the attack. ``push`` applies a config change and
    waits for echo-1 to ACK its version; ``served`` also checks the stream is the same one
    and a new join works."""

    _n = 0

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.before = self.stream()
        assert self.before[0], "echo-1's discovery stream is not connected"

    def stream(self) -> tuple[bool, int, int]:
        _, st = admin_get(self.mesh.sidecars["echo-1"], "/stats")
        d = st["discovery"]
        return d["connected"], d["reconnects"], d["failures"]

    def push(self) -> str:
        """A new config (a TrafficPolicy of service ``probe``): its snapshot version, once
        echo-1 has ACKed it (SYNCED) within ``PUSH_DEADLINE_S``."""
        Healthy._n += 1
        doc = {"kind": "TrafficPolicy", "name": "probe",
               "spec": {"service": "probe", "timeout_ms": 1000 + Healthy._n}}
        version = self.mesh.admin().ApplyConfig(pb.ApplyConfigRequest(documents=[
            pb.ConfigDocument(source="probe.yaml", index=1, json=json.dumps(doc))]),
            timeout=10).version
        started = time.monotonic()

        def acked() -> bool:
            s = self.mesh.status()["echo-1"]
            return s.acked_version == version and s.state == "SYNCED" and s.connected

        procs.wait_for(acked, PUSH_DEADLINE_S, interval_s=0.05,
                       what=f"echo-1 to ACK snapshot version {version}")
        assert time.monotonic() - started < PUSH_DEADLINE_S
        return version

    def served(self) -> None:
        """A push ACKed on the same stream as before, and a new join."""
        self.push()
        assert self.stream() == self.before, "echo-1's discovery stream was not kept"
        wl = joined(self.mesh, "order", f"order-{Healthy._n}")
        cert = x509.load_pem_x509_certificate(wl.cert_pem)
        assert cert.public_key().public_numbers() == wl.key.public_key().public_numbers()


@contextlib.contextmanager
def running(attack: Callable[[], None], *, max_rounds: int, max_s: float = 30.0
            ) -> Iterator[list[int]]:
    """Run ``attack`` over and over in a thread (at most ``max_rounds`` times and
    ``max_s`` seconds) while the body runs; yields ``[rounds done]``. An attack whose
    refusal is not the expected one fails the test."""
    stop = threading.Event()
    done = [0]
    errors: list[BaseException] = []

    def run() -> None:
        deadline = time.monotonic() + max_s
        while not stop.is_set() and done[0] < max_rounds and time.monotonic() < deadline:
            try:
                attack()
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)
                return
            done[0] += 1

    thread = threading.Thread(target=run, name="attack", daemon=True)
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive(), "the attack did not stop"
    if errors:
        raise errors[0]
    assert done[0] >= 1, "the attack never ran"


# ---------------------------------------------------------------------- CSRs
def _csr(key: Any, uris: tuple[str, ...], *, subject_units: int = 0) -> bytes:
    names = [x509.NameAttribute(NameOID.COMMON_NAME, "order")]
    names += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"{i:04d}" + "x" * 56)
              for i in range(subject_units)]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    if uris:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def bad_csrs() -> list[tuple[str, bytes, grpc.StatusCode, str, str]]:
    """(what, CSR bytes, status, a part of the message, the refusal's reason label)."""
    key = ec.generate_private_key(ec.SECP256R1())
    me, other = f"spiffe://{TD}/service/order", f"spiffe://{TD}/service/payment"
    bad_sig = bytearray(_csr(key, (me,)))
    bad_sig[-3] ^= 0x01  # inside the signature value
    pem_garbage = (b"-----BEGIN CERTIFICATE REQUEST-----\n"
                   + base64.encodebytes(os.urandom(300))
                   + b"-----END CERTIFICATE REQUEST-----\n")
    inv, denied = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED
    return [
        ("garbage bytes", os.urandom(200), inv, "not a valid PKCS#10 request", "invalid_csr"),
        ("PEM of garbage", pem_garbage, inv, "not a valid PKCS#10 request", "invalid_csr"),
        ("a bad signature", bytes(bad_sig), inv, "CSR signature does not verify",
         "invalid_csr"),
        ("an RSA key", _csr(rsa.generate_private_key(65537, 2048), (me,)), inv,
         "CSR key must be ECDSA P-256", "invalid_csr"),
        ("two SPIFFE URIs, both its own", _csr(key, (me, me)), inv, "names 2 URIs",
         "invalid_csr"),
        ("its own and another identity", _csr(key, (me, other)), denied, other,
         "wrong_identity"),
        ("another identity", _csr(key, (other,)), denied, other, "wrong_identity"),
        ("a huge subject", _csr(key, (me,), subject_units=300), inv,
         "CSR is larger than 16384 bytes", "invalid_csr"),
    ]


def test_malformed_csrs_are_refused_issue_nothing_and_spend_no_token_use(
        mesh: HostileMesh) -> None:
    healthy = Healthy(mesh)
    tok = token(mesh, "order", uses=50)
    tok_id = parse_token(tok).token_id
    renewer = joined(mesh, "order", "order-renewer")
    serials = certificates(mesh)
    before = refusals(mesh)
    cases = bad_csrs()

    def attack() -> None:
        with workload_channel(mesh, renewer) as ch:
            ident = pb_grpc.IdentityStub(ch)
            for what, csr, code, part, _ in cases:
                for rpc, call in (("join", lambda c=csr: raw_join(tok, c)),
                                  ("renew", lambda c=csr: ident.Renew(
                                      pb.RenewRequest(csr=c, instance_id="order-renewer"),
                                      timeout=10))):
                    err = refused(call)
                    assert err.code() == code, (rpc, what, err.code(), err.details())
                    assert part in err.details(), (rpc, what, err.details())
                    assert "\n" not in err.details()

    with running(attack, max_rounds=5) as rounds:
        healthy.push()  # during the attack
    healthy.served()

    issued_meanwhile = certificates(mesh) - serials
    assert len(issued_meanwhile) == 1, issued_meanwhile  # the healthy join's alone
    listed = mesh.admin().ListTokens(pb.ListTokensRequest(), timeout=5).tokens
    assert [t.uses_left for t in listed if t.token_id == tok_id] == [50]
    counted = delta(before, refusals(mesh))
    expected: dict[tuple[str, str], float] = {}
    for *_, reason in cases:
        for rpc in ("join", "renew"):
            expected[(rpc, reason)] = expected.get((rpc, reason), 0) + rounds[0]
    assert counted == expected

    # A request over the join listener's message bound is refused by grpc itself.
    key = ec.generate_private_key(ec.SECP256R1())
    err = refused(lambda: raw_join(tok, _csr(key, (f"spiffe://{TD}/service/order",),
                                             subject_units=1200)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    # A CSR that names no SPIFFE ID is not refused: the CA gives it the token's identity.
    resp, _ = raw_join(tok, _csr(key, ()), instance="order-nouri")
    cert = x509.load_pem_x509_certificate(resp.certificate_pem.encode())
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}/service/order"]


# ---------------------------------------------------------------------- tokens
def test_wrong_expired_used_up_and_foreign_tokens_are_refused_and_counted(
        mesh: HostileMesh) -> None:
    healthy = Healthy(mesh)
    before = refusals(mesh)
    serials = certificates(mesh)
    used = token(mesh, "order", uses=1)
    raw_join(used, Workload().csr("order"), instance="order-once")
    foreign = token(mesh, "payment")
    made = mesh.admin().CreateToken(pb.CreateTokenRequest(service="order", ttl_s=1), timeout=5)
    expiring = made.token
    unauth = grpc.StatusCode.UNAUTHENTICATED
    cases: list[tuple[str, Callable[[], Any], grpc.StatusCode, str]] = [
        ("a random token", lambda: raw_join(used, Workload().csr("order"),
                                            token_id=os.urandom(6).hex()),
         unauth, "unknown join token"),
        ("a huge token id", lambda: raw_join(used, Workload().csr("order"), token_id="a" * 4096),
         unauth, "unknown join token"),
        ("a wrong secret", lambda: raw_join(foreign, Workload().csr("payment"),
                                            secret=os.urandom(32)),
         unauth, "join proof does not match"),
        ("a used-up token", lambda: raw_join(used, Workload().csr("order")),
         unauth, "join token used up"),
        ("another service's token", lambda: raw_join(foreign, Workload().csr("order")),
         grpc.StatusCode.PERMISSION_DENIED, f"spiffe://{TD}/service/order"),
    ]

    def attack() -> None:
        for what, call, code, part in cases:
            err = refused(call)
            assert (err.code(), part in err.details()) == (code, True), (what, err.details())

    with running(attack, max_rounds=10) as rounds:
        healthy.push()
    procs.wait_for(lambda: time.time() > made.expires_at_unix + 1, 10, interval_s=0.1,
                   what="the 1 s token's expiry")
    err = refused(lambda: raw_join(expiring, Workload().csr("order")))
    assert (err.code(), err.details()) == (unauth, "join token expired")
    healthy.served()

    counted = delta(before, refusals(mesh))
    n = rounds[0]
    assert counted == {("join", "token_expired"): 1, ("join", "unknown_token"): 2 * n, ("join", "bad_proof"): n,
                       ("join", "token_used_up"): n, ("join", "wrong_identity"): n}
    assert len(certificates(mesh) - serials) == 2  # order-once's and the healthy join's


def test_a_join_answer_is_authenticated_by_a_mac_of_the_whole_answer(mesh: HostileMesh) -> None:
    tok = token(mesh, "order", uses=1)
    wl = Workload()
    csr = wl.csr("order")
    resp, call = raw_join(tok, csr, instance="order-mac")
    macs = [v for k, v in call.trailing_metadata() if k == ANSWER_MAC_METADATA]
    assert len(macs) == 1 and len(macs[0]) == 32
    secret = parse_token(tok).secret
    fields = (resp.certificate_pem, resp.trust_bundle_pem, resp.spiffe_id, resp.otlp_endpoint)
    assert check_answer_mac(secret, csr, *fields, macs[0])
    # What a man in the middle of the plaintext join would change is caught: a CA added to
    # the bundle (the pin alone would still be found in it), another certificate, another
    # join's CSR, another token's secret.
    rogue = CertificateAuthority.create_root(TD, dt.datetime.now(dt.UTC), "rogue")
    tampered_bundle = resp.trust_bundle_pem + rogue.bundle_pem.decode()
    assert not check_answer_mac(secret, csr, fields[0], tampered_bundle, *fields[2:], macs[0])
    assert not check_answer_mac(secret, csr, "x" + fields[0], *fields[1:], macs[0])
    assert not check_answer_mac(secret, Workload().csr("order"), *fields, macs[0])
    assert not check_answer_mac(os.urandom(32), csr, *fields, macs[0])


# ---------------------------------------------------------------------- discovery streams
class MuteSidecar:
    """A sidecar's discovery stream that registers and reads everything, and never ACKs."""

    def __init__(self, mesh: Mesh, wl: Workload, instance: str) -> None:
        self.versions: list[str] = []
        self.ended: grpc.RpcError | None = None
        self._stop = threading.Event()
        self._channel = workload_channel(mesh, wl)

        def requests() -> Iterator[pb.SidecarMessage]:
            yield pb.SidecarMessage(register=pb.Register(instance_id=instance))
            self._stop.wait(120)

        self._call = pb_grpc.DiscoveryStub(self._channel).Stream(requests())
        self._thread = threading.Thread(target=self._read, daemon=True, name=instance)
        self._thread.start()

    def _read(self) -> None:
        try:
            for msg in self._call:
                if msg.WhichOneof("msg") == "snapshot":
                    self.versions.append(msg.snapshot.version)
        except grpc.RpcError as err:
            self.ended = err

    def close(self) -> None:
        self._stop.set()
        self._call.cancel()
        self._thread.join(timeout=10)
        self._channel.close()


def test_a_sidecar_that_never_acks_is_reported_stale_and_the_others_stay_synced(
        mesh: HostileMesh) -> None:
    healthy = Healthy(mesh)
    mute = MuteSidecar(mesh, joined(mesh, "mute", "mute-1"), "mute-1")
    try:
        procs.wait_for(lambda: mute.versions, 10, what="mute-1's first snapshot")
        versions = [healthy.push() for _ in range(3)]
        procs.wait_for(lambda: mute.versions[-1:] == versions[-1:], 10,
                       what="mute-1 to read the newest version")
        st = procs.wait_for(lambda: (s := mesh.status()["mute-1"]).state == "STALE" and s,
                            STALE_S + 10, what="mute-1 reported STALE")
        assert st.connected and st.sent_version == versions[-1] and not st.acked_version
        assert mesh.status()["echo-1"].state == "SYNCED"
        m = cp_metrics(mesh)
        assert metric(m, "mesh_cp_stale_sidecars") >= 1
        assert metric(m, "mesh_cp_sidecars", state="STALE") >= 1
        healthy.served()
        # It reads its stream, so the bound on not reading never ends it.
        since = time.monotonic()

        def outlived_the_stall_bound() -> bool:
            assert mesh.status()["mute-1"].connected and mute.ended is None, "mute-1 ended"
            return time.monotonic() - since > STALL_S + 1

        procs.wait_for(outlived_the_stall_bound, STALL_S + 10, interval_s=0.2,
                       what="mute-1 still connected past the stall bound")
    finally:
        mute.close()


class DeafSidecar:
    """A raw HTTP/2 client over mTLS that opens a discovery stream with a receive window of
    0 and never opens it (it answers SETTINGS and PING, so keepalive finds it alive): the
    control plane can never write a message to it."""

    def __init__(self, mesh: Mesh, wl: Workload, instance: str) -> None:
        self.frames: list[tuple[int, int, int]] = []
        self._fds = [os.memfd_create("cert"), os.memfd_create("key")]
        os.write(self._fds[0], wl.cert_pem)
        os.write(self._fds[1], wl.key_pem())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cafile=str(mesh.cp.ca_dir / "ca.pem"))
        ctx.load_cert_chain(*(f"/proc/self/fd/{fd}" for fd in self._fds))
        ctx.set_alpn_protocols(["h2"])
        host, port = procs.hostport(mesh.cp.api)
        self.sock = ctx.wrap_socket(socket.create_connection((host, port), timeout=10),
                                    server_hostname="localhost")
        block = hpack.Encoder().encode([
            (":method", "POST"), (":scheme", "https"), (":path", "/mesh.v1.Discovery/Stream"),
            (":authority", "localhost"), ("content-type", "application/grpc"),
            ("te", "trailers")])
        msg = pb.SidecarMessage(register=pb.Register(instance_id=instance)).SerializeToString()
        settings = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, 0)
        self.sock.sendall(PREFACE + frame(FRAME_SETTINGS, 0, 0, settings)
                          + frame(0x1, 0x4, 1, block)
                          + frame(0x0, 0, 1, b"\x00" + struct.pack(">I", len(msg)) + msg))
        self._thread = threading.Thread(target=self._read, daemon=True, name=instance)
        self._thread.start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                n = int.from_bytes(buf[:3], "big")
                ftype, flags = buf[3], buf[4]
                sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                payload, buf = buf[9:9 + n], buf[9 + n:]
                self.frames.append((ftype, flags, sid))
                with contextlib.suppress(OSError):
                    if ftype == FRAME_SETTINGS and not flags & 1:
                        self.sock.sendall(frame(FRAME_SETTINGS, 1, 0))
                    elif ftype == FRAME_PING and not flags & 1:
                        self.sock.sendall(frame(FRAME_PING, 1, 0, payload))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        self._thread.join(timeout=10)
        for fd in self._fds:
            os.close(fd)


def test_a_sidecar_that_never_reads_holds_one_snapshot_then_its_stream_is_ended(
        mesh: HostileMesh) -> None:
    healthy = Healthy(mesh)
    before = metric(cp_metrics(mesh), "mesh_cp_discovery_streams_terminated_total",
                    reason="stalled")
    wl = joined(mesh, "deaf", "deaf-1")
    started = time.monotonic()  # its first message is handed to grpc after this
    deaf = DeafSidecar(mesh, wl, "deaf-1")
    try:
        first = procs.wait_for(lambda: (s := mesh.status().get("deaf-1")) and s.connected
                               and s.sent_version, 10, what="deaf-1 registered")
        seen: set[str] = set()
        for _ in range(3):  # pushes to the others arrive promptly while it holds one
            healthy.push()
            st = mesh.status().get("deaf-1")
            if st is not None and st.connected:
                seen.add(st.sent_version)
        # Only the snapshot it was first handed is in flight: the newer ones are coalesced
        # into the one pending slot, never queued behind it.
        assert seen <= {first}, seen

        def ended() -> bool:
            st = mesh.status().get("deaf-1")
            return st is None or not st.connected

        procs.wait_for(ended, STALL_S + 10, interval_s=0.1, what="deaf-1's stream ended")
        took = time.monotonic() - started
        assert took >= STALL_S, f"ended after {took:.1f} s, before the bound"
        after = metric(cp_metrics(mesh), "mesh_cp_discovery_streams_terminated_total",
                       reason="stalled")
        assert after - before == 1
        assert "deaf instance deaf-1: not reading its discovery stream" in \
            mesh.cp.proc.log_text()
        healthy.served()
    finally:
        deaf.close()


# ---------------------------------------------------------------------- idle connections
def _raise_own_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < needed:
        pytest.skip(f"this process may open {soft} files, the test needs {needed}")


def _closed_by_peer(sock: socket.socket) -> bool:
    """True when the peer has closed ``sock`` (EOF or reset); never blocks."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return False
    except OSError:
        return True


def test_thousands_of_idle_connections_starve_no_one_and_are_closed_after_the_handshake_timeout(
        mesh: HostileMesh) -> None:
    _raise_own_open_files(IDLE_CONNECTIONS + IDLE_TLS_CONNECTIONS + 512)
    healthy = Healthy(mesh)
    assert re.search(r"open files limit", mesh.cp.proc.log_text())
    host, port = procs.hostport(mesh.cp.api)
    wl = joined(mesh, "idler", "idler-1")
    fds = [os.memfd_create("cert"), os.memfd_create("key")]
    os.write(fds[0], wl.cert_pem)
    os.write(fds[1], wl.key_pem())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(mesh.cp.ca_dir / "ca.pem"))
    ctx.load_cert_chain(*(f"/proc/self/fd/{fd}" for fd in fds))
    ctx.set_alpn_protocols(["h2"])
    idle: list[socket.socket] = []
    try:
        opened_at = time.monotonic()
        for _ in range(IDLE_CONNECTIONS):  # TCP only: not even a TLS ClientHello
            s = socket.create_connection((host, port), timeout=5)
            s.setblocking(False)
            idle.append(s)
        for _ in range(IDLE_TLS_CONNECTIONS):  # mTLS done, then nothing (no HTTP/2 preface)
            t = ctx.wrap_socket(socket.create_connection((host, port), timeout=5),
                                server_hostname="localhost")
            t.setblocking(False)
            idle.append(t)

        healthy.served()  # a push ACKed on its stream, and a join, while they are all open
        mesh.admin().ListSidecars(pb.ListSidecarsRequest(), timeout=5)
        if time.monotonic() - opened_at < HANDSHAKE_S - 0.5:
            early = sum(_closed_by_peer(s) for s in idle)
            assert early == 0, f"{early} idle connection(s) closed before the handshake timeout"

        open_ = list(idle)

        def all_closed() -> bool:
            open_[:] = [s for s in open_ if not _closed_by_peer(s)]
            return not open_

        procs.wait_for(all_closed, HANDSHAKE_S + 15, interval_s=0.2,
                       what=f"the server to close {IDLE_CONNECTIONS + IDLE_TLS_CONNECTIONS} "
                            "idle connections")
        assert time.monotonic() - opened_at >= HANDSHAKE_S - 1
        healthy.served()
    finally:
        for s in idle:
            s.close()
        for fd in fds:
            os.close(fd)


# ---------------------------------------------------------------------- garbage applies
def _garbage(rng: random.Random, depth: int = 0) -> Any:
    """A random YAML-ish value (seeded: the same garbage every run)."""
    pick = rng.randrange(9 if depth < 3 else 6)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return rng.randint(-(2**40), 2**40)
    if pick == 3:
        return rng.choice([rng.uniform(-1e9, 1e9), float("nan"), float("inf")])
    if pick in (4, 5):
        return rng.choice(["Route", "TrafficPolicy", "echo", "", "x" * 80, "/a/b", "\n",
                           "spiffe://mesh.local/service/echo", "ALLOW", "(", "é"])
    if pick == 6:
        return [_garbage(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["kind", "name", "spec", "service", "rules", "timeout_ms", "retries", "weight",
            "destinations", "match", "x", "", "Kind"]
    return {rng.choice(keys): _garbage(rng, depth + 1) for _ in range(rng.randrange(5))}


def _documents(bodies: list[str]) -> list[pb.ConfigDocument]:
    return [pb.ConfigDocument(source="garbage.yaml", index=i, json=b)
            for i, b in enumerate(bodies, 1)]


def test_an_apply_of_garbage_is_refused_naming_the_problem_and_the_last_good_config_stays(
        mesh: HostileMesh, tmp_path: Path) -> None:
    healthy = Healthy(mesh)
    good = healthy.push()
    admin = mesh.admin()
    stored = [(o.kind, o.name, o.revision, o.json)
              for o in admin.GetConfig(pb.GetConfigRequest(), timeout=5).objects]
    errors_before = metric(cp_metrics(mesh), "mesh_cp_config_apply_errors_total")
    rng = random.Random(13)
    valid = {"kind": "TrafficPolicy", "name": "probe",
             "spec": {"service": "probe", "timeout_ms": 5}}
    mutations = [
        {**valid, "spec": {**valid["spec"], "timeout_ms": "soon"}},
        {**valid, "spec": {**valid["spec"], "retries": [1, 2]}},
        {**valid, "kind": "Routes"},
        {**valid, "name": "Not A Name\n"},
        {**valid, "extra": {"deep": [None]}},
        {"kind": "Route", "name": "r", "spec": {"service": "probe", "rules": [
            {"destinations": [{"weight": 30}, {"weight": 30}]}]}},
        {"kind": "Route", "name": "r", "spec": {"service": "probe", "rules": [
            {"match": {"headers": {"x": {"regex": "(" * 510 + ")" * 510}}}}]}},
        {"kind": "TrafficPolicy", "name": "p", "spec": {"service": "probe", "retries": {
            "non_idempotent": [None]}}},
    ]
    batches: list[tuple[list[str], str]] = [
        ([json.dumps(_garbage(rng))], "garbage.yaml: document 1")
        for _ in range(12)]
    batches += [([json.dumps(valid), json.dumps(m)], "garbage.yaml: document 2")
                for m in mutations]
    batches += [
        (["\x00\x01 not json {"], "garbage.yaml: document 1: not valid JSON"),
        (["[" * 100_000], "garbage.yaml: document 1: not valid JSON"),
        ([json.dumps({**valid, "pad": "x" * (1024 * 1024)})],
         "garbage.yaml: document 1: larger than 1048576 bytes"),
    ]
    for bodies, named in batches:
        err = refused(lambda b=bodies: admin.ApplyConfig(
            pb.ApplyConfigRequest(documents=_documents(b)), timeout=10), bodies)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (bodies[-1][:200], err.details())
        assert err.details().startswith(named), (bodies[-1][:200], err.details())
        assert "\n" not in err.details() and "Traceback" not in err.details()
    # Over the API's message bound: grpc refuses it before the handler sees it.
    err = refused(lambda: admin.ApplyConfig(pb.ApplyConfigRequest(documents=_documents(
        ["x" * (17 * 1024 * 1024)])), timeout=20))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()

    # Through meshctl: bytes that are not text, text that is not YAML, YAML that is no config.
    raw = tmp_path / "raw.yaml"
    raw.write_bytes(bytes(random.Random(7).randrange(256) for _ in range(4096)) + b"\xff\xfe")
    not_yaml = tmp_path / "not-yaml.yaml"
    not_yaml.write_text("kind: Route\nspec: {service: [echo\n  - : :\n")
    nonsense = tmp_path / "nonsense.yaml"
    nonsense.write_text("kind: Route\nname: r\nspec:\n  service: probe\n  rules: 7\n---\n"
                        "- just\n- a list\n")
    for path, part in ((raw, "not UTF-8 text"), (not_yaml, "invalid YAML"),
                       (nonsense, "document 1 (Route r): spec.rules")):
        r = meshctl(mesh.cp, "apply", "-f", str(path))
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert part in r.stderr and "Traceback" not in r.stderr, r.stderr

    # Nothing changed: the version, the stored objects, what the healthy sidecar runs.
    assert admin.ListSidecars(pb.ListSidecarsRequest(), timeout=5).latest_version == good
    assert [(o.kind, o.name, o.revision, o.json)
            for o in admin.GetConfig(pb.GetConfigRequest(), timeout=5).objects] == stored
    st = mesh.status()["echo-1"]
    assert (st.acked_version, st.state) == (good, "SYNCED")
    refused_applies = metric(cp_metrics(mesh), "mesh_cp_config_apply_errors_total") - errors_before
    assert refused_applies == len(batches) + 1  # meshctl's server-side refusal included
    healthy.served()


def test_the_control_plane_logged_no_crash(mesh: HostileMesh) -> None:
    log = mesh.cp.proc.log_text()
    assert "Traceback" not in log and "Unexpected" not in log, log[-3000:]
    assert mesh.cp.proc.alive
