"""The CA's CSR checks and issuance, its CA dir, and join tokens and proofs."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from control_plane import ca as CA
from mesh_common import jointoken as JT

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


@pytest.fixture(scope="module")
def authority() -> CA.CertificateAuthority:
    return CA.CertificateAuthority.create_root("mesh.local", NOW)


def _csr(key, uris: tuple[str, ...] = (), cn: str = "payment") -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, cn)]))
    if uris:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _p256():
    return ec.generate_private_key(ec.SECP256R1())


def test_a_valid_csr_gets_a_spiffe_certificate_chained_to_the_ca(authority) -> None:
    key = _p256()
    issued = authority.sign_workload_csr(_csr(key, ("spiffe://mesh.local/service/payment",)),
                                         "payment", NOW, HOUR)
    cert = x509.load_pem_x509_certificate(issued.pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://mesh.local/service/payment"]  # exactly one URI SAN
    assert san.get_values_for_type(x509.DNSName) == ["payment.mesh.local"]
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.not_valid_after_utc == NOW + HOUR and issued.serial == cert.serial_number
    cert.verify_directly_issued_by(authority.cert)  # raises if the chain is wrong
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_csr_without_san_is_issued_the_callers_identity(authority) -> None:
    issued = authority.sign_workload_csr(_csr(_p256()), "payment", NOW, HOUR)
    assert issued.spiffe_id == "spiffe://mesh.local/service/payment"


def test_a_csr_with_a_wrong_signature_is_refused(authority) -> None:
    der = bytearray(_csr(_p256()))
    der[-3] ^= 0x01  # inside the signature value
    with pytest.raises(CA.CsrError) as err:
        authority.sign_workload_csr(bytes(der), "payment", NOW, HOUR)
    assert err.value.code == "INVALID_ARGUMENT"
    assert "signature" in err.value.message or "not a valid" in err.value.message


def test_a_csr_for_another_identity_is_refused(authority) -> None:
    csr = _csr(_p256(), ("spiffe://mesh.local/service/inventory",))
    with pytest.raises(CA.CsrError) as err:
        authority.sign_workload_csr(csr, "payment", NOW, HOUR)
    assert err.value.code == "PERMISSION_DENIED"
    assert "service/inventory" in err.value.message and "service/payment" in err.value.message


@pytest.mark.parametrize("key", [rsa.generate_private_key(65537, 2048),
                                 ec.generate_private_key(ec.SECP384R1())],
                         ids=["rsa", "p384"])
def test_a_csr_with_a_bad_key_type_is_refused(authority, key) -> None:
    with pytest.raises(CA.CsrError) as err:
        authority.sign_workload_csr(_csr(key), "payment", NOW, HOUR)
    assert (err.value.code, err.value.message) == ("INVALID_ARGUMENT", "CSR key must be ECDSA P-256")


@pytest.mark.parametrize("junk", [b"", b"garbage", b"-----BEGIN CERTIFICATE REQUEST-----\nxx\n"])
def test_garbage_is_not_a_csr(authority, junk: bytes) -> None:
    with pytest.raises(CA.CsrError) as err:
        authority.sign_workload_csr(junk, "payment", NOW, HOUR)
    assert err.value.code == "INVALID_ARGUMENT"


def test_a_bad_service_name_is_refused(authority) -> None:
    with pytest.raises(CA.CsrError) as err:
        authority.sign_workload_csr(_csr(_p256()), "no/slashes", NOW, HOUR)
    assert err.value.code == "INVALID_ARGUMENT"


def test_the_ca_dir_is_created_once_with_private_keys_0600(tmp_path: Path) -> None:
    ca_dir = tmp_path / "certs"
    first = CA.load_or_create(ca_dir, "mesh.local", NOW)
    for name in (CA.CA_KEY_FILE, CA.ADMIN_KEY_FILE, CA.ADMIN_CERT_FILE):
        assert stat.S_IMODE((ca_dir / name).stat().st_mode) == 0o600, name
    admin = x509.load_pem_x509_certificate((ca_dir / CA.ADMIN_CERT_FILE).read_bytes())
    uris = admin.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == ["spiffe://mesh.local/admin/meshctl"]
    again = CA.load_or_create(ca_dir, "mesh.local", NOW + HOUR)
    assert again.key_sha256 == first.key_sha256  # loaded, not made anew
    assert (ca_dir / CA.CA_CERT_FILE).read_bytes() == first.bundle_pem


def test_a_mismatched_key_is_refused_naming_the_file(tmp_path: Path) -> None:
    a = CA.load_or_create(tmp_path / "a", "mesh.local", NOW)
    CA.load_or_create(tmp_path / "b", "mesh.local", NOW)
    with pytest.raises(ValueError, match="does not match"):
        CA.load(tmp_path / "a" / CA.CA_CERT_FILE, tmp_path / "b" / CA.CA_KEY_FILE, "mesh.local")
    assert a.key_sha256


# ---------------------------------------------------------------------- join tokens
def test_a_token_round_trips_and_never_shows_its_secret(authority) -> None:
    token = JT.new_token(authority.key_sha256, "127.0.0.1:15011", "127.0.0.1:15010")
    text = token.encode()
    assert text.startswith("mesh1.") and JT.parse_token(text) == token
    assert token.secret.hex() not in repr(token) and str(token.secret) not in repr(token)


@pytest.mark.parametrize("text, fault", [
    ("", "prefix"), ("kube.abc", "prefix"), ("mesh1.!!!", "corrupt"),
    ("mesh1.e30", "missing"),  # {}
])
def test_malformed_tokens_say_what_is_wrong(text: str, fault: str) -> None:
    with pytest.raises(JT.TokenError, match=fault):
        JT.parse_token(text)


def test_a_token_with_a_bad_field_is_refused(authority) -> None:
    good = JT.new_token(authority.key_sha256, "127.0.0.1:15011", "127.0.0.1:15010")
    bad = JT.JoinToken(good.token_id, good.secret, "nothex", good.join_address, good.api_address)
    with pytest.raises(JT.TokenError, match="CA key hash"):
        JT.parse_token(bad.encode())


def test_the_join_proof_binds_secret_and_csr() -> None:
    secret, other = b"s" * 32, b"t" * 32
    csr_a, csr_b = _csr(_p256()), _csr(_p256())
    proof = JT.join_proof(secret, csr_a)
    stored = JT.secret_digest(secret)  # all the control plane keeps
    assert JT.check_join_proof(stored, csr_a, proof)
    assert not JT.check_join_proof(JT.secret_digest(other), csr_a, proof)  # wrong secret
    assert not JT.check_join_proof(stored, csr_b, proof)  # another CSR
    assert not JT.check_join_proof("not hex", csr_a, proof)
    assert stored != secret.hex() and len(stored) == 64


def test_the_bundle_hash_check_pins_the_ca(authority) -> None:
    other = CA.CertificateAuthority.create_root("mesh.local", NOW)
    assert JT.bundle_matches(authority.bundle_pem, authority.key_sha256)
    assert not JT.bundle_matches(other.bundle_pem, authority.key_sha256)
    assert not JT.bundle_matches(b"not a bundle", authority.key_sha256)
    assert JT.ca_key_sha256(authority.bundle_pem) == authority.key_sha256
