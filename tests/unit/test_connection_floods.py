"""Flood guards of the sans-IO HTTP/2 core: per-second budgets (rapid reset, control frames,
empty frames), the CONTINUATION cap, error kinds, the preface flag and the zero-window
bookkeeping the driver's stall detection reads.

Every flood test shows both sides of its limit: a peer just under it is served (and a stream
it opened before goes on working), one frame over it gets GOAWAY ENHANCE_YOUR_CALM with the
budget's kind; ``new_window()`` gives the budget back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_common.limits import Limits
from sidecar.http2 import frames as F
from sidecar.http2.connection import WINDOW_UPDATES_PER_FRAME, H2Connection
from sidecar.http2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    HeadersReceived,
    PingAcked,
    StreamReset,
)
from sidecar.http2.headers import encode_block
from tests.unit.test_connection import (
    REQUEST,
    RESPONSE,
    TRAILERS,
    VIOLATIONS,
    Pair,
    _headers,
    _server,
    frame_sequences,
    frames_of,
    of,
)

FAST = settings(deadline=None, max_examples=60)
FUZZ = settings(deadline=None, max_examples=2000)

FLOOD_KINDS = {"rapid_reset", "control_flood", "empty_frame_flood", "continuation_flood"}
ALL_KINDS = FLOOD_KINDS | {"header_block_too_large", "frame_size", "bad_hpack", "bad_preface",
                           "flow_control", "protocol_error"}


# ---------------------------------------------------------------- helpers
def _flooded(conn: H2Connection, data: bytes, kind: str, reason: str) -> None:
    """``data`` ends ``conn`` with GOAWAY ENHANCE_YOUR_CALM for ``kind``; nothing after it."""
    events = conn.receive(data)
    assert [e.error_code for e in of(events, ConnectionTerminated)] == [F.ENHANCE_YOUR_CALM], events
    assert conn.closed and conn.error_kind == kind
    goaways = [f for f in frames_of(conn.data_to_send()) if f[0] == F.GOAWAY]
    assert [F.unpack_goaway(f[3])[1] for f in goaways] == [F.ENHANCE_YOUR_CALM]
    assert reason in goaways[0][3][8:].decode()
    assert conn.receive(F.ping_frame(b"8bytes!!")) == []
    assert conn.data_to_send() == b""


def _healthy_stream_works(conn: H2Connection, sid: int = 1) -> None:
    """Stream ``sid`` (opened before the flood) still carries a whole call both ways."""
    events = conn.receive(F.data_frame(sid, b"request", True))
    assert [(e.data, e.end_stream) for e in of(events, DataReceived)] == [(b"request", True)]
    conn.send_headers(sid, RESPONSE, False)
    assert conn.send_data(sid, b"response", False) == 8
    conn.send_trailers(sid, TRAILERS)
    out = frames_of(conn.data_to_send())
    assert [(f[0], f[2]) for f in out][-3:] == [(F.HEADERS, sid), (F.DATA, sid), (F.HEADERS, sid)]
    assert not conn.closed and conn.error_kind is None


def _server_with_stream(limits: Limits) -> H2Connection:
    """A server past its handshake with stream 1 open, at the start of a fresh budget window."""
    s = _server(limits)
    assert of(s.receive(_headers(1)), HeadersReceived)
    s.data_to_send()
    s.new_window()
    return s


def _rst(sid: int, code: int = F.CANCEL) -> bytes:
    return F.rst_stream_frame(sid, code)


def _cont(sid: int, piece: bytes, end: bool = False) -> bytes:
    return F.frame_header(len(piece), F.CONTINUATION, F.FLAG_END_HEADERS if end else 0, sid) + piece


def _priority(sid: int) -> bytes:
    return F.frame_header(5, F.PRIORITY, 0, sid) + b"\0\0\0\0\x10"


def _unknown(sid: int = 0) -> bytes:
    return F.frame_header(3, 0xEE, 0, sid) + b"abc"


# ---------------------------------------------------------------- rapid reset
RESET_LIMITS = Limits(max_resets_per_s=20)


def _pairs(first_sid: int, count: int) -> bytes:
    """HEADERS and at once RST_STREAM, ``count`` times (the rapid-reset attack)."""
    return b"".join(_headers(sid) + _rst(sid) for sid in range(first_sid, first_sid + 2 * count, 2))


def test_rapid_reset_just_under_the_budget_is_served() -> None:
    s = _server_with_stream(RESET_LIMITS)
    events = s.receive(_pairs(3, 20))
    assert len(of(events, HeadersReceived)) == 20
    assert [e.error_code for e in of(events, StreamReset)] == [F.CANCEL] * 20
    assert not s.closed and list(s.streams) == [1]
    _healthy_stream_works(s)


def test_rapid_reset_over_the_budget_gets_enhance_your_calm() -> None:
    s = _server_with_stream(RESET_LIMITS)
    s.receive(_pairs(3, 20))
    assert not s.closed
    _flooded(s, _pairs(43, 1), "rapid_reset", "rapid reset: more than 20 RST_STREAM in a second")


def test_rapid_reset_in_one_burst_stops_at_the_first_reset_over() -> None:
    s = _server_with_stream(RESET_LIMITS)
    events = s.receive(_pairs(3, 100))
    assert s.error_kind == "rapid_reset"
    assert len(of(events, StreamReset)) == 20  # the 21st reset was never processed
    assert len(of(events, HeadersReceived)) == 21
    assert of(events, ConnectionTerminated)[0].error_code == F.ENHANCE_YOUR_CALM


def test_new_window_restores_the_reset_budget() -> None:
    s = _server_with_stream(RESET_LIMITS)
    sid = 3
    for _ in range(5):  # 100 resets over five "seconds": 20 in each
        s.receive(_pairs(sid, 20))
        sid += 40
        s.new_window()
    assert not s.closed
    _healthy_stream_works(s)


def test_cancelling_calls_under_the_budget_stays_fine() -> None:
    """A client that cancels some of its calls (deadlines, hedging) keeps its connection."""
    p = Pair(server_limits=RESET_LIMITS)
    p.take()
    for _round in range(3):
        ids = []
        for _ in range(30):
            stream = p.c.open_stream()
            p.c.send_headers(stream.id, REQUEST, False)
            ids.append(stream.id)
        p.pump()
        for i, sid in enumerate(ids):
            if i % 2:
                p.c.reset_stream(sid, F.CANCEL)  # 15 cancels a round
            else:
                p.c.send_data(sid, b"x", True)
                p.s.send_headers(sid, RESPONSE, False)
                p.s.send_trailers(sid, TRAILERS)
        p.pump()
        p.s.new_window()
    _, s_events = p.take()
    assert not p.s.closed and not p.c.closed
    assert len(of(s_events, StreamReset)) == 45 and not p.s.streams and not p.c.streams


def test_resets_the_peer_provokes_count_as_resets() -> None:
    """WINDOW_UPDATE of 0 on a stream makes us reset it: a reset on the attacker's behalf."""
    s = _server_with_stream(RESET_LIMITS)
    opened = b"".join(_headers(sid) for sid in range(3, 3 + 2 * 21, 2))
    s.receive(opened)
    provoke = b"".join(F.window_update_frame(sid, 0) for sid in range(3, 3 + 2 * 20, 2))
    events = s.receive(provoke)
    assert [e.error_code for e in of(events, StreamReset)] == [F.PROTOCOL_ERROR] * 20
    assert not s.closed
    _flooded(s, F.window_update_frame(43, 0), "rapid_reset", "rapid reset")


