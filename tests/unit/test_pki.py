"""The test PKI issues what the mesh expects of a workload certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID


def _load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_workload_cert_has_spiffe_dns_ip_sans_and_both_ekus(pki):
    wc = pki.issue_workload("payment")
    cert = _load(wc.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://mesh.local/service/payment"]
    assert set(san.get_values_for_type(x509.DNSName)) == {"payment.mesh.local", "localhost"}
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    cert.verify_directly_issued_by(_load(wc.ca))
    assert stat.S_IMODE(os.stat(wc.key).st_mode) == 0o600
    cert_path, key_path = wc
    assert (cert_path, key_path) == (wc.cert, wc.key)


def test_ca_is_a_ca(pki):
    ca = _load(pki.ca_path)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_expired_cert_is_expired(pki):
    cert = _load(pki.issue_expired("order").cert)
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC)


def test_other_trust_domain(pki):
    cert = _load(pki.issue_workload("order", trust_domain="evil.local").cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://evil.local/service/order"]
