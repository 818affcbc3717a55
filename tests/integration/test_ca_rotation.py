"""CA rotation without an outage, with real processes: a control plane, echo replicas and a
caller with dynamic sidecars, steady calls the whole time, ``meshctl ca rotate``, replicas
joining in the middle of the rotation (one with a token made before it), ``meshctl ca
status`` followed to DONE; then every sidecar holds a certificate of the new CA, the old CA
is trusted nowhere (a client certificate of the old CA is refused), meshctl still works, a
sidecar joins with a token made after the rotation and one with a token made before it is
refused with the reason. And, in process: the sidecar's TLS state drops a CA from the trust
of new connections at a reload while open connections keep theirs.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from control_plane import ca as CA
from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc
from protos.meshtest import echo_pb2, echo_pb2_grpc
from sidecar.tls import TlsFiles, TlsState
from tests.integration.test_control_plane import ControlPlaneProc, create_token, meshctl, start_cp
from tests.integration.test_discovery import CP_FLAGS, Mesh, round_robin
from tests.integration.test_dynamic_sidecar import sidecar_cmd
from tests.support import h2probe, procs
from tests.support.pki import CA as PkiCA
from tests.support.pki import make_ca
from tests.support.sidecar import REPO_ROOT

pytestmark = pytest.mark.timeout(240)

ROTATION_FLAGS = ("--ca-rotation-min-phase-s", "5", "--ca-rotation-retell-s", "1",
                  "--ca-rotation-phase-timeout-s", "45")
CALL_INTERVAL_S = 0.005      # the steady load: at most ~200 calls/s, in one thread
LOAD_MAX_S = 150.0
LOAD_MAX_CALLS = 30_000


class RotationMesh(Mesh):
    """The discovery tests' mesh, with a control plane whose rotation phases are short, but
    long enough (``ROTATION_FLAGS``) for a sidecar started at the rotation's start to join
    before the old CA leaves the bundle."""

    def _start_cp(self) -> ControlPlaneProc:
        return start_cp(self.base / "ca", self.base / "data",
                        "--listen", f"127.0.0.1:{self.api_port}",
                        "--bootstrap-listen", f"127.0.0.1:{self.boot_port}", *CP_FLAGS,
                        *ROTATION_FLAGS)

    def start_with(self, token: str, service: str, instance: str, **kw: Any) -> procs.Proc:
        """``start`` with this token (not the cached one of the service)."""
        cached = self.tokens.get(service)
        self.tokens[service] = token
        try:
            return self.start(service, instance, **kw)
        finally:
            if cached is not None:
                self.tokens[service] = cached


class SteadyLoad(threading.Thread):
    """Unary calls one after the other, paced by ``CALL_INTERVAL_S``, until stopped,
    ``LOAD_MAX_S`` or ``LOAD_MAX_CALLS``; records every failure and which replica answered."""

    def __init__(self, stub: echo_pb2_grpc.EchoStub) -> None:
        super().__init__(daemon=True, name="steady-load")
        self.stub = stub
        self.ok = 0
        self.failures: list[str] = []
        self.servers: dict[str, int] = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + LOAD_MAX_S
        req = echo_pb2.EchoRequest(payload=b"rotate-the-ca" * 4)
        while not self.stop_event.is_set() and time.monotonic() < deadline \
                and self.ok + len(self.failures) < LOAD_MAX_CALLS:
            try:
                resp = self.stub.Unary(req, timeout=5)
                if resp.payload != req.payload:
                    self.failures.append(f"wrong payload {resp.payload[:20]!r}")
                else:
                    self.ok += 1
                    self.servers[resp.server_id] = self.servers.get(resp.server_id, 0) + 1
            except grpc.RpcError as e:
                self.failures.append(f"{e.code()}: {e.details()}")
            self.stop_event.wait(CALL_INTERVAL_S)

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=20)
        assert not self.is_alive(), "load thread hung"


def ca_status(mesh: Mesh) -> dict[str, Any]:
    """``meshctl ca status -o json`` (a process: it reads the CA dir's credentials each time)."""
    r = meshctl(mesh.cp, "ca", "status", "-o", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def admin_call(cp: ControlPlaneProc, rpc: str, request: Any) -> Any:
    """``Admin.<rpc>`` in process with the CA dir's admin credentials read now (quicker than
    a meshctl process; the rotation rewrites them, so a read that catches a half-written
    pair is tried again)."""
    d = cp.ca_dir
    last: Exception | None = None
    for _ in range(5):
        try:
            creds = grpc.ssl_channel_credentials(
                root_certificates=(d / "ca.pem").read_bytes(),
                private_key=(d / "admin-key.pem").read_bytes(),
                certificate_chain=(d / "admin.pem").read_bytes())
            with grpc.secure_channel(cp.api, creds) as ch:
                return getattr(pb_grpc.AdminStub(ch), rpc)(request, timeout=5)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                raise
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"Admin.{rpc} unreachable with the CA dir's credentials: {last}")


def stats(proc: procs.Proc) -> dict[str, Any]:
    return h2probe.stats(proc)


def fresh_admin(mesh: Mesh) -> None:
    """Forget the mesh's admin channel: its credentials are the old CA's."""
    if mesh._channel is not None:
        mesh._channel.close()
    mesh._channel = None


@pytest.mark.slow  # 9 s; rotation through every phase runs in the default suite under load
def test_rotations_of_an_empty_mesh_with_meshctl(tmp_path: Path) -> None:
    """IDLE with one signing CA; ``ca rotate`` refuses a half-given CA and a non-CA
    certificate with one line, and a second rotation while one runs; a restarted control
    plane continues the rotation; ``ca rotate --ca-cert/--ca-key --wait`` rotates to a given
    CA and follows it to DONE."""
    ca_dir, data_dir = tmp_path / "ca", tmp_path / "data"
    cp = start_cp(ca_dir, data_dir, "--ca-rotation-min-phase-s", "60")  # held in BUNDLE_BOTH
    try:
        r = meshctl(cp, "ca", "status")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("phase IDLE (no CA rotation yet)"), r.stdout
        doc = json.loads(meshctl(cp, "ca", "status", "-o", "json").stdout)
        assert doc["phase"] == "IDLE" and doc["rotation_id"] == "" and doc["sidecars"] == []
        assert [(c["signing"], c["in_bundle"]) for c in doc["cas"]] == [(True, True)]
        (first_sha,) = [c["sha256"] for c in doc["cas"]]
        r = meshctl(cp, "ca", "rotate", "--ca-cert", str(tmp_path / "x.pem"))
        assert r.returncode != 0 and "--ca-cert and --ca-key go together" in r.stderr
        leaf = make_ca(tmp_path / "pki").issue_workload("echo")
        r = meshctl(cp, "ca", "rotate", "--ca-cert", str(leaf.cert), "--ca-key", str(leaf.key))
        assert r.returncode == 1, r.stdout
        assert r.stderr.strip() == "meshctl: error: ca_cert_pem: not a CA certificate (basic " \
                                   "constraints CA and keyCertSign are required)", r.stderr
        assert json.loads(meshctl(cp, "ca", "status", "-o", "json").stdout)["phase"] == "IDLE"

        r = meshctl(cp, "ca", "rotate", "-o", "json")
        assert r.returncode == 0, r.stderr
        started = json.loads(r.stdout)
        assert started["phase"] == "BUNDLE_BOTH", started
        again = meshctl(cp, "ca", "rotate")
        assert again.returncode == 1
        assert again.stderr.strip() == (
            f"meshctl: error: CA rotation {started['rotation_id']} is in phase BUNDLE_BOTH: "
            "wait until it is DONE (meshctl ca status)"), again.stderr
        # A restart in the middle (with shorter phases): the CA dir continues the rotation.
        assert cp.proc.stop() == 0, cp.proc.log_tail()
        cp = start_cp(ca_dir, data_dir, "--ca-rotation-min-phase-s", "1")
        st = admin_call(cp, "GetCAStatus", pb.GetCAStatusRequest())
        assert st.rotation_id == started["rotation_id"] and st.phase != "IDLE", st
        done = procs.wait_for(lambda: (st := admin_call(
            cp, "GetCAStatus", pb.GetCAStatusRequest())).phase == "DONE" and st, 60,
            interval_s=0.2, what="the rotation DONE after the restart")
        (second_sha,) = [c.sha256 for c in done.cas if c.signing]
        assert second_sha != first_sha and done.rotation_id == started["rotation_id"]
        assert {c.sha256: c.in_bundle for c in done.cas} == {second_sha: True, first_sha: False}

        # To a CA of the organisation's, followed to the end.
        org = make_ca(tmp_path / "org", "org-ca", days=30)
        r = meshctl(cp, "ca", "rotate", "--ca-cert", str(org.ca_path), "--ca-key",
                    str(tmp_path / "org" / "org-ca-key.pem"), "--wait", "--timeout", "90s")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].startswith("CA rotation ") and lines[-1] == "phase DONE", lines
        assert set(lines[1:]) <= {"phase REISSUE", "phase DROP_OLD", "phase DONE"}, lines
        doc = json.loads(meshctl(cp, "ca", "status", "-o", "json").stdout)
        (signing,) = [c for c in doc["cas"] if c["signing"]]
        assert signing["sha256"] == CA.cert_sha256(org.cert) and "org-ca" in signing["subject"]
        table = meshctl(cp, "ca", "status")
        assert table.returncode == 0 and "phase DONE" in table.stdout, table
        assert "SIGNING" in table.stdout and "org-ca" in table.stdout, table.stdout
    finally:
        assert cp.proc.stop() == 0, cp.proc.log_tail()
    assert "PRIVATE KEY" not in cp.proc.log_text()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RotationMesh]:
    m = RotationMesh(tmp_path_factory.mktemp("ca-rotation"))
    try:
        m.start("echo", "echo-1")
        m.start("echo", "echo-2")
        m.start("web", "web-1", app=False)
        procs.wait_for(lambda: m.all_synced({"echo-1", "echo-2", "web-1"}), 30,
                       what="every sidecar registered and SYNCED")
        round_robin(m, "echo")
        yield m
    finally:
        m.close()
    for p in m.sidecars.values():
        assert "mesh1." not in p.log_text(), "a token string reached a sidecar's log"
    assert "PRIVATE KEY" not in m.cp.proc.log_text(), "key material reached the log"


