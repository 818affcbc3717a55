"""Dynamic mode's configuration source: one long-lived ``mesh.v1.Discovery/Stream`` to the
control plane.

The sidecar registers (``Register`` first, on every new stream: a resync), then at once:

* answers every ``SnapshotPush``: the document (``json``, or ``json_zlib`` inflated to at
  most ``MAX_INFLATED_SNAPSHOT_BYTES``: ``Register`` says it accepts compressed pushes) is
  validated whole (``from_json``); an invalid one (a decompression bomb too) is NACKed with
  its one-line reason and changes nothing; a valid one is merged with the static clusters
  of ``--config`` (static wins on a name clash), swapped in atomically and ACKed; a push
  whose hash is the one in force is ACKed without a swap;
* answers ``Query`` (kind ``config``: the snapshot in force and its version) and obeys
  ``RenewCertificate`` (the identity renews now);
* starts and stops taps (``TapStart``/``TapStop``, on the process's ``Taps``) and sends
  what they took as ``TapEvents`` batches at most every ``TAP_FLUSH_S``; the taps end with
  the stream;
* sends a ``StateReport`` every ``report_interval_s`` (calls per upstream by status, a latency
  histogram, per endpoint its health, requests/failures and breaker, per upstream its limits
  in use, its certificate's serial and the hashes of its trust bundle and issuing CA), one at
  once after each renewal (``report_now``: a CA rotation waits on it) and a ``HealthChange``
  as soon as the local app's health changes.

When the stream fails or the control plane goes away the data plane keeps serving on its last
snapshot, and the client reconnects with capped exponential backoff and full jitter, trying
the control plane's addresses in turn. Each attempt builds fresh mTLS credentials from the
identity's current certificate, so a renewed one is used. Keys and tokens are never logged.

Shape: ``DiscoveryState.handle`` (pure: a control message in, the replies out) and the
``report_message``/``register_message`` builders hold the logic; ``DiscoveryClient`` is the
I/O around them, with an injectable channel factory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mesh_common.snapshot import (
    MAX_SNAPSHOT_BYTES,
    Snapshot,
    SnapshotError,
    content_hash,
    from_json,
    merge,
)
from protos.mesh.v1 import control_pb2 as pb

from .layers.calllog import TapBatch, Taps
from .layers.stats import StatsReport
from .rpc import Channel, RpcError, StreamCall, client_tls
from .upstream import ResilienceReport

if TYPE_CHECKING:
    from .dynamic import DynamicIdentity
    from .health import AppHealth
    from .identity import TrustFields
    from .process import Sidecar

log = logging.getLogger("mesh.sidecar.discovery")

BACKOFF_START_S = 0.2
FIRST_HEALTH_WAIT_S = 5.0
"""At most this long the first registration waits for the app's first health check."""
MAX_REASON_CHARS = 1024
OUTBOX_MAX = 256
"""Messages waiting for the stream beyond this are dropped (counted): the stream is stuck."""
TAP_FLUSH_S = 0.1
"""Taps' events go out in batches at most this often (seconds)."""
MAX_INFLATED_SNAPSHOT_BYTES = MAX_SNAPSHOT_BYTES
"""A ``json_zlib`` push is inflated to at most this many bytes (8 MiB, the largest document
``from_json`` accepts, so no valid snapshot is refused); one that would inflate further (a
decompression bomb: 1 GiB of zeros is 1 MiB of zlib) is NACKed without inflating the rest,
so memory stays bounded (about twice this, zlib's output blocks and their join, plus the
message itself)."""
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Cap on one message from the control plane (bytes)."""


def backoff_s(attempt: int, rng: random.Random, *, start_s: float = BACKOFF_START_S,
              cap_s: float = 5.0) -> float:
    """Full jitter: a delay (seconds) uniform in ``[0, min(cap_s, start_s * 2**attempt)]``;
    ``attempt`` counts the failures in a row, from 0."""
    return rng.uniform(0.0, min(cap_s, start_s * 2.0 ** min(attempt, 32)))


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# ---------------------------------------------------------------------- messages (pure)
@dataclass(frozen=True)
class Registration:
    """Who this sidecar is: its instance id, the addresses it is bound to (``HOST:PORT``,
    "" when it has no such listener) and its labels."""

    instance_id: str
    inbound: str = ""
    outbound: str = ""
    admin: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


def register_message(reg: Registration, *, health: str, version: str, hash: str,
                     cert_not_after_unix: int,
                     trust: TrustFields | None = None) -> pb.SidecarMessage:
    """The first message of every stream. ``health`` is the app's ("" = no app); ``version``
    and ``hash`` those of the control plane's snapshot in force ("" = none yet); ``trust``
    the identity's serial and hashes (None = none to report). It always says it accepts
    zlib-compressed snapshots (``push_document`` reads them)."""
    return pb.SidecarMessage(register=pb.Register(
        accepts_zlib_snapshot=True,
        instance_id=reg.instance_id, inbound=reg.inbound, outbound=reg.outbound,
        admin=reg.admin, labels=dict(reg.labels), health=health, version=version, hash=hash,
        cert_not_after_unix=cert_not_after_unix,
        cert_serial=trust.cert_serial if trust else "",
        bundle_sha256=trust.bundle_sha256 if trust else "",
        issuer_sha256=trust.issuer_sha256 if trust else ""))


def report_message(report: StatsReport, snapshot: Snapshot, *, health: str,
                   cert_not_after_unix: int,
                   resilience: ResilienceReport | None = None,
                   trust: TrustFields | None = None) -> pb.SidecarMessage:
    """A ``StateReport``: the upstreams that carried calls in ``report``, and every endpoint of
    ``snapshot``'s clusters (an address once, under its first cluster) with its health,
    requests/failures in ``report`` (0 when none) and, from ``resilience``, its breaker
    (state "" when it has none) and every limit of every upstream; ``trust``: the identity's
    serial and hashes (None = none to report)."""
    breakers = resilience.breakers if resilience is not None else {}
    upstreams = [pb.UpstreamStats(service=name, by_code=up.by_code,
                                  latency=pb.Histogram(bounds_ms=report.bounds_ms,
                                                       counts=up.latency_counts))
                 for name, up in sorted(report.upstreams.items())]
    endpoints: list[pb.EndpointState] = []
    seen: set[str] = set()
    for cluster in snapshot.clusters:
        for ep in cluster.endpoints:
            address = ep.address
            if address in seen:
                continue
            seen.add(address)
            counts = report.endpoints.get(address)
            b = breakers.get(address)
            endpoints.append(pb.EndpointState(
                service=cluster.name, address=address, instance=ep.instance, healthy=ep.healthy,
                requests=counts.requests if counts else 0,
                failures=counts.failures if counts else 0,
                breaker=b.state if b else "",
                consecutive_errors=b.consecutive_errors if b else 0,
                ejections=b.ejections if b else 0,
                half_open_in_s=b.half_open_in_s if b else 0.0,
                last_transition_unix=b.last_transition_unix if b else 0.0))
    limits = [pb.LimitState(upstream=v.upstream, limit=v.limit, in_use=v.in_use, max=v.max,
                            fast_fails=v.fast_fails)
              for v in (resilience.limits if resilience is not None else ())]
    return pb.SidecarMessage(report=pb.StateReport(
        interval_s=report.interval_s, upstreams=upstreams, endpoints=endpoints,
        cert_not_after_unix=cert_not_after_unix, health=health, limits=limits,
        cert_serial=trust.cert_serial if trust else "",
        bundle_sha256=trust.bundle_sha256 if trust else "",
        issuer_sha256=trust.issuer_sha256 if trust else ""))


def tap_message(batch: TapBatch, instance: str) -> pb.SidecarMessage:
    """``TapEvents`` for one tap's batch; ``instance`` is this sidecar's instance id."""
    return pb.SidecarMessage(tap=pb.TapEvents(
        id=batch.id, dropped=batch.dropped,
        events=[pb.TapEvent(instance=instance, **rec._asdict()) for rec in batch.events]))


def push_document(push: pb.SnapshotPush,
                  max_bytes: int = MAX_INFLATED_SNAPSHOT_BYTES) -> str:
    """The snapshot document of ``push``: ``json``, or ``json_zlib`` inflated and decoded.
    Raises ``SnapshotError`` (a one-line reason for the NACK) when both are set, when
    ``json_zlib`` is not one whole zlib stream of UTF-8, or when it would inflate to more than
    ``max_bytes`` bytes: then it stops after ``max_bytes + 1`` bytes, never inflating the
    rest. Pure."""
    if not push.json_zlib:
        return push.json
    if push.json:
        raise SnapshotError("snapshot: both json and json_zlib are set")
    inflater = zlib.decompressobj()
    try:
        doc = inflater.decompress(push.json_zlib, max_bytes + 1)
    except zlib.error as exc:
        raise SnapshotError(f"snapshot: json_zlib is not valid zlib: {exc}") from None
    if len(doc) > max_bytes or inflater.unconsumed_tail:
        raise SnapshotError(f"snapshot: json_zlib inflates to more than {max_bytes} bytes "
                            f"({len(push.json_zlib)} bytes compressed)")
    if not inflater.eof:
        raise SnapshotError("snapshot: json_zlib is truncated")
    if inflater.unused_data:
        raise SnapshotError("snapshot: json_zlib has data after the end of its stream")
    try:
        return doc.decode()
    except UnicodeDecodeError as exc:
        raise SnapshotError(f"snapshot: json_zlib is not UTF-8: {exc}") from None


# ---------------------------------------------------------------------- state (pure)
class DiscoveryState:
    """What the sidecar does with each message of the control plane (no I/O).

    ``static`` holds the clusters and routes of ``--config`` (they win over discovered ones of
    the same name); ``current()`` returns the snapshot in force, ``apply(snapshot)`` swaps one
    in, ``renew()`` asks the identity to renew now; ``taps`` (None: tap messages are ignored)
    are started and stopped by ``TapStart``/``TapStop``. ``version``/``hash`` are those of the
    control plane's snapshot in force ("" before the first).
    """

    def __init__(self, static: Snapshot, trust_domain: str, *,
                 current: Callable[[], Snapshot], apply: Callable[[Snapshot], None],
                 renew: Callable[[], None],
                 wall_clock: Callable[[], float] = time.time,
                 taps: Taps | None = None) -> None:
        self.static = static
        self.taps = taps
        self.trust_domain = trust_domain
        self._current = current
        self._apply = apply
        self._renew = renew
        self._wall_clock = wall_clock
        self.version = ""
        self.hash = ""
        self.acks = 0
        self.nacks = 0
        self.swaps = 0
        self.compressed = 0  # pushes that came as json_zlib
        self.renew_requests = 0
        self.last_nack: dict[str, Any] | None = None

    def handle(self, msg: pb.ControlMessage) -> list[pb.SidecarMessage]:
        """The replies to ``msg``, in order (none for ``RenewCertificate``, ``TapStart``,
        ``TapStop`` and for a kind of message this sidecar does not know). Never raises for
        a bad snapshot: that is a NACK."""
        kind = msg.WhichOneof("msg")
        if kind == "snapshot":
            return [self._push(msg.snapshot)]
        if kind == "query":
            return [self._query(msg.query)]
        if kind == "renew":
            self.renew_requests += 1
            self._renew()
            return []
        if kind == "tap_start":
            if self.taps is not None:
                t = msg.tap_start
                self.taps.start(t.id, t.method, t.duration_s, t.max_events_per_s)
            return []
        if kind == "tap_stop":
            if self.taps is not None:
                self.taps.stop(msg.tap_stop.id)
            return []
        log.debug("ignoring a control message of unknown kind %r", kind)
        return []

    def _push(self, push: pb.SnapshotPush) -> pb.SidecarMessage:
        if push.json_zlib:
            self.compressed += 1
        if push.hash and push.hash == self.hash:
            self.version = push.version or self.version  # same content, newer name: no swap
            self.acks += 1
            return pb.SidecarMessage(ack=pb.Ack(version=self.version, hash=self.hash))
        try:
            discovered = from_json(push_document(push), self.trust_domain)
        except SnapshotError as exc:
            reason = one_line(str(exc))
            self.nacks += 1
            self.last_nack = {"version": push.version, "reason": reason,
                              "at_unix": round(self._wall_clock(), 3)}
            log.warning("snapshot version %s rejected (keeping version %s): %s", push.version,
                        self.version or self.current().version, reason)
            return pb.SidecarMessage(nack=pb.Nack(version=push.version, reason=reason))
        version = push.version or discovered.version
        snap = merge(self.static, discovered, version)
        self._apply(snap)
        self.version = version
        self.hash = push.hash or content_hash(discovered.to_doc())
        self.swaps += 1
        self.acks += 1
        log.info("snapshot version %s applied (hash %s): %d clusters, %d routes", version,
                 self.hash, len(snap.clusters), len(snap.routes))
        return pb.SidecarMessage(ack=pb.Ack(version=version, hash=self.hash))

    def current(self) -> Snapshot:
        """The snapshot the sidecar routes on now."""
        return self._current()

    def config_doc(self) -> dict[str, Any]:
        """``{"version", "hash", "snapshot"}``: the control plane's version and hash in force
        and the document of the snapshot the sidecar routes on (static clusters merged in)."""
        return {"version": self.version, "hash": self.hash,
                "snapshot": self.current().to_doc()}

    def _query(self, query: pb.Query) -> pb.SidecarMessage:
        if query.kind == "config":
            answer = pb.QueryAnswer(id=query.id, json=json.dumps(self.config_doc()))
        else:
            answer = pb.QueryAnswer(id=query.id,
                                    error=f"unknown query kind {query.kind!r} (known: config)")
        return pb.SidecarMessage(answer=answer)


# ---------------------------------------------------------------------- the stream (I/O)
ChannelFactory = Callable[[str], Channel]
STREAM_METHOD = "/mesh.v1.Discovery/Stream"


def mtls_channels(identity: DynamicIdentity) -> ChannelFactory:
    """A channel factory that builds the mTLS context from ``identity``'s certificate at the
    moment of each call (so a renewed certificate is used by the next connection)."""
    def make(address: str) -> Channel:
        return Channel(address, tls=client_tls(identity.files),
                       max_message_bytes=MAX_MESSAGE_BYTES)
    return make


class DiscoveryClient:
    """Keeps one ``Discovery/Stream`` open (``run``), reconnecting as long as it runs.

    ``take_report()`` gives the call deltas for the next ``StateReport``, ``resilience()``
    (when given) the breakers and limits it carries; ``health()`` the
    app's health ("" = no app); ``cert_not_after_unix()`` the certificate's expiry;
    ``trust()`` (when given) the identity's serial and hashes for ``Register`` and every
    ``StateReport``; ``first_health``, when given, is awaited (at most
    ``FIRST_HEALTH_WAIT_S``) before the first registration so it carries a checked health.
    """

    def __init__(self, state: DiscoveryState, registration: Registration, *,
                 addresses: Sequence[str], channel: ChannelFactory,
                 take_report: Callable[[], StatsReport], health: Callable[[], str],
                 cert_not_after_unix: Callable[[], int],
                 first_health: Callable[[], Awaitable[object]] | None = None,
                 report_interval_s: float = 5.0, max_backoff_s: float = 5.0,
                 rng: random.Random | None = None,
                 resilience: Callable[[], ResilienceReport] | None = None,
                 trust: Callable[[], TrustFields] | None = None) -> None:
        if not addresses:
            raise ValueError("at least one control plane address is needed")
        self.state = state
        self.registration = registration
        self.addresses = list(addresses)
        self._channel = channel
        self._take_report = take_report
        self._resilience = resilience
        self._health = health
        self._cert_not_after_unix = cert_not_after_unix
        self._trust = trust
        self._report_wake = asyncio.Event()
        self._first_health = first_health
        self.report_interval_s = report_interval_s
        self.max_backoff_s = max_backoff_s
        self._rng = rng or random.Random()
        self._index = 0
        self._outbox: asyncio.Queue[pb.SidecarMessage] | None = None
        self._tap_wake = asyncio.Event()
        self._draining = False
        self.connected = False
        self.sessions = 0
        self.reconnects = 0
        self.failures = 0
        self.reports = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._last_logged_error: str | None = None

    @property
    def control_plane(self) -> str:
        """The address the stream is on, or the one tried next."""
        return self.addresses[self._index]

    def handle(self, msg: pb.ControlMessage) -> list[pb.SidecarMessage]:
        """``DiscoveryState.handle``: the replies to one control message."""
        return self.state.handle(msg)

    def health(self) -> str:
        """The health this sidecar reports: the app's, NOT_SERVING once it is draining."""
        return "NOT_SERVING" if self._draining else self._health()

    def notify_health(self, status: str) -> None:
        """The app's health changed to ``status``: tell the control plane now (when a stream
        is open; a new stream's registration carries it anyway)."""
        if self._outbox is not None:
            status = "NOT_SERVING" if self._draining else status
            self._send(self._outbox, pb.SidecarMessage(health=pb.HealthChange(health=status)))

    def report_now(self) -> None:
        """Send a ``StateReport`` now (e.g. the identity was renewed), not at the next
        interval; the regular reports go on from then."""
        self._report_wake.set()

    def draining(self) -> None:
        """The sidecar started to drain: from now on it reports NOT_SERVING, so the control
        plane takes it out of the healthy endpoints while calls in flight finish."""
        if not self._draining:
            self._draining = True
            self.notify_health("NOT_SERVING")

    async def run(self) -> None:
        """Stay connected until cancelled; never raises for the control plane's failures."""
        if self._first_health is not None:
            try:
                async with asyncio.timeout(FIRST_HEALTH_WAIT_S):
                    await self._first_health()
            except TimeoutError:
                pass
        attempt = 0
        while True:
            address = self.control_plane
            answered = self.sessions
            try:
                await self._session(address)
                error = "the control plane ended the stream"
            except RpcError as exc:
                error = f"{exc.code.name}: {one_line(exc.details, 200)}"
            except asyncio.InvalidStateError:
                error = "the stream closed"
            except (OSError, ValueError) as exc:
                error = one_line(f"{type(exc).__name__}: {exc}", 200)
            except Exception as exc:  # a bug: log it, and keep discovery alive all the same
                error = one_line(f"{type(exc).__name__}: {exc}", 200)
                if error != self._last_logged_error:
                    log.exception("discovery stream to %s failed unexpectedly", address)
            finally:
                self.connected = False
                self._outbox = None
            if self.sessions > answered:  # the stream worked: the next try starts afresh
                attempt = 0
            self.failures += 1
            self.last_error = f"{address}: {error}"
            if len(self.addresses) > 1:
                self._index = (self._index + 1) % len(self.addresses)
            delay = backoff_s(attempt, self._rng, cap_s=self.max_backoff_s)
            attempt += 1
            if error != self._last_logged_error:
                self._last_logged_error = error
                log.warning("discovery stream to %s failed (%s); serving on snapshot %s, "
                            "retrying (next: %s in %.2fs)", address, error,
                            self.state.version or "from --config", self.control_plane, delay)
            else:
                log.debug("discovery stream to %s failed again (%s)", address, error)
            await asyncio.sleep(delay)

    async def _session(self, address: str) -> None:
        """One stream: register, then read, write and report until one of them ends; returns
        when the control plane ends the stream, raises when it fails."""
        async with self._channel(address) as channel:
            call = await channel.open_stream(STREAM_METHOD, pb.ControlMessage)
            outbox: asyncio.Queue[pb.SidecarMessage] = asyncio.Queue(OUTBOX_MAX)
            outbox.put_nowait(register_message(
                self.registration, health=self.health(), version=self.state.version,
                hash=self.state.hash, cert_not_after_unix=self._cert_not_after_unix(),
                trust=self._trust() if self._trust is not None else None))
            self._outbox = outbox  # health changes from now on follow the registration
            tasks = [asyncio.create_task(self._write(call, outbox), name="discovery-write"),
                     asyncio.create_task(self._read(call, outbox, address),
                                         name="discovery-read"),
                     asyncio.create_task(self._report(outbox), name="discovery-report")]
            if self.state.taps is not None:
                tasks.append(asyncio.create_task(self._taps(outbox, self.state.taps),
                                                 name="discovery-taps"))
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                call.cancel()
                if self.state.taps is not None:  # taps live as long as the stream
                    self.state.taps.clear()
                self._tap_wake.clear()
            for task in done:
                task.result()  # the failure that ended the session, if any

    async def _read(self, call: StreamCall[pb.ControlMessage],
                    outbox: asyncio.Queue[pb.SidecarMessage], address: str) -> None:
        while True:
            msg = await call.read()
            if msg is None:
                return
            if not self.connected:  # the control plane has answered: the session works
                self.connected = True
                self.sessions += 1
                if self.sessions > 1:
                    self.reconnects += 1
                self._last_logged_error = None
                log.info("discovery stream to %s open (%s)", address,
                         "resynced" if self.sessions > 1 else "registered")
            for reply in self.state.handle(msg):
                self._send(outbox, reply)
            if self.state.taps is not None and self.state.taps.active:
                self._tap_wake.set()

    async def _write(self, call: StreamCall[pb.ControlMessage],
                     outbox: asyncio.Queue[pb.SidecarMessage]) -> None:
        while True:
            await call.write(await outbox.get())

    async def _report(self, outbox: asyncio.Queue[pb.SidecarMessage]) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # the interval, or ``report_now``
                await asyncio.wait_for(self._report_wake.wait(), self.report_interval_s)
            self._report_wake.clear()
            if not self.connected:  # the deltas wait for a stream that works
                continue
            self._send(outbox, report_message(
                self._take_report(), self.state.current(), health=self.health(),
                cert_not_after_unix=self._cert_not_after_unix(),
                resilience=self._resilience() if self._resilience is not None else None,
                trust=self._trust() if self._trust is not None else None))
            self.reports += 1

    async def _taps(self, outbox: asyncio.Queue[pb.SidecarMessage], taps: Taps) -> None:
        """While a tap is active (or an ended one has events left): every ``TAP_FLUSH_S``,
        one ``TapEvents`` per tap with something to report. Idle (no timer) otherwise."""
        instance = self.registration.instance_id
        while True:
            await self._tap_wake.wait()
            while taps.active or taps.pending():
                await asyncio.sleep(TAP_FLUSH_S)
                for batch in taps.take():
                    self._send(outbox, tap_message(batch, instance))
            self._tap_wake.clear()

    def _send(self, outbox: asyncio.Queue[pb.SidecarMessage], msg: pb.SidecarMessage) -> None:
        try:
            outbox.put_nowait(msg)
        except asyncio.QueueFull:
            self.dropped += 1
            log.debug("discovery stream stuck: dropped a %s message", msg.WhichOneof("msg"))

    def stats(self) -> dict[str, Any]:
        """The ``discovery`` section of ``/stats``."""
        st = self.state
        return {"connected": self.connected, "control_plane": self.control_plane,
                "control_planes": list(self.addresses), "version": st.version,
                "hash": st.hash, "acks": st.acks, "nacks": st.nacks, "swaps": st.swaps,
                "compressed": st.compressed,
                "last_nack": st.last_nack, "reconnects": self.reconnects,
                "failures": self.failures, "last_error": self.last_error,
                "reports": self.reports, "dropped": self.dropped,
                "renew_requests": st.renew_requests,
                "report_interval_s": self.report_interval_s,
                "taps": st.taps.stats() if st.taps is not None else None}


