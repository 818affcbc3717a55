"""The sans-IO relay between in-memory peers: a caller (client-role H2Connection) talks to the
relay's downstream (server-role) connection; the relay's pool opens upstream (client-role)
connections, each paired with a server-role H2Connection acting as the backend app. Time is a
fake clock with fake timers; bytes move only when the harness pumps them."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_common.limits import KiB, Limits
from sidecar.http2 import frames as F
from sidecar.http2 import grpc as G
from sidecar.http2.connection import H2Connection
from sidecar.http2.events import (
    DataReceived,
    DataSent,
    HeadersReceived,
    StreamEnded,
    StreamReset,
)
from sidecar.http2.headers import encode_block
from sidecar.http2.pool import Pool
from sidecar.http2.relay import Call, LocalReply, Relay

FAST = settings(deadline=None, max_examples=12)
FUZZ = settings(deadline=None, max_examples=2000)
LABEL = "10.0.0.9:15006 (echo)"


# ================================================================ fakes of time
class FakeClock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class FakeTimer:
    def __init__(self, when_s: float, fn: Callable[[], None]) -> None:
        self.when_s = when_s
        self.fn = fn
        self.cancelled = False
        self.fired = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTimers:
    """``call_later`` for the relay; ``advance`` moves the clock and fires what is due."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.timers: list[FakeTimer] = []

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.clock.now_s + delay_s, fn)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        target = self.clock.now_s + seconds
        while True:
            due = [t for t in self.timers if not t.cancelled and not t.fired and t.when_s <= target]
            if not due:
                break
            timer = min(due, key=lambda t: t.when_s)
            self.clock.now_s = max(self.clock.now_s, timer.when_s)
            timer.fired = True
            timer.fn()
        self.clock.now_s = target

    @property
    def live(self) -> list[FakeTimer]:
        return [t for t in self.timers if not t.cancelled and not t.fired]


# ================================================================ peers
def request_block(path: str = "/echo.Echo/Say", timeout: str | None = None,
                  extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "echo"),
              ("content-type", "application/grpc"), ("te", "trailers"), *extra]
    if timeout is not None:
        fields.append(("grpc-timeout", timeout))
    return encode_block(fields)


def grpc_message(payload: bytes) -> bytes:
    return b"\0" + struct.pack(">L", len(payload)) + payload


class Caller:
    """The downstream client: opens streams, sends requests, consumes responses at once."""

    def __init__(self, limits: Limits) -> None:
        self.conn = H2Connection(client=True, limits=limits)
        self.headers: dict[int, list] = {}
        self.body: dict[int, bytearray] = {}
        self.resets: dict[int, int] = {}
        self.ended: set[int] = set()
        self.sent: dict[int, int] = {}  # payload bytes that left for the relay, per stream
        self.queued: dict[int, int] = {}

    def start(self, block: bytes | None = None, end: bool = False) -> int:
        sid = self.conn.open_stream().id
        self.headers[sid] = []
        self.body[sid] = bytearray()
        self.sent[sid] = self.queued[sid] = 0
        self.conn.send_headers(sid, block or request_block(), end)
        return sid

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        self.queued[sid] += len(data)
        self.sent[sid] += self.conn.send_data(sid, data, end)

    def handle(self, events: list) -> None:
        for ev in events:
            t = type(ev)
            if t is HeadersReceived:
                self.headers[ev.stream_id].append(ev.headers)
            elif t is DataReceived:
                self.body[ev.stream_id] += ev.data
                self.conn.ack_data(ev.stream_id, len(ev.data))
            elif t is DataSent:
                self.sent[ev.stream_id] += ev.sent
            elif t is StreamReset:
                self.resets[ev.stream_id] = ev.error_code
            elif t is StreamEnded:
                self.ended.add(ev.stream_id)

    def status(self, sid: int) -> tuple[str | None, str | None]:
        last = self.headers[sid][-1]
        return last.get("grpc-status"), G.percent_decode(last.get("grpc-message") or "")


