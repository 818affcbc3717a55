"""The control plane's gRPC server (grpc.aio): the CA behind its listeners.

* the **bootstrap** listener (plaintext) serves only ``mesh.v1.Bootstrap/Join``: a sidecar
  sends a token id, its CSR and a join proof, and gets a certificate and the trust bundle
  (public data it checks against the token's pin);
* the **API** listener requires a client certificate chained to the mesh CA (``callers``
  reads the caller's SPIFFE ID from it) and serves ``mesh.v1.Identity`` (workloads renew
  their own identity), ``mesh.v1.Discovery`` (``discovery_service``: one long-lived stream
  per sidecar; workload identities only) and ``mesh.v1.Admin`` (``admin_service``: admin
  identities only; tokens, certificates, sidecars, config, authorization, traces and taps,
  audit, revocation). Every RPC of this listener passes the ``control_plane.audit.ApiGate``
  interceptor first: a revoked client certificate is refused everything, a non-admin every
  Admin RPC, and the actions that change the mesh are written to the audit log with their
  caller and result;
* the **OTLP** listener (``otlp``), behind the same mTLS: the embedded trace receiver
  (``opentelemetry.proto.collector.trace.v1.TraceService/Export``); joins name it in
  ``JoinResponse.otlp_endpoint``.

The join proof (``mesh_common.jointoken``) is HMAC-SHA256 of the CSR keyed by the SHA-256 of the
token's secret, which is what the store keeps (never the secret, never the token string).
Tokens and secrets are never logged; token ids are. The answer to a join carries, in its
trailing metadata, a MAC of the whole answer with that same key (``jointoken.answer_mac``), so a
sidecar can tell the control plane's answer from one forged on the plaintext listener's path.

Hostile peers (each refusal a clear status, counted; everyone else keeps being served):

* a join or renewal refused (unknown, wrong, expired or used-up token, a malformed CSR or one
  for another identity, a non-workload renewing) is counted in
  ``mesh_cp_identity_refusals_total{rpc,reason}`` and issues nothing;
* a discovery stream whose peer stops reading is ended, and counted
  (``discovery_service``, ``ControlPlane.end_stalled``);
* connections: TLS handshake and HTTP/2 preface within ``handshake_timeout_s``
  (``grpc.server_handshake_timeout_ms``), bounded streams per connection, idle connections
  closed, keepalive pings enforced (``api_server_options``, ``bootstrap_server_options``); the
  join listener takes small messages only and a bounded number of joins at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, NoReturn

import grpc
from prometheus_client import Counter

from control_plane import otlp
from control_plane.admin_service import AdminServicer
from control_plane.audit import ApiGate
from control_plane.ca import CertificateAuthority, CsrError, Issued
from control_plane.callers import abort as _abort
from control_plane.callers import caller_of
from control_plane.callers import one_line as _one_line
from control_plane.config_store import ConfigState, ConfigStore
from control_plane.discovery import DiscoverySettings, Publisher, Session, SessionHub
from control_plane.discovery_service import DiscoveryServicer
from control_plane.http_admin import AdminHttpServer
from control_plane.leader import Forwarder, LeaderMetrics, Leadership, SoleLeader, replica_of
from control_plane.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from control_plane.metrics import ControlPlaneMetrics, LiveState, live_state_of
from control_plane.registry import Instance, Registry
from control_plane.registry.embedded import EmbeddedRegistry
from control_plane.revocation import Revocations
from control_plane.rotation import RotationManager, ServingCredentials
from control_plane.state import WATCH_AUTHZ, WATCH_CONFIG, WATCH_REVOKED, StateStore
from control_plane.store import AuditRow, Store, UseResult
from control_plane.tap import Tap as TapSession
from control_plane.tap import TapHub
from control_plane.telemetry import Telemetry
from control_plane.traces import TraceStore
from mesh_common.jointoken import ANSWER_MAC_METADATA, answer_mac, check_join_proof
from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from control_plane.discovery_service import _Write

log = logging.getLogger("mesh.control_plane")

SERVER_CERT_TTL = dt.timedelta(days=365)
MAX_CSR_BYTES = 16 * 1024
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # snapshots (up to MAX_SNAPSHOT_BYTES) and answers
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0  # TLS handshake and HTTP/2 preface of a new connection
DEFAULT_STREAM_STALL_TIMEOUT_S = 60.0  # a discovery message waiting this long ends its stream
MAX_STREAMS_PER_CONNECTION = 64  # API: a sidecar needs 2-3 (discovery, renew, OTLP elsewhere)
API_IDLE_CONNECTION_MS = 5 * 60_000  # API connections without a call this long: GOAWAY
MAX_JOIN_MESSAGE_BYTES = 64 * 1024  # a JoinRequest: a CSR (at most MAX_CSR_BYTES) and ids
MAX_CONCURRENT_JOINS = 256    # joins in progress at once; more: RESOURCE_EXHAUSTED
JOIN_STREAMS_PER_CONNECTION = 8
JOIN_IDLE_CONNECTION_MS = 60_000
_KEEPALIVE_OPTIONS = [
    # ping to find dead peers (one that stops reading its socket too), and accept clients'
    # keepalive pings as often as every 5 s (the default would GOAWAY a client pinging more
    # than every 5 min); a client pinging more often is GOAWAYed after 2 strikes
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 2),
]


def api_server_options(handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S
                       ) -> list[tuple[str, int]]:
    """grpc core options of the API listener (mTLS): messages up to ``MAX_MESSAGE_BYTES``,
    a new connection's TLS handshake and HTTP/2 preface within ``handshake_timeout_s``
    (seconds; else it is closed), at most ``MAX_STREAMS_PER_CONNECTION`` streams per
    connection, connections without a call for ``API_IDLE_CONNECTION_MS`` closed (GOAWAY),
    keepalive both ways."""
    return [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.server_handshake_timeout_ms", max(1, int(handshake_timeout_s * 1000))),
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
            ("grpc.max_connection_idle_ms", API_IDLE_CONNECTION_MS),
            *_KEEPALIVE_OPTIONS]


def bootstrap_server_options(handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S
                             ) -> list[tuple[str, int]]:
    """grpc core options of the join listener (plaintext, one unary RPC): requests up to
    ``MAX_JOIN_MESSAGE_BYTES``, the HTTP/2 preface within ``handshake_timeout_s``, a few
    streams per connection, connections without a call for ``JOIN_IDLE_CONNECTION_MS``
    closed, keepalive both ways."""
    return [("grpc.max_receive_message_length", MAX_JOIN_MESSAGE_BYTES),
            ("grpc.server_handshake_timeout_ms", max(1, int(handshake_timeout_s * 1000))),
            ("grpc.max_concurrent_streams", JOIN_STREAMS_PER_CONNECTION),
            ("grpc.max_connection_idle_ms", JOIN_IDLE_CONNECTION_MS),
            *_KEEPALIVE_OPTIONS]


API_SERVER_OPTIONS = api_server_options()
"""The API listener's options with the default handshake timeout."""


