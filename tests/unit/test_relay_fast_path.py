"""The relay's fast paths (``H2Connection.receive_request`` / ``receive_responses``, taken by
``Relay.down_received`` / ``up_received``) change nothing anyone can see: the same
calls through two in-memory meshes (``test_relay``'s), one with ``relay.fast_path`` off, put
the same bytes on every connection in the same order, end with the same statistics, and
leave the same connection state. Plain unary calls do take the fast paths, one call or
several per read, with a WINDOW_UPDATE or a partial frame after them (so the comparison
compares something), and a read that begins with anything else is left alone."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_common.limits import Limits
from sidecar.http2.connection import H2Connection
from sidecar.http2.headers import _HUFFMAN_ENCODER, encode_block, encode_int, encode_literal
from tests.unit import test_relay as harness
from tests.unit.test_relay import Mesh, grpc_message, request_block

TABLE_SIZE_0 = b"\x20"  # HPACK: dynamic table size update to 0, as real peers send first


class SizeZeroBackend(harness.Backend):
    """The harness's backend, whose first header block takes the table to size 0 (as grpcio
    does once it has the relay's SETTINGS_HEADER_TABLE_SIZE of 0)."""

    def __init__(self, limits: Limits) -> None:
        super().__init__(limits)
        send = self.conn.send_headers
        first = [True]

        def send_headers(sid: int, block: bytes, end: bool) -> None:
            if first[0]:
                first[0] = False
                block = TABLE_SIZE_0 + block
            send(sid, block, end)
        self.conn.send_headers = send_headers  # type: ignore[method-assign]


@contextmanager
def recording() -> Iterator[tuple[list[bytes], dict[str, int]]]:
    """Every byte any H2Connection hands out (in order), and how often each fast path took
    a read, while the block runs."""
    wire: list[bytes] = []
    taken = {"request": 0, "response": 0, "response_rest": 0, "largest_read": 0}
    to_send = H2Connection.data_to_send
    take_request, take_responses = H2Connection.receive_request, H2Connection.receive_responses

    def data_to_send(self: H2Connection) -> bytes:
        out = to_send(self)
        if out:
            wire.append(out)
        return out

    def receive_request(self: H2Connection, data: bytes) -> Any:
        got = take_request(self, data)
        taken["request"] += got is not None
        return got

    def receive_responses(self: H2Connection, data: bytes) -> Any:
        got = take_responses(self, data)
        if got is not None:
            taken["response"] += len(got[0])
            taken["largest_read"] = max(taken["largest_read"], len(got[0]))
            taken["response_rest"] += bool(got[1]) or bool(self._in)
        return got
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "Backend", SizeZeroBackend)
        mp.setattr(H2Connection, "data_to_send", data_to_send)
        mp.setattr(H2Connection, "receive_request", receive_request)
        mp.setattr(H2Connection, "receive_responses", receive_responses)
        yield wire, taken


Step = tuple[str, int, str | None, bool] | tuple[str, int, str | None, bool, bool]
"""One call: path, message bytes (-1: no DATA, END_STREAM on the headers), grpc-timeout,
whether the harness pumps before the next call is sent (False: reads carry several), and
(optional, default False) whether the caller sends a ``traceparent`` of its own, new on
every call (Huffman-coded when the call's index is odd)."""


def run(steps: list[Step], fast: bool) -> tuple[list[bytes], dict[str, int], dict[str, Any]]:
    with recording() as (wire, taken):
        mesh = Mesh()
        mesh.relay.fast_path = fast
        caller = mesh.caller()
        first = True
        for i, (path, size, timeout, pump, *traced) in enumerate(steps):
            block = request_block(path, timeout)
            if traced and traced[0]:
                block += _caller_traceparent(i)
            if first:
                block, first = TABLE_SIZE_0 + block, False
            sid = caller.start(block, end=size < 0)
            if size >= 0:
                caller.send(sid, grpc_message(b"m" * size), end=True)
            if pump:
                mesh.pump()
        mesh.pump()
        mesh.timers.advance(2.0)  # deadlines of calls nobody answers
        mesh.pump()
        down = mesh.pairs[0][1]
        state = {
            "stats": dict(mesh.relay.stats), "refused": dict(mesh.relay.refused_calls),
            "active": mesh.relay.active,
            "statuses": {sid: caller.status(sid) for sid in caller.headers if caller.headers[sid]},
            "bodies": {sid: bytes(b) for sid, b in caller.body.items()},
            "down": _core_state(down),
            "ups": [_core_state(link.up) for link in mesh.links],
            "backends": [{sid: bytes(b) for sid, b in link.backend.received.items()}
                         for link in mesh.links],
        }
    return wire, taken, state


