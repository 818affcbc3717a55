"""The gRPC calls the sidecar makes itself, on its own HTTP/2 core: no grpcio in its process.

The sidecar is a gRPC client of the control plane (join, renewal, the discovery stream), of
an OTLP receiver (span export) and of its app's health service. These calls used to go
through grpcio, whose library and threads cost a dynamic sidecar about 20 MB of RSS; they are
few and simple, so they run here on ``sidecar.http2`` (the relay's sans-IO core) under
asyncio instead.

``Channel``: one HTTP/2 connection to one ``HOST:PORT``, opened on the first call and again
after it is lost or the peer sent GOAWAY; h2c, or TLS (``client_tls``: the mesh bundle as
CA, our certificate, the host name checked, ALPN ``h2``). It makes unary calls (``unary``,
``unary_with_trailers``) and bidirectional streams (``open_stream``). Messages are protobuf,
uncompressed, in gRPC's length-prefixed framing.

Failures are ``RpcError`` with the gRPC status ``code`` and ``details``: the peer's
``grpc-status`` and ``grpc-message``; ``UNAVAILABLE`` when the connection cannot be made or
is lost, or the stream is refused; ``DEADLINE_EXCEEDED`` when ``timeout_s`` passes (sent as
``grpc-timeout`` too, and the stream is reset); ``RESOURCE_EXHAUSTED`` for a response message
over ``max_message_bytes``; ``INTERNAL`` for a malformed response. A cancelled caller resets
its stream (CANCEL).

Memory: a call holds at most one partial message (≤ ``max_message_bytes``) plus the complete
messages its reader has not taken yet, at most ``MAX_UNREAD_MESSAGES``, beyond which the
call fails ``RESOURCE_EXHAUSTED``. Receive credit is returned as DATA arrives.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import logging
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar

from mesh_common.limits import Limits

from .http2 import frames as F
from .http2 import grpc as G
from .http2.connection import H2Connection
from .http2.events import (
    ConnectionTerminated,
    DataReceived,
    DataSent,
    Event,
    GoAwayReceived,
    HeadersReceived,
    HeadersRejected,
    StreamReset,
)
from .http2.headers import HeaderBlock, encode_block
from .tls import TlsFiles

log = logging.getLogger("mesh.sidecar.rpc")

MAX_MESSAGE_BYTES = 16 << 20
"""Default cap on one response message (bytes)."""
MAX_UNREAD_MESSAGES = 1024
"""Complete response messages a call may hold that its reader has not taken."""
USER_AGENT = "mesh-sidecar/0.1"


class Code(enum.IntEnum):
    """gRPC status codes."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


_HTTP_TO_CODE = {400: Code.INTERNAL, 401: Code.UNAUTHENTICATED, 403: Code.PERMISSION_DENIED,
                 404: Code.UNIMPLEMENTED, 429: Code.UNAVAILABLE, 502: Code.UNAVAILABLE,
                 503: Code.UNAVAILABLE, 504: Code.UNAVAILABLE}
"""A non-200 HTTP status without a ``grpc-status``, as gRPC maps it (else UNKNOWN)."""


