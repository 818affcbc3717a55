"""``bench.pipe --frames`` (``FramePipe``): the frame-walking pipe writes on every byte it
reads, unchanged, in whole frames only (the client's preface passes first), keeps a record
per stream from its request's HEADERS to its response's END_STREAM, and looks every header
block up in its cache. Driven with a fake transport (it only collects writes); the pipe
itself runs over real sockets and TLS in ``tests/integration/test_bench_floor.py``."""

from __future__ import annotations

import pytest

from bench import cold
from bench.pipe import PREFACE, FramePipe
from mesh_common.limits import Limits
from sidecar.http2.connection import H2Connection

pytestmark = pytest.mark.timeout(30)


class FakeTransport:
    """Collects what the pipe writes on (a stand-in for the peer's asyncio transport)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))


def _pair() -> tuple[FramePipe, FramePipe, FakeTransport, FakeTransport]:
    streams: dict[int, list[int]] = {}
    blocks: dict[bytes, int] = {}
    down, up = FramePipe(streams, blocks, False), FramePipe(streams, blocks, True)
    down.peer, up.peer = up, down
    to_server, to_client = FakeTransport(), FakeTransport()
    up.transport, down.transport = to_server, to_client  # type: ignore[assignment]
    return down, up, to_server, to_client


def _frame_ends(data: bytes) -> list[int]:
    pos, ends = 0, []
    while pos < len(data):
        pos += 9 + int.from_bytes(data[pos:pos + 3], "big")
        ends.append(pos)
    return ends


def test_a_call_passes_unchanged_in_whole_frames_and_its_record_comes_and_goes() -> None:
    down, up, to_server, to_client = _pair()
    client = H2Connection(client=True, limits=Limits())
    server = H2Connection(client=False, limits=Limits())
    client.initiate()
    server.initiate()
    sent = client.data_to_send() + cold.unary_request(client)
    assert sent.startswith(PREFACE)
    # Split at every awkward place: inside the preface, inside a frame header, inside a block.
    cuts = [0, 10, 30, 37, 60, len(sent)]
    for a, b in zip(cuts, cuts[1:], strict=False):
        down.data_received(sent[a:b])
    assert b"".join(to_server.writes) == sent
    ends = {len(PREFACE) + e for e in _frame_ends(sent[len(PREFACE):])} | {len(PREFACE)}
    written = 0
    for w in to_server.writes:
        written += len(w)
        assert written <= len(PREFACE) or written in ends  # past the preface, whole frames
    assert down.streams == {1: [len(cold.MESSAGE), 0]}  # the request's DATA, counted
    assert len(down.blocks) == 1  # the request's header block, looked up and cached

    for ev in server.receive(sent):
        if type(ev).__name__ == "HeadersReceived":
            server.send_headers(ev.stream_id, cold.RESPONSE, False)
            server.send_data(ev.stream_id, cold.MESSAGE, False)
            server.send_trailers(ev.stream_id, cold.TRAILERS)
    answer = server.data_to_send()
    up.data_received(answer[:5])  # not even a frame header yet: nothing goes on
    up.data_received(answer[5:])
    assert b"".join(to_client.writes) == answer
    assert down.streams == {}  # the response ended: the stream's record is gone
    assert len(down.blocks) >= 3  # the response's headers and trailers were looked up too
    statuses = [ev.headers.fields.get("grpc-status") for ev in client.receive(answer)
                if type(ev).__name__ == "HeadersReceived" and not ev.first]
    assert statuses == ["0"]
