"""The sans-IO HTTP/2 connection: two of them (client and server role) driven against each
other in memory, plus hostile byte streams fed to a server."""

from __future__ import annotations

import pytest
from hpack import Encoder
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_common.limits import KiB, Limits, MiB
from sidecar.http2 import frames as F
from sidecar.http2.connection import H2Connection
from sidecar.http2.events import (
    ConnectionTerminated,
    DataReceived,
    DataSent,
    Event,
    GoAwayReceived,
    HeadersReceived,
    HeadersRejected,
    PingAcked,
    SettingsChanged,
    StreamEnded,
    StreamReset,
)
from sidecar.http2.headers import encode_block

FAST = settings(deadline=None, max_examples=50)
FUZZ = settings(deadline=None, max_examples=2000)

REQUEST = encode_block([(":method", "POST"), (":scheme", "http"), (":path", "/echo.Echo/Say"),
                        (":authority", "echo"), ("content-type", "application/grpc"),
                        ("te", "trailers")])
RESPONSE = encode_block([(":status", "200"), ("content-type", "application/grpc")])
TRAILERS = encode_block([("grpc-status", "0")])


class Pair:
    """A client-role and a server-role connection wired back to back in memory."""

    def __init__(self, client_limits: Limits | None = None, server_limits: Limits | None = None,
                 handshake: bool = True) -> None:
        self.c = H2Connection(client=True, limits=client_limits or Limits())
        self.s = H2Connection(client=False, limits=server_limits or Limits())
        self.c_events: list[Event] = []
        self.s_events: list[Event] = []
        self.c_wire: list[bytes] = []  # bytes the client received
        self.s_wire: list[bytes] = []  # bytes the server received
        self.c.initiate()
        self.s.initiate()
        if handshake:
            self.pump()

    def pump(self) -> None:
        """Move bytes both ways until neither side has anything to send."""
        while True:
            moved = False
            out = self.c.data_to_send()
            if out:
                moved = True
                self.s_wire.append(out)
                self.s_events += self.s.receive(out)
            out = self.s.data_to_send()
            if out:
                moved = True
                self.c_wire.append(out)
                self.c_events += self.c.receive(out)
            self.c_events += self.c.take_events()
            self.s_events += self.s.take_events()
            if not moved:
                return

    def take(self) -> tuple[list[Event], list[Event]]:
        c, s = self.c_events, self.s_events
        self.c_events, self.s_events = [], []
        return c, s


