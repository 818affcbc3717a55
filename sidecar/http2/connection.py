"""One HTTP/2 connection, either role, as a sans-IO state machine.

``receive(bytes)`` parses frames and returns events; the ``send_*`` methods queue frames;
``data_to_send()`` hands back the bytes to write. The core enforces the protocol and our
limits (frame size, concurrent streams, header list size, flow-control windows) and keeps
per-stream outboxes for DATA the peer's windows do not yet admit. It never touches a socket,
a clock or the event loop.

Memory bounds: the input buffer holds at most one frame (our max frame size plus header);
a header block being assembled is capped at twice the header list limit and at
``max_continuation_frames`` CONTINUATION frames; an outbox holds only what the owner queued,
and the relay queues no more than the source's flow-control window.

Work bounds (flood budgets): frames that cost us work but carry no request are counted per
budget window, and the I/O driver calls ``new_window()`` once a second to start the counts
over (the core reads no clock). Over a budget the connection ends with GOAWAY
ENHANCE_YOUR_CALM and ``error_kind`` names the budget:

* ``rapid_reset``: RST_STREAM frames the peer sent, plus the resets it provoked (our
  RST_STREAM for its stream errors, and REFUSED_STREAM over our stream limit once it has
  acknowledged our SETTINGS), over ``max_resets_per_s`` (CVE-2023-44487 and its
  provoked-reset variant).
* ``control_flood``: PING, SETTINGS (non-ACK), PRIORITY, GOAWAY and unknown-type frames,
  unsolicited PING and SETTINGS ACKs, and WINDOW_UPDATE frames beyond an allowance of
  ``WINDOW_UPDATES_PER_FRAME`` (10, as Envoy allows) per DATA frame we sent or stream the
  peer opened in the window (gRPC clients send one per message read, and a DATA frame may
  carry several messages), over
  ``max_control_frames_per_s``. A PING that follows DATA we sent since the previous PING is
  free (what gRPC's BDP probing does, and what gRPC's own servers allow).
* ``empty_frame_flood``: DATA frames with no payload and no END_STREAM (after padding), and
  empty CONTINUATION frames, over ``max_empty_frames_per_s``.
* ``continuation_flood``: more than ``max_continuation_frames`` CONTINUATION frames in one
  header block.

The DATA and HEADERS paths pay nothing for this: a non-empty DATA frame is not counted, and
sending a DATA frame costs one integer add.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable

from mesh_common.limits import Limits

from . import frames as F
from .events import (
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
from .headers import HeaderBlock, HeaderListTooLarge, HeaderReader, HpackError

_FRAME_HEADER = struct.Struct(">HBBBL")

COPY_MAX_BYTES = 1024
"""DATA payloads up to this size are joined to their frame header at once; larger ones are
queued as they are, so the single join in ``data_to_send`` is their only copy."""

Response = tuple[int, HeaderBlock, bytes | memoryview, HeaderBlock, bool]
"""A whole response taken in at once (``receive_responses``): stream id, headers, the DATA
payload, trailers, whether the stream is over (and forgotten)."""

WINDOW_UPDATES_PER_FRAME = 10
"""WINDOW_UPDATE frames a peer may send per DATA frame we sent or stream it opened (in one
budget window) before they count against ``max_control_frames_per_s``."""


class ProtocolError(Exception):
    """Raised internally for a connection error; turned into GOAWAY + ConnectionTerminated.

    ``code`` is the HTTP/2 error code sent in the GOAWAY, ``reason`` its debug text, and
    ``kind`` a short metric label (``protocol_error``, ``frame_size``, ``bad_hpack``,
    ``bad_preface``, ``flow_control``, ``header_block_too_large``, ``rapid_reset``,
    ``control_flood``, ``empty_frame_flood``, ``continuation_flood``)."""

    def __init__(self, code: int, reason: str, kind: str = "protocol_error") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.kind = kind


class Stream:
    """Per-stream state kept by the core. ``user`` belongs to the owner (the relay)."""

    __slots__ = (
        "id", "recv_window", "send_window", "recv_closed", "send_closed", "outbox",
        "outbox_bytes", "outbox_end", "outbox_trailers", "headers_seen", "owed", "user",
    )

    def __init__(self, sid: int, recv_window: int, send_window: int) -> None:
        self.id = sid
        self.recv_window = recv_window
        self.send_window = send_window
        self.recv_closed = False
        self.send_closed = False
        self.outbox: deque[bytes | memoryview] | None = None
        """DATA queued for the windows (made by the first chunk that has to wait)."""
        self.outbox_bytes = 0
        self.outbox_end = False
        self.outbox_trailers: bytes | None = None
        self.headers_seen = False
        self.owed = 0
        self.user: object = None


class H2Connection:
    """HTTP/2 connection state for one side (client or server) of one transport."""

    def __init__(self, *, client: bool, limits: Limits) -> None:
        self.client = client
        self.limits = limits
        self.streams: dict[int, Stream] = {}
        self.closed = False
        self.paused = False
        self.goaway_received: int | None = None  # last_stream_id the peer will process
        self.goaway_sent = False
        self.on_output: Callable[[], None] | None = None
        self.owner: object = None  # the owner's per-connection record (peer identity, pool)
        self.calls: dict[int, object] = {}  # the owner's per-stream records, by stream id
        self.io: object = None  # the I/O driver of this connection (its asyncio protocol)
        # peer settings
        self.peer_max_streams = 2**31 - 1
        self.peer_initial_window = F.DEFAULT_WINDOW_BYTES
        self.peer_max_frame = F.DEFAULT_MAX_FRAME_BYTES
        self.peer_settings_seen = False
        # our side
        self.max_frame = limits.max_frame_bytes
        self.conn_recv_window = limits.connection_window_bytes
        self.conn_send_window = F.DEFAULT_WINDOW_BYTES
        self.conn_owed = 0
        self._conn_update_threshold = limits.connection_window_bytes >> 2
        self._stream_update_threshold = limits.stream_window_bytes >> 2
        self.next_stream_id = 1  # client role: ids we open
        self.last_peer_stream = 0  # server role: highest id the peer opened
        self.streams_opened = 0
        self.error_kind: str | None = None
        """The ``kind`` of the ProtocolError that ended the connection in ``receive``."""
        self.refused_streams = 0
        """Peer streams refused with REFUSED_STREAM over ``max_concurrent_streams``."""
        self.window_opened = 0
        """Bumped whenever the peer opens a send window of ours (a positive WINDOW_UPDATE on
        the connection or a live stream, or a SETTINGS_INITIAL_WINDOW_SIZE increase)."""
        # flood budgets: counts in the current window (see new_window)
        self._resets = 0
        self._control = 0
        self._empty = 0
        self._window_updates = 0
        self._data_sent = 0  # DATA frames we ever wrote (one add per frame on the send path)
        self._data_sent_base = 0  # ... as of the window's start
        self._opened_base = 0  # streams_opened as of the window's start
        self._ping_mark = 0  # _data_sent when the peer's last PING came
        self._pings_out = 0  # our PINGs not yet acknowledged
        self.pings_sent = 0
        """PINGs we sent, ever. A peer acks PINGs in the order they come, so once
        ``pings_acked`` reaches this count as of a PING, the peer has read every frame we
        wrote before it."""
        self.pings_acked = 0
        """Acks of our PINGs received, ever."""
        self._settings_out = 0  # our SETTINGS not yet acknowledged
        self._settings_acked = False
        self._cont_frames = 0  # CONTINUATION frames in the header block being assembled
        self._reader = HeaderReader(limits.max_header_list_bytes)
        self._in = bytearray()
        self._preface_needed = not client
        self._out: list[bytes] = []
        self._cont: tuple[int, int, bytearray, bool] | None = None  # sid, flags, block, new
        self._blocked: dict[int, None] = {}  # streams with an outbox waiting for window
        self._events: list[Event] = []
        self._inside = False  # inside receive()/set_paused(): events are returned, not signalled
        self.on_event: Callable[[H2Connection], None] | None = None
        """Called when an event is queued outside ``receive`` (by a send, reset or flush);
        the owner then collects it with ``take_events``."""

    # ----------------------------------------------------------------- setup / output
    def initiate(self) -> None:
        """Queue our connection preface: client magic (client role), SETTINGS, window."""
        settings = {
            F.SETTINGS_HEADER_TABLE_SIZE: 0,
            F.SETTINGS_MAX_CONCURRENT_STREAMS: self.limits.max_concurrent_streams,
            F.SETTINGS_INITIAL_WINDOW_SIZE: self.limits.stream_window_bytes,
            F.SETTINGS_MAX_FRAME_SIZE: self.max_frame,
            F.SETTINGS_MAX_HEADER_LIST_SIZE: self.limits.max_header_list_bytes,
        }
        if self.client:
            settings[F.SETTINGS_ENABLE_PUSH] = 0
            self._write(F.PREFACE)
        self._write(F.settings_frame(settings))
        self._settings_out += 1
        extra = self.limits.connection_window_bytes - F.DEFAULT_WINDOW_BYTES
        if extra > 0:
            self._write(F.window_update_frame(0, extra))

    def _write(self, data: bytes) -> None:
        if not self._out and self.on_output is not None:
            self._out.append(data)
            self.on_output()
        else:
            self._out.append(data)

    def take_events(self) -> list[Event]:
        """Events queued by sends, resets and flushes since the last collection."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> bytes:
        """Return and forget every byte queued for the wire (one copy of large payloads)."""
        if not self._out:
            return b""
        out = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out = []
        return out

    @property
    def active_streams(self) -> int:
        return len(self.streams)

    @property
    def preface_received(self) -> bool:
        """True once the peer's preface is complete: the client magic (server role) and the
        peer's first SETTINGS frame (either role)."""
        return self.peer_settings_seen

    def new_window(self) -> None:
        """Start a new budget window: the per-second counts of resets, control frames, empty
        frames and WINDOW_UPDATEs start over. The I/O driver calls this once a second; the
        core reads no clock. O(1)."""
        self._resets = 0
        self._control = 0
        self._empty = 0
        self._window_updates = 0
        self._data_sent_base = self._data_sent
        self._opened_base = self.streams_opened

    def blocked_bytes(self) -> int:
        """DATA bytes queued in stream outboxes that wait for the peer's flow-control window
        (the stream's or the connection's is shut); 0 when none. Bytes held only because the
        transport is paused are not counted. O(blocked streams)."""
        if not self._blocked:
            return 0
        conn_shut = self.conn_send_window <= 0
        total = 0
        for sid in self._blocked:
            st = self.streams.get(sid)
            if st is not None and (conn_shut or st.send_window <= 0):
                total += st.outbox_bytes
        return total

    def can_open_stream(self) -> bool:
        """Client role: may a new stream be opened now (peer limit, GOAWAY, closed)?"""
        return (not self.closed and self.goaway_received is None and not self.goaway_sent
                and len(self.streams) < self.peer_max_streams
                and self.next_stream_id < 2**31 - 1)

    # ----------------------------------------------------------------- sending
    def open_stream(self) -> Stream:
        """Client role: allocate the next stream id (headers are sent by ``send_headers``)."""
        sid = self.next_stream_id
        self.next_stream_id += 2
        st = Stream(sid, self.limits.stream_window_bytes, self.peer_initial_window)
        self.streams[sid] = st
        self.streams_opened += 1
        return st

    def send_headers(self, sid: int, block: bytes, end_stream: bool) -> None:
        st = self.streams.get(sid)
        if st is None or st.send_closed or self.closed:
            return
        n = len(block)
        if n <= self.peer_max_frame:
            flags = 0x5 if end_stream else 0x4  # END_HEADERS (+ END_STREAM)
            out = self._out
            out.append(_FRAME_HEADER.pack(n >> 8, n & 0xFF, 1, flags, sid) + block)
            if len(out) == 1 and self.on_output is not None:
                self.on_output()
        else:
            self._write(F.headers_frames(sid, block, end_stream, self.peer_max_frame))
        if end_stream:
            st.send_closed = True
            if st.recv_closed:
                self._maybe_forget(st)

    def send_trailers(self, sid: int, block: bytes) -> None:
        """Trailers go after any DATA still in the stream's outbox."""
        st = self.streams.get(sid)
        if st is None or st.send_closed or self.closed:
            return
        if st.outbox:
            st.outbox_trailers = block
            return
        self.send_headers(sid, block, True)

    def send_data(self, sid: int, data: bytes, end_stream: bool) -> int:
        """Queue DATA; returns how many bytes went out at once. Later progress is reported
        as DataSent events (from ``receive`` or ``set_paused``)."""
        st = self.streams.get(sid)
        if st is None or st.send_closed or self.closed or st.outbox_end:
            return 0
        n = len(data)
        if (n and not st.outbox and not self.paused and n <= st.send_window
                and n <= self.conn_send_window and n <= self.peer_max_frame):
            # Fast path: the whole chunk fits the windows and one frame.
            st.send_window -= n
            self.conn_send_window -= n
            self._data_sent += 1
            out = self._out
            wake = not out and self.on_output is not None
            header = _FRAME_HEADER.pack(n >> 8, n & 0xFF, 0, 1 if end_stream else 0, sid)
            if n <= COPY_MAX_BYTES:
                out.append(header + data)
            else:  # large: no copy here; the one join in data_to_send copies it
                out.append(header)
                out.append(data)
            if wake:
                self.on_output()
            if end_stream:
                st.outbox_end = True
                st.send_closed = True
                if st.recv_closed:
                    self._maybe_forget(st)
            return n
        if data:
            if st.outbox is None:
                st.outbox = deque()
            st.outbox.append(data)
            st.outbox_bytes += len(data)
        if end_stream:
            st.outbox_end = True
        return self._flush_stream(st)

    def _flush_stream(self, st: Stream) -> int:
        """Write what windows allow from the stream's outbox; return payload bytes written."""
        sent = 0
        if not self.paused:
            max_frame = self.peer_max_frame
            while st.outbox:
                allowed = min(st.send_window, self.conn_send_window, max_frame)
                if allowed <= 0:
                    break
                chunk = st.outbox[0]
                if len(chunk) <= allowed:
                    st.outbox.popleft()
                    part = chunk
                else:  # split without copying: the join in data_to_send copies once
                    view = chunk if type(chunk) is memoryview else memoryview(chunk)
                    part = view[:allowed]
                    st.outbox[0] = view[allowed:]
                n = len(part)
                st.outbox_bytes -= n
                st.send_window -= n
                self.conn_send_window -= n
                sent += n
                last = not st.outbox and st.outbox_end and st.outbox_trailers is None
                self._data_sent += 1
                header = _FRAME_HEADER.pack(n >> 8, n & 0xFF, 0, 1 if last else 0, st.id)
                if n <= COPY_MAX_BYTES:
                    self._write(header + part)
                else:
                    self._write(header)
                    self._out.append(part)
                if last:
                    st.send_closed = True
        if st.outbox:
            self._blocked[st.id] = None
        else:
            self._blocked.pop(st.id, None)
            if not st.send_closed:
                if st.outbox_trailers is not None:
                    block, st.outbox_trailers = st.outbox_trailers, None
                    self._write(F.headers_frames(st.id, block, True, self.peer_max_frame))
                    st.send_closed = True
                elif st.outbox_end:
                    self._data_sent += 1
                    self._write(F.data_frame(st.id, b"", True))
                    st.send_closed = True
            if st.send_closed:
                self._maybe_forget(st)
        return sent

    def _flush_blocked(self) -> None:
        if self.paused or not self._blocked:
            return
        for sid in list(self._blocked):
            if self.conn_send_window <= 0:
                break
            st = self.streams.get(sid)
            if st is None:
                self._blocked.pop(sid, None)
                continue
            n = self._flush_stream(st)
            if n:
                self._events.append(DataSent(sid, n))

    def set_paused(self, paused: bool) -> list[Event]:
        """Pause (transport over its high-water mark) or resume flushing relayed DATA."""
        self.paused = paused
        if not paused:
            self._inside = True
            try:
                self._flush_blocked()
            finally:
                self._inside = False
        events, self._events = self._events, []
        return events

    def reset_stream(self, sid: int, code: int) -> None:
        st = self.streams.pop(sid, None)
        if st is None or self.closed:
            return
        self._blocked.pop(sid, None)
        self._write(F.rst_stream_frame(sid, code))

    def ack_data(self, sid: int, n: int) -> None:
        """Return ``n`` bytes of the stream's receive credit to the peer (the owner calls this
        once the bytes have left for the other side). Connection-level credit is returned by
        the core itself as DATA arrives, so one stalled stream never starves the others; what
        a connection buffers is bounded by its streams' windows."""
        if n <= 0 or self.closed:
            return
        st = self.streams.get(sid)
        if st is not None and not st.recv_closed:
            st.owed += n
            if st.owed >= self._stream_update_threshold:
                self._write(F.window_update_frame(sid, st.owed))
                st.recv_window += st.owed
                st.owed = 0

    def _credit_connection(self, n: int) -> None:
        self.conn_owed += n
        if self.conn_owed >= self._conn_update_threshold:
            self._write(F.window_update_frame(0, self.conn_owed))
            self.conn_recv_window += self.conn_owed
            self.conn_owed = 0

    def ping(self, opaque: bytes) -> None:
        if not self.closed:
            self._pings_out += 1
            self.pings_sent += 1
            self._write(F.ping_frame(opaque))

    def goaway(self, code: int = F.NO_ERROR, debug: bytes = b"") -> None:
        """Tell the peer we take no new streams (drain). Streams in flight continue."""
        if self.closed or self.goaway_sent:
            return
        self.goaway_sent = True
        last = self.last_peer_stream if not self.client else 0
        self._write(F.goaway_frame(last, code, debug))

    def terminate(self, code: int, reason: str) -> None:
        """End the connection with GOAWAY; every stream on it is dead."""
        if self.closed:
            return
        last = self.last_peer_stream if not self.client else 0
        self._write(F.goaway_frame(last, code, reason.encode()[:256]))
        self.closed = True

    def _maybe_forget(self, st: Stream) -> None:
        if st.send_closed and st.recv_closed and not st.outbox:
            if self.streams.pop(st.id, None) is not None:
                if self._blocked:
                    self._blocked.pop(st.id, None)
                events = self._events
                events.append(StreamEnded(st.id))
                if not self._inside and self.on_event is not None and len(events) == 1:
                    self.on_event(self)

    # ----------------------------------------------------------------- receiving
    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; returns the events they caused. Never raises."""
        if self.closed:
            return []
        self._inside = True
        try:
            self._receive(data)
        except ProtocolError as exc:
            self._fail(exc.code, exc.reason, exc.kind)
        finally:
            self._inside = False
        events, self._events = self._events, []
        return events

    def receive_request(self, data: bytes) -> tuple[int, HeaderBlock, bytes | memoryview] | None:
        """Server role: when ``data`` is exactly one new request whose HEADERS (END_HEADERS
        only, a block ``HeaderReader.known`` reads: in the scan cache, or a cached block plus
        per-call fields such as a deadline and trace ids) and DATA (END_STREAM only) both fit every
        limit and window, take it in and return (stream id, header block, payload), with the
        connection left exactly as ``receive`` would leave it; the caller then acts on what
        would have been its HeadersReceived and DataReceived events. Otherwise return None
        and change nothing: the caller hands ``data`` to ``receive``.

        The one-read unary request is what a gRPC caller sends most, and ``receive`` would
        build two events and walk the general frame dispatch for it; this path does only the
        request's own accounting (a sidecar woken cold pays for every kind of work it does)."""
        n = len(data)
        if (n < 18 or self.client or self.closed or self._in or self._cont is not None
                or self._events or not self.peer_settings_seen or self.goaway_sent):
            return None
        hi, lo, ftype, flags, sid = _FRAME_HEADER.unpack_from(data, 0)
        end = 9 + ((hi << 8) | lo)
        if (ftype != 1 or flags != 0x4 or end + 9 > n or end - 9 > self.max_frame
                or not sid & 1 or sid <= self.last_peer_stream
                or len(self.streams) >= self.limits.max_concurrent_streams):
            return None
        hi, lo, ftype, flags, sid2 = _FRAME_HEADER.unpack_from(data, end)
        flow = (hi << 8) | lo
        if (ftype != 0 or flags != 0x1 or sid2 != sid or end + 9 + flow != n
                or flow > self.max_frame or flow > self.conn_recv_window
                or flow > self.limits.stream_window_bytes):
            return None
        reader = self._reader
        if reader.table_size != 0:
            return None
        hb = reader.known(data[9:end])  # per-call ids or a deadline: still known
        if hb is None:
            return None
        # HEADERS: a new stream (as _headers_complete)
        self.last_peer_stream = sid
        st = Stream(sid, self.limits.stream_window_bytes, self.peer_initial_window)
        self.streams[sid] = st
        self.streams_opened += 1
        st.headers_seen = True
        # DATA with END_STREAM (as _parse and _on_data)
        payload = memoryview(data)[end + 9:] if flow > COPY_MAX_BYTES else data[end + 9:]
        self.conn_recv_window -= flow
        if flow:
            self.conn_owed += flow
            if self.conn_owed >= self._conn_update_threshold:
                self._credit_connection(0)
        st.recv_window -= flow
        st.recv_closed = True
        return sid, hb, payload

    def receive_responses(self, data: bytes) -> tuple[list[Response], list[Event]] | None:
        """Client role: when ``data`` begins with one or more whole responses, each on an
        open stream whose request is sent, HEADERS (END_HEADERS only), one non-empty DATA
        (no flags) and trailers (END_HEADERS and END_STREAM), both blocks in the scan cache
        and the DATA within every limit and window, take them in, hand the rest of ``data``
        to ``receive``, and return (the responses, the rest's events). Each response is
        (stream id, headers, payload, trailers, whether the stream is now over and
        forgotten); the caller acts on what would have been its events (HeadersReceived,
        DataReceived, HeadersReceived, and StreamEnded when over), then on the rest's. The
        connection is left exactly as ``receive(data)`` would leave it. When ``data`` does
        not begin so, return None and change nothing (see ``receive_request``)."""
        n = len(data)
        if (n < 27 or not self.client or self.closed or self._in or self._cont is not None
                or self._events or not self.peer_settings_seen or self._reader.table_size != 0):
            return None
        taken: list[Response] = []
        pos = 0
        while n - pos >= 27:
            end = self._take_response(data, pos, n, taken)
            if not end:
                break
            pos = end
        if not taken:
            return None
        return taken, (self.receive(data[pos:]) if pos < n else [])

    def _take_response(self, data: bytes, pos: int, n: int, taken: list[Response]) -> int:
        """Take in the response at ``data[pos:]`` (see ``receive_responses``) and append it
        to ``taken``; return where it ends, or 0 (nothing changed) when there is none."""
        unpack = _FRAME_HEADER.unpack_from
        hi, lo, ftype, flags, sid = unpack(data, pos)
        e1 = pos + 9 + ((hi << 8) | lo)
        if ftype != 1 or flags != 0x4 or e1 + 18 > n or e1 - pos - 9 > self.max_frame:
            return 0
        st = self.streams.get(sid)
        if st is None or st.headers_seen or st.recv_closed or not st.send_closed:
            return 0
        hi, lo, ftype, flags, sid2 = unpack(data, e1)
        flow = (hi << 8) | lo
        e2 = e1 + 9 + flow
        if (ftype != 0 or flags != 0 or sid2 != sid or not flow or e2 + 9 > n
                or flow > self.max_frame or flow > self.conn_recv_window
                or flow > st.recv_window):
            return 0
        hi, lo, ftype, flags, sid3 = unpack(data, e2)
        e3 = e2 + 9 + ((hi << 8) | lo)
        if ftype != 1 or flags != 0x5 or sid3 != sid or e3 > n or e3 - e2 - 9 > self.max_frame:
            return 0
        reader = self._reader
        headers = reader.cached(data[pos + 9:e1])
        trailers = reader.cached(data[e2 + 9:e3])
        if headers is None or trailers is None:
            return 0
        st.headers_seen = True
        payload = memoryview(data)[e1 + 9:e2] if flow > COPY_MAX_BYTES else data[e1 + 9:e2]
        self.conn_recv_window -= flow
        self.conn_owed += flow
        if self.conn_owed >= self._conn_update_threshold:
            self._credit_connection(0)
        st.recv_window -= flow
        st.recv_closed = True
        over = not st.outbox
        if over:  # as _maybe_forget, with the StreamEnded event left to the caller
            del self.streams[sid]
            if self._blocked:
                self._blocked.pop(sid, None)
        taken.append((sid, headers, payload, trailers, over))
        return e3

    def _fail(self, code: int, reason: str, kind: str = "protocol_error") -> None:
        self.error_kind = kind
        self.terminate(code, reason)
        self._in.clear()
        self._events.append(ConnectionTerminated(code, reason))

    def _receive(self, data: bytes) -> None:
        buf = self._in
        if buf and self.peer_settings_seen:
            # A frame began in an earlier read: complete it from the head of ``data``, copying
            # only its own bytes, then parse the rest of ``data`` in place.
            start = 0
            if len(buf) < 9:
                start = min(9 - len(buf), len(data))
                buf += data[:start]
                if len(buf) < 9:
                    return
            length = (buf[0] << 16) | (buf[1] << 8) | buf[2]
            if length > self.max_frame:
                raise ProtocolError(F.FRAME_SIZE_ERROR,
                                    f"frame of {length} bytes exceeds {self.max_frame}", "frame_size")
            need = 9 + length - len(buf)
            if need > len(data) - start:
                buf += data[start:] if start else data
                return
            buf += data[start:start + need]
            ftype, flags = buf[3], buf[4]
            sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            if self._cont is None and ftype == 0:
                # The buffer becomes the payload (no copy); a new one takes its place.
                self._in = bytearray()
                self._on_data(flags, sid, memoryview(buf)[9:])
                if self.closed:
                    return
                self._parse(data, start + need)
                return
            payload = bytes(memoryview(buf)[9:])
            buf.clear()
            if self._cont is None and ftype == 1:
                self._on_headers(flags, sid, payload)
            else:
                self._frame(ftype, flags, sid, payload)
            if self.closed:
                return
            self._parse(data, start + need)
            return
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data
        pos = 0
        n = len(view)
        if not self.peer_settings_seen:
            if self._preface_needed:
                need = len(F.PREFACE)
                if n < need:
                    if not F.PREFACE.startswith(bytes(view)):
                        raise ProtocolError(F.PROTOCOL_ERROR, "bad connection preface",
                                            "bad_preface")
                    if not buf:
                        buf += data
                    return
                if bytes(view[:need]) != F.PREFACE:
                    raise ProtocolError(F.PROTOCOL_ERROR, "bad connection preface", "bad_preface")
                self._preface_needed = False
                pos = need
            # The preface ends with a SETTINGS frame, which must come first (RFC 9113 §3.4).
            if n - pos >= 9 and (view[pos + 3] != F.SETTINGS or view[pos + 4] & F.FLAG_ACK):
                raise ProtocolError(F.PROTOCOL_ERROR, "connection preface without SETTINGS",
                                    "bad_preface")
        if buf:
            data = bytes(buf)  # rare: only before the peer's SETTINGS arrived
            buf.clear()
        self._parse(data, pos)

    def _parse(self, view: bytes, pos: int) -> None:
        """Handle every whole frame of ``view`` from ``pos``; keep a trailing partial frame."""
        n = len(view)
        max_frame = self.max_frame
        unpack = _FRAME_HEADER.unpack_from
        mv: memoryview | None = None
        while n - pos >= 9:
            hi, lo, ftype, flags, sid = unpack(view, pos)
            length = (hi << 8) | lo
            sid &= 0x7FFFFFFF
            if length > max_frame:
                raise ProtocolError(F.FRAME_SIZE_ERROR,
                                    f"frame of {length} bytes exceeds {max_frame}", "frame_size")
            end = pos + 9 + length
            if end > n:
                break
            if length > COPY_MAX_BYTES and ftype == 0:
                if mv is None:
                    mv = memoryview(view)
                payload = mv[pos + 9:end]  # large DATA: a view of the read, no copy
            else:
                payload = view[pos + 9:end]
            pos = end
            if self._cont is None:
                if ftype == 0:  # DATA
                    self._on_data(flags, sid, payload)
                    continue
                if ftype == 1:  # HEADERS
                    self._on_headers(flags, sid, payload)
                    continue
            self._frame(ftype, flags, sid, payload)
            if self.closed:
                return
        if pos < n:
            self._in += view[pos:]

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._cont is not None and ftype != F.CONTINUATION:
            raise ProtocolError(F.PROTOCOL_ERROR, "expected CONTINUATION")
        if ftype > F.CONTINUATION or ftype == F.PRIORITY or ftype == F.GOAWAY:
            self._control_frame()  # PING and SETTINGS are counted by their handlers
        if ftype == F.DATA:
            self._on_data(flags, sid, payload)
        elif ftype == F.HEADERS:
            self._on_headers(flags, sid, payload)
        elif ftype == F.CONTINUATION:
            self._on_continuation(flags, sid, payload)
        elif ftype == F.WINDOW_UPDATE:
            self._on_window_update(sid, payload)
        elif ftype == F.RST_STREAM:
            self._on_rst(sid, payload)
        elif ftype == F.SETTINGS:
            self._on_settings(flags, sid, payload)
        elif ftype == F.PING:
            self._on_ping(flags, sid, payload)
        elif ftype == F.GOAWAY:
            self._on_goaway(sid, payload)
        elif ftype == F.PRIORITY:
            if sid == 0:
                raise ProtocolError(F.PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                self._stream_error(sid, F.FRAME_SIZE_ERROR)
        elif ftype == F.PUSH_PROMISE:
            raise ProtocolError(F.PROTOCOL_ERROR, "PUSH_PROMISE is disabled")
        # unknown frame types are ignored (RFC 9113 §4.1)

    # ----------------------------------------------------------------- flood budgets
    def _control_frame(self) -> None:
        """Count one control frame against the window's budget; raise when over it."""
        self._control += 1
        if self._control > self.limits.max_control_frames_per_s:
            raise ProtocolError(
                F.ENHANCE_YOUR_CALM,
                f"control flood: more than {self.limits.max_control_frames_per_s} control "
                "frames in a second", "control_flood")

    def _empty_frame(self) -> None:
        """Count one empty DATA or CONTINUATION frame; raise when over the budget."""
        self._empty += 1
        if self._empty > self.limits.max_empty_frames_per_s:
            raise ProtocolError(
                F.ENHANCE_YOUR_CALM,
                f"empty frame flood: more than {self.limits.max_empty_frames_per_s} empty "
                "frames in a second", "empty_frame_flood")

    def _reset_counted(self) -> None:
        """Count one reset the peer sent or provoked; raise when over the budget."""
        self._resets += 1
        if self._resets > self.limits.max_resets_per_s:
            raise ProtocolError(
                F.ENHANCE_YOUR_CALM,
                f"rapid reset: more than {self.limits.max_resets_per_s} RST_STREAM in a second",
                "rapid_reset")

    def _is_idle(self, sid: int) -> bool:
        """A stream id the peer or we have not yet used."""
        if self.client:
            return sid >= self.next_stream_id if sid % 2 else True
        return sid > self.last_peer_stream if sid % 2 else True

    def _stream_error(self, sid: int, code: int) -> None:
        """Reset one stream for the peer's error on it (counted as a provoked reset)."""
        self._reset_counted()
        st = self.streams.pop(sid, None)
        self._write(F.rst_stream_frame(sid, code))
        if st is not None:
            self._blocked.pop(sid, None)
            self._events.append(StreamReset(sid, code))

    @staticmethod
    def _strip_padding(flags: int, payload: bytes) -> tuple[bytes, int]:
        if not flags & F.FLAG_PADDED:
            return payload, 0
        if not payload:
            raise ProtocolError(F.PROTOCOL_ERROR, "padded frame without pad length")
        pad = payload[0]
        if pad >= len(payload):
            raise ProtocolError(F.PROTOCOL_ERROR, "padding exceeds frame")
        return payload[1:len(payload) - pad], pad + 1

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ProtocolError(F.PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
        if flow > self.conn_recv_window:
            raise ProtocolError(F.FLOW_CONTROL_ERROR, "connection window exceeded", "flow_control")
        self.conn_recv_window -= flow
        if flow:
            self.conn_owed += flow
            if self.conn_owed >= self._conn_update_threshold:
                self._credit_connection(0)
        elif not flags & F.FLAG_END_STREAM:
            self._empty_frame()
        st = self.streams.get(sid)
        if st is None or st.recv_closed:
            if self._is_idle(sid):
                raise ProtocolError(F.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            if not flow and flags & F.FLAG_END_STREAM:
                self._empty_frame()  # an empty END_STREAM on a stream already over
            if st is not None:
                self._stream_error(sid, F.STREAM_CLOSED)
            return
        if flow > st.recv_window:
            self._stream_error(sid, F.FLOW_CONTROL_ERROR)
            return
        st.recv_window -= flow
        end = flags & F.FLAG_END_STREAM
        if flags & F.FLAG_PADDED:
            payload, pad = self._strip_padding(flags, payload)
            self.ack_data(sid, pad)
            if not payload and not end:
                self._empty_frame()  # only padding: as empty as it gets
        if end:
            st.recv_closed = True
            self._events.append(DataReceived(sid, payload, True))
            if st.send_closed:
                self._maybe_forget(st)
        else:
            self._events.append(DataReceived(sid, payload, False))

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ProtocolError(F.PROTOCOL_ERROR, "HEADERS on stream 0")
        block = payload
        if flags & 0x28:  # PADDED or PRIORITY
            block, _ = self._strip_padding(flags, payload)
            if flags & F.FLAG_PRIORITY:
                if len(block) < 5:
                    raise ProtocolError(F.FRAME_SIZE_ERROR, "HEADERS priority fields truncated",
                                        "frame_size")
                block = block[5:]
        new = False
        if sid not in self.streams:
            if self.client:
                if self._is_idle(sid):
                    raise ProtocolError(F.PROTOCOL_ERROR, f"HEADERS on idle stream {sid}")
            elif sid % 2 == 0:
                raise ProtocolError(F.PROTOCOL_ERROR, f"even stream id {sid} from a client")
            elif sid > self.last_peer_stream:
                new = True
        if flags & F.FLAG_END_HEADERS:
            self._headers_complete(sid, flags, block, new)
        else:
            self._cont = (sid, flags, bytearray(block), new)
            self._cont_frames = 0
            self._check_cont_size(self._cont[2])

    def _check_cont_size(self, block: bytearray) -> None:
        if len(block) > 2 * self.limits.max_header_list_bytes:
            raise ProtocolError(F.ENHANCE_YOUR_CALM, "header block exceeds its size limit",
                                "header_block_too_large")

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if self._cont is None or self._cont[0] != sid:
            raise ProtocolError(F.PROTOCOL_ERROR, "unexpected CONTINUATION")
        self._cont_frames += 1
        if self._cont_frames > self.limits.max_continuation_frames:
            raise ProtocolError(
                F.ENHANCE_YOUR_CALM,
                f"continuation flood: more than {self.limits.max_continuation_frames} "
                "CONTINUATION frames in a header block", "continuation_flood")
        if not payload:
            self._empty_frame()
        c_sid, c_flags, block, new = self._cont
        block += payload
        self._check_cont_size(block)
        if flags & F.FLAG_END_HEADERS:
            self._cont = None
            self._headers_complete(c_sid, c_flags, bytes(block), new)

    def _headers_complete(self, sid: int, flags: int, block: bytes, new: bool) -> None:
        end = bool(flags & F.FLAG_END_STREAM)
        rejected: str | None = None
        try:
            hb = self._reader.read(block)
        except HpackError as exc:
            raise ProtocolError(F.COMPRESSION_ERROR, f"bad header block: {exc}",
                                "bad_hpack") from exc
        except HeaderListTooLarge as exc:
            rejected = str(exc)
            hb = None
        if new:
            self.last_peer_stream = sid
            if self.goaway_sent:
                self._write(F.rst_stream_frame(sid, F.REFUSED_STREAM))
                return
            if len(self.streams) >= self.limits.max_concurrent_streams:
                self.refused_streams += 1
                if self._settings_acked:  # it knew our limit: a reset it provoked
                    self._reset_counted()
                self._write(F.rst_stream_frame(sid, F.REFUSED_STREAM))
                return
            st = Stream(sid, self.limits.stream_window_bytes, self.peer_initial_window)
            self.streams[sid] = st
            self.streams_opened += 1
        else:
            st = self.streams.get(sid)
            if st is None:
                # Late headers on a stream already closed or reset: ignored (RFC 9113 §5.1),
                # but each cost a decode, so they count against the control-frame budget.
                self._control_frame()
                return
            if st.recv_closed:
                self._stream_error(sid, F.STREAM_CLOSED)
                return
        first = not st.headers_seen
        st.headers_seen = True
        if end:
            st.recv_closed = True
        if hb is None:
            self._events.append(HeadersRejected(sid, rejected or "", first))
        else:
            if not first and not end and not self.client:
                self._stream_error(sid, F.PROTOCOL_ERROR)  # request trailers must end the stream
                return
            self._events.append(HeadersReceived(sid, hb, end, first))
        if end:
            self._maybe_forget(st)

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        self._window_updates += 1
        if self._window_updates > WINDOW_UPDATES_PER_FRAME * (
                self._data_sent - self._data_sent_base + self.streams_opened - self._opened_base):
            self._control_frame()  # beyond what the DATA we sent explains
        if len(payload) != 4:
            raise ProtocolError(F.FRAME_SIZE_ERROR, "WINDOW_UPDATE must be 4 bytes", "frame_size")
        inc = F.unpack_u32(payload) & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise ProtocolError(F.PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self.conn_send_window += inc
            if self.conn_send_window > F.MAX_WINDOW_BYTES:
                raise ProtocolError(F.FLOW_CONTROL_ERROR, "connection window overflow",
                                    "flow_control")
            self.window_opened += 1
            self._flush_blocked()
            return
        st = self.streams.get(sid)
        if st is None:
            if self._is_idle(sid):
                raise ProtocolError(F.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return
        if inc == 0:
            self._stream_error(sid, F.PROTOCOL_ERROR)
            return
        st.send_window += inc
        if st.send_window > F.MAX_WINDOW_BYTES:
            self._stream_error(sid, F.FLOW_CONTROL_ERROR)
            return
        self.window_opened += 1
        if st.outbox and not self.paused:
            n = self._flush_stream(st)
            if n:
                self._events.append(DataSent(sid, n))

    def _on_rst(self, sid: int, payload: bytes) -> None:
        self._reset_counted()
        if sid == 0:
            raise ProtocolError(F.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ProtocolError(F.FRAME_SIZE_ERROR, "RST_STREAM must be 4 bytes", "frame_size")
        if self._is_idle(sid):
            raise ProtocolError(F.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        st = self.streams.pop(sid, None)
        if st is not None:
            self._blocked.pop(sid, None)
            self._events.append(StreamReset(sid, F.unpack_u32(payload)))

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ProtocolError(F.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & F.FLAG_ACK:
            if self._settings_out:
                self._settings_out -= 1
                self._settings_acked = True
            else:
                self._control_frame()  # an ACK of nothing
            if payload:
                raise ProtocolError(F.FRAME_SIZE_ERROR, "SETTINGS ack with a payload", "frame_size")
            return
        self._control_frame()
        if len(payload) % 6:
            raise ProtocolError(F.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6",
                                "frame_size")
        for off in range(0, len(payload), 6):
            key, value = F.unpack_setting(payload, off)
            if key == F.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > F.MAX_WINDOW_BYTES:
                    raise ProtocolError(F.FLOW_CONTROL_ERROR, "initial window too large",
                                        "flow_control")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                if delta > 0:
                    self.window_opened += 1
                for st in self.streams.values():
                    st.send_window += delta
                    if st.send_window > F.MAX_WINDOW_BYTES:
                        raise ProtocolError(F.FLOW_CONTROL_ERROR, "stream window overflow",
                                            "flow_control")
            elif key == F.SETTINGS_MAX_FRAME_SIZE:
                if not F.DEFAULT_MAX_FRAME_BYTES <= value <= F.MAX_FRAME_BYTES_LIMIT:
                    raise ProtocolError(F.PROTOCOL_ERROR, f"bad SETTINGS_MAX_FRAME_SIZE {value}")
                self.peer_max_frame = value
            elif key == F.SETTINGS_MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value
            elif key == F.SETTINGS_ENABLE_PUSH:
                if value > 1 or (self.client and value):
                    raise ProtocolError(F.PROTOCOL_ERROR, f"bad SETTINGS_ENABLE_PUSH {value}")
        self.peer_settings_seen = True
        self._write(F.settings_frame(ack=True))
        self._events.append(SettingsChanged())
        self._flush_blocked()

    def _on_ping(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ProtocolError(F.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ProtocolError(F.FRAME_SIZE_ERROR, "PING must be 8 bytes", "frame_size")
        if flags & F.FLAG_ACK:
            if self._pings_out:
                self._pings_out -= 1
                self.pings_acked += 1
            else:
                self._control_frame()  # an ACK of nothing
            self._events.append(PingAcked(payload))
        else:
            if self._ping_mark == self._data_sent:
                self._control_frame()
            self._ping_mark = self._data_sent  # a PING after DATA we sent is free
            self._write(F.ping_frame(payload, ack=True))

    def _on_goaway(self, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ProtocolError(F.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise ProtocolError(F.FRAME_SIZE_ERROR, "GOAWAY too short", "frame_size")
        last, code = F.unpack_goaway(payload)
        if self.goaway_received is not None:
            last = min(last, self.goaway_received)
        self.goaway_received = last
        self._events.append(GoAwayReceived(last, code, payload[8:]))
        if self.client:
            for st_id in sorted(s for s in self.streams if s > last):
                self.streams.pop(st_id, None)
                self._blocked.pop(st_id, None)
                self._events.append(StreamReset(st_id, F.REFUSED_STREAM, unprocessed=True))