class Backend:
    """The app behind an upstream connection. What it does depends on the request path:
    ``/echo.Echo/Say`` streams the request back (headers at once, trailers at the end);
    ``/test/Silent`` never answers; ``/test/Early`` answers trailers-only at once;
    ``/test/Big`` answers with one message over any small limit."""

    def __init__(self, limits: Limits) -> None:
        self.conn = H2Connection(client=False, limits=limits)
        self.paths: dict[int, str] = {}
        self.timeouts: dict[int, str | None] = {}
        self.received: dict[int, bytearray] = {}
        self.resets: dict[int, int] = {}
        self.ended_requests: set[int] = set()
        self.dead = False  # sent GOAWAY(0): ignores whatever arrives
        self.consume = True

    def handle(self, events: list) -> None:
        conn = self.conn
        for ev in events:
            t = type(ev)
            if self.dead:
                continue
            if t is HeadersReceived and ev.first:
                path = ev.headers.get(":path") or ""
                self.paths[ev.stream_id] = path
                self.timeouts[ev.stream_id] = ev.headers.get("grpc-timeout")
                self.received[ev.stream_id] = bytearray()
                if path == "/test/Early":
                    conn.send_headers(ev.stream_id, G.trailers_only_block(G.OK, ""), True)
                elif path == "/test/Big":
                    conn.send_headers(ev.stream_id, encode_block([(":status", "200")]), False)
                    conn.send_data(ev.stream_id, b"\0\0\x10\0\0" + b"x" * 100, False)
                elif path != "/test/Silent":
                    conn.send_headers(ev.stream_id, encode_block([(":status", "200"),
                                      ("content-type", "application/grpc")]), False)
                if ev.end_stream:
                    self._request_end(ev.stream_id)
            elif t is HeadersReceived:  # request trailers
                self._request_end(ev.stream_id)
            elif t is DataReceived:
                self.received.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                if self.consume:
                    conn.ack_data(ev.stream_id, len(ev.data))
                if self.paths.get(ev.stream_id) == "/echo.Echo/Say" and ev.data:
                    conn.send_data(ev.stream_id, ev.data, False)
                if ev.end_stream:
                    self._request_end(ev.stream_id)
            elif t is StreamReset:
                self.resets[ev.stream_id] = ev.error_code

    def _request_end(self, sid: int) -> None:
        self.ended_requests.add(sid)
        if self.paths.get(sid) in ("/echo.Echo/Say", "/test/Big"):
            self.conn.send_trailers(sid, encode_block([("grpc-status", "0")]))


class Hooks:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.calls: list[Call] = []
        self.ended: list[Call] = []
        self.responses = 0

    def on_request(self, call: Call) -> Pool | LocalReply:
        self.calls.append(call)
        if call.path.startswith("/denied/"):
            return LocalReply(G.PERMISSION_DENIED, "caller not allowed")
        if call.path.startswith("/faulty/"):
            raise KeyError("a bug in a layer")
        return self.mesh.pool

    def on_response(self, call: Call) -> None:
        self.responses += 1
        assert call.up is not None
        self.mesh.record_ids(call)

    def on_end(self, call: Call) -> None:
        assert call not in self.ended, "on_end twice"
        self.ended.append(call)


class Link:
    """An upstream connection of the relay and the backend it reaches."""

    def __init__(self, up: H2Connection, backend: Backend) -> None:
        self.up = up
        self.backend = backend
        self.closed = False


