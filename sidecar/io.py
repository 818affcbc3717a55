"""Thin asyncio drivers for the sans-IO core: one protocol per connection, and the connector
that opens pooled upstream connections (h2c to the local app, mTLS to other sidecars).

Writes are batched: frames a connection queues during one loop iteration go out in one
``transport.write`` at the end of it. A transport over its high-water mark pauses the relayed
DATA bound for it (the source's credit is withheld, so the source stops) and stops reading
from its own peer, so a peer that does not read cannot make us queue replies.

Besides moving bytes, ``H2Protocol`` gives the core its clock-driven duties: it starts the
core's per-second budgets over (``H2Connection.new_window``) when a read comes a second or
more after the last start, and its timer tick runs keepalive, idle timeout, connection age and
the flow-control stall check on downstream connections (``stall_timeout_s``: DATA held for
a client whose windows stay shut is the client's doing; an upstream that reads a request
slowly is a slow app, bounded by the windows, and is left alone). ``AdmissionCounter`` and
``LogThrottle`` are the pure parts the listeners use to count connections from accept and
to keep a flood of refusals out of the log.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet

from mesh_common.limits import Limits
from mesh_common.spiffe import spiffe_ids_from_sans

from .http2 import frames as F
from .http2.connection import H2Connection
from .http2.pool import Pool
from .http2.relay import Relay

log = logging.getLogger("mesh.sidecar.io")


class PeerInfo:
    """Who is on the other end of a downstream connection (``serial``: its certificate's,
    lower-case hex without leading zeros; None without TLS)."""

    __slots__ = ("peer_id", "address", "serial")

    def __init__(self, peer_id: str | None, address: str, serial: str | None = None) -> None:
        self.peer_id = peer_id
        self.address = address
        self.serial = serial


X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10
_VERIFY_REASONS = {X509_V_ERR_CERT_HAS_EXPIRED: "certificate_expired",
                   X509_V_ERR_CERT_NOT_YET_VALID: "certificate_not_yet_valid"}


def serial_of(peercert: Mapping[str, object]) -> str:
    """The serial of a peer certificate as ``getpeercert()`` decodes it (upper-case hex,
    maybe with a leading zero), the way snapshots' ``revoked`` lists write it: lower-case
    hex without leading zeros; "" when there is none."""
    raw = peercert.get("serialNumber")
    if not isinstance(raw, str) or not raw:
        return ""
    return raw.lower().lstrip("0") or "0"


def tls_failure_reason(exc: BaseException) -> str:
    """The reason a TLS handshake failed, as metrics count it: ``certificate_expired`` and
    ``certificate_not_yet_valid`` for a peer certificate outside its validity, else
    OpenSSL's reason (``CERTIFICATE_VERIFY_FAILED``, ``SSLV3_ALERT_CERTIFICATE_EXPIRED``:
    the peer refused ours as expired, ...) or the exception's type."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = _VERIFY_REASONS.get(exc.verify_code)
        if reason:
            return reason
    return str(getattr(exc, "reason", None) or type(exc).__name__)


class AdmissionCounter:
    """Open connections of one listener, counted from accept, in total and per peer address
    (the key: the peer's IP address). Pure bookkeeping; the listener calls ``admit`` when it
    accepts a connection and ``release`` exactly once when an admitted one ends."""

    __slots__ = ("max_total", "max_per_peer", "total", "per_peer")

    def __init__(self, max_total: int, max_per_peer: int) -> None:
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self.total = 0
        self.per_peer: dict[str, int] = {}
        """Peer address -> its open connections (only addresses with at least one)."""

    def admit(self, peer: str) -> str | None:
        """Count a new connection from ``peer`` and return None, or return the refusal's
        reason without counting it: ``max_connections_per_peer`` when ``peer`` already holds
        its limit (checked first, so one peer's flood is named as such), ``max_connections``
        when the listener holds its total."""
        held = self.per_peer.get(peer, 0)
        if held >= self.max_per_peer:
            return "max_connections_per_peer"
        if self.total >= self.max_total:
            return "max_connections"
        self.per_peer[peer] = held + 1
        self.total += 1
        return None

    def release(self, peer: str) -> None:
        """An admitted connection from ``peer`` ended (call once per ``admit`` that
        returned None)."""
        held = self.per_peer.get(peer, 0)
        if held <= 1:
            self.per_peer.pop(peer, None)
        else:
            self.per_peer[peer] = held - 1
        if held > 0:
            self.total -= 1


