"""The sidecar's identity work, as the pure functions its helper process runs
(``sidecar.certwork``): key and CSR, the checks on the control plane's answer, what is
reported; and the in-memory TLS files and renewal time of ``sidecar.identity``."""

from __future__ import annotations

import datetime as dt
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from control_plane.ca import CertificateAuthority
from mesh_common.spiffe import SpiffeId
from sidecar.certwork import CheckFailed, check, make_key_and_csr
from sidecar.identity import Issued, MemoryTlsFiles, TrustFields, WorkloadKey, renew_at

NOW = dt.datetime.now(dt.UTC)
T = NOW.timestamp()
HOUR = dt.timedelta(hours=1)
ME = SpiffeId("mesh.local", "payment")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create_root("mesh.local", NOW)


def _key() -> bytes:
    return make_key_and_csr(ME.uri, ME.service, None)[0]


def _issue(ca: CertificateAuthority, key_pem: bytes) -> bytes:
    return ca.sign_workload_csr(make_key_and_csr(ME.uri, ME.service, key_pem)[1], "payment",
                                NOW, HOUR).pem


def test_a_new_key_is_p256_pkcs8_and_its_csr_names_the_service_and_spiffe_id() -> None:
    key_pem, csr_der = make_key_and_csr(ME.uri, "payment", None)
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(key_pem, None)
    assert key.curve.name == "secp256r1"  # type: ignore[union-attr]
    csr = x509.load_der_x509_csr(csr_der)
    assert csr.is_signature_valid
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()
    assert csr.subject.rfc4514_string() == "CN=payment"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ME.uri]
    again_pem, again_csr = make_key_and_csr(ME.uri, "payment", key_pem)
    assert again_pem == key_pem  # the same key signs the next CSR
    assert x509.load_der_x509_csr(again_csr).public_key().public_numbers() == \
        key.public_key().public_numbers()


def test_an_unreadable_key_is_refused_without_echoing_it() -> None:
    bad = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    with pytest.raises(CheckFailed, match="unreadable private key") as info:
        make_key_and_csr(ME.uri, "payment", bad)
    assert "AAAA" not in str(info.value)


def test_an_answer_for_our_key_from_the_pinned_ca_is_accepted(ca) -> None:
    key = _key()
    pem = _issue(ca, key)
    got = check(key, ME.uri, pem, ca.bundle_pem, [ca.key_sha256], T)
    cert = x509.load_pem_x509_certificate(pem)
    assert got["not_before_unix"] == cert.not_valid_before_utc.timestamp()
    assert got["not_after_unix"] == cert.not_valid_after_utc.timestamp()
    assert got["cert_serial"] == format(cert.serial_number, "x")
    assert got["issuer_sha256"] == ca.sha256
    assert got["bundle_key_hashes"] == [ca.key_sha256]


def test_a_bundle_that_does_not_match_the_pin_is_refused(ca) -> None:
    other = CertificateAuthority.create_root("mesh.local", NOW)
    key = _key()
    with pytest.raises(CheckFailed, match="pin"):
        check(key, ME.uri, _issue(other, key), other.bundle_pem, [ca.key_sha256], T)


def test_a_certificate_for_another_key_or_not_from_the_bundle_is_refused(ca) -> None:
    key, stranger = _key(), _key()
    with pytest.raises(CheckFailed, match="our key"):
        check(key, ME.uri, _issue(ca, stranger), ca.bundle_pem, [ca.key_sha256], T)
    other = CertificateAuthority.create_root("mesh.local", NOW)
    with pytest.raises(CheckFailed, match="chain"):
        check(key, ME.uri, _issue(other, key), ca.bundle_pem, None, T)


def test_a_certificate_for_another_identity_or_out_of_date_is_refused(ca) -> None:
    key = _key()
    pem = _issue(ca, key)
    with pytest.raises(CheckFailed, match="expected exactly"):
        check(key, SpiffeId("mesh.local", "inventory").uri, pem, ca.bundle_pem, None, T)
    with pytest.raises(CheckFailed, match="not valid now"):
        check(key, ME.uri, pem, ca.bundle_pem, None, T + 2 * 3600)


def test_renewal_is_two_thirds_through_the_life_counted_from_arrival() -> None:
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    issued = Issued(start, start + 3 * HOUR, TrustFields(), frozenset())
    assert renew_at(issued) == start + 2 * HOUR
    assert renew_at(issued, received=start + HOUR) == start + HOUR + 2 / 3 * 2 * HOUR
    assert renew_at(issued, received=start + 5 * HOUR) == start + 3 * HOUR


def test_memory_files_load_into_ssl_from_proc_fd_paths_and_vanish_on_close(ca) -> None:
    key_pem = _key()
    key = WorkloadKey(key_pem)
    mem = MemoryTlsFiles(_issue(ca, key_pem), key, ca.bundle_pem)
    try:
        assert all(p.startswith("/proc/self/fd/") for p in (mem.files.cert, mem.files.key,
                                                             mem.files.ca))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(mem.files.cert, mem.files.key)
        ctx.load_verify_locations(cafile=mem.files.ca)
        assert "in memory" in repr(key) and b"PRIVATE" not in repr(key).encode()
        assert key.private_pem() == key_pem
    finally:
        mem.close()
    with pytest.raises(OSError):
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(mem.files.cert, mem.files.key)
