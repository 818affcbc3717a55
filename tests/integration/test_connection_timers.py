"""HTTP/2 keepalive, idle timeout and max connection age, with the timers shortened by config.

A raw h2c client on the outbound port plays a peer that never answers PINGs, or sits idle;
a grpcio channel shows that a connection drained for its age loses no call.
"""

from __future__ import annotations

import socket
import struct
import time

import grpc

from protos.meshtest import echo_pb2, echo_pb2_grpc
from tests.support.h2probe import PREFACE, stats
from tests.support.procs import hostport

PING, GOAWAY, SETTINGS = 0x6, 0x7, 0x4


def _frames_until_closed(sock: socket.socket, deadline_s: float) -> tuple[list[tuple[int, int]], bool]:
    """(type, flags) of every frame read until EOF or the deadline; True when EOF came."""
    buf = b""
    seen: list[tuple[int, int]] = []
    sock.settimeout(0.1)
    while time.monotonic() < deadline_s:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return seen, True
        if not chunk:
            return seen, True
        buf += chunk
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            seen.append((buf[3], buf[4]))
            buf = buf[9 + length:]
    return seen, False


def _raw_h2c(addr: str) -> socket.socket:
    sock = socket.create_connection(hostport(addr), timeout=5)
    sock.sendall(PREFACE + struct.pack(">HBBBL", 0, 0, SETTINGS, 0, 0))
    return sock


def test_a_peer_that_never_answers_keepalive_pings_is_disconnected(sidecar, pki) -> None:
    proc = sidecar(service="client", tls=pki.issue_workload("client"),
                   limits={"keepalive_interval_s": 0.2, "keepalive_timeout_s": 0.3,
                           "idle_timeout_s": 0})
    sock = _raw_h2c(proc.ready["outbound"])
    try:
        seen, closed = _frames_until_closed(sock, time.monotonic() + 5)
    finally:
        sock.close()
    assert (PING, 0) in seen, f"the sidecar never sent a keepalive PING: {seen}"
    assert closed, "a peer that ignores PINGs must be disconnected"


def test_an_idle_connection_gets_goaway_and_is_closed(sidecar, pki) -> None:
    proc = sidecar(service="client", tls=pki.issue_workload("client"),
                   limits={"keepalive_interval_s": 0, "idle_timeout_s": 0.3})
    sock = _raw_h2c(proc.ready["outbound"])
    started = time.monotonic()
    try:
        seen, closed = _frames_until_closed(sock, started + 5)
    finally:
        sock.close()
    assert closed and (GOAWAY, 0) in seen, f"expected GOAWAY then close, saw {seen}"
    assert time.monotonic() - started >= 0.25


def test_max_connection_age_drains_without_losing_a_call(sidecar, pki, echo_server) -> None:
    server = echo_server("s1")
    echo = sidecar(service="echo", tls=pki.issue_workload("echo"), app_port=server.port)
    client = sidecar(service="client", tls=pki.issue_workload("client"),
                     clusters={"echo": [(echo.ready["inbound"], None)]},
                     limits={"max_connection_age_s": 0.3})
    channel = grpc.insecure_channel(client.ready["outbound"],
                                    options=[("grpc.default_authority", "echo")])
    stub = echo_pb2_grpc.EchoStub(channel)
    try:
        deadline = time.monotonic() + 2.0
        calls = 0
        while time.monotonic() < deadline and calls < 2000:
            reply = stub.Unary(echo_pb2.EchoRequest(payload=b"age"), timeout=5)
            assert reply.payload == b"age"
            calls += 1
    finally:
        channel.close()
    log = client.log_text()
    assert calls > 20, log
    outbound = stats(client)["outbound"]
    assert outbound["calls"]["by_status"].get("OK") == calls, outbound
    # Each GOAWAY made the channel reconnect: the listener accepted several connections.
    assert outbound["accepted_connections"] >= 3, outbound


def _frames(sock: socket.socket, until: float, want: int) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of frames read until a frame of type ``want``
    arrives or ``until`` (monotonic s) passes; EOF ends it too."""
    buf = b""
    out: list[tuple[int, int, int, bytes]] = []
    sock.settimeout(0.1)
    while time.monotonic() < until:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            n = int.from_bytes(buf[:3], "big")
            out.append((buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF,
                        buf[9:9 + n]))
            buf = buf[9 + n:]
        if any(f[0] == want for f in out):
            break
    return out


def test_a_drained_connection_waits_for_the_peer_to_read_its_goaway_before_closing(
        sidecar, pki) -> None:
    """Max connection age: the sidecar sends GOAWAY, then a PING, and keeps the connection
    open until the PING is acked (a request the peer sent before reading the GOAWAY is
    refused, which a client retries, rather than lost to a reset); the ack lets it close."""
    proc = sidecar(service="client", tls=pki.issue_workload("client"),
                   limits={"keepalive_interval_s": 0, "idle_timeout_s": 0,
                           "max_connection_age_s": 0.2})
    sock = _raw_h2c(proc.ready["outbound"])
    try:
        frames = _frames(sock, time.monotonic() + 5, PING)
        told = time.monotonic()
        kinds = [f[0] for f in frames]
        assert GOAWAY in kinds and PING in kinds and kinds.index(GOAWAY) < kinds.index(PING), kinds
        ping = next(f for f in frames if f[0] == PING)
        # Still open a while later (past several of its 50 ms ticks): the PING is not acked.
        _, closed = _frames_until_closed(sock, told + 0.2)
        assert not closed, "the sidecar closed before its PING after the GOAWAY was acked"
        request = bytes([0x83, 0x86, 0x84, 0x41, 0x04]) + b"echo"  # POST http / echo
        sock.sendall(struct.pack(">HBBBL", 0, len(request), 0x1, 0x5, 1) + request)
        refused = _frames(sock, time.monotonic() + 5, 0x3)  # RST_STREAM
        assert (0x3, 0, 1) in [(f[0], f[1], f[2]) for f in refused], refused
        rst = next(f for f in refused if f[0] == 0x3)
        assert int.from_bytes(rst[3], "big") == 0x7  # REFUSED_STREAM: safe to retry
        sock.sendall(struct.pack(">HBBBL", 0, 8, PING, 0x1, 0) + ping[3])  # the ack
        # Closed on the ack, before the 1 s a peer that never acks is given.
        _, closed = _frames_until_closed(sock, told + 0.9)
        assert closed, "the sidecar kept a drained connection open after the PING was acked"
    finally:
        sock.close()
