"""Raw probes for sidecar ports in integration tests: a hand-made HTTP/2 gRPC attempt over
TLS or h2c, the certificate a TLS port presents, a tiny mTLS server that records the client
certificate it is shown, and the sidecar's admin endpoint.

Nothing here sleeps to wait: reads run against a deadline and stop at EOF.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hpack
from cryptography import x509

from tests.support.pki import WorkloadCert
from tests.support.procs import Proc, hostport

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_DATA = 0x0
FRAME_HEADERS = 0x1
FRAME_SETTINGS = 0x4
FRAME_GOAWAY = 0x7
FLAG_END_STREAM = 0x1
FLAG_END_HEADERS = 0x4


# --------------------------------------------------------------------------- admin endpoint
def admin_request(proc: Proc, method: str, path: str, timeout_s: float = 5) -> tuple[int, Any]:
    """(HTTP status, decoded JSON body) of `method path` on the sidecar's admin port."""
    host, port = hostport(proc.ready["admin"])
    req = urllib.request.Request(
        f"http://{host}:{port}{path}", method=method, data=b"" if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def stats(proc: Proc) -> dict[str, Any]:
    """The sidecar's /stats document."""
    status, body = admin_request(proc, "GET", "/stats")
    assert status == 200, (status, body)
    return body


# --------------------------------------------------------------------------- TLS helpers
def client_context(trust: Path | str, cert: WorkloadCert | None = None) -> ssl.SSLContext:
    """A TLS client context offering ALPN h2 that verifies the server against `trust` (no
    hostname check: mesh identity is the SPIFFE URI) and presents `cert` when given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(trust))
    ctx.set_alpn_protocols(["h2"])
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


def cert_serial(path: Path | str) -> int:
    """Serial number of the first PEM certificate in `path`."""
    return x509.load_pem_x509_certificate(Path(path).read_bytes()).serial_number


def presented_serial(addr: tuple[str, int], ctx: ssl.SSLContext, timeout_s: float = 5) -> int:
    """Open a fresh TLS connection to `addr` and return the serial of the server's certificate."""
    with socket.create_connection(addr, timeout=timeout_s) as raw:
        with ctx.wrap_socket(raw, server_hostname="echo.mesh.local") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der, "server presented no certificate"
    return x509.load_der_x509_certificate(der).serial_number


# --------------------------------------------------------------------------- raw HTTP/2 gRPC
def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([ftype, flags])
        + struct.pack(">I", stream_id)
        + payload
    )


def grpc_request_frames(
    authority: str = "echo",
    path: str = "/meshtest.Echo/Unary",
    message: bytes = b"",
    scheme: str = "https",
) -> bytes:
    """Client preface, an empty SETTINGS, and one gRPC call on stream 1 (HEADERS + DATA with
    END_STREAM) carrying `message` (serialized protobuf) with the 5-byte gRPC prefix."""
    block = hpack.Encoder().encode(
        [
            (":method", "POST"),
            (":scheme", scheme),
            (":path", path),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    )
    body = b"\x00" + struct.pack(">I", len(message)) + message
    return (
        PREFACE
        + frame(FRAME_SETTINGS, 0, 0)
        + frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, block)
        + frame(FRAME_DATA, FLAG_END_STREAM, 1, body)
    )


@dataclass
class Attempt:
    """What a raw HTTP/2 attempt saw. `frames` are (type, flags, stream_id) as received."""

    handshake_error: str | None = None
    send_error: str | None = None
    read_end: str = ""
    received_bytes: int = 0
    frames: list[tuple[int, int, int]] = field(default_factory=list)
    not_http2: bool = False  # bytes arrived that do not start with a server SETTINGS frame
    alpn: str | None = None

    @property
    def headers_frames(self) -> list[tuple[int, int, int]]:
        return [f for f in self.frames if f[0] == FRAME_HEADERS]

    def describe(self) -> str:
        return (
            f"handshake_error={self.handshake_error!r} send_error={self.send_error!r} "
            f"read_end={self.read_end!r} alpn={self.alpn!r} bytes={self.received_bytes} "
            f"not_http2={self.not_http2} frames={self.frames}"
        )


