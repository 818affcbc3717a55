"""The relay: carries each downstream stream to a stream on a pooled upstream connection.

Sans-IO. The I/O side feeds it the events of every connection and tells it when upstream
connections come up, fail or are lost; the relay moves header blocks and DATA between the
two sides, maps stream ids, returns flow-control credit only once bytes have left for the
other side (so memory per stream is bounded by the window we advertised), and runs the
mesh's policy only at stream events through ``Hooks``:

* request headers: ``hooks.on_request(call)`` returns a ``Pool`` to forward to, a
  ``LocalReply`` (the call is answered here: unknown route, denied, fast-failed, an injected
  abort), or ``Delayed`` (either of those after a pause: an injected delay);
* response headers and trailers: ``hooks.on_response(call)``;
* stream end: ``hooks.on_end(call)`` with the outcome in the call.

The bookkeeping that follows a send (the events sends queue on a connection, such as a
stream's end) and the end hooks run when the entry point returns, except while ``holding``:
the I/O driver holds them over a read and releases them (``release``) once the read's writes
are out, so what the relay and the layers record at a call's end (counts, latency estimates,
logs) is off the caller's path.

gRPC rules it enforces: ``grpc-timeout`` and a layer's ``call.route_timeout_s`` counted from
dispatch, whichever ends first (DEADLINE_EXCEEDED at expiry, the upstream stream reset, the
remaining time sent on), the message size limit both ways (RESOURCE_EXHAUSTED for
that call only), and an upstream that fails gives the caller UNAVAILABLE naming the endpoint.
Calls waiting in its pools' queues for a connection or a stream slot are counted (``waiting``):
a call that would wait while ``limits.max_pending_calls`` already do is answered
RESOURCE_EXHAUSTED at once. ``refused_calls`` counts calls refused by a limit, by reason:
``message_too_large`` (either way), ``header_list_too_large``, ``pending_calls``.
Each attempt's request headers carry ``call.traceparent_out`` (set by the tracing layer) in
place of the received ``traceparent`` when it is not None.
Retries (gRFC A6). A call is committed once the first response headers that are not
trailers-only arrive; until then the relay keeps the request's bytes (``call.replay``) and may
send them again. A call with a retry policy (``call.retry``, set by the retry layer) asks it
after each failed attempt: a trailers-only answer with a non-OK status, a refused or
unprocessed (GOAWAY) stream, a failed connect, a lost connection, a per-try timeout
(``call.retry.per_try_timeout_s``, armed at each dispatch). The policy answers with the next
attempt's decision (usually ``Delayed`` by a backoff) or None, and then the caller gets the
failed attempt's answer; after commit it is never asked. The replay buffer is capped by
``call.retry.max_request_bytes`` (a call that outgrew it after bytes were sent is not sent
again, and never sent truncated). A call without a retry policy (inbound) only has a stream
that an upstream refused or never processed sent again, while its request fits
``limits.replay_buffer_bytes`` and no response has started.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from mesh_common.limits import Limits

from . import frames as F
from . import grpc as G
from .connection import H2Connection
from .events import (
    ConnectionTerminated,
    DataReceived,
    DataSent,
    GoAwayReceived,
    HeadersReceived,
    HeadersRejected,
    SettingsChanged,
    StreamEnded,
    StreamReset,
)
from .headers import HeaderBlock
from .pool import Pool

MAX_ATTEMPTS = 5
"""Attempts of a call without a retry policy when its streams are refused (``call.retry``
None; with a policy, its ``max_attempts`` counts them)."""
log = logging.getLogger("mesh.sidecar.relay")


class LocalReply:
    """Answer the call here with a gRPC status instead of forwarding it."""

    __slots__ = ("status", "message")

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"LocalReply({self.status}, {self.message!r})"


class Delayed:
    """Act on ``then`` (a Pool or a LocalReply) after ``seconds``; request bytes that arrive
    meanwhile wait, and the caller's deadline keeps running."""

    __slots__ = ("seconds", "then")

    def __init__(self, seconds: float, then: Any) -> None:
        self.seconds = seconds
        self.then = then

    def __repr__(self) -> str:
        return f"Delayed({self.seconds:.3f}s, {self.then!r})"