def test_refused_streams_are_counted_and_count_as_resets_once_our_limit_is_known() -> None:
    lim = Limits(max_concurrent_streams=2, max_resets_per_s=5)
    s = _server(lim)
    s.receive(_headers(1) + _headers(3))
    # Before it acknowledged our SETTINGS the peer may not know the limit: refused, not counted.
    events = s.receive(b"".join(_headers(sid) for sid in range(5, 5 + 2 * 10, 2)))
    assert not of(events, HeadersReceived) and not s.closed
    rst = [f for f in frames_of(s.data_to_send()) if f[0] == F.RST_STREAM]
    assert [F.unpack_u32(f[3]) for f in rst] == [F.REFUSED_STREAM] * 10
    assert s.refused_streams == 10
    s.receive(F.settings_frame(ack=True))
    s.new_window()
    s.receive(b"".join(_headers(sid) for sid in range(25, 25 + 2 * 5, 2)))
    assert s.refused_streams == 15 and not s.closed
    _flooded(s, _headers(35), "rapid_reset", "rapid reset")
    assert s.refused_streams == 16


def test_streams_refused_after_our_goaway_are_not_counted_as_refused() -> None:
    s = _server(Limits(max_concurrent_streams=2))
    s.receive(_headers(1))
    s.goaway()
    s.receive(_headers(3) + _headers(5) + _headers(7))
    assert s.refused_streams == 0 and not s.closed


# ---------------------------------------------------------------- control frames
CONTROL_LIMITS = Limits(max_control_frames_per_s=30)

CONTROL_FRAMES = {
    "PING": lambda i: F.ping_frame(i.to_bytes(8, "big")),
    "SETTINGS": lambda i: F.settings_frame({F.SETTINGS_MAX_CONCURRENT_STREAMS: 100 + i}),
    "empty SETTINGS": lambda i: F.settings_frame(),
    "PRIORITY": lambda i: _priority(1),
    "PRIORITY on idle streams": lambda i: _priority(1001 + 2 * i),
    "unknown type": lambda i: _unknown(i % 3),
    "WINDOW_UPDATE (connection)": lambda i: F.window_update_frame(0, 1),
    "WINDOW_UPDATE (stream)": lambda i: F.window_update_frame(1, 1),
    "unsolicited PING ACK": lambda i: F.ping_frame(b"noonesnt", ack=True),
    "GOAWAY": lambda i: F.goaway_frame(2**31 - 1, F.NO_ERROR),
}


