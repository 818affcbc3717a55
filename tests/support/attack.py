"""Raw attacker clients for the hostile-input tests: TCP/TLS sockets bound to a chosen loopback
source address, HTTP/2 frame builders for malformed and flooding input, and a small frame
reader that shows what the sidecar answered (GOAWAY code, RST_STREAM code, gRPC status).

Attackers bind 127.0.0.2 (or 127.0.0.3, ...) before they connect, so per-peer limits apply
to them and not to the healthy traffic from 127.0.0.1. Nothing here sleeps to wait for a
condition: reads run against a deadline and stop at EOF; the one paced sender (``trickle``,
slowloris) sleeps between bytes by design, bounded by a total time.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import hpack

from tests.support.h2probe import PREFACE, frame

# Frame types (RFC 9113 §6)
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9
# Flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
# Error codes (RFC 9113 §7)
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB
# Settings
SETTINGS_INITIAL_WINDOW_SIZE = 0x4

ECHO_UNARY = "/meshtest.Echo/Unary"
ECHO_CLIENT_STREAM = "/meshtest.Echo/ClientStream"


# --------------------------------------------------------------------------- frame builders
def settings_payload(settings: dict[int, int]) -> bytes:
    """The payload of a SETTINGS frame carrying ``settings`` (identifier -> value)."""
    return b"".join(struct.pack(">HL", k, v) for k, v in settings.items())


def grpc_message(message: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed): 5-byte prefix + ``message``."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def request_block(path: str = ECHO_UNARY, authority: str = "echo", scheme: str = "https",
                  extra: Sequence[tuple[str, str]] = ()) -> bytes:
    """An HPACK block of a gRPC request's headers (plus ``extra`` fields). A fresh encoder
    each time: literals only, never a reference to a dynamic table entry (the sidecar
    advertises a header table size of 0)."""
    return hpack.Encoder().encode([
        (":method", "POST"), (":scheme", scheme), (":path", path), (":authority", authority),
        ("content-type", "application/grpc"), ("te", "trailers"), *extra,
    ])


# --------------------------------------------------------------------------- frames received
@dataclass(frozen=True)
class Frame:
    """A frame as received: type, flags, stream id (reserved bit masked) and payload."""

    type: int
    flags: int
    stream_id: int
    payload: bytes


@dataclass(frozen=True)
class GoAway:
    """The fields of a GOAWAY frame."""

    last_stream_id: int
    code: int
    debug: bytes

    @classmethod
    def of(cls, f: Frame) -> GoAway:
        last, code = struct.unpack_from(">LL", f.payload)
        return cls(last & 0x7FFFFFFF, code, f.payload[8:])


# --------------------------------------------------------------------------- sockets
def tcp_connect(addr: tuple[str, int], source: str = "127.0.0.2",
                timeout_s: float = 5.0) -> socket.socket:
    """A TCP connection to ``addr`` from ``source`` (any free port), TCP_NODELAY set.
    Raises OSError when the connect itself fails."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((source, 0))
        sock.settimeout(timeout_s)
        sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def client_hello(ctx: ssl.SSLContext) -> bytes:
    """The bytes of a TLS ClientHello that ``ctx`` would send (made in memory, no socket):
    what a slowloris client trickles onto a TLS port."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="echo.mesh.local")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class RawH2:
    """One raw HTTP/2 client connection (TLS or h2c) that sends exactly the bytes it is
    given and records every frame the server sends back.

    ``auto`` answers the server's SETTINGS with an ACK and its PINGs with a PING ACK as
    frames are read (a healthy client does; an attacker may turn it off). ``headers`` holds
    the decoded header blocks by stream id, in arrival order (one HPACK decoder for the
    connection, so its dynamic table stays right). ``end`` says why reading stopped for good
    ("eof", "reset: ...") or is "" while the connection is open.
    """

    def __init__(self, sock: socket.socket, *, auto: bool = True) -> None:
        self.sock = sock
        self.auto = auto
        self.frames: list[Frame] = []
        self.headers: dict[int, list[list[tuple[str, str]]]] = {}
        self.end = ""
        self.send_error: str | None = None
        self.next_stream_id = 1
        self._buf = b""
        self._decoder = hpack.Decoder()
        self._block: tuple[int, int, bytearray] | None = None  # sid, HEADERS flags, fragments

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def connect(cls, addr: tuple[str, int], *, ctx: ssl.SSLContext | None,
                source: str = "127.0.0.2", timeout_s: float = 5.0, auto: bool = True,
                preface: bool = True, settings: dict[int, int] | None = None) -> RawH2:
        """Connect from ``source``, do the TLS handshake when ``ctx`` is given, and (with
        ``preface``) send the client magic and a SETTINGS frame. Raises OSError / SSLError
        when the connect or the handshake fails."""
        sock: socket.socket = tcp_connect(addr, source, timeout_s)
        if ctx is not None:
            try:
                sock = ctx.wrap_socket(sock, server_hostname="echo.mesh.local")
            except BaseException:
                sock.close()
                raise
        conn = cls(sock, auto=auto)
        if preface:
            conn.send(PREFACE + frame(SETTINGS, 0, 0, settings_payload(settings or {})))
        return conn

    # -- sending -------------------------------------------------------------------------
    def send(self, data: bytes) -> bool:
        """Send ``data``; False (and ``send_error`` set) when the server already closed."""
        try:
            self.sock.sendall(data)
            return True
        except (OSError, ssl.SSLError) as exc:
            self.send_error = f"{type(exc).__name__}: {exc}"
            return False

    def new_stream_id(self) -> int:
        sid = self.next_stream_id
        self.next_stream_id += 2
        return sid

    def send_call(self, message: bytes, *, path: str = ECHO_UNARY, authority: str = "echo",
                  scheme: str = "https", stream_id: int | None = None) -> int:
        """Send one whole gRPC call (HEADERS, then DATA with END_STREAM carrying
        ``message``); returns its stream id."""
        sid = self.new_stream_id() if stream_id is None else stream_id
        block = request_block(path, authority, scheme)
        self.send(frame(HEADERS, END_HEADERS, sid, block)
                  + frame(DATA, END_STREAM, sid, grpc_message(message)))
        return sid

    # -- reading -------------------------------------------------------------------------
    def read_until(self, predicate: Callable[[Frame], bool] | None,
                   timeout_s: float = 5.0) -> Frame | None:
        """Read frames until one matches ``predicate`` (returned), the connection ends, or
        ``timeout_s`` passes (None). With ``predicate`` None, read until the end or the
        timeout. Frames already received are searched first."""
        if predicate is not None:
            for f in self.frames:
                if predicate(f):
                    return f
        deadline = time.monotonic() + timeout_s
        while not self.end:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            except ssl.SSLWantReadError:
                continue
            except (OSError, ssl.SSLError) as exc:
                self.end = f"reset: {type(exc).__name__}: {exc}"
                break
            if not chunk:
                self.end = "eof"
                break
            start = len(self.frames)
            self._parse(chunk)
            if predicate is not None:
                for f in self.frames[start:]:
                    if predicate(f):
                        return f
        return None

    def _parse(self, chunk: bytes) -> None:
        buf = self._buf + chunk
        pos = 0
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos:pos + 3], "big")
            if len(buf) - pos < 9 + length:
                break
            ftype, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            f = Frame(ftype, flags, sid, buf[pos + 9:pos + 9 + length])
            pos += 9 + length
            self.frames.append(f)
            self._on_frame(f)
        self._buf = buf[pos:]

    def _on_frame(self, f: Frame) -> None:
        if f.type == HEADERS:
            payload = f.payload
            if f.flags & 0x8:  # PADDED
                payload = payload[1:len(payload) - payload[0]]
            if f.flags & 0x20:  # PRIORITY
                payload = payload[5:]
            self._block = (f.stream_id, f.flags, bytearray(payload))
            if f.flags & END_HEADERS:
                self._block_done()
        elif f.type == CONTINUATION and self._block is not None:
            self._block[2].extend(f.payload)
            if f.flags & END_HEADERS:
                self._block_done()
        elif self.auto and f.type == SETTINGS and not f.flags & ACK:
            self.send(frame(SETTINGS, ACK, 0))
        elif self.auto and f.type == PING and not f.flags & ACK:
            self.send(frame(PING, ACK, 0, f.payload))

    def _block_done(self) -> None:
        assert self._block is not None
        sid, _, block = self._block
        self._block = None
        fields = [(str(k), str(v)) for k, v in self._decoder.decode(bytes(block))]
        self.headers.setdefault(sid, []).append(fields)

    # -- what the server said ------------------------------------------------------------
    def settings_received(self, timeout_s: float = 5.0) -> bool:
        """True once the server's first SETTINGS frame has arrived."""
        return self.read_until(lambda f: f.type == SETTINGS and not f.flags & ACK,
                               timeout_s) is not None

    def goaway(self, timeout_s: float = 5.0) -> GoAway | None:
        """The first GOAWAY the server sent (waiting for it up to ``timeout_s``), or None."""
        f = self.read_until(lambda f: f.type == GOAWAY, timeout_s)
        return GoAway.of(f) if f is not None else None

    def wait_closed(self, timeout_s: float = 5.0) -> bool:
        """Read (and record) until the server closes the connection; True if it did."""
        self.read_until(None, timeout_s)
        return bool(self.end)

    def rst_code(self, stream_id: int, timeout_s: float = 5.0) -> int | None:
        """The error code of the first RST_STREAM on ``stream_id``, or None."""
        f = self.read_until(lambda f: f.type == RST_STREAM and f.stream_id == stream_id,
                            timeout_s)
        return struct.unpack(">L", f.payload)[0] if f is not None else None

    def grpc_status(self, stream_id: int, timeout_s: float = 5.0) -> tuple[int, str] | None:
        """(grpc-status, grpc-message) of the stream's last header block (the trailers, or
        a trailers-only answer), once a HEADERS frame with END_STREAM arrived on it; None if
        none arrived in time."""
        done = self.read_until(lambda f: f.type == HEADERS and f.stream_id == stream_id
                               and bool(f.flags & END_STREAM), timeout_s)
        if done is None or not done.flags & END_HEADERS:
            # a trailer block split into CONTINUATION frames: read until it is complete
            self.read_until(lambda f: f.type == CONTINUATION and f.stream_id == stream_id
                            and bool(f.flags & END_HEADERS), timeout_s)
        blocks = self.headers.get(stream_id)
        if done is None or not blocks:
            return None
        fields = dict(blocks[-1])
        return int(fields.get("grpc-status", "-1")), fields.get("grpc-message", "")

    def frames_on(self, stream_id: int, ftype: int | None = None) -> list[Frame]:
        return [f for f in self.frames
                if f.stream_id == stream_id and (ftype is None or f.type == ftype)]

    def describe(self) -> str:
        kinds = [(f.type, f.flags, f.stream_id) for f in self.frames[-20:]]
        return (f"end={self.end!r} send_error={self.send_error!r} frames={len(self.frames)} "
                f"last={kinds}")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Attempt:
    """One connection of a connection flood: ``conn`` when the server accepted it (its
    SETTINGS arrived), else ``refused`` says how it ended."""

    conn: RawH2 | None = None
    refused: str = ""


