"""The sidecar's in-memory identity: CSR, checks on the control plane's answer, memfd files."""

from __future__ import annotations

import datetime as dt
import ssl

import pytest

from control_plane.ca import CertificateAuthority
from mesh_common.spiffe import SpiffeId
from sidecar.identity import IdentityError, MemoryTlsFiles, WorkloadKey, check_issued, renew_at

NOW = dt.datetime.now(dt.UTC)
HOUR = dt.timedelta(hours=1)
ME = SpiffeId("mesh.local", "payment")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create_root("mesh.local", NOW)


def _issue(ca: CertificateAuthority, key: WorkloadKey) -> bytes:
    return ca.sign_workload_csr(key.csr_der(ME), "payment", NOW, HOUR).pem


def test_an_answer_for_our_key_from_the_pinned_ca_is_accepted(ca) -> None:
    key = WorkloadKey()
    cert = check_issued(key, ME, _issue(ca, key), ca.bundle_pem, ca.key_sha256, NOW)
    assert renew_at(cert) == cert.not_valid_before_utc + (
        cert.not_valid_after_utc - cert.not_valid_before_utc) * 2 / 3


def test_a_bundle_that_does_not_match_the_pin_is_refused(ca) -> None:
    other = CertificateAuthority.create_root("mesh.local", NOW)
    key = WorkloadKey()
    with pytest.raises(IdentityError, match="pin"):
        check_issued(key, ME, _issue(other, key), other.bundle_pem, ca.key_sha256, NOW)


def test_a_certificate_for_another_key_or_not_from_the_bundle_is_refused(ca) -> None:
    key, stranger = WorkloadKey(), WorkloadKey()
    with pytest.raises(IdentityError, match="our key"):
        check_issued(key, ME, _issue(ca, stranger), ca.bundle_pem, ca.key_sha256, NOW)
    other = CertificateAuthority.create_root("mesh.local", NOW)
    with pytest.raises(IdentityError, match="chain"):
        check_issued(key, ME, _issue(other, key), ca.bundle_pem, None, NOW)


def test_a_certificate_for_another_identity_or_out_of_date_is_refused(ca) -> None:
    key = WorkloadKey()
    pem = _issue(ca, key)
    with pytest.raises(IdentityError, match="expected exactly"):
        check_issued(key, SpiffeId("mesh.local", "inventory"), pem, ca.bundle_pem, None, NOW)
    with pytest.raises(IdentityError, match="not valid now"):
        check_issued(key, ME, pem, ca.bundle_pem, None, NOW + 2 * HOUR)


def test_memory_files_load_into_ssl_from_proc_fd_paths_and_vanish_on_close(ca) -> None:
    key = WorkloadKey()
    mem = MemoryTlsFiles(_issue(ca, key), key, ca.bundle_pem)
    try:
        assert all(p.startswith("/proc/self/fd/") for p in (mem.files.cert, mem.files.key,
                                                             mem.files.ca))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(mem.files.cert, mem.files.key)
        ctx.load_verify_locations(cafile=mem.files.ca)
        assert "in memory" in repr(key) and b"PRIVATE" not in repr(key).encode()
    finally:
        mem.close()
    with pytest.raises(OSError):
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(mem.files.cert, mem.files.key)
