"""Dynamic sidecars (``mesh-sidecar --service NAME --token ...``) against a real control plane:
they join with a token, carry calls over mTLS with the certificates they got, renew them
under steady traffic without failing a call, refuse bad tokens and a mismatched CA pin with
one clear line, and never write their private key to a file."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from mesh_common.jointoken import parse_token
from protos.meshtest import echo_pb2, echo_pb2_grpc
from tests.integration.test_cert_rotation import Load
from tests.integration.test_control_plane import ControlPlaneProc, create_token, start_cp
from tests.support import procs
from tests.support.sidecar import REPO_ROOT

CERT_TTL_S = 6  # renewal at about 4 s


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProc]:
    base = tmp_path_factory.mktemp("cp-dyn")
    c = start_cp(base / "ca", base / "data", "--cert-ttl", str(CERT_TTL_S))
    yield c
    assert c.proc.stop() == 0, c.proc.log_tail()
    assert "mesh1." not in c.proc.log_text(), "a token string reached the log"


def sidecar_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sidecar.main", "--inbound-port", "0", "--outbound-port", "0",
            "--admin-port", "0", *args]


def start_dynamic(tmp_path: Path, *args: str) -> procs.Proc:
    return procs.start(sidecar_cmd(*args), cwd=REPO_ROOT, log_dir=tmp_path)


def run_failing(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(sidecar_cmd(*args), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=30)


def admin_get(proc: procs.Proc, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://{proc.ready['admin']}{path}", timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def write_yaml(path: Path, doc: dict) -> str:
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_calls_flow_and_certificates_renew_under_traffic(
        cp: ControlPlaneProc, echo_server, tmp_path: Path) -> None:
    srv = echo_server("echo-dyn")
    token_file = tmp_path / "echo.token"
    token_file.write_text(create_token(cp, "echo") + "\n")
    # Upstream connections are aged out every second, so new mTLS handshakes keep happening
    # (with whatever identities both sides hold at that moment) while the load runs.
    echo_cfg = write_yaml(tmp_path / "echo.yaml", {"limits": {"max_connection_age_s": 1}})
    echo_sc = start_dynamic(tmp_path, "--service", "echo", "--app", srv.address,
                            "--token-file", str(token_file), "--config", echo_cfg,
                            "--health-interval-s", "0.5")
    client_cfg = write_yaml(tmp_path / "client.yaml", {
        "outbound": {"listen": "127.0.0.1:0"}, "admin": {"listen": "127.0.0.1:0"},
        "clusters": [{"name": "echo", "endpoints": [{"address": echo_sc.ready["inbound"]}]}]})
    client_sc = start_dynamic(tmp_path, "--service", "client", "--token",
                              create_token(cp, "client"), "--config", client_cfg)
    assert "inbound" not in client_sc.ready  # no --app: outbound-only

    first: dict[str, float] = {}
    for name, sc in (("echo", echo_sc), ("client", client_sc)):
        assert admin_get(sc, "/ready")[0] == 200
        ident = admin_get(sc, "/stats")[1]["identity"]
        assert ident["spiffe_id"] == f"spiffe://mesh.local/service/{name}"
        first[name] = ident["not_after_unix"]

    health = procs.wait_for(
        lambda: (h := admin_get(echo_sc, "/stats")[1]["app_health"])["status"] == "SERVING" and h,
        timeout_s=5, what="the echo app to be seen healthy")
    assert health["method"] == "grpc"

    with grpc.insecure_channel(client_sc.ready["outbound"],
                               options=[("grpc.default_authority", "echo")]) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        assert stub.Unary(echo_pb2.EchoRequest(payload=b"hi"), timeout=5).server_id == "echo-dyn"
        load = Load(stub, max_s=30, max_calls=10**7)
        load.start()
        try:
            # Both renew (at about 4 s) while the calls flow, and calls keep flowing after.
            procs.wait_for(lambda: all(admin_get(sc, "/stats")[1]["identity"]["renewals"] >= 1
                                       for sc in (echo_sc, client_sc)), 20,
                           interval_s=0.2, what="both sidecars renewed under load")
            ok_then = load.ok
            procs.wait_for(lambda: load.ok > ok_then + 50, 10, what="calls after the renewals")
        finally:
            load.finish()
    assert load.failures == [], load.failures[:5]
    assert load.ok > 50

    for name, sc in (("echo", echo_sc), ("client", client_sc)):
        ident = admin_get(sc, "/stats")[1]["identity"]
        assert ident["renewals"] >= 1, (name, ident)
        assert ident["not_after_unix"] > first[name], (name, ident)
        assert ident["last_error"] is None, (name, ident)
    inbound = admin_get(echo_sc, "/stats")[1]["inbound"]
    assert inbound["accepted_connections"] >= 3  # handshakes happened across the renewals

    for sc in (client_sc, echo_sc):
        assert sc.stop() == 0, sc.log_tail()
        assert "mesh1." not in sc.log_text(), "a token string reached the log"
    # No private key of a sidecar exists in any file: only the CA dir's own keys.
    for root in (tmp_path, cp.ca_dir.parent):
        keys = [p for p in root.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
        assert sorted(p.relative_to(root).as_posix() for p in keys) == (
            [] if root == tmp_path else ["ca/admin-key.pem", "ca/ca-key.pem"])


def _refusal(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode not in (0, 2) and r.returncode > 0, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mesh-sidecar: error:"), r.stderr
    return last


@pytest.mark.parametrize("case", ["unknown id", "tampered secret", "other CA pin"])
def test_a_bad_token_or_pin_is_refused_with_one_clear_line(cp: ControlPlaneProc,
                                                            case: str) -> None:
    tok = parse_token(create_token(cp, "echo"))
    bad = {"unknown id": dataclasses.replace(tok, token_id="nosuchtoken1"),
           "tampered secret": dataclasses.replace(tok, secret=bytes(32)),
           "other CA pin": dataclasses.replace(tok, ca_key_sha256="ab" * 32)}[case]
    last = _refusal(run_failing("--service", "echo", "--token", bad.encode()))
    expected = {"unknown id": "UNAUTHENTICATED: unknown join token",
                "tampered secret": "UNAUTHENTICATED: join proof does not match",
                "other CA pin": "the trust bundle's CA key does not match the join token's pin"}
    assert expected[case] in last, last


def test_another_service_than_the_tokens_is_refused(cp: ControlPlaneProc) -> None:
    last = _refusal(run_failing("--service", "payment", "--token", create_token(cp, "echo")))
    assert "PERMISSION_DENIED" in last and "spiffe://mesh.local/service/payment" in last, last


def test_standalone_and_dynamic_flags_mixed_wrongly_are_one_line(
        cp: ControlPlaneProc, tmp_path: Path) -> None:
    token = create_token(cp, "echo")
    with_tls = write_yaml(tmp_path / "tls.yaml", {
        "service": "echo", "tls": {"cert": "c.pem", "key": "k.pem", "ca": "ca.pem"}})
    cases = {
        "tls: not allowed with a join token": ("--service", "echo", "--token", token,
                                               "--config", with_tls),
        "--service NAME is required": ("--token", token),
        "--service only with --token": ("--service", "echo", "--config", with_tls),
        "give --config FILE": (),
        "not a mesh join token": ("--service", "echo", "--token", "garbage"),
    }
    for needle, args in cases.items():
        r = run_failing(*args)
        assert r.returncode == 2, (needle, r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (needle, r.stderr)


def test_an_expired_certificate_shows_on_ready_and_the_sidecar_rejoins(tmp_path: Path) -> None:
    """The control plane goes away long enough for the certificate to expire: /ready says so;
    when it is back (same addresses, same state) the sidecar gets a certificate again."""
    base = tmp_path / "cp"
    listen = (f"127.0.0.1:{procs.free_port()}", f"127.0.0.1:{procs.free_port()}")
    flags = ("--cert-ttl", "5", "--listen", listen[0], "--bootstrap-listen", listen[1])
    cp = start_cp(base / "ca", base / "data", *flags)
    sidecar = None
    try:
        token = create_token(cp, "echo")
        sidecar = start_dynamic(tmp_path, "--service", "echo", "--token", token)
        procs.wait_for(lambda: admin_get(sidecar, "/ready")[0] == 200, 10, what="ready")
        assert cp.proc.stop() == 0
        procs.wait_for(lambda: (lambda r: r[0] == 503 and "expired" in json.dumps(r[1]))(
            admin_get(sidecar, "/ready")), 20, what="/ready answering 503: certificate expired")
        cp = start_cp(base / "ca", base / "data", *flags)
        procs.wait_for(lambda: admin_get(sidecar, "/ready")[0] == 200, 25,
                       what="the sidecar to get a certificate again")
        identity = admin_get(sidecar, "/stats")[1]["identity"]
        assert identity["rejoins"] + identity["renewals"] >= 1 and not identity["expired"], identity
    finally:
        if sidecar is not None:
            sidecar.stop()
        cp.proc.stop()


class _JoinInTheMiddle:
    """A fake for an attacker on the plaintext join path (named as such): a grpc server in a
    thread that relays Join to the real control plane and alters the answer on the way back —
    ``drop_mac`` forwards it without the control plane's MAC, ``extra_ca`` appends the
    attacker's CA to the trust bundle (which still holds the pinned CA key) and keeps the MAC."""

    def __init__(self, upstream: str, mode: str, extra_ca_pem: str) -> None:
        from concurrent import futures

        from protos.mesh.v1 import control_pb2 as pb
        from protos.mesh.v1 import control_pb2_grpc as pb_grpc

        relay = self

        class Bootstrap(pb_grpc.BootstrapServicer):
            def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
                with grpc.insecure_channel(upstream) as ch:
                    resp, call = pb_grpc.BootstrapStub(ch).Join.with_call(request, timeout=10)
                relay.relayed += 1
                if mode == "extra_ca":
                    resp.trust_bundle_pem += extra_ca_pem
                    context.set_trailing_metadata(tuple(call.trailing_metadata() or ()))
                return resp

        self.relayed = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_BootstrapServicer_to_server(Bootstrap(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self) -> None:
        self.server.stop(grace=None)


@pytest.mark.parametrize("mode", ["drop_mac", "extra_ca"])
def test_a_join_answer_altered_on_the_way_is_refused(cp: ControlPlaneProc, tmp_path: Path,
                                                     mode: str) -> None:
    """The join is plaintext, so a man in the middle could hand the sidecar a bundle with his
    own CA beside the pinned one: the sidecar accepts only an answer whose MAC (keyed by the
    token's secret) matches it, and says so in one line."""
    from tests.support.pki import make_ca

    other = make_ca(tmp_path / "attacker-ca", name="attacker-ca")
    mitm = _JoinInTheMiddle(cp.bootstrap, mode, Path(other.ca_path).read_text())
    try:
        tok = parse_token(create_token(cp, "echo"))
        bad = dataclasses.replace(tok, join_address=f"127.0.0.1:{mitm.port}")
        last = _refusal(run_failing("--service", "echo", "--token", bad.encode()))
    finally:
        mitm.close()
    assert mitm.relayed >= 1, "the join never went through the relay"
    reason = "MAC is missing" if mode == "drop_mac" else "MAC does not match"
    assert f"refusing to join via 127.0.0.1:{mitm.port}: the answer's {reason}" in last, last