class Call:
    """One relayed stream, as the layers see it. Fields are filled in as events arrive."""

    __slots__ = (
        "down", "down_sid", "headers", "authority", "path", "peer_id", "started_s",
        "deadline_s", "timer", "pool", "up", "up_sid", "attempts", "pending", "replay",
        "replay_bytes", "flushed", "credited", "req_received", "resp_conn", "resp_received",
        "resp_credited", "request_ended", "request_trailers",
        "committed", "response_started", "grpc_status", "grpc_message", "finished",
        "down_open", "ended", "req_meter", "resp_meter", "req_messages", "resp_messages",
        "local_reply", "route", "endpoint",
        "upstream_label", "cluster", "route_timeout_s", "rule", "subset", "notes",
        "upstream", "retry", "tried", "fast_fail", "try_timer", "trace_id", "span",
        "traceparent_out", "queued", "ended_s",
    )

    def __init__(self, down: H2Connection, sid: int, headers: HeaderBlock, peer_id: str | None,
                 now_s: float) -> None:
        self.down = down
        self.down_sid = sid
        self.headers = headers
        fields = headers.fields
        self.authority = fields.get(":authority") or ""
        self.path = fields.get(":path") or ""
        self.peer_id = peer_id
        self.started_s = now_s
        self.deadline_s: float | None = None
        self.timer: Any = None
        self.pool: Pool | None = None
        self.queued: Pool | None = None
        """The pool whose queue (``pool.waiting``) holds the call, while it waits there."""
        self.up: H2Connection | None = None
        self.up_sid = 0
        self.attempts = 0
        self.pending: list[bytes] = []
        self.replay: list[bytes] | None = []
        self.replay_bytes = 0
        self.flushed = 0
        self.credited = 0
        self.req_received = 0
        self.resp_conn: H2Connection | None = None
        self.resp_received = 0
        self.resp_credited = 0
        self.request_ended = False
        self.request_trailers: bytes | None = None
        self.committed = False
        self.response_started = False
        self.grpc_status: int | None = None
        self.grpc_message = ""
        self.finished = False
        self.down_open = True
        self.ended = False
        self.req_meter: G.MessageMeter | None = None
        """Made for the first request DATA frame that is not one whole message."""
        self.resp_meter: G.MessageMeter | None = None
        self.req_messages = 0
        """Request messages whose length prefix has arrived, so far."""
        self.resp_messages = 0
        self.local_reply: LocalReply | None = None
        self.route: str = ""
        """The upstream service (cluster) the call was routed to, when routed."""
        self.cluster: Any = None
        """The routed cluster (``mesh_common.snapshot.Cluster``), set by the route layer."""
        self.endpoint: Any = None
        """The endpoint picked for the current attempt (``mesh_common.snapshot.Endpoint``)."""
        self.upstream_label = ""
        self.route_timeout_s: float | None = None
        """A layer's timeout for the call (s), counted from dispatch; the sooner of it and
        the caller's deadline wins."""
        self.rule: Any = None
        """The route rule that took the call (``mesh_common.snapshot.Rule``), if any."""
        self.subset: Any = None
        """The endpoints the balancer picks from (the rule's destination), if not the
        cluster's healthy ones."""
        self.notes: list[str] | None = None
        """What the layers decided about the call and why, for explanations."""
        self.upstream: Any = None
        """Per-upstream shared state for this call's service (limits' counters), set by the
        limits layer."""
        self.retry: Any = None
        """The retry layer's state for this call (policy, how to try again, attempts)."""
        self.tried: tuple[Any, ...] = ()
        """Endpoints earlier attempts went to (the balancers prefer another)."""
        self.fast_fail = False
        """Answered locally by a limit: never retried, never counted against an endpoint."""
        self.try_timer: Any = None
        """The current attempt's per-try timer (``call.retry.per_try_timeout_s``), if armed."""
        self.trace_id = ""
        """The W3C trace id (32 lower-case hex digits) the call belongs to, sampled or not,
        set by the tracing layer ("" = none)."""
        self.span: Any = None
        """The tracing layer's record of this call's span when the call is sampled (None
        otherwise: unsampled calls build no span objects)."""
        self.ended_s: float | None = None
        """When the call ended (the relay's clock, s): its response complete toward the
        caller (queued for the write), or its streams gone; None until then."""
        self.traceparent_out: str | None = None
        """The ``traceparent`` value to send upstream in place of the received one (None =
        forward the received header as it is), at the request headers of every attempt:
        it replaces the received field (every received copy) or is added when the request
        had none."""


class RetryHook(Protocol):
    """What the relay needs from ``call.retry`` (the retry layer's per-call view)."""

    max_request_bytes: int
    """Request bytes kept for another attempt; a request that outgrows it is not sent again."""
    per_try_timeout_s: float | None

    def again(self, call: Call, reason: str, status: int | None,
              answer: HeaderBlock | None = None) -> Pool | LocalReply | Delayed | None:
        """The attempt failed for ``reason`` (``answer``: the trailers-only response, for its
        ``grpc-retry-pushback-ms``): the next attempt's decision, or None (no retry)."""


class Hooks(Protocol):
    def on_request(self, call: Call) -> Pool | LocalReply | Delayed: ...

    def on_response(self, call: Call) -> None: ...

    def on_end(self, call: Call) -> None: ...


