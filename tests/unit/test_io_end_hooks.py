"""``sidecar.io.H2Protocol``: what follows the sends of a read (the relay's bookkeeping of
the streams and calls that ended, the layers' end hooks) runs once that read's writes are
out, so it is off the caller's path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mesh_common.limits import Limits
from sidecar.http2 import grpc as G
from sidecar.http2.connection import H2Connection
from sidecar.http2.events import HeadersReceived
from sidecar.http2.headers import encode_block
from sidecar.http2.relay import Call, LocalReply, Relay
from sidecar.io import Flusher, H2Protocol

pytestmark = pytest.mark.timeout(10)

REQUEST = encode_block([(":method", "POST"), (":scheme", "http"), (":path", "/pkg.Svc/M"),
                        (":authority", "svc"), ("content-type", "application/grpc"),
                        ("te", "trailers")])


class RecordingTransport:
    """What an asyncio transport is to H2Protocol, recording every write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.on_write: Callable[[], None] = lambda: None

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.on_write()

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int) -> None:
        return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def close(self) -> None:
        return None


class Refuse:
    """Answers every call here; at each call's end, notes how many writes had gone out."""

    def __init__(self, transport: RecordingTransport) -> None:
        self.transport = transport
        self.writes_at_end: list[int] = []
        self.ended_at: list[float | None] = []
        self.fail_at_end = False

    def on_request(self, call: Call) -> LocalReply:
        return LocalReply(G.UNAVAILABLE, "no route")

    def on_response(self, call: Call) -> None:
        return None

    def on_end(self, call: Call) -> None:
        self.writes_at_end.append(len(self.transport.writes))
        self.ended_at.append(call.ended_s)
        if self.fail_at_end:
            raise RuntimeError("a faulty layer")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def _serve(loop: asyncio.AbstractEventLoop, clock: Callable[[], float] = time.monotonic
           ) -> tuple[H2Protocol, Refuse, RecordingTransport]:
    limits = Limits()
    transport = RecordingTransport()
    hooks = Refuse(transport)
    relay = Relay(hooks, limits, clock, loop.call_later, lambda conn: None)
    proto = H2Protocol(relay, H2Connection(client=False, limits=limits), Flusher(loop), limits)
    proto.connection_made(transport)  # type: ignore[arg-type]
    return proto, hooks, transport


def _caller_calls(n: int) -> tuple[H2Connection, bytes]:
    """A client's preface, SETTINGS and ``n`` unary requests, as one read."""
    caller = H2Connection(client=True, limits=Limits())
    caller.initiate()
    for _ in range(n):
        sid = caller.open_stream().id
        caller.send_headers(sid, REQUEST, False)
        caller.send_data(sid, b"\0\0\0\0\x02hi", True)
    return caller, caller.data_to_send()


def _statuses(caller: H2Connection, transport: RecordingTransport) -> list[str]:
    events = caller.receive(b"".join(transport.writes))
    return [ev.headers.fields.get("grpc-status") for ev in events
            if type(ev) is HeadersReceived]


def test_the_calls_a_read_ends_are_recorded_after_the_reads_writes(
        loop: asyncio.AbstractEventLoop) -> None:
    proto, hooks, transport = _serve(loop)
    active_at_write: list[int] = []
    transport.on_write = lambda: active_at_write.append(proto.relay.active)
    caller, read = _caller_calls(2)
    proto.data_received(read)
    # Both answers left in the read's write, while the relay still counted both calls; only
    # then did it see their streams end and the layers see the calls end.
    assert len(transport.writes) == 1
    assert active_at_write == [2]
    assert hooks.writes_at_end == [1, 1]
    assert _statuses(caller, transport) == [str(G.UNAVAILABLE)] * 2
    assert proto.relay.active == 0


def test_a_layer_that_fails_at_a_calls_end_costs_nothing_else(
        loop: asyncio.AbstractEventLoop) -> None:
    proto, hooks, transport = _serve(loop)
    hooks.fail_at_end = True
    caller, read = _caller_calls(2)
    proto.data_received(read)
    assert hooks.writes_at_end == [1, 1]  # the second call's hooks ran after the first's failed
    assert not proto.conn.closed
    assert _statuses(caller, transport) == [str(G.UNAVAILABLE)] * 2


def test_a_calls_end_is_stamped_when_its_answer_is_queued_before_the_write(
        loop: asyncio.AbstractEventLoop) -> None:
    """What the layers measure a call to (``call.ended_s``, the relay's clock) is when its
    answer was queued, not when the end hooks run after the write."""
    writes: list[bytes] = []
    proto, hooks, transport = _serve(loop, clock=lambda: float(len(writes)))
    writes = transport.writes  # the relay's clock here: how many writes have gone out
    caller, read = _caller_calls(2)
    proto.data_received(read)
    assert hooks.writes_at_end == [1, 1]
    assert hooks.ended_at == [0.0, 0.0]