class Mesh:
    """Relay + callers + backends, pumped in memory until quiet."""

    def __init__(self, limits: Limits | None = None, backend_limits: Limits | None = None,
                 caller_limits: Limits | None = None, max_connections: int | None = None,
                 handshake_first: bool = False) -> None:
        self.handshake_first = handshake_first
        """Exchange SETTINGS with a new backend before telling the relay it is connected (the
        I/O side tells it at once, so by default calls are bound before the peer's limits)."""
        self.limits = limits or Limits()
        self.backend_limits = backend_limits or Limits()
        self.caller_limits = caller_limits or Limits()
        self.clock = FakeClock()
        self.timers = FakeTimers(self.clock)
        self.hooks = Hooks(self)
        self.relay = Relay(self.hooks, self.limits, self.clock, self.timers.call_later,
                           self._close_requested)
        self.pool = Pool("echo|h2c", LABEL,
                         max_connections or self.limits.upstream_connections_per_endpoint,
                         self._connect_requested)
        self.connects: list[Pool] = []
        self.fail_connects: str | None = None
        self.links: list[Link] = []
        self.to_close: list[H2Connection] = []
        self.pairs: list[tuple[Caller, H2Connection]] = []
        self.paused: set[int] = set()
        self.id_map: dict[tuple[int, int], tuple[int, int]] = {}  # (up conn, up sid) -> down

    # ---------------------------------------------------------- wiring
    def caller(self) -> Caller:
        caller = Caller(self.caller_limits)
        down = H2Connection(client=False, limits=self.limits)
        self.relay.adopt(down)
        down.initiate()
        caller.conn.initiate()
        self.pairs.append((caller, down))
        self.pump()
        return caller

    def _connect_requested(self, pool: Pool) -> None:
        self.connects.append(pool)  # completed by the pump, as the I/O side would later

    def _close_requested(self, conn: H2Connection) -> None:
        self.to_close.append(conn)

    def link_of(self, up: H2Connection | None) -> Link:
        return next(link for link in self.links if link.up is up)

    # ---------------------------------------------------------- pumping
    def step(self) -> bool:
        """One round over every pair; True when anything moved."""
        moved = False
        while self.connects:
            moved = True
            pool = self.connects.pop(0)
            if self.fail_connects is not None:
                self.relay.pool_failed(pool, self.fail_connects)
                continue
            up = H2Connection(client=True, limits=self.limits)
            backend = Backend(self.backend_limits)
            self.relay.adopt(up)
            up.initiate()
            backend.conn.initiate()
            link = Link(up, backend)
            self.links.append(link)
            if self.handshake_first:
                self._handshake(link)
            self.relay.pool_connected(pool, up)
        for caller, down in self.pairs:
            out = caller.conn.data_to_send()
            if out:
                moved = True
                self.relay.down_received(down, out)
            out = down.data_to_send()
            if out:
                moved = True
                caller.handle(caller.conn.receive(out))
            caller.handle(caller.conn.take_events())
        for link in self.links:
            if link.closed:
                continue
            out = link.up.data_to_send()
            if out:
                moved = True
                link.backend.handle(link.backend.conn.receive(out))
            link.backend.handle(link.backend.conn.take_events())
            out = link.backend.conn.data_to_send()
            if out and not link.backend.dead:
                moved = True
                self.relay.up_received(link.up, out)
        while self.to_close:
            moved = True
            conn = self.to_close.pop(0)
            link = self.link_of(conn)
            out = conn.data_to_send()
            if out:
                link.backend.handle(link.backend.conn.receive(out))
            link.closed = True
            conn.closed = True
            self.relay.connection_lost(conn, "closed by the relay")
        self._check_ids()
        return moved

    def _handshake(self, link: Link) -> None:
        while True:
            out = link.up.data_to_send()
            back = link.backend.conn.data_to_send()
            if not out and not back:
                return
            if out:
                link.backend.handle(link.backend.conn.receive(out))
            if back:
                link.up.receive(back)  # SETTINGS and acks only: no events the relay needs

    def to_relay(self, caller: Caller) -> None:
        """Deliver what the caller queued to the relay, and nothing further."""
        down = next(d for c, d in self.pairs if c is caller)
        self.relay.down_received(down, caller.conn.data_to_send())

    def pump(self, max_rounds: int = 100_000) -> None:
        for _ in range(max_rounds):
            if not self.step():
                return
        raise AssertionError("the mesh never went quiet")

    def record_ids(self, call: Call) -> None:
        up_key = (id(call.up), call.up_sid)
        down_key = (id(call.down), call.down_sid)
        assert self.id_map.setdefault(up_key, down_key) == down_key

    def _check_ids(self) -> None:
        """Every upstream stream carries one downstream stream over its whole lifetime; no two
        live downstream streams share an upstream stream. (Connections stay referenced by
        ``links`` and ``pairs``, so ``id()`` keys are never reused within a test.)"""
        live: dict[tuple[int, int], tuple[int, int]] = {}
        for call in self.hooks.calls:
            if call.up is None or call.ended:
                continue
            up_key = (id(call.up), call.up_sid)
            down_key = (id(call.down), call.down_sid)
            assert live.setdefault(up_key, down_key) == down_key
            self.record_ids(call)
            assert call.up.calls.get(call.up_sid) is call

    def set_paused(self, link: Link, paused: bool) -> None:
        if link.closed:
            return
        self.relay.set_paused(link.up, paused)
        if paused:
            self.paused.add(id(link.up))
        else:
            self.paused.discard(id(link.up))

    def resume_all(self) -> None:
        for link in self.links:
            if id(link.up) in self.paused:
                self.set_paused(link, False)

    # ---------------------------------------------------------- checks
    def buffered(self, call: Call) -> int:
        """Request bytes the relay holds for a call: pending, plus the upstream outbox."""
        held = sum(len(c) for c in call.pending)
        if call.up is not None:
            st_ = call.up.streams.get(call.up_sid)
            if st_ is not None:
                held += st_.outbox_bytes
        return held

    def check_credit(self) -> None:
        """At a quiescent point: for every downstream stream, bytes the caller sent minus the
        credit the relay gave back equals the bytes the relay holds, within the window."""
        for call in self.hooks.calls:
            caller = next(c for c, d in self.pairs if d is call.down)
            sent = caller.sent[call.down_sid]
            assert call.req_received == sent  # quiet: everything sent has arrived
            outstanding = sent - call.credited
            assert outstanding == self.buffered(call), (call.down_sid, outstanding)
            assert 0 <= outstanding <= self.limits.stream_window_bytes
            # On the wire: the caller's window consumption is that, plus credit the relay
            # granted but batches (stream-level credit only while the request is open).
            c_st = caller.conn.streams.get(call.down_sid)
            d_st = call.down.streams.get(call.down_sid)
            if c_st is not None and not c_st.send_closed and d_st is not None:
                consumed = caller.conn.peer_initial_window - c_st.send_window
                assert consumed == outstanding + d_st.owed

    def assert_quiet_and_done(self) -> None:
        assert self.relay.active == 0
        assert len(self.hooks.ended) == self.relay.calls_total  # on_end once per call
        assert set(map(id, self.hooks.calls)) <= set(map(id, self.hooks.ended))
        assert not self.timers.live
        for link in self.links:
            if not link.closed:
                assert not link.up.calls
        for _, down in self.pairs:
            assert not down.calls


def call_of(mesh: Mesh, caller: Caller, sid: int) -> Call:
    return next(c for c in mesh.hooks.calls if c.down_sid == sid
                and any(d is c.down for cl, d in mesh.pairs if cl is caller))


