"""The control plane's gRPC server (grpc.aio): the CA behind its listeners.

* the **bootstrap** listener (plaintext) serves only ``mesh.v1.Bootstrap/Join``: a sidecar
  sends a token id, its CSR and a join proof, and gets a certificate and the trust bundle
  (public data it checks against the token's pin);
* the **API** listener requires a client certificate chained to the mesh CA and serves
  ``mesh.v1.Identity`` (workloads renew their own identity), ``mesh.v1.Discovery`` (one
  long-lived stream per sidecar: registration, snapshots and ACK/NACK, live state, queries and
  commands; workload identities only, and the service registered is always the certificate's)
  and ``mesh.v1.Admin`` (admin identities only: ``spiffe://<td>/admin/<name>``), which also
  serves the declarative config (apply, get, delete, diff; ``config_store``), authorization
  (``CheckAuthz`` decides a call as the sidecars would; ``SetAuthzDefault``/``GetAuthzDefault``:
  the mesh-wide default, kept in the store's meta table and published in every snapshot),
  the traces the OTLP receiver keeps (``ListTraces``, ``GetTrace``; ``traces``) and live
  taps (``Tap``; ``tap``: TapStart/TapStop go out on the sidecars' discovery streams,
  TapEvents come back), the audit log (``ListAudit``) and certificate revocation
  (``RevokeCertificate``; ``control_plane.revocation``). Every RPC of this listener passes
  the ``control_plane.audit.ApiGate`` interceptor first: a revoked client certificate is
  refused everything, a non-admin every Admin RPC, and the actions that change the mesh
  are written to the audit log with their caller and result;
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
* a discovery stream whose peer stops reading (a message waits longer than
  ``stream_stall_timeout_s`` for its flow-control window) is ended: its session closes (the
  instance is disconnected, as when its stream drops), its handler is cancelled and it is
  counted in ``mesh_cp_discovery_streams_terminated_total{reason="stalled"}``. Until then at
  most one snapshot, the newest, waits for it (``Session.push_snapshot``). A sidecar that reads
  but never ACKs is reported STALE (``ListSidecars``, ``mesh_cp_stale_sidecars``) once its
  version has waited ``stale_after_s``;
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
import json
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import NoReturn

import grpc
from cryptography import x509
from prometheus_client import Counter

from control_plane import otlp
from control_plane.audit import DEFAULT_LIST_LIMIT as DEFAULT_AUDIT_LIST_LIMIT
from control_plane.audit import MAX_LIST_LIMIT as MAX_AUDIT_LIST_LIMIT
from control_plane.audit import ApiGate
from control_plane.ca import CertificateAuthority, CsrError, Issued, parse_ca
from control_plane.config_store import ConfigNotFound, ConfigState, ConfigStore, Outcome
from control_plane.discovery import (
    STALE,
    DiscoverySettings,
    Publisher,
    QueryFailed,
    Session,
    SessionHub,
    build_snapshot,
    raw_published,
)
from control_plane.http_admin import AdminHttpServer
from control_plane.leader import Forwarder, LeaderMetrics, Leadership, SoleLeader, replica_of
from control_plane.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from control_plane.metrics import ControlPlaneMetrics, LiveState, live_state_of
from control_plane.registry import HEALTH_VALUES, Instance, Registry, normalize_health, sort_labels
from control_plane.registry.embedded import EmbeddedRegistry
from control_plane.revocation import Revocations, normalize_serial
from control_plane.rotation import RotationError, RotationManager, ServingCredentials
from control_plane.state import WATCH_AUTHZ, WATCH_CONFIG, WATCH_REVOKED, StateStore
from control_plane.store import AuditRow, Store, UseResult
from control_plane.tap import Tap as TapSession
from control_plane.tap import TapError, TapHub, tap_spec
from control_plane.telemetry import (
    EndpointBreaker,
    Histogram,
    LimitUse,
    Report,
    Telemetry,
    UpstreamSample,
)
from control_plane.traces import DEFAULT_LIST_LIMIT as DEFAULT_TRACE_LIST_LIMIT
from control_plane.traces import Span as StoredSpan
from control_plane.traces import TraceStore, normalize_trace_id
from control_plane.traces import TraceSummary as StoredSummary
from mesh_common.authz import DEFAULTS as AUTHZ_DEFAULTS
from mesh_common.authz import decide, decide_dry_run
from mesh_common.config import (
    UNCHANGED,
    ApplyPlan,
    ConfigError,
    ConfigObject,
    Document,
    compile_authz,
    describe,
    kind_of,
    to_doc,
    to_yaml,
)
from mesh_common.jointoken import (
    ANSWER_MAC_METADATA,
    answer_mac,
    check_join_proof,
    new_token,
    secret_digest,
)
from mesh_common.snapshot import MAX_SNAPSHOT_BYTES, SnapshotError, from_doc, parse_address
from mesh_common.spiffe import SpiffeError, SpiffeId
from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc

log = logging.getLogger("mesh.control_plane")

DEFAULT_TOKEN_TTL_S = 3600
MAX_TOKEN_TTL_S = 365 * 24 * 3600
SERVER_CERT_TTL = dt.timedelta(days=365)
MAX_CSR_BYTES = 16 * 1024
REGISTER_TIMEOUT_S = 30.0     # a stream must send its Register within this
QUERY_TIMEOUT_S = 5.0         # how long an admin RPC waits for a sidecar's answer
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # snapshots (up to MAX_SNAPSHOT_BYTES) and answers
MAX_REASON_CHARS = 1024       # NACK reasons and query errors are cut to this
MAX_UPSTREAMS_PER_REPORT = 256
MAX_ENDPOINTS_PER_REPORT = 4096
MAX_LIMITS_PER_REPORT = 4 * MAX_UPSTREAMS_PER_REPORT
MAX_NAME_CHARS = 253          # names and addresses in reports are cut to this
MAX_HISTOGRAM_BOUNDS = 64
MAX_CONFIG_DOCUMENTS = 1000   # per apply or diff
MAX_CONFIG_DOCUMENT_BYTES = 1024 * 1024
MAX_CONFIG_SOURCE_CHARS = 1024
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


@dataclass(frozen=True)
class Caller:
    """Who is calling over mTLS: the URI SAN of the client certificate, and what kind it is."""

    uri: str
    kind: str  # "service", "admin" or "" (anything else)
    name: str


def caller_of(context: grpc.aio.ServicerContext, trust_domain: str) -> Caller:
    """The caller's SPIFFE identity from its (verified) client certificate."""
    auth = context.auth_context()
    uris: list[str] = []
    for pem in auth.get("x509_pem_cert", []):
        try:
            cert = x509.load_pem_x509_certificate(pem)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, x509.ExtensionNotFound):
            continue
        uris += san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        return Caller("<no single SPIFFE ID>", "", "")
    uri = uris[0]
    prefix = f"spiffe://{trust_domain}/"
    if uri.startswith(prefix):
        parts = uri[len(prefix):].split("/")
        if len(parts) == 2 and parts[0] in ("service", "admin"):
            try:
                SpiffeId(trust_domain, parts[1])
            except SpiffeError:
                return Caller(uri, "", "")
            return Caller(uri, parts[0], parts[1])
    return Caller(uri, "", "")


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, msg: str) -> NoReturn:
    await context.abort(code, msg)
    raise AssertionError("unreachable")  # abort raises


