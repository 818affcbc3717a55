"""The sidecar process: inbound (mTLS) and outbound (h2c, loopback) listeners around two
relays, the admin endpoint, certificate reloads and a graceful drain.

The listeners enforce the connection limits of ``mesh_common.limits.Limits`` (per peer
address and in total, counted from accept; the handshake timeout) and count every refusal,
termination and refused call; ``/stats`` shows them per listener ("refused_connections",
"terminated_connections", "refused_calls", "counted_connections", "pending_calls") and
``sidecar.metrics`` exports them."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import signal
import socket
import ssl
import struct
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any

from mesh_common.bootstrap import Bootstrap
from mesh_common.limits import Limits
from mesh_common.snapshot import Endpoint, Snapshot
from mesh_common.spiffe import SpiffeError, SpiffeId, spiffe_ids_from_sans

from .admin import AdminServer
from .http2.connection import H2Connection
from .http2.relay import Hooks, LocalReply, Relay
from .io import (
    AdmissionCounter,
    Connector,
    Flusher,
    H2Protocol,
    LogThrottle,
    PeerInfo,
    goaway_revoked,
    pool_key,
    serial_of,
    tls_failure_reason,
)
from .layers.authorize import Authorize
from .layers.balance import DECAY_S
from .layers.calllog import AccessLog, CallLog, Taps
from .layers.limits import UpstreamLimits
from .layers.metrics import Metrics
from .layers.outlier import OutlierDetection
from .layers.stats import Stats, StatsReport
from .layers.trace import Trace
from .stack import Stack, inbound_stack, outbound_stack
from .tls import TlsFiles, TlsState
from .upstream import ResilienceReport

log = logging.getLogger("mesh.sidecar")


REFUSAL_LOG_INTERVAL_S = 10.0
"""Refused downstream connections are logged at most once per reason in this many seconds
(with how many were held back), so a flood of them cannot flood the log."""
MESH_PEER_STALL_FACTOR = 2.0
"""The TLS (inbound) listener's peers are sidecars relaying for clients of their own: a client
that stops reading makes its sidecar stop opening our windows too. That sidecar closes the
client after ``stall_timeout_s`` and cancels its streams here; waiting this many times as long
before calling a mesh peer's connection stalled lets it act first, so a shared connection is
never cut for one slow client behind it."""
ACCEPT_BATCH = 64
"""Connections a TLS listener accepts per readiness callback."""
ACCEPT_RETRY_S = 1.0
"""A TLS listener out of file descriptors stops accepting for this long (as asyncio does)."""
_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Listener:
    """Accepts downstream connections and drives each into one relay.

    Connections are counted from accept (``admission``: per peer IP address and in total,
    TLS handshakes in progress included); one over ``limits.max_connections_per_peer`` or
    ``limits.max_connections`` is closed at once, before any TLS work. A TLS listener
    accepts sockets itself and hands each to ``loop.connect_accepted_socket(ssl=...)`` (the
    peer's address is known at accept, and a failed handshake comes back as its exception);
    the h2c listener is a plain ``create_server``. A connection must finish its TLS handshake
    and send the HTTP/2 preface within ``limits.handshake_timeout_s`` of accept. After the
    handshake, a peer without ALPN h2, without exactly one SPIFFE ID of our trust domain, or
    whose certificate serial is in ``revoked()``, is refused. A flow-control stall closes a
    connection after ``limits.stall_timeout_s`` (TLS: ``MESH_PEER_STALL_FACTOR`` times that).

    Counters: ``rejected`` (refused connections by reason), ``terminated`` (connections ended
    for the peer's misbehaviour, by ``H2Protocol.ended_by``), ``handshakes`` /
    ``handshake_failures`` (TLS; a failure with a reason is also reported to
    ``on_tls_failure``), ``refused_calls`` (calls refused by a limit, with the relay's)."""

    def __init__(self, name: str, relay: Relay, flusher: Flusher, limits: Limits,
                 ssl_ctx: ssl.SSLContext | None, trust_domain: str | None,
                 revoked: Callable[[], AbstractSet[str]] | None = None,
                 on_tls_failure: Callable[[str, str], None] | None = None) -> None:
        self.name = name
        self.revoked = revoked
        self.relay = relay
        self.flusher = flusher
        self.limits = limits
        self.ssl_ctx = ssl_ctx
        self.trust_domain = trust_domain
        self.on_tls_failure = on_tls_failure
        """Called with (reason, detail) for each failed TLS handshake that has a reason
        (``tls_failure_reason``, or ``handshake_timeout``)."""
        self.protocols: set[H2Protocol] = set()
        self.handshaking: dict[H2Protocol, asyncio.Task[None]] = {}
        """Admitted TLS connections in their handshake, with the task driving it."""
        self.server: asyncio.base_events.Server | None = None
        self.lsock: socket.socket | None = None
        """The TLS listener's listening socket (the h2c one has ``server``)."""
        self.admission = AdmissionCounter(limits.max_connections, limits.max_connections_per_peer)
        self.rejected: dict[str, int] = {}
        self.terminated: dict[str, int] = {}
        self.accepted = 0
        self.handshakes = 0
        self.handshake_failures = 0
        self.refused_streams_closed = 0
        """Streams refused over max_concurrent_streams on connections that have ended."""
        self._log_throttle = LogThrottle(REFUSAL_LOG_INTERVAL_S)

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port."""
        loop = self.flusher.loop
        if self.ssl_ctx is None:
            self.server = await loop.create_server(self._new_protocol, host, port, backlog=1024)
            return self.server.sockets[0].getsockname()[1]
        self.lsock = _listening_socket(host, port, backlog=1024)
        loop.add_reader(self.lsock.fileno(), self._accept_ready)
        return self.lsock.getsockname()[1]

    @property
    def refused_calls(self) -> dict[str, int]:
        """Calls refused by a limit, by reason: the relay's (``message_too_large``,
        ``header_list_too_large``, ``pending_calls``) and streams the connections refused
        over ``max_concurrent_streams``."""
        out = dict(self.relay.refused_calls)
        streams = self.refused_streams_closed + sum(p.conn.refused_streams for p in self.protocols)
        if streams:
            out["max_concurrent_streams"] = streams
        return out

    # ------------------------------------------------------------- accept
    def _new_protocol(self) -> H2Protocol:
        conn = H2Connection(client=False, limits=self.limits)
        proto = H2Protocol(self.relay, conn, self.flusher, self.limits,
                           on_open=self._on_open, on_close=self._closed)
        if self.ssl_ctx is not None:
            proto.stall_timeout_s = self.limits.stall_timeout_s * MESH_PEER_STALL_FACTOR
        return proto

    def _admit(self, peername: Any) -> str | None:
        """Count a new connection under its peer's address and return that key, or refuse
        it (counted and logged) and return None."""
        peer = str(peername[0]) if peername else "?"
        why = self.admission.admit(peer)
        if why is not None:
            self._reject(why, _address(peername))
            return None
        return peer

    def _admitted(self, proto: H2Protocol, peer: str) -> None:
        """``proto`` holds the count of ``peer`` until ``_release``; its handshake deadline
        starts now."""
        proto.peer_key = peer
        proto.handshake_timer = self.flusher.loop.call_later(
            self.limits.handshake_timeout_s, self._handshake_deadline, proto)

    def _release(self, proto: H2Protocol) -> None:
        if proto.peer_key is not None:
            self.admission.release(proto.peer_key)
            proto.peer_key = None
        if proto.handshake_timer is not None:  # a closed connection is not kept for it
            proto.handshake_timer.cancel()
            proto.handshake_timer = None

    def _accept_ready(self) -> None:
        """The TLS listening socket is readable: accept what is waiting (a batch)."""
        lsock = self.lsock
        if lsock is None:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peername = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                    if self._log_throttle.allow("accept_failed", time.monotonic()) is not None:
                        log.warning("%s: cannot accept connections (%s); pausing for %gs",
                                    self.name, exc.strerror or exc, ACCEPT_RETRY_S)
                    loop = self.flusher.loop
                    loop.remove_reader(lsock.fileno())
                    loop.call_later(ACCEPT_RETRY_S, self._resume_accepting, lsock)
                    return
                continue  # ECONNABORTED and the like: that peer is gone
            self._tls_accepted(sock, peername)

    def _resume_accepting(self, lsock: socket.socket) -> None:
        if self.lsock is lsock:
            self.flusher.loop.add_reader(lsock.fileno(), self._accept_ready)

    def _tls_accepted(self, sock: socket.socket, peername: Any) -> None:
        peer = self._admit(peername)
        if peer is None:
            _drop(sock)
            return
        proto = self._new_protocol()
        self._admitted(proto, peer)
        sock.setblocking(False)
        task = self.flusher.loop.create_task(self._handshake(sock, proto, peername))
        self.handshaking[proto] = task

    async def _handshake(self, sock: socket.socket, proto: H2Protocol, peername: Any) -> None:
        """The TLS handshake of an admitted connection; ``proto`` is opened (``_on_open``)
        by the event loop when it completes."""
        loop = self.flusher.loop
        try:
            await loop.connect_accepted_socket(
                lambda: proto, sock, ssl=self.ssl_ctx,
                ssl_handshake_timeout=self.limits.handshake_timeout_s)
        except asyncio.CancelledError:
            return  # our handshake deadline (counted there) or the sidecar's shutdown
        except Exception as exc:  # SSLError, the peer left (OSError), the loop's timeout
            self._handshake_failed(exc, _address(peername))
        else:
            if proto.transport is None:  # the peer left as its handshake ended
                self.handshake_failures += 1
        finally:
            self.handshaking.pop(proto, None)
            if proto.transport is None:  # never opened: nothing else releases it
                self._release(proto)

    def _handshake_failed(self, exc: BaseException, address: str) -> None:
        self.handshake_failures += 1
        if isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc):
            # The event loop's own handshake timeout: a backstop for ours, which runs from
            # accept and so fires first.
            self._reject("handshake_timeout", address)
            self._tls_failure("handshake_timeout", "no TLS handshake within "
                              f"{self.limits.handshake_timeout_s:g}s")
        elif isinstance(exc, ssl.SSLError):
            detail = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc
            self._tls_failure(tls_failure_reason(exc), str(detail))
        # else: the peer went away during its handshake (counted; reason "other")

    def _tls_failure(self, reason: str, detail: str) -> None:
        if self.on_tls_failure is not None:
            self.on_tls_failure(reason, detail)

    def _handshake_deadline(self, proto: H2Protocol) -> None:
        """``handshake_timeout_s`` after accept: a connection still in its TLS handshake, or
        open without the peer's HTTP/2 preface, is closed (``handshake_timeout``)."""
        proto.handshake_timer = None
        if proto.peer_key is None or proto.lost:
            return  # it ended already
        transport = proto.transport
        if transport is not None:  # open: the preface must be in
            if not proto.conn.preface_received:
                self._reject("handshake_timeout", _address(transport.get_extra_info("peername")))
                proto.abort()
            return
        task = self.handshaking.get(proto)
        if task is None or task.done():
            return
        self._reject("handshake_timeout", proto.peer_key)
        self.handshake_failures += 1
        self._tls_failure("handshake_timeout",
                          f"no TLS handshake within {self.limits.handshake_timeout_s:g}s")
        task.cancel()  # closes the connection; the task's end releases its count

    # ------------------------------------------------------------- open / close
    def _reject(self, why: str, peer: str) -> bool:
        """Count a refused connection by reason and log it (at most once per reason in
        ``REFUSAL_LOG_INTERVAL_S``); returns False."""
        self.rejected[why] = self.rejected.get(why, 0) + 1
        held = self._log_throttle.allow(why, time.monotonic())
        if held is not None:
            more = f" ({held} more since the last line)" if held else ""
            log.warning("%s: refused connection from %s: %s%s", self.name, peer, why, more)
        return False

    def _on_open(self, proto: H2Protocol) -> bool:
        transport = proto.transport
        assert transport is not None
        peername = transport.get_extra_info("peername")
        address = _address(peername)
        peer_id: str | None = None
        if self.ssl_ctx is None:
            peer = self._admit(peername)
            if peer is None:
                return False
            self._admitted(proto, peer)
            proto.conn.owner = PeerInfo(peer_id, address)
        else:
            self.handshakes += 1
            sslobj = transport.get_extra_info("ssl_object")
            if sslobj is None or sslobj.selected_alpn_protocol() != "h2":
                return self._reject("no_alpn_h2", address)
            cert = transport.get_extra_info("peercert") or {}
            ids = spiffe_ids_from_sans(cert.get("subjectAltName", ()))
            if len(ids) != 1:
                return self._reject("no_spiffe_id" if not ids else "several_spiffe_ids", address)
            try:
                sid = SpiffeId.parse(ids[0])
            except SpiffeError:
                return self._reject("bad_spiffe_id", address)
            if sid.trust_domain != self.trust_domain:
                return self._reject("foreign_trust_domain", address)
            peer_id = sid.uri
            serial = serial_of(cert)
            if self.revoked is not None and serial in self.revoked():
                return self._reject("revoked", f"{address} ({peer_id}, certificate serial "
                                               f"{serial})")
            proto.conn.owner = PeerInfo(peer_id, address, serial)
        self.protocols.add(proto)
        self.accepted += 1
        return True

    def _closed(self, proto: H2Protocol) -> None:
        """A connection ended (opened or refused at open): release its count, and count why
        the sidecar ended it and the streams it refused."""
        self._release(proto)
        if proto in self.protocols:
            self.protocols.discard(proto)
            self.refused_streams_closed += proto.conn.refused_streams
        if proto.ended_by is not None:
            self.terminated[proto.ended_by] = self.terminated.get(proto.ended_by, 0) + 1

    def cut_revoked(self, revoked: AbstractSet[str]) -> int:
        """GOAWAY the open connections of peers whose certificate serial is in ``revoked``:
        they open no new stream, and each closes once its calls are done; returns how many."""
        def serial(proto: H2Protocol) -> str | None:
            peer = proto.conn.owner
            return peer.serial if isinstance(peer, PeerInfo) else None
        return goaway_revoked(self.protocols, serial, revoked)

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
        lsock, self.lsock = self.lsock, None
        if lsock is not None:
            self.flusher.loop.remove_reader(lsock.fileno())
            lsock.close()

    def goaway_all(self) -> None:
        for proto in list(self.protocols):
            proto.conn.goaway()
            proto.flush()

    def close_all(self) -> None:
        for task in list(self.handshaking.values()):
            task.cancel()
        for proto in list(self.protocols):
            proto.close()


def _listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A non-blocking TCP socket listening on ``host:port`` (its first address), with
    SO_REUSEADDR as asyncio's servers have it (IPv6: v6 only)."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _drop(sock: socket.socket) -> None:
    """Close a just-accepted socket at once, with a reset (no TIME_WAIT left here)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _address(peername: Any) -> str:
    """``host:port`` of a transport's ``peername`` ("?" when unknown)."""
    return f"{peername[0]}:{peername[1]}" if peername else "?"


def _cert_not_after(path: str) -> float | None:
    """Expiry (Unix seconds) of the first certificate in a PEM file, via the ssl module so the
    data path does not load ``cryptography`` (about 10 MB of RSS)."""
    try:
        info = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
        return float(ssl.cert_time_to_seconds(info["notAfter"]))
    except (OSError, ValueError, KeyError, ssl.SSLError):
        return None


@dataclasses.dataclass(frozen=True)
class TracingOptions:
    """How the sidecar traces calls (``--trace-sample-rate``, ``--otlp-endpoint``,
    ``--trace-export-delay-ms``): ``otlp_endpoint`` ``HOST:PORT`` (mTLS with the files ``tls``
    names, default the config's certificate files) or ``http://HOST:PORT`` (plaintext), None =
    export nothing (and build no spans); ``instance_id`` names this replica in the spans'
    resource (default ``SERVICE-HOSTNAME-PID``)."""

    sample_rate: float = 0.1
    otlp_endpoint: str | None = None
    export_delay_ms: float = 1000.0
    instance_id: str | None = None
    tls: Callable[[], TlsFiles] | None = None
    """The current certificate, key and trust bundle files; called before each export batch
    (whose bytes, when changed, make a new channel)."""


class Sidecar:
    """Everything one ``mesh-sidecar`` process runs. ``ewma_decay_s`` is the time constant
    (seconds, > 0) of the outbound balancer's peak-EWMA latency estimates
    (``--ewma-decay-s``)."""

    def __init__(self, boot: Bootstrap, *, drain_timeout_s: float = 10.0,
                 cert_poll_s: float = 2.0, tls: TlsState | None = None,
                 access_log: str | None = None, tracing: TracingOptions | None = None,
                 ewma_decay_s: float = DECAY_S) -> None:
        self.boot = boot
        self.limits = boot.limits
        self.snapshot: Snapshot = boot.snapshot
        self.drain_timeout_s = drain_timeout_s
        self.cert_poll_s = cert_poll_s
        self.ewma_decay_s = ewma_decay_s
        # Standalone: the config's files. Dynamic: a TlsState over in-memory files whose
        # owner swaps in each renewed identity (``TlsState.swap``).
        self.tls = tls if tls is not None else TlsState(
            TlsFiles(boot.cert_file, boot.key_file, boot.ca_file))
        # Extra reasons not to be ready (each returns one, or None) and extra /stats sections.
        self.ready_checks: list[Callable[[], str | None]] = []
        self.stats_sections: dict[str, Callable[[], object]] = {}
        # Called once when the drain starts (e.g. tell the control plane we are going).
        self.on_drain: list[Callable[[], None]] = []
        self.ports: dict[str, str] = {}
        self.started_s = time.time()
        self.draining = False
        self._stop = asyncio.Event()
        self.admin = AdminServer()
        self.inbound: Listener | None = None
        self.outbound: Listener | None = None
        self.relays: dict[str, Relay] = {}
        self.connectors: dict[str, Connector] = {}
        self.stats: dict[str, Stats] = {}
        self.stacks: dict[str, Stack] = {}
        self.tls_failures: dict[str, int] = {}
        # Revoked certificate serials (the snapshot's deny-list, as a set): peers presenting
        # one are refused at their next connection, in and out (``apply_snapshot``).
        self.revoked: frozenset[str] = frozenset(boot.snapshot.revoked)
        self._tls_logged = LogThrottle(TLS_LOG_INTERVAL_S)
        # Observability: the JSON-lines access log (``access_log``: its path, None = off;
        # opened by ``start``) and the taps the control plane starts, shared by both stacks.
        self.access_log_path = access_log
        self.access_log: AccessLog | None = None
        self.taps = Taps()
        # Tracing: the exporter (``sidecar.tracing.Tracer``, made by ``start`` when spans are
        # exported; None = nobody exports) and each side's trace layer.
        self.tracing = tracing or TracingOptions()
        self.tracer: Any = None
        self.traces: dict[str, Trace] = {}

    def _relay(self, name: str, hooks_for: Callable[[Connector, Stats], Hooks],
               loop: asyncio.AbstractEventLoop, flusher: Flusher) -> Relay:
        # The relay's clock (calls' started_s, deadlines, latencies): time.monotonic, not
        # loop.time, which uvloop caches per loop iteration at millisecond resolution.
        stats = Stats(clock=time.monotonic)
        relay = Relay(_NO_HOOKS, self.limits, time.monotonic, loop.call_later,
                      lambda conn: conn.io.close())  # type: ignore[attr-defined]
        connector = Connector(relay, flusher, self.limits, lambda: self.tls.client,
                              revoked=lambda: self.revoked)
        relay.hooks = hooks_for(connector, stats)  # the stack needs the relay's connector
        if isinstance(relay.hooks, Stack):
            self.stacks[name] = relay.hooks
        self.relays[name] = relay
        self.connectors[name] = connector
        self.stats[name] = stats
        return relay

    async def start(self, *, inbound_port: int | None = None, outbound_port: int | None = None,
                    admin_port: int | None = None) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        flusher = Flusher(loop)
        boot = self.boot
        if self.access_log_path and self.access_log is None:
            self.access_log = AccessLog.open(self.access_log_path, loop.call_later)
        if self.tracing.otlp_endpoint and self.tracer is None:
            self.tracer = self._start_tracer()
        if boot.inbound is not None and boot.app is not None:
            app = boot.app

            def inbound_hooks(connector: Connector, stats: Stats) -> Hooks:
                pool = connector.pool(app.host, app.port, spiffe_id=None,
                                      label=f"{app} (local app of {boot.service})")
                return inbound_stack(stats, pool, metrics=self._metrics("inbound", stats),
                                     calllog=self._calllog("inbound", stats),
                                     trace=self._trace("inbound"),
                                     authorize=Authorize(lambda: self.snapshot, boot.service))

            relay = self._relay("inbound", inbound_hooks, loop, flusher)
            # The front server context lives across certificate reloads (``TlsState``);
            # failed handshakes come back counted by reason and logged (``_tls_failed``).
            self.inbound = Listener("inbound", relay, flusher, self.limits, self.tls.server,
                                    boot.trust_domain, revoked=lambda: self.revoked,
                                    on_tls_failure=self._tls_failed)
            port = await self.inbound.start(boot.inbound.host,
                                            boot.inbound.port if inbound_port is None else inbound_port)
            self.ports["inbound"] = f"{boot.inbound.host}:{port}"
        if boot.outbound is not None:

            def outbound_hooks(connector: Connector, stats: Stats) -> Hooks:
                def endpoint_pool(ep: Endpoint, route: str) -> Any:
                    return connector.pool(ep.host, ep.port, spiffe_id=ep.spiffe_id,
                                          label=f"{ep.address} ({route})")
                return outbound_stack(lambda: self.snapshot, stats, endpoint_pool,
                                      metrics=self._metrics("outbound", stats),
                                      calllog=self._calllog("outbound", stats),
                                      trace=self._trace("outbound"),
                                      ewma_decay_s=self.ewma_decay_s)

            relay = self._relay("outbound", outbound_hooks, loop, flusher)
            self.outbound = Listener("outbound", relay, flusher, self.limits, None, None)
            port = await self.outbound.start(boot.outbound.host,
                                             boot.outbound.port if outbound_port is None else outbound_port)
            self.ports["outbound"] = f"{boot.outbound.host}:{port}"
        self.admin.route("GET", "/ready", self._ready)
        self.admin.route("GET", "/stats", self._stats)
        self.admin.route("POST", "/reload-certs", self._reload_certs)
        self.admin.route("GET", "/metrics", self._metrics_page)
        port = await self.admin.start(boot.admin.host,
                                      boot.admin.port if admin_port is None else admin_port)
        self.ports["admin"] = f"{boot.admin.host}:{port}"
        loop.set_exception_handler(self._loop_exception)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_from_signal)
        if self.cert_poll_s > 0:
            loop.call_later(self.cert_poll_s, self._poll_certs)
        return dict(self.ports)

    def cert_not_after(self) -> float | None:
        """Expiry (Unix seconds) of the certificate new handshakes use; None if unreadable."""
        return _cert_not_after(self.tls.files.cert)

    def _metrics(self, direction: str, stats: Stats) -> Metrics:
        return Metrics(direction, self.boot.service, lambda: self.snapshot, stats.clock)

    def _calllog(self, direction: str, stats: Stats) -> CallLog:
        return CallLog(direction, self.boot.service, self.taps, self.access_log,
                       clock=stats.clock)

    def _trace(self, direction: str) -> Trace:
        """The trace layer of one side: exporting to ``self.tracer`` when there is one."""
        tracer = self.tracer
        trace = Trace(outbound=direction == "outbound", service=self.boot.service,
                      sample_rate=self.tracing.sample_rate,
                      sink=tracer.submit if tracer is not None else None)
        self.traces[direction] = trace
        return trace

    def _start_tracer(self) -> Any:
        """The span exporter for ``--otlp-endpoint`` (its export task starts with the first
        span, on the running loop). Raises ValueError for an endpoint that does not parse."""
        from .tracing import Tracer, parse_otlp_endpoint

        opts = self.tracing
        assert opts.otlp_endpoint
        target = parse_otlp_endpoint(opts.otlp_endpoint)
        # Standalone: the config's files (fixed paths; their bytes are read before each batch).
        files = TlsFiles(cert=self.boot.cert_file, key=self.boot.key_file, ca=self.boot.ca_file)
        tls = opts.tls or (lambda: files)
        instance = opts.instance_id or f"{self.boot.service}-{socket.gethostname()}-{os.getpid()}"
        tracer = Tracer(target, service=self.boot.service, instance_id=instance,
                        tls=tls, schedule_delay_ms=opts.export_delay_ms)
        self.stats_sections["tracing"] = self._tracing_stats
        log.info("exporting spans to %s (sample rate %g)", target, opts.sample_rate)
        return tracer

    def _tracing_stats(self) -> dict[str, Any]:
        """``/stats`` section: the exporter's counts and the calls each side sampled."""
        out: dict[str, Any] = self.tracer.stats() if self.tracer is not None else {}
        out["sample_rate"] = self.tracing.sample_rate
        out["sampled"] = {d: t.sampled for d, t in self.traces.items()}
        out["sink_errors"] = sum(t.sink_errors for t in self.traces.values())
        return out

    def _metrics_page(self) -> tuple[int, object]:
        """``GET /metrics``: Prometheus text format (prometheus_client is loaded on the first
        scrape, so a sidecar nobody scrapes never pays for it)."""
        from .metrics import metrics_page
        return 200, metrics_page(self)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Failed TLS handshakes and peers that vanish are counted and logged in one line
        (a flood of them must not fill the log with tracebacks); anything else is a bug."""
        exc = context.get("exception")
        if isinstance(exc, ssl.SSLError | ConnectionError | TimeoutError):
            reason = getattr(exc, "reason", None) or type(exc).__name__
            self.tls_failures[str(reason)] = self.tls_failures.get(str(reason), 0) + 1
            log.info("connection failed before serving: %s", reason)
            return
        loop.default_exception_handler(context)

    def _tls_failed(self, reason: str, detail: str) -> None:
        """An inbound TLS handshake failed for ``reason`` (``tls_failure_reason``, or
        ``handshake_timeout``): count it and log it (per reason at most once every
        ``TLS_LOG_INTERVAL_S``, with how many since; a peer's certificate outside its
        validity as a warning)."""
        self.tls_failures[reason] = self.tls_failures.get(reason, 0) + 1
        since = self._tls_logged.allow(reason, time.monotonic())
        if since is None:
            return
        more = f" ({since} more since the last line)" if since else ""
        level = logging.WARNING if reason.startswith("certificate_") else logging.INFO
        log.log(level, "inbound: refused a TLS handshake: %s (%s)%s", detail, reason, more)

    # ------------------------------------------------------------- configuration
    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Route new calls on ``snapshot`` from now on. One assignment, so atomic: the
        layers read ``self.snapshot`` once per call each (within one synchronous decision, so
        the same one), calls already routed keep what they got,
        and connections to endpoints that stay are reused (pools are keyed by address).
        Connections to endpoints that left are closed once their calls are done. A new
        deny-list of revoked serials applies to new connections at once, and the open
        connections of newly revoked peers get GOAWAY."""
        revoked_changed = snapshot.revoked != self.snapshot.revoked
        self.snapshot = snapshot
        if revoked_changed:
            self._apply_revoked(frozenset(snapshot.revoked))
        connector = self.connectors.get("outbound")
        if connector is not None:
            keep = {pool_key(ep.host, ep.port, ep.spiffe_id)
                    for c in snapshot.clusters for ep in c.endpoints}
            for key in connector.retain(keep):
                log.info("endpoint %s left the snapshot: its connections are closed",
                         key.split("|")[0])

    def _apply_revoked(self, revoked: frozenset[str]) -> None:
        fresh = revoked - self.revoked
        self.revoked = revoked
        if not fresh:
            return
        cut = sum(x.cut_revoked(fresh) for x in (*self.connectors.values(), self.inbound)
                  if x is not None)
        log.warning("certificate serial(s) %s revoked: peers presenting them are refused from "
                    "now on%s", ", ".join(sorted(fresh)),
                    f"; {cut} open connection(s) of theirs get GOAWAY" if cut else "")

    def take_report(self) -> StatsReport:
        """The outbound side's call deltas since the previous call (``Stats.take_report``);
        an empty report for a sidecar without an outbound listener."""
        stats = self.stats.get("outbound")
        return stats.take_report() if stats is not None else StatsReport(0.0, {}, {})

    def resilience_report(self) -> ResilienceReport:
        """The outbound side's breakers (every endpoint address of the snapshot in force)
        and limits (every limit of every upstream service) now; empty without an outbound
        listener."""
        stack = self.stacks.get("outbound")
        outlier = stack.layer(OutlierDetection) if stack is not None else None
        limits = stack.layer(UpstreamLimits) if stack is not None else None
        return ResilienceReport(outlier.breaker_views() if outlier is not None else {},
                                limits.limit_views() if limits is not None else ())

    # ------------------------------------------------------------- admin handlers
    def _ready(self) -> tuple[int, object]:
        if self.draining:
            return 503, {"ready": False, "reason": "draining", "ports": self.ports}
        for check in self.ready_checks:
            reason = check()
            if reason:
                return 503, {"ready": False, "reason": reason, "ports": self.ports}
        return 200, {"ready": True, "ports": self.ports}

    def _stats(self) -> tuple[int, object]:
        body: dict[str, Any] = {
            "service": self.boot.service,
            "spiffe_id": self.boot.spiffe_id,
            "snapshot_version": self.snapshot.version,
            "snapshot_hash": self.snapshot.content_hash(),
            "ports": self.ports,
            "uptime_s": round(time.time() - self.started_s, 3),
            "draining": self.draining,
            "tls": {"reloads": self.tls.reloads,
                    "cert_not_after": _cert_not_after(self.tls.files.cert),
                    "handshakes": self.inbound.handshakes if self.inbound else 0,
                    "handshake_failures": self.inbound.handshake_failures if self.inbound else 0,
                    "failures_by_reason": dict(self.tls_failures)},
        }
        for name, section in self.stats_sections.items():
            body[name] = section()
        for name, relay in self.relays.items():
            listener = self.inbound if name == "inbound" else self.outbound
            connector = self.connectors[name]
            body[name] = {
                "active_calls": relay.active,
                "counters": relay.counters(),
                "calls": self.stats[name].snapshot(),
                "downstream_connections": len(listener.protocols) if listener else 0,
                "accepted_connections": listener.accepted if listener else 0,
                "upstream_connections": len(connector.protocols),
                "counted_connections": listener.admission.total if listener else 0,
                "refused_connections": dict(listener.rejected) if listener else {},
                "terminated_connections": dict(listener.terminated) if listener else {},
                "refused_calls": (listener.refused_calls if listener
                                  else dict(relay.refused_calls)),
                "pending_calls": relay.waiting,
                "refused_upstream_connections": dict(connector.refused),
                "terminated_upstream_connections": dict(connector.terminated),
                "upstream_tls_failures": dict(connector.tls_failures),
            }
            stack = self.stacks.get(name)
            counted = stack.counters() if stack is not None else {}
            for key in _OWN_SECTIONS:  # the outbound side's resilience, on its own
                if key in counted:
                    body[name][key] = counted.pop(key)
            if counted:  # the outbound side: per-rule matches, redistributions, faults
                body[name]["routing"] = counted
        return 200, body

    def _reload_certs(self) -> tuple[int, object]:
        try:
            self.tls.reload()
        except (OSError, ssl.SSLError) as exc:
            return 500, {"reloaded": False, "error": str(exc)}
        return 200, {"reloaded": True, "reloads": self.tls.reloads}

    def _reload_from_signal(self) -> None:
        try:
            self.tls.reload()
        except (OSError, ssl.SSLError) as exc:
            log.warning("SIGHUP: certificates not reloaded (keeping the old ones): %s", exc)

    def _poll_certs(self) -> None:
        if self._stop.is_set():
            return
        self.tls.reload_if_changed()
        asyncio.get_running_loop().call_later(self.cert_poll_s, self._poll_certs)

    # ------------------------------------------------------------- lifecycle
    async def wait_stopped(self) -> None:
        await self._stop.wait()
        await self.drain()

    async def drain(self) -> None:
        """Stop accepting, GOAWAY every downstream, finish calls in flight (up to the drain
        timeout), then close everything."""
        self.draining = True
        for hook in self.on_drain:
            try:
                hook()
            except Exception:  # a listener's bug must not stop the drain
                log.exception("drain listener failed")
        listeners = [x for x in (self.inbound, self.outbound) if x is not None]
        for lst in listeners:
            lst.stop_accepting()
            lst.goaway_all()
        deadline = time.monotonic() + self.drain_timeout_s
        while time.monotonic() < deadline and any(r.active for r in self.relays.values()):
            await asyncio.sleep(0.02)
        left = sum(r.active for r in self.relays.values())
        if left:
            log.warning("drain timeout: %d calls still in flight are cut", left)
        for lst in listeners:
            lst.close_all()
        for connector in self.connectors.values():
            connector.close_all()
        if self.access_log is not None:
            self.access_log.close()
        if self.tracer is not None and not await self.tracer.aclose(3.0):
            log.warning("spans still queued for export may be lost at exit")
        await self.admin.close()
        await asyncio.sleep(0)


TLS_LOG_INTERVAL_S = 5.0
"""Failed inbound handshakes are logged at most once per reason in this many seconds."""


_NO_HOOKS: Hooks = Stack([], lambda call: LocalReply(14, "sidecar starting"))
_OWN_SECTIONS = ("breakers", "limits", "balancers", "authz")
"""Sections of a stack's counters that ``/stats`` shows next to ``routing`` (outbound, per
upstream x endpoint: outlier detection; per upstream: limits; the balancers' state;
inbound: the authorization's default, policies and decisions)."""
