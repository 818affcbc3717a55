"""Dynamic mode's identity: join the mesh with a token, then keep the certificate fresh.

Joining: a key (``WorkloadKey``, made at the first join), a CSR for our SPIFFE ID and an
HMAC proof keyed by the token's secret go to the control plane's plaintext join listener
(``mesh.v1.Bootstrap/Join``; several join addresses, one per control-plane replica, are tried
in turn while one is out of reach); the answer is accepted only if the bundle carries the
token's CA pin and the certificate is ours (``check_issued``). Renewing: at two thirds of the
life (or at once when told, ``renew_now``), our CSR (made once, for the same key and name)
over mTLS with the current certificate
(``mesh.v1.Identity/Renew``, trying the control plane's API addresses in turn); the new identity is
swapped into the relay's TLS state (new handshakes use it, open connections keep theirs). A
renewed trust bundle is taken as the control plane sends it (a CA rotation adds a CA, then
drops the old one): the answer came over mTLS, authenticated by the bundle already trusted,
so only the first join checks the token's pin (and a join again accepts the token's pin or a
CA key already trusted). After each renewal ``on_renewed`` callbacks run (the discovery
stream reports the new identity at once: ``trust`` is what it reports). A
certificate that expired because the control plane was out of reach makes ``/ready`` say so,
and the next success (a renewal is refused for an expired certificate, so a new join with
the token) restores it. The key is made, CSRs signed and answers checked by the sidecar's
short-lived helper process (``python -m sidecar.certwork``, through ``sidecar.identity``): the
key comes back over a pipe and stays in memory, never written to disk or logged; the token's
secret is never logged.

The calls go over ``sidecar.rpc`` (the sidecar's own HTTP/2 core): no sidecar process loads
grpcio, and only that helper loads ``cryptography``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
from collections.abc import Callable, Sequence

from mesh_common.jointoken import ANSWER_MAC_METADATA, JoinToken, check_answer_mac, join_proof
from mesh_common.spiffe import SpiffeId
from protos.mesh.v1 import control_pb2 as pb

from .identity import (
    IdentityError,
    Issued,
    MemoryTlsFiles,
    TrustFields,
    WorkloadKey,
    check_issued,
    renew_at,
)
from .rpc import Channel, Code, RpcError, binary_header, client_tls
from .tls import TlsFiles

log = logging.getLogger("mesh.sidecar.identity")

RPC_TIMEOUT_S = 10.0
# Codes worth trying again later: the control plane is away or busy, not saying no.
RETRYABLE = frozenset({Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.RESOURCE_EXHAUSTED,
                       Code.ABORTED, Code.INTERNAL, Code.UNKNOWN})
JOIN_METHOD = "/mesh.v1.Bootstrap/Join"
RENEW_METHOD = "/mesh.v1.Identity/Renew"


class JoinRefused(Exception):
    """The control plane said no (bad token, bad proof, other identity) or its answer cannot
    be trusted (pin mismatch): one line saying why."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _rfc3339(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