def _unix(t: dt.datetime) -> int:
    return int(t.timestamp())


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


@dataclass
class _Write:
    """A discovery message handed to grpc and not written yet: since when (monotonic s),
    and the task writing it (the RPC's handler)."""

    since: float
    task: asyncio.Task[object]


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


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def _require_admin(self, context: grpc.aio.ServicerContext, rpc: str) -> Caller:
        caller = caller_of(context, self.cp.ca.trust_domain)
        if caller.kind != "admin":
            log.warning("denied Admin.%s to %s", rpc, caller.uri)
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"{caller.uri} may not call Admin.{rpc} (admin identities only)")
        return caller

    async def CreateToken(self, request: pb.CreateTokenRequest,
                          context: grpc.aio.ServicerContext) -> pb.CreateTokenResponse:
        caller = await self._require_admin(context, "CreateToken")
        cp = self.cp
        try:
            SpiffeId(cp.ca.trust_domain, request.service)
        except SpiffeError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not 0 <= request.ttl_s <= MAX_TOKEN_TTL_S:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"ttl_s must be between 1 and {MAX_TOKEN_TTL_S} (0 = default)")
        if request.uses < 0:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         "uses must be positive (0 = unlimited until expiry)")
        ttl = request.ttl_s or DEFAULT_TOKEN_TTL_S
        uses = request.uses or None
        token = new_token(cp.ca.key_sha256, cp.join_address, cp.api_address)
        now = cp.clock()
        row = await asyncio.to_thread(cp.store.add_token, token.token_id, request.service,
                                      secret_digest(token.secret), now + ttl, uses, now)
        log.info("%s created join token %s for service %s (ttl %ss, uses %s)", caller.uri,
                 row.token_id, row.service, ttl, uses if uses is not None else "unlimited")
        return pb.CreateTokenResponse(token_id=row.token_id, service=row.service,
                                      expires_at_unix=int(row.expires_at),
                                      uses_left=-1 if uses is None else uses,
                                      token=token.encode())

    async def ListTokens(self, request: pb.ListTokensRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListTokensResponse:
        await self._require_admin(context, "ListTokens")
        rows = await asyncio.to_thread(self.cp.store.list_tokens)
        return pb.ListTokensResponse(tokens=[
            pb.TokenInfo(token_id=r.token_id, service=r.service, expires_at_unix=int(r.expires_at),
                         uses_left=-1 if r.uses_left is None else r.uses_left,
                         created_at_unix=int(r.created_at))
            for r in rows])

    async def DeleteToken(self, request: pb.DeleteTokenRequest,
                          context: grpc.aio.ServicerContext) -> pb.DeleteTokenResponse:
        caller = await self._require_admin(context, "DeleteToken")
        if not await asyncio.to_thread(self.cp.store.delete_token, request.token_id):
            await _abort(context, grpc.StatusCode.NOT_FOUND,
                         f"no join token with id {request.token_id!r}")
        log.info("%s deleted join token %s", caller.uri, request.token_id)
        return pb.DeleteTokenResponse()

    async def ListCertificates(self, request: pb.ListCertificatesRequest,
                               context: grpc.aio.ServicerContext) -> pb.ListCertificatesResponse:
        await self._require_admin(context, "ListCertificates")
        rows = await asyncio.to_thread(self.cp.store.list_certificates)
        return pb.ListCertificatesResponse(certificates=[
            pb.CertificateInfo(service=r.service, instance_id=r.instance_id, serial=r.serial,
                               spiffe_id=r.spiffe_id, not_after_unix=int(r.not_after),
                               issued_at_unix=int(r.issued_at))
            for r in rows])

    # ------------------------------------------------------------------ sidecars
    async def ListSidecars(self, request: pb.ListSidecarsRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListSidecarsResponse:
        await self._require_admin(context, "ListSidecars")
        cp = self.cp
        now = cp.clock()
        out: list[pb.SidecarStatus] = []
        for inst in cp.registry.instances():
            s = cp.hub.get(inst.key)
            status = pb.SidecarStatus(
                service=inst.service, instance=inst.instance_id, inbound=inst.inbound,
                outbound=inst.outbound, admin=inst.admin, labels=dict(inst.labels),
                health=inst.health, connected=inst.connected, spiffe_id=inst.spiffe_id,
                state=STALE,
                last_seen_unix=inst.disconnected_at or inst.registered_at)
            if s is not None:
                status.sent_version = s.sent_version
                status.acked_version = s.acked_version
                status.state = s.state(now, cp.settings.stale_after_s) if inst.connected \
                    else STALE
                status.nack_version = s.nack_version
                status.nack_reason = s.nack_reason
                status.nack_at_unix = int(s.nack_at or 0)
                status.cert_not_after_unix = int(s.cert_not_after)
                status.last_seen_unix = s.last_seen
            out.append(status)
        latest = cp.publisher.latest
        leader = cp.leadership.leader()
        return pb.ListSidecarsResponse(sidecars=out,
                                       latest_version=latest.version if latest else "",
                                       replica=cp.leadership.replica_id,
                                       leader=leader.replica if leader else "")

    async def Topology(self, request: pb.TopologyRequest,
                       context: grpc.aio.ServicerContext) -> pb.TopologyResponse:
        await self._require_admin(context, "Topology")
        return self.cp.topology()

    async def ListBreakers(self, request: pb.ListBreakersRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListBreakersResponse:
        await self._require_admin(context, "ListBreakers")
        b = self.cp.telemetry.breakers(self.cp.clock(), request.service)
        return pb.ListBreakersResponse(
            endpoints=[pb.BreakerEndpoint(
                instance=r.instance, service=r.service, upstream=r.endpoint.upstream,
                endpoint=r.endpoint.address, endpoint_instance=r.endpoint.instance,
                state=r.endpoint.state, consecutive_errors=r.endpoint.consecutive_errors,
                ejections=r.endpoint.ejections, half_open_in_s=r.endpoint.half_open_in_s,
                reported_at_unix=r.reported_at,
                last_transition_unix=r.endpoint.last_transition_unix) for r in b.endpoints],
            limits=[pb.BreakerLimit(
                instance=r.instance, service=r.service, upstream=r.limit.upstream,
                limit=r.limit.limit, in_use=r.limit.in_use, max=r.limit.max,
                reported_at_unix=r.reported_at, fast_fails=r.limit.fast_fails)
                for r in b.limits])

    async def _connected_session(self, context: grpc.aio.ServicerContext,
                                 name: str) -> Session:
        """The connected session named by ``name``: an instance id, ``service/instance``, or
        a service with exactly one instance. Aborts NOT_FOUND, FAILED_PRECONDITION (several
        match: the message lists them) or UNAVAILABLE (not connected)."""
        cp = self.cp
        if not name:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         "name an instance (or a service with one instance)")
        instances = cp.registry.instances()
        matches = [i for i in instances if i.instance_id == name]
        if not matches and "/" in name:
            service, _, iid = name.partition("/")
            matches = [i for i in instances if i.service == service and i.instance_id == iid]
        if not matches:
            matches = [i for i in instances if i.service == name]
            if len(matches) > 1:
                await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                             f"service {name} has {len(matches)} instances, name one: "
                             + ", ".join(i.instance_id for i in matches))
        if not matches:
            await _abort(context, grpc.StatusCode.NOT_FOUND,
                         f"no sidecar with instance id or service {name!r}")
        if len(matches) > 1:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"{len(matches)} sidecars have instance id {name}, name one as "
                         "SERVICE/INSTANCE: "
                         + ", ".join(f"{i.service}/{i.instance_id}" for i in matches))
        inst = matches[0]
        session = cp.hub.get(inst.key)
        if session is None or not session.connected:
            await _abort(context, grpc.StatusCode.UNAVAILABLE,
                         f"{inst.service} instance {inst.instance_id} is not connected")
        return session

    async def GetSidecarConfig(self, request: pb.GetSidecarConfigRequest,
                               context: grpc.aio.ServicerContext) -> pb.GetSidecarConfigResponse:
        await self._require_admin(context, "GetSidecarConfig")
        session = await self._connected_session(context, request.instance)
        inst = session.instance
        try:
            qid, fut = session.query("config")
        except QueryFailed as exc:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))
        try:
            answer = await asyncio.wait_for(fut, QUERY_TIMEOUT_S)
        except TimeoutError:
            await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                         f"{inst.service} instance {inst.instance_id} did not answer within "
                         f"{QUERY_TIMEOUT_S:g} s")
        except QueryFailed as exc:
            await _abort(context, grpc.StatusCode.UNAVAILABLE,
                         f"{inst.service} instance {inst.instance_id}: {exc}")
        finally:
            session.forget_query(qid)
        if answer.error:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"{inst.service} instance {inst.instance_id} answered: "
                         f"{_one_line(answer.error)}")
        version = ""
        try:
            doc = json.loads(answer.json)
        except (ValueError, RecursionError):  # a sidecar's answer is data, not trusted
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("version"), str):
            version = doc["version"]
        return pb.GetSidecarConfigResponse(service=inst.service, instance=inst.instance_id,
                                           version=version, json=answer.json)

    async def RenewCertificates(self, request: pb.RenewCertificatesRequest,
                                context: grpc.aio.ServicerContext
                                ) -> pb.RenewCertificatesResponse:
        caller = await self._require_admin(context, "RenewCertificates")
        told: list[str] = []
        for s in self.cp.hub.connected():
            if request.service and s.instance.service != request.service:
                continue
            if s.send(pb.ControlMessage(renew=pb.RenewCertificate())):
                told.append(s.instance.instance_id)
        log.info("%s asked %d sidecar(s)%s to renew their certificates", caller.uri, len(told),
                 f" of {request.service}" if request.service else "")
        return pb.RenewCertificatesResponse(instances=told)

    # ------------------------------------------------------------------ CA rotation
    async def RotateCA(self, request: pb.RotateCARequest,
                       context: grpc.aio.ServicerContext) -> pb.RotateCAResponse:
        """Start a CA rotation (``control_plane.rotation``) to the CA given (PEM certificate,
        maybe with its chain, and key) or to a new root made here; it then proceeds by itself.
        INVALID_ARGUMENT for a CA that is not usable (one line saying why),
        FAILED_PRECONDITION while a rotation runs."""
        caller = await self._require_admin(context, "RotateCA")
        cp = self.cp
        if bool(request.ca_cert_pem) != bool(request.ca_key_pem):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         "ca_cert_pem and ca_key_pem go together (neither: a new root)")
        new = None
        if request.ca_cert_pem:
            try:
                new = parse_ca(request.ca_cert_pem.encode(), request.ca_key_pem.encode(),
                               cp.ca.trust_domain, cp.now())
            except ValueError as exc:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, _one_line(str(exc)))
        try:
            state = cp.rotation.begin(new)
        except RotationError as exc:
            await _abort(context, getattr(grpc.StatusCode, exc.code), exc.message)
        except OSError as exc:
            log.error("could not write the new CA to the CA dir: %s", exc)
            await _abort(context, grpc.StatusCode.INTERNAL,
                         f"could not write the new CA to the CA dir: {exc.strerror or exc}")
        log.info("%s started CA rotation %s (%s)", caller.uri, state.rotation_id,
                 "to the CA given" if new is not None else "to a new root")
        return pb.RotateCAResponse(rotation_id=state.rotation_id, phase=state.phase)

    async def GetCAStatus(self, request: pb.GetCAStatusRequest,
                          context: grpc.aio.ServicerContext) -> pb.GetCAStatusResponse:
        await self._require_admin(context, "GetCAStatus")
        return self.cp.rotation.status()

    # ------------------------------------------------------------------ revocation and audit
    async def RevokeCertificate(self, request: pb.RevokeCertificateRequest,
                                context: grpc.aio.ServicerContext
                                ) -> pb.RevokeCertificateResponse:
        """Revoke one certificate (``serial``) or every unexpired one of an instance
        (``instance``: an id, or ``SERVICE/ID``): never renewed again, in every snapshot's
        deny-list at once (``ControlPlane.revoke``). INVALID_ARGUMENT unless exactly one is
        given or for a malformed serial; NOT_FOUND for a serial this control plane never
        issued or an instance without an unexpired certificate; ALREADY_EXISTS when all of
        them are already revoked."""
        caller = await self._require_admin(context, "RevokeCertificate")
        cp = self.cp
        if bool(request.serial) == bool(request.instance):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         "give either a serial or an instance")
        if request.serial:
            try:
                serial = normalize_serial(request.serial)
            except ValueError as exc:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            cert = await asyncio.to_thread(cp.store.get_certificate, serial)
            if cert is None:
                await _abort(context, grpc.StatusCode.NOT_FOUND,
                             f"this control plane issued no certificate with serial {serial}")
            serials = [serial]
        else:
            service, _, iid = request.instance.rpartition("/")
            certs = await asyncio.to_thread(cp.store.certificates_of_instance, iid,
                                            cp.clock(), service or None)
            if not certs:
                await _abort(context, grpc.StatusCode.NOT_FOUND,
                             f"no unexpired certificate was issued to instance "
                             f"{request.instance!r}")
            services = sorted({c.service for c in certs})
            if len(services) > 1:
                await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                             f"instance id {iid} is used by several services, name one as "
                             "SERVICE/INSTANCE: " + ", ".join(f"{s}/{iid}" for s in services))
            serials = [c.serial for c in certs]
        try:
            done, version = await cp.revoke(serials, caller.uri)
        except Exception as exc:
            log.exception("revocation stored, but its snapshot could not be published")
            await _abort(context, grpc.StatusCode.INTERNAL, "revoked, but the snapshot could "
                         f"not be published: {_one_line(str(exc))}")
        if not done:
            await _abort(context, grpc.StatusCode.ALREADY_EXISTS,
                         "already revoked: " + ", ".join(f"serial {s}" for s in serials))
        log.warning("%s revoked certificate(s) %s; deny-list in snapshot version %s",
                    caller.uri, ", ".join(done), version)
        return pb.RevokeCertificateResponse(serials=done, version=version)

    async def ListAudit(self, request: pb.ListAuditRequest,
                        context: grpc.aio.ServicerContext) -> pb.ListAuditResponse:
        """The newest ``limit`` audit entries (0 = 100, at most 10000), of ``action`` only
        when given, newest first."""
        await self._require_admin(context, "ListAudit")
        if not 0 <= request.limit <= MAX_AUDIT_LIST_LIMIT:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"limit: 0 (= {DEFAULT_AUDIT_LIST_LIMIT}) to {MAX_AUDIT_LIST_LIMIT}")
        rows = await asyncio.to_thread(self.cp.store.list_audit,
                                       request.limit or DEFAULT_AUDIT_LIST_LIMIT,
                                       request.action)
        return pb.ListAuditResponse(entries=[
            pb.AuditEntry(time_unix=r.time, identity=r.identity, action=r.action,
                          object=r.object, result=r.result) for r in rows])

    # ------------------------------------------------------------------ declarative config
    async def _documents(self, context: grpc.aio.ServicerContext,
                         docs: Sequence[pb.ConfigDocument]) -> list[Document]:
        """The request's documents, parsed from JSON; aborts INVALID_ARGUMENT (one line naming
        the document) when there are none, too many, or one is too large or not JSON."""
        if not docs:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "no documents")
        if len(docs) > MAX_CONFIG_DOCUMENTS:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"{len(docs)} documents: at most {MAX_CONFIG_DOCUMENTS} at once")
        out: list[Document] = []
        for d in docs:
            source = _one_line(d.source)[:MAX_CONFIG_SOURCE_CHARS]
            where = describe(source, max(0, d.index))
            if len(d.json) > MAX_CONFIG_DOCUMENT_BYTES:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                             f"{where}: larger than {MAX_CONFIG_DOCUMENT_BYTES} bytes")
            try:
                body = json.loads(d.json)
            except ValueError as exc:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                             f"{where}: not valid JSON: {_one_line(str(exc))}")
            except RecursionError:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                             f"{where}: not valid JSON: nested too deep")
            out.append(Document(source, max(0, d.index), body))
        return out

    async def _plan(self, context: grpc.aio.ServicerContext, documents: list[Document]) -> ApplyPlan:
        """The plan of an apply of ``documents`` over the stored set, checked to compile;
        aborts INVALID_ARGUMENT with the one-line error. Call under ``config_lock``."""
        try:
            plan = self.cp.config.plan(documents)
            self._check_compiles(plan.objects)
        except ConfigError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, _one_line(str(exc)))
        return plan

    def _check_compiles(self, objects: Sequence[ConfigObject]) -> None:
        """Raise ``ConfigError`` unless the snapshot ``objects`` make with the registry's
        instances passes the checks every sidecar will make (never expected to: the objects
        are valid; this keeps a bug from storing config that cannot be published)."""
        cp = self.cp
        doc = build_snapshot(cp.registry.instances(), "0", objects,
                             authz_default=cp.authz_default).to_doc()
        if len(json.dumps(doc, separators=(",", ":"))) > MAX_SNAPSHOT_BYTES:
            raise ConfigError(f"the snapshot would be larger than {MAX_SNAPSHOT_BYTES} bytes")
        try:
            from_doc(doc, cp.ca.trust_domain)
        except SnapshotError as exc:
            raise ConfigError(f"the snapshot it makes does not validate: {exc}") from None

    async def _publish_config(self, context: grpc.aio.ServicerContext) -> str:
        """Publish the snapshot after a stored config change; its version. Aborts INTERNAL
        when it cannot be built (the change is stored; the previous snapshot stays)."""
        try:
            return (await self.cp.publisher.publish_now(force=True)).version
        except Exception as exc:
            log.exception("config stored, but its snapshot could not be published")
            await _abort(context, grpc.StatusCode.INTERNAL,
                         f"stored, but the snapshot could not be published: {_one_line(str(exc))}")

    def _latest_version(self) -> str:
        latest = self.cp.publisher.latest
        return latest.version if latest else ""

    async def ApplyConfig(self, request: pb.ApplyConfigRequest,
                          context: grpc.aio.ServicerContext) -> pb.ApplyConfigResponse:
        caller = await self._require_admin(context, "ApplyConfig")
        try:
            response = await self._apply_config(caller, request, context)
        except Exception:
            if not request.dry_run:
                self.cp.metrics.config_applied(False)
            raise
        if not request.dry_run:
            self.cp.metrics.config_applied(True)
        return response

    async def _apply_config(self, caller: Caller, request: pb.ApplyConfigRequest,
                            context: grpc.aio.ServicerContext) -> pb.ApplyConfigResponse:
        cp = self.cp
        documents = await self._documents(context, request.documents)
        async with cp.config_lock:
            plan = await self._plan(context, documents)
            if request.dry_run or all(c.action == UNCHANGED for c in plan.changes):
                outcomes = cp.config.outcomes(plan)
                version = self._latest_version()
            else:
                outcomes = await asyncio.to_thread(cp.config.apply, plan, cp.clock())
                version = await self._publish_config(context)
        if not request.dry_run:
            for o in outcomes:
                if o.action != UNCHANGED:
                    log.info("%s %s %s %s (revision %d)", caller.uri, o.action, o.kind, o.name,
                             o.revision)
        return pb.ApplyConfigResponse(results=[_result(o) for o in outcomes], version=version)

    async def _kind(self, context: grpc.aio.ServicerContext, text: str) -> str:
        try:
            return kind_of(text)
        except ConfigError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def GetConfig(self, request: pb.GetConfigRequest,
                        context: grpc.aio.ServicerContext) -> pb.GetConfigResponse:
        await self._require_admin(context, "GetConfig")
        cp = self.cp
        kind = await self._kind(context, request.kind) if request.kind else None
        if request.name and kind is None:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "a name needs a kind")
        if request.revision < 0:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         "revision: 0 (the current one) or a revision number")
        if request.revision:
            if kind is None or not request.name:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                             "a revision needs a kind and a name")
            try:
                rev = await asyncio.to_thread(cp.config.revision, kind, request.name,
                                              request.revision)
            except ConfigNotFound as exc:
                await _abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
            return pb.GetConfigResponse(objects=[pb.StoredConfig(
                kind=rev.kind, name=rev.name, revision=rev.revision,
                applied_at_unix=rev.applied_at, json=json.dumps(rev.doc()),
                deleted=rev.deleted)])
        if request.name:
            assert kind is not None
            held = cp.config.get(kind, request.name)
            if held is None:
                await _abort(context, grpc.StatusCode.NOT_FOUND,
                             f"no {kind} named {request.name!r}")
            current = [held]
        else:
            current = cp.config.current(kind)
        return pb.GetConfigResponse(objects=[pb.StoredConfig(
            kind=c.obj.kind, name=c.obj.name, revision=c.revision,
            applied_at_unix=c.applied_at, json=json.dumps(to_doc(c.obj))) for c in current])

    async def DeleteConfig(self, request: pb.DeleteConfigRequest,
                           context: grpc.aio.ServicerContext) -> pb.DeleteConfigResponse:
        caller = await self._require_admin(context, "DeleteConfig")
        cp = self.cp
        kind = await self._kind(context, request.kind)
        async with cp.config_lock:
            try:
                outcome = await asyncio.to_thread(cp.config.delete, kind, request.name,
                                                  cp.clock())
            except ConfigNotFound as exc:
                await _abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
            version = await self._publish_config(context)
        log.info("%s deleted %s %s (revision %d)", caller.uri, kind, request.name,
                 outcome.revision)
        return pb.DeleteConfigResponse(result=_result(outcome), version=version)

    async def DiffConfig(self, request: pb.DiffConfigRequest,
                         context: grpc.aio.ServicerContext) -> pb.DiffConfigResponse:
        await self._require_admin(context, "DiffConfig")
        cp = self.cp
        documents = await self._documents(context, request.documents)
        async with cp.config_lock:
            plan = await self._plan(context, documents)
            diffs = []
            for c in plan.changes:
                held = cp.config.get(c.obj.kind, c.obj.name)
                diffs.append(pb.ConfigDiff(
                    kind=c.obj.kind, name=c.obj.name, action=c.action,
                    current_revision=held.revision if held else 0,
                    current_yaml=to_yaml(to_doc(c.previous)) if c.previous else "",
                    proposed_yaml=to_yaml(to_doc(c.obj))))
        return pb.DiffConfigResponse(diffs=diffs)

    async def TestPushRawSnapshot(self, request: pb.TestPushRawSnapshotRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> pb.TestPushRawSnapshotResponse:
        caller = await self._require_admin(context, "TestPushRawSnapshot")
        cp = self.cp
        if not cp.settings.test_hooks:
            await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "test hooks are off")
        if len(request.json.encode()) > MAX_SNAPSHOT_BYTES:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"json is larger than {MAX_SNAPSHOT_BYTES} bytes")
        session = await self._connected_session(context, request.instance)
        version = await cp.publisher.take_version()
        session.push_snapshot(raw_published(version, request.json))
        log.warning("TEST HOOK: %s pushed a raw, unvalidated snapshot as version %s to %s "
                    "instance %s", caller.uri, version, session.instance.service,
                    session.instance.instance_id)
        return pb.TestPushRawSnapshotResponse(version=version)

    # ------------------------------------------------------------------ authorization
    async def CheckAuthz(self, request: pb.CheckAuthzRequest,
                         context: grpc.aio.ServicerContext) -> pb.CheckAuthzResponse:
        """What the current policies and default decide for a call from ``source`` (a SPIFFE
        ID, or a bare service name meaning ``spiffe://<td>/service/<name>``) to ``method``
        (a gRPC path) of ``service``: exactly what that service's inbound sidecars decide
        once they hold the current snapshot (``mesh_common.authz.decide``), with the
        dry-run policies' verdict beside it. INVALID_ARGUMENT for a malformed request."""
        await self._require_admin(context, "CheckAuthz")
        cp = self.cp
        td = cp.ca.trust_domain
        source, service, method = request.source.strip(), request.service, request.method
        if not source.startswith("spiffe://"):
            try:
                source = SpiffeId(td, source).uri
            except SpiffeError:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                             f"source: a SPIFFE ID (spiffe://{td}/service/NAME) or a service "
                             f"name, got {request.source[:200]!r}")
        elif len(source) > 2048:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "source: too long")
        try:
            SpiffeId(td, service)
        except SpiffeError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"service: {exc}")
        if not method.startswith("/") or len(method) > 1024:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"method: a gRPC path /package.Service/Method, got "
                         f"{method[:200]!r}")
        authz = compile_authz(cp.config.objects(), cp.authz_default)
        d = decide(authz, service, source, method)
        dry = decide_dry_run(authz, service, source, method)
        return pb.CheckAuthzResponse(
            allowed=d.allowed, policy=d.policy, rule=d.rule, reason=d.reason,
            dry_run="" if dry is None else ("allow" if dry.allowed else "deny"),
            dry_run_reason="" if dry is None else dry.reason)

    async def GetAuthzDefault(self, request: pb.GetAuthzDefaultRequest,
                              context: grpc.aio.ServicerContext) -> pb.GetAuthzDefaultResponse:
        await self._require_admin(context, "GetAuthzDefault")
        return pb.GetAuthzDefaultResponse(action=self.cp.authz_default)

    async def SetAuthzDefault(self, request: pb.SetAuthzDefaultRequest,
                              context: grpc.aio.ServicerContext) -> pb.SetAuthzDefaultResponse:
        """Set the mesh-wide default (``allow``/``deny``, any case): stored, then published
        in a new snapshot (none when unchanged); answers the previous value and the version
        that carries it."""
        caller = await self._require_admin(context, "SetAuthzDefault")
        cp = self.cp
        action = request.action.strip().lower()
        if action not in AUTHZ_DEFAULTS:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"action: allow or deny, got {request.action[:100]!r}")
        async with cp.config_lock:
            previous = cp.authz_default
            if action == previous:
                return pb.SetAuthzDefaultResponse(previous=previous,
                                                  version=self._latest_version())
            await asyncio.to_thread(cp.store.set_authz_default, action)
            cp.authz_default = action
            version = await self._publish_config(context)
        log.info("%s set the mesh's authorization default to %s (was %s; snapshot %s)",
                 caller.uri, action, previous, version)
        return pb.SetAuthzDefaultResponse(previous=previous, version=version)

    # ------------------------------------------------------------------ traces and taps
    async def _trace_store(self, context: grpc.aio.ServicerContext) -> TraceStore:
        if self.cp.traces is None:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         "this control plane keeps no traces (it runs without an OTLP receiver)")
        return self.cp.traces

    async def ListTraces(self, request: pb.ListTracesRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListTracesResponse:
        await self._require_admin(context, "ListTraces")
        store = await self._trace_store(context)
        if request.limit < 0:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"limit: >= 0 (0 = {DEFAULT_TRACE_LIST_LIMIT})")
        rows = await asyncio.to_thread(store.list_traces, request.service, request.errors,
                                       request.limit or DEFAULT_TRACE_LIST_LIMIT,
                                       self.cp.clock())
        return pb.ListTracesResponse(traces=[_trace_summary(r) for r in rows])

    async def GetTrace(self, request: pb.GetTraceRequest,
                       context: grpc.aio.ServicerContext) -> pb.GetTraceResponse:
        await self._require_admin(context, "GetTrace")
        store = await self._trace_store(context)
        try:
            tid = normalize_trace_id(request.trace_id)
        except ValueError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"trace_id: {exc}")
        found = await asyncio.to_thread(store.get_trace, tid, self.cp.clock())
        if found is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND,
                         f"no trace {tid} is kept: never received (not sampled, not exported "
                         f"yet) or dropped by retention ({store.retention_s:g} s, "
                         f"{store.max_spans} spans)")
        summary, spans = found
        return pb.GetTraceResponse(summary=_trace_summary(summary),
                                   spans=[_span_info(x) for x in spans])

    async def Tap(self, request: pb.TapRequest,
                  context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TapEvent]:
        """Start a tap on the sidecars it wants (``control_plane.tap``), and on those that
        connect while it runs; stream the events they send until ``duration_s``, ``max_events``
        or the caller cancels; then send TapStop to every sidecar it was started on."""
        caller = await self._require_admin(context, "Tap")
        cp = self.cp
        try:
            spec = tap_spec(request.service, request.method, request.duration_s,
                            request.max_events)
        except TapError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        tap = cp.taps.open(spec, cp.clock())
        wake = asyncio.Event()
        tap.notify = wake.set
        asked = sum(cp.start_taps(s, [tap]) for s in cp.hub.connected())
        log.info("%s started tap %s on %s%s for %g s (%d sidecar(s) asked)", caller.uri, tap.id,
                 spec.service, f" {spec.method}" if spec.method else "", spec.duration_s, asked)
        try:
            while True:
                wake.clear()
                for event in tap.take():
                    yield event
                if tap.exhausted:
                    break
                remaining = tap.expires_at - cp.clock()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), remaining)
        finally:
            stopped = 0
            for key in cp.taps.close(tap):
                session = cp.hub.get(key)
                if session is not None and session.send(tap.stop_message()):
                    stopped += 1
            log.info("tap %s ended: %d event(s) streamed, %d dropped, TapStop sent to %d "
                     "sidecar(s)", tap.id, tap.accepted, tap.dropped, stopped)


