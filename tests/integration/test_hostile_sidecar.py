"""Hostile peers against real sidecars: one test per attack, healthy traffic beside each.

Topology (real processes on loopback, real TLS, started once for the module):

    healthy grpcio channel (127.0.0.1) ──h2c──▶ sidecar "client" (outbound, cluster echo)
                                       ──mTLS──▶ sidecar "echo" (inbound) ──h2c──▶ echo app
    healthy raw mTLS connection (127.0.0.1) ───▶ sidecar "echo" (inbound)
    attackers (127.0.0.2, 127.0.0.3, ...)   ───▶ either sidecar's listener

Every test proves three things:

* the refusal itself, read where the attacker sees it: the GOAWAY's error code (or
  RST_STREAM code, gRPC status, a connection closed or refused);
* the sidecar counted it under the contract's name in ``/metrics``
  (``mesh_connections_refused_total``, ``mesh_connections_terminated_total``,
  ``mesh_calls_refused_total``, ``mesh_tls_handshake_failures_total``);
* healthy traffic whose connections were opened before the attack lost nothing: a grpcio
  channel calling at ~50 calls/s through both sidecars for the whole attack (every status
  OK, and calls still succeed after it), and a raw mTLS connection opened before it that
  is still served afterwards.

Attackers connect from 127.0.0.2 (and further addresses for the total-limit flood) so the
per-peer limits apply to them and not to the healthy traffic from 127.0.0.1; after the TLS
handshake they present a valid mesh certificate (service "attacker") issued by the test CA,
so what is refused is their HTTP/2, not their identity. Attackers call
``/meshtest.Echo/ClientStream`` and healthy traffic ``Unary``, so the echo app's per-method
counts show which calls of an attacker reached it.

Timers are shortened through the sidecars' limits (``LIMITS``) to keep the module fast.
"""

from __future__ import annotations

import json
import os
import ssl
import struct
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.meshtest import echo_pb2, echo_pb2_grpc
from tests.support import attack as A
from tests.support import procs
from tests.support.h2probe import PREFACE, client_context, frame
from tests.support.pki import CA, WorkloadCert, make_ca, spiffe_id
from tests.support.sidecar import REPO_ROOT, admin_addr, inbound_addr, outbound_addr, start_sidecar

pytestmark = pytest.mark.timeout(60)

KiB = 1 << 10
LIMITS: dict[str, Any] = {
    "handshake_timeout_s": 1.0,
    "idle_timeout_s": 10.0,  # longer than any test: the healthy raw connection stays open
    "stall_timeout_s": 1.5,
    "max_connections_per_peer": 16,
    "max_connections": 64,
    "max_resets_per_s": 50,
    "max_header_list_bytes": 8 * KiB,
    "max_message_bytes": 256 * KiB,
}
"""Shortened limits of both sidecars. The control-frame and empty-frame budgets keep their
defaults (a grpcio client's BDP PINGs and WINDOW_UPDATEs must stay well under them)."""

ATTACKERS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6")
ATTACKER = ATTACKERS[0]
HEALTHY_RATE_RPS = 50
ATTACK_MESSAGE = echo_pb2.EchoRequest(payload=b"attack").SerializeToString()
HEALTHY_MESSAGE = echo_pb2.EchoRequest(payload=b"healthy-raw").SerializeToString()
Req = echo_pb2.EchoRequest


# ============================================================================ the mesh
@dataclass
class Mesh:
    """The module's processes and the credentials of its clients."""

    pki: CA
    echo: procs.Proc
    echo_control: int
    echo_sc: procs.Proc
    client_sc: procs.Proc
    attacker_cert: WorkloadCert
    healthy_cert: WorkloadCert

    @property
    def inbound(self) -> tuple[str, int]:
        """The echo sidecar's inbound (mTLS) listener."""
        return inbound_addr(self.echo_sc)

    @property
    def outbound(self) -> tuple[str, int]:
        """The client sidecar's outbound (h2c) listener."""
        return outbound_addr(self.client_sc)

    def attacker_ctx(self) -> ssl.SSLContext:
        """TLS client context presenting the attacker's valid mesh certificate."""
        return client_context(self.pki.ca_path, self.attacker_cert)

    def healthy_ctx(self) -> ssl.SSLContext:
        return client_context(self.pki.ca_path, self.healthy_cert)

    def app_calls(self, method: str) -> int:
        """Echo calls of ``method`` the echo app received since it started."""
        url = f"http://127.0.0.1:{self.echo_control}/counts"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(json.load(resp)["calls"].get(method, 0))

    def logs(self) -> str:
        return (f"\n--- client sidecar ---\n{self.client_sc.log_tail(15)}"
                f"\n--- echo sidecar ---\n{self.echo_sc.log_tail(15)}")