class LogThrottle:
    """At most one log line per key (a refusal's reason) in ``interval_s``; the next line
    says how many were held back. Keys are a small fixed set of labels, so memory is bounded.
    Pure: the caller passes the time (s, any monotonic clock)."""

    __slots__ = ("interval_s", "_last")

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}  # key -> (logged at, held back since)

    def allow(self, key: str, now_s: float) -> int | None:
        """None: hold this line back (counted). Otherwise log it now, mentioning the
        returned number of lines held back since the last one of this key (0 for none)."""
        last = self._last.get(key)
        if last is not None and now_s - last[0] < self.interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return None
        self._last[key] = (now_s, 0)
        return last[1] if last is not None else 0


STALL_ABORT_GRACE_S = 1.0
"""A connection closed for a flow-control stall gets this long to take its GOAWAY; then its
transport is aborted (a peer that reads nothing must not keep our write buffer)."""


_STALL_LOG = LogThrottle(10.0)
"""Connections closed for a stall are logged at most once in this many seconds."""


QUIET_READ_S = 0.0003
"""A read that comes this long (s) after the process's previous one writes what it caused at
once (``Flusher.after_read``)."""


DRAIN_PING = b"mesh-gw\x00"
"""The opaque data of the PING sent after a draining GOAWAY."""

DRAIN_ACK_WAIT_S = 1.0
"""A draining connection whose peer does not ack the PING after its GOAWAY closes this long
(s) after the GOAWAY, once its streams are done."""


class Flusher:
    """Collects connections with queued output and writes each once per loop iteration.

    Under load, the reads of one loop iteration share their writes: frames queued for one
    connection by several reads leave in one write. A read that comes alone (none in the
    process for ``quiet_s`` before it) writes at once instead of a loop pass later: measured
    at 200 requests/s, 0.28 ms less added p50 through two sidecars, with the same CPU per
    call at saturation (where reads are microseconds apart and keep sharing)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, quiet_s: float = QUIET_READ_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.loop = loop
        self.pending: list[H2Protocol] = []
        self.scheduled = False
        self.quiet_s = quiet_s
        self.clock = clock
        self.last_read_s = -quiet_s
        """When the previous read's processing ended (``clock`` s)."""

    def after_read(self) -> None:
        """Called once a read's bytes are processed: write now when the read came alone."""
        now = self.clock()
        if self.pending and now - self.last_read_s > self.quiet_s:
            self.flush()
        self.last_read_s = now

    def want(self, proto: H2Protocol) -> None:
        self.pending.append(proto)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, []
        for proto in pending:
            proto.flush()