class RpcError(Exception):
    """A call ended with a non-OK status: ``code``, ``details`` (one line) and the trailers
    when the peer sent some."""

    def __init__(self, code: Code, details: str, trailers: HeaderBlock | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailers = trailers


class Message(Protocol):
    def SerializeToString(self) -> bytes: ...  # noqa: N802 (protobuf's name)


M = TypeVar("M")


def client_tls(files: TlsFiles) -> ssl.SSLContext:
    """A client context for mTLS to the control plane or an OTLP receiver: ``files.ca`` (the
    mesh bundle) as the only trust, our certificate and key, the server's name checked
    against the address dialled, ALPN ``h2``. Raises OSError / ssl.SSLError for unreadable
    files."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=files.ca)
    ctx.load_cert_chain(files.cert, files.key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → (host, port); ValueError naming the address."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a HOST:PORT address: {address!r}")
    return host.strip("[]"), int(port)


def _frame(message: Message) -> bytes:
    body = message.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def binary_header(value: str | None) -> bytes:
    """A ``-bin`` metadata value (base64, padding optional) as bytes; b"" when absent or
    malformed."""
    if not value:
        return b""
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except ValueError:
        return b""


# ---------------------------------------------------------------------- one call
class _Call:
    """One stream's client state: its response messages and how it ended."""

    __slots__ = ("conn", "sid", "max_bytes", "buf", "messages", "error", "ended", "trailers",
                 "headers_seen", "wake", "drained")

    def __init__(self, conn: _Connection, sid: int, max_bytes: int) -> None:
        self.conn = conn
        self.sid = sid
        self.max_bytes = max_bytes
        self.buf = bytearray()
        self.messages: deque[bytes] = deque()
        self.error: RpcError | None = None
        self.ended = False  # the response is over (OK or not)
        self.trailers: HeaderBlock | None = None
        self.headers_seen = False
        self.wake = asyncio.Event()  # a message arrived or the call ended
        self.drained = asyncio.Event()  # our queued DATA has left (or the call ended)
        self.drained.set()

    # -- events
    def on_headers(self, hb: HeaderBlock, end_stream: bool) -> None:
        if not self.headers_seen:
            self.headers_seen = True
            status = hb.get(":status")
            if status != "200" and hb.get("grpc-status") is None:
                code = _HTTP_TO_CODE.get(int(status) if status and status.isdigit() else 0,
                                         Code.UNKNOWN)
                self.finish(RpcError(code, f"HTTP status {status} without a gRPC status"))
                return
            if not end_stream:
                return
        if not end_stream:
            self.finish(RpcError(Code.INTERNAL, "trailers without END_STREAM"))
            return
        self.trailers = hb
        raw = hb.get("grpc-status")
        if raw is None or not raw.isdigit():
            self.finish(RpcError(Code.INTERNAL, f"response ended with grpc-status {raw!r}"))
            return
        code = int(raw)
        if code == 0:
            if self.buf:
                self.finish(RpcError(Code.INTERNAL, "response ended inside a message"))
            else:
                self.finish(None)
            return
        try:
            status = Code(code)
        except ValueError:
            status = Code.UNKNOWN
        details = G.percent_decode(hb.get("grpc-message") or "")
        self.finish(RpcError(status, " ".join(details.split()), hb))

    def on_data(self, data: bytes | memoryview, end_stream: bool) -> None:
        if self.ended:
            return
        buf = self.buf
        buf += data
        while len(buf) >= 5:
            if buf[0] != 0:
                self.fail(Code.INTERNAL, "compressed response message (none was asked for)")
                return
            n = int.from_bytes(buf[1:5], "big")
            if n > self.max_bytes:
                self.fail(Code.RESOURCE_EXHAUSTED,
                          f"response message of {n} bytes is over the {self.max_bytes} limit")
                return
            if len(buf) < 5 + n:
                break
            self.messages.append(bytes(buf[5:5 + n]))
            del buf[:5 + n]
            if len(self.messages) > MAX_UNREAD_MESSAGES:
                self.fail(Code.RESOURCE_EXHAUSTED, "too many response messages unread")
                return
            self.wake.set()
        if end_stream:
            self.finish(RpcError(Code.INTERNAL, "response ended without trailers"))

    def fail(self, code: Code, details: str) -> None:
        """End the call locally with ``code`` and reset its stream."""
        if not self.ended:
            self.finish(RpcError(code, details))
            self.conn.reset(self.sid, F.CANCEL if code == Code.CANCELLED else F.INTERNAL_ERROR)

    def finish(self, error: RpcError | None) -> None:
        if self.ended:
            return
        self.ended = True
        self.error = error
        self.conn.calls.pop(self.sid, None)
        self.wake.set()
        self.drained.set()

    # -- the caller's side
    def send(self, data: bytes, end_stream: bool) -> None:
        conn = self.conn
        if self.ended:
            return
        conn.conn.send_data(self.sid, data, end_stream)
        st = conn.conn.streams.get(self.sid)
        if st is not None and st.outbox:
            self.drained.clear()

    async def read(self) -> bytes | None:
        """The next response message; None once the call ended OK; RpcError otherwise."""
        while True:
            if self.messages:
                return self.messages.popleft()
            if self.ended:
                if self.error is not None:
                    raise self.error
                return None
            self.wake.clear()
            await self.wake.wait()


# ---------------------------------------------------------------------- one connection
class _Connection(asyncio.Protocol):
    """Drives one client H2Connection from an asyncio transport."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits, address: str) -> None:
        self.loop = loop
        self.address = address
        self.conn = H2Connection(client=True, limits=limits)
        self.conn.on_output = self._want_flush
        self.conn.on_event = self._on_event
        self.calls: dict[int, _Call] = {}
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._flush_scheduled = False
        self._tick: asyncio.TimerHandle | None = None

    @property
    def usable(self) -> bool:
        return not self.lost and self.transport is not None and self.conn.can_open_stream()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate()
        self._tick = self.loop.call_later(1.0, self._new_window)

    def _new_window(self) -> None:
        self.conn.new_window()  # the core's per-second flood budgets start over
        if not self.lost:
            self._tick = self.loop.call_later(1.0, self._new_window)

    def data_received(self, data: bytes) -> None:
        self._dispatch(self.conn.receive(data))
        self._flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._tick is not None:
            self._tick.cancel()
        why = f"connection to {self.address} lost" + (f": {exc}" if exc else "")
        for call in list(self.calls.values()):
            call.finish(RpcError(Code.UNAVAILABLE, why))

    def _on_event(self, conn: H2Connection) -> None:
        self._dispatch(conn.take_events())

    def _dispatch(self, events: list[Event]) -> None:
        calls = self.calls
        for ev in events:
            if isinstance(ev, DataReceived):
                call = calls.get(ev.stream_id)
                n = len(ev.data)
                if call is not None:
                    call.on_data(ev.data, ev.end_stream)
                if n and not ev.end_stream:
                    self.conn.ack_data(ev.stream_id, n)
            elif isinstance(ev, HeadersReceived):
                call = calls.get(ev.stream_id)
                if call is not None:
                    call.on_headers(ev.headers, ev.end_stream)
            elif isinstance(ev, DataSent):
                call = calls.get(ev.stream_id)
                st = self.conn.streams.get(ev.stream_id)
                if call is not None and (st is None or not st.outbox):
                    call.drained.set()
            elif isinstance(ev, StreamReset):
                call = calls.get(ev.stream_id)
                if call is not None:
                    refused = ev.unprocessed or ev.error_code == F.REFUSED_STREAM
                    call.finish(RpcError(
                        Code.UNAVAILABLE if refused else
                        Code.CANCELLED if ev.error_code == F.CANCEL else Code.INTERNAL,
                        f"stream reset by {self.address} (HTTP/2 error {ev.error_code})"))
            elif isinstance(ev, HeadersRejected):
                call = calls.get(ev.stream_id)
                if call is not None:
                    call.fail(Code.INTERNAL, f"response headers refused: {ev.reason}")
            elif isinstance(ev, ConnectionTerminated):
                for call in list(calls.values()):
                    call.finish(RpcError(Code.UNAVAILABLE,
                                         f"connection to {self.address} ended: {ev.reason}"))
                self._flush()
                if self.transport is not None:
                    self.transport.close()
            elif isinstance(ev, GoAwayReceived):
                pass  # no new streams here (can_open_stream); those past its id are reset

    def _want_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self.conn.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def reset(self, sid: int, code: int) -> None:
        self.conn.reset_stream(sid, code)

    def open(self, headers: bytes, max_bytes: int) -> _Call:
        st = self.conn.open_stream()
        call = _Call(self, st.id, max_bytes)
        self.calls[st.id] = call
        self.conn.send_headers(st.id, headers, False)
        return call

    def close(self) -> None:
        for call in list(self.calls.values()):
            call.fail(Code.CANCELLED, "channel closed")
        self.conn.goaway()
        self._flush()
        if self.transport is not None:
            self.transport.close()


# ---------------------------------------------------------------------- the channel
class Channel:
    """Calls to one address over one HTTP/2 connection (see the module's docstring).

    ``tls``: a client context (``client_tls``; None = h2c); ``server_hostname``: the name the
    server's certificate must carry (default: the address's host); ``max_message_bytes``:
    cap on one response message; ``connect_timeout_s``: TCP + TLS + nothing more (s)."""

    def __init__(self, address: str, *, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 connect_timeout_s: float = 10.0, limits: Limits | None = None) -> None:
        self.address = address
        self.host, self.port = split_address(address)
        self.tls = tls
        self.server_hostname = server_hostname or self.host
        self.max_message_bytes = max_message_bytes
        self.connect_timeout_s = connect_timeout_s
        self.limits = limits or Limits()
        self._scheme = "https" if tls is not None else "http"
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self.connections_made = 0

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """End the connection; calls still open fail CANCELLED. Idempotent."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        async with self._lock:
            if self._closed:
                raise RpcError(Code.CANCELLED, "channel closed")
            conn = self._conn
            if conn is not None and conn.usable:
                return conn
            if conn is not None:
                conn.close()
            loop = asyncio.get_running_loop()
            proto = _Connection(loop, self.limits, self.address)
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    transport, _ = await loop.create_connection(
                        lambda: proto, self.host, self.port, ssl=self.tls,
                        server_hostname=self.server_hostname if self.tls is not None else None)
            except TimeoutError:
                raise RpcError(Code.UNAVAILABLE, f"cannot connect to {self.address}: no answer "
                                                 f"in {self.connect_timeout_s:g}s") from None
            except (OSError, ssl.SSLError, ssl.CertificateError) as exc:
                raise RpcError(Code.UNAVAILABLE,
                               f"cannot connect to {self.address}: {_one_line(exc)}") from None
            if self.tls is not None:
                sslobj = transport.get_extra_info("ssl_object")
                if sslobj is None or sslobj.selected_alpn_protocol() != "h2":
                    transport.abort()
                    raise RpcError(Code.UNAVAILABLE,
                                   f"{self.address} did not negotiate HTTP/2 (ALPN h2)")
            self._conn = proto
            self.connections_made += 1
            return proto

    def _headers(self, method: str, timeout_s: float | None,
                 metadata: Sequence[tuple[str, str]]) -> bytes:
        fields = [(":method", "POST"), (":scheme", self._scheme), (":path", method),
                  (":authority", self.address), ("te", "trailers"),
                  ("content-type", "application/grpc"), ("user-agent", USER_AGENT)]
        if timeout_s is not None:
            fields.append(("grpc-timeout", G.format_timeout(timeout_s)))
        fields.extend(metadata)
        return encode_block(fields)

    async def _open(self, method: str, timeout_s: float | None,
                    metadata: Sequence[tuple[str, str]]) -> _Call:
        conn = await self._connection()
        if not conn.usable:
            raise RpcError(Code.UNAVAILABLE, f"connection to {self.address} is going away")
        return conn.open(self._headers(method, timeout_s, metadata), self.max_message_bytes)

    async def unary(self, method: str, request: Message, response_type: type[M], *,
                    timeout_s: float, metadata: Sequence[tuple[str, str]] = ()) -> M:
        """One request, one response (``method``: ``/package.Service/Method``)."""
        response, _ = await self.unary_with_trailers(method, request, response_type,
                                                     timeout_s=timeout_s, metadata=metadata)
        return response

    async def unary_with_trailers(self, method: str, request: Message, response_type: type[M],
                                  *, timeout_s: float, metadata: Sequence[tuple[str, str]] = ()
                                  ) -> tuple[M, HeaderBlock | None]:
        """``unary``, also returning the response's trailers (their ``lookup`` reads any
        field; ``binary_header`` decodes a ``-bin`` one)."""
        call: _Call | None = None
        try:
            async with asyncio.timeout(timeout_s):
                call = await self._open(method, timeout_s, metadata)
                call.send(_frame(request), True)
                body = await call.read()
                if body is None:
                    raise RpcError(Code.INTERNAL, "the response carried no message")
                if await call.read() is not None:
                    raise RpcError(Code.INTERNAL, "the response carried more than one message")
        except TimeoutError:
            if call is not None:
                call.fail(Code.DEADLINE_EXCEEDED, "deadline exceeded")
            raise RpcError(Code.DEADLINE_EXCEEDED,
                           f"{method} to {self.address}: no answer in {timeout_s:g}s") from None
        except asyncio.CancelledError:
            if call is not None:
                call.fail(Code.CANCELLED, "cancelled")
            raise
        return _parse(response_type, body), call.trailers

    async def open_stream(self, method: str, response_type: type[M], *,
                          metadata: Sequence[tuple[str, str]] = ()) -> StreamCall[M]:
        """A bidirectional stream, open once this returns (connecting first if needed)."""
        async with asyncio.timeout(self.connect_timeout_s):
            call = await self._open(method, None, metadata)
        return StreamCall(call, response_type, method)


class StreamCall(Generic[M]):
    """One bidirectional stream: ``write`` messages, ``read`` them, ``cancel`` it."""

    def __init__(self, call: _Call, response_type: type[M], method: str) -> None:
        self._call = call
        self._type = response_type
        self.method = method

    async def write(self, message: Message) -> None:
        """Send one message; returns once the peer's flow-control windows took it. Raises
        the call's RpcError when it has ended."""
        call = self._call
        if call.ended:
            raise call.error or RpcError(Code.INTERNAL, "stream already ended")
        call.send(_frame(message), False)
        await call.drained.wait()
        if call.ended and call.error is not None:
            raise call.error

    async def done_writing(self) -> None:
        """Half-close: no more messages from us."""
        self._call.send(b"", True)

    async def read(self) -> M | None:
        """The next message; None when the peer ended the stream with OK."""
        body = await self._call.read()
        return None if body is None else _parse(self._type, body)

    def cancel(self) -> None:
        """Reset the stream (CANCEL); reads and writes then fail CANCELLED."""
        self._call.fail(Code.CANCELLED, "cancelled")


def _parse(response_type: Any, body: bytes) -> Any:
    try:
        return response_type.FromString(body)
    except Exception as exc:  # protobuf's DecodeError, whichever implementation
        raise RpcError(Code.INTERNAL, f"unreadable response message: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