class DynamicIdentity:
    """Our key, current certificate and bundle, and the loop that renews them.

    ``api_address``: the control plane's API address, or several tried in turn when one is
    out of reach (default: the token's); ``join_address`` likewise for joining (default: the
    token's join address).
    """

    def __init__(self, token: JoinToken, service: str, trust_domain: str, *,
                 join_address: str | Sequence[str] | None = None,
                 api_address: str | Sequence[str] | None = None,
                 instance_id: str | None = None, max_backoff_s: float = 5.0) -> None:
        self.token = token
        self.spiffe_id = SpiffeId(trust_domain, service)
        if isinstance(join_address, str):
            join_address = [join_address]
        self.join_addresses: list[str] = list(join_address or ()) or [token.join_address]
        self._join_index = 0
        if isinstance(api_address, str):
            api_address = [api_address]
        self.api_addresses: list[str] = list(api_address or ()) or [token.api_address]
        self._api_index = 0
        self.instance_id = instance_id or f"{service}-{socket.gethostname()}-{os.getpid()}"
        self.max_backoff_s = max_backoff_s
        self._key: WorkloadKey | None = None  # made at the first join
        self._csr_der: bytes | None = None
        self.issued: Issued | None = None
        """What the current certificate and bundle passed the checks with."""
        self.memfiles: MemoryTlsFiles | None = None
        self.cert_pem = b""
        self.bundle_pem = b""
        self.not_after: dt.datetime | None = None
        self.renew_time: dt.datetime | None = None
        self.otlp_endpoint = ""
        """The control plane's OTLP receiver (``HOST:PORT``, mTLS) from the last join answer
        ("" = it runs none): where spans go unless ``--otlp-endpoint`` says otherwise."""
        self.trust = TrustFields()
        """The current certificate's serial, bundle and issuer hashes (what is reported)."""
        self.renewals = 0
        self.rejoins = 0
        self.last_error: str | None = None
        self._expired_logged = False
        self._renew_requested = False
        self._wake = asyncio.Event()
        # Set by the owner before renewals start: swap new files into the relay's TLS state.
        self.on_new_files: Callable[[TlsFiles], None] = lambda files: None
        # Called after each renewal or join again (e.g. report the new identity now).
        self.on_renewed: list[Callable[[], None]] = []

    @property
    def api_address(self) -> str:
        """The API address renewals go to now (the next one after a failure)."""
        return self.api_addresses[self._api_index]

    def _next_api_address(self) -> None:
        self._api_index = (self._api_index + 1) % len(self.api_addresses)

    @property
    def join_address(self) -> str:
        """The join address a join goes to now (the next one after a failure)."""
        return self.join_addresses[self._join_index]

    def _next_join_address(self) -> None:
        self._join_index = (self._join_index + 1) % len(self.join_addresses)

    @property
    def cert_not_after_unix(self) -> int:
        """The current certificate's expiry, Unix seconds (0 before joining)."""
        return int(self.not_after.timestamp()) if self.not_after else 0

    def renew_now(self) -> None:
        """Ask the renewal loop to renew at once (whatever the certificate's age). Returns at
        once; the new certificate is used for new handshakes, open connections keep theirs.
        A request made while a renewal is under way leads to one more renewal after it."""
        self._renew_requested = True
        self._wake.set()

    @property
    def key(self) -> WorkloadKey:
        """Our key (made at the first join; AssertionError before)."""
        assert self._key is not None, "join first"
        return self._key

    async def _csr(self) -> bytes:
        """Our CSR (DER) for our SPIFFE ID: made with our key by the helper process at the
        first join, then sent again by every join and renewal (the key and the name do not
        change, so neither does what it asks for). Raises IdentityError when the helper
        cannot make it."""
        if self._key is None or self._csr_der is None:
            self._key, self._csr_der = await WorkloadKey.generate(self.spiffe_id)
        return self._csr_der

    @property
    def files(self) -> TlsFiles:
        assert self.memfiles is not None, "join first"
        return self.memfiles.files

    # ------------------------------------------------------------- join
    async def join(self) -> None:
        """Join, retrying with backoff while the control plane is out of reach (or has no
        leader yet), trying the join addresses in turn. Raises JoinRefused when it refuses
        or its answer fails the checks."""
        backoff = 0.2
        tried = 0  # addresses tried since the last pause
        while True:
            address = self.join_address
            try:
                await self._join_once()
                return
            except RpcError as exc:
                if exc.code not in RETRYABLE:
                    raise JoinRefused(
                        f"join refused by the control plane at {address}: "
                        f"{exc.code.name}: {exc.details}") from None
                self.last_error = f"join: {address}: {exc.code.name}: {exc.details}"
                self._next_join_address()
                tried += 1
                if tried < len(self.join_addresses):  # the next address at once
                    log.warning("control plane at %s cannot take the join (%s: %s); trying %s",
                                address, exc.code.name, exc.details, self.join_address)
                    continue
                tried = 0  # every address tried: pause (backoff) before the next round
                log.warning("control plane at %s cannot take the join (%s: %s); retrying in "
                            "%.1fs", address, exc.code.name, exc.details, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    async def _join_once(self, again: bool = False) -> None:
        """One join. ``again`` (a join after a renewal failed or the certificate expired):
        the answer's bundle may carry the token's pin or a CA key already trusted."""
        try:
            csr = await self._csr()
        except IdentityError as exc:
            raise JoinRefused(f"cannot join: {exc}") from None
        request = pb.JoinRequest(token_id=self.token.token_id, csr=csr,
                                 proof=join_proof(self.token.secret, csr),
                                 instance_id=self.instance_id)
        async with Channel(self.join_address, connect_timeout_s=RPC_TIMEOUT_S) as channel:
            resp, trailers = await channel.unary_with_trailers(
                JOIN_METHOD, request, pb.JoinResponse, timeout_s=RPC_TIMEOUT_S)
        # The join travels in plaintext: the answer counts only with the control plane's MAC
        # over it, keyed by the token's secret (a forged or altered answer has none that fits).
        mac = binary_header(trailers.lookup(ANSWER_MAC_METADATA)) if trailers is not None else b""
        if not check_answer_mac(self.token.secret, csr, resp.certificate_pem,
                                resp.trust_bundle_pem, resp.spiffe_id, resp.otlp_endpoint, mac):
            raise JoinRefused(f"refusing to join via {self.join_address}: the answer's "
                              f"{'MAC does not match' if mac else 'MAC is missing'} (not the "
                              f"control plane that made this token, or altered on the way)")
        pins = {self.token.ca_key_sha256}
        if again and self.issued is not None:
            pins |= self.issued.bundle_key_hashes
        try:
            await self._accept(resp.certificate_pem.encode(), resp.trust_bundle_pem.encode(),
                               pins)
        except IdentityError as exc:
            raise JoinRefused(f"refusing to join via {self.join_address}: {exc}") from None
        self.otlp_endpoint = resp.otlp_endpoint
        log.info("joined the mesh as %s (certificate valid until %s, renewal at %s)",
                 self.spiffe_id.uri, _rfc3339(self.not_after), _rfc3339(self.renew_time))  # type: ignore[arg-type]

    # ------------------------------------------------------------- renew
    async def _renew_once(self) -> None:
        request = pb.RenewRequest(csr=await self._csr(),
                                  instance_id=self.instance_id)
        async with Channel(self.api_address, tls=client_tls(self.files),
                           connect_timeout_s=RPC_TIMEOUT_S) as channel:
            resp = await channel.unary(RENEW_METHOD, request, pb.RenewResponse,
                                       timeout_s=RPC_TIMEOUT_S)
        # No pin: the bundle we already trust authenticated this answer (mTLS).
        await self._accept(resp.certificate_pem.encode(), resp.trust_bundle_pem.encode(), None)

    async def _accept(self, cert_pem: bytes, bundle_pem: bytes, pin: set[str] | None) -> None:
        now = _now()
        issued = await check_issued(self.key, self.spiffe_id, cert_pem, bundle_pem, pin, now)
        new = MemoryTlsFiles(cert_pem, self.key, bundle_pem)
        old = self.memfiles
        if old is not None:
            try:
                self.on_new_files(new.files)
            except OSError as exc:  # ssl.SSLError too: the old identity stays in use
                new.close()
                raise IdentityError(f"the new certificate could not be loaded: {exc}") from None
            except BaseException:
                new.close()
                raise
        self.memfiles = new
        self.cert_pem, self.bundle_pem = cert_pem, bundle_pem
        self.issued = issued
        self.trust = issued.trust
        self.not_after = issued.not_valid_after_utc
        self.renew_time = renew_at(issued, received=now)
        self._expired_logged = False
        if old is not None:
            old.close()  # the TLS state has loaded the new files; open connections keep theirs

    def expired(self, now: dt.datetime | None = None) -> bool:
        return self.not_after is not None and (now or _now()) >= self.not_after

    async def renew_forever(self) -> None:
        """Renew at ``renew_time``; on failure retry with backoff (renewing while the
        certificate is valid, joining again with the token once it has expired)."""
        backoff = 0.2
        while True:
            now = _now()
            assert self.renew_time is not None and self.not_after is not None
            if now < self.renew_time and not self._renew_requested:
                self._wake.clear()
                try:
                    async with asyncio.timeout((self.renew_time - now).total_seconds()):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            requested, self._renew_requested = self._renew_requested, False
            if requested:
                log.info("renewing the certificate now, as the control plane asked")
            expired = self.expired(now)
            if expired and not self._expired_logged:
                self._expired_logged = True
                log.error("certificate expired at %s without renewal (last error: %s); not "
                          "ready until the control plane at %s answers", _rfc3339(self.not_after),
                          self.last_error, self.join_address)
            try:
                if expired:
                    await self._join_once(again=True)
                    self.rejoins += 1
                else:
                    await self._renew_once()
                self.renewals += 1
                self.last_error = None
                backoff = 0.2
                log.info("certificate renewed (valid until %s, next renewal at %s; serial %s, "
                         "issuer %s, bundle %s)", _rfc3339(self.not_after),
                         _rfc3339(self.renew_time), self.trust.cert_serial,
                         self.trust.issuer_sha256[:12], self.trust.bundle_sha256[:12])
                self._renewed()
                continue
            except RpcError as exc:
                what = "join again" if expired else "renew"
                self.last_error = f"{what}: {exc.code.name}: {exc.details}"
                if not expired and exc.code not in RETRYABLE:
                    # Refused (not just unreachable): try the token instead, right away.
                    log.warning("renewal refused (%s); joining again with the token",
                                self.last_error)
                    try:
                        await self._join_once(again=True)
                        self.rejoins += 1
                        self.renewals += 1
                        self.last_error = None
                        backoff = 0.2
                        self._renewed()
                        continue
                    except RpcError as exc2:
                        self.last_error = f"join again: {exc2.code.name}: {exc2.details}"
                        if exc2.code in RETRYABLE:
                            self._next_join_address()
                    except (JoinRefused, IdentityError) as exc2:
                        self.last_error = f"join again: {exc2}"
                if not expired and exc.code in RETRYABLE:
                    self._next_api_address()  # out of reach: the next address next time
                if expired and exc.code in RETRYABLE:
                    self._next_join_address()
            except (JoinRefused, IdentityError) as exc:
                self.last_error = str(exc)
            self._renew_requested = self._renew_requested or requested
            log.warning("certificate not renewed (%s); retrying in %.1fs", self.last_error, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    def _renewed(self) -> None:
        for callback in self.on_renewed:
            try:
                callback()
            except Exception:  # a listener's bug must not stop renewals
                log.exception("a callback after the renewal failed")

    # ------------------------------------------------------------- admin
    def not_ready_reason(self) -> str | None:
        return "certificate expired" if self.expired() else None

    def stats(self) -> dict[str, object]:
        return {"spiffe_id": self.spiffe_id.uri,
                "not_after": _rfc3339(self.not_after) if self.not_after else None,
                "not_after_unix": self.not_after.timestamp() if self.not_after else None,
                "renew_at": _rfc3339(self.renew_time) if self.renew_time else None,
                "renewals": self.renewals, "rejoins": self.rejoins,
                "last_error": self.last_error, "expired": self.expired(),
                "control_plane": self.api_address, "cert_serial": self.trust.cert_serial,
                "issuer_sha256": self.trust.issuer_sha256,
                "bundle_sha256": self.trust.bundle_sha256}

    def close(self) -> None:
        if self.memfiles is not None:
            self.memfiles.close()
            self.memfiles = None