def open_attempt(addr: tuple[str, int], *, ctx: ssl.SSLContext | None, source: str,
                 timeout_s: float = 5.0) -> Attempt:
    """Connect from ``source``, handshake, send the preface and wait for the server's
    SETTINGS. Accepted: the SETTINGS came (the connection is kept open, in ``conn``).
    Refused: the connect, the handshake or the read ended first (``refused`` says how);
    a server that answers nothing within ``timeout_s`` counts as refused ("no SETTINGS")."""
    try:
        conn = RawH2.connect(addr, ctx=ctx, source=source, timeout_s=timeout_s)
    except (OSError, ssl.SSLError) as exc:
        return Attempt(refused=f"{type(exc).__name__}: {exc}")
    if conn.settings_received(timeout_s):
        return Attempt(conn=conn)
    why = conn.end or "no SETTINGS"
    conn.close()
    return Attempt(refused=why)


@dataclass
class Trickled:
    """What a slowloris connection saw: when (seconds after the start) the server closed it,
    None if it was still open at the end, and how many bytes it got to send."""

    closed_after_s: float | None = None
    bytes_sent: int = 0
    how: str = ""


@dataclass
class _Slow:
    sock: socket.socket
    result: Trickled = field(default_factory=Trickled)


def trickle(socks: Iterable[socket.socket], data: bytes, *, interval_s: float = 1.0,
            max_s: float = 5.0) -> list[Trickled]:
    """Slowloris: send ``data`` one byte per ``interval_s`` on every socket (TLS-wrapped or
    plain), until the server closes each or ``max_s`` has passed. A close is seen as EOF or
    a reset on a non-blocking read between bytes, or as a failed send. Returns one
    ``Trickled`` per socket, in order."""
    slows = [_Slow(s) for s in socks]
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < max_s:
        open_ = [s for s in slows if s.result.closed_after_s is None]
        if not open_:
            break
        for s in open_:
            if _closed(s.sock):
                s.result.closed_after_s = time.monotonic() - start
                s.result.how = "closed"
                continue
            if i < len(data):
                try:
                    s.sock.sendall(data[i:i + 1])
                    s.result.bytes_sent += 1
                except (OSError, ssl.SSLError) as exc:
                    s.result.closed_after_s = time.monotonic() - start
                    s.result.how = f"send failed: {type(exc).__name__}"
        i += 1
        # Pace the bytes, but look for closes often (every 50 ms) while waiting.
        next_byte = start + i * interval_s
        while time.monotonic() < min(next_byte, start + max_s):
            pending = [s for s in slows if s.result.closed_after_s is None]
            if not pending:
                break
            for s in pending:
                if _closed(s.sock):
                    s.result.closed_after_s = time.monotonic() - start
                    s.result.how = "closed"
            time.sleep(0.05)
    return [s.result for s in slows]


def _closed(sock: socket.socket) -> bool:
    """Has the server closed ``sock``? (a non-blocking read sees EOF or an error)"""
    sock.settimeout(0)
    try:
        data = sock.recv(4096)
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return False
    except (OSError, ssl.SSLError):
        return True
    finally:
        sock.settimeout(5)
    return not data