def _result(o: Outcome) -> pb.ConfigResult:
    return pb.ConfigResult(kind=o.kind, name=o.name, action=o.action, revision=o.revision)


def _trace_summary(t: StoredSummary) -> pb.TraceSummary:
    return pb.TraceSummary(trace_id=t.trace_id, root_service=t.root_service, method=t.method,
                           duration_ms=t.duration_ms, status=t.status, spans=t.spans,
                           start_unix=t.start_unix, error=t.error)


def _span_info(x: StoredSpan) -> pb.SpanInfo:
    return pb.SpanInfo(
        trace_id=x.trace_id, span_id=x.span_id, parent_span_id=x.parent_span_id, name=x.name,
        service=x.service, kind=x.kind, start_unix_nano=x.start_unix_nano,
        end_unix_nano=x.end_unix_nano, status=x.status, error=x.error,
        attributes_json=json.dumps(dict(x.attributes), default=str),
        events=[pb.SpanEventInfo(time_unix_nano=e.time_unix_nano, name=e.name,
                                 attributes_json=json.dumps(dict(e.attributes), default=str))
                for e in x.events])


# ---------------------------------------------------------------------- discovery
def _check_address(value: str, field: str, required: bool = False) -> None:
    if not value and not required:
        return
    try:
        parse_address(value, field)
    except SnapshotError as exc:
        raise ValueError(str(exc)) from None


