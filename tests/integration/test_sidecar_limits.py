"""The sidecar's connection and call limits, on real processes with shortened limits.

Each test runs a small mesh: an echo app behind its sidecar ("echo", inbound mTLS) and a
client sidecar ("web") whose outbound port a grpcio channel calls. That channel's
connections are opened before the attack, and a background load on it must lose nothing
while the attack runs. Attackers connect from 127.0.0.2 / 127.0.0.3 (other "hosts" on
loopback) by binding their sockets' source address. Every refusal is asserted as the peer
sees it (a closed connection, a GOAWAY code, a gRPC status) and as the sidecar counts it
in ``/metrics``.
"""

from __future__ import annotations

import re
import socket
import ssl
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.meshtest import echo_pb2, echo_pb2_grpc
from tests.support import h2probe
from tests.support.pki import CA, spiffe_id
from tests.support.procs import Proc, wait_for
from tests.support.sidecar import admin_addr, inbound_addr, outbound_addr

pytestmark = pytest.mark.timeout(90)

CALL = echo_pb2.EchoRequest(payload=b"healthy")
MESSAGE = echo_pb2.EchoRequest(payload=b"probe").SerializeToString()
ATTACKER = "127.0.0.2"
OTHER_ATTACKER = "127.0.0.3"
SETTINGS, HEADERS, GOAWAY, DATA = 0x4, 0x1, 0x7, 0x0
ENHANCE_YOUR_CALM = 0xB


# ============================================================================ the mesh
@dataclass
class Load:
    """Unary calls in a loop on one stub (bounded by count and time) until stopped."""

    stub: echo_pb2_grpc.EchoStub
    max_calls: int = 3000
    max_s: float = 60.0
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        while not self._stop.is_set() and self.ok + len(self.failures) < self.max_calls \
                and time.monotonic() < deadline:
            try:
                self.stub.Unary(CALL, timeout=5)
                self.ok += 1
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code()}: {exc.details()}")
            time.sleep(0.005)

    def finish(self) -> None:
        """Stop, and assert that every call succeeded (and there were some)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        assert self.failures == [], f"healthy calls failed: {self.failures[:5]}"
        assert self.ok > 0


@dataclass
class Mesh:
    echo: Proc
    web: Proc
    stub: echo_pb2_grpc.EchoStub
    channel: grpc.Channel


@pytest.fixture
def mesh(pki: CA, echo_server, sidecar, grpc_channel):
    """A factory: ``mesh(echo_limits={...}, web_limits={...}, clusters={...})``. The web
    sidecar's "echo" cluster is the echo sidecar's inbound port; the returned stub calls
    through web's outbound port and has made one call (its connections are open)."""

    def _make(echo_limits: dict[str, Any] | None = None, web_limits: dict[str, Any] | None = None,
              clusters: dict[str, Any] | None = None) -> Mesh:
        srv = echo_server("echo-limits")
        es = sidecar(service="echo", tls=pki.issue_workload("echo"), app_port=srv.port,
                     limits=echo_limits)
        host, port = inbound_addr(es)
        web = sidecar(service="web", tls=pki.issue_workload("web"), limits=web_limits,
                      clusters={"echo": [(f"{host}:{port}", spiffe_id("echo"))],
                                **(clusters or {})})
        out_host, out_port = outbound_addr(web)
        ch = grpc_channel(f"{out_host}:{out_port}", options=[("grpc.default_authority", "echo")])
        stub = echo_pb2_grpc.EchoStub(ch)
        assert stub.Unary(CALL, timeout=10).payload == b"healthy"
        return Mesh(es, web, stub, ch)

    return _make


