"""The mesh's certificate authority: a root (or an organisation's intermediate) that signs
workload CSRs into short-lived SPIFFE certificates (X.509 SVIDs).

Signing is computation only (the clock is passed in); ``load_or_create`` and the CA-dir
helpers at the end (used by ``control_plane.rotation`` for a CA rotation) are the only code
that touches the CA dir, writing key files with mode 0600 and never logging key material.

The CA dir::

    ca.pem            the trust bundle meshctl verifies the control plane with: the CA (or its
                      chain); during a rotation the old and the new CA
    ca-key.pem        the CA's key (the old one's during a rotation)
    admin.pem, admin-key.pem   meshctl's admin identity (re-issued by a rotation's new CA)
    ca-prev.pem       during a rotation: the old CA's own chain
    ca-next.pem, ca-next-key.pem   during a rotation: the new CA
    rotation.json     the last rotation's state (no secrets)
    archive/          CAs rotated out: <rotation id>-ca.pem and -ca-key.pem (0600)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
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
PREV_CERT_FILE = "ca-prev.pem"
NEXT_CERT_FILE = "ca-next.pem"
NEXT_KEY_FILE = "ca-next-key.pem"
ARCHIVE_DIR = "archive"
ADMIN_NAME = "meshctl"
MIN_CA_LIFETIME = dt.timedelta(days=1)
"""A CA given to a rotation must stay valid at least this long."""


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
                 trust_domain: str, bundle_pem: bytes | None = None, *,
                 chain_pem: bytes | None = None, key_sha256: str | None = None) -> None:
        self.cert = cert
        self.key = key
        self.trust_domain = trust_domain
        self.bundle_pem = bundle_pem or cert.public_bytes(serialization.Encoding.PEM)
        """The trust bundle handed to workloads (the CA, or the intermediate's chain; during
        a rotation the phase's bundle, see ``view``)."""
        self.chain_pem = chain_pem or self.bundle_pem
        """This CA's own chain (itself first, then its issuers, if any): what a certificate
        it signs is sent with, and its part of a trust bundle."""
        self.key_sha256 = key_sha256 or ca_key_sha256(
            cert.public_bytes(serialization.Encoding.PEM))
        """SHA-256 of a CA public key in the bundle: what join tokens pin (this CA's own,
        unless a rotation's ``view`` names the new CA's)."""
        self.sha256 = cert_sha256(cert)
        """SHA-256 (hex) of this CA certificate's DER: how rotations and sidecars name it."""

    def view(self, bundle_pem: bytes, key_sha256: str | None = None) -> CertificateAuthority:
        """The same signer handing out another trust bundle (and tokens pinning
        ``key_sha256``, default its own key): what a rotation's phase serves."""
        return CertificateAuthority(self.cert, self.key, self.trust_domain, bundle_pem,
                                    chain_pem=self.chain_pem,
                                    key_sha256=key_sha256 or ca_key_sha256(
                                        self.cert.public_bytes(serialization.Encoding.PEM)))

    def key_pem(self) -> bytes:
        """The CA key, PEM (PKCS#8, unencrypted): only for writing to the CA dir (0600)."""
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    @classmethod
    def create_root(cls, trust_domain: str, now: dt.datetime,
                    label: str = "") -> CertificateAuthority:
        """A new self-signed root (ECDSA P-256). ``label`` (e.g. a rotation's id) ends its
        common name, so two roots of one mesh never share a subject."""
        key = ec.generate_private_key(ec.SECP256R1())
        cn = f"mesh root CA {trust_domain}" + (f" {label}" if label else "")
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "grpc-mesh"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])
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
        an ECDSA P-256 key; if it names URIs, it must name exactly one, the caller's SPIFFE ID
        (a CSR naming none is issued the caller's identity: the CA decides it, never the
        CSR). Raises CsrError (INVALID_ARGUMENT or PERMISSION_DENIED) saying which check
        failed, and nothing else whatever the bytes.
        """
        try:
            spiffe = SpiffeId(self.trust_domain, service).uri
        except SpiffeError as exc:
            raise CsrError("INVALID_ARGUMENT", str(exc)) from None
        csr = _load_csr(csr_bytes)
        try:  # a key of an unknown type or curve, or a bad point, fails here
            pub = csr.public_key()
            valid = csr.is_signature_valid
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise CsrError("INVALID_ARGUMENT",
                           "CSR key must be ECDSA P-256 (the key cannot be read)") from None
        if not valid:
            raise CsrError("INVALID_ARGUMENT", "CSR signature does not verify")
        if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
            raise CsrError("INVALID_ARGUMENT", "CSR key must be ECDSA P-256")
        try:
            asked = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            asked = None
        except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
            raise CsrError("INVALID_ARGUMENT", "CSR has malformed extensions") from None
        if asked is not None:
            uris = asked.get_values_for_type(x509.UniformResourceIdentifier)
            others = [u for u in uris if u != spiffe]
            if others:
                raise CsrError("PERMISSION_DENIED",
                               f"CSR asks for {others[0][:256]} but the caller may only be "
                               f"{spiffe}")
            if len(uris) > 1:
                raise CsrError("INVALID_ARGUMENT",
                               f"CSR names {len(uris)} URIs: a workload has exactly one "
                               f"SPIFFE ID ({spiffe})")
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
    except (ValueError, TypeError, x509.InvalidVersion):
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


write_private = _write_private


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


# ---------------------------------------------------------------------- certificates as data
def cert_sha256(cert: x509.Certificate) -> str:
    """SHA-256 (hex) of a certificate's DER: how a CA is named in rotations and reports."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def pem_certs(pem: bytes) -> list[x509.Certificate]:
    """The certificates of a PEM bundle, in order; [] when it holds none."""
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def join_bundles(*bundles: bytes) -> bytes:
    """One trust bundle (PEM) with every certificate of ``bundles`` once, in order."""
    seen: set[bytes] = set()
    out: list[bytes] = []
    for bundle in bundles:
        for cert in pem_certs(bundle):
            der = cert.public_bytes(serialization.Encoding.DER)
            if der not in seen:
                seen.add(der)
                out.append(cert.public_bytes(serialization.Encoding.PEM))
    return b"".join(out)