def instance_from_register(reg: pb.Register, caller: Caller, trust_domain: str,
                           now: float) -> Instance:
    """The instance a Register describes, for ``caller`` (its service and SPIFFE ID come from
    the certificate, never from the message); a health it does not know is taken as UNKNOWN.
    Raises ValueError naming the bad field."""
    iid = reg.instance_id
    if not iid or len(iid) > 253 or not iid.isprintable() or any(c.isspace() for c in iid):
        raise ValueError("instance_id: required, 1-253 printable characters without spaces")
    _check_address(reg.inbound, "inbound")
    _check_address(reg.outbound, "outbound")
    _check_address(reg.admin, "admin")
    labels = dict(reg.labels)
    try:  # the very checks every sidecar will make on the endpoint in its snapshot
        from_doc({"version": "0", "clusters": [{"name": caller.name, "endpoints": [
            {"address": reg.inbound or "127.0.0.1:1", "spiffe_id": caller.uri,
             "instance": iid, "labels": labels}]}]}, trust_domain)
    except SnapshotError as exc:
        raise ValueError(str(exc).replace("clusters[0].endpoints[0].", "", 1)) from None
    return Instance(caller.name, iid, caller.uri, reg.inbound, reg.outbound, reg.admin,
                    sort_labels(labels), normalize_health(reg.health), registered_at=now)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def report_from_pb(r: pb.StateReport, now: float) -> Report:
    """A StateReport as telemetry keeps it (received at ``now``); bounded in size. Endpoints
    without a breaker state (a sidecar without outlier detection) carry no breaker."""
    ups: list[UpstreamSample] = []
    for u in r.upstreams[:MAX_UPSTREAMS_PER_REPORT]:
        hist = None
        if u.HasField("latency") and len(u.latency.bounds_ms) <= MAX_HISTOGRAM_BOUNDS:
            hist = Histogram(tuple(u.latency.bounds_ms), tuple(u.latency.counts))
        ups.append(UpstreamSample(u.service, dict(u.by_code), hist))
    breakers = tuple(
        EndpointBreaker(e.service[:MAX_NAME_CHARS], e.address[:MAX_NAME_CHARS],
                        e.instance[:MAX_NAME_CHARS], e.breaker[:MAX_NAME_CHARS],
                        max(0, e.consecutive_errors), max(0, e.ejections),
                        max(0.0, _finite(e.half_open_in_s)),
                        max(0.0, _finite(e.last_transition_unix)))
        for e in r.endpoints[:MAX_ENDPOINTS_PER_REPORT] if e.breaker)
    limits = tuple(LimitUse(x.upstream[:MAX_NAME_CHARS], x.limit[:MAX_NAME_CHARS],
                            max(0, x.in_use), max(0, x.max), max(0, x.fast_fails))
                   for x in r.limits[:MAX_LIMITS_PER_REPORT])
    return Report(now, _finite(r.interval_s), tuple(ups), breakers, limits)


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_REASON_CHARS else line[:MAX_REASON_CHARS] + "..."


