"""``python -m sidecar.certwork``: the sidecar's short-lived helper for its key and X.509 work.

The sidecar process never imports ``cryptography`` (its native library costs about 8 MB of
RSS for the whole life of the process): it runs this module as a child process for each
piece of key or certificate work, hands it one JSON request on stdin and reads one JSON
answer on stdout (``sidecar.identity`` does that). The private key travels only over that
pipe: it is never written to a file, a log, argv or the environment, and appears on stdout
only as the ``key_pem`` of the answer that made it.

Requests (one JSON object; PEM values are the PEM text, the CSR is base64 of its DER):

* ``{"op": "csr", "spiffe_uri": URI, "service": NAME, "key_pem": PEM | null}``: a new
  ECDSA P-256 key when ``key_pem`` is null (PKCS#8 PEM, unencrypted), and a PKCS#10 request
  signed with it (CN = NAME, one URI SAN). Answer ``{"ok": true, "csr_der_b64": B64}``, plus
  ``"key_pem": PEM`` only when it made the key.
* ``{"op": "check", "key_pem": PEM, "spiffe_uri": URI, "cert_pem": PEM, "bundle_pem": PEM,
  "pins": [HEX, ...] | null, "now_unix": SECONDS}``: the checks of ``check``; answer
  ``{"ok": true, "not_before_unix", "not_after_unix", "cert_serial", "bundle_sha256",
  "issuer_sha256", "bundle_key_hashes": [HEX, ...]}``.

A request whose checks fail gets ``{"ok": false, "error": ONE_LINE}`` (exit 0). A malformed
request (not JSON, not an object, unknown op, a field missing or of the wrong type,
a time that is not one) exits 2 with one line on stderr and nothing on stdout.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
import sys
from collections.abc import Collection
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh_common.jointoken import bundle_matches

MAX_REQUEST_BYTES = 4 * 1024 * 1024
"""A request larger than this (bytes on stdin) is malformed."""
MAX_UNIX_S = 253_402_300_800
"""``now_unix`` must be below this (year 10000) and not negative."""


class CheckFailed(Exception):
    """The key or what the control plane answered cannot be used; the message (one line,
    never key material) says why."""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _load_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    """Our P-256 key from unencrypted PEM; CheckFailed (naming no key bytes) otherwise."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise CheckFailed("unreadable private key (want an unencrypted PKCS#8 PEM)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise CheckFailed("the private key is not an ECDSA P-256 key")
    return key


def make_key_and_csr(spiffe_uri: str, service: str,
                     key_pem: bytes | None) -> tuple[bytes, bytes]:
    """``(key_pem, csr_der)``: the key (a new ECDSA P-256 key as unencrypted PKCS#8 PEM when
    ``key_pem`` is None, else ``key_pem`` itself) and a PKCS#10 request (DER) signed with it,
    subject CN = ``service``, one URI SAN ``spiffe_uri``. Raises CheckFailed for an
    unreadable or non-P-256 key."""
    if key_pem is None:
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    else:
        key = _load_key(key_pem)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_uri)]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return key_pem, csr.public_bytes(serialization.Encoding.DER)


def check(key_pem: bytes, spiffe_uri: str, cert_pem: bytes, bundle_pem: bytes,
          pins: Collection[str] | None, now_unix: float) -> dict[str, Any]:
    """Accept a certificate and trust bundle only if the bundle carries a pinned CA key (when
    ``pins`` is given, as when joining with a token: the token's, and when joining again the
    CA keys already trusted), the certificate chains directly to the bundle, carries the
    public key of ``key_pem`` and exactly the URI SAN ``spiffe_uri``, and is valid at
    ``now_unix`` (Unix seconds). Returns ``not_before_unix``/``not_after_unix`` (Unix
    seconds), ``cert_serial`` (lower-case hex), ``bundle_sha256`` (of the bundle's PEM
    bytes), ``issuer_sha256`` (of the issuing CA certificate's DER) and
    ``bundle_key_hashes`` (sorted SHA-256 hex of each bundle CA's SubjectPublicKeyInfo).
    Raises CheckFailed, one line naming the failed check."""
    if pins is not None and not any(bundle_matches(bundle_pem, pin) for pin in pins):
        raise CheckFailed("the trust bundle's CA key does not match the join token's pin (was "
                          "the mesh's CA rotated after the token was made? then make a new "
                          "token)")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        roots = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError as exc:
        raise CheckFailed(_one_line(f"unreadable certificate or bundle: {exc}")) from None
    issuer = issuer_of(cert, roots)
    if issuer is None:
        raise CheckFailed("the certificate does not chain to the trust bundle")
    ours = _load_key(key_pem).public_key().public_numbers()
    if cert.public_key().public_numbers() != ours:  # type: ignore[union-attr]
        raise CheckFailed("the certificate is not for our key")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CheckFailed("the certificate has no SPIFFE ID") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [spiffe_uri]:
        raise CheckFailed(_one_line(f"the certificate names {uris}, expected exactly "
                                    f"{spiffe_uri}"))
    now = dt.datetime.fromtimestamp(now_unix, dt.UTC)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise CheckFailed("the certificate is not valid now (check the clocks)")
    return {"not_before_unix": cert.not_valid_before_utc.timestamp(),
            "not_after_unix": cert.not_valid_after_utc.timestamp(),
            **trust_fields(cert, bundle_pem),
            "bundle_key_hashes": sorted(bundle_key_hashes(bundle_pem))}