def _parse_frames(buf: bytes, out: Attempt) -> bytes:
    """Consume whole frames from `buf` into `out.frames`; returns the unparsed rest."""
    while len(buf) >= 9 and not out.not_http2:
        length = int.from_bytes(buf[:3], "big")
        ftype, flags = buf[3], buf[4]
        stream_id = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        if not out.frames and (ftype != FRAME_SETTINGS or stream_id != 0):
            out.not_http2 = True  # a server's first frame must be SETTINGS on stream 0
            return b""
        if len(buf) < 9 + length:
            break
        out.frames.append((ftype, flags, stream_id))
        buf = buf[9 + length :]
    return buf


def grpc_attempt(
    addr: tuple[str, int],
    ctx: ssl.SSLContext | None,
    *,
    message: bytes = b"",
    authority: str = "echo",
    read_timeout_s: float = 3.0,
    stop_on_response: bool = True,
) -> Attempt:
    """Connect (TLS with `ctx`, or plaintext when None), send the HTTP/2 preface, SETTINGS and
    one gRPC call, then read until EOF, an error or `read_timeout_s`.

    Never raises for network/TLS failures: they are recorded in the Attempt. With
    `stop_on_response`, returns as soon as a HEADERS frame with END_STREAM arrives on stream 1.
    """
    out = Attempt()
    deadline = time.monotonic() + read_timeout_s
    raw = socket.create_connection(addr, timeout=read_timeout_s)
    sock: socket.socket = raw
    try:
        if ctx is not None:
            try:
                sock = ctx.wrap_socket(raw, server_hostname="echo.mesh.local")
                out.alpn = sock.selected_alpn_protocol()  # type: ignore[attr-defined]
            except (ssl.SSLError, OSError) as e:
                out.handshake_error = f"{type(e).__name__}: {e}"
                return out
        try:
            sock.sendall(
                grpc_request_frames(
                    authority=authority, message=message, scheme="https" if ctx else "http"
                )
            )
        except (ssl.SSLError, OSError) as e:
            out.send_error = f"{type(e).__name__}: {e}"  # keep reading: a response may be queued
        buf = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                out.read_end = "timeout"
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                out.read_end = "timeout"
                break
            except (ssl.SSLError, OSError) as e:
                out.read_end = f"{type(e).__name__}: {e}"
                break
            if not chunk:
                out.read_end = "eof"
                break
            out.received_bytes += len(chunk)
            buf = _parse_frames(buf + chunk, out)
            if stop_on_response and any(
                f[0] == FRAME_HEADERS and f[2] == 1 and f[1] & FLAG_END_STREAM for f in out.frames
            ):
                out.read_end = "response complete"
                break
    finally:
        sock.close()
    return out


# --------------------------------------------------------------------------- mTLS probe server
class ClientCertRecorder:
    """A TLS server on 127.0.0.1 (ALPN h2, client certificate required, chained to `ca`) that
    records the serial of every client certificate it sees, then closes the connection.

    Use as a fake upstream endpoint: a sidecar dialing it shows which certificate it presents.
    """

    def __init__(self, server_cert: WorkloadCert) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(server_cert.cert), str(server_cert.key))
        ctx.load_verify_locations(cafile=str(server_cert.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(["h2"])
        self.ctx = ctx
        self.serials: list[int] = []
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="cert-recorder")
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def seen(self) -> list[int]:
        with self._lock:
            return list(self.serials)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    der = tls.getpeercert(binary_form=True)
                    if der:
                        with self._lock:
                            self.serials.append(x509.load_der_x509_certificate(der).serial_number)
            except (ssl.SSLError, OSError):
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=5)
