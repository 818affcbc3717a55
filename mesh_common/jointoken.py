"""Join tokens and join proofs (kubeadm-style bootstrap), as pure functions.

A token carries its id, a secret, the SHA-256 of the CA's public key and the control plane's
join and API addresses, so it is all a sidecar needs to join. The secret never travels: the
sidecar proves it holds it with an HMAC-SHA256 of its CSR keyed by SHA-256(secret), which
also binds the proof to that CSR. The control plane stores only that digest, never the
secret, and checks the proof with it (so a stolen database could forge joins until its tokens
expire, as with any symmetric check; the secret itself is never recoverable). The answer
(certificate, trust bundle) is accepted only when the bundle's CA key hash equals the
token's.

The join listener is plaintext, so the pin alone authenticates only the pinned CA: a bundle
that carries the pinned CA *and* another one (with a certificate from that other one) passes
a check that only asks for the pin somewhere in the bundle. The control plane therefore also
authenticates its whole answer: ``answer_mac`` is an HMAC-SHA256, keyed (through a derived
key, so a proof can never pass for an answer MAC or the reverse) by the same SHA-256(secret),
over the CSR it answers and every field of the answer; it travels in the Join's trailing
metadata ``ANSWER_MAC_METADATA``. A sidecar holding the secret checks it with
``check_answer_mac`` before it trusts anything in the answer.

No I/O here; the X.509 helpers import ``cryptography`` when called.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass

PREFIX = "mesh1."
ANSWER_MAC_METADATA = "mesh-join-mac-bin"
"""Trailing metadata key (binary) of the Join's answer MAC (``answer_mac``)."""
_ANSWER_KEY_LABEL = b"mesh-join-answer-v1"
_ID = re.compile(r"^[a-z0-9]{6,32}$")
_HASH = re.compile(r"^[0-9a-f]{64}$")
_ADDR = re.compile(r"^[A-Za-z0-9.\-\[\]:]{3,255}:[0-9]{1,5}$")
SECRET_BYTES = 32


class TokenError(ValueError):
    """A malformed token string (the message never contains the secret)."""


@dataclass(frozen=True)
class JoinToken:
    """A parsed token. ``secret`` is the raw key of the join proof; never log it."""

    token_id: str
    secret: bytes
    ca_key_sha256: str
    join_address: str
    api_address: str

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return (f"JoinToken(id={self.token_id!r}, ca={self.ca_key_sha256[:12]}…, "
                f"join={self.join_address!r}, api={self.api_address!r})")

    def encode(self) -> str:
        """The token string: ``mesh1.`` + base64url(JSON), no padding."""
        doc = {"id": self.token_id, "s": _b64(self.secret), "ca": self.ca_key_sha256,
               "join": self.join_address, "api": self.api_address}
        raw = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        return PREFIX + _b64(raw)


def new_token(ca_key_sha256: str, join_address: str, api_address: str) -> JoinToken:
    """A fresh token with a random id (12 chars) and a 32-byte secret."""
    token_id = secrets.token_hex(6)
    token = JoinToken(token_id, secrets.token_bytes(SECRET_BYTES), ca_key_sha256,
                      join_address, api_address)
    _validate(token)
    return token


def parse_token(text: str) -> JoinToken:
    """Parse a token string; raises TokenError saying what is wrong (never echoing it)."""
    if not isinstance(text, str):
        raise TokenError("a join token must be a string")
    text = text.strip()
    if not text.startswith(PREFIX):
        raise TokenError(f"not a mesh join token (expected the {PREFIX!r} prefix)")
    try:
        doc = json.loads(_unb64(text[len(PREFIX):]))
    except (ValueError, binascii.Error):
        raise TokenError("join token is corrupt (not base64url JSON)") from None
    if not isinstance(doc, dict):
        raise TokenError("join token is corrupt (not an object)")
    try:
        token = JoinToken(str(doc["id"]), _unb64(str(doc["s"])), str(doc["ca"]),
                          str(doc["join"]), str(doc["api"]))
    except (KeyError, ValueError, binascii.Error):
        raise TokenError("join token is missing a field or has a bad one") from None
    _validate(token)
    return token