IDENTITY_REFUSALS = {
    "join": ("unknown_token", "bad_proof", "token_expired", "token_used_up",
             "instance_revoked", "invalid_csr", "wrong_identity"),
    "renew": ("not_a_workload", "invalid_csr", "wrong_identity"),
}
"""The reasons ``mesh_cp_identity_refusals_total`` counts, by RPC."""
STREAM_TERMINATIONS = ("stalled",)
"""The reasons ``mesh_cp_discovery_streams_terminated_total`` counts."""


class Refusals:
    """Counters of what the RPCs refuse to hostile or broken peers, on the control plane's
    metrics registry (served at ``/metrics`` with the others):

    * ``mesh_cp_identity_refusals_total{rpc,reason}``: joins and renewals refused
      (``IDENTITY_REFUSALS``);
    * ``mesh_cp_discovery_streams_terminated_total{reason}``: discovery streams the control
      plane ended for their peer's behaviour (``STREAM_TERMINATIONS``).

    Every known label set exists from the start (at 0). Counting is a dict lookup and an add."""

    def __init__(self, metrics: ControlPlaneMetrics) -> None:
        identity = Counter("mesh_cp_identity_refusals",
                           "Joins and certificate renewals refused, by RPC and reason.",
                           labelnames=["rpc", "reason"], registry=metrics.registry)
        self._identity = {(rpc, reason): identity.labels(rpc=rpc, reason=reason)
                          for rpc, reasons in IDENTITY_REFUSALS.items() for reason in reasons}
        terminated = Counter("mesh_cp_discovery_streams_terminated",
                             "Discovery streams the control plane ended for their peer's "
                             "behaviour, by reason (stalled: it stopped reading).",
                             labelnames=["reason"], registry=metrics.registry)
        self._terminated = {r: terminated.labels(reason=r) for r in STREAM_TERMINATIONS}

    def identity(self, rpc: str, reason: str) -> None:
        """A join or renewal (``rpc``) refused for ``reason`` (ValueError if not known)."""
        child = self._identity.get((rpc, reason))
        if child is None:
            raise ValueError(f"unknown identity refusal {rpc}/{reason}")
        child.inc()

    def stream_terminated(self, reason: str) -> None:
        """A discovery stream ended for ``reason`` (ValueError if not known)."""
        child = self._terminated.get(reason)
        if child is None:
            raise ValueError(f"unknown stream termination reason {reason!r}")
        child.inc()


def make_registry(spec: str, store: Store, grace_period_s: float, now: float, *,
                  consul_prefix: str = "mesh") -> Registry:
    """The registry ``--registry`` names: ``embedded`` (loaded from ``store``) or
    ``consul://HOST:PORT`` / ``consuls://HOST:PORT`` (``control_plane.registry.consul``: token
    and TLS from the environment, this replica's id kept next to the store). Raises
    ValueError for a bad spec. Blocking I/O: call it before serving."""
    if spec == "embedded":
        return EmbeddedRegistry.load(store, grace_period_s, now)
    from control_plane.registry.consul import ConsulRegistry, load_replica_id
    return ConsulRegistry.from_url(spec, grace_period_s, prefix=consul_prefix,
                                   replica_id=load_replica_id(store.path.parent))


