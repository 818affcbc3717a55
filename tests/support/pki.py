"""A throwaway test PKI: an ECDSA P-256 root CA and SPIFFE workload certificates, as PEM files.

Everything is written under the directory given to `make_ca`; nothing touches `certs/`.
Certificates are valid from one minute in the past (clock skew) unless told otherwise.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_TRUST_DOMAIN = "mesh.local"


def spiffe_id(service: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    """The SPIFFE ID the mesh gives a service: spiffe://<trust_domain>/service/<service>."""
    return f"spiffe://{trust_domain}/service/{service}"


@dataclass(frozen=True)
class WorkloadCert:
    """Paths of a workload's PEM certificate, its private key and the CA bundle that signed it."""

    cert: Path
    key: Path
    ca: Path

    def __iter__(self):
        """Unpacks as `(cert_path, key_path)`: `cert, key = ca.issue_workload("echo")`."""
        return iter((self.cert, self.key))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@dataclass
class CA:
    """A root CA whose key stays in memory; `ca_path` is its PEM certificate (the trust bundle)."""

    dir: Path
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    ca_path: Path
    _serial_names: dict[str, int] = field(default_factory=dict)

    def issue_workload(
        self,
        service: str,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        days: float = 1,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        *,
        name: str | None = None,
        extra_dns: tuple[str, ...] = (),
    ) -> WorkloadCert:
        """Issue a leaf certificate for `service` and write `<name>.pem` / `<name>-key.pem`.

        SANs: URI spiffe://<trust_domain>/service/<service>, DNS <service>.mesh.local and
        localhost (plus `extra_dns`), IP 127.0.0.1. EKU serverAuth + clientAuth.
        Pass `not_after` in the past for an expired certificate. `name` defaults to the service
        name, suffixed with a counter when the same service is issued again.
        Returns a WorkloadCert; it also unpacks as `(cert_path, key_path)`.
        """
        now = _now()
        nb = not_before if not_before is not None else now - dt.timedelta(minutes=1)
        na = not_after if not_after is not None else now + dt.timedelta(days=days)
        if nb >= na:
            nb = na - dt.timedelta(hours=1)
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(spiffe_id(service, trust_domain)),
            x509.DNSName(f"{service}.mesh.local"),
            x509.DNSName("localhost"),
            *(x509.DNSName(d) for d in extra_dns),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        if name is None:
            n = self._serial_names.get(service, 0)
            self._serial_names[service] = n + 1
            name = service if n == 0 else f"{service}-{n}"
        cert_path = self.dir / f"{name}.pem"
        key_path = self.dir / f"{name}-key.pem"
        _write_cert(cert_path, cert)
        _write_key(key_path, key)
        return WorkloadCert(cert=cert_path, key=key_path, ca=self.ca_path)

    def issue_expired(self, service: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> WorkloadCert:
        """A certificate for `service` that expired an hour ago (for negative tests)."""
        now = _now()
        return self.issue_workload(
            service,
            trust_domain,
            not_before=now - dt.timedelta(days=2),
            not_after=now - dt.timedelta(hours=1),
            name=f"{service}-expired-{x509.random_serial_number() % 10**6}",
        )


def make_ca(dir: str | os.PathLike[str], name: str = "mesh-ca", days: float = 1) -> CA:
    """Create a self-signed ECDSA P-256 root CA; writes `<dir>/<name>.pem` (cert) and
    `<dir>/<name>-key.pem` (mode 0600). Returns the CA, ready to issue workload certificates."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "grpc-mesh tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    ca_path = d / f"{name}.pem"
    _write_cert(ca_path, cert)
    _write_key(d / f"{name}-key.pem", key)
    return CA(dir=d, name=name, key=key, cert=cert, ca_path=ca_path)