# ============================================================================ probes
def scrape(proc: Proc) -> str:
    host, port = admin_addr(proc)
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def metric(proc: Proc, name: str, **labels: str) -> float:
    """The value of one sample of ``/metrics`` (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", scrape(proc), re.M)
    return float(m.group(1)) if m else 0.0


def counted(proc: Proc, listener: str) -> int:
    """Connections the listener counts against its limits now (from accept)."""
    return h2probe.stats(proc)[listener]["counted_connections"]


def tcp(addr: tuple[str, int], source: str) -> socket.socket:
    """A TCP connection to ``addr`` from ``source`` (an address of 127.0.0.0/8)."""
    return socket.create_connection(addr, timeout=5, source_address=(source, 0))


def refused_within(addr: tuple[str, int], source: str, seconds: float) -> bool:
    """A new TCP connection from ``source`` is refused: reset while it was being made (the
    refusal raced the handshake's last ACK) or closed by the peer within ``seconds``."""
    try:
        sock = tcp(addr, source)
    except (ConnectionResetError, ConnectionRefusedError):
        return True
    with sock:
        return closed_within(sock, seconds)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the peer closes (EOF or reset) within ``seconds``; bytes read are dropped."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


@contextmanager
def connections(addr: tuple[str, int], source: str, n: int) -> Iterator[list[socket.socket]]:
    socks = [tcp(addr, source) for _ in range(n)]
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


def good_context(pki: CA) -> ssl.SSLContext:
    return h2probe.client_context(pki.ca_path, pki.issue_workload("client"))


def tls_call(addr: tuple[str, int], ctx: ssl.SSLContext, source: str = "127.0.0.1") -> bool:
    """One gRPC call over a new mTLS connection from ``source``: True when a response
    (HEADERS with END_STREAM on stream 1) comes back within 5 s."""
    try:
        raw = tcp(addr, source)
    except OSError:
        return False
    try:
        sock = ctx.wrap_socket(raw, server_hostname="echo.mesh.local")
        sock.sendall(h2probe.grpc_request_frames(authority="echo", message=MESSAGE))
        out = h2probe.Attempt()
        buf = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                return False
            buf = h2probe._parse_frames(buf + chunk, out)
            if any(f[0] == HEADERS and f[2] == 1 and f[1] & 0x1 for f in out.frames):
                return True
        return False
    except (OSError, ssl.SSLError):
        return False
    finally:
        raw.close()


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return h2probe.frame(ftype, flags, sid, payload)


def read_frames(sock: socket.socket, seconds: float,
                on_frame: Any = None) -> tuple[list[tuple[int, int, bytes]], bool]:
    """(type, flags, payload) of the frames read until EOF or ``seconds``; True on EOF.
    ``on_frame(type, flags, payload)`` may answer (e.g. ACK the server's SETTINGS)."""
    buf = b""
    seen: list[tuple[int, int, bytes]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return seen, False
        except OSError:
            return seen, True
        if not chunk:
            return seen, True
        buf += chunk
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            item = (buf[3], buf[4], buf[9:9 + length])
            seen.append(item)
            buf = buf[9 + length:]
            if on_frame is not None:
                on_frame(*item)
    return seen, False


def rss_bytes(proc: Proc) -> int:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ============================================================================ connections
def test_one_peer_over_its_connection_limit_is_refused_while_other_peers_are_served(
        mesh, pki: CA) -> None:
    limits = {"max_connections_per_peer": 3, "max_connections": 64, "handshake_timeout_s": 30}
    m = mesh(echo_limits=limits, web_limits=limits)
    load = Load(m.stub).start()
    try:
        for proc, listener, addr in ((m.echo, "inbound", inbound_addr(m.echo)),
                                     (m.web, "outbound", outbound_addr(m.web))):
            before = counted(proc, listener)
            # Three connections from 127.0.0.2 that never start TLS / HTTP/2: counted as
            # they are (handshakes in progress), kept open.
            with connections(addr, ATTACKER, 3) as held:
                wait_for(lambda p=proc, lst=listener, b=before: counted(p, lst) == b + 3, 5,
                         what=f"{listener}: three connections from {ATTACKER} counted")
                assert refused_within(addr, ATTACKER, 3), "the fourth connection was not refused"
                assert not any(closed_within(s, 0.2) for s in held), "a held one was closed"
                assert metric(proc, "mesh_connections_refused_total", listener=listener,
                              reason="max_connections_per_peer") == 1
                # Another peer still connects and, on the TLS port, is served.
                if listener == "inbound":
                    assert tls_call(addr, good_context(pki))
                else:
                    with tcp(addr, OTHER_ATTACKER) as other:
                        assert not closed_within(other, 0.5)
            wait_for(lambda p=proc, lst=listener, b=before: counted(p, lst) == b, 5,
                     what=f"{listener}: the held connections released")
            with tcp(addr, ATTACKER) as again:  # its slots are back
                assert not closed_within(again, 0.3)
    finally:
        load.finish()


def test_the_total_connection_limit_counts_handshakes_in_progress_and_frees_slots(
        mesh, pki: CA) -> None:
    m = mesh(echo_limits={"max_connections": 4, "max_connections_per_peer": 2,
                          "handshake_timeout_s": 30})
    addr = inbound_addr(m.echo)
    wait_for(lambda: counted(m.echo, "inbound") == 1, 5, what="web's connection counted")
    load = Load(m.stub).start()
    try:
        with connections(addr, ATTACKER, 2) as flood, connections(addr, OTHER_ATTACKER, 1):
            wait_for(lambda: counted(m.echo, "inbound") == 4, 5, what="four counted")
            # under its peer limit, over the total
            assert refused_within(addr, OTHER_ATTACKER, 3)
            assert not tls_call(addr, good_context(pki))  # a new client: refused as well
            assert metric(m.echo, "mesh_connections_refused_total", listener="inbound",
                          reason="max_connections") == 2
            assert h2probe.stats(m.echo)["inbound"]["refused_connections"] == {
                "max_connections": 2}
            for s in flood:
                s.close()
            wait_for(lambda: counted(m.echo, "inbound") == 2, 5, what="the flood released")
            assert tls_call(addr, good_context(pki))
    finally:
        load.finish()


# ============================================================================ handshakes
def test_a_tls_handshake_or_preface_not_done_in_time_is_closed_and_counted(
        mesh, pki: CA) -> None:
    m = mesh(echo_limits={"handshake_timeout_s": 1.0})
    addr = inbound_addr(m.echo)
    load = Load(m.stub).start()  # its connection is older than the timeout: untouched
    try:
        started = time.monotonic()
        with tcp(addr, ATTACKER) as silent:  # TCP only, never a ClientHello
            assert not closed_within(silent, 0.5)
            assert closed_within(silent, 5)
        assert 0.9 <= time.monotonic() - started < 5
        # TLS done, then the HTTP/2 preface a byte at a time (slowloris).
        started = time.monotonic()
        raw = tcp(addr, ATTACKER)
        with good_context(pki).wrap_socket(raw, server_hostname="echo.mesh.local") as tls:
            closed = False
            for byte in h2probe.PREFACE:
                try:
                    tls.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                if closed_within(tls, 0.2):
                    closed = True
                    break
            assert closed, "a client dribbling its preface was never closed"
        assert time.monotonic() - started < 5
        assert metric(m.echo, "mesh_connections_refused_total", listener="inbound",
                      reason="handshake_timeout") == 2
        assert metric(m.echo, "mesh_tls_handshake_failures_total",
                      reason="handshake_timeout") == 1
        assert tls_call(addr, good_context(pki))  # a prompt client is served
    finally:
        load.finish()


def test_an_h2c_preface_not_sent_in_time_is_closed_and_a_prompt_one_is_kept(mesh) -> None:
    m = mesh(web_limits={"handshake_timeout_s": 1.0})
    addr = outbound_addr(m.web)
    load = Load(m.stub).start()
    try:
        with tcp(addr, ATTACKER) as prompt, tcp(addr, ATTACKER) as slow:
            prompt.sendall(h2probe.PREFACE + frame(SETTINGS, 0, 0))
            started = time.monotonic()
            closed = False
            for byte in h2probe.PREFACE:
                try:
                    slow.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                if closed_within(slow, 0.2):
                    closed = True
                    break
            assert closed, "a client dribbling its preface was never closed"
            assert 0.9 <= time.monotonic() - started < 5
            _, eof = read_frames(prompt, 0.5)
            assert not eof, "a client that sent its preface at once was closed"
        assert metric(m.web, "mesh_connections_refused_total", listener="outbound",
                      reason="handshake_timeout") == 1
    finally:
        load.finish()


# ============================================================================ stall
def _stalled_client(addr: tuple[str, int], response_bytes: int) -> socket.socket:
    """An h2c client that asks for a big response and never opens a window (it does ACK
    the server's SETTINGS)."""
    sock = tcp(addr, ATTACKER)
    body = echo_pb2.EchoRequest(response_bytes=response_bytes).SerializeToString()
    sock.sendall(h2probe.grpc_request_frames(authority="echo", message=body, scheme="http"))
    return sock


def _read_until_goaway(sock: socket.socket, seconds: float) -> tuple[int | None, bytes, int, bool]:
    """(GOAWAY error code or None, its debug data, DATA payload bytes read, EOF seen)."""
    def answer(ftype: int, flags: int, payload: bytes) -> None:
        if ftype == SETTINGS and not flags & 0x1:
            sock.sendall(frame(SETTINGS, 0x1, 0))

    seen, eof = read_frames(sock, seconds, answer)
    data = sum(len(p) for t, _, p in seen if t == DATA)
    for t, _, p in seen:
        if t == GOAWAY:
            return struct.unpack(">L", p[4:8])[0], p[8:], data, eof
    return None, b"", data, eof


def test_a_client_that_never_opens_its_window_is_closed_for_a_stall(mesh) -> None:
    m = mesh(web_limits={"stall_timeout_s": 1.0})
    addr = outbound_addr(m.web)
    load = Load(m.stub).start()
    try:
        started = time.monotonic()
        with _stalled_client(addr, 3_000_000) as sock:
            code, debug, data, eof = _read_until_goaway(sock, 10)
        assert code == ENHANCE_YOUR_CALM and b"stall" in debug, (code, debug)
        assert eof
        assert data <= 65535  # it got what its window allowed, no more
        assert 1.0 <= time.monotonic() - started < 10
        assert metric(m.web, "mesh_connections_terminated_total", listener="outbound",
                      reason="stall") == 1
        assert h2probe.stats(m.web)["outbound"]["terminated_connections"] == {"stall": 1}
        # Rounds of stalled clients: what they held is let go, RSS does not keep growing.
        rss: list[int] = []
        for round_ in range(3):
            socks = [_stalled_client(addr, 3_000_000) for _ in range(4)]
            try:
                for s in socks:
                    code, _, _, eof = _read_until_goaway(s, 10)
                    assert code == ENHANCE_YOUR_CALM and eof
            finally:
                for s in socks:
                    s.close()
            wait_for(lambda n=round_: metric(m.web, "mesh_connections_terminated_total",
                                             listener="outbound", reason="stall") == 5 + 4 * n,
                     5, what="every stalled client counted")
            wait_for(lambda: h2probe.stats(m.web)["outbound"]["active_calls"] == 0, 10,
                     what="the stalled calls ended")
            rss.append(rss_bytes(m.web))
        assert rss[-1] - rss[0] < 16 * 2**20, f"RSS grew round after round: {rss}"
    finally:
        load.finish()
    # The echo sidecar's end of the shared connection was never cut for web's stalled client.
    assert metric(m.echo, "mesh_connections_terminated_total", listener="inbound",
                  reason="stall") == 0


# ============================================================================ pending calls
@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel does) but never reads or answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_calls_over_the_pending_limit_get_resource_exhausted_at_once(
        mesh, blackhole: int, grpc_channel) -> None:
    m = mesh(web_limits={"max_pending_calls": 4, "connect_timeout_s": 30},
             clusters={"hole": [(f"127.0.0.1:{blackhole}", None)]})
    host, port = outbound_addr(m.web)
    hole = echo_pb2_grpc.EchoStub(grpc_channel(f"{host}:{port}",
                                               options=[("grpc.default_authority", "hole")]))
    load = Load(m.stub).start()  # bound on an open connection: never waits
    try:
        waiting = [hole.Unary.future(CALL, timeout=4) for _ in range(4)]
        wait_for(lambda: h2probe.stats(m.web)["outbound"]["pending_calls"] == 4, 5,
                 what="four calls waiting for the endpoint that never answers SETTINGS")
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                hole.Unary(CALL, timeout=4)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
            assert err.value.details() == "pending calls limit of 4 reached"
            assert time.monotonic() - started < 1.5
        assert metric(m.web, "mesh_calls_refused_total", listener="outbound",
                      reason="pending_calls") == 2
        for f in waiting:
            assert f.exception(timeout=10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: h2probe.stats(m.web)["outbound"]["pending_calls"] == 0, 5,
                 what="the expired calls leaving the count")
        again = hole.Unary.future(CALL, timeout=2)  # the count is exact: room again
        wait_for(lambda: h2probe.stats(m.web)["outbound"]["pending_calls"] == 1, 5,
                 what="a new call waiting")
        assert again.exception(timeout=10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert h2probe.stats(m.web)["outbound"]["refused_calls"] == {"pending_calls": 2}
    finally:
        load.finish()


def test_the_new_counters_are_in_the_metrics_text(mesh) -> None:
    m = mesh()
    for proc in (m.echo, m.web):
        text = scrape(proc)
        for family in ("mesh_connections_refused_total", "mesh_connections_terminated_total",
                       "mesh_calls_refused_total"):
            assert f"# TYPE {family} counter" in text, family
        section = h2probe.stats(proc)
        for listener in ("inbound", "outbound"):
            if listener in section:
                assert {"refused_connections", "terminated_connections", "refused_calls",
                        "counted_connections"} <= set(section[listener])
