"""The mesh's certificate authority: a root (or an organisation's intermediate) that signs
workload CSRs into short-lived SPIFFE certificates (X.509 SVIDs).

Signing is computation only (the clock is passed in); ``load_or_create`` is the one place
that touches the CA dir, writing key files with mode 0600 and never logging key material.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh_common.jointoken import ca_key_sha256
from mesh_common.spiffe import SpiffeError, SpiffeId

ROOT_VALIDITY = dt.timedelta(days=3650)
CLOCK_SKEW = dt.timedelta(minutes=1)

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
ADMIN_CERT_FILE = "admin.pem"
ADMIN_KEY_FILE = "admin-key.pem"


class CsrError(Exception):
    """A CSR refused. ``code`` is the gRPC status name to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Issued:
    """A certificate the CA signed."""

    pem: bytes
    serial: int
    spiffe_id: str
    not_after: dt.datetime


def admin_spiffe_id(trust_domain: str, name: str) -> str:
    """``spiffe://<td>/admin/<name>``: the identity of meshctl's operators."""
    SpiffeId(trust_domain, name)  # same character rules as service names
    return f"spiffe://{trust_domain}/admin/{name}"


class CertificateAuthority:
    """Signs workload, admin and server certificates with one CA key."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                 trust_domain: str, bundle_pem: bytes | None = None) -> None:
        self.cert = cert
        self.key = key
        self.trust_domain = trust_domain
        self.bundle_pem = bundle_pem or cert.public_bytes(serialization.Encoding.PEM)
        """The trust bundle handed to workloads (the CA, or the intermediate's chain)."""
        self.key_sha256 = ca_key_sha256(cert.public_bytes(serialization.Encoding.PEM))
        """SHA-256 of the CA public key: what join tokens pin."""

    @classmethod
    def create_root(cls, trust_domain: str, now: dt.datetime) -> CertificateAuthority:
        """A new self-signed root (ECDSA P-256)."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "grpc-mesh"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"mesh root CA {trust_domain}")])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + ROOT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, trust_domain)

    # ------------------------------------------------------------------ signing
    def sign_workload_csr(self, csr_bytes: bytes, service: str, now: dt.datetime,
                          ttl: dt.timedelta) -> Issued:
        """Sign a workload's CSR for ``spiffe://<td>/service/<service>``.

        The CSR must be a valid PKCS#10 request (PEM or DER) with a verifying signature over
        an ECDSA P-256 key; if it names a SPIFFE ID, it must be the caller's. Raises CsrError
        (INVALID_ARGUMENT or PERMISSION_DENIED) saying which check failed.
        """
        try:
            spiffe = SpiffeId(self.trust_domain, service).uri
        except SpiffeError as exc:
            raise CsrError("INVALID_ARGUMENT", str(exc)) from None
        csr = _load_csr(csr_bytes)
        if not csr.is_signature_valid:
            raise CsrError("INVALID_ARGUMENT", "CSR signature does not verify")
        pub = csr.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
            raise CsrError("INVALID_ARGUMENT", "CSR key must be ECDSA P-256")
        try:
            asked = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            asked = None
        except ValueError:
            raise CsrError("INVALID_ARGUMENT", "CSR has malformed extensions") from None
        if asked is not None:
            uris = asked.get_values_for_type(x509.UniformResourceIdentifier)
            others = [u for u in uris if u != spiffe]
            if others:
                raise CsrError("PERMISSION_DENIED",
                               f"CSR asks for {others[0]} but the caller may only be {spiffe}")
        return self._issue(pub, spiffe, [f"{service}.{self.trust_domain}"], [], service, now,
                           ttl, client=True, server=True)

    def issue_keypair(self, spiffe_id: str, common_name: str, now: dt.datetime,
                      ttl: dt.timedelta, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
                      ) -> tuple[Issued, bytes]:
        """A key made here and its certificate (for the control plane's own identities:
        meshctl's admin and the serving certificate). Returns (issued, key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        issued = self._issue(key.public_key(), spiffe_id, list(dns), list(ips), common_name, now,
                             ttl, client=True, server=True)
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return issued, key_pem

    def _issue(self, pub: ec.EllipticCurvePublicKey, spiffe_id: str, dns: list[str],
               ips: list[str], common_name: str, now: dt.datetime, ttl: dt.timedelta, *,
               client: bool, server: bool) -> Issued:
        not_after = min(now + ttl, self.cert.not_valid_after_utc)
        serial = x509.random_serial_number()
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
        sans += [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        usages = ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []) + (
            [ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject).public_key(pub).serial_number(serial)
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_agreement=True,
                                         key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM), serial, spiffe_id, not_after)


def _load_csr(data: bytes) -> x509.CertificateSigningRequest:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except (ValueError, TypeError):
        raise CsrError("INVALID_ARGUMENT", "CSR is not a valid PKCS#10 request") from None


# ---------------------------------------------------------------------- the CA dir
def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the start (then rename into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_or_create(ca_dir: Path, trust_domain: str, now: dt.datetime,
                   admin_name: str = "meshctl") -> CertificateAuthority:
    """Load the CA from ``ca_dir``, or create a root there on first start, with meshctl's
    admin credentials beside it. Key files are mode 0600; the dir is created 0700."""
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = ca_dir / CA_CERT_FILE, ca_dir / CA_KEY_FILE
    if key_path.exists():
        ca = load(cert_path, key_path, trust_domain)
    else:
        ca = CertificateAuthority.create_root(trust_domain, now)
        _write_private(key_path, ca.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        cert_path.write_bytes(ca.bundle_pem)
    admin_cert, admin_key = ca_dir / ADMIN_CERT_FILE, ca_dir / ADMIN_KEY_FILE
    if not admin_key.exists():
        issued, key_pem = ca.issue_keypair(admin_spiffe_id(trust_domain, admin_name), admin_name,
                                           now, ROOT_VALIDITY)
        _write_private(admin_key, key_pem)
        _write_private(admin_cert, issued.pem)
    return ca


def load(cert_path: Path, key_path: Path, trust_domain: str) -> CertificateAuthority:
    """A CA from PEM files (a root, or an organisation's intermediate whose file may carry
    its chain: the whole file becomes the trust bundle). Raises ValueError naming the file."""
    try:
        chain = cert_path.read_bytes()
        cert = x509.load_pem_x509_certificates(chain)[0]
    except (OSError, ValueError) as exc:
        raise ValueError(f"{cert_path}: not a PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{key_path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: the CA key must be ECDSA")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise ValueError(f"{key_path} does not match {cert_path}")
    return CertificateAuthority(cert, key, trust_domain, bundle_pem=chain)