def _validate(token: JoinToken) -> None:
    if not _ID.match(token.token_id):
        raise TokenError("join token has a malformed id")
    if len(token.secret) != SECRET_BYTES:
        raise TokenError("join token has a secret of the wrong length")
    if not _HASH.match(token.ca_key_sha256):
        raise TokenError("join token has a malformed CA key hash (want 64 hex digits)")
    for name, addr in (("join", token.join_address), ("api", token.api_address)):
        if not _ADDR.match(addr):
            raise TokenError(f"join token has a malformed {name} address")


def secret_digest(secret: bytes) -> str:
    """What the control plane stores instead of the secret (SHA-256, hex): the proof key."""
    return hashlib.sha256(secret).hexdigest()


def join_proof(secret: bytes, csr_der: bytes) -> bytes:
    """The sidecar's proof: HMAC-SHA256 of the CSR (DER) keyed by SHA-256(secret)."""
    return hmac.new(hashlib.sha256(secret).digest(), csr_der, hashlib.sha256).digest()


def check_join_proof(stored_digest: str, csr_der: bytes, proof: bytes) -> bool:
    """The control plane's constant-time check, with the stored ``secret_digest``."""
    try:
        key = bytes.fromhex(stored_digest)
    except ValueError:
        return False
    expected = hmac.new(key, csr_der, hashlib.sha256).digest()
    return hmac.compare_digest(expected, proof)


def _answer_message(csr_der: bytes, fields: tuple[str, ...]) -> bytes:
    parts = [csr_der, *(f.encode() for f in fields)]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _answer_mac(proof_key: bytes, csr_der: bytes, certificate_pem: str, trust_bundle_pem: str,
                spiffe_id: str, otlp_endpoint: str) -> bytes:
    key = hmac.new(proof_key, _ANSWER_KEY_LABEL, hashlib.sha256).digest()
    message = _answer_message(csr_der, (certificate_pem, trust_bundle_pem, spiffe_id,
                                        otlp_endpoint))
    return hmac.new(key, message, hashlib.sha256).digest()


def answer_mac(stored_digest: str, csr_der: bytes, certificate_pem: str, trust_bundle_pem: str,
               spiffe_id: str, otlp_endpoint: str) -> bytes:
    """The control plane's MAC over its Join answer (32 bytes): HMAC-SHA256 with a key
    derived from the stored ``secret_digest`` (HMAC of ``mesh-join-answer-v1``), over the
    CSR answered and the answer's fields, each length-prefixed (4 bytes, big-endian), in
    this order. Binds the answer to this join (its CSR) and to the token's secret. Raises
    ValueError for a digest that is not hex."""
    return _answer_mac(bytes.fromhex(stored_digest), csr_der, certificate_pem,
                       trust_bundle_pem, spiffe_id, otlp_endpoint)


def check_answer_mac(secret: bytes, csr_der: bytes, certificate_pem: str,
                     trust_bundle_pem: str, spiffe_id: str, otlp_endpoint: str,
                     mac: bytes) -> bool:
    """The sidecar's constant-time check of ``answer_mac`` with the token's ``secret``:
    True only when the answer is exactly what the control plane holding the token's digest
    sent for this CSR."""
    expected = _answer_mac(hashlib.sha256(secret).digest(), csr_der, certificate_pem,
                           trust_bundle_pem, spiffe_id, otlp_endpoint)
    return hmac.compare_digest(expected, bytes(mac))


def ca_key_sha256(ca_cert_pem: bytes) -> str:
    """SHA-256 (hex) of the first certificate's SubjectPublicKeyInfo (DER): the token's pin.
    Raises ValueError for a PEM that holds no certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(ca_cert_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def bundle_matches(bundle_pem: bytes, expected_sha256: str) -> bool:
    """True when some certificate of the trust bundle has the pinned CA key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certs = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError:
        return False
    for cert in certs:
        spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        if hmac.compare_digest(hashlib.sha256(spki).hexdigest(), expected_sha256):
            return True
    return False


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
