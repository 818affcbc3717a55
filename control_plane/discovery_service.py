"""``mesh.v1.Discovery``: the sidecars' discovery streams, on the API listener (mTLS;
``server``).

One long-lived stream per sidecar: registration, snapshots (``control_plane.discovery``) and
ACK/NACK, live state (reports, health), queries and commands, taps. Workload identities only
(anyone else: PERMISSION_DENIED), and the service registered is always the certificate's
(``instance_from_register``); the first message must be a valid Register, sent within
``REGISTER_TIMEOUT_S`` (else INVALID_ARGUMENT). Reports are taken bounded in size
(``report_from_pb``). A stream the control plane closes ends with its session's status:
ABORTED when a newer stream of the same instance replaces it, PERMISSION_DENIED when its
certificate is revoked, RESOURCE_EXHAUSTED when it stalled (below), UNAVAILABLE when the
control plane stops or the instance leaves the registry.

Hostile peers (each refusal a clear status, counted; everyone else keeps being served): a
discovery stream whose peer stops reading (a message waits longer than
``stream_stall_timeout_s`` for its flow-control window) is ended (``ControlPlane.end_stalled``,
fed by ``ControlPlane.writes``): its session closes (the instance is disconnected, as when its
stream drops), its handler is cancelled and it is counted in
``mesh_cp_discovery_streams_terminated_total{reason="stalled"}``. Until then at most one
snapshot, the newest, waits for it (``Session.push_snapshot``). A sidecar that reads but never
ACKs is reported STALE (``ListSidecars``, ``mesh_cp_stale_sidecars``) once its version has
waited ``stale_after_s``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from control_plane.callers import Caller, caller_of
from control_plane.callers import abort as _abort
from control_plane.callers import one_line as _one_line
from control_plane.discovery import Session
from control_plane.registry import HEALTH_VALUES, Instance, normalize_health, sort_labels
from control_plane.telemetry import EndpointBreaker, Histogram, LimitUse, Report, UpstreamSample
from mesh_common.snapshot import SnapshotError, from_doc, parse_address
from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from control_plane.server import ControlPlane

log = logging.getLogger("mesh.control_plane")

REGISTER_TIMEOUT_S = 30.0     # a stream must send its Register within this
MAX_UPSTREAMS_PER_REPORT = 256
MAX_ENDPOINTS_PER_REPORT = 4096
MAX_LIMITS_PER_REPORT = 4 * MAX_UPSTREAMS_PER_REPORT
MAX_NAME_CHARS = 253          # names and addresses in reports are cut to this
MAX_HISTOGRAM_BOUNDS = 64


@dataclass
class _Write:
    """A discovery message handed to grpc and not written yet: since when (monotonic s),
    and the task writing it (the RPC's handler)."""

    since: float
    task: asyncio.Task[object]


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