@pytest.mark.parametrize("make", CONTROL_FRAMES.values(), ids=CONTROL_FRAMES.keys())
def test_control_frames_just_under_the_budget_are_served(make) -> None:
    s = _server_with_stream(CONTROL_LIMITS)
    s.receive(b"".join(make(i) for i in range(30)))
    assert not s.closed
    _healthy_stream_works(s)


@pytest.mark.parametrize("make", CONTROL_FRAMES.values(), ids=CONTROL_FRAMES.keys())
def test_control_frames_over_the_budget_get_enhance_your_calm(make) -> None:
    s = _server_with_stream(CONTROL_LIMITS)
    s.receive(b"".join(make(i) for i in range(30)))
    assert not s.closed
    _flooded(s, make(30), "control_flood", "control flood: more than 30 control frames")


def test_control_frame_kinds_share_one_budget() -> None:
    s = _server_with_stream(CONTROL_LIMITS)
    mix = [make(i) for i in range(6) for make in (CONTROL_FRAMES["PING"],
                                                   CONTROL_FRAMES["SETTINGS"],
                                                   CONTROL_FRAMES["PRIORITY"],
                                                   CONTROL_FRAMES["unknown type"],
                                                   CONTROL_FRAMES["WINDOW_UPDATE (connection)"])]
    s.receive(b"".join(mix))  # 30 frames, six of each kind
    assert not s.closed
    _flooded(s, _unknown(), "control_flood", "control flood")


def test_a_ping_flood_is_stopped_before_it_is_answered() -> None:
    s = _server_with_stream(CONTROL_LIMITS)
    s.receive(b"".join(F.ping_frame(b"x" * 8) for _ in range(1000)))
    assert s.error_kind == "control_flood"
    out = frames_of(s.data_to_send())
    assert len([f for f in out if f[0] == F.PING]) == 30  # 30 acks, then GOAWAY
    assert out[-1][0] == F.GOAWAY


def test_new_window_restores_the_control_budget() -> None:
    s = _server_with_stream(CONTROL_LIMITS)
    for _ in range(10):
        s.receive(b"".join(F.ping_frame(b"keepaliv") for _ in range(30)))
        s.new_window()
    assert not s.closed
    _healthy_stream_works(s)


def test_a_settings_ack_of_our_settings_is_free_but_a_second_one_is_counted() -> None:
    s = _server_with_stream(Limits(max_control_frames_per_s=1))
    s.receive(F.settings_frame(ack=True))  # acknowledges our SETTINGS
    s.receive(F.settings_frame(ack=True))  # acknowledges nothing: counted (1)
    assert not s.closed
    _flooded(s, F.settings_frame(ack=True), "control_flood", "control flood")


def test_acks_of_our_pings_are_free() -> None:
    s = _server_with_stream(Limits(max_control_frames_per_s=2))
    for i in range(50):
        s.ping(i.to_bytes(8, "big"))
        events = s.receive(F.ping_frame(i.to_bytes(8, "big"), ack=True))
        assert len(of(events, PingAcked)) == 1
    assert not s.closed


def _download(s: H2Connection, frames: int, sid: int = 1) -> None:
    """The server sends ``frames`` one-byte DATA frames on ``sid`` (windows allow them)."""
    for _ in range(frames):
        assert s.send_data(sid, b"d", False) == 1
    s.data_to_send()


def test_window_updates_for_the_data_we_sent_are_free() -> None:
    """A client that returns credit for every DATA frame it receives, on the stream and on
    the connection, at a rate far over the control budget, keeps its connection."""
    s = _server_with_stream(CONTROL_LIMITS)
    for _ in range(3):
        _download(s, 500)
        updates = b"".join(F.window_update_frame(0, 1) + F.window_update_frame(1, 1)
                           for _ in range(500))
        s.receive(updates)
        assert not s.closed
        s.new_window()
    assert s.window_opened == 3000
    _healthy_stream_works(s)


def test_window_updates_beyond_the_allowance_are_control_frames() -> None:
    s = _server_with_stream(CONTROL_LIMITS)
    _download(s, 100)
    allowance = WINDOW_UPDATES_PER_FRAME * 100
    s.receive(b"".join(F.window_update_frame(1, 1) for _ in range(allowance + 30)))
    assert not s.closed
    _flooded(s, F.window_update_frame(0, 1), "control_flood", "control flood")


def test_the_window_update_allowance_does_not_carry_over_to_the_next_window() -> None:
    s = _server_with_stream(CONTROL_LIMITS)
    _download(s, 100)
    s.receive(b"".join(F.window_update_frame(1, 1) for _ in range(10)))
    s.new_window()  # the unused allowance is gone with its second
    s.receive(b"".join(F.window_update_frame(1, 1) for _ in range(30)))
    assert not s.closed
    _flooded(s, F.window_update_frame(1, 1), "control_flood", "control flood")