class ControlPlane:
    """The state and the RPC logic shared by the services: the CA and store, the registry,
    the snapshot publisher, the sidecars' sessions and their reported telemetry.

    ``store`` is the ``StateStore`` (tokens, certificates, revocations, audit, versions,
    authz default, config): the SQLite ``Store``, or ``kvstore.ConsulStore`` shared with other
    replicas. ``registry`` defaults to the embedded one loaded from ``store`` (which must then
    be the SQLite ``Store``; blocking I/O: build the control plane before serving).
    ``start``/``stop`` run the background tasks (publisher, registry persistence, pruning).
    The config objects are loaded from ``store`` too; changes to them hold ``config_lock``
    from validation to publish.

    Shared state: between ``start`` and ``stop`` the store's ``watch`` reports what another
    replica may have changed (config, authz default, revocations); ``reload_shared_state``
    then reads it again, swaps it in and publishes (a no-op for SQLite, which has no watch)."""

    def __init__(self, ca: CertificateAuthority, store: StateStore, cert_ttl: dt.timedelta,
                 clock: Callable[[], float] = time.time,
                 settings: DiscoverySettings | None = None,
                 registry: Registry | None = None,
                 traces: TraceStore | None = None,
                 rotation: RotationManager | None = None,
                 stream_stall_timeout_s: float = DEFAULT_STREAM_STALL_TIMEOUT_S) -> None:
        # The CAs and a CA rotation between them (``control_plane.rotation``); ``ca`` is the
        # phase's signer. Without ``rotation``, ``ca`` alone (a rotation lives in memory).
        self.rotation = rotation if rotation is not None else RotationManager.in_memory(ca)
        self.store = store
        self.cert_ttl = cert_ttl
        self.clock = clock
        self.join_address = ""
        self.api_address = ""
        self.settings = settings or DiscoverySettings()
        if registry is None and not isinstance(store, Store):
            raise ValueError("the embedded registry needs the SQLite store: pass a registry")
        self.registry = registry if registry is not None else EmbeddedRegistry.load(
            store, self.settings.grace_period_s, clock())  # type: ignore[arg-type]
        self.config = ConfigState(ConfigStore(store))
        for problem in self.config.load():
            log.error("a stored config object no longer validates and is left out: %s", problem)
        self.config_lock = asyncio.Lock()
        # The mesh-wide authorization default (allow/deny), durable in the store's meta
        # table; changed under config_lock by Admin.SetAuthzDefault.
        self.authz_default = store.authz_default()
        # Revoked certificates: their serials go into every snapshot's deny-list, and the
        # instances whose latest certificate is revoked leave the snapshot
        # (``control_plane.revocation``); changed by Admin.RevokeCertificate.
        self.revocations = Revocations.load(store)
        self.publisher = Publisher(self.registry, store, self.settings.push_window_s,
                                   ca.trust_domain, config=self.config.objects,
                                   authz_default=lambda: self.authz_default,
                                   revoked=lambda: self.revocations.deny_list(self.clock()),
                                   excluded=self.revocations.barred)
        self.hub = SessionHub()
        self.publisher.subscribe(self.hub.broadcast)
        self.rotation.attach(self.hub.sessions)
        self.telemetry = Telemetry(self.settings.report_window_s)
        self.metrics = ControlPlaneMetrics(self.live_state)
        self.traces = traces          # the embedded OTLP receiver's store (None = no receiver)
        self.otlp_address = ""        # HOST:PORT of the OTLP receiver ("" = none), for joins
        self.taps = TapHub()
        self._prune_task: asyncio.Task[None] | None = None
        self.refusals = Refusals(self.metrics)
        # Which replica signs (``control_plane.leader``): this one alone by default; with
        # several replicas on Consul, main sets a ``ConsulLeadership`` before serving and the
        # followers forward joins and renewals to the leader.
        self.leadership: Leadership = SoleLeader()
        self.leader_metrics = LeaderMetrics(self.metrics.registry,
                                            lambda: self.leadership.is_leader())
        self.forwarder = Forwarder(lambda: self.leadership, lambda: self.ca, self.now,
                                   self.leader_metrics)
        # Discovery writes in progress, by session: a peer that stops reading leaves one here
        # until ``stream_stall_timeout_s`` (seconds) ends its stream (``_stall_loop``).
        self.stream_stall_timeout_s = stream_stall_timeout_s
        self.writes: dict[Session, _Write] = {}
        self._stall_task: asyncio.Task[None] | None = None
        # What other replicas changed in the shared store (``reload_shared_state``).
        self._stop_watch: Callable[[], None] | None = None
        self._stale_topics: set[str] = set()
        self._reload_task: asyncio.Task[None] | None = None

    def live_state(self) -> LiveState:
        """What the metrics' gauges read at scrape time (``control_plane.metrics``)."""
        latest = self.publisher.latest
        return live_state_of(self.hub.sessions(), self.registry.instances(),
                             latest.version if latest else "", self.publisher.publishes,
                             self.clock(), self.settings.stale_after_s)

    def topology(self) -> pb.TopologyResponse:
        """The topology now: services with instances and golden signals, edges with their
        open breakers (``Telemetry.topology``); what ``Admin.Topology`` answers."""
        topo = self.telemetry.topology(self.registry.instances(), self.clock())
        return pb.TopologyResponse(
            services=[pb.TopologyService(
                name=s.name, instances=[pb.TopologyInstance(
                    instance=i.instance, address=i.address, healthy=i.healthy)
                    for i in s.instances],
                rps=s.rps, success_rate=s.success_rate, p50_ms=s.p50_ms, p99_ms=s.p99_ms,
                requests=s.requests) for s in topo.services],
            edges=[pb.TopologyEdge(source=e.source, destination=e.destination, rps=e.rps,
                                   success_rate=e.success_rate, p50_ms=e.p50_ms,
                                   p99_ms=e.p99_ms, requests=e.requests,
                                   open_breakers=e.open_breakers) for e in topo.edges],
            window_s=topo.window_s)

    @property
    def ca(self) -> CertificateAuthority:
        """The CA that signs now, handing out the trust bundle of the rotation's phase."""
        return self.rotation.trust.signer

    async def start(self) -> None:
        """Start the registry's persistence, publish the first snapshot, start pruning and
        the CA rotation's loop (a rotation under way continues)."""
        await self.registry.start()
        await self.publisher.start()
        if self._prune_task is None:
            self._prune_task = asyncio.create_task(self._prune_loop(), name="registry-prune")
        if self._stall_task is None:
            self._stall_task = asyncio.create_task(self._stall_loop(), name="discovery-stalls")
        if self._stop_watch is None:
            loop = asyncio.get_running_loop()
            self._stop_watch = self.store.watch(
                lambda topic: loop.call_soon_threadsafe(self._shared_state_changed, topic))
        await self.rotation.start()

    async def stop(self) -> None:
        """Close every stream, stop the background tasks, save the registry. Idempotent."""
        self.hub.close_all("the control plane is stopping")
        if self._stop_watch is not None:
            self._stop_watch()
            self._stop_watch = None
        for name in ("_prune_task", "_stall_task", "_reload_task"):
            task = getattr(self, name)
            setattr(self, name, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.rotation.stop()
        await self.publisher.stop()
        await self.registry.close()
        if self.traces is not None:
            self.traces.close()

    def prune(self, now: float) -> list[Instance]:
        """Remove the instances whose grace period is over, with their sessions and reports."""
        removed = self.registry.prune(now)
        for inst in removed:
            self.hub.forget(inst.key)
            self.telemetry.forget(inst.key)
            log.info("removed %s instance %s from the registry: stream down for more than %ss",
                     inst.service, inst.instance_id, self.settings.grace_period_s)
        return removed

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.prune_interval_s)
            try:
                self.prune(self.clock())
            except Exception:
                log.exception("pruning the registry failed")

    def end_stalled(self, now: float) -> list[Session]:
        """End every discovery stream whose current message has waited more than
        ``stream_stall_timeout_s`` for grpc to write it (``now``: ``time.monotonic()``): its
        session closes (RESOURCE_EXHAUSTED, the reason saying why), its handler is cancelled
        (which disconnects its instance, as when a stream drops) and it is counted. grpc.aio
        cannot reset the HTTP/2 stream itself, so the stream's few bytes in grpc core go with
        the peer's connection (the keepalive ends it if the peer stops reading its socket).
        Returns the sessions ended."""
        ended: list[Session] = []
        for session, write in list(self.writes.items()):
            waited = now - write.since
            if waited <= self.stream_stall_timeout_s:
                continue
            del self.writes[session]
            inst = session.instance
            reason = (f"not reading its discovery stream: a message waited {waited:.1f} s to "
                      f"be written (limit {self.stream_stall_timeout_s:g} s)")
            log.warning("%s instance %s: %s; ending its stream", inst.service,
                        inst.instance_id, reason)
            session.close(reason, "RESOURCE_EXHAUSTED")
            self.refusals.stream_terminated("stalled")
            write.task.cancel()
            ended.append(session)
        return ended

    async def _stall_loop(self) -> None:
        interval = min(1.0, max(0.05, self.stream_stall_timeout_s / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                self.end_stalled(time.monotonic())
            except Exception:
                log.exception("looking for stalled discovery streams failed")

    def gate(self) -> ApiGate:
        """The API listener's interceptor (``control_plane.audit``): refuses revoked
        certificates everything and non-admins the Admin service, and writes the audit log."""
        td = self.ca.trust_domain

        def identify(context: grpc.aio.ServicerContext) -> tuple[str, str]:
            caller = caller_of(context, td)
            return caller.kind, caller.uri

        async def record(row: AuditRow) -> None:
            await asyncio.to_thread(self.store.add_audit, row)
            log.info("audit: %s %s %s: %s", row.identity, row.action, row.object, row.result)

        return ApiGate(identify, self.revocations.is_revoked, record, self.clock)

    async def revoke(self, serials: list[str], identity: str) -> tuple[list[str], str]:
        """Revoke the issued certificates ``serials`` (by ``identity``): stored, taken into
        the in-memory revocations, published in the deny-list of a new snapshot at once, and
        the streams of the instances it bars closed. Returns the serials revoked now (those
        already revoked are left out) and the version of the snapshot that carries them.
        Raises what publishing raises (the revocation is stored all the same)."""
        now = self.clock()
        done = await asyncio.to_thread(self.store.revoke, serials, now, identity)
        if done:
            rows = await asyncio.to_thread(self.store.list_revoked)
            barred = await asyncio.to_thread(self.store.barred_instances)
            fresh = set(done)
            self.revocations.add([r for r in rows if r.serial in fresh], barred)
        published = await self.publisher.publish_now()
        self._close_barred()
        return done, published.version

    def _close_barred(self) -> None:
        """Close the discovery streams of the barred instances (revoked certificates)."""
        for key in self.revocations.barred():
            session = self.hub.get(key)
            if session is not None and session.connected:
                session.close("its certificate is revoked", "PERMISSION_DENIED")
                log.warning("%s instance %s: certificate revoked, its stream is closed", *key)

    def _shared_state_changed(self, topic: str) -> None:
        """The store's watch says ``topic`` may have changed (on the event loop): reload it
        soon, coalescing what comes meanwhile into one more reload."""
        self._stale_topics.add(topic)
        if self._reload_task is None or self._reload_task.done():
            self._reload_task = asyncio.create_task(self._reload_loop(), name="shared-state")

    async def _reload_loop(self) -> None:
        failures = 0
        while self._stale_topics:
            topics, self._stale_topics = set(self._stale_topics), set()
            try:
                await self.reload_shared_state(topics)
                failures = 0
            except Exception:
                failures += 1
                if failures == 1:  # once per outage; the last state stays meanwhile
                    log.exception("reloading the shared state (%s) failed; retrying",
                                  ", ".join(sorted(topics)))
                self._stale_topics |= topics
                await asyncio.sleep(min(30.0, 2.0 ** min(failures, 5)))

    async def reload_shared_state(self, topics: AbstractSet[str]) -> None:
        """Read again what another replica may have changed in the store (``topics``:
        ``state.WATCH_TOPICS`` values): the config objects and the authorization default
        (under ``config_lock``), the revocations (added; their instances' streams closed);
        then publish (a new version only when the content changed). Blocking reads run in
        threads. Raises the store's errors (then what was read so far is kept)."""
        async with self.config_lock:
            if WATCH_CONFIG in topics:
                loaded = await asyncio.to_thread(self.config.fetch)
                for problem in self.config.install(loaded):
                    log.error("a stored config object no longer validates and is left out: %s",
                              problem)
            if WATCH_AUTHZ in topics:
                self.authz_default = await asyncio.to_thread(self.store.authz_default)
            if WATCH_REVOKED in topics:
                rows = await asyncio.to_thread(self.store.list_revoked)
                barred = await asyncio.to_thread(self.store.barred_instances)
                self.revocations.add(rows, barred)
            await self.publisher.publish_now()
        if WATCH_REVOKED in topics:
            self._close_barred()

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    def start_taps(self, session: Session, taps: Sequence[TapSession] | None = None) -> int:
        """Send ``session`` the TapStart of every running tap that wants it (or of ``taps``
        only); returns how many were sent."""
        inst = session.instance
        messages = self.taps.start(inst.key, bool(inst.outbound), self.clock(), taps)
        return sum(session.send(m) for m in messages)

    async def refuse(self, context: grpc.aio.ServicerContext, rpc: str, reason: str,
                     code: grpc.StatusCode, message: str) -> NoReturn:
        """Count a refused join or renewal (``Refusals.identity``) and abort the RPC with
        ``code`` and ``message`` (made one line)."""
        self.refusals.identity(rpc, reason)
        await _abort(context, code, _one_line(message))

    async def sign(self, context: grpc.aio.ServicerContext, csr: bytes, service: str,
                   rpc: str = "renew") -> Issued:
        """The certificate for ``csr`` as ``service``; a refused CSR aborts the RPC
        (INVALID_ARGUMENT, or PERMISSION_DENIED for another identity) and is counted for
        ``rpc`` (join or renew). Issues nothing when it refuses."""
        if len(csr) > MAX_CSR_BYTES:
            await self.refuse(context, rpc, "invalid_csr", grpc.StatusCode.INVALID_ARGUMENT,
                              f"CSR is larger than {MAX_CSR_BYTES} bytes ({len(csr)})")
        try:
            return self.ca.sign_workload_csr(csr, service, self.now(), self.cert_ttl)
        except CsrError as exc:
            code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INVALID_ARGUMENT)
            reason = "wrong_identity" if code == grpc.StatusCode.PERMISSION_DENIED \
                else "invalid_csr"
            await self.refuse(context, rpc, reason, code, exc.message)


class BootstrapServicer(pb_grpc.BootstrapServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext
                   ) -> pb.JoinResponse:
        """A certificate for the token's service and the trust bundle, for a CSR proven with
        the token's secret; the answer's MAC (``jointoken.answer_mac``) goes in the trailing
        metadata ``ANSWER_MAC_METADATA``. Refusals (each counted, nothing issued, a use of
        the token spent only by a join that succeeds): UNAUTHENTICATED for an unknown token,
        a proof that does not match, an expired or used-up token; PERMISSION_DENIED for a
        revoked instance or a CSR for another identity; INVALID_ARGUMENT for a malformed
        CSR. A follower (``control_plane.leader``) relays the join unchanged to the leader
        and passes its answer back as it is."""
        cp = self.cp
        if not cp.leadership.is_leader():
            return await cp.forwarder.join(request, context)
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        tok = await asyncio.to_thread(cp.store.get_token, request.token_id) \
            if len(request.token_id) <= 64 else None
        if tok is None:
            await cp.refuse(context, "join", "unknown_token", unauthenticated,
                            "unknown join token")
        # The proof first: who does not hold the secret learns nothing about the token's state.
        if not check_join_proof(tok.secret_digest, request.csr, request.proof):
            log.warning("join refused: proof does not match (token %s)", tok.token_id)
            await cp.refuse(context, "join", "bad_proof", unauthenticated,
                            "join proof does not match")
        if cp.clock() >= tok.expires_at:
            await cp.refuse(context, "join", "token_expired", unauthenticated,
                            "join token expired")
        if cp.revocations.is_barred(tok.service, request.instance_id or "-"):
            log.warning("join refused: %s instance %s was revoked (token %s)", tok.service,
                        request.instance_id, tok.token_id)
            await cp.refuse(context, "join", "instance_revoked",
                            grpc.StatusCode.PERMISSION_DENIED,
                            f"{tok.service} instance {request.instance_id} was revoked: it may "
                            "not join again under that instance id")
        issued = await cp.sign(context, request.csr, tok.service, "join")
        result, _ = await asyncio.to_thread(cp.store.use_token, tok.token_id, cp.clock())
        if result is not UseResult.OK:
            msg, reason = {UseResult.UNKNOWN: ("unknown join token", "unknown_token"),
                           UseResult.EXPIRED: ("join token expired", "token_expired"),
                           UseResult.USED_UP: ("join token used up", "token_used_up")}[result]
            log.warning("join refused: %s (token %s)", msg, tok.token_id)
            await cp.refuse(context, "join", reason, unauthenticated, msg)
        instance = request.instance_id or "-"
        await asyncio.to_thread(cp.store.record_certificate, format(issued.serial, "x"),
                                tok.service, instance, issued.spiffe_id,
                                issued.not_after.timestamp(), cp.clock(), tok.token_id)
        cp.metrics.certificate_issued("join")
        log.info("joined %s instance %s (token %s, serial %x)", issued.spiffe_id, instance,
                 tok.token_id, issued.serial)
        response = pb.JoinResponse(certificate_pem=issued.pem.decode(),
                                   trust_bundle_pem=cp.ca.bundle_pem.decode(),
                                   spiffe_id=issued.spiffe_id, otlp_endpoint=cp.otlp_address)
        context.set_trailing_metadata(((ANSWER_MAC_METADATA, answer_mac(
            tok.secret_digest, request.csr, response.certificate_pem, response.trust_bundle_pem,
            response.spiffe_id, response.otlp_endpoint)),))
        return response


class IdentityServicer(pb_grpc.IdentityServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def Renew(self, request: pb.RenewRequest, context: grpc.aio.ServicerContext
                    ) -> pb.RenewResponse:
        """A new certificate for the caller's own workload identity. A follower
        (``control_plane.leader``) authenticates the caller here and has the leader sign."""
        cp = self.cp
        caller = caller_of(context, cp.ca.trust_domain)
        if caller.kind != "service":
            await cp.refuse(context, "renew", "not_a_workload", grpc.StatusCode.PERMISSION_DENIED,
                            f"{caller.uri} is not a workload identity and cannot renew")
        if not cp.leadership.is_leader():
            return await cp.forwarder.renew(request, caller.name, context)
        issued = await _renewal(cp, context, request.csr, caller.name, request.instance_id)
        return pb.RenewResponse(certificate_pem=issued.pem.decode(),
                                trust_bundle_pem=cp.ca.bundle_pem.decode(),
                                spiffe_id=issued.spiffe_id)


async def _renewal(cp: ControlPlane, context: grpc.aio.ServicerContext, csr: bytes,
                   service: str, instance_id: str) -> Issued:
    """Sign a renewal of ``service`` (its caller already authenticated), record and count
    it. A refused CSR aborts the RPC (``ControlPlane.sign``)."""
    issued = await cp.sign(context, csr, service, "renew")
    instance = instance_id or "-"
    await asyncio.to_thread(cp.store.record_certificate, format(issued.serial, "x"),
                            service, instance, issued.spiffe_id,
                            issued.not_after.timestamp(), cp.clock(), None)
    cp.metrics.certificate_issued("renew")
    log.info("renewed %s instance %s (serial %x)", issued.spiffe_id, instance, issued.serial)
    return issued


class ReplicaServicer(pb_grpc.ReplicaServicer):
    """``mesh.v1.Replica`` (``control_plane.leader``): the leader signs the renewals its
    followers authenticated. Only replica identities (``spiffe://<td>/control-plane/<id>``)
    may call (else PERMISSION_DENIED); a replica that does not lead answers UNAVAILABLE (the
    follower passes it on: the sidecar retries)."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def Sign(self, request: pb.SignRequest, context: grpc.aio.ServicerContext
                   ) -> pb.SignResponse:
        cp = self.cp
        caller = caller_of(context, cp.ca.trust_domain)
        replica = replica_of(caller.uri, cp.ca.trust_domain)
        if replica is None:
            log.warning("denied Replica.Sign to %s (control-plane replicas only)", caller.uri)
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"{caller.uri} may not call Replica.Sign (control-plane replicas only)")
        if not cp.leadership.is_leader():
            await _abort(context, grpc.StatusCode.UNAVAILABLE,
                         f"replica {cp.leadership.replica_id or '-'} is not the leader "
                         "(any more): try again")
        issued = await _renewal(cp, context, request.csr, request.service, request.instance_id)
        log.info("signed it for replica %s", replica)
        return pb.SignResponse(certificate_pem=issued.pem.decode(),
                               trust_bundle_pem=cp.ca.bundle_pem.decode(),
                               spiffe_id=issued.spiffe_id)


# ---------------------------------------------------------------------- listeners
def split_hostport(addr: str) -> tuple[str, int]:
    """'127.0.0.1:15010' -> ('127.0.0.1', 15010); '[::1]:0' -> ('::1', 0). Raises ValueError."""
    host, sep, port = addr.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not a HOST:PORT address: {addr!r}")
    return host, int(port)


def join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def server_sans(host: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """DNS and IP SANs of the serving certificate for a listen host."""
    dns = ["localhost"]
    ips = ["127.0.0.1", "::1"]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        dns.append(host)
    else:
        if not ip.is_unspecified and str(ip) not in ips:
            ips.append(str(ip))
        if ip.is_unspecified:
            dns.append(socket.gethostname())
    return tuple(dict.fromkeys(dns)), tuple(ips)


def _bind(add: Callable[[], int]) -> int:
    """grpcio either returns 0 or raises RuntimeError when it cannot bind: 0 either way."""
    try:
        return add()
    except RuntimeError:
        return 0


class Server:
    """The listeners; ``start`` binds them (port 0 = any free port). ``admin_http``
    (HOST:PORT, None = none) is the admin HTTP port (``http_admin``: metrics, dashboard);
    with ``admin_http_optional`` an address that cannot be bound is logged and left out
    instead of failing the start. ``otlp_listen`` (with ``cp.traces``; None = none) is the
    embedded OTLP receiver's listener (``otlp``), behind the API's mTLS; with
    ``otlp_optional`` the same leniency (the control plane then runs without it and joins
    get no ``otlp_endpoint``). ``handshake_timeout_s``: a new connection to the API or join
    listener must finish its TLS handshake (API) and send its HTTP/2 preface within it, else
    grpc closes it (``api_server_options``, ``bootstrap_server_options``).
    ``advertise_host`` (None = each listener's own host): the host name or address other
    hosts reach this control plane at; the addresses in tokens, join answers and the leader
    election use it, and the serving certificate names it. ``start`` also starts
    ``cp.leadership`` (and waits briefly for a first view of who leads); ``stop`` hands the
    lead over first."""

    def __init__(self, cp: ControlPlane, listen: str, bootstrap_listen: str, *,
                 admin_http: str | None = None, admin_http_optional: bool = False,
                 otlp_listen: str | None = None, otlp_optional: bool = False,
                 handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
                 advertise_host: str | None = None) -> None:
        self.cp = cp
        self.advertise_host = advertise_host or None
        self.handshake_timeout_s = handshake_timeout_s
        self.listen = listen
        self.bootstrap_listen = bootstrap_listen
        self.admin_http = admin_http
        self.admin_http_optional = admin_http_optional
        self._api: grpc.aio.Server | None = None
        self._boot: grpc.aio.Server | None = None
        self._http: AdminHttpServer | None = None
        self.otlp_listen = otlp_listen
        self.otlp_optional = otlp_optional
        self.otlp_receiver: otlp.TraceReceiver | None = None  # its counters, for metrics
        self._otlp: grpc.aio.Server | None = None

    async def start(self) -> dict[str, str]:
        cp = self.cp
        host, port = split_hostport(self.listen)
        bhost, bport = split_hostport(self.bootstrap_listen)

        boot = grpc.aio.server(options=bootstrap_server_options(self.handshake_timeout_s),
                               maximum_concurrent_rpcs=MAX_CONCURRENT_JOINS)
        pb_grpc.add_BootstrapServicer_to_server(BootstrapServicer(cp), boot)
        bound_b = _bind(lambda: boot.add_insecure_port(join_hostport(bhost, bport)))
        if bound_b == 0:
            raise OSError(f"cannot listen on {self.bootstrap_listen}")

        dns, ips = server_sans(host)
        for other in (split_hostport(self.otlp_listen)[0] if self.otlp_listen else None,
                      self.advertise_host):  # one serving certificate for every mTLS name
            if other:
                odns, oips = server_sans(other)
                dns, ips = tuple(dict.fromkeys(dns + odns)), tuple(dict.fromkeys(ips + oips))
        # The serving certificate and the client roots follow a CA rotation's phases without
        # a restart (new handshakes get the new ones, open connections keep theirs).
        serving = ServingCredentials(cp.rotation.trust,
                                     f"spiffe://{cp.ca.trust_domain}/control-plane", dns, ips,
                                     cp.now, SERVER_CERT_TTL)
        cp.rotation.listeners.append(serving.update)
        creds = serving.credentials()
        api = grpc.aio.server(options=api_server_options(self.handshake_timeout_s),
                              interceptors=[cp.gate()])
        pb_grpc.add_IdentityServicer_to_server(IdentityServicer(cp), api)
        pb_grpc.add_DiscoveryServicer_to_server(DiscoveryServicer(cp), api)
        pb_grpc.add_AdminServicer_to_server(AdminServicer(cp), api)
        pb_grpc.add_ReplicaServicer_to_server(ReplicaServicer(cp), api)
        bound_a = _bind(lambda: api.add_secure_port(join_hostport(host, port), creds))
        if bound_a == 0:
            raise OSError(f"cannot listen on {self.listen}")
        otlp_server = self._otlp_server(serving.credentials())

        admin_http = await self._start_admin_http()
        cp.join_address = join_hostport(self.advertise_host or bhost, bound_b)
        cp.api_address = join_hostport(self.advertise_host or host, bound_a)
        await cp.start()  # the first snapshot exists before the first stream
        await cp.leadership.start(cp.join_address, cp.api_address)
        await boot.start()
        await api.start()
        if otlp_server is not None:
            await otlp_server.start()
        self._boot, self._api, self._otlp = boot, api, otlp_server
        return {"listen": cp.api_address, "bootstrap": cp.join_address,
                "ca_key_sha256": cp.ca.key_sha256, "admin_http": admin_http,
                "otlp": cp.otlp_address}

    def _otlp_server(self, creds: grpc.ServerCredentials) -> grpc.aio.Server | None:
        """The OTLP receiver's server, bound (not started), with ``cp.otlp_address`` set;
        None when there is none (not asked for, no trace store, or optional and not
        bindable). Raises OSError when it cannot bind."""
        cp = self.cp
        if not self.otlp_listen or cp.traces is None:
            return None
        host, port = split_hostport(self.otlp_listen)
        td = cp.ca.trust_domain

        def identity(context: grpc.aio.ServicerContext) -> tuple[str, str]:
            caller = caller_of(context, td)
            return caller.kind, caller.uri

        receiver = otlp.TraceReceiver(cp.traces, identity, cp.clock)
        server = grpc.aio.server(options=otlp.OTLP_SERVER_OPTIONS,
                                 interceptors=[cp.gate()])  # revoked certificates: refused
        otlp.add_to_server(receiver, server)
        bound = _bind(lambda: server.add_secure_port(join_hostport(host, port), creds))
        if bound == 0:
            if not self.otlp_optional:
                raise OSError(f"cannot listen on {self.otlp_listen} (OTLP receiver)")
            log.warning("no OTLP receiver: cannot listen on %s; give --otlp-listen HOST:PORT "
                        "(port 0 = any free port)", self.otlp_listen)
            return None
        cp.otlp_address = join_hostport(self.advertise_host or host, bound)
        self.otlp_receiver = receiver
        return server

    async def _start_admin_http(self) -> str:
        """Serve the admin HTTP port; its bound HOST:PORT, or "" when there is none (not
        asked for, or optional and not bindable). Raises OSError when it cannot bind."""
        if self.admin_http is None:
            return ""
        host, port = split_hostport(self.admin_http)
        http = AdminHttpServer(self.cp.metrics.exposition, METRICS_CONTENT_TYPE,
                               self.cp.topology)
        try:
            address = await http.start(host, port)
        except OSError as exc:
            if not self.admin_http_optional:
                raise OSError(f"cannot listen on {self.admin_http} (admin HTTP): "
                              f"{exc.strerror or exc}") from None
            log.warning("no admin HTTP port: cannot listen on %s (%s); give --admin-http "
                        "HOST:PORT (port 0 = any free port)", self.admin_http,
                        exc.strerror or exc)
            return ""
        self._http = http
        return address

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stop accepting, end every discovery stream, let unary calls finish for ``grace_s``,
        then stop the control plane's background tasks. The lead (several replicas) is
        handed over first, so another replica signs while this one drains."""
        await self.cp.leadership.stop()
        if self._http is not None:
            await self._http.stop()
        stopping = asyncio.gather(*(s.stop(grace_s) for s in (self._api, self._boot, self._otlp)
                                    if s))
        await asyncio.sleep(0)  # the servers stop accepting first
        self.cp.hub.close_all("the control plane is stopping")
        self.cp.taps.end_all()  # Admin.Tap streams end now, not at the end of the grace
        await stopping
        await self.cp.forwarder.close()
        await self.cp.stop()