class Relay:
    """Moves streams between downstream (server-role) and upstream (client-role) connections."""

    def __init__(self, hooks: Hooks, limits: Limits, clock: Callable[[], float],
                 call_later: Callable[[float, Callable[[], None]], Any],
                 close_connection: Callable[[H2Connection], None]) -> None:
        self.hooks = hooks
        self.limits = limits
        self.clock = clock
        self.call_later = call_later
        self.close_connection = close_connection
        self.stats: Counter[str] = Counter()
        """Counts of what the relay met, by name (see ``counters``)."""
        self.calls_total = 0
        """Calls (downstream streams) the relay took, ever."""
        self.refused_calls: Counter[str] = Counter()
        """Calls refused by a limit, by reason (see the module's docstring)."""
        self.waiting = 0
        """Calls waiting in the queues of this relay's pools (at most max_pending_calls)."""
        self.active = 0
        self._dirty: list[H2Connection] = []
        self._pumping = False
        self._ended: list[Call] = []
        """Calls over whose ``hooks.on_end`` has not run yet."""
        self.holding = False
        """While True, the events sends queue and the end hooks wait for ``release`` (the
        I/O driver sets it over a read and releases once the read's writes are out)."""
        self.fast_path = True
        """Take a read that is exactly one whole unary request (downstream) or that begins
        with whole responses (upstream) through the core's ``receive_request`` /
        ``receive_responses``, which leave the connection as ``receive`` would and build no
        events for them; False: every read goes through ``receive`` (the tests run both and
        compare every byte)."""

    def counters(self) -> dict[str, int]:
        """``stats`` with ``calls_total``, for ``/stats``."""
        out = dict(self.stats)
        if self.calls_total:
            out["calls_total"] = self.calls_total
        return out

    # ================================================================ entry points (I/O side)
    def adopt(self, conn: H2Connection) -> None:
        """Start relaying for a connection: its out-of-band events come back to us."""
        conn.on_event = self._dirty.append

    def down_received(self, conn: H2Connection, data: bytes) -> None:
        request = conn.receive_request(data) if self.fast_path else None
        if request is None:
            self.down_events(conn, conn.receive(data))
        else:  # one whole unary request: its two events, without building them
            sid, headers, payload = request
            self._new_call(conn, sid, headers, False)
            call = conn.calls.get(sid)
            if call is None:
                conn.ack_data(sid, len(payload))
            else:
                self._request_data(call, payload, True)  # type: ignore[arg-type]
        self._pump()

    def up_received(self, conn: H2Connection, data: bytes) -> None:
        got = conn.receive_responses(data) if self.fast_path else None
        if got is None:
            self.up_events(conn, conn.receive(data))
        else:  # whole responses first, without building their events; then the rest
            responses, events = got
            for sid, headers, payload, trailers, over in responses:
                self._whole_response(conn, sid, headers, payload, trailers, over)
            if events:
                self.up_events(conn, events)
        self._pump()

    def _whole_response(self, conn: H2Connection, sid: int, headers: HeaderBlock,
                        payload: bytes | memoryview, trailers: HeaderBlock, over: bool) -> None:
        """What ``up_events`` does for a response's HeadersReceived, DataReceived,
        HeadersReceived (trailers) and, when ``over``, StreamEnded."""
        call = conn.calls.get(sid)
        if call is not None:
            self._response_headers(call, headers, True, False)
        call = conn.calls.get(sid)
        if call is None:
            conn.ack_data(sid, len(payload))
        else:
            self._response_data(call, payload, False)  # type: ignore[arg-type]
        call = conn.calls.get(sid)
        if call is not None:
            self._response_headers(call, trailers, False, True)
        if over:
            self._stream_ended(conn, sid)

    def set_paused(self, conn: H2Connection, paused: bool) -> None:
        """The connection's transport crossed its high-water mark (or drained below it)."""
        events = conn.set_paused(paused)
        if conn.client:
            self.up_events(conn, events)
        else:
            self.down_events(conn, events)
        self._pump()

    def connection_lost(self, conn: H2Connection, reason: str) -> None:
        if conn.client:
            self.up_lost(conn, reason)
        else:
            self.down_lost(conn)
        self._pump()

    def pool_connected(self, pool: Pool, conn: H2Connection) -> None:
        """A new upstream connection is up (and its peer verified). It takes streams once
        the peer's SETTINGS have arrived, so its stream limit is known."""
        self.adopt(conn)
        conn.owner = pool
        if conn.peer_settings_seen:
            self._ready(pool, conn)
        else:
            pool.awaiting_settings.add(conn)
        self._pump()

    def _ready(self, pool: Pool, conn: H2Connection) -> None:
        pool.connected(conn)
        self._drain_pool(pool)

    def pool_failed(self, pool: Pool, reason: str) -> None:
        self.stats["upstream_connect_failures"] += 1
        if pool.connect_failed(reason):
            waiting = list(pool.waiting)
            pool.waiting.clear()
            self.waiting -= len(waiting)
            for call in waiting:
                call.queued = None
            for call in waiting:
                if not self._try_again(call, "connect_failure", G.UNAVAILABLE):
                    self._reply(call, G.UNAVAILABLE, f"upstream {pool.label}: {reason}"
                                f"{_after(call)}")
        self._pump()

    def release(self) -> None:
        """Stop holding (see ``holding``): handle what waited."""
        self.holding = False
        self._pump()

    def _pump(self) -> None:
        """Handle events that sends and resets queued on connections outside ``receive``,
        then run the end hooks of the calls that ended; nothing while ``holding``."""
        if self._pumping or self.holding:
            return
        self._pumping = True
        try:
            while self._dirty:
                conn = self._dirty.pop()
                events = conn.take_events()
                if events:
                    if conn.client:
                        self.up_events(conn, events)
                    else:
                        self.down_events(conn, events)
        finally:
            self._pumping = False
        if self._ended:
            self._run_ends()

    def _run_ends(self) -> None:
        """Run ``hooks.on_end`` for every call that ended and has not had it yet, in the
        order they ended. A hook that raises is logged; the other calls' hooks still run."""
        while self._ended:
            ended, self._ended = self._ended, []
            for call in ended:
                try:
                    self.hooks.on_end(call)
                except Exception:  # a faulty layer costs its own record, not the relay
                    log.exception("layer error at the end of %s", call.path)

    # ================================================================ downstream side
    def down_events(self, conn: H2Connection, events: list) -> None:
        for ev in events:
            t = type(ev)
            if t is DataReceived:
                call = conn.calls.get(ev.stream_id)
                if call is None:
                    conn.ack_data(ev.stream_id, len(ev.data))
                else:
                    self._request_data(call, ev.data, ev.end_stream)
            elif t is HeadersReceived:
                if ev.first:
                    self._new_call(conn, ev.stream_id, ev.headers, ev.end_stream)
                else:
                    call = conn.calls.get(ev.stream_id)
                    if call is not None:
                        self._request_trailers(call, ev.headers.forwardable())
            elif t is DataSent:
                call = conn.calls.get(ev.stream_id)
                if call is not None:
                    self._credit_response(call, ev.sent)
            elif t is StreamEnded:
                call = conn.calls.pop(ev.stream_id, None)
                if call is not None:
                    call.down_open = False
                    self._maybe_end(call)
            elif t is StreamReset:
                call = conn.calls.pop(ev.stream_id, None)
                if call is not None:
                    self.stats["downstream_resets"] += 1
                    call.down_open = False
                    self._abandon_upstream(call)
                    self._maybe_end(call)
            elif t is HeadersRejected:
                self.stats["headers_too_large"] += 1
                self.refused_calls["header_list_too_large"] += 1
                if ev.first:
                    conn.send_headers(ev.stream_id, G.trailers_only_block(
                        G.RESOURCE_EXHAUSTED, f"request headers rejected: {ev.reason}"), True)
                else:
                    conn.reset_stream(ev.stream_id, F.PROTOCOL_ERROR)
                    call = conn.calls.pop(ev.stream_id, None)
                    if call is not None:
                        call.down_open = False
                        self._abandon_upstream(call)
                        self._maybe_end(call)
            elif t is ConnectionTerminated:
                self.down_lost(conn)

    def down_lost(self, conn: H2Connection) -> None:
        """The downstream connection is gone: cancel everything it had in flight."""
        calls = list(conn.calls.values())
        conn.calls.clear()
        for call in calls:
            call.down_open = False
            self._abandon_upstream(call)
            self._maybe_end(call)

    def _new_call(self, conn: H2Connection, sid: int, headers: HeaderBlock,
                  end_stream: bool) -> None:
        peer = getattr(conn.owner, "peer_id", None)
        call = Call(conn, sid, headers, peer, self.clock())
        conn.calls[sid] = call
        self.active += 1
        self.calls_total += 1
        if end_stream:
            call.request_ended = True
        fields = headers.fields
        timeout = fields.get("grpc-timeout")
        if timeout is not None:
            seconds = G.parse_timeout(timeout)
            if seconds is not None:
                call.deadline_s = call.started_s + seconds
                call.timer = self.call_later(seconds, lambda: self._timer_fired(call))
        if not call.path or fields.get(":method", "POST") != "POST":
            self._reply(call, G.UNIMPLEMENTED, "the mesh relays gRPC only (POST with a :path)")
            return
        try:
            decision = self.hooks.on_request(call)
        except Exception as exc:  # a faulty layer fails its call, not the connection
            log.exception("layer error on %s", call.path)
            decision = LocalReply(G.INTERNAL, f"sidecar error: {type(exc).__name__}")
        if isinstance(decision, Delayed):
            self.stats["delayed"] += 1
            self.call_later(decision.seconds, lambda: self._after_delay(call, decision.then))
            return
        self._decided(call, decision)

    def _decided(self, call: Call, decision: Pool | LocalReply) -> None:
        if isinstance(decision, LocalReply):
            self._reply(call, decision.status, decision.message)
            return
        call.pool = decision
        call.upstream_label = decision.label
        if call.route_timeout_s is not None:
            self._arm_route_timeout(call)
        retry = call.retry
        if retry is not None and retry.per_try_timeout_s is not None:
            self._arm_try_timeout(call, retry.per_try_timeout_s)
        self._dispatch(call)

    def _after_delay(self, call: Call, decision: Pool | LocalReply) -> None:
        if call.finished or not call.down_open:
            return
        if isinstance(decision, Pool) and decision.closed:
            # Its endpoint left the snapshot during the delay: the pool would never connect.
            self._reply(call, G.UNAVAILABLE, f"upstream {decision.label} left the mesh while "
                        "the call was delayed")
        else:
            self._decided(call, decision)
        self._pump()

    def _arm_route_timeout(self, call: Call) -> None:
        """The route's timeout runs from now; it replaces the caller's deadline if sooner."""
        assert call.route_timeout_s is not None
        deadline = self.clock() + call.route_timeout_s
        if call.deadline_s is not None and call.deadline_s <= deadline:
            return
        call.deadline_s = deadline
        if call.timer is not None:
            call.timer.cancel()
        call.timer = self.call_later(call.route_timeout_s,
                                     lambda: self._timer_fired(call, route_timeout=True))

    def _arm_try_timeout(self, call: Call, seconds: float) -> None:
        """This attempt may take ``seconds`` until its response commits."""
        if call.try_timer is not None:
            call.try_timer.cancel()
        call.try_timer = self.call_later(seconds, lambda: self._try_timed_out(call, seconds))

    def _try_timed_out(self, call: Call, seconds: float) -> None:
        call.try_timer = None
        if call.finished or call.committed:
            return
        self.stats["per_try_timeouts"] += 1
        call.grpc_status = G.DEADLINE_EXCEEDED
        if not self._try_again(call, "per_try_timeout", G.DEADLINE_EXCEEDED):
            self._reply(call, G.DEADLINE_EXCEEDED, f"per-try timeout of {seconds * 1e3:.0f} ms "
                        f"at the sidecar (upstream {call.upstream_label}){_after(call)}")
        self._pump()

    def _try_again(self, call: Call, reason: str, status: int | None,
                   answer: HeaderBlock | None = None) -> bool:
        """The current attempt failed for ``reason`` before commit: ask the call's retry
        policy. True when another attempt is under way or scheduled (the failed one is then
        detached); False when the caller is to get the failed attempt's answer."""
        retry = call.retry
        if retry is None or call.committed or call.finished or not call.down_open:
            return False
        try:
            decision = retry.again(call, reason, status, answer)
        except Exception:  # a faulty layer fails its call, not the connection
            log.exception("retry layer error on %s", call.path)
            return False
        if decision is None:
            return False
        self._detach(call)
        self.stats["retries"] += 1
        if isinstance(decision, Delayed):
            if decision.seconds > 0:
                then = decision.then
                self.call_later(decision.seconds, lambda: self._after_delay(call, then))
                return True
            decision = decision.then
        self._decided(call, decision)
        return True

    def _detach(self, call: Call) -> None:
        """Let go of the current attempt (before another): its timer, its upstream stream
        (reset unless both sides are done) or its place in a pool's queue."""
        if call.try_timer is not None:
            call.try_timer.cancel()
            call.try_timer = None
        up = call.up
        if up is not None:
            call.up = None
            up.calls.pop(call.up_sid, None)
            st = up.streams.get(call.up_sid)
            if st is not None and not (st.send_closed and st.recv_closed):
                up.reset_stream(call.up_sid, F.CANCEL)
            self._capacity(up)
        else:
            self._unqueue(call)

    def _request_data(self, call: Call, data: bytes, end: bool) -> None:
        call.req_received += len(data)
        if call.finished:
            self._settle_request(call)
            return
        if data:
            too_big = self._measure(call, data, False)
            if too_big >= 0:
                self.stats["messages_too_large"] += 1
                self.refused_calls["message_too_large"] += 1
                self._reply(call, G.RESOURCE_EXHAUSTED,
                            f"request message of {too_big} bytes exceeds the limit of "
                            f"{self.limits.max_message_bytes} bytes")
                return
            if call.replay is not None:
                call.replay_bytes += len(data)
                retry = call.retry
                if call.replay_bytes > (self.limits.replay_buffer_bytes if retry is None
                                        else retry.max_request_bytes):
                    call.replay = None
                else:
                    call.replay.append(data)
        if end:
            call.request_ended = True
        if call.up is None:
            if data:
                call.pending.append(data)
            return
        self._credit(call, call.up.send_data(call.up_sid, data, end))

    def _measure(self, call: Call, data: bytes, response: bool) -> int:
        """Count the gRPC messages of one DATA frame of the call (``response``: of its
        response) and return the announced length of the first over the size limit, or -1.
        A frame that is one whole message, the common case, needs no meter."""
        limit = self.limits.max_message_bytes
        meter = call.resp_meter if response else call.req_meter
        n = len(data)
        if meter is None and n >= 5 and n == 5 + int.from_bytes(data[1:5], "big"):
            counted = 1
            too_big = n - 5 if n - 5 > limit else -1
        else:
            if meter is None:
                meter = G.MessageMeter(limit)
                if response:
                    call.resp_meter = meter
                else:
                    call.req_meter = meter
            before = meter.messages
            too_big = meter.feed(data)
            counted = meter.messages - before
        if response:
            call.resp_messages += counted
        else:
            call.req_messages += counted
        return too_big

    def _request_trailers(self, call: Call, block: bytes) -> None:
        call.request_ended = True
        if call.finished:
            return
        call.request_trailers = block
        if call.up is not None:
            call.up.send_trailers(call.up_sid, block)

    def _settle_request(self, call: Call) -> None:
        """Return all outstanding request credit (the bytes will never be forwarded)."""
        if call.req_received > call.credited:
            call.down.ack_data(call.down_sid, call.req_received - call.credited)
            call.credited = call.req_received

    def _settle_response(self, call: Call) -> None:
        if call.resp_conn is not None and call.resp_received > call.resp_credited:
            call.resp_conn.ack_data(call.up_sid, call.resp_received - call.resp_credited)
            call.resp_credited = call.resp_received

    def _credit_response(self, call: Call, sent: int) -> None:
        if sent > 0 and call.resp_conn is not None:
            call.resp_credited += sent
            call.resp_conn.ack_data(call.up_sid, sent)

    def _credit(self, call: Call, flushed: int) -> None:
        """Return downstream credit for request bytes that left on the current attempt."""
        if flushed <= 0:
            return
        call.flushed += flushed
        if call.flushed > call.credited:
            call.down.ack_data(call.down_sid, call.flushed - call.credited)
            call.credited = call.flushed

    # ================================================================ dispatch
    def _dispatch(self, call: Call) -> None:
        pool = call.pool
        assert pool is not None
        conn = pool.acquire()
        if conn is None:
            limit = self.limits.max_pending_calls
            if self.waiting >= limit:
                self.refused_calls["pending_calls"] += 1
                call.fast_fail = True  # the sidecar's limit: never counted against the endpoint
                self._reply(call, G.RESOURCE_EXHAUSTED, f"pending calls limit of {limit} reached")
                return
            pool.waiting.append(call)
            call.queued = pool
            self.waiting += 1
            pool.ensure_connecting()
            return
        self._bind(call, conn)

    def _unqueue(self, call: Call) -> None:
        """Take the call out of its pool's queue, if it waits there."""
        pool = call.queued
        if pool is not None:
            call.queued = None
            self.waiting -= 1
            try:
                pool.waiting.remove(call)
            except ValueError:
                pass

    def _bind(self, call: Call, up: H2Connection) -> None:
        timeout: str | None = None
        if call.deadline_s is not None:
            remaining = call.deadline_s - self.clock()
            if remaining <= 0:
                self._deadline(call)
                return
            timeout = G.format_timeout(remaining)
        if call.attempts and call.replay is None:
            # Sent before, and the request outgrew the replay buffer while it waited to be sent
            # again: the first attempt's bytes are gone. Fail it; never send it truncated.
            self._reply(call, G.UNAVAILABLE, f"upstream {call.upstream_label}: the request "
                        f"outgrew the replay buffer before it could be sent again{_after(call)}")
            return
        st = up.open_stream()
        up.calls[st.id] = call
        call.up = up
        call.up_sid = st.id
        call.attempts += 1
        call.flushed = 0
        chunks = call.replay if call.replay is not None else call.pending
        call.pending = []
        end_now = call.request_ended and not chunks and call.request_trailers is None
        up.send_headers(st.id, call.headers.forwardable(timeout, call.traceparent_out), end_now)
        if end_now:
            return
        last = len(chunks) - 1
        for i, chunk in enumerate(chunks):
            end = i == last and call.request_ended and call.request_trailers is None
            self._credit(call, up.send_data(st.id, chunk, end))
        if call.request_trailers is not None:
            up.send_trailers(st.id, call.request_trailers)
        elif not chunks and call.request_ended:
            up.send_data(st.id, b"", True)

    def _drain_pool(self, pool: Pool) -> None:
        while pool.waiting:
            call = pool.waiting[0]
            if call.finished or not call.down_open:
                pool.waiting.popleft()
                if call.queued is not None:
                    call.queued = None
                    self.waiting -= 1
                continue
            conn = pool.pick()
            if conn is None:
                pool.ensure_connecting()
                break
            pool.waiting.popleft()
            if call.queued is not None:
                call.queued = None
                self.waiting -= 1
            self._bind(call, conn)

    # ================================================================ upstream side
    def up_events(self, conn: H2Connection, events: list) -> None:
        for ev in events:
            t = type(ev)
            if t is DataReceived:
                call = conn.calls.get(ev.stream_id)
                if call is None:
                    conn.ack_data(ev.stream_id, len(ev.data))
                else:
                    self._response_data(call, ev.data, ev.end_stream)
            elif t is DataSent:
                call = conn.calls.get(ev.stream_id)
                if call is not None:
                    self._credit(call, ev.sent)
            elif t is HeadersReceived:
                call = conn.calls.get(ev.stream_id)
                if call is not None:
                    self._response_headers(call, ev.headers, ev.first, ev.end_stream)
            elif t is StreamEnded:
                self._stream_ended(conn, ev.stream_id)
            elif t is StreamReset:
                call = conn.calls.pop(ev.stream_id, None)
                if call is not None and call.up is conn:
                    call.up = None
                    self._upstream_reset(call, ev.error_code, ev.unprocessed)
                self._capacity(conn)
            elif t is HeadersRejected:
                self.refused_calls["header_list_too_large"] += 1
                call = conn.calls.get(ev.stream_id)
                conn.reset_stream(ev.stream_id, F.CANCEL)
                conn.calls.pop(ev.stream_id, None)
                if call is not None:
                    call.up = None
                    self._reply(call, G.RESOURCE_EXHAUSTED, f"response headers rejected: {ev.reason}")
            elif t is GoAwayReceived:
                self.stats["upstream_goaways"] += 1
                self._capacity(conn)
            elif t is SettingsChanged:
                pool = conn.owner
                if type(pool) is Pool and conn in pool.awaiting_settings:
                    pool.awaiting_settings.discard(conn)
                    self._ready(pool, conn)
                else:
                    self._capacity(conn)
            elif t is ConnectionTerminated:
                self.up_lost(conn, f"connection error: {ev.reason}")

    def _stream_ended(self, conn: H2Connection, sid: int) -> None:
        """An upstream stream is over both ways."""
        call = conn.calls.pop(sid, None)
        if call is not None and call.up is conn:
            call.up = None
            self._maybe_end(call)
        self._capacity(conn)

    def _capacity(self, conn: H2Connection) -> None:
        """A stream on ``conn`` ended or its limits moved: bind waiting calls, and close the
        connection once it is draining (GOAWAY) and empty."""
        pool = conn.owner
        if type(pool) is not Pool:
            return
        if pool.waiting:
            self._drain_pool(pool)
        if not conn.streams and (conn.goaway_received is not None or conn.goaway_sent) \
                and conn in pool.conns:
            pool.remove(conn)
            self.close_connection(conn)

    def up_lost(self, conn: H2Connection, reason: str) -> None:
        """An upstream connection is gone: its calls fail with UNAVAILABLE naming the endpoint
        (streams it may have processed are never sent again)."""
        pool = conn.owner
        label = pool.label if isinstance(pool, Pool) else "upstream"
        if isinstance(pool, Pool):
            if conn in pool.awaiting_settings:  # lost before it was ever ready
                pool.awaiting_settings.discard(conn)
                self.pool_failed(pool, reason)
                return
            pool.remove(conn)
        calls = list(conn.calls.values())
        conn.calls.clear()
        for call in calls:
            if call.up is not conn:
                continue
            call.up = None
            self.stats["upstream_lost_calls"] += 1
            if not self._try_again(call, "connection_lost", G.UNAVAILABLE):
                self._reply(call, G.UNAVAILABLE, f"upstream {label}: {reason}{_after(call)}")
        if isinstance(pool, Pool) and pool.waiting:
            pool.ensure_connecting()

    def _upstream_reset(self, call: Call, code: int, unprocessed: bool) -> None:
        if call.finished:
            self._maybe_end(call)
            return
        refused = unprocessed or code == F.REFUSED_STREAM
        if refused and not call.committed:
            if call.retry is not None:
                if self._try_again(call, "goaway" if unprocessed else "refused_stream",
                                   G.UNAVAILABLE):
                    return
            elif call.replay is not None and call.attempts < MAX_ATTEMPTS:
                self.stats["streams_resent"] += 1
                self._dispatch(call)
                return
        self.stats["upstream_resets"] += 1
        if refused:
            self._reply(call, G.UNAVAILABLE, f"upstream {call.upstream_label} refused the stream"
                        f"{_after(call)}")
            return
        call.finished = True
        if call.down_open:
            call.down.calls.pop(call.down_sid, None)
            call.down.reset_stream(call.down_sid, code)
            call.down_open = False
        self._maybe_end(call)

    def _response_headers(self, call: Call, hb: HeaderBlock, first: bool, end_stream: bool) -> None:
        if call.finished:
            return
        status = hb.fields.get("grpc-status")
        if status is not None:
            call.grpc_status = int(status) if status.isascii() and status.isdigit() else G.UNKNOWN
            call.grpc_message = hb.fields.get("grpc-message") or ""
        if first:
            if end_stream and call.grpc_status and call.retry is not None and \
                    self._try_again(call, "status", call.grpc_status, hb):
                return  # trailers-only with a status to retry: the caller never sees it
            call.committed = True
            call.replay = None
            if call.try_timer is not None:
                call.try_timer.cancel()
                call.try_timer = None
            call.resp_conn = call.up
            call.response_started = not end_stream
            self.hooks.on_response(call)
            call.down.send_headers(call.down_sid, hb.forwardable(), end_stream)
            if end_stream:
                call.response_started = True
                self._response_done(call)
        else:
            self.hooks.on_response(call)
            call.down.send_trailers(call.down_sid, hb.forwardable())
            self._response_done(call)

    def _response_done(self, call: Call) -> None:
        call.finished = True
        if call.ended_s is None:
            call.ended_s = self.clock()
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        up = call.up
        if up is not None:
            st = up.streams.get(call.up_sid)
            if st is not None and not st.send_closed:
                # The response is complete while the request still streams: stop it upstream.
                up.reset_stream(call.up_sid, F.CANCEL)
                up.calls.pop(call.up_sid, None)
                call.up = None
                self._capacity(up)
                self._settle_request(call)  # credit for request bytes dropped with the stream
        down = call.down
        st = down.streams.get(call.down_sid)
        if st is not None and st.send_closed and not st.recv_closed:
            # RFC 9113 §8.1: the response is complete; ask the caller to stop sending.
            down.reset_stream(call.down_sid, F.NO_ERROR)
            down.calls.pop(call.down_sid, None)
            call.down_open = False
            self._settle_request(call)
            self._maybe_end(call)

    def _response_data(self, call: Call, data: bytes, end: bool) -> None:
        call.resp_received += len(data)
        if call.finished or call.resp_conn is None:
            self._settle_response(call)
            return
        if data:
            too_big = self._measure(call, data, True)
            if too_big >= 0:
                self.stats["messages_too_large"] += 1
                self.refused_calls["message_too_large"] += 1
                self._reply(call, G.RESOURCE_EXHAUSTED,
                            f"response message of {too_big} bytes exceeds the limit of "
                            f"{self.limits.max_message_bytes} bytes")
                return
        self._credit_response(call, call.down.send_data(call.down_sid, data, end))
        if end:
            self._response_done(call)

    # ================================================================ endings
    def _timer_fired(self, call: Call, route_timeout: bool = False) -> None:
        self._deadline(call, route_timeout)
        self._pump()

    def _deadline(self, call: Call, route_timeout: bool = False) -> None:
        """DEADLINE_EXCEEDED for the call; ``route_timeout``: the route's timeout fired (it
        was sooner than the caller's deadline), which the message says."""
        call.timer = None
        if call.finished:
            return
        self.stats["deadlines_exceeded"] += 1
        elapsed_ms = (self.clock() - call.started_s) * 1e3
        why = ""
        if route_timeout and call.route_timeout_s is not None:
            self.stats["route_timeouts"] += 1
            why = f" (the route's timeout of {call.route_timeout_s * 1e3:.0f} ms)"
        self._reply(call, G.DEADLINE_EXCEEDED,
                    f"deadline exceeded at the sidecar after {elapsed_ms:.0f} ms{why}")

    def _abandon_upstream(self, call: Call) -> None:
        """Cancel whatever upstream work the call has (reset the stream or leave the queue)."""
        call.finished = True
        if call.queued is not None:
            self._unqueue(call)
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        if call.try_timer is not None:
            call.try_timer.cancel()
            call.try_timer = None
        up = call.up
        if up is not None:
            call.up = None
            up.calls.pop(call.up_sid, None)
            up.reset_stream(call.up_sid, F.CANCEL)
            self._capacity(up)

    def _reply(self, call: Call, status: int, message: str) -> None:
        """Answer the caller here with ``status`` and cancel the upstream side."""
        if call.finished:
            return
        self._abandon_upstream(call)
        call.local_reply = LocalReply(status, message)
        call.grpc_status = status
        call.grpc_message = message
        if call.ended_s is None:
            call.ended_s = self.clock()
        self.stats[f"local_replies_{status}"] += 1
        if call.down_open:
            if call.response_started:
                call.down.send_trailers(call.down_sid, G.trailers_block(status, message))
            else:
                call.response_started = True
                call.down.send_headers(call.down_sid, G.trailers_only_block(status, message), True)
                st = call.down.streams.get(call.down_sid)
                if st is not None and not st.recv_closed:
                    # RFC 9113 §8.1: a complete response, then ask the client to stop sending.
                    call.down.reset_stream(call.down_sid, F.NO_ERROR)
                    call.down.calls.pop(call.down_sid, None)
                    call.down_open = False
        self._settle_request(call)
        self._maybe_end(call)

    def _maybe_end(self, call: Call) -> None:
        if call.ended or call.up is not None or call.down_open:
            return
        call.ended = True
        call.finished = True
        if call.ended_s is None:
            call.ended_s = self.clock()
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        if call.try_timer is not None:
            call.try_timer.cancel()
            call.try_timer = None
        if call.req_received > call.credited:
            self._settle_request(call)
        if call.resp_received > call.resp_credited:
            self._settle_response(call)
        self.active -= 1
        self._ended.append(call)


def _after(call: Call) -> str:
    """`` after N attempts`` for a call that was retried, else nothing."""
    retry = call.retry
    n = len(retry.attempts) if retry is not None else 0
    return f" after {n} attempts" if n > 1 else ""