def test_window_update_allowance_covers_a_stream_opened_in_the_window() -> None:
    """A client may widen each new stream's window before any DATA came back on it."""
    s = _server_with_stream(Limits(max_control_frames_per_s=5))
    for second in range(4):
        first = 3 + 200 * second
        frames = b"".join(_headers(sid) + F.window_update_frame(sid, 1 << 20)
                          for sid in range(first, first + 2 * 50, 2))
        s.receive(frames)
        assert not s.closed
        for sid in list(s.streams):
            if sid != 1:
                s.reset_stream(sid, F.CANCEL)
        s.new_window()


def test_grpc_like_traffic_with_bdp_pings_stays_fine() -> None:
    """A gRPC client probing bandwidth: one PING per few DATA frames it receives, plus its
    window updates, for several seconds, far over the control budget in frame count."""
    small = Limits(stream_window_bytes=65535, connection_window_bytes=65535)
    p = Pair(client_limits=small, server_limits=Limits(max_control_frames_per_s=10))
    p.take()
    stream = p.c.open_stream()
    p.c.send_headers(stream.id, REQUEST, False)
    p.pump()
    p.s.send_headers(stream.id, RESPONSE, False)
    for second in range(3):
        for i in range(400):
            p.s.send_data(stream.id, b"m" * 100, False)
            if i % 4 == 3:
                p.c.ping(f"bdp{second}{i:04d}"[:8].encode())
            p.pump()
            c_events, _ = p.take()
            for e in of(c_events, DataReceived):
                p.c.ack_data(e.stream_id, len(e.data))
        p.s.new_window()
    assert not p.s.closed and not p.c.closed
    # Keepalive PINGs with no DATA in between are still counted, and fine under the budget.
    for i in range(10):
        p.c.ping(f"ka{i:06d}".encode())
    p.pump()
    assert not p.s.closed
    p.c.send_data(stream.id, b"", True)
    p.s.send_trailers(stream.id, TRAILERS)
    p.pump()
    assert not p.s.streams and not p.c.streams


def test_pings_with_no_data_between_them_are_counted() -> None:
    s = _server_with_stream(CONTROL_LIMITS)
    _download(s, 1)
    s.receive(F.ping_frame(b"free-one"))  # follows DATA we sent: free
    s.receive(b"".join(F.ping_frame(b"counted!") for _ in range(30)))
    assert not s.closed
    _flooded(s, F.ping_frame(b"too-many"), "control_flood", "control flood")


# ---------------------------------------------------------------- empty frames
EMPTY_LIMITS = Limits(max_empty_frames_per_s=20)


def test_empty_data_frames_just_under_the_budget_are_served() -> None:
    s = _server_with_stream(EMPTY_LIMITS)
    s.receive(b"".join(F.data_frame(1, b"", False) for _ in range(20)))
    assert not s.closed
    _healthy_stream_works(s)


def test_empty_data_flood_gets_enhance_your_calm() -> None:
    s = _server_with_stream(EMPTY_LIMITS)
    s.receive(b"".join(F.data_frame(1, b"", False) for _ in range(20)))
    _flooded(s, F.data_frame(1, b"", False), "empty_frame_flood",
             "empty frame flood: more than 20 empty frames in a second")


def test_padding_only_data_frames_count_as_empty() -> None:
    s = _server_with_stream(EMPTY_LIMITS)
    padded = F.frame_header(4, F.DATA, F.FLAG_PADDED, 1) + b"\x03\0\0\0"
    s.receive(padded * 20)
    assert not s.closed
    _flooded(s, padded, "empty_frame_flood", "empty frame flood")


def test_empty_data_that_ends_a_stream_is_not_counted() -> None:
    s = _server_with_stream(EMPTY_LIMITS)
    frames = b"".join(_headers(sid) + F.data_frame(sid, b"", True) for sid in range(3, 3 + 2 * 60, 2))
    events = s.receive(frames)
    assert len([e for e in of(events, DataReceived) if e.end_stream]) == 60
    assert not s.closed


def test_empty_continuation_frames_across_header_blocks_share_the_budget() -> None:
    s = _server_with_stream(EMPTY_LIMITS)

    def block(sid: int) -> bytes:  # a whole request, then 5 empty CONTINUATION frames
        return (F.frame_header(len(REQUEST), F.HEADERS, 0, sid) + REQUEST
                + _cont(sid, b"") * 4 + _cont(sid, b"", end=True))

    events = s.receive(b"".join(block(sid) for sid in (3, 5, 7, 9)))  # 20 empty frames
    assert [e.stream_id for e in of(events, HeadersReceived)] == [3, 5, 7, 9]
    assert not s.closed
    _flooded(s, block(11), "empty_frame_flood", "empty frame flood")


def test_new_window_restores_the_empty_frame_budget() -> None:
    s = _server_with_stream(EMPTY_LIMITS)
    for _ in range(10):
        s.receive(b"".join(F.data_frame(1, b"", False) for _ in range(20)))
        s.new_window()
    assert not s.closed
    _healthy_stream_works(s)