class DiscoveryServicer(pb_grpc.DiscoveryServicer):
    """One bidi stream per sidecar: a reader task consumes what the sidecar sends while the
    handler (an async generator) writes what its ``Session`` queues. Whichever way the stream
    ends (the sidecar goes, a newer stream replaces it, the control plane stops), the reader
    is cancelled and the instance marked disconnected exactly once."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def Stream(self, request_iterator: AsyncIterator[pb.SidecarMessage],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ControlMessage]:
        cp = self.cp
        caller = caller_of(context, cp.ca.trust_domain)
        if caller.kind != "service":
            log.warning("denied a discovery stream to %s", caller.uri)
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"{caller.uri} is not a workload identity and cannot open a discovery"
                         " stream")
        requests = aiter(request_iterator)
        try:
            first = await asyncio.wait_for(anext(requests), REGISTER_TIMEOUT_S)
        except StopAsyncIteration:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         "the first message must be Register (the stream ended)")
        except TimeoutError:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"the first message must be Register (none in {REGISTER_TIMEOUT_S:g} s)")
        if first.WhichOneof("msg") != "register":
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"the first message must be Register, got {first.WhichOneof('msg')}")
        reg = first.register
        now = cp.clock()
        try:
            instance = instance_from_register(reg, caller, cp.ca.trust_domain, now)
        except ValueError as exc:
            log.warning("refused the registration of %s: %s", caller.uri, exc)
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"Register.{exc}")
        stored = cp.registry.register(instance, now)
        session = Session(stored, now, cert_not_after=float(max(0, reg.cert_not_after_unix)),
                          acked_version=reg.version, acked_hash=reg.hash, clock=cp.clock,
                          observer=cp.metrics, accepts_zlib=reg.accepts_zlib_snapshot)
        session.set_trust(reg.cert_serial, reg.bundle_sha256, reg.issuer_sha256)
        replaced = cp.hub.open(session)
        cp.rotation.poke()  # a CA rotation under way tells it to renew when it is behind
        log.info("%s instance %s registered (inbound %s, health %s, runs version %s)%s",
                 stored.service, stored.instance_id, stored.inbound or "-",
                 stored.health or "-", reg.version or "-",
                 "; it replaces the instance's previous stream" if replaced else "")
        if cp.publisher.latest is not None:
            session.push_snapshot(cp.publisher.latest)
        cp.start_taps(session)  # the taps running now see its calls too

        reader = asyncio.create_task(self._read(session, requests),
                                     name=f"discovery-read {stored.service}/{stored.instance_id}")
        ended = False

        def finish(_: object = None) -> None:
            nonlocal ended
            if not reader.done():
                reader.cancel()
            if ended:
                return
            ended = True
            if cp.hub.close(session):
                cp.registry.disconnected(session.instance.service, session.instance.instance_id,
                                         cp.clock())
                log.info("%s instance %s: stream ended", session.instance.service,
                         session.instance.instance_id)

        context.add_done_callback(finish)  # the RPC ends however it ends: never leak the reader
        handler = asyncio.current_task()
        assert handler is not None
        try:
            async for message in session.outgoing():
                # While grpc writes it (the peer's flow-control window open), the message is
                # in ``cp.writes``; one that waits too long ends the stream (``end_stalled``).
                cp.writes[session] = _Write(time.monotonic(), handler)
                yield message
                cp.writes.pop(session, None)
        finally:
            cp.writes.pop(session, None)
            finish()
        if session.close_code:
            await _abort(context, getattr(grpc.StatusCode, session.close_code,
                                          grpc.StatusCode.UNAVAILABLE), session.close_reason)

    async def _read(self, session: Session, requests: AsyncIterator[pb.SidecarMessage]) -> None:
        try:
            async for msg in requests:
                try:
                    self._handle(session, msg)
                except Exception:
                    log.exception("could not handle a message of %s instance %s",
                                  session.instance.service, session.instance.instance_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the RPC failed under us: the handler ends too
            log.debug("reading the stream of %s/%s failed: %r", session.instance.service,
                      session.instance.instance_id, exc)
        finally:
            session.close("")  # the sidecar's side ended: end ours (no-op when closed)

    def _handle(self, session: Session, msg: pb.SidecarMessage) -> None:
        cp = self.cp
        now = cp.clock()
        inst = session.instance
        session.last_seen = now
        kind = msg.WhichOneof("msg")
        if kind == "ack":
            session.on_ack(msg.ack.version, msg.ack.hash, now)
            if msg.ack.version == session.sent_version and msg.ack.hash != session.sent_hash:
                log.warning("%s instance %s ACKed version %s with hash %s, sent %s",
                            inst.service, inst.instance_id, msg.ack.version, msg.ack.hash,
                            session.sent_hash)
        elif kind == "nack":
            reason = _one_line(msg.nack.reason)
            session.on_nack(msg.nack.version, reason, now)
            log.warning("%s instance %s NACKed snapshot version %s: %s", inst.service,
                        inst.instance_id, msg.nack.version, reason)
        elif kind == "report":
            r = msg.report
            cp.telemetry.add(inst.key, report_from_pb(r, now))
            cp.metrics.report_received()
            if r.cert_not_after_unix > 0:
                session.cert_not_after = float(r.cert_not_after_unix)
            if session.set_trust(r.cert_serial, r.bundle_sha256, r.issuer_sha256):
                cp.rotation.poke()  # a renewed identity: a CA rotation may move on
            if r.health:
                self._set_health(session, r.health, now)
        elif kind == "health":
            self._set_health(session, msg.health.health, now)
        elif kind == "answer":
            if not session.answer(msg.answer):
                log.debug("%s instance %s answered unknown or late query %r", inst.service,
                          inst.instance_id, msg.answer.id)
        elif kind == "tap":
            cp.taps.deliver(inst.key, msg.tap)
        elif kind == "register":
            log.warning("%s instance %s sent a second Register on its stream: ignored",
                        inst.service, inst.instance_id)

    def _set_health(self, session: Session, health: str, now: float) -> None:
        inst = session.instance
        if health not in HEALTH_VALUES:
            log.warning("%s instance %s reported an unknown health %r: taken as UNKNOWN",
                        inst.service, inst.instance_id, health[:64])
            health = normalize_health(health)
        if self.cp.hub.get(inst.key) is not session:
            return  # a replaced stream's late report
        if self.cp.registry.set_health(inst.service, inst.instance_id, health, now):
            log.info("%s instance %s: app health %s", inst.service, inst.instance_id,
                     health or "(no app)")


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