def _core_state(conn: H2Connection) -> dict[str, Any]:
    return {
        "streams": {sid: (s.recv_window, s.send_window, s.recv_closed, s.send_closed,
                          s.headers_seen, s.owed, s.outbox_bytes)
                    for sid, s in conn.streams.items()},
        "windows": (conn.conn_recv_window, conn.conn_send_window, conn.conn_owed),
        "ids": (conn.last_peer_stream, conn.next_stream_id, conn.streams_opened),
        "closed": conn.closed, "events": len(conn._events),
    }


PATHS = ["/echo.Echo/Say", "/echo.Echo/Say", "/test/Early", "/test/Big", "/test/Silent",
         "/denied/x"]
steps = st.lists(st.tuples(st.sampled_from(PATHS),
                           st.sampled_from([-1, 0, 1, 64, 1500, 20_000, 70_000]),
                           st.sampled_from([None, None, "1S"]),
                           st.booleans(), st.booleans()), min_size=1, max_size=8)


def _caller_traceparent(i: int) -> bytes:
    """A caller's own ``traceparent`` literal (not the sidecar's: it varies in length and
    coding), new for call ``i``, and on every third call a request id as a proxy adds."""
    value = f"00-{i + 1:032x}-{i + 7:016x}-{i % 2:02x}".encode()
    rid = encode_literal(b"x-request-id", f"{i:08x}-0000-4000-8000-{i:012x}".encode()) \
        if i % 3 == 0 else b""
    if i % 2:
        coded = _HUFFMAN_ENCODER.encode(value)
        return rid + b"\x00" + encode_int(11, 7, 0) + b"traceparent" + \
            encode_int(len(coded), 7, 0x80) + coded
    return encode_literal(b"traceparent", value) + rid


@settings(deadline=None, max_examples=60)
@given(steps)
def test_the_fast_paths_change_no_byte_and_no_state(calls: list[Step]) -> None:
    wire_fast, _, state_fast = run(calls, fast=True)
    wire_slow, taken_slow, state_slow = run(calls, fast=False)
    assert taken_slow == {"request": 0, "response": 0, "response_rest": 0, "largest_read": 0}
    assert state_fast == state_slow
    assert wire_fast == wire_slow


def test_plain_unary_calls_take_both_fast_paths() -> None:
    calls: list[Step] = [("/echo.Echo/Say", 64, None, True)] * 6
    wire_fast, taken, state = run(calls, fast=True)
    # The first call's blocks take the tables to size 0; every later one is read from the
    # scan cache, both ways.
    assert taken == {"request": 5, "response": 5, "response_rest": 0, "largest_read": 1}
    assert all(status == ("0", "") for status in state["statuses"].values())
    assert len(state["statuses"]) == 6
    assert wire_fast == run(calls, fast=False)[0]


def test_calls_carrying_a_callers_traceparent_and_deadline_take_the_request_fast_path() -> None:
    """A traced caller's block (its own traceparent, new on every call, a deadline, and on
    some calls a request id) is read as the cached rest plus those values, so the request
    still takes the fast path."""
    calls: list[Step] = [("/echo.Echo/Say", 64, "1S", True, True)] * 6
    wire_fast, taken, state = run(calls, fast=True)
    assert taken["request"] == 5 and taken["response"] == 5
    assert all(status == ("0", "") for status in state["statuses"].values())
    assert len(state["statuses"]) == 6
    assert wire_fast == run(calls, fast=False)[0]


def connected_pair() -> tuple[H2Connection, H2Connection]:
    """A client core and a server core that have exchanged their SETTINGS."""
    limits = Limits()
    client, server = H2Connection(client=True, limits=limits), H2Connection(client=False,
                                                                            limits=limits)
    client.initiate()
    server.initiate()
    server.receive(client.data_to_send())
    client.receive(server.data_to_send())
    server.receive(client.data_to_send())
    return client, server


def test_several_responses_in_one_read_are_taken_and_the_rest_goes_to_receive() -> None:
    # Four calls sent before the harness pumps (after a first that takes the tables to size
    # 0): one read carries four requests (left to receive), and the backend's answer to
    # them is one read of four whole responses.
    calls: list[Step] = [("/echo.Echo/Say", 64, None, True)] + [("/echo.Echo/Say", 64, None,
                                                                 False)] * 4
    wire_fast, taken, state = run(calls, fast=True)
    assert taken["response"] == 4 and taken["largest_read"] == 4 and taken["request"] == 0
    assert all(status == ("0", "") for status in state["statuses"].values())
    assert wire_fast == run(calls, fast=False)[0]