def test_non_empty_data_is_never_counted() -> None:
    s = _server_with_stream(Limits(max_empty_frames_per_s=1, max_control_frames_per_s=1,
                                   max_resets_per_s=1))
    events = s.receive(b"".join(F.data_frame(1, b"x", False) for _ in range(5000)))
    assert len(of(events, DataReceived)) == 5000 and not s.closed
    assert (s._empty, s._control, s._resets) == (0, 0, 0)


# ---------------------------------------------------------------- CONTINUATION
CONT_LIMITS = Limits(max_continuation_frames=8)


def _split_request(sid: int, pieces: int, end: bool = True) -> bytes:
    """REQUEST padded with a field, as HEADERS plus ``pieces`` non-empty CONTINUATIONs."""
    block = REQUEST + encode_block([("x-pad", "p" * 200)])
    step = len(block) // (pieces + 1)
    out = F.frame_header(step, F.HEADERS, 0, sid) + block[:step]
    for i in range(pieces):
        last = i == pieces - 1
        piece = block[step * (i + 1):] if last else block[step * (i + 1):step * (i + 2)]
        out += _cont(sid, piece, end=end and last)
    return out


def test_a_header_block_with_the_most_continuations_allowed_is_served() -> None:
    s = _server_with_stream(CONT_LIMITS)
    events = s.receive(_split_request(3, 8))
    (h,) = of(events, HeadersReceived)
    assert h.stream_id == 3 and h.headers.get(":path") == "/echo.Echo/Say"
    assert not s.closed
    _healthy_stream_works(s)


def test_many_small_continuations_without_end_headers_are_a_flood() -> None:
    s = _server_with_stream(CONT_LIMITS)
    assert s.receive(_split_request(3, 8, end=False)) == [] and not s.closed
    _flooded(s, _cont(3, b"\x82"), "continuation_flood",
             "continuation flood: more than 8 CONTINUATION frames in a header block")


def test_empty_continuations_without_end_headers_are_a_flood() -> None:
    s = _server_with_stream(CONT_LIMITS)
    s.receive(F.frame_header(len(REQUEST), F.HEADERS, 0, 3) + REQUEST + _cont(3, b"") * 8)
    assert not s.closed
    _flooded(s, _cont(3, b""), "continuation_flood", "continuation flood")


def test_continuation_count_starts_over_with_each_header_block() -> None:
    s = _server_with_stream(CONT_LIMITS)
    events = s.receive(b"".join(_split_request(sid, 8) for sid in range(3, 3 + 2 * 20, 2)))
    assert len(of(events, HeadersReceived)) == 20 and not s.closed


def test_default_continuation_cap() -> None:
    s = _server_with_stream(Limits())
    s.receive(_split_request(3, 32, end=False))
    assert not s.closed
    _flooded(s, _cont(3, b"\x82"), "continuation_flood", "more than 32 CONTINUATION frames")


def test_the_header_block_byte_cap_stays() -> None:
    s = _server_with_stream(Limits(max_header_list_bytes=1024))
    chunk = b"\x00\x01a\x01b" * 120  # 600 bytes, never END_HEADERS
    s.receive(F.frame_header(len(chunk), F.HEADERS, 0, 3) + chunk + _cont(3, chunk) * 2)
    assert not s.closed
    _flooded(s, _cont(3, chunk), "header_block_too_large", "header block exceeds its size limit")


# ---------------------------------------------------------------- zero window
def _server_with_peer_window(window: int) -> H2Connection:
    s = H2Connection(client=False, limits=Limits())
    s.initiate()
    s.receive(F.PREFACE + F.settings_frame({F.SETTINGS_INITIAL_WINDOW_SIZE: window})
              + _headers(1) + _headers(3))
    s.data_to_send()
    return s


def test_blocked_bytes_grow_with_what_waits_for_the_peers_window() -> None:
    s = _server_with_peer_window(10)
    assert s.blocked_bytes() == 0 and s.window_opened == 0  # a smaller window opens nothing
    assert s.send_data(1, b"x" * 100, False) == 10
    assert s.blocked_bytes() == 90
    assert s.send_data(1, b"y" * 50, False) == 0
    assert s.send_data(3, b"z" * 30, True) == 10
    assert s.blocked_bytes() == 140 + 20
    events = s.receive(F.window_update_frame(1, 40))
    assert s.window_opened == 1 and s.blocked_bytes() == 100 + 20
    assert [(e.stream_id, e.sent) for e in events] == [(1, 40)]
    s.receive(F.window_update_frame(0, 1))  # the connection's window was never the limit
    assert s.window_opened == 2 and s.blocked_bytes() == 120
    s.receive(F.window_update_frame(1, 1000) + F.window_update_frame(3, 1000))
    assert s.window_opened == 4 and s.blocked_bytes() == 0