def issuer_of(cert: x509.Certificate,
              roots: Collection[x509.Certificate]) -> x509.Certificate | None:
    """The certificate of ``roots`` that issued ``cert`` directly (None: none did)."""
    return next((ca for ca in roots if _issued_by(cert, ca)), None)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def trust_fields(cert: x509.Certificate, bundle_pem: bytes) -> dict[str, str]:
    """What a sidecar reports of ``cert`` verified with ``bundle_pem``: ``cert_serial``
    (lower-case hex), ``bundle_sha256`` (SHA-256 hex of the bundle's PEM bytes) and
    ``issuer_sha256`` (SHA-256 hex of the DER of the bundle's CA certificate that issued
    ``cert``; "" when none in the bundle did)."""
    try:
        roots = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError:
        roots = []
    issuer = issuer_of(cert, roots)
    return {"cert_serial": format(cert.serial_number, "x"),
            "bundle_sha256": hashlib.sha256(bundle_pem).hexdigest(),
            "issuer_sha256": hashlib.sha256(issuer.public_bytes(serialization.Encoding.DER))
            .hexdigest() if issuer is not None else ""}


def bundle_key_hashes(bundle_pem: bytes) -> set[str]:
    """SHA-256 (hex) of each CA public key (SubjectPublicKeyInfo, DER) in a bundle: the pins
    a bundle satisfies (empty for an unreadable bundle)."""
    try:
        roots = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError:
        return set()
    return {hashlib.sha256(c.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).hexdigest() for c in roots}


# ---------------------------------------------------------------------- the process
class Malformed(Exception):
    """The request is not one this helper understands (exit 2, one line)."""


def _field(req: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = req.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise Malformed(f"the request's {name!r} is missing or of the wrong type")
    return value


def _pem(req: dict[str, Any], name: str) -> bytes:
    try:
        return _field(req, name, str).encode("ascii")
    except UnicodeEncodeError:
        raise Malformed(f"the request's {name!r} is not PEM text (non-ASCII)") from None


def _answer(req: Any) -> dict[str, Any]:
    """The answer to one parsed request; Malformed when it is not a request."""
    if not isinstance(req, dict):
        raise Malformed("the request is not a JSON object")
    op = req.get("op")
    if op == "csr":
        spiffe_uri, service = _field(req, "spiffe_uri", str), _field(req, "service", str)
        given = _pem(req, "key_pem") if req.get("key_pem") is not None else None
        key_pem, csr_der = make_key_and_csr(spiffe_uri, service, given)
        answer: dict[str, Any] = {"ok": True, "csr_der_b64": base64.b64encode(csr_der).decode()}
        if given is None:
            answer["key_pem"] = key_pem.decode("ascii")
        return answer
    if op == "check":
        pins = req.get("pins")
        if pins is not None and not (isinstance(pins, list)
                                     and all(isinstance(p, str) for p in pins)):
            raise Malformed("the request's 'pins' is not null or a list of strings")
        now_unix = float(_field(req, "now_unix", (int, float)))
        if not (math.isfinite(now_unix) and 0 <= now_unix < MAX_UNIX_S):
            raise Malformed("the request's 'now_unix' is not a time (Unix seconds)")
        return {"ok": True, **check(_pem(req, "key_pem"), _field(req, "spiffe_uri", str),
                                    _pem(req, "cert_pem"), _pem(req, "bundle_pem"), pins,
                                    now_unix)}
    raise Malformed(f"unknown op {str(op)[:40]!r} (want 'csr' or 'check')")


def respond(req: Any) -> dict[str, Any]:
    """The answer to one parsed request, ``ok`` false with one line when a check fails or
    the work cannot be done; raises Malformed when ``req`` is not a request."""
    try:
        return _answer(req)
    except CheckFailed as exc:
        return {"ok": False, "error": _one_line(str(exc))}
    except Malformed:
        raise
    except Exception as exc:  # e.g. a certificate cryptography cannot read all of
        return {"ok": False, "error": _one_line(
            f"the certificate work failed: {type(exc).__name__}: {exc}")[:500]}


def main() -> int:
    """Read one request from stdin, write one answer to stdout. Returns the exit status: 0
    for an answer (``ok`` true or false), 2 for a malformed request (one line on stderr)."""
    raw = sys.stdin.buffer.read(MAX_REQUEST_BYTES + 1)
    try:
        if len(raw) > MAX_REQUEST_BYTES:
            raise Malformed(f"the request is larger than {MAX_REQUEST_BYTES} bytes")
        try:
            req = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise Malformed("the request is not JSON") from None
        answer = respond(req)
    except Malformed as exc:
        sys.stderr.write(f"sidecar.certwork: malformed request: {_one_line(str(exc))}\n")
        return 2
    sys.stdout.write(json.dumps(answer, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