def test_a_response_followed_by_other_frames_hands_them_to_receive() -> None:
    client, server = connected_pair()
    client.data_to_send()
    trailers = encode_block([("grpc-status", "0")])
    head = encode_block([(":status", "200")])
    sids = []
    for _ in range(2):
        sid = client.open_stream().id
        client.send_headers(sid, request_block(), True)
        sids.append(sid)
    client.receive(_frame(1, 0x4, sids[0], TABLE_SIZE_0 + head) + _frame(0, 0, sids[0], b"x")
                   + _frame(1, 0x5, sids[0], trailers))  # table size 0, blocks cached
    read = (_frame(1, 0x4, sids[1], head) + _frame(0, 0, sids[1], b"yy")
            + _frame(1, 0x5, sids[1], trailers) + _frame(8, 0, 0, struct.pack(">L", 100))
            + _frame(6, 0, 0, b"12345678")[:12])  # a WINDOW_UPDATE, then part of a PING
    window = client.conn_send_window
    got = client.receive_responses(read)
    assert got is not None
    (response,), events = got
    assert response[0] == sids[1] and bytes(response[2]) == b"yy" and response[4]
    assert events == [] and client.conn_send_window == window + 100
    assert bytes(client._in) == _frame(6, 0, 0, b"12345678")[:12]


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    n = len(payload)
    return struct.pack(">HBBBL", n >> 8, n & 0xFF, ftype, flags, sid) + payload


@pytest.mark.parametrize("why, tweak", [
    ("padded DATA", lambda h, d: h + _frame(0, 0x9, 1, b"\x00" + d)),
    ("HEADERS with END_STREAM too", lambda h, d: _with_flags(h, 0x5) + _frame(0, 0x1, 1, d)),
    ("DATA without END_STREAM", lambda h, d: h + _frame(0, 0x0, 1, d)),
    ("two requests in one read", lambda h, d: h + _frame(0, 0x1, 1, d) + _renumber(h, 3)
     + _frame(0, 0x1, 3, d)),
    ("a trailing partial frame", lambda h, d: h + _frame(0, 0x1, 1, d) + b"\x00\x00"),
    ("an even stream id", lambda h, d: _renumber(h, 2) + _frame(0, 0x1, 2, d)),
])
def test_a_read_that_is_anything_else_is_left_to_receive(
        why: str, tweak: Callable[[bytes, bytes], bytes]) -> None:
    client, server = connected_pair()
    block = TABLE_SIZE_0 + request_block()
    server.receive(_frame(1, 0x5, 1_001, block))  # table size 0 and the block in the cache
    server.last_peer_stream = 0  # (only to reuse low ids below)
    headers = _frame(1, 0x4, 1, request_block())
    data = tweak(headers, grpc_message(b"x"))
    before = _core_state(server)
    assert server.receive_request(data) is None, why
    assert _core_state(server) == before


def _with_flags(frame: bytes, flags: int) -> bytes:
    return frame[:4] + bytes([flags]) + frame[5:]


def _renumber(frame: bytes, sid: int) -> bytes:
    return frame[:5] + struct.pack(">L", sid) + frame[9:]


def test_a_response_on_a_stream_whose_request_is_still_open_is_left_to_receive() -> None:
    client, server = connected_pair()
    client.data_to_send()
    sid = client.open_stream().id
    client.send_headers(sid, request_block(), False)  # the request is not over
    server.receive(client.data_to_send())
    head = TABLE_SIZE_0 + encode_block([(":status", "200")])
    trailers = encode_block([("grpc-status", "0")])
    client.receive(_frame(1, 0x4, sid, head) + _frame(0, 0, sid, b"x")
                   + _frame(1, 0x5, sid, trailers))  # size 0, both blocks cached
    sid = client.open_stream().id
    client.send_headers(sid, request_block(), False)
    read = (_frame(1, 0x4, sid, encode_block([(":status", "200")])) + _frame(0, 0, sid, b"x")
            + _frame(1, 0x5, sid, trailers))
    before = _core_state(client)
    assert client.receive_responses(read) is None
    assert _core_state(client) == before
    client.send_data(sid, b"", True)  # now the request is over: the same read is taken
    assert client.receive_responses(read) is not None
