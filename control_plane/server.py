"""The control plane's gRPC server (grpc.aio): the CA behind two listeners.

* the **bootstrap** listener (plaintext) serves only ``mesh.v1.Bootstrap/Join``: a sidecar
  sends a token id, its CSR and a join proof, and gets a certificate and the trust bundle
  (public data it checks against the token's pin);
* the **API** listener requires a client certificate chained to the mesh CA and serves
  ``mesh.v1.Identity`` (workloads renew their own identity) and ``mesh.v1.Admin`` (admin
  identities only: ``spiffe://<td>/admin/<name>``).

The join proof (``mesh_common.jointoken``) is HMAC-SHA256 of the CSR keyed by the SHA-256 of the
token's secret, which is what the store keeps (never the secret, never the token string).
Tokens and secrets are never logged; token ids are.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import grpc
from cryptography import x509

from control_plane.ca import CertificateAuthority, CsrError
from control_plane.store import Store, UseResult
from mesh_common.jointoken import check_join_proof, new_token, secret_digest
from mesh_common.spiffe import SpiffeError, SpiffeId
from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc

log = logging.getLogger("mesh.control_plane")

DEFAULT_TOKEN_TTL_S = 3600
MAX_TOKEN_TTL_S = 365 * 24 * 3600
SERVER_CERT_TTL = dt.timedelta(days=365)
MAX_CSR_BYTES = 16 * 1024


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


class ControlPlane:
    """The state and the RPC logic shared by the three services."""

    def __init__(self, ca: CertificateAuthority, store: Store, cert_ttl: dt.timedelta,
                 clock: Callable[[], float] = time.time) -> None:
        self.ca = ca
        self.store = store
        self.cert_ttl = cert_ttl
        self.clock = clock
        self.join_address = ""
        self.api_address = ""

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    async def sign(self, context: grpc.aio.ServicerContext, csr: bytes, service: str):
        if len(csr) > MAX_CSR_BYTES:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"CSR is larger than {MAX_CSR_BYTES} bytes")
        try:
            return self.ca.sign_workload_csr(csr, service, self.now(), self.cert_ttl)
        except CsrError as exc:
            code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INVALID_ARGUMENT)
            await _abort(context, code, exc.message)


class BootstrapServicer(pb_grpc.BootstrapServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext
                   ) -> pb.JoinResponse:
        cp = self.cp
        tok = await asyncio.to_thread(cp.store.get_token, request.token_id)
        if tok is None:
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, "unknown join token")
        # The proof first: who does not hold the secret learns nothing about the token's state.
        if not check_join_proof(tok.secret_digest, request.csr, request.proof):
            log.warning("join refused: proof does not match (token %s)", tok.token_id)
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, "join proof does not match")
        if cp.clock() >= tok.expires_at:
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, "join token expired")
        issued = await cp.sign(context, request.csr, tok.service)
        result, _ = await asyncio.to_thread(cp.store.use_token, tok.token_id, cp.clock())
        if result is not UseResult.OK:
            msg = {UseResult.UNKNOWN: "unknown join token", UseResult.EXPIRED: "join token expired",
                   UseResult.USED_UP: "join token used up"}[result]
            log.warning("join refused: %s (token %s)", msg, tok.token_id)
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, msg)
        instance = request.instance_id or "-"
        await asyncio.to_thread(cp.store.record_certificate, format(issued.serial, "x"),
                                tok.service, instance, issued.spiffe_id,
                                issued.not_after.timestamp(), cp.clock(), tok.token_id)
        log.info("joined %s instance %s (token %s, serial %x)", issued.spiffe_id, instance,
                 tok.token_id, issued.serial)
        return pb.JoinResponse(certificate_pem=issued.pem.decode(),
                               trust_bundle_pem=cp.ca.bundle_pem.decode(),
                               spiffe_id=issued.spiffe_id)


class IdentityServicer(pb_grpc.IdentityServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def Renew(self, request: pb.RenewRequest, context: grpc.aio.ServicerContext
                    ) -> pb.RenewResponse:
        cp = self.cp
        caller = caller_of(context, cp.ca.trust_domain)
        if caller.kind != "service":
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"{caller.uri} is not a workload identity and cannot renew")
        issued = await cp.sign(context, request.csr, caller.name)
        instance = request.instance_id or "-"
        await asyncio.to_thread(cp.store.record_certificate, format(issued.serial, "x"),
                                caller.name, instance, issued.spiffe_id,
                                issued.not_after.timestamp(), cp.clock(), None)
        log.info("renewed %s instance %s (serial %x)", issued.spiffe_id, instance, issued.serial)
        return pb.RenewResponse(certificate_pem=issued.pem.decode(),
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
    """Both listeners; ``start`` binds them (port 0 = any free port)."""

    def __init__(self, cp: ControlPlane, listen: str, bootstrap_listen: str) -> None:
        self.cp = cp
        self.listen = listen
        self.bootstrap_listen = bootstrap_listen
        self._api: grpc.aio.Server | None = None
        self._boot: grpc.aio.Server | None = None

    async def start(self) -> dict[str, str]:
        cp = self.cp
        host, port = split_hostport(self.listen)
        bhost, bport = split_hostport(self.bootstrap_listen)

        boot = grpc.aio.server()
        pb_grpc.add_BootstrapServicer_to_server(BootstrapServicer(cp), boot)
        bound_b = _bind(lambda: boot.add_insecure_port(join_hostport(bhost, bport)))
        if bound_b == 0:
            raise OSError(f"cannot listen on {self.bootstrap_listen}")

        dns, ips = server_sans(host)
        issued, key_pem = cp.ca.issue_keypair(f"spiffe://{cp.ca.trust_domain}/control-plane",
                                              "mesh control plane", cp.now(), SERVER_CERT_TTL,
                                              dns=dns, ips=ips)
        chain = issued.pem
        if cp.ca.cert.issuer != cp.ca.cert.subject:  # an intermediate: send its chain too
            chain += cp.ca.bundle_pem
        creds = grpc.ssl_server_credentials([(key_pem, chain)], root_certificates=cp.ca.bundle_pem,
                                            require_client_auth=True)
        api = grpc.aio.server()
        pb_grpc.add_IdentityServicer_to_server(IdentityServicer(cp), api)
        pb_grpc.add_AdminServicer_to_server(AdminServicer(cp), api)
        bound_a = _bind(lambda: api.add_secure_port(join_hostport(host, port), creds))
        if bound_a == 0:
            raise OSError(f"cannot listen on {self.listen}")

        cp.join_address = join_hostport(bhost, bound_b)
        cp.api_address = join_hostport(host, bound_a)
        await boot.start()
        await api.start()
        self._boot, self._api = boot, api
        return {"listen": cp.api_address, "bootstrap": cp.join_address,
                "ca_key_sha256": cp.ca.key_sha256}

    async def stop(self, grace_s: float = 2.0) -> None:
        await asyncio.gather(*(s.stop(grace_s) for s in (self._api, self._boot) if s))