# ================================================================ request / response
def test_request_and_response_through_the_relay() -> None:
    mesh = Mesh()
    caller = mesh.caller()
    sid = caller.start(request_block(extra=(("connection", "keep-alive"), ("x-user", "u1"))))
    caller.send(sid, grpc_message(b"hello"), end=True)
    mesh.pump()
    assert caller.status(sid) == ("0", "")
    assert bytes(caller.body[sid]) == grpc_message(b"hello")
    assert caller.headers[sid][0].get(":status") == "200"
    assert sid in caller.ended and not caller.resets
    (link,) = mesh.links
    (up_sid,) = link.backend.paths
    assert link.backend.paths[up_sid] == "/echo.Echo/Say"
    assert bytes(link.backend.received[up_sid]) == grpc_message(b"hello")
    assert link.backend.timeouts[up_sid] is None
    (call,) = mesh.hooks.calls
    assert (call.authority, call.path, call.grpc_status, call.attempts) == ("echo", "/echo.Echo/Say", 0, 1)
    assert mesh.hooks.responses == 2  # headers and trailers
    mesh.assert_quiet_and_done()


def test_hop_by_hop_request_headers_are_not_forwarded() -> None:
    mesh = Mesh()
    caller = mesh.caller()
    seen: list = []
    sid = caller.start(request_block(extra=(("connection", "close"), ("te", "gzip"))), end=True)
    mesh.pump()
    (link,) = mesh.links
    orig = link.backend.handle

    def spy(events: list) -> None:
        seen.extend(e.headers for e in events if type(e) is HeadersReceived)
        orig(events)

    link.backend.handle = spy  # type: ignore[method-assign]
    sid2 = caller.start(request_block(extra=(("connection", "close"),)), end=True)
    mesh.pump()
    assert caller.status(sid) == ("0", "") and caller.status(sid2) == ("0", "")
    fwd = seen[0].forwardable()
    assert b"connection" not in fwd and b"gzip" not in fwd


def test_local_reply_and_non_grpc_requests_are_answered_by_the_relay() -> None:
    mesh = Mesh()
    caller = mesh.caller()
    denied = caller.start(request_block("/denied/X"), end=True)
    not_post = caller.start(encode_block([(":method", "GET"), (":path", "/x/Y")]), end=True)
    mesh.pump()
    assert caller.status(denied) == ("7", "caller not allowed")
    assert caller.status(not_post)[0] == str(G.UNIMPLEMENTED)
    assert mesh.links == [] and mesh.connects == []
    mesh.assert_quiet_and_done()


def test_a_faulty_layer_fails_only_its_own_call_with_internal() -> None:
    mesh = Mesh()
    caller = mesh.caller()
    faulty = caller.start(request_block("/faulty/X"), end=True)
    fine = caller.start(request_block("/echo.Echo/Say"))
    caller.send(fine, b"\0\0\0\0\x02hi", end=True)
    mesh.pump()
    code, message = caller.status(faulty)
    assert code == str(G.INTERNAL) and "KeyError" in message
    assert caller.status(fine)[0] == "0" and bytes(caller.body[fine]) == b"\0\0\0\0\x02hi"
    mesh.assert_quiet_and_done()


def test_stream_ids_map_to_distinct_upstream_ids() -> None:
    mesh = Mesh(backend_limits=Limits(max_concurrent_streams=3))
    caller = mesh.caller()
    sids = [caller.start() for _ in range(8)]
    assert sids == [1, 3, 5, 7, 9, 11, 13, 15]
    mesh.pump()  # checks the mapping at every step
    live = [(id(c.up), c.up_sid) for c in mesh.hooks.calls if c.up is not None]
    assert len(live) == len(set(live))
    for i, sid in enumerate(sids):
        caller.send(sid, grpc_message(bytes([i]) * 100), end=True)
        mesh.pump()
    for i, sid in enumerate(sids):
        assert bytes(caller.body[sid]) == grpc_message(bytes([i]) * 100)
        assert caller.status(sid) == ("0", "")
    more = [caller.start() for _ in range(4)]
    for sid in more:
        caller.send(sid, grpc_message(b"again"), end=True)
    mesh.pump()
    assert all(caller.status(sid) == ("0", "") for sid in more)
    assert len(mesh.id_map) >= 12  # every call seen on an upstream stream of its own
    assert len(set(mesh.id_map.values())) == 12
    mesh.assert_quiet_and_done()


def test_calls_wait_for_capacity_and_more_connections() -> None:
    mesh = Mesh(backend_limits=Limits(max_concurrent_streams=2), max_connections=2)
    caller = mesh.caller()
    sids = [caller.start(request_block(), end=False) for _ in range(7)]
    mesh.pump()
    assert len(mesh.links) == 2
    for sid in sids:
        caller.send(sid, grpc_message(b"x" * 10), end=True)
    mesh.pump()
    assert [caller.status(sid) for sid in sids] == [("0", "")] * 7
    mesh.assert_quiet_and_done()


# ================================================================ deadlines
def test_deadline_gives_deadline_exceeded_and_resets_the_backend_stream() -> None:
    mesh = Mesh()
    caller = mesh.caller()
    sid = caller.start(request_block("/test/Silent", timeout="100m"))
    caller.send(sid, grpc_message(b"q"))
    mesh.pump()
    (link,) = mesh.links
    (up_sid,) = link.backend.paths
    assert G.parse_timeout(link.backend.timeouts[up_sid]) == pytest.approx(0.1, abs=1e-6)
    mesh.timers.advance(0.099)
    mesh.pump()
    assert caller.headers[sid] == []
    mesh.timers.advance(0.002)
    mesh.pump()
    (trailers_only,) = caller.headers[sid]
    assert trailers_only.get(":status") == "200"
    assert trailers_only.get("grpc-status") == str(G.DEADLINE_EXCEEDED)
    assert "deadline exceeded" in G.percent_decode(trailers_only.get("grpc-message"))
    assert link.backend.resets == {up_sid: F.CANCEL}
    assert caller.resets.get(sid) == F.NO_ERROR  # asked to stop sending the request
    assert mesh.relay.stats["deadlines_exceeded"] == 1
    mesh.assert_quiet_and_done()