def test_a_shut_connection_window_blocks_every_stream() -> None:
    s = _server_with_peer_window(1 << 20)
    assert s.window_opened == 1  # its SETTINGS raised the initial window
    assert s.send_data(1, b"a" * 60_000, False) == 60_000
    assert s.send_data(3, b"b" * 10_000, False) == 5535  # the connection's 65535 are gone
    assert s.conn_send_window == 0 and s.blocked_bytes() == 10_000 - 5535
    s.receive(F.window_update_frame(0, 100_000))
    assert s.window_opened == 2 and s.blocked_bytes() == 0


def test_a_settings_window_increase_opens_windows() -> None:
    s = _server_with_peer_window(0)
    s.send_data(1, b"x" * 500, False)
    assert s.blocked_bytes() == 500
    s.receive(F.settings_frame({F.SETTINGS_INITIAL_WINDOW_SIZE: 0}))
    assert s.window_opened == 0
    s.receive(F.settings_frame({F.SETTINGS_INITIAL_WINDOW_SIZE: 65535}))
    assert s.window_opened == 1 and s.blocked_bytes() == 0


def test_window_updates_that_open_nothing_do_not_count_as_opened() -> None:
    s = _server_with_peer_window(0)
    s.send_data(1, b"x" * 500, False)
    s.receive(_headers(5) + _rst(5))
    s.receive(F.window_update_frame(5, 1000))  # a stream that is gone
    s.receive(F.window_update_frame(1, 0))  # zero: a stream error, not an opening
    assert s.window_opened == 0


def test_data_held_only_by_a_paused_transport_is_not_blocked() -> None:
    s = _server_with_peer_window(65535)
    s.set_paused(True)
    assert s.send_data(1, b"x" * 1000, False) == 0
    assert s.blocked_bytes() == 0  # the peer's windows are open: not its stall
    events = s.set_paused(False)
    assert [(e.stream_id, e.sent) for e in events] == [(1, 1000)]
    assert s.blocked_bytes() == 0


# ---------------------------------------------------------------- preface
def test_preface_received_on_the_server_after_magic_and_settings() -> None:
    s = H2Connection(client=False, limits=Limits())
    s.initiate()
    assert not s.preface_received
    s.receive(F.PREFACE[:10])
    assert not s.preface_received
    s.receive(F.PREFACE[10:] + F.settings_frame()[:5])
    assert not s.preface_received
    s.receive(F.settings_frame()[5:])
    assert s.preface_received and not s.closed


def test_preface_received_on_the_client_after_the_servers_settings() -> None:
    c = H2Connection(client=True, limits=Limits())
    c.initiate()
    assert not c.preface_received
    c.receive(F.settings_frame({F.SETTINGS_MAX_CONCURRENT_STREAMS: 10}))
    assert c.preface_received and c.peer_max_streams == 10


def test_a_pair_completes_both_prefaces() -> None:
    p = Pair()
    assert p.c.preface_received and p.s.preface_received


@pytest.mark.parametrize("client", [False, True], ids=["server", "client"])
@pytest.mark.parametrize("first", [F.ping_frame(b"12345678"), F.settings_frame(ack=True),
                                   F.window_update_frame(0, 100), _headers(1)],
                         ids=["PING", "SETTINGS ACK", "WINDOW_UPDATE", "HEADERS"])
def test_a_first_frame_other_than_settings_is_a_bad_preface(client: bool, first: bytes) -> None:
    conn = H2Connection(client=client, limits=Limits())
    conn.initiate()
    conn.data_to_send()
    magic = b"" if client else F.PREFACE
    assert conn.receive(magic + first[:4]) == [] and not conn.closed  # not yet decidable
    events = conn.receive(first[4:])
    assert [e.error_code for e in of(events, ConnectionTerminated)] == [F.PROTOCOL_ERROR]
    assert conn.error_kind == "bad_preface" and not conn.preface_received


def test_bad_magic_is_a_bad_preface() -> None:
    s = H2Connection(client=False, limits=Limits())
    s.receive(b"GET / HTTP/1.1\r\n")
    assert s.closed and s.error_kind == "bad_preface"


# ---------------------------------------------------------------- error kinds
KIND_OF_CODE = {F.PROTOCOL_ERROR: "protocol_error", F.FRAME_SIZE_ERROR: "frame_size",
                F.COMPRESSION_ERROR: "bad_hpack", F.FLOW_CONTROL_ERROR: "flow_control"}


@pytest.mark.parametrize(("data", "code"), VIOLATIONS.values(), ids=VIOLATIONS.keys())
def test_every_protocol_violation_names_its_kind(data: bytes, code: int) -> None:
    s = _server()
    s.receive(_headers(1))
    assert s.error_kind is None
    s.receive(data)
    assert s.closed and s.error_kind == KIND_OF_CODE[code]


def test_error_kind_stays_none_when_the_owner_ends_the_connection() -> None:
    s = _server()
    s.terminate(F.NO_ERROR, "idle")
    assert s.closed and s.error_kind is None