def parse_ca(cert_pem: bytes, key_pem: bytes, trust_domain: str,
             now: dt.datetime) -> CertificateAuthority:
    """A CA handed over for a rotation: a PEM CA certificate (a root, or an intermediate
    followed by its chain) and its unencrypted ECDSA P-256 key. It must be a CA (basic
    constraints, keyCertSign), valid now and for at least ``MIN_CA_LIFETIME``, each chain
    certificate issued by the next. Raises ValueError saying which check failed (never
    echoing the key)."""
    certs = pem_certs(cert_pem)
    if not certs:
        raise ValueError("ca_cert_pem: not a PEM certificate")
    cert = certs[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ValueError("ca_key_pem: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("ca_key_pem: the CA key must be ECDSA P-256")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise ValueError("ca_key_pem does not match the certificate of ca_cert_pem")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise ValueError(f"ca_cert_pem: not a CA certificate (no {exc.oid._name})") from None
    if not bc.ca or not ku.key_cert_sign:
        raise ValueError("ca_cert_pem: not a CA certificate (basic constraints CA and "
                         "keyCertSign are required)")
    if not cert.not_valid_before_utc <= now:
        raise ValueError("ca_cert_pem: not valid yet")
    if cert.not_valid_after_utc < now + MIN_CA_LIFETIME:
        raise ValueError(f"ca_cert_pem: expires at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
                         f", less than {MIN_CA_LIFETIME.days} day(s) from now")
    for child, parent in zip(certs, certs[1:], strict=False):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise ValueError("ca_cert_pem: the chain is out of order (each certificate must "
                             "be issued by the next)") from None
    chain = join_bundles(cert_pem)
    return CertificateAuthority(cert, key, trust_domain, bundle_pem=chain)


# ---------------------------------------------------------------------- the CA dir in rotations
def _write_public(path: Path, data: bytes) -> None:
    """Write public data (certificates) atomically, mode 0644."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_ca(ca_dir: Path, ca: CertificateAuthority, cert_file: str, key_file: str) -> None:
    """Write a CA's chain and key (0600) under ``ca_dir``."""
    _write_private(ca_dir / key_file, ca.key_pem())
    _write_public(ca_dir / cert_file, ca.chain_pem)


def write_bundle(ca_dir: Path, bundle_pem: bytes) -> None:
    """Make ``ca.pem`` (what meshctl verifies the control plane with) ``bundle_pem``."""
    _write_public(ca_dir / CA_CERT_FILE, bundle_pem)


def write_prev(ca_dir: Path, chain_pem: bytes) -> None:
    """Keep the old CA's own chain beside its key for the length of a rotation."""
    _write_public(ca_dir / PREV_CERT_FILE, chain_pem)


def load_rotating(ca_dir: Path, trust_domain: str, old_cert: Path | None = None,
                  old_key: Path | None = None
                  ) -> tuple[CertificateAuthority, CertificateAuthority]:
    """The old and the new CA of a rotation under way: the old one from ``old_cert`` /
    ``old_key`` (an intermediate given to the control plane) or ``ca-prev.pem`` /
    ``ca-key.pem``, the new one from ``ca-next.pem`` / ``ca-next-key.pem``. Raises
    ValueError naming the file."""
    old = load(old_cert or ca_dir / PREV_CERT_FILE, old_key or ca_dir / CA_KEY_FILE,
               trust_domain)
    new = load(ca_dir / NEXT_CERT_FILE, ca_dir / NEXT_KEY_FILE, trust_domain)
    return old, new


def issue_admin(ca_dir: Path, ca: CertificateAuthority, now: dt.datetime,
                name: str = ADMIN_NAME) -> None:
    """meshctl's admin key and certificate, issued by ``ca`` (both files 0600)."""
    issued, key_pem = ca.issue_keypair(admin_spiffe_id(ca.trust_domain, name), name, now,
                                       ROOT_VALIDITY)
    _write_private(ca_dir / ADMIN_KEY_FILE, key_pem)
    _write_private(ca_dir / ADMIN_CERT_FILE, issued.pem)


def admin_issued_by(ca_dir: Path, ca: CertificateAuthority) -> bool:
    """True when meshctl's admin certificate in ``ca_dir`` was issued by ``ca``."""
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / ADMIN_CERT_FILE).read_bytes())
        cert.verify_directly_issued_by(ca.cert)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    return True