def test_remaining_time_is_sent_upstream_when_the_call_waited() -> None:
    mesh = Mesh()
    caller = mesh.caller()
    sid = caller.start(request_block("/test/Silent", timeout="2S"), end=True)
    mesh.relay.down_received(mesh.pairs[0][1], caller.conn.data_to_send())
    assert mesh.connects  # the call waits for its connection
    mesh.clock.now_s += 0.5
    mesh.pump()
    (link,) = mesh.links
    assert G.parse_timeout(link.backend.timeouts[1]) == pytest.approx(1.5, abs=1e-5)
    mesh.timers.advance(2)
    mesh.pump()
    assert caller.status(sid)[0] == str(G.DEADLINE_EXCEEDED)
    mesh.assert_quiet_and_done()


def test_deadline_timer_is_cancelled_when_the_call_completes() -> None:
    mesh = Mesh()
    caller = mesh.caller()
    sid = caller.start(request_block(timeout="5S"))
    caller.send(sid, grpc_message(b"hi"), end=True)
    mesh.pump()
    assert caller.status(sid) == ("0", "")
    assert not mesh.timers.live
    mesh.timers.advance(10)
    mesh.pump()
    assert caller.status(sid) == ("0", "") and len(caller.headers[sid]) == 2
    mesh.assert_quiet_and_done()


def test_malformed_grpc_timeout_is_ignored() -> None:
    mesh = Mesh()
    caller = mesh.caller()
    sids = [caller.start(request_block(timeout=t), end=True) for t in ("soon", "\u00b2m", "1.5S")]
    mesh.pump()
    assert [caller.status(s) for s in sids] == [("0", "")] * 3
    assert not mesh.timers.timers
    mesh.assert_quiet_and_done()


# ================================================================ message limits
def test_request_message_over_the_limit_fails_only_that_stream() -> None:
    lim = Limits(max_message_bytes=1024)
    mesh = Mesh(limits=lim)
    caller = mesh.caller()
    big = caller.start()
    ok = caller.start()
    mesh.pump()  # both are on upstream streams
    caller.send(big, grpc_message(b"a" * 100) + b"\0\0\0\x08\0")  # announces 2048 bytes
    caller.send(ok, grpc_message(b"b" * 1024))
    mesh.pump()
    status, message = caller.status(big)
    assert status == str(G.RESOURCE_EXHAUSTED)
    assert "2048" in message and "1024" in message
    caller.send(ok, b"", end=True)
    caller.send(big, b"", end=True)  # as a gRPC client does once it has the status
    mesh.pump()
    assert caller.status(ok) == ("0", "")
    assert bytes(caller.body[ok]) == grpc_message(b"b" * 1024)
    assert [r for link in mesh.links for r in link.backend.resets.values()] == [F.CANCEL]
    assert mesh.relay.stats["messages_too_large"] == 1
    mesh.assert_quiet_and_done()


def test_a_whole_message_in_one_frame_is_measured_like_a_split_one() -> None:
    mesh = Mesh(limits=Limits(max_message_bytes=1024))
    caller = mesh.caller()
    big = caller.start()
    split = caller.start()
    mesh.pump()
    caller.send(big, grpc_message(b"a" * 1025), end=True)  # one frame: no meter needed
    message = grpc_message(b"b" * 1024) + grpc_message(b"c")
    caller.send(split, message[:3])  # a prefix cut in two...
    caller.send(split, message[3:700])
    caller.send(split, message[700:], end=True)  # ...and two messages in the last frame
    mesh.pump()
    status, text = caller.status(big)
    assert status == str(G.RESOURCE_EXHAUSTED) and "1025" in text and "1024" in text
    assert caller.status(split) == ("0", "")
    by_sid = {c.down_sid: c for c in mesh.hooks.calls}
    assert by_sid[big].req_meter is None and by_sid[big].req_messages == 1
    assert by_sid[split].req_meter is not None and by_sid[split].req_messages == 2
    assert by_sid[split].resp_messages == 2  # the backend echoes both messages back
    mesh.assert_quiet_and_done()


def test_response_message_over_the_limit_gives_resource_exhausted_after_headers() -> None:
    mesh = Mesh(limits=Limits(max_message_bytes=1024))
    caller = mesh.caller()
    sid = caller.start(request_block("/test/Big"), end=True)
    mesh.pump()
    assert caller.headers[sid][0].get(":status") == "200"
    assert caller.status(sid)[0] == str(G.RESOURCE_EXHAUSTED)
    assert bytes(caller.body[sid]) == b""
    mesh.assert_quiet_and_done()