@pytest.fixture(scope="module")
def mesh(pki: CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("hostile")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    started: list[procs.Proc] = []
    try:
        echo = procs.start([sys.executable, "-m", "tests.support.echo_server", "--port", "0",
                            "--server-id", "echo-hostile", "--control"],
                           env=env, cwd=REPO_ROOT, log_dir=tmp, ready_timeout_s=20)
        started.append(echo)
        echo_sc = start_sidecar(tmp, service="echo", tls=pki.issue_workload("echo"),
                                app_port=int(echo.ready["port"]), limits=LIMITS)
        started.append(echo_sc)
        host, port = inbound_addr(echo_sc)
        client_sc = start_sidecar(tmp, service="client", tls=pki.issue_workload("client"),
                                  clusters={"echo": [(f"{host}:{port}", spiffe_id("echo"))]},
                                  limits=LIMITS)
        started.append(client_sc)
        yield Mesh(pki, echo, int(echo.ready["control"]), echo_sc, client_sc,
                   attacker_cert=pki.issue_workload("attacker"),
                   healthy_cert=pki.issue_workload("healthy"))
    finally:
        for p in reversed(started):
            p.stop(timeout_s=5)


# ============================================================================ counters
def _scrape(proc: procs.Proc) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    host, port = admin_addr(proc)
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _sum(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
         labels: dict[str, str]) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


class Counters:
    """``/metrics`` of one sidecar at creation; ``delta`` is how much a counter (summed over
    the samples carrying at least ``labels``) grew since."""

    def __init__(self, proc: procs.Proc) -> None:
        self.proc = proc
        self.base = _scrape(proc)

    def delta(self, name: str, **labels: str) -> float:
        return _sum(_scrape(self.proc), name, labels) - _sum(self.base, name, labels)

    def wait(self, name: str, at_least: float = 1, timeout_s: float = 5, **labels: str) -> float:
        """Wait until ``delta(name, **labels) >= at_least``; returns the delta."""
        value = procs.wait_for(
            lambda: (d := self.delta(name, **labels)) >= at_least and (d, ),
            timeout_s, what=f"{name}{labels} to grow by {at_least} on {self.proc.cmd[-1]}")
        return value[0]


REFUSED = "mesh_connections_refused_total"
TERMINATED = "mesh_connections_terminated_total"
CALLS_REFUSED = "mesh_calls_refused_total"
TLS_FAILURES = "mesh_tls_handshake_failures_total"


# ============================================================================ healthy traffic
class Healthy:
    """Healthy traffic opened before an attack and checked after it.

    * A grpcio channel from 127.0.0.1 to the client sidecar's outbound port; once one call
      succeeded (its connections exist), a thread makes unary echo calls at about
      ``HEALTHY_RATE_RPS``, bounded by count and time, recording every status.
    * A raw mTLS HTTP/2 connection from 127.0.0.1 to the echo sidecar's inbound port, its
      preface exchanged before the attack.
    """

    MAX_CALLS = 3000
    MAX_S = 50.0

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        host, port = mesh.outbound
        self.channel = grpc.insecure_channel(f"{host}:{port}",
                                             options=[("grpc.default_authority", "echo")])
        self.stub = echo_pb2_grpc.EchoStub(self.channel)
        procs.wait_for(lambda: self.stub.Unary(Req(payload=b"warm"), timeout=5).payload == b"warm",
                       15, what="a first healthy call through both sidecars")
        self.raw = A.RawH2.connect(mesh.inbound, ctx=mesh.healthy_ctx(), source="127.0.0.1")
        assert self.raw.settings_received(), self.raw.describe()
        self.statuses: list[grpc.StatusCode] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="healthy")
        self._thread.start()
        self.checked = False

    def _run(self) -> None:
        interval_s = 1 / HEALTHY_RATE_RPS
        start = time.monotonic()
        n = 0
        while (not self._stop.is_set() and n < self.MAX_CALLS
               and time.monotonic() - start < self.MAX_S):
            payload = f"healthy-{n}".encode()
            try:
                resp = self.stub.Unary(Req(payload=payload), timeout=5)
                code = grpc.StatusCode.OK
                if resp.payload != payload:
                    code = grpc.StatusCode.DATA_LOSS
                    self.errors.append(f"call {n}: wrong payload {resp.payload[:40]!r}")
            except grpc.RpcError as exc:
                code = exc.code()
                self.errors.append(f"call {n}: {code} {exc.details()}")
            with self._lock:
                self.statuses.append(code)
            n += 1
            self._stop.wait(max(0.0, start + n * interval_s - time.monotonic()))  # pacing

    def count(self) -> int:
        with self._lock:
            return len(self.statuses)

    def assert_unharmed(self, *, min_calls: int = 5, after: int = 3,
                        raw_call: bool = True) -> None:
        """After the attack: ``after`` more calls complete, then the traffic stops; every
        call was OK and at least ``min_calls`` ran; the raw connection opened before the
        attack still serves a new call (``raw_call``)."""
        mark = self.count()
        procs.wait_for(lambda: self.count() >= max(min_calls, mark + after)
                       or not self._thread.is_alive(), 15,
                       what="healthy calls to go on after the attack")
        self.stop()
        codes = Counter(self.statuses)
        assert set(codes) == {grpc.StatusCode.OK}, (
            f"healthy calls failed beside the attack: {dict(codes)}; first errors: "
            f"{self.errors[:5]}{self.mesh.logs()}")
        assert len(self.statuses) >= min_calls, f"only {len(self.statuses)} healthy calls ran"
        if raw_call:
            self.assert_raw_served()
        self.checked = True

    def assert_raw_served(self) -> None:
        """The raw connection opened before the attack is still served: a new call on it
        gets grpc-status 0."""
        sid = self.raw.send_call(HEALTHY_MESSAGE)
        status = self.raw.grpc_status(sid, timeout_s=10)
        assert status == (0, ""), (
            f"the healthy raw connection (opened before the attack) was not served: "
            f"{status} {self.raw.describe()}{self.mesh.logs()}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def close(self) -> None:
        self.stop()
        self.raw.close()
        self.channel.close()


@pytest.fixture
def healthy(mesh: Mesh, request: pytest.FixtureRequest) -> Iterator[Healthy]:
    """Healthy traffic started (connections open, calls flowing) before the test's attack;
    the test must call ``healthy.assert_unharmed()`` after it (a test that passed without
    doing so errors at teardown)."""
    failed_before = request.session.testsfailed
    h = Healthy(mesh)
    try:
        yield h
    finally:
        h.close()
    if request.session.testsfailed == failed_before:
        assert h.checked, "the test never checked its healthy traffic (assert_unharmed)"


# ============================================================================ helpers
def attacker(mesh: Mesh, *, settings: dict[int, int] | None = None) -> A.RawH2:
    """A raw HTTP/2 connection to the echo sidecar's inbound from ``ATTACKER`` with a valid
    mesh certificate, preface sent and the server's SETTINGS received."""
    conn = A.RawH2.connect(mesh.inbound, ctx=mesh.attacker_ctx(), source=ATTACKER,
                           settings=settings, auto=False)
    assert conn.settings_received(), f"the attacker's connection was not served: {conn.describe()}"
    return conn


def assert_goaway(conn: A.RawH2, code: int, what: str, timeout_s: float = 5) -> A.GoAway:
    """The connection got GOAWAY with ``code`` and was then closed."""
    g = conn.goaway(timeout_s)
    assert g is not None, f"no GOAWAY after {what}: {conn.describe()}"
    assert g.code == code, f"{what}: GOAWAY code {g.code:#x} ({g.debug!r}), expected {code:#x}"
    assert conn.wait_closed(timeout_s), f"{what}: connection still open after GOAWAY"
    return g


def open_stream(conn: A.RawH2, path: str = A.ECHO_CLIENT_STREAM) -> int:
    """Open a request stream (HEADERS, no END_STREAM); returns its id."""
    sid = conn.new_stream_id()
    conn.send(frame(A.HEADERS, A.END_HEADERS, sid, A.request_block(path)))
    return sid


def ping(i: int) -> bytes:
    return frame(A.PING, 0, 0, struct.pack(">Q", i))


# ============================================================================ 1. before HTTP/2
def test_random_bytes_on_the_tls_port_are_refused_in_the_handshake(mesh: Mesh, healthy: Healthy):
    c = Counters(mesh.echo_sc)
    junk = bytes((i * 167 + 13) & 0xFF for i in range(4096))  # no TLS record type at byte 0
    with A.tcp_connect(mesh.inbound, ATTACKER) as sock:
        conn = A.RawH2(sock, auto=False)
        conn.send(junk)
        assert conn.wait_closed(5), f"random bytes did not get the connection closed: {conn.describe()}"
        assert not any(f.type == A.SETTINGS for f in conn.frames), conn.describe()
    c.wait(TLS_FAILURES, reason="WRONG_VERSION_NUMBER")  # OpenSSL's reason: not a TLS record
    healthy.assert_unharmed()


def test_plaintext_http2_on_the_tls_port_is_never_served(mesh: Mesh, healthy: Healthy):
    c = Counters(mesh.echo_sc)
    app_before = mesh.app_calls("ClientStream")
    with A.tcp_connect(mesh.inbound, ATTACKER) as sock:
        conn = A.RawH2(sock, auto=False)
        conn.send(PREFACE + frame(A.SETTINGS, 0, 0)
                  + frame(A.HEADERS, A.END_HEADERS, 1,
                          A.request_block(A.ECHO_CLIENT_STREAM, scheme="http"))
                  + frame(A.DATA, A.END_STREAM, 1, A.grpc_message(ATTACK_MESSAGE)))
        assert conn.wait_closed(5), f"plaintext HTTP/2 was not closed: {conn.describe()}"
    assert not any(f.type in (A.SETTINGS, A.HEADERS) for f in conn.frames), \
        f"the TLS port answered plaintext HTTP/2: {conn.describe()}"
    c.wait(TLS_FAILURES, reason="WRONG_VERSION_NUMBER")
    assert mesh.app_calls("ClientStream") == app_before
    healthy.assert_unharmed()


def _bad_identity(kind: str, mesh: Mesh, tmp_path: Path) -> WorkloadCert | None:
    if kind == "no_client_cert":
        return None
    if kind == "other_ca":
        return make_ca(tmp_path / "other-ca", name="other-ca").issue_workload("attacker")
    if kind == "expired":
        return mesh.pki.issue_expired("attacker")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,reason", [
    ("no_client_cert", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
    ("other_ca", "CERTIFICATE_VERIFY_FAILED"),
    ("expired", "certificate_expired"),
])
def test_tls_client_without_a_valid_mesh_certificate_is_refused(
        kind: str, reason: str, mesh: Mesh, healthy: Healthy, tmp_path: Path):
    c = Counters(mesh.echo_sc)
    app_before = mesh.app_calls("ClientStream")
    ctx = client_context(mesh.pki.ca_path, _bad_identity(kind, mesh, tmp_path))
    try:
        conn = A.RawH2.connect(mesh.inbound, ctx=ctx, source=ATTACKER, auto=False)
    except (OSError, ssl.SSLError):
        pass  # refused in the handshake (TLS 1.2, or the alert came in time)
    else:  # TLS 1.3: the client's side may finish before the server's verdict arrives
        with conn:
            sid = conn.send_call(ATTACK_MESSAGE, path=A.ECHO_CLIENT_STREAM)
            conn.wait_closed(5)
            assert not conn.frames_on(sid), conn.describe()
            assert not any(f.type == A.SETTINGS for f in conn.frames), \
                f"a peer without a valid mesh certificate was served HTTP/2: {conn.describe()}"
    c.wait(TLS_FAILURES, reason=reason)
    assert mesh.app_calls("ClientStream") == app_before
    healthy.assert_unharmed()


