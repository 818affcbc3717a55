"""``mesh.v1.Admin``: the control plane's admin API, on the API listener (mTLS; ``server``).

Admin identities only (``spiffe://<td>/admin/<name>``): any other caller is refused every RPC
(PERMISSION_DENIED), by the listener's ``control_plane.audit.ApiGate`` first and again here;
a revoked client certificate is refused everything, and the actions that change the mesh are
written to the audit log (``ApiGate``). It serves join tokens, issued certificates and the
sidecars' state (``ListSidecars``, ``Topology``, ``ListBreakers``, a sidecar's config asked
on its discovery stream, renewals), the CA rotation (``RotateCA``, ``GetCAStatus``;
``control_plane.rotation``), and also the declarative config (apply, get, delete, diff;
``config_store``), authorization (``CheckAuthz`` decides a call as the sidecars would;
``SetAuthzDefault``/``GetAuthzDefault``: the mesh-wide default, kept in the store's meta
table and published in every snapshot), the traces the OTLP receiver keeps (``ListTraces``,
``GetTrace``; ``traces``) and live taps (``Tap``; ``tap``: TapStart/TapStop go out on the
sidecars' discovery streams, TapEvents come back), the audit log (``ListAudit``) and
certificate revocation (``RevokeCertificate``; ``control_plane.revocation``). A malformed
request is refused with INVALID_ARGUMENT and one line saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import grpc

from control_plane.audit import DEFAULT_LIST_LIMIT as DEFAULT_AUDIT_LIST_LIMIT
from control_plane.audit import MAX_LIST_LIMIT as MAX_AUDIT_LIST_LIMIT
from control_plane.ca import parse_ca
from control_plane.callers import Caller, caller_of
from control_plane.callers import abort as _abort
from control_plane.callers import one_line as _one_line
from control_plane.config_store import ConfigNotFound, Outcome
from control_plane.discovery import STALE, QueryFailed, Session, build_snapshot, raw_published
from control_plane.revocation import normalize_serial
from control_plane.rotation import RotationError
from control_plane.tap import TapError, tap_spec
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
from mesh_common.jointoken import new_token, secret_digest
from mesh_common.snapshot import MAX_SNAPSHOT_BYTES, SnapshotError, from_doc
from mesh_common.spiffe import SpiffeError, SpiffeId
from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from control_plane.server import ControlPlane

log = logging.getLogger("mesh.control_plane")

DEFAULT_TOKEN_TTL_S = 3600
MAX_TOKEN_TTL_S = 365 * 24 * 3600
QUERY_TIMEOUT_S = 5.0         # how long an admin RPC waits for a sidecar's answer
MAX_CONFIG_DOCUMENTS = 1000   # per apply or diff
MAX_CONFIG_DOCUMENT_BYTES = 1024 * 1024
MAX_CONFIG_SOURCE_CHARS = 1024


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
