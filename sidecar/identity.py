"""The sidecar's own identity in dynamic mode: a key made in memory, its CSR, the checks on
what the control plane answers, and certificate files that exist only in memory.

Python's ssl loads keys only from paths, so the key is handed to it through an anonymous
in-memory file (``os.memfd_create``) read via ``/proc/self/fd/N``: it never touches a disk
and never appears in a log. ``cryptography`` is imported here only (dynamic mode).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Collection
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh_common.jointoken import bundle_matches
from mesh_common.spiffe import SpiffeId

from .tls import TlsFiles


class IdentityError(Exception):
    """What the control plane answered cannot be trusted or used; the message says why."""


class WorkloadKey:
    """An ECDSA P-256 key pair that lives only in this process."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())

    def __repr__(self) -> str:
        return "WorkloadKey(<in memory>)"

    def csr_der(self, spiffe_id: SpiffeId) -> bytes:
        """A PKCS#10 request (DER) for ``spiffe_id``, signed with this key."""
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spiffe_id.service)]))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(spiffe_id.uri)]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return csr.public_bytes(serialization.Encoding.DER)

    def public_numbers(self) -> ec.EllipticCurvePublicNumbers:
        return self._key.public_key().public_numbers()

    def private_pem(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())


def check_issued(key: WorkloadKey, spiffe_id: SpiffeId, cert_pem: bytes, bundle_pem: bytes,
                 pinned_ca_sha256: str | Collection[str] | None,
                 now: dt.datetime) -> x509.Certificate:
    """Accept a certificate and trust bundle only if the bundle carries a pinned CA key
    (when pins are given, as when joining with a token: the token's, and when joining again
    the CA keys already trusted), the certificate chains to the bundle, carries our own
    public key and exactly our SPIFFE ID, and is valid now. Returns the certificate;
    raises IdentityError naming the failed check."""
    if pinned_ca_sha256 is not None:
        pins = [pinned_ca_sha256] if isinstance(pinned_ca_sha256, str) else pinned_ca_sha256
        if not any(bundle_matches(bundle_pem, pin) for pin in pins):
            raise IdentityError("the trust bundle's CA key does not match the join token's "
                                "pin (was the mesh's CA rotated after the token was made? "
                                "then make a new token)")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        roots = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError as exc:
        raise IdentityError(f"unreadable certificate or bundle: {exc}") from None
    if issuer_of(cert, roots) is None:
        raise IdentityError("the certificate does not chain to the trust bundle")
    if cert.public_key().public_numbers() != key.public_numbers():  # type: ignore[union-attr]
        raise IdentityError("the certificate is not for our key")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("the certificate has no SPIFFE ID") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [spiffe_id.uri]:
        raise IdentityError(f"the certificate names {uris}, expected exactly {spiffe_id.uri}")
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise IdentityError("the certificate is not valid now (check the clocks)")
    return cert


def issuer_of(cert: x509.Certificate,
              roots: Collection[x509.Certificate]) -> x509.Certificate | None:
    """The certificate of ``roots`` that issued ``cert`` directly (None: none did)."""
    return next((ca for ca in roots if _issued_by(cert, ca)), None)


@dataclass(frozen=True)
class TrustFields:
    """What a sidecar reports of its identity (``Register``, ``StateReport``): the
    certificate's serial (lower-case hex), the SHA-256 (hex) of its trust bundle's PEM bytes
    and of the DER of the CA certificate that issued it ("" = not in the bundle)."""

    cert_serial: str = ""
    bundle_sha256: str = ""
    issuer_sha256: str = ""


def trust_fields(cert: x509.Certificate, bundle_pem: bytes) -> TrustFields:
    """The ``TrustFields`` of ``cert`` verified with ``bundle_pem``."""
    try:
        roots = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError:
        roots = []
    issuer = issuer_of(cert, roots)
    return TrustFields(
        format(cert.serial_number, "x"), hashlib.sha256(bundle_pem).hexdigest(),
        hashlib.sha256(issuer.public_bytes(serialization.Encoding.DER)).hexdigest()
        if issuer is not None else "")


def bundle_key_hashes(bundle_pem: bytes) -> set[str]:
    """SHA-256 (hex) of each CA public key (SubjectPublicKeyInfo, DER) in a bundle: the
    pins a bundle satisfies."""
    try:
        roots = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError:
        return set()
    return {hashlib.sha256(c.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).hexdigest() for c in roots}


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def renew_at(cert: x509.Certificate, fraction: float = 2 / 3,
             received: dt.datetime | None = None) -> dt.datetime:
    """When to renew: ``fraction`` of the way through the certificate's life. The CA backdates
    ``not_before`` for clock skew; pass ``received`` (when the certificate arrived) to count
    the life from then instead, so a short-lived certificate is not renewed at once."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if received is not None:
        start = min(max(start, received), end)
    return start + (end - start) * fraction


class MemoryTlsFiles:
    """Certificate, key and bundle as anonymous in-memory files, usable as ``TlsFiles``.

    ``close()`` releases them; a new identity gets new files (the relay's TLS state reloads
    from the new paths, connections already open keep theirs).
    """

    def __init__(self, cert_pem: bytes, key: WorkloadKey, bundle_pem: bytes) -> None:
        self._fds = [_memfd("mesh-cert", cert_pem), _memfd("mesh-key", key.private_pem()),
                     _memfd("mesh-ca", bundle_pem)]
        cert, key_path, ca = (f"/proc/self/fd/{fd}" for fd in self._fds)
        self.files = TlsFiles(cert=cert, key=key_path, ca=ca)

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