def discard_next(ca_dir: Path) -> bool:
    """Remove a new CA left by a rotation that never started (a crash while beginning it);
    True when there was one."""
    found = False
    for name in (NEXT_KEY_FILE, NEXT_CERT_FILE, PREV_CERT_FILE):
        path = ca_dir / name
        if path.exists():
            path.unlink()
            found = True
    return found


def finalize_rotation(ca_dir: Path, rotation_id: str) -> None:
    """The end of a rotation in the CA dir (idempotent; each step survives a crash): the
    old CA's chain and key (when it was in the CA dir) go to ``archive/`` (0600, kept, never
    trusted again), the new CA becomes ``ca.pem`` / ``ca-key.pem``."""
    archive = ca_dir / ARCHIVE_DIR
    archive.mkdir(mode=0o700, exist_ok=True)
    next_key, next_cert = ca_dir / NEXT_KEY_FILE, ca_dir / NEXT_CERT_FILE
    prev = ca_dir / PREV_CERT_FILE
    if prev.exists():
        _write_private(archive / f"{rotation_id}-ca.pem", prev.read_bytes())
    if next_key.exists():
        key = ca_dir / CA_KEY_FILE
        if key.exists():
            _write_private(archive / f"{rotation_id}-ca-key.pem", key.read_bytes())
        os.replace(next_key, key)
    if next_cert.exists():
        _write_public(ca_dir / CA_CERT_FILE, next_cert.read_bytes())
        next_cert.unlink()
    if prev.exists():
        prev.unlink()
