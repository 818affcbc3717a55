"""Who calls the control plane's mTLS listeners, and how an RPC refuses them.

``caller_of`` reads the caller's SPIFFE identity from its verified client certificate: a
workload (``spiffe://<td>/service/<name>``), an admin (``spiffe://<td>/admin/<name>``) or
anything else (kind ""); each service decides what a kind may call. ``abort`` ends an RPC
with a status, ``one_line`` makes a message one line of at most ``MAX_REASON_CHARS``. Shared
by ``server``, ``admin_service`` and ``discovery_service``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

import grpc
from cryptography import x509

from mesh_common.spiffe import SpiffeError, SpiffeId

MAX_REASON_CHARS = 1024       # NACK reasons and query errors are cut to this


@dataclass(frozen=True)
class Caller:
    """Who is calling over mTLS: the URI SAN of the client certificate, and what kind it is."""

    uri: str
    kind: str  # "service", "admin" or "" (anything else)
    name: str


def caller_of(context: grpc.aio.ServicerContext, trust_domain: str) -> Caller:
    """The caller's SPIFFE identity from its (verified) client certificate."""
    auth = context.auth_context()
    uris: list[str] = []
    for pem in auth.get("x509_pem_cert", []):
        try:
            cert = x509.load_pem_x509_certificate(pem)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, x509.ExtensionNotFound):
            continue
        uris += san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        return Caller("<no single SPIFFE ID>", "", "")
    uri = uris[0]
    prefix = f"spiffe://{trust_domain}/"
    if uri.startswith(prefix):
        parts = uri[len(prefix):].split("/")
        if len(parts) == 2 and parts[0] in ("service", "admin"):
            try:
                SpiffeId(trust_domain, parts[1])
            except SpiffeError:
                return Caller(uri, "", "")
            return Caller(uri, parts[0], parts[1])
    return Caller(uri, "", "")


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, msg: str) -> NoReturn:
    await context.abort(code, msg)
    raise AssertionError("unreachable")  # abort raises


def one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_REASON_CHARS else line[:MAX_REASON_CHARS] + "..."