def for_dynamic_sidecar(sidecar: Sidecar, identity: DynamicIdentity, health: AppHealth | None,
                        *, bound: Mapping[str, str], labels: Mapping[str, str],
                        addresses: Sequence[str], report_interval_s: float = 5.0,
                        max_backoff_s: float = 5.0) -> DiscoveryClient:
    """A client wired to a started dynamic sidecar: the static clusters are those it started
    with, swaps go to ``sidecar.apply_snapshot``, reports come from its outbound stats, health
    changes of ``health`` are sent at once. ``bound`` is what ``Sidecar.start`` returned."""
    state = DiscoveryState(sidecar.snapshot, sidecar.boot.trust_domain,
                           current=lambda: sidecar.snapshot, apply=sidecar.apply_snapshot,
                           renew=identity.renew_now, taps=sidecar.taps)
    registration = Registration(identity.instance_id, inbound=bound.get("inbound", ""),
                                outbound=bound.get("outbound", ""), admin=bound.get("admin", ""),
                                labels=dict(labels))
    client = DiscoveryClient(
        state, registration, addresses=addresses, channel=mtls_channels(identity),
        take_report=sidecar.take_report,
        health=(lambda: health.status) if health is not None else (lambda: ""),
        cert_not_after_unix=lambda: identity.cert_not_after_unix,
        first_health=health.first_check if health is not None else None,
        report_interval_s=report_interval_s, max_backoff_s=max_backoff_s,
        resilience=sidecar.resilience_report, trust=lambda: identity.trust)
    identity.on_renewed.append(client.report_now)
    if health is not None:
        health.on_change = client.notify_health
    sidecar.on_drain.append(client.draining)
    return client