# ================================================================ GOAWAY, replay, failures
def _warm(mesh: Mesh, caller: Caller) -> Link:
    """One finished call, so the pool has a ready connection."""
    sid = caller.start(end=True)
    mesh.pump()
    assert caller.status(sid) == ("0", "")
    (link,) = mesh.links
    return link


def test_goaway_resends_an_unprocessed_stream_on_a_new_connection() -> None:
    mesh = Mesh()
    caller = mesh.caller()
    first = _warm(mesh, caller)
    sid = caller.start()
    caller.send(sid, grpc_message(b"x" * 1000))
    mesh.to_relay(caller)  # the relay puts it on the ready connection...
    assert mesh.hooks.calls[-1].up is first.up
    first.backend.conn.goaway()  # ...which the backend closes before it sees the stream
    mesh.pump()
    assert first.closed  # drained and closed once it had no streams left
    assert first.backend.conn.last_peer_stream == 3 and 3 not in first.backend.paths
    call = mesh.hooks.calls[-1]
    second = mesh.link_of(call.up)
    assert second is not first
    caller.send(sid, grpc_message(b"y" * 500), end=True)
    mesh.pump()
    assert caller.status(sid) == ("0", "")
    assert bytes(caller.body[sid]) == grpc_message(b"x" * 1000) + grpc_message(b"y" * 500)
    assert bytes(second.backend.received[1]) == bytes(caller.body[sid])
    assert mesh.relay.stats["streams_resent"] == 1
    assert mesh.hooks.calls[-1].attempts == 2
    mesh.assert_quiet_and_done()


def test_goaway_keeps_streams_at_or_below_last_stream_id() -> None:
    mesh = Mesh()
    caller = mesh.caller()
    a = caller.start()
    mesh.pump()
    (first,) = mesh.links
    b = caller.start()
    mesh.to_relay(caller)
    first.backend.conn.goaway()  # last_stream_id 1: stream 1 is still served, 3 is not
    mesh.pump()
    for sid in (a, b):
        caller.send(sid, grpc_message(bytes([sid]) * 10), end=True)
    mesh.pump()
    assert caller.status(a) == ("0", "") and caller.status(b) == ("0", "")
    assert bytes(caller.body[b]) == grpc_message(bytes([b]) * 10)
    assert first.backend.ended_requests == {1}
    assert mesh.relay.stats["streams_resent"] == 1
    mesh.assert_quiet_and_done()


def test_goaway_stream_over_the_replay_buffer_gets_unavailable() -> None:
    mesh = Mesh(limits=Limits(replay_buffer_bytes=1024))
    caller = mesh.caller()
    first = _warm(mesh, caller)
    sid = caller.start()
    caller.send(sid, grpc_message(b"z" * 2000))
    mesh.to_relay(caller)
    first.backend.conn.goaway()
    mesh.pump()
    status, message = caller.status(sid)
    assert status == str(G.UNAVAILABLE) and LABEL in message
    mesh.assert_quiet_and_done()


def test_goaway_then_replay_overflow_while_waiting_never_sends_a_truncated_request() -> None:
    """After GOAWAY the call waits for a new connection; more request bytes arrive meanwhile and
    the replay buffer overflows. The bytes sent on the first attempt are gone by then: the call
    must fail, never go upstream without its beginning."""
    mesh = Mesh(limits=Limits(replay_buffer_bytes=8 * KiB))
    caller = mesh.caller()
    first = _warm(mesh, caller)
    sid = caller.start()
    caller.send(sid, grpc_message(b"A" * 4000))
    mesh.to_relay(caller)
    first.backend.conn.goaway()
    first.backend.handle(first.backend.conn.receive(first.up.data_to_send()))  # refused there
    mesh.relay.up_received(first.up, first.backend.conn.data_to_send())  # GOAWAY reaches us
    assert mesh.connects  # the call waits for a new connection...
    caller.send(sid, grpc_message(b"B" * 6000), end=True)
    mesh.to_relay(caller)  # ...while the rest of the request arrives
    mesh.pump()
    for link in mesh.links[1:]:
        for body in link.backend.received.values():
            assert bytes(body).startswith(grpc_message(b"A" * 4000)), "truncated request sent"
    status, message = caller.status(sid)
    assert status == str(G.UNAVAILABLE) and LABEL in message
    mesh.assert_quiet_and_done()


def test_streams_refused_before_settings_arrive_are_resent() -> None:
    # The relay binds waiting calls as soon as the connection is up, before the backend's
    # SETTINGS (limit 2) arrive: streams over the limit are refused, then sent again.
    mesh = Mesh(backend_limits=Limits(max_concurrent_streams=2))
    caller = mesh.caller()
    sids = [caller.start() for _ in range(5)]
    for sid in sids:
        caller.send(sid, grpc_message(bytes([sid]) * 50))
    mesh.pump()
    for sid in sids:
        caller.send(sid, b"", end=True)
    mesh.pump()
    for sid in sids:
        assert caller.status(sid) == ("0", ""), sid
        assert bytes(caller.body[sid]) == grpc_message(bytes([sid]) * 50)
    mesh.assert_quiet_and_done()