def test_budgets_belong_to_one_connection() -> None:
    attacker = _server_with_stream(RESET_LIMITS)
    healthy = _server_with_stream(RESET_LIMITS)
    healthy.receive(_pairs(3, 15))
    attacker.receive(_pairs(3, 100))
    assert attacker.error_kind == "rapid_reset"
    healthy.receive(_pairs(33, 5))  # 20 in this window: still within its own budget
    assert not healthy.closed
    _healthy_stream_works(healthy)


# ---------------------------------------------------------------- properties
TIGHT = {"max_resets_per_s": st.integers(1, 6), "max_control_frames_per_s": st.integers(1, 6),
         "max_empty_frames_per_s": st.integers(1, 6), "max_continuation_frames": st.integers(1, 4)}


@st.composite
def under_budget_traffic(draw, max_ops: int) -> tuple[Limits, list[bytes | None]]:
    """A client's frames, each valid, interleaved at random but kept within the spec's budgets
    (counted as the Limits docstrings say, every PING included); ``None`` marks the driver's
    ``new_window()`` and ``b"send"`` a one-byte DATA frame the server sends on stream 1."""
    lim = Limits(**{k: draw(v) for k, v in TIGHT.items()})
    ops: list[bytes | None] = []
    opened: list[int] = [1]
    next_id = 3
    resets = control = empty = updates = sent = new = 0

    def fresh_window() -> None:
        nonlocal resets, control, empty, updates, sent, new
        ops.append(None)
        resets = control = empty = updates = sent = new = 0

    for _ in range(draw(st.integers(0, max_ops))):
        kind = draw(st.sampled_from(["open", "split", "rst", "ping", "settings", "priority",
                                     "unknown", "update", "empty", "data", "send", "window"]))
        if kind == "window":
            fresh_window()
        elif kind in ("open", "split"):
            sid, next_id = next_id, next_id + 2
            if kind == "open":
                ops.append(_headers(sid))
            else:
                n = draw(st.integers(1, lim.max_continuation_frames))
                blanks = [draw(st.booleans()) for _ in range(n)]
                if empty + sum(blanks) > lim.max_empty_frames_per_s:
                    fresh_window()
                if sum(blanks) > lim.max_empty_frames_per_s:
                    blanks = [False] * n
                empty += sum(blanks)
                frame = F.frame_header(len(REQUEST), F.HEADERS, 0, sid) + REQUEST
                for i, blank in enumerate(blanks):
                    frame += _cont(sid, b"" if blank else b"\x00\x01a\x01b", end=i == n - 1)
                ops.append(frame)
            opened.append(sid)
            new += 1
        elif kind == "rst":
            if len(opened) < 2:
                continue
            if resets == lim.max_resets_per_s:
                fresh_window()
            sid = opened.pop(draw(st.integers(1, len(opened) - 1)))
            ops.append(_rst(sid))
            resets += 1
        elif kind in ("ping", "settings", "priority", "unknown", "update"):
            if kind == "update":
                if updates + 1 > 2 * sent + new and control == lim.max_control_frames_per_s:
                    fresh_window()
                updates += 1
                counted = updates > 2 * sent + new
                ops.append(F.window_update_frame(draw(st.sampled_from([0, 1])), 1))
            else:
                if control == lim.max_control_frames_per_s:
                    fresh_window()
                counted = True
                ops.append({"ping": F.ping_frame(b"p" * 8), "settings": F.settings_frame(),
                            "priority": _priority(draw(st.sampled_from(opened))),
                            "unknown": _unknown()}[kind])
            control += counted
        elif kind == "empty":
            if empty == lim.max_empty_frames_per_s:
                fresh_window()
            ops.append(F.data_frame(draw(st.sampled_from(opened)), b"", False))
            empty += 1
        elif kind == "data":
            ops.append(F.data_frame(draw(st.sampled_from(opened)), b"x", False))
        else:
            ops.append(b"send")
            sent += 1
    return lim, ops


def _drive(lim: Limits, ops: list[bytes | None], batch: list[bool]) -> H2Connection:
    s = H2Connection(client=False, limits=lim)
    s.initiate()
    s.receive(F.PREFACE + F.settings_frame() + _headers(1))
    s.new_window()
    pending = b""
    for i, op in enumerate(ops):
        if op is not None and op != b"send":
            pending += op
            if batch[i % len(batch)]:
                continue  # several frames in one read
        if pending:
            s.receive(pending)
            pending = b""
        if op is None:
            s.new_window()
        elif op == b"send":
            assert s.send_data(1, b"d", False) == 1
        s.data_to_send()
    s.receive(pending)
    return s


@FAST
@given(traffic=under_budget_traffic(60), batch=st.lists(st.booleans(), min_size=1, max_size=5))
def test_interleavings_under_the_budgets_never_end_the_connection(traffic, batch) -> None:
    lim, ops = traffic
    s = _drive(lim, ops, batch)
    assert not s.closed, s.error_kind
    assert s.error_kind is None
    assert 1 in s.streams