# A revoked certificate needs a control plane (a static sidecar has no deny-list): it is
# tested with one in test_audit_and_revocation.py
# (test_a_revoked_instance_can_open_no_new_connection).


# ============================================================================ 2. malformed HTTP/2
def _oversized_frame(conn: A.RawH2) -> bytes:
    too_big = LIMITS.get("max_frame_bytes", 64 * KiB) + 1
    return struct.pack(">I", too_big)[1:] + bytes([A.DATA, 0]) + struct.pack(">I", 1) + b"\0" * 64


def _rst_of_3_bytes(conn: A.RawH2) -> bytes:
    sid = open_stream(conn)
    return frame(A.RST_STREAM, 0, sid, b"\0\0\x08")


MALFORMED: dict[str, tuple[Any, int, str]] = {
    # name: (bytes to send after the handshake, GOAWAY code, terminated reason)
    "frame_over_max_frame_size": (_oversized_frame, A.FRAME_SIZE_ERROR, "frame_size"),
    "ping_of_7_bytes": (lambda c: frame(A.PING, 0, 0, b"1234567"), A.FRAME_SIZE_ERROR, "frame_size"),
    "rst_stream_of_3_bytes": (_rst_of_3_bytes, A.FRAME_SIZE_ERROR, "frame_size"),
    "window_update_of_3_bytes": (lambda c: frame(A.WINDOW_UPDATE, 0, 0, b"\0\0\x01"),
                                 A.FRAME_SIZE_ERROR, "frame_size"),
    "settings_of_5_bytes": (lambda c: frame(A.SETTINGS, 0, 0, b"\0\x04\0\0\0"),
                            A.FRAME_SIZE_ERROR, "frame_size"),
    "data_on_stream_0": (lambda c: frame(A.DATA, 0, 0, b"x"), A.PROTOCOL_ERROR, "protocol_error"),
    "headers_on_stream_0": (lambda c: frame(A.HEADERS, A.END_HEADERS, 0, A.request_block()),
                            A.PROTOCOL_ERROR, "protocol_error"),
    "rst_stream_on_stream_0": (lambda c: frame(A.RST_STREAM, 0, 0, b"\0\0\0\x08"),
                               A.PROTOCOL_ERROR, "protocol_error"),
    "even_stream_id": (lambda c: frame(A.HEADERS, A.END_HEADERS, 2,
                                       A.request_block(A.ECHO_CLIENT_STREAM)),
                       A.PROTOCOL_ERROR, "protocol_error"),
    "hpack_index_zero": (lambda c: frame(A.HEADERS, A.END_HEADERS | A.END_STREAM, 1, b"\x80"),
                         A.COMPRESSION_ERROR, "bad_hpack"),
    "hpack_unknown_dynamic_index": (lambda c: frame(A.HEADERS, A.END_HEADERS | A.END_STREAM, 1,
                                                    b"\xbe"),
                                    A.COMPRESSION_ERROR, "bad_hpack"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_http2_ends_the_attackers_connection_only(name: str, mesh: Mesh,
                                                            healthy: Healthy):
    build, code, reason = MALFORMED[name]
    c = Counters(mesh.echo_sc)
    app_before = mesh.app_calls("ClientStream")
    with attacker(mesh) as conn:
        conn.send(build(conn))
        assert_goaway(conn, code, name)
    c.wait(TERMINATED, listener="inbound", reason=reason)
    # Only a well-formed request may have reached the app (the RST case opens one first).
    allowed = 1 if name == "rst_stream_of_3_bytes" else 0
    assert mesh.app_calls("ClientStream") - app_before <= allowed, \
        "a malformed request reached the app"
    healthy.assert_unharmed()


def test_reused_lower_stream_id_never_reaches_the_app(mesh: Mesh, healthy: Healthy):
    """A client's new stream id must exceed every id it used (RFC 9113 §5.1.1): HEADERS on a
    lower, never-used id (1 after 3) and on a finished one (3 again) open no call. The sidecar
    answers either with a connection error (GOAWAY PROTOCOL_ERROR / STREAM_CLOSED) or by
    ignoring them; either way the app sees only the legitimate call."""
    app_before = mesh.app_calls("ClientStream")
    with attacker(mesh) as conn:
        ok = conn.send_call(ATTACK_MESSAGE, path=A.ECHO_CLIENT_STREAM, stream_id=3)
        assert conn.grpc_status(ok) == (0, ""), conn.describe()
        for reused in (1, 3):
            conn.send(frame(A.HEADERS, A.END_HEADERS, reused, A.request_block(A.ECHO_CLIENT_STREAM))
                      + frame(A.DATA, A.END_STREAM, reused, A.grpc_message(ATTACK_MESSAGE)))
        g = conn.goaway(timeout_s=1.0)
        if g is not None:
            assert g.code in (A.PROTOCOL_ERROR, A.STREAM_CLOSED), g
            assert g.last_stream_id == 3, g
        else:  # ignored: the connection goes on serving new ids
            nxt = conn.send_call(ATTACK_MESSAGE, path=A.ECHO_CLIENT_STREAM, stream_id=5)
            assert conn.grpc_status(nxt) == (0, ""), conn.describe()
        assert not conn.frames_on(1, A.HEADERS), conn.describe()
        assert len(conn.frames_on(3, A.HEADERS)) == 2, conn.describe()  # the first call's only
    expected = 1 if g is not None else 2
    procs.wait_for(lambda: mesh.app_calls("ClientStream") - app_before >= expected, 5,
                   what="the legitimate calls at the app")
    assert mesh.app_calls("ClientStream") - app_before == expected
    healthy.assert_unharmed()


def test_header_list_over_the_limit_refuses_that_stream_only(mesh: Mesh, healthy: Healthy):
    c = Counters(mesh.echo_sc)
    app_before = mesh.app_calls("ClientStream")
    big = A.request_block(A.ECHO_CLIENT_STREAM,
                          extra=[("x-big", "a" * (LIMITS["max_header_list_bytes"] + 2 * KiB))])
    with attacker(mesh) as conn:
        refused = conn.new_stream_id()
        conn.send(frame(A.HEADERS, A.END_HEADERS | A.END_STREAM, refused, big))
        status = conn.grpc_status(refused)
        assert status is not None and status[0] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], \
            (status, conn.describe())
        # the connection lives: the next call on it is served
        sid = conn.send_call(ATTACK_MESSAGE, path=A.ECHO_CLIENT_STREAM)
        assert conn.grpc_status(sid) == (0, ""), conn.describe()
        assert not any(f.type == A.GOAWAY for f in conn.frames), conn.describe()
    c.wait(CALLS_REFUSED, listener="inbound", reason="header_list_too_large")
    assert mesh.app_calls("ClientStream") - app_before == 1  # only the second call
    healthy.assert_unharmed()


# ============================================================================ 3. floods
def test_rapid_reset_gets_goaway_enhance_your_calm(mesh: Mesh, healthy: Healthy):
    """CVE-2023-44487: HEADERS then RST_STREAM at once, far over max_resets_per_s."""
    c = Counters(mesh.echo_sc)
    n = 4 * LIMITS["max_resets_per_s"]
    with attacker(mesh) as conn:
        block = A.request_block(A.ECHO_CLIENT_STREAM)
        flood = b"".join(frame(A.HEADERS, A.END_HEADERS, sid, block)
                         + frame(A.RST_STREAM, 0, sid, struct.pack(">L", A.CANCEL))
                         for sid in range(1, 2 * n, 2))
        conn.send(flood)
        assert_goaway(conn, A.ENHANCE_YOUR_CALM, "rapid reset")
    c.wait(TERMINATED, listener="inbound", reason="rapid_reset")
    healthy.assert_unharmed()


def test_continuation_without_end_headers_gets_goaway(mesh: Mesh, healthy: Healthy):
    c = Counters(mesh.echo_sc)
    block = A.request_block(A.ECHO_CLIENT_STREAM)
    with attacker(mesh) as conn:
        conn.send(frame(A.HEADERS, 0, 1, block[:4])
                  + b"".join(frame(A.CONTINUATION, 0, 1, b"\x00") for _ in range(500)))
        assert_goaway(conn, A.ENHANCE_YOUR_CALM, "a CONTINUATION flood")
    c.wait(TERMINATED, listener="inbound", reason="continuation_flood")
    healthy.assert_unharmed()


FLOODS: dict[str, tuple[Any, str]] = {
    # name: (flood bytes for a connection, terminated reason); each is ~5x its budget
    "ping": (lambda conn: b"".join(ping(i) for i in range(1000)), "control_flood"),
    "settings": (lambda conn: frame(A.SETTINGS, 0, 0) * 1000, "control_flood"),
    "window_update": (lambda conn: frame(A.WINDOW_UPDATE, 0, 0, struct.pack(">L", 1)) * 1000,
                      "control_flood"),
    "empty_data": (lambda conn: frame(A.DATA, 0, open_stream(conn)) * 500, "empty_frame_flood"),
}


@pytest.mark.parametrize("name", list(FLOODS))
def test_control_and_empty_frame_floods_get_goaway(name: str, mesh: Mesh, healthy: Healthy):
    build, reason = FLOODS[name]
    c = Counters(mesh.echo_sc)
    with attacker(mesh) as conn:
        conn.send(build(conn))
        assert_goaway(conn, A.ENHANCE_YOUR_CALM, f"a {name} flood")
    c.wait(TERMINATED, listener="inbound", reason=reason)
    healthy.assert_unharmed()


def test_zero_window_stall_is_closed_after_stall_timeout(mesh: Mesh, healthy: Healthy):
    """A peer that asks for a large response and never opens its window (initial window 0)
    holds our buffers: the connection is closed after stall_timeout_s and counted."""
    c = Counters(mesh.echo_sc)
    request = Req(payload=b"x", response_bytes=200 * KiB).SerializeToString()
    with attacker(mesh, settings={A.SETTINGS_INITIAL_WINDOW_SIZE: 0}) as conn:
        start = time.monotonic()
        sid = conn.send_call(request)
        assert conn.read_until(lambda f: f.type == A.HEADERS and f.stream_id == sid, 5), \
            f"no response headers: {conn.describe()}"
        g = assert_goaway(conn, A.ENHANCE_YOUR_CALM, "a zero-window stall",
                          timeout_s=LIMITS["stall_timeout_s"] + 5)
        elapsed = time.monotonic() - start
        assert not conn.frames_on(sid, A.DATA), "DATA was sent into a zero window"
        assert elapsed >= LIMITS["stall_timeout_s"] * 0.8, (elapsed, g)
    c.wait(TERMINATED, listener="inbound", reason="stall")
    healthy.assert_unharmed()


# ============================================================================ 4. messages
@pytest.mark.parametrize("direction", ["request", "response"])
def test_oversized_message_fails_that_call_only(direction: str, mesh: Mesh, healthy: Healthy):
    """A message over max_message_bytes gets RESOURCE_EXHAUSTED; the same channel's other
    calls (the healthy traffic, on this very channel) succeed."""
    cs, es = Counters(mesh.client_sc), Counters(mesh.echo_sc)
    over = LIMITS["max_message_bytes"] + 1
    req = (Req(payload=b"x" * over) if direction == "request"
           else Req(payload=b"x", response_bytes=over))
    with pytest.raises(grpc.RpcError) as err:
        healthy.stub.Unary(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
    assert "exceeds the limit" in (err.value.details() or ""), err.value.details()
    procs.wait_for(lambda: cs.delta(CALLS_REFUSED, reason="message_too_large")
                   + es.delta(CALLS_REFUSED, reason="message_too_large") >= 1, 5,
                   what="mesh_calls_refused_total{reason=message_too_large}")
    assert (cs.delta(CALLS_REFUSED, reason="message_too_large")
            + es.delta(CALLS_REFUSED, reason="message_too_large")) == 1
    assert healthy.stub.Unary(Req(payload=b"after"), timeout=5).payload == b"after"
    healthy.assert_unharmed()


# ============================================================================ 5. slow and many
SLOWLORIS_CONNS = 4


@pytest.mark.parametrize("where", ["inbound_client_hello", "inbound_preface", "outbound_preface"])
def test_slowloris_is_closed_by_the_handshake_timeout(where: str, mesh: Mesh, healthy: Healthy):
    """Connections that send one byte a second before their preface is complete (a TLS
    ClientHello, or the HTTP/2 preface after a valid handshake, or on the h2c outbound
    port) are closed after handshake_timeout_s and counted."""
    listener = "outbound" if where.startswith("outbound") else "inbound"
    proc = mesh.client_sc if listener == "outbound" else mesh.echo_sc
    addr = mesh.outbound if listener == "outbound" else mesh.inbound
    c = Counters(proc)
    socks = []
    try:
        for _ in range(SLOWLORIS_CONNS):
            if where == "inbound_preface":
                socks.append(mesh.attacker_ctx().wrap_socket(A.tcp_connect(addr, ATTACKER),
                                                             server_hostname="echo.mesh.local"))
            else:
                socks.append(A.tcp_connect(addr, ATTACKER))
        data = A.client_hello(mesh.attacker_ctx()) if where == "inbound_client_hello" else PREFACE
        results = A.trickle(socks, data, interval_s=1.0, max_s=5.0)
    finally:
        for s in socks:
            s.close()
    limit = LIMITS["handshake_timeout_s"]
    for r in results:
        assert r.closed_after_s is not None, f"a slowloris connection was still open after 5 s: {r}"
        assert r.closed_after_s <= limit + 2.5, r
        assert r.bytes_sent < len(data), r
    c.wait(REFUSED, SLOWLORIS_CONNS, listener=listener, reason="handshake_timeout")
    healthy.assert_unharmed()


@pytest.mark.parametrize("listener", ["inbound", "outbound"])
def test_connection_flood_from_one_peer_is_refused_by_its_per_peer_limit(
        listener: str, mesh: Mesh, healthy: Healthy):
    """More than max_connections_per_peer connections from 127.0.0.2: the excess is closed
    at once and counted; a new connection from 127.0.0.1 is still accepted and served."""
    proc = mesh.echo_sc if listener == "inbound" else mesh.client_sc
    addr = mesh.inbound if listener == "inbound" else mesh.outbound
    ctx_of = mesh.attacker_ctx if listener == "inbound" else (lambda: None)
    per_peer = LIMITS["max_connections_per_peer"]
    c = Counters(proc)
    accepted: list[A.RawH2] = []
    refused: list[tuple[str, float]] = []
    try:
        for _ in range(per_peer + 8):
            t0 = time.monotonic()
            a = A.open_attempt(addr, ctx=ctx_of(), source=ATTACKER, timeout_s=5)
            if a.conn is not None:
                accepted.append(a.conn)
            else:
                refused.append((a.refused, time.monotonic() - t0))
        assert len(accepted) <= per_peer, f"{len(accepted)} connections from one peer accepted"
        assert len(refused) >= 8, refused
        slow = [r for r in refused if r[1] >= LIMITS["handshake_timeout_s"]]
        assert not slow, f"refusals were not at once: {slow}"
        # Another peer is not affected: a new connection from 127.0.0.1 is served.
        if listener == "inbound":
            with A.RawH2.connect(addr, ctx=mesh.healthy_ctx(), source="127.0.0.1") as other:
                sid = other.send_call(HEALTHY_MESSAGE)
                assert other.grpc_status(sid) == (0, ""), other.describe()
        else:
            with A.RawH2.connect(addr, ctx=None, source="127.0.0.1") as other:
                sid = other.send_call(echo_pb2.EchoRequest(payload=b"o").SerializeToString(),
                                      scheme="http")
                assert other.grpc_status(sid) == (0, ""), other.describe()
    finally:
        for conn in accepted:
            conn.close()
    got = c.wait(REFUSED, len(refused), listener=listener, reason="max_connections_per_peer")
    assert got == len(refused), f"counted {got}, the attacker saw {len(refused)} refused"
    healthy.assert_unharmed()


def test_connection_flood_from_several_peers_hits_the_total_limit(mesh: Mesh, healthy: Healthy):
    """Floods from five addresses, each under its per-peer limit, together over
    max_connections: the excess is refused and counted ``max_connections``; connections
    opened before (the healthy traffic's) stay served, and once the flood is gone new
    connections are accepted again."""
    per_addr = LIMITS["max_connections_per_peer"] - 1
    total = LIMITS["max_connections"]
    c = Counters(mesh.echo_sc)
    accepted: list[A.RawH2] = []
    refused: list[str] = []
    try:
        for _ in range(per_addr):
            for source in ATTACKERS:
                a = A.open_attempt(mesh.inbound, ctx=mesh.attacker_ctx(), source=source,
                                   timeout_s=5)
                if a.conn is not None:
                    accepted.append(a.conn)
                else:
                    refused.append(a.refused)
        attempts = per_addr * len(ATTACKERS)
        # The healthy traffic holds at least two (its channel's upstream, the raw one).
        assert len(accepted) <= total - 2, len(accepted)
        assert len(refused) >= attempts - (total - 2), (len(refused), refused[:3])
        # The healthy connections opened before are still served while the flood holds.
        healthy.assert_raw_served()
        assert healthy.stub.Unary(Req(payload=b"during"), timeout=5).payload == b"during"
    finally:
        for conn in accepted:
            conn.close()
    got = c.wait(REFUSED, len(refused), listener="inbound", reason="max_connections")
    assert got >= len(refused), (got, len(refused))

    def new_connection_served() -> bool:
        with A.RawH2.connect(mesh.inbound, ctx=mesh.healthy_ctx(), source="127.0.0.1") as conn:
            return conn.grpc_status(conn.send_call(HEALTHY_MESSAGE)) == (0, "")

    procs.wait_for(new_connection_served, 10, interval_s=0.2,
                   what="a new connection accepted once the flood is gone")
    healthy.assert_unharmed()