def test_pool_connect_failure_gives_unavailable_naming_the_pool() -> None:
    mesh = Mesh()
    mesh.fail_connects = "connection refused"
    caller = mesh.caller()
    a = caller.start(end=True)
    b = caller.start()
    caller.send(b, grpc_message(b"q" * 100))
    mesh.pump()
    for sid in (a, b):
        status, message = caller.status(sid)
        assert status == str(G.UNAVAILABLE)
        assert message == f"upstream {LABEL}: connection refused"
    assert mesh.relay.stats["upstream_connect_failures"] >= 1
    # The pool recovers when the endpoint comes back.
    mesh.fail_connects = None
    c = caller.start(end=True)
    mesh.pump()
    assert caller.status(c) == ("0", "")
    mesh.assert_quiet_and_done()


def test_upstream_connection_lost_gives_unavailable() -> None:
    mesh = Mesh()
    caller = mesh.caller()
    sid = caller.start(request_block("/test/Silent"))
    mesh.pump()
    link = mesh.links[0]
    link.closed = True
    link.up.closed = True
    mesh.relay.connection_lost(link.up, "connection reset by peer")
    mesh.pump()
    status, message = caller.status(sid)
    assert status == str(G.UNAVAILABLE) and LABEL in message and "reset by peer" in message
    mesh.assert_quiet_and_done()


def test_upstream_reset_is_passed_to_the_caller() -> None:
    mesh = Mesh()
    caller = mesh.caller()
    sid = caller.start(request_block("/test/Silent"))
    mesh.pump()
    link = mesh.links[0]
    link.backend.conn.reset_stream(1, F.INTERNAL_ERROR)
    mesh.pump()
    assert caller.resets[sid] == F.INTERNAL_ERROR
    mesh.assert_quiet_and_done()


def test_caller_reset_cancels_the_backend_stream() -> None:
    mesh = Mesh()
    caller = mesh.caller()
    sid = caller.start(request_block("/test/Silent", timeout="10S"))
    mesh.pump()
    caller.conn.reset_stream(sid, F.CANCEL)
    mesh.pump()
    assert mesh.links[0].backend.resets == {1: F.CANCEL}
    mesh.assert_quiet_and_done()


def test_downstream_connection_lost_cancels_everything_it_had() -> None:
    mesh = Mesh()
    caller = mesh.caller()
    for _ in range(3):
        caller.start(request_block("/test/Silent", timeout="10S"))
    mesh.pump()
    down = mesh.pairs[0][1]
    down.closed = True
    mesh.pairs.clear()
    mesh.relay.connection_lost(down, "gone")
    mesh.pump()
    assert mesh.links[0].backend.resets == {1: F.CANCEL, 3: F.CANCEL, 5: F.CANCEL}
    mesh.assert_quiet_and_done()


def test_early_response_returns_credit_for_request_bytes_never_forwarded() -> None:
    """The backend answers while the request still streams and its window is full: the relay
    drops the request bytes it still held, and must give the caller that credit back."""
    small = Limits(stream_window_bytes=65535, connection_window_bytes=65535)
    mesh = Mesh(limits=small, backend_limits=small)
    caller = mesh.caller()
    sid = caller.start(request_block("/test/Silent"))
    mesh.pump()
    link = mesh.links[0]
    link.backend.consume = False  # the backend reads nothing: its window fills
    caller.send(sid, b"\0" * 100_000)
    mesh.pump()
    mesh.check_credit()
    call = call_of(mesh, caller, sid)
    assert mesh.buffered(call) > 0  # the relay holds what the backend has no room for
    link.backend.conn.send_headers(1, G.trailers_only_block(G.OK, ""), True)
    mesh.pump()
    assert caller.status(sid) == ("0", "")
    # RFC 9113 §8.1: a complete response, then the caller is asked to stop sending.
    assert caller.resets.get(sid) == F.NO_ERROR
    assert mesh.relay.active == 0
    mesh.check_credit()
    mesh.assert_quiet_and_done()


def test_waiting_calls_do_not_starve_bound_calls_of_connection_window() -> None:
    windows = Limits(stream_window_bytes=65535, connection_window_bytes=65535)
    mesh = Mesh(limits=windows, caller_limits=windows, max_connections=1,
                backend_limits=Limits(max_concurrent_streams=1))
    caller = mesh.caller()
    bound = caller.start()
    mesh.pump()  # on the only upstream slot
    waiting = caller.start()
    caller.send(waiting, grpc_message(b"w" * 65530), end=True)  # all the connection window
    mesh.pump()
    assert call_of(mesh, caller, waiting) in mesh.pool.waiting
    caller.send(bound, grpc_message(b"b" * 10), end=True)  # the bound call's last bytes
    mesh.pump()
    assert caller.status(bound) == ("0", "")  # fails: those bytes can never leave the caller
    assert caller.status(waiting) == ("0", "")


# ================================================================ flow control property
def _messages(rng: random.Random, size: int) -> bytes:
    """About ``size`` bytes of gRPC length-prefixed messages (0 gives an empty request)."""
    out = bytearray()
    while len(out) < size:
        n = min(rng.choice([0, 1, 100, 5000, 16_379, 16_380, 40_000, 70_000]), size - len(out))
        out += grpc_message(rng.randbytes(n))
    return bytes(out)