@st.composite
def over_budget_traffic(draw) -> tuple[Limits, bytes, str]:
    """Under-budget traffic, then one budget's frames until it must be exceeded."""
    lim = Limits(**{k: draw(v) for k, v in TIGHT.items()})
    which = draw(st.sampled_from(sorted(FLOOD_KINDS)))
    if which == "rapid_reset":
        flood = _pairs(1001, lim.max_resets_per_s + 1)
    elif which == "control_flood":
        makers = [CONTROL_FRAMES[k] for k in ("PING", "SETTINGS", "PRIORITY", "unknown type",
                                              "WINDOW_UPDATE (connection)")]
        flood = b"".join(draw(st.sampled_from(makers))(i)
                         for i in range(lim.max_control_frames_per_s + 1))
    elif which == "empty_frame_flood":
        flood = F.data_frame(1, b"", False) * (lim.max_empty_frames_per_s + 1)
    else:
        flood = (F.frame_header(len(REQUEST), F.HEADERS, 0, 1001) + REQUEST
                 + _cont(1001, b"\x82") * (lim.max_continuation_frames + 1))
    return lim, flood, which


@FAST
@given(case=over_budget_traffic(), cut=st.integers(0, 1 << 16))
def test_one_frame_over_any_budget_ends_the_connection_with_its_kind(case, cut) -> None:
    lim, flood, which = case
    s = H2Connection(client=False, limits=lim)
    s.initiate()
    s.receive(F.PREFACE + F.settings_frame() + _headers(1))
    s.new_window()
    cut %= len(flood) + 1
    events: list[Event] = s.receive(flood[:cut]) + s.receive(flood[cut:])
    assert s.closed and s.error_kind == which
    assert [e.error_code for e in of(events, ConnectionTerminated)] == [F.ENHANCE_YOUR_CALM]


def _feed_tight(lim: Limits, frames: list[bytes], cuts: list[int], windows: list[bool]) -> None:
    conn = H2Connection(client=False, limits=lim)
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
        assert len(conn.streams) <= lim.max_concurrent_streams
        if conn.closed:
            assert conn.error_kind is None or conn.error_kind in ALL_KINDS
        if windows[i % len(windows)]:
            conn.new_window()
        conn.data_to_send()
        assert conn.blocked_bytes() == 0


@FAST
@given(frames=frame_sequences(30), cuts=st.lists(st.integers(0, 1 << 20), max_size=30),
       windows=st.lists(st.booleans(), min_size=1, max_size=4),
       tight=st.fixed_dictionaries(TIGHT))
def test_hostile_frames_under_tight_budgets_never_raise(frames, cuts, windows, tight) -> None:
    lim = Limits(max_concurrent_streams=3, max_header_list_bytes=1024, stream_window_bytes=65535,
                 connection_window_bytes=65535 * 2, **tight)
    _feed_tight(lim, frames, cuts, windows)


@pytest.mark.fuzz
@pytest.mark.timeout(900)
@FUZZ
@given(frames=frame_sequences(60), cuts=st.lists(st.integers(0, 1 << 20), max_size=60),
       windows=st.lists(st.booleans(), min_size=1, max_size=4),
       tight=st.fixed_dictionaries(TIGHT))
def test_fuzz_hostile_frames_under_tight_budgets_never_raise(frames, cuts, windows, tight) -> None:
    lim = Limits(max_concurrent_streams=3, max_header_list_bytes=1024, stream_window_bytes=65535,
                 connection_window_bytes=65535 * 2, **tight)
    _feed_tight(lim, frames, cuts, windows)


@pytest.mark.fuzz
@pytest.mark.timeout(900)
@settings(deadline=None, max_examples=1000)
@given(traffic=under_budget_traffic(200), batch=st.lists(st.booleans(), min_size=1, max_size=5))
def test_fuzz_interleavings_under_the_budgets_never_end_the_connection(traffic, batch) -> None:
    test_interleavings_under_the_budgets_never_end_the_connection.hypothesis.inner_test(
        traffic, batch)


def test_headers_on_closed_streams_count_as_control_frames() -> None:
    """HEADERS on a stream already over are ignored (RFC 9113 §5.1) but each costs a decode:
    a peer that keeps sending them is ended as a control flood."""
    lim = Limits(max_control_frames_per_s=5)
    s = _server_with_stream(lim)
    assert of(s.receive(_headers(3, flags=F.FLAG_END_HEADERS | F.FLAG_END_STREAM)), HeadersReceived)
    s.reset_stream(3, F.CANCEL)
    s.data_to_send()
    s.new_window()
    ignored = b"".join(_headers(3, flags=F.FLAG_END_HEADERS | F.FLAG_END_STREAM) for _ in range(5))
    assert s.receive(ignored) == [] and not s.closed
    _flooded(s, _headers(3, flags=F.FLAG_END_HEADERS | F.FLAG_END_STREAM), "control_flood", "control flood")