def frames_of(raw: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    if raw.startswith(F.PREFACE):
        pos = len(F.PREFACE)
    while pos + 9 <= len(raw):
        length, ftype, flags, sid = F.parse_frame_header(raw, pos)
        out.append((ftype, flags, sid, raw[pos + 9:pos + 9 + length]))
        pos += 9 + length
    return out


def of(events: list[Event], kind: type) -> list:
    return [e for e in events if type(e) is kind]


# ---------------------------------------------------------------- handshake and a call
def test_settings_exchange() -> None:
    server_limits = Limits(max_concurrent_streams=7, stream_window_bytes=100_000,
                           connection_window_bytes=300_000)
    p = Pair(server_limits=server_limits)
    c_events, s_events = p.take()
    assert of(c_events, SettingsChanged) and of(s_events, SettingsChanged)
    assert p.c.peer_settings_seen and p.s.peer_settings_seen
    assert p.c.peer_max_streams == 7
    assert p.c.peer_initial_window == 100_000
    assert p.c.conn_send_window == 300_000  # the server's WINDOW_UPDATE for its extra window
    assert p.s.peer_initial_window == Limits().stream_window_bytes
    assert p.s.conn_send_window == Limits().connection_window_bytes
    # Both sides acked the other's SETTINGS exactly once.
    for wire in (p.c_wire, p.s_wire):
        acks = [f for f in frames_of(b"".join(wire)) if f[0] == F.SETTINGS and f[1] & F.FLAG_ACK]
        assert len(acks) == 1
    assert not p.c.closed and not p.s.closed


def test_request_and_response_with_trailers() -> None:
    p = Pair()
    p.take()
    st = p.c.open_stream()
    assert st.id == 1
    p.c.send_headers(1, REQUEST, False)
    assert p.c.send_data(1, b"hello", True) == 5
    p.pump()
    _, s_events = p.take()
    (h,) = of(s_events, HeadersReceived)
    assert h.first and not h.end_stream and h.stream_id == 1
    assert h.headers.get(":path") == "/echo.Echo/Say" and h.headers.get(":authority") == "echo"
    (d,) = of(s_events, DataReceived)
    assert (d.data, d.end_stream) == (b"hello", True)
    p.s.send_headers(1, RESPONSE, False)
    p.s.send_data(1, b"world", False)
    p.s.send_trailers(1, TRAILERS)
    p.pump()
    c_events, s_events = p.take()
    heads = of(c_events, HeadersReceived)
    assert [(x.first, x.end_stream) for x in heads] == [(True, False), (False, True)]
    assert heads[0].headers.get(":status") == "200"
    assert heads[1].headers.get("grpc-status") == "0"
    assert [x.data for x in of(c_events, DataReceived)] == [b"world"]
    assert [e.stream_id for e in of(c_events, StreamEnded)] == [1]
    assert [e.stream_id for e in of(s_events, StreamEnded)] == [1]
    assert p.c.streams == {} and p.s.streams == {}
    assert p.s.last_peer_stream == 1 and p.c.next_stream_id == 3


def test_header_block_over_the_frame_size_is_reassembled_from_continuations() -> None:
    lim = Limits(max_header_list_bytes=128 * KiB, max_frame_bytes=16384)
    p = Pair(client_limits=lim, server_limits=lim)
    p.take()
    fields = [(":method", "POST"), (":path", "/x/Y"), *[(f"x-h{i}", "v" * 1000) for i in range(40)]]
    p.c.open_stream()
    p.c.send_headers(1, encode_block(fields), True)
    raw = p.c.data_to_send()
    kinds = [f[0] for f in frames_of(raw)]
    assert kinds[0] == F.HEADERS and kinds.count(F.CONTINUATION) >= 2
    _, s_events = p.take()
    events = p.s.receive(raw)
    (h,) = of(events, HeadersReceived)
    assert h.end_stream and h.headers.get(":path") == "/x/Y"
    assert h.headers.list_bytes == sum(len(n) + len(v) + 32 for n, v in fields)


def test_headers_over_the_list_limit_reject_the_stream_only() -> None:
    p = Pair(server_limits=Limits(max_header_list_bytes=1024))
    p.take()
    p.c.open_stream()
    p.c.send_headers(1, encode_block([(":path", "/a/B"), ("x-big", "v" * 1500)]), False)
    p.c.open_stream()
    p.c.send_headers(3, REQUEST, True)
    p.pump()
    _, s_events = p.take()
    assert [(e.stream_id, e.first) for e in of(s_events, HeadersRejected)] == [(1, True)]
    assert [e.stream_id for e in of(s_events, HeadersReceived)] == [3]
    assert not p.s.closed


# ---------------------------------------------------------------- flow control
def _drain_with_acks(p: Pair, sid: int, window: int, ack_every: int,
                     received: int) -> tuple[int, int]:
    """Let the server consume in steps, acking ``ack_every`` bytes at a time; check the
    client never has more than ``window`` unacknowledged bytes in flight. ``received``:
    bytes already delivered (and not yet acked). Returns (bytes received, DataSent total)."""
    acked = sent_events = 0
    for _ in range(10_000):
        p.pump()
        c_events, s_events = p.take()
        sent_events += sum(e.sent for e in of(c_events, DataSent) if e.stream_id == sid)
        for d in of(s_events, DataReceived):
            received += len(d.data)
        assert received - acked <= window
        assert not of(s_events, StreamReset) and not p.s.closed
        if acked == received:
            break
        n = min(ack_every, received - acked)
        p.s.ack_data(sid, n)
        acked += n
    return received, sent_events


def test_sender_never_exceeds_the_stream_window() -> None:
    p = Pair(server_limits=Limits(stream_window_bytes=65535))
    p.take()
    p.c.open_stream()
    p.c.send_headers(1, REQUEST, False)
    payload = bytes(range(256)) * (4 * KiB)  # 1 MiB
    first = p.c.send_data(1, payload, True)
    assert first == 65535
    p.pump()
    _, s_events = p.take()
    assert sum(len(d.data) for d in of(s_events, DataReceived)) == 65535
    assert p.c.streams[1].outbox_bytes == MiB - 65535
    p.pump()  # nothing more moves without credit
    assert not p.take()[1]
    received, sent_events = _drain_with_acks(p, 1, 65535, 10_000, 65535)
    assert received == MiB
    assert first + sent_events == MiB
    assert 1 not in p.c.streams or not p.c.streams[1].outbox


def test_sender_never_exceeds_the_connection_window_across_streams() -> None:
    p = Pair(server_limits=Limits(stream_window_bytes=MiB, connection_window_bytes=65535))
    p.take()
    for _ in range(3):
        st = p.c.open_stream()
        p.c.send_headers(st.id, REQUEST, False)
    sent = {sid: p.c.send_data(sid, b"x" * 50_000, True) for sid in (1, 3, 5)}
    assert sent == {1: 50_000, 3: 15_535, 5: 0}
    total_sent = sum(sent.values())
    received = acked = 0
    for _ in range(1000):
        p.pump()
        c_events, s_events = p.take()
        total_sent += sum(e.sent for e in of(c_events, DataSent))
        got = [(d.stream_id, len(d.data)) for d in of(s_events, DataReceived)]
        received += sum(n for _, n in got)
        assert p.c.conn_send_window >= 0  # the sender never runs past the connection window
        assert not p.s.closed
        if not got and received == acked:
            break
        for sid, n in got:
            p.s.ack_data(sid, n)
            acked += n
    assert total_sent == received == 150_000


def test_connection_credit_returns_as_data_arrives_so_a_stalled_stream_starves_no_other() -> None:
    p = Pair(server_limits=Limits(stream_window_bytes=MiB, connection_window_bytes=65535))
    p.take()
    for _ in range(2):
        st = p.c.open_stream()
        p.c.send_headers(st.id, REQUEST, False)
    # Stream 1 fills the whole connection window and its receiver never acks it.
    assert p.c.send_data(1, b"x" * 65535, False) == 65535
    p.pump()
    p.take()
    # Stream 3 can still send: the server returned connection credit on receipt.
    assert p.c.send_data(3, b"y" * 1000, True) == 1000
    p.pump()
    _, s_events = p.take()
    assert sum(len(d.data) for d in of(s_events, DataReceived) if d.stream_id == 3) == 1000
    assert not p.s.closed


def test_settings_change_of_initial_window_moves_open_streams() -> None:
    p = Pair(server_limits=Limits(stream_window_bytes=65535))
    p.take()
    p.c.open_stream()
    p.c.send_headers(1, REQUEST, False)
    assert p.c.send_data(1, b"x" * 100_000, True) == 65535
    p.pump()
    p.take()
    # The server raises its initial window: the blocked stream gets the difference at once.
    p.c_events += p.c.receive(F.settings_frame({F.SETTINGS_INITIAL_WINDOW_SIZE: 100_000}))
    assert sum(e.sent for e in of(p.c.take_events() + p.c_events, DataSent)) == 100_000 - 65535


def test_pause_holds_data_and_resume_flushes_it() -> None:
    p = Pair()
    p.take()
    p.c.open_stream()
    p.c.send_headers(1, REQUEST, False)
    p.c.set_paused(True)
    assert p.c.send_data(1, b"abc", True) == 0
    p.pump()
    assert not of(p.take()[1], DataReceived)
    events = p.c.set_paused(False)
    assert [(type(e), e.sent) for e in events if type(e) is DataSent] == [(DataSent, 3)]
    p.pump()
    assert [d.data for d in of(p.take()[1], DataReceived)] == [b"abc"]


def test_ack_data_returns_credit_in_batches() -> None:
    p = Pair(server_limits=Limits(stream_window_bytes=65535))
    p.take()
    p.c.open_stream()
    p.c.send_headers(1, REQUEST, False)
    p.c.send_data(1, b"x" * 20_000, False)
    p.pump()
    p.take()
    p.s.ack_data(1, 100)  # below a quarter of the window: no frame yet
    assert not [f for f in frames_of(p.s.data_to_send()) if f[0] == F.WINDOW_UPDATE]
    p.s.ack_data(1, 19_900)
    updates = [f for f in frames_of(p.s.data_to_send()) if f[0] == F.WINDOW_UPDATE]
    assert [(f[2], F.unpack_u32(f[3])) for f in updates] == [(1, 20_000)]


# ---------------------------------------------------------------- streams, GOAWAY, PING
def test_server_refuses_streams_over_its_limit() -> None:
    p = Pair(server_limits=Limits(max_concurrent_streams=2))
    p.take()
    for _ in range(3):
        st = p.c.open_stream()
        p.c.send_headers(st.id, REQUEST, False)
    assert not p.c.can_open_stream()
    p.pump()
    c_events, s_events = p.take()
    assert [e.stream_id for e in of(s_events, HeadersReceived)] == [1, 3]
    assert [(e.stream_id, e.error_code) for e in of(c_events, StreamReset)] == [(5, F.REFUSED_STREAM)]
    rst = [f for f in frames_of(b"".join(p.c_wire)) if f[0] == F.RST_STREAM]
    assert [(f[2], F.unpack_u32(f[3])) for f in rst] == [(5, F.REFUSED_STREAM)]
    assert len(p.s.streams) == 2 and sorted(p.c.streams) == [1, 3]
    # A finished stream makes room again.
    p.c.send_data(1, b"", True)
    p.s.send_headers(1, RESPONSE, False)
    p.s.send_trailers(1, TRAILERS)
    p.pump()
    assert p.c.can_open_stream()


def test_goaway_makes_unprocessed_client_streams_reset_as_unprocessed() -> None:
    p = Pair()
    p.take()
    p.c.open_stream()
    p.c.send_headers(1, REQUEST, False)
    p.pump()
    p.take()
    p.s.goaway()  # last_stream_id = 1
    for _ in range(2):
        st = p.c.open_stream()
        p.c.send_headers(st.id, REQUEST, True)
    p.pump()
    c_events, s_events = p.take()
    (g,) = of(c_events, GoAwayReceived)
    assert (g.last_stream_id, g.error_code) == (1, F.NO_ERROR)
    resets = [(e.stream_id, e.error_code, e.unprocessed) for e in of(c_events, StreamReset)]
    assert resets == [(3, F.REFUSED_STREAM, True), (5, F.REFUSED_STREAM, True)]
    assert not of(s_events, HeadersReceived)  # the server never processed them
    assert not p.c.can_open_stream()
    # Stream 1 still completes.
    p.c.send_data(1, b"x", True)
    p.s.send_headers(1, RESPONSE, False)
    p.s.send_trailers(1, TRAILERS)
    p.pump()
    c_events, s_events = p.take()
    assert [e.stream_id for e in of(c_events, StreamEnded)] == [1]
    assert [d.data for d in of(s_events, DataReceived)] == [b"x"]


def test_second_goaway_can_only_lower_last_stream_id() -> None:
    p = Pair()
    p.take()
    for _ in range(3):
        st = p.c.open_stream()
        p.c.send_headers(st.id, REQUEST, False)
    p.pump()
    events = p.c.receive(F.goaway_frame(3, F.NO_ERROR) + F.goaway_frame(5, F.NO_ERROR))
    assert [e.last_stream_id for e in of(events, GoAwayReceived)] == [3, 3]
    assert [e.stream_id for e in of(events, StreamReset)] == [5]


def test_ping_gets_an_ack() -> None:
    p = Pair()
    p.take()
    p.c.ping(b"12345678")
    p.pump()
    c_events, _ = p.take()
    assert [e.opaque for e in of(c_events, PingAcked)] == [b"12345678"]
    acks = [f for f in frames_of(b"".join(p.c_wire)) if f[0] == F.PING]
    assert acks == [(F.PING, F.FLAG_ACK, 0, b"12345678")]


def test_peer_reset_ends_the_stream_with_its_code() -> None:
    p = Pair()
    p.take()
    p.c.open_stream()
    p.c.send_headers(1, REQUEST, False)
    p.pump()
    p.take()
    p.s.reset_stream(1, F.CANCEL)
    p.pump()
    c_events, _ = p.take()
    assert [(e.stream_id, e.error_code) for e in of(c_events, StreamReset)] == [(1, F.CANCEL)]
    assert 1 not in p.c.streams and 1 not in p.s.streams


# ---------------------------------------------------------------- protocol violations
def _server(limits: Limits | None = None) -> H2Connection:
    s = H2Connection(client=False, limits=limits or Limits())
    s.initiate()
    s.receive(F.PREFACE + F.settings_frame())
    s.data_to_send()
    return s


def _terminated(conn: H2Connection, data: bytes, code: int) -> None:
    events = conn.receive(data)
    terminated = of(events, ConnectionTerminated)
    assert [e.error_code for e in terminated] == [code], events
    goaways = [f for f in frames_of(conn.data_to_send()) if f[0] == F.GOAWAY]
    assert [F.unpack_goaway(f[3])[1] for f in goaways] == [code]
    assert conn.closed
    assert conn.receive(F.ping_frame(b"8bytes!!")) == []  # nothing more is processed
    assert conn.data_to_send() == b""


def _headers(sid: int, block: bytes = REQUEST, flags: int = F.FLAG_END_HEADERS) -> bytes:
    return F.frame_header(len(block), F.HEADERS, flags, sid) + block


VIOLATIONS = {
    "DATA on stream 0": (F.data_frame(0, b"x", False), F.PROTOCOL_ERROR),
    "frame over max size": (F.frame_header(Limits().max_frame_bytes + 1, F.DATA, 0, 1),
                            F.FRAME_SIZE_ERROR),
    "even stream id from a client": (_headers(2), F.PROTOCOL_ERROR),
    "HEADERS on stream 0": (_headers(0), F.PROTOCOL_ERROR),
    "DATA on an idle stream": (F.data_frame(9, b"x", False), F.PROTOCOL_ERROR),
    "connection window overflow": (F.window_update_frame(0, 2**31 - 1), F.FLOW_CONTROL_ERROR),
    "WINDOW_UPDATE of 0 on the connection": (F.window_update_frame(0, 0), F.PROTOCOL_ERROR),
    "bad HPACK": (_headers(1, b"\x80"), F.COMPRESSION_ERROR),
    "bad Huffman in a value": (_headers(1, b"\x00\x01x\x81\x00"), F.COMPRESSION_ERROR),
    "PUSH_PROMISE": (F.frame_header(4, F.PUSH_PROMISE, 0, 1) + b"\0\0\0\2", F.PROTOCOL_ERROR),
    "SETTINGS on a stream": (F.frame_header(0, F.SETTINGS, 0, 1), F.PROTOCOL_ERROR),
    "SETTINGS of odd length": (F.frame_header(5, F.SETTINGS, 0, 0) + b"\0" * 5, F.FRAME_SIZE_ERROR),
    "SETTINGS ack with payload": (F.frame_header(6, F.SETTINGS, 1, 0) + b"\0" * 6, F.FRAME_SIZE_ERROR),
    "bad max frame size": (F.settings_frame({F.SETTINGS_MAX_FRAME_SIZE: 100}), F.PROTOCOL_ERROR),
    "initial window too large": (F.settings_frame({F.SETTINGS_INITIAL_WINDOW_SIZE: 2**31}),
                                 F.FLOW_CONTROL_ERROR),
    "PING of 7 bytes": (F.frame_header(7, F.PING, 0, 0) + b"\0" * 7, F.FRAME_SIZE_ERROR),
    "PING on a stream": (F.frame_header(8, F.PING, 0, 1) + b"\0" * 8, F.PROTOCOL_ERROR),
    "GOAWAY too short": (F.frame_header(4, F.GOAWAY, 0, 0) + b"\0" * 4, F.FRAME_SIZE_ERROR),
    "RST_STREAM on stream 0": (F.rst_stream_frame(0, 0), F.PROTOCOL_ERROR),
    "RST_STREAM on an idle stream": (F.rst_stream_frame(11, 0), F.PROTOCOL_ERROR),
    "PRIORITY on stream 0": (F.frame_header(5, F.PRIORITY, 0, 0) + b"\0" * 5, F.PROTOCOL_ERROR),
    "CONTINUATION without HEADERS": (F.frame_header(1, F.CONTINUATION, 4, 3) + b"\x82",
                                     F.PROTOCOL_ERROR),
    "interleaved frame in a header block": (_headers(3, REQUEST[:3], 0) + F.ping_frame(b"x" * 8),
                                            F.PROTOCOL_ERROR),
    "padding longer than the frame": (F.frame_header(3, F.DATA, F.FLAG_PADDED, 1) + b"\x05ab",
                                      F.PROTOCOL_ERROR),
}


@pytest.mark.parametrize(("data", "code"), VIOLATIONS.values(), ids=VIOLATIONS.keys())
def test_protocol_violation_terminates_with_goaway(data: bytes, code: int) -> None:
    s = _server()
    assert of(s.receive(_headers(1)), HeadersReceived)  # one open stream
    _terminated(s, data, code)


def test_bad_preface_terminates_with_protocol_error() -> None:
    s = H2Connection(client=False, limits=Limits())
    s.initiate()
    s.data_to_send()
    _terminated(s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", F.PROTOCOL_ERROR)


def test_bad_preface_is_detected_before_it_is_complete() -> None:
    s = H2Connection(client=False, limits=Limits())
    assert s.receive(F.PREFACE[:10]) == []
    _terminated(s, b"X", F.PROTOCOL_ERROR)


def test_preface_in_single_bytes() -> None:
    s = H2Connection(client=False, limits=Limits())
    for i in range(len(F.PREFACE)):
        assert s.receive(F.PREFACE[i:i + 1]) == []
    assert of(s.receive(F.settings_frame()), SettingsChanged)


def test_continuation_flood_is_enhance_your_calm() -> None:
    lim = Limits(max_header_list_bytes=1024)
    s = _server(lim)
    flood = _headers(1, b"\x00\x01a\x01b", 0)
    chunk = b"\x00\x01a\x01b" * 120  # 600 bytes, never END_HEADERS
    for _ in range(3):  # 1805 bytes: under 2 x the list limit, still assembling
        flood += F.frame_header(len(chunk), F.CONTINUATION, 0, 1) + chunk
    assert s.receive(flood) == [] and not s.closed
    _terminated(s, F.frame_header(len(chunk), F.CONTINUATION, 0, 1) + chunk, F.ENHANCE_YOUR_CALM)


def test_stream_window_overflow_resets_the_stream_only() -> None:
    s = _server()
    s.receive(_headers(1))
    events = s.receive(F.window_update_frame(1, 2**31 - 1))
    assert [(e.stream_id, e.error_code) for e in of(events, StreamReset)] == [(1, F.FLOW_CONTROL_ERROR)]
    rst = [f for f in frames_of(s.data_to_send()) if f[0] == F.RST_STREAM]
    assert [F.unpack_u32(f[3]) for f in rst] == [F.FLOW_CONTROL_ERROR]
    assert not s.closed


def test_connection_credit_is_returned_in_quarter_window_steps_without_acks() -> None:
    s = _server(Limits(stream_window_bytes=MiB, connection_window_bytes=65535))
    s.receive(_headers(1))
    s.data_to_send()
    events = s.receive(F.data_frame(1, b"x" * 16000, False))
    assert sum(len(e.data) for e in of(events, DataReceived)) == 16000
    assert s.data_to_send() == b""  # under a quarter of the window: no update yet
    s.receive(F.data_frame(1, b"x" * 1000, False))
    assert s.data_to_send() == F.window_update_frame(0, 17000)  # no ack_data was needed
    assert s.conn_recv_window == 65535 and not s.closed


def test_data_over_the_stream_window_resets_the_stream() -> None:
    s = _server(Limits(stream_window_bytes=65535))
    s.receive(_headers(1))
    data = b"".join(F.data_frame(1, b"x" * 16383, False) for _ in range(4))
    events = s.receive(data + F.data_frame(1, b"yyyy", False))  # 65536 > 65535
    assert sum(len(e.data) for e in of(events, DataReceived)) == 4 * 16383
    assert [(e.stream_id, e.error_code) for e in of(events, StreamReset)] == [(1, F.FLOW_CONTROL_ERROR)]
    assert not s.closed


def test_data_after_end_stream_is_stream_closed() -> None:
    s = _server()
    s.receive(_headers(1, REQUEST, F.FLAG_END_HEADERS | F.FLAG_END_STREAM))
    events = s.receive(F.data_frame(1, b"late", False))
    assert [(e.stream_id, e.error_code) for e in of(events, StreamReset)] == [(1, F.STREAM_CLOSED)]
    assert not s.closed


# ---------------------------------------------------------------- padding and priority
def test_padded_headers_with_priority_and_padded_data() -> None:
    s = _server(Limits(stream_window_bytes=65535))
    pad = 7
    payload = bytes([pad]) + b"\x80\x00\x00\x03\x10" + REQUEST + b"\0" * pad
    frame = F.frame_header(len(payload), F.HEADERS,
                           F.FLAG_END_HEADERS | F.FLAG_PADDED | F.FLAG_PRIORITY, 1) + payload
    events = s.receive(frame)
    (h,) = of(events, HeadersReceived)
    assert h.headers.get(":path") == "/echo.Echo/Say"
    assert not h.end_stream
    data_payload = bytes([10]) + b"body" + b"\0" * 10
    events = s.receive(F.frame_header(len(data_payload), F.DATA,
                                      F.FLAG_PADDED | F.FLAG_END_STREAM, 1) + data_payload)
    (d,) = of(events, DataReceived)
    assert (d.data, d.end_stream) == (b"body", True)
    # Padding counts against the window and its stream credit is owed at once; the data's is
    # not (the owner acks it). Connection credit is owed for all of it.
    st = s.streams[1]
    assert st.recv_window + st.owed == 65535 - 4
    assert s.conn_recv_window + s.conn_owed == Limits().connection_window_bytes


def test_headers_priority_fields_alone_and_priority_frames() -> None:
    s = _server()
    payload = b"\x00\x00\x00\x00\x20" + REQUEST
    events = s.receive(F.frame_header(len(payload), F.HEADERS,
                                      F.FLAG_END_HEADERS | F.FLAG_PRIORITY, 1) + payload)
    assert of(events, HeadersReceived)
    events = s.receive(F.frame_header(5, F.PRIORITY, 0, 1) + b"\0\0\0\0\x10")
    assert events == []
    events = s.receive(F.frame_header(5, F.PRIORITY, 0, 99) + b"\0\0\0\0\x10")  # idle: fine
    assert events == [] and not s.closed
    events = s.receive(F.frame_header(4, F.PRIORITY, 0, 1) + b"\0\0\0\0")
    assert [(e.stream_id, e.error_code) for e in of(events, StreamReset)] == [(1, F.FRAME_SIZE_ERROR)]
    _terminated(s, F.frame_header(4, F.HEADERS, F.FLAG_END_HEADERS | F.FLAG_PRIORITY, 3) + b"\0" * 4,
                F.FRAME_SIZE_ERROR)


def test_unknown_frame_types_are_ignored() -> None:
    s = _server()
    assert s.receive(F.frame_header(3, 0xEE, 0xFF, 5) + b"abc") == []
    assert of(s.receive(_headers(1)), HeadersReceived)


# ---------------------------------------------------------------- hostile byte streams
ENC_FIELDS = st.lists(st.tuples(st.sampled_from([":path", ":method", ":authority", "te", "x-a",
                                                 "grpc-timeout", "connection"]),
                                st.text(alphabet="abcxyz019/mS", max_size=20)), max_size=6)
STREAM_IDS = st.sampled_from([0, 1, 2, 3, 5, 7, 9, 11, 13, 101, 2**31 - 1])


def _block(draw) -> bytes:
    pairs = draw(ENC_FIELDS)
    if draw(st.booleans()):
        block = encode_block(pairs)
    else:
        enc = Encoder()
        enc.header_table_size = draw(st.sampled_from([0, 4096]))
        block = enc.encode(pairs, huffman=draw(st.booleans()))
    if draw(st.integers(0, 4)) == 0:  # a big block: over the list limit, or part of a flood
        block += encode_block([("x-pad", "p" * draw(st.integers(100, 1500)))])
    return block


def _hostile_frame(draw) -> bytes:
    """Any type, random flags, stream id, length and payload; or plain garbage."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=40))
    kind = draw(st.integers(0, 12) | st.integers(0, 255))
    flags = draw(st.sampled_from([0, 1, 4, 5, 8, 0x20, 0x24, 0x2D, 0xFF]) | st.integers(0, 255))
    sid = draw(STREAM_IDS)
    size = {F.RST_STREAM: 4, F.WINDOW_UPDATE: 4, F.PING: 8, F.GOAWAY: 8, F.PRIORITY: 5}.get(kind)
    if kind in (F.HEADERS, F.CONTINUATION, F.PUSH_PROMISE):
        payload = draw(st.binary(max_size=6)) + _block(draw)
    elif size is not None and draw(st.booleans()):
        payload = draw(st.binary(min_size=size, max_size=size))
    else:
        payload = draw(st.binary(max_size=60))
    return F.frame_header(len(payload), kind, flags, sid) + payload


@st.composite
def frame_sequences(draw, max_frames: int) -> list[bytes]:
    """Frames a (mis)behaving client might send: mostly valid for the streams it has opened
    (so streams open, windows fill, limits are hit), with hostile frames mixed in."""
    out: list[bytes] = []
    opened: list[int] = []
    next_id = 1
    cont: int | None = None  # a header block in progress on this stream
    rest = b""  # what its CONTINUATION frames still have to carry
    for _ in range(draw(st.integers(0, max_frames))):
        if draw(st.integers(0, 11)) == 0:
            out.append(_hostile_frame(draw))
            continue
        if cont is not None:
            cut = draw(st.integers(0, len(rest)))
            piece, rest = rest[:cut], rest[cut:]
            flags = 0 if rest else F.FLAG_END_HEADERS
            out.append(F.frame_header(len(piece), F.CONTINUATION, flags, cont) + piece)
            if flags:
                cont = None
            continue
        existing = draw(st.sampled_from(opened)) if opened else 1
        kind = draw(st.sampled_from(["new", "new", "headers", "data", "data", "window", "rst",
                                     "settings", "ping", "priority", "goaway", "unknown"]))
        if not opened and kind in ("headers", "data", "rst"):
            kind = "new"
        if kind in ("new", "headers"):
            if kind == "new":
                sid, next_id = next_id, next_id + 2
                opened.append(sid)
            else:
                sid = existing
            flags = draw(st.sampled_from([4, 5, 4, 5, 0, 1, 0x0C, 0x24, 0x2D]))
            payload = _block(draw)
            if not flags & F.FLAG_END_HEADERS:
                cut = draw(st.integers(0, len(payload)))
                payload, rest = payload[:cut], payload[cut:]
            if flags & F.FLAG_PRIORITY:
                payload = draw(st.binary(min_size=5, max_size=5)) + payload
            if flags & F.FLAG_PADDED:
                pad = draw(st.integers(0, 20))
                payload = bytes([pad]) + payload + b"\0" * pad
            out.append(F.frame_header(len(payload), F.HEADERS, flags, sid) + payload)
            if not flags & F.FLAG_END_HEADERS:
                cont = sid
        elif kind == "data":
            flags = draw(st.sampled_from([0, 0, 1, 8, 9]))
            payload = draw(st.binary(max_size=300) | st.integers(0, 16384).map(lambda n: b"\0" * n))
            if flags & F.FLAG_PADDED:
                payload = bytes([draw(st.integers(0, min(255, len(payload))))]) + payload
            out.append(F.frame_header(len(payload), F.DATA, flags, existing) + payload)
        elif kind == "window":
            sid = draw(st.sampled_from([0, existing])) if opened else 0
            inc = draw(st.sampled_from([1, 1000, 16384, 65535, 70_000, 2**31 - 1, 0]))
            out.append(F.window_update_frame(sid, inc))
        elif kind == "rst":
            out.append(F.rst_stream_frame(existing, draw(st.integers(0, 13))))
        elif kind == "settings":
            items = draw(st.lists(st.sampled_from([
                (F.SETTINGS_INITIAL_WINDOW_SIZE, 0), (F.SETTINGS_INITIAL_WINDOW_SIZE, 65535),
                (F.SETTINGS_INITIAL_WINDOW_SIZE, 2**31 - 1), (F.SETTINGS_MAX_FRAME_SIZE, 16384),
                (F.SETTINGS_MAX_FRAME_SIZE, 100_000), (F.SETTINGS_MAX_CONCURRENT_STREAMS, 1),
                (F.SETTINGS_HEADER_TABLE_SIZE, 0), (F.SETTINGS_ENABLE_PUSH, 0), (0x99, 7),
            ]), max_size=3))
            out.append(F.settings_frame(dict(items), ack=not items and draw(st.booleans())))
        elif kind == "ping":
            out.append(F.ping_frame(b"p" * 8, ack=draw(st.booleans())))
        elif kind == "priority":
            out.append(F.frame_header(5, F.PRIORITY, 0, draw(st.sampled_from([existing, next_id])))
                       + draw(st.binary(min_size=5, max_size=5)))
        elif kind == "goaway":
            out.append(F.goaway_frame(draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 15))))
        else:
            payload = draw(st.binary(max_size=40))
            out.append(F.frame_header(len(payload), draw(st.integers(10, 255)), 0, existing) + payload)
    return out


HOSTILE_LIMITS = Limits(max_concurrent_streams=3, max_header_list_bytes=1024,
                        stream_window_bytes=65535, connection_window_bytes=65535 * 2)


def _feed_hostile(frames: list[bytes], cuts: list[int], drain: list[bool]) -> None:
    conn = H2Connection(client=False, limits=HOSTILE_LIMITS)
    conn.initiate()
    conn.data_to_send()
    stream = F.PREFACE + F.settings_frame() + b"".join(frames)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {len(stream)})
    prev = 0
    for i, p in enumerate(points):
        events = conn.receive(stream[prev:p])
        prev = p
        assert isinstance(events, list)
        assert len(conn._in) < 9 + conn.max_frame
        assert len(conn.streams) <= HOSTILE_LIMITS.max_concurrent_streams
        for st_ in conn.streams.values():
            assert not st_.outbox and st_.outbox_bytes == 0 and st_.outbox_trailers is None
        assert not conn._blocked
        if drain[i % len(drain)]:
            conn.data_to_send()
        if conn.closed:
            assert of(events, ConnectionTerminated) or events == []
    conn.data_to_send()


@FAST
@given(frames=frame_sequences(30),
       cuts=st.lists(st.integers(0, 1 << 20), max_size=30),
       drain=st.lists(st.booleans(), min_size=1, max_size=4))
def test_hostile_frame_sequences_never_raise_and_stay_bounded(frames, cuts, drain) -> None:
    _feed_hostile(frames, cuts, drain)


@pytest.mark.fuzz
@pytest.mark.timeout(900)
@FUZZ
@given(frames=frame_sequences(50),
       cuts=st.lists(st.integers(0, 1 << 20), max_size=60),
       drain=st.lists(st.booleans(), min_size=1, max_size=4))
def test_fuzz_hostile_frame_sequences_never_raise_and_stay_bounded(frames, cuts, drain) -> None:
    _feed_hostile(frames, cuts, drain)


# ---------------------------------------------------------------- reads cut anywhere
def _norm(events: list[Event]) -> list[tuple]:
    """Events as comparable tuples (DATA payloads as bytes, whatever buffer type they are)."""
    out: list[tuple] = []
    for e in events:
        if type(e) is DataReceived:
            out.append(("data", e.stream_id, bytes(e.data), e.end_stream))
        elif type(e) is HeadersReceived:
            out.append(("headers", e.stream_id, tuple(e.headers.fields.items()), e.end_stream, e.first))
        else:
            out.append((type(e).__name__, *(getattr(e, k) for k in e.__slots__)))
    return out


@st.composite
def valid_client_streams(draw) -> bytes:
    """A client's valid byte stream: preface, SETTINGS, calls whose DATA frames range from empty
    to 64 KiB (both sides of the core's copy threshold), PINGs and WINDOW_UPDATEs between."""
    frames = [F.PREFACE, F.settings_frame()]
    for i in range(draw(st.integers(1, 4))):
        sid = 1 + 2 * i
        frames.append(F.frame_header(len(REQUEST), F.HEADERS, F.FLAG_END_HEADERS, sid) + REQUEST)
        sizes = draw(st.lists(st.sampled_from([0, 5, 1024, 1025, 4000, 16384, 40000, 65536]),
                              min_size=1, max_size=3))
        for j, n in enumerate(sizes):
            payload = bytes((sid + j + k) & 0xFF for k in range(min(n, 251))) * (n // 251 + 1)
            last = j == len(sizes) - 1
            frames.append(F.data_frame(sid, payload[:n], last))
        if draw(st.booleans()):
            frames.append(F.ping_frame(b"12345678"))
        if draw(st.booleans()):
            frames.append(F.window_update_frame(0, 1000))
    return b"".join(frames)


def _run_in_pieces(stream: bytes, cuts: list[int]) -> tuple[list[tuple], bytes]:
    conn = H2Connection(client=False, limits=Limits(stream_window_bytes=MiB, connection_window_bytes=4 * MiB))
    conn.initiate()
    conn.data_to_send()
    points = sorted({c % (len(stream) + 1) for c in cuts} | {len(stream)})
    events: list[Event] = []
    prev = 0
    for p in points:
        events += conn.receive(stream[prev:p])
        prev = p
        assert len(conn._in) < 9 + conn.max_frame  # at most one partial frame is held
    assert not conn.closed
    return _norm(events), conn.data_to_send()


@FAST
@given(stream=valid_client_streams(), cuts=st.lists(st.integers(0, 1 << 19), max_size=40))
def test_reads_cut_anywhere_give_the_same_events_and_answers_as_one_read(stream, cuts) -> None:
    whole = _run_in_pieces(stream, [])
    assert _run_in_pieces(stream, cuts) == whole
    assert sum(len(e[2]) for e in whole[0] if e[0] == "data") == sum(
        len(p) for t, _, _, p in frames_of(stream) if t == F.DATA)


def test_reads_one_byte_at_a_time_give_the_same_events() -> None:
    stream = F.PREFACE + F.settings_frame() + F.frame_header(len(REQUEST), F.HEADERS, F.FLAG_END_HEADERS, 1) \
        + REQUEST + F.data_frame(1, b"a" * 3000, False) + F.data_frame(1, b"b" * 7, True)
    assert _run_in_pieces(stream, list(range(len(stream)))) == _run_in_pieces(stream, [])


@pytest.mark.parametrize("size", [1, 1024, 1025, 16384, 16385, 100_000])
@pytest.mark.parametrize("as_view", [False, True])
def test_large_payloads_go_out_intact_split_at_the_peer_frame_size(size: int, as_view: bool) -> None:
    p = Pair(server_limits=Limits(stream_window_bytes=MiB, connection_window_bytes=4 * MiB,
                                  max_frame_bytes=16384))
    sid = p.c.open_stream().id
    p.c.send_headers(sid, REQUEST, False)
    body = bytes(range(256)) * (size // 256 + 1)
    body = body[:size]
    sent = p.c.send_data(sid, memoryview(body) if as_view else body, True)
    p.pump()
    got = of(p.take()[1], DataReceived)
    assert b"".join(bytes(d.data) for d in got) == body
    assert got[-1].end_stream and all(len(d.data) <= 16384 for d in got)
    assert len(got) == -(-size // 16384)
    assert sent == size