def _run_interleaving(n: int, sizes: list[int], chunk_seeds: list[int], schedule: list[int],
                      pauses: list[int], windows: tuple[int, int], backend_streams: int) -> None:
    stream_window, conn_window = windows
    lim = Limits(stream_window_bytes=stream_window, connection_window_bytes=conn_window,
                 upstream_connections_per_endpoint=2)
    mesh = Mesh(limits=lim, handshake_first=backend_streams < n,
                backend_limits=Limits(stream_window_bytes=stream_window,
                                      connection_window_bytes=conn_window,
                                      max_concurrent_streams=backend_streams),
                caller_limits=Limits(stream_window_bytes=stream_window,
                                     connection_window_bytes=conn_window))
    callers = [mesh.caller(), mesh.caller()]
    plan = []  # (caller, payload, chunks)
    for i in range(n):
        rng = random.Random(chunk_seeds[i])
        payload = _messages(rng, sizes[i])
        cuts = sorted(rng.sample(range(1, len(payload)), min(max(len(payload) - 1, 0), rng.randint(0, 8))))
        chunks = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
        plan.append((callers[i % 2], payload, chunks))
    sids: list[int | None] = [None] * n
    progress = [0] * n
    pause_iter = iter(pauses)
    for i in schedule:
        k = i % n
        caller, payload, chunks = plan[k]
        if sids[k] is None:
            sids[k] = caller.start()
        elif progress[k] < len(chunks):
            last = progress[k] == len(chunks) - 1
            caller.send(sids[k], chunks[progress[k]], end=last)
            progress[k] += 1
        toggle = next(pause_iter, None)
        if toggle is not None and mesh.links:
            link = mesh.links[toggle % len(mesh.links)]
            mesh.set_paused(link, id(link.up) not in mesh.paused)
        mesh.pump()
        mesh.check_credit()
    # Finish every stream, then let everything drain.
    for k in range(n):
        caller, payload, chunks = plan[k]
        if sids[k] is None:
            sids[k] = caller.start()
        while progress[k] < len(chunks):
            caller.send(sids[k], chunks[progress[k]], end=progress[k] == len(chunks) - 1)
            progress[k] += 1
        if not chunks:
            caller.send(sids[k], b"", end=True)
        mesh.pump()
        mesh.check_credit()
    mesh.resume_all()
    mesh.pump()
    mesh.check_credit()
    for k in range(n):
        caller, payload, _ = plan[k]
        sid = sids[k]
        assert caller.status(sid) == ("0", ""), (k, caller.status(sid))
        assert bytes(caller.body[sid]) == payload, k
        assert sid in caller.ended and sid not in caller.resets
    mesh.assert_quiet_and_done()


# (backend stream limit, (stream window, connection window)). With a limit of 3 calls wait for
# upstream capacity; their pending bytes hold the caller's connection window (see
# test_waiting_calls_do_not_starve_bound_calls_of_connection_window), so there the connection
# window leaves room for every other stream of a caller (at most 10 here) to hold a full window.
LIMITS_AND_WINDOWS = st.one_of(
    st.tuples(st.just(256), st.sampled_from([(65535, 65535), (65535, 4 * 65535),
                                             (100_000, 1 << 20), (1 << 20, 4 << 20)])),
    st.tuples(st.just(3), st.sampled_from([(65535, 10 * 65535), (100_000, 1_000_000)])),
)

interleavings = st.integers(1, 20).flatmap(lambda n: st.tuples(
    st.just(n),
    st.lists(st.sampled_from([0, 5, 16_389, 65_535, 65_540, 131_072, 200 * KiB])
             | st.integers(0, 200 * KiB), min_size=n, max_size=n),
    st.lists(st.integers(0, 2**30), min_size=n, max_size=n),
    st.lists(st.integers(0, 10_000), min_size=n, max_size=12 * n),
    st.lists(st.none() | st.integers(0, 7), max_size=12 * n),
    LIMITS_AND_WINDOWS,
)).map(lambda c: (*c[:5], c[5][1], c[5][0]))


@FAST
@given(case=interleavings)
def test_flow_control_credit_is_conserved_per_stream(case) -> None:
    _run_interleaving(*case)


@pytest.mark.fuzz
@pytest.mark.timeout(3600)
@FUZZ
@given(case=interleavings)
def test_fuzz_flow_control_credit_is_conserved_per_stream(case) -> None:
    _run_interleaving(*case)


def test_a_call_ends_when_its_response_is_queued_not_when_held_bookkeeping_runs() -> None:
    """The relay stamps ``call.ended_s`` as the response's end is queued for the caller; the
    end hooks, held over the read (as the I/O side holds them until the read's writes are
    out), run later and measure the call to that stamp."""
    mesh = Mesh()
    caller = mesh.caller()
    sid = caller.start()
    caller.send(sid, b"\0\0\0\0\x02hi", True)
    mesh.relay.holding = True
    mesh.pump()
    assert caller.status(sid) == ("0", "") and mesh.hooks.ended == []
    answered_s = mesh.clock.now_s
    mesh.clock.now_s += 5.0
    mesh.relay.release()
    (call,) = mesh.hooks.ended
    assert call.ended_s == answered_s