def _presented_issuer(proc: procs.Proc, trust: Path) -> bytes:
    """The DER of the certificate a sidecar's inbound presents to a new connection (the
    handshake is verified against ``trust``; no client certificate is needed to see it)."""
    host, port = procs.hostport(proc.ready["inbound"])
    ctx = h2probe.client_context(trust)
    with socket.create_connection((host, port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="echo.mesh.local") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der
    return der


def _ca_from_dir(cert: Path, key: Path, dir: Path, name: str) -> PkiCA:
    """A test PKI CA around a CA certificate and key of the control plane's CA dir."""
    pem = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    k = serialization.load_pem_private_key(key.read_bytes(), password=None)
    dir.mkdir(parents=True, exist_ok=True)
    ca_path = dir / f"{name}.pem"
    ca_path.write_bytes(pem.public_bytes(serialization.Encoding.PEM))
    return PkiCA(dir=dir, name=name, key=k, cert=pem, ca_path=ca_path)  # type: ignore[arg-type]


def test_rotation_under_steady_load_fails_no_call(mesh: RotationMesh) -> None:
    before = ca_status(mesh)
    assert before["phase"] == "IDLE", before
    (old_sha,) = [c["sha256"] for c in before["cas"] if c["signing"]]
    assert {s["instance"] for s in before["sidecars"]} == {"echo-1", "echo-2", "web-1"}
    assert all(s["caught_up"] and s["issuer_sha256"] == old_sha for s in before["sidecars"])
    old_token = mesh.token("echo")  # made before the rotation: it pins the old CA

    ch = grpc.insecure_channel(mesh.sidecars["web-1"].ready["outbound"],
                               options=[("grpc.default_authority", "echo")])
    load = SteadyLoad(echo_pb2_grpc.EchoStub(ch))
    load.start()
    try:
        procs.wait_for(lambda: load.ok >= 20, 15, what="calls flowing before the rotation")
        r = meshctl(mesh.cp, "ca", "rotate")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("CA rotation ") and "phase BUNDLE_BOTH" in r.stdout, r.stdout
        rotation_id = r.stdout.split()[2]

        # Follow it (in process: quick), starting replicas in its first phases: joins and new
        # mTLS connections in the middle of it, one with a token made before it.
        seen: list[str] = []
        joined: dict[str, str] = {}
        deadline = time.monotonic() + 90
        while True:
            st = admin_call(mesh.cp, "GetCAStatus", pb.GetCAStatusRequest())
            assert st.rotation_id == rotation_id
            assert not st.error, st.error
            if not seen or seen[-1] != st.phase:
                seen.append(st.phase)
            if st.phase == "DONE":
                break
            if "echo-3" not in joined:
                joined["echo-3"] = st.phase
                mesh.start_with(old_token, "echo", "echo-3")
            elif st.phase in ("REISSUE", "DROP_OLD") and "echo-4" not in joined:
                joined["echo-4"] = st.phase
                token = admin_call(mesh.cp, "CreateToken", pb.CreateTokenRequest(service="echo"))
                mesh.start_with(token.token, "echo", "echo-4")
            assert time.monotonic() < deadline, f"rotation not DONE in 90 s: {st}"
            time.sleep(0.1)
        order = ["BUNDLE_BOTH", "REISSUE", "DROP_OLD", "DONE"]
        assert seen[0] == "BUNDLE_BOTH" and seen[-1] == "DONE", seen
        assert seen == sorted(seen, key=order.index), seen  # forwards only
        assert set(joined) == {"echo-3", "echo-4"} and "DONE" not in joined.values(), joined
        # The calls go on after DONE, to every replica (the new ones too).
        names = {"echo-1", "echo-2", *joined}
        procs.wait_for(lambda: names <= set(load.servers), 20,
                       what=f"calls answered by every replica {sorted(names)}")
        ok_at_done = load.ok
        procs.wait_for(lambda: load.ok >= ok_at_done + 50, 15, what="calls after DONE")
    finally:
        load.finish()
        ch.close()
    assert load.failures == [], f"{len(load.failures)} failed calls of {load.ok + len(load.failures)}:" \
                                f" {load.failures[:5]}"
    assert load.ok > 200

    # No handshake failed on any side during the whole rotation.
    for name, proc in mesh.sidecars.items():
        tls = stats(proc)["tls"]
        assert tls["handshake_failures"] == 0 and tls["failures_by_reason"] == {}, (name, tls)

    after = ca_status(mesh)
    (new_sha,) = [c["sha256"] for c in after["cas"] if c["signing"]]
    assert new_sha != old_sha
    cas = {c["sha256"]: (c["signing"], c["in_bundle"]) for c in after["cas"]}
    assert cas == {new_sha: (True, True), old_sha: (False, False)}
    everyone = {"echo-1", "echo-2", "echo-3", "echo-4", "web-1"}
    assert {s["instance"] for s in after["sidecars"]} == everyone
    for s in after["sidecars"]:
        assert s["caught_up"] and s["issuer_sha256"] == new_sha, s
        assert s["bundle_sha256"] == after["bundle_sha256"], s
        ident = stats(mesh.sidecars[s["instance"]])["identity"]  # the sidecar's own word
        assert (ident["issuer_sha256"], ident["bundle_sha256"], ident["cert_serial"]) == (
            new_sha, after["bundle_sha256"], s["cert_serial"]), (s, ident)

    # The CA dir: ca.pem is the new CA alone, the old one archived (key 0600).
    ca_dir = mesh.cp.ca_dir
    bundle = x509.load_pem_x509_certificates((ca_dir / "ca.pem").read_bytes())
    assert [CA.cert_sha256(c) for c in bundle] == [new_sha]
    archived_key = ca_dir / "archive" / f"{rotation_id}-ca-key.pem"
    assert archived_key.stat().st_mode & 0o777 == 0o600
    assert (ca_dir / "admin-key.pem").stat().st_mode & 0o777 == 0o600
    assert (ca_dir / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    new_cert = bundle[0]

    # Each replica presents a certificate of the new CA to a new connection.
    for name in ("echo-1", "echo-2", "echo-3", "echo-4"):
        der = _presented_issuer(mesh.sidecars[name], ca_dir / "ca.pem")
        x509.load_der_x509_certificate(der).verify_directly_issued_by(new_cert)

    # A client certificate of the old CA is refused; one of the new CA is served.
    work = ca_dir.parent / "probe-pki"
    old_ca = _ca_from_dir(ca_dir / "archive" / f"{rotation_id}-ca.pem", archived_key,
                          work / "old", "old-ca")
    new_ca = _ca_from_dir(ca_dir / "ca.pem", ca_dir / "ca-key.pem", work / "new", "new-ca")
    target = procs.hostport(mesh.sidecars["echo-1"].ready["inbound"])
    good = h2probe.grpc_attempt(target, h2probe.client_context(
        ca_dir / "ca.pem", new_ca.issue_workload("web")),
        message=echo_pb2.EchoRequest(payload=b"hi").SerializeToString())
    assert good.headers_frames, good.describe()
    bad = h2probe.grpc_attempt(target, h2probe.client_context(
        ca_dir / "ca.pem", old_ca.issue_workload("web")),
        message=echo_pb2.EchoRequest(payload=b"hi").SerializeToString())
    assert not bad.frames, bad.describe()  # not even the server's SETTINGS
    procs.wait_for(lambda: stats(mesh.sidecars["echo-1"])["tls"]["handshake_failures"] >= 1, 5,
                   what="the old CA's certificate counted as a failed handshake")

    # meshctl still works (its admin identity was re-issued by the new CA).
    r = meshctl(mesh.cp, "status", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert {row["instance"] for row in json.loads(r.stdout)} == everyone
    admin = x509.load_pem_x509_certificate((ca_dir / "admin.pem").read_bytes())
    admin.verify_directly_issued_by(new_cert)

    # The rotation is in the audit log.
    r = meshctl(mesh.cp, "audit", "-o", "json")
    if r.returncode == 0:  # (the audit command is another module's; check it when present)
        actions = [e for e in json.loads(r.stdout) if e["action"] == "ca.rotate"]
        assert actions and actions[0]["result"] == "ok", actions


def test_after_the_rotation_new_tokens_join_and_old_ones_are_refused(
        mesh: RotationMesh) -> None:
    assert ca_status(mesh)["phase"] == "DONE"
    fresh_admin(mesh)
    new_token = create_token(mesh.cp, "echo")
    mesh.start_with(new_token, "echo", "echo-5")
    procs.wait_for(lambda: mesh.status()["echo-5"].state == "SYNCED", 20,
                   what="echo-5 (joined after the rotation) SYNCED")
    doc = ca_status(mesh)
    (row,) = [s for s in doc["sidecars"] if s["instance"] == "echo-5"]
    assert row["caught_up"], row
    # It serves: calls reach it through the caller's sidecar.
    ch = grpc.insecure_channel(mesh.sidecars["web-1"].ready["outbound"],
                               options=[("grpc.default_authority", "echo")])
    with ch:
        stub = echo_pb2_grpc.EchoStub(ch)

        def reached() -> bool:
            return any(stub.Unary(echo_pb2.EchoRequest(payload=b"x"), timeout=5).server_id
                       == "echo-5" for _ in range(10))
        procs.wait_for(reached, 20, interval_s=0.2, what="a call answered by echo-5")

    # A token made before the rotation pins the old CA, which no bundle carries any more.
    old_token = mesh.tokens["echo"]
    r = subprocess.run(sidecar_cmd("--service", "echo", "--instance-id", "echo-late",
                                   "--token", old_token, "--max-backoff-s", "0.5"),
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "was the mesh's CA rotated after the token was made" in r.stderr, r.stderr[-2000:]
    assert "mesh1." not in r.stderr


def test_a_restarted_control_plane_continues_after_done(mesh: RotationMesh) -> None:
    """The CA dir now holds the new CA: a restart serves it, the sidecars reconnect with
    their certificates of the new CA, and meshctl works."""
    before = ca_status(mesh)
    fresh_admin(mesh)
    assert mesh.cp.proc.stop() == 0, mesh.cp.proc.log_tail()
    mesh.restart_cp()
    names = set(mesh.sidecars)
    procs.wait_for(lambda: {s["instance"] for s in ca_status(mesh)["sidecars"]} == names, 30,
                   interval_s=0.3, what="every sidecar reconnected after the restart")
    after = ca_status(mesh)
    assert after["phase"] == "DONE" and after["rotation_id"] == before["rotation_id"]
    assert after["bundle_sha256"] == before["bundle_sha256"]
    assert all(s["caught_up"] for s in after["sidecars"]), after["sidecars"]


# ---------------------------------------------------------------------- the sidecar's TLS state
def test_a_reload_drops_a_ca_for_new_connections_and_keeps_open_ones(tmp_path: Path) -> None:
    """TlsState over files: trust old+new, then new only; a client of the old CA is served
    before the reload and refused after, an open connection of it keeps working."""
    old, new = make_ca(tmp_path / "old", "old-ca"), make_ca(tmp_path / "new", "new-ca")
    both = tmp_path / "both.pem"
    both.write_bytes(old.ca_path.read_bytes() + new.ca_path.read_bytes())
    server_cert = new.issue_workload("echo")
    files = TlsFiles(str(server_cert.cert), str(server_cert.key), str(both))
    state = TlsState(files)

    def client(ca: PkiCA) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cafile=str(both))
        cert = ca.issue_workload("web")
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
        return ctx

    async def run() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(100):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=state.server)
        port = server.sockets[0].getsockname()[1]

        async def ping(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bytes:
            reader, writer = conn
            writer.write(b"ping")
            await writer.drain()
            return await asyncio.wait_for(reader.read(100), 5)

        async def fresh(ca: PkiCA) -> bytes:
            conn = await asyncio.open_connection("127.0.0.1", port, ssl=client(ca))
            try:
                return await ping(conn)
            except (ConnectionError, ssl.SSLError):
                return b""
            finally:
                conn[1].close()

        kept = await asyncio.open_connection("127.0.0.1", port, ssl=client(old))
        assert await ping(kept) == b"ping"
        assert await fresh(old) == b"ping" and await fresh(new) == b"ping"
        state.swap(TlsFiles(str(server_cert.cert), str(server_cert.key), str(new.ca_path)))
        assert await fresh(new) == b"ping"
        assert await fresh(old) == b"", "a client of the dropped CA was served after the reload"
        assert await ping(kept) == b"ping", "an open connection lost its TLS state"
        kept[1].close()
        server.close()
        await server.wait_closed()

    asyncio.run(run())
    assert state.reloads == 1