class H2Protocol(asyncio.Protocol):
    """Drives one H2Connection (either role) from an asyncio transport."""

    def __init__(self, relay: Relay, conn: H2Connection, flusher: Flusher, limits: Limits,
                 on_open: Callable[[H2Protocol], bool] | None = None,
                 on_close: Callable[[H2Protocol], None] | None = None) -> None:
        self.relay = relay
        self.conn = conn
        self.flusher = flusher
        self.limits = limits
        self.transport: asyncio.Transport | None = None
        self.on_open = on_open
        self.on_close = on_close
        self.loop = flusher.loop
        self.last_rx_s = self.loop.time()
        self.opened_s = self.last_rx_s
        self.idle_since_s = self.last_rx_s
        self.ping_sent_s: float | None = None
        self.tick_handle: asyncio.TimerHandle | None = None
        self.lost = False
        self.peer_serial: str | None = None
        """An upstream TLS connection's peer certificate serial (``serial_of``)."""
        self.peer_key: str | None = None
        """The peer address a listener counted this connection under (``AdmissionCounter``),
        until it releases it; None when not counted."""
        self.handshake_timer: asyncio.TimerHandle | None = None
        """A listener's handshake deadline for this connection, until it fires or the
        connection ends."""
        self.ended_by: str | None = None
        """Why the sidecar ended this connection for its peer's misbehaviour: the core's
        ``error_kind`` (set when the connection is lost) or ``stall``; None otherwise."""
        self.window_s = self.last_rx_s
        """When the core's per-second budgets last started over (loop time, s)."""
        self.stall_since_s: float | None = None
        """Since when DATA has waited for this peer's windows with none opened (loop time)."""
        self.stall_mark = 0
        self.drain_pings: int | None = None
        """``conn.pings_sent`` as of the PING ``_drain`` sent after its GOAWAY (None: no such
        PING; the connection closes as soon as its streams are done)."""
        self.drain_since_s = 0.0
        """When ``_drain`` sent its GOAWAY (loop time, s)."""
        """``conn.window_opened`` when ``stall_since_s`` was set."""
        self.stall_timeout_s = 0.0 if conn.client else limits.stall_timeout_s
        """The stall check's span (0 = off). Downstream connections only: an upstream that
        takes a request slowly is a slow app, whose back-pressure the windows already bound;
        a listener may lengthen it for peers that relay for clients of their own."""
        conn.io = self
        conn.on_output = self._output

    # ------------------------------------------------------------- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=self.limits.write_high_water_bytes)  # type: ignore[attr-defined]
        if self.on_open is not None and not self.on_open(self):
            transport.abort()  # type: ignore[attr-defined]
            return
        self.relay.adopt(self.conn)
        self.conn.initiate()
        self._schedule_tick()

    def data_received(self, data: bytes) -> None:
        now = self.last_rx_s = self.loop.time()
        if now - self.window_s >= 1.0:  # the core's per-second budgets start over
            self.window_s = now
            self.conn.new_window()
        self.ping_sent_s = None
        relay = self.relay
        relay.holding = True  # what follows the read's sends runs once they are written
        try:
            try:
                if self.conn.client:
                    relay.up_received(self.conn, data)
                else:
                    relay.down_received(self.conn, data)
            except Exception:  # a bug must cost this connection, never the process
                log.exception("internal error relaying on a %s connection; closing it",
                              "upstream" if self.conn.client else "downstream")
                self.conn.terminate(F.INTERNAL_ERROR, "internal error")
                self.flush()
            self.flusher.after_read()
        finally:
            try:
                relay.release()
            except Exception:  # a bug in the bookkeeping after a read: log it, keep serving
                log.exception("internal error in the relay's bookkeeping after a read")

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.relay.set_paused(self.conn, True)
        if self.transport is not None and not self.conn.client:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.conn.client and not self.transport.is_closing():
            self.transport.resume_reading()
        self.relay.set_paused(self.conn, False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.tick_handle is not None:
            self.tick_handle.cancel()
        reason = f"connection lost: {exc}" if exc else "connection closed by peer"
        if self.ended_by is None:
            self.ended_by = self.conn.error_kind
        self.conn.closed = True
        self.relay.connection_lost(self.conn, reason)
        if self.on_close is not None:
            self.on_close(self)

    # ------------------------------------------------------------- output
    def _output(self) -> None:
        self.flusher.want(self)

    def flush(self) -> None:
        transport = self.transport
        data = self.conn.data_to_send()
        if transport is None or transport.is_closing():
            return
        if data:
            transport.write(data)
        if self.conn.closed:
            transport.close()

    def close(self) -> None:
        """Flush what is queued and close the transport."""
        self.flush()
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------- timers
    def abort(self) -> None:
        """Drop the connection now, without flushing (its peer does not read)."""
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def _tick_interval_s(self) -> float:
        """Seconds between timer ticks: a quarter of the shortest enabled span (keepalive,
        idle, age, stall), at least 20 ms; 0 = no tick."""
        lim = self.limits
        spans = [s for s in (lim.keepalive_interval_s, lim.keepalive_timeout_s, lim.idle_timeout_s,
                             lim.max_connection_age_s, self.stall_timeout_s) if s > 0]
        return max(0.02, min(spans) / 4) if spans else 0.0

    def _schedule_tick(self) -> None:
        interval = self._tick_interval_s()
        if interval and not self.lost:
            self.tick_handle = self.loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        if self.lost or self.transport is None or self.transport.is_closing():
            return
        now = self.loop.time()
        lim = self.limits
        conn = self.conn
        if conn.active_streams:
            self.idle_since_s = now
        if self.stall_timeout_s > 0 and self._stalled(now):
            held = _STALL_LOG.allow("stall", now)
            if held is not None:
                log.info("downstream connection: no flow-control window opened for %.1fs with "
                         "%d bytes waiting for the peer; closing it%s",
                         now - (self.stall_since_s or now), conn.blocked_bytes(),
                         f" ({held} more since the last line)" if held else "")
            self.ended_by = "stall"
            conn.terminate(F.ENHANCE_YOUR_CALM, "flow-control stall")
            self.close()
            self.loop.call_later(STALL_ABORT_GRACE_S, self.abort)
            return
        if lim.keepalive_interval_s > 0:
            if self.ping_sent_s is not None:
                if now - self.ping_sent_s > lim.keepalive_timeout_s:
                    log.info("keepalive: no answer to PING for %.1fs; closing", lim.keepalive_timeout_s)
                    conn.terminate(F.NO_ERROR, "keepalive timeout")
                    self.close()
                    return
            elif now - self.last_rx_s >= lim.keepalive_interval_s:
                self.ping_sent_s = now
                conn.ping(b"mesh-ka\x00")
        if (lim.idle_timeout_s > 0 and not conn.active_streams and not conn.goaway_sent
                and now - self.idle_since_s >= lim.idle_timeout_s):
            self._drain(now, b"idle timeout")
        if (lim.max_connection_age_s > 0 and not conn.client and not conn.goaway_sent
                and now - self.opened_s >= lim.max_connection_age_s):
            self._drain(now, b"max connection age")
        if conn.goaway_sent and not conn.active_streams and self._drained(now):
            self.close()
            return
        self._schedule_tick()

    def _drain(self, now: float, why: bytes) -> None:
        """GOAWAY; on a downstream connection, then a PING. Closing while the peer may still
        be sending a request would reset the connection under it (unread bytes make the
        close a reset) and the request would be lost, not refused; once the PING is acked the
        peer has read the GOAWAY, and every stream it opened before then has arrived (and
        been refused, which a gRPC client retries on a new connection)."""
        conn = self.conn
        conn.goaway(F.NO_ERROR, why)
        if not conn.client:
            conn.ping(DRAIN_PING)
            self.drain_pings = conn.pings_sent
            self.drain_since_s = now

    def _drained(self, now: float) -> bool:
        """May a connection that sent GOAWAY close once its streams are done: True unless
        ``_drain``'s PING is neither acked nor ``DRAIN_ACK_WAIT_S`` old."""
        mark = self.drain_pings
        return (mark is None or self.conn.pings_acked >= mark
                or now - self.drain_since_s >= DRAIN_ACK_WAIT_S)

    def _stalled(self, now: float) -> bool:
        """True when DATA has waited for the peer's flow-control windows, with no window
        opened, for ``stall_timeout_s`` (tracked across ticks)."""
        conn = self.conn
        if conn.blocked_bytes() <= 0:
            self.stall_since_s = None
            return False
        opened = conn.window_opened
        if self.stall_since_s is None or opened != self.stall_mark:
            self.stall_since_s = now
            self.stall_mark = opened
            return False
        return now - self.stall_since_s >= self.stall_timeout_s


def describe_error(exc: BaseException) -> str:
    """A short human reason for a failed connect or handshake."""
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "connect timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS verification failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


def pool_key(host: str, port: int, spiffe_id: str | None) -> str:
    """How the connector names the pool of an endpoint (address and expected identity)."""
    return f"{host}:{port}|{spiffe_id or 'h2c'}"


class Connector:
    """Opens upstream connections for pools: mTLS with an identity check, or h2c.

    ``revoked()`` (when given) is the set of revoked certificate serials: an endpoint that
    presents one is refused after the handshake. ``refused`` counts upstream connections
    refused after the handshake by reason (``revoked``, ``wrong_identity``, ``no_alpn_h2``),
    ``tls_failures`` failed handshakes by ``tls_failure_reason``, ``terminated`` upstream
    connections ended for the peer's misbehaviour by ``H2Protocol.ended_by`` (the core's
    error kind, or ``stall``)."""

    def __init__(self, relay: Relay, flusher: Flusher, limits: Limits,
                 client_context: Callable[[], ssl.SSLContext | None],
                 revoked: Callable[[], AbstractSet[str]] | None = None) -> None:
        self.relay = relay
        self.flusher = flusher
        self.limits = limits
        self.client_context = client_context
        self.revoked = revoked
        self.pools: dict[str, Pool] = {}
        self.protocols: set[H2Protocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.refused: dict[str, int] = {}
        self.tls_failures: dict[str, int] = {}
        self.terminated: dict[str, int] = {}

    def pool(self, host: str, port: int, *, spiffe_id: str | None, label: str) -> Pool:
        """The pool for an endpoint; TLS with ``spiffe_id`` verified when given, else h2c."""
        key = pool_key(host, port, spiffe_id)
        pool = self.pools.get(key)
        if pool is None:
            pool = Pool(key, label, self.limits.upstream_connections_per_endpoint,
                        lambda p: self._start(p, host, port, spiffe_id))
            self.pools[key] = pool
        return pool

    def _start(self, pool: Pool, host: str, port: int, spiffe_id: str | None) -> None:
        task = self.flusher.loop.create_task(self._open(pool, host, port, spiffe_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _open(self, pool: Pool, host: str, port: int, spiffe_id: str | None) -> None:
        loop = self.flusher.loop
        conn = H2Connection(client=True, limits=self.limits)
        proto = H2Protocol(self.relay, conn, self.flusher, self.limits,
                           on_close=self._closed)
        ctx = self.client_context() if spiffe_id else None
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: proto, host, port, ssl=ctx,
                                       server_hostname=host if ctx else None),
                timeout=self.limits.connect_timeout_s)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            if isinstance(exc, ssl.SSLError):
                reason = tls_failure_reason(exc)
                self.tls_failures[reason] = self.tls_failures.get(reason, 0) + 1
                if reason == "certificate_expired":
                    log.warning("upstream %s:%d refused: its certificate has expired", host,
                                port)
            self.relay.pool_failed(pool, describe_error(exc))
            return
        if ctx is not None:
            problem = self._check_peer(transport, spiffe_id)
            why = "wrong_identity"
            if not problem:
                serial = serial_of(transport.get_extra_info("peercert") or {})
                proto.peer_serial = serial
                if self.revoked is not None and serial in self.revoked():
                    problem = (f"endpoint {spiffe_id} presented a revoked certificate "
                               f"(serial {serial})")
                    why = "revoked"
            elif problem.startswith("peer did not negotiate"):
                why = "no_alpn_h2"
            if problem:
                log.warning("upstream %s:%d rejected: %s", host, port, problem)
                self.refused[why] = self.refused.get(why, 0) + 1
                transport.abort()
                self.relay.pool_failed(pool, problem)
                return
        if proto.lost:
            self.relay.pool_failed(pool, "connection closed during setup")
            return
        self.protocols.add(proto)
        self.relay.pool_connected(pool, conn)

    def _closed(self, proto: H2Protocol) -> None:
        self.protocols.discard(proto)
        if proto.ended_by is not None:
            self.terminated[proto.ended_by] = self.terminated.get(proto.ended_by, 0) + 1

    @staticmethod
    def _check_peer(transport: asyncio.BaseTransport, expected: str | None) -> str:
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None and sslobj.selected_alpn_protocol() != "h2":
            return "peer did not negotiate HTTP/2 (ALPN h2)"
        cert = transport.get_extra_info("peercert") or {}
        ids = spiffe_ids_from_sans(cert.get("subjectAltName", ()))
        if expected not in ids:
            shown = ", ".join(ids) or "no SPIFFE ID"
            return f"endpoint presented {shown}, expected {expected}"
        return ""

    def retain(self, keep: set[str]) -> list[str]:
        """Retire the pools whose keys are not in ``keep`` (endpoints that left the snapshot):
        their connections get GOAWAY and close once their streams are done; a pool with calls
        waiting for a connection stays until the next retain. Returns the retired keys."""
        retired = []
        for key, pool in list(self.pools.items()):
            if key in keep or pool.waiting:
                continue
            pool.closed = True
            for conn in list(pool.conns):
                conn.goaway()
                conn.io.flush()  # type: ignore[attr-defined]
                if not conn.active_streams:
                    conn.io.close()  # type: ignore[attr-defined]
            del self.pools[key]
            retired.append(key)
        return retired

    def cut_revoked(self, revoked: AbstractSet[str]) -> int:
        """GOAWAY the upstream connections whose peer certificate serial is in ``revoked``
        (they take no new stream; each closes once its streams are done); returns how many."""
        return goaway_revoked(self.protocols, lambda proto: proto.peer_serial, revoked)

    def close_all(self) -> None:
        for proto in list(self.protocols):
            proto.close()
        for task in list(self.tasks):
            task.cancel()


def goaway_revoked(protocols: Iterable[H2Protocol],
                   serial_of: Callable[[H2Protocol], str | None],
                   revoked: AbstractSet[str]) -> int:
    """GOAWAY every connection of ``protocols`` whose peer's certificate serial
    (``serial_of``) is in ``revoked`` and that has not been told yet; one without streams
    closes at once. Returns how many were told."""
    cut = 0
    for proto in list(protocols):
        serial = serial_of(proto)
        if serial and serial in revoked and not proto.conn.goaway_sent:
            cut += 1
            proto.conn.goaway()
            proto.flush()
            if not proto.conn.active_streams:
                proto.close()
    return cut
