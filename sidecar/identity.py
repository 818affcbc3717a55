"""The sidecar's own identity in dynamic mode: its key, its CSRs, the checks on what the
control plane answers, and certificate files that exist only in memory.

This process never imports ``cryptography`` (its native library costs about 8 MB of RSS):
the key is made, CSRs are signed and answers are checked by a short-lived helper process of
the sidecar, ``python -m sidecar.certwork`` (one per piece of work, see that module for its
JSON protocol). The key travels only over the pipe between the two: it is never written to
disk, put in argv or the environment, or logged. Here it is kept as PEM bytes in memory, and
Python's ssl (which loads keys only from paths) gets it through an anonymous in-memory file
(``os.memfd_create``) read via ``/proc/self/fd/N``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import json
import os
import sys
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh_common.spiffe import SpiffeId

from .tls import TlsFiles

HELPER_TIMEOUT_S = 30.0
"""A helper run that has not answered within this many seconds is killed (IdentityError)."""
HELPER_MODULE = "sidecar.certwork"
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
"""The directory that holds the ``sidecar`` package (the helper's PYTHONPATH and cwd)."""
_MAX_ERROR_CHARS = 300


class IdentityError(Exception):
    """What the control plane answered cannot be trusted or used, or the helper process could
    not do its work; the message (one line) says why."""


async def _certwork(request: dict[str, Any]) -> dict[str, Any]:
    """One run of ``python -m sidecar.certwork``: ``request`` as JSON on its stdin, its JSON
    answer (``ok`` true) returned. Raises IdentityError with the helper's one line when its
    answer is ``ok`` false, and saying so when it cannot start, fails, answers garbage or
    does not answer within ``HELPER_TIMEOUT_S`` (then it is killed; so it is when the caller
    is cancelled). The request and answer may hold the key: neither is ever logged or put in
    an error."""
    timeout_s = HELPER_TIMEOUT_S
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", HELPER_MODULE, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
            cwd=_PACKAGE_ROOT)
    except OSError as exc:
        raise IdentityError(f"cannot start the certificate helper ({HELPER_MODULE}): "
                            f"{exc.strerror or exc}") from None
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate(json.dumps(request).encode())
    except TimeoutError:
        raise IdentityError(f"the certificate helper ({HELPER_MODULE}) did not answer within "
                            f"{timeout_s:g} s (killed)") from None
    finally:
        if proc.returncode is None:  # timed out or cancelled: it must not outlive the call
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            await asyncio.shield(proc.wait())
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        last = lines[-1][:_MAX_ERROR_CHARS] if lines else "no message"
        raise IdentityError(f"the certificate helper ({HELPER_MODULE}) failed (exit "
                            f"{proc.returncode}): {last}")
    try:
        answer = json.loads(out)
        if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
            raise ValueError
    except ValueError:
        raise IdentityError(f"the certificate helper ({HELPER_MODULE}) answered something "
                            "that is not an answer") from None
    if not answer["ok"]:
        raise IdentityError(" ".join(str(answer.get("error", "no reason given")).split())
                            [:_MAX_ERROR_CHARS])
    return answer


async def in_process(request: dict[str, Any]) -> dict[str, Any]:
    """The helper's work done in this process (it loads ``cryptography``), with the same
    answers and errors as ``_certwork``: for a simulator that runs many identities in one
    process (``bench.cp_sim``). The sidecar never uses it."""
    from . import certwork

    answer = certwork.respond(json.loads(json.dumps(request)))
    if not answer["ok"]:
        raise IdentityError(str(answer["error"])[:_MAX_ERROR_CHARS])
    return answer


CertWork = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
runner: CertWork = _certwork
"""Who does the key and certificate work: the helper process (``_certwork``), or
``in_process`` where a simulator says so."""


def _malformed_answer(what: str) -> IdentityError:
    return IdentityError(f"the certificate helper ({HELPER_MODULE}) answered without a "
                         f"usable {what}")


class WorkloadKey:
    """Our ECDSA P-256 private key as PKCS#8 PEM bytes, held in this process's memory only
    (made by the helper process, see ``generate``). Its repr never shows the key."""

    __slots__ = ("_pem",)

    def __init__(self, key_pem: bytes) -> None:
        self._pem = key_pem

    def __repr__(self) -> str:
        return "WorkloadKey(<in memory>)"

    @classmethod
    async def generate(cls, spiffe_id: SpiffeId) -> tuple[WorkloadKey, bytes]:
        """A new key and its first CSR (DER) for ``spiffe_id``, from one helper run.
        Raises IdentityError when the helper cannot do it."""
        answer = await runner({"op": "csr", "spiffe_uri": spiffe_id.uri,
                                  "service": spiffe_id.service, "key_pem": None})
        key_pem = answer.get("key_pem")
        if not isinstance(key_pem, str) or "PRIVATE KEY" not in key_pem:
            raise _malformed_answer("key")
        return cls(key_pem.encode("ascii")), _csr_of(answer)

    async def csr_der(self, spiffe_id: SpiffeId) -> bytes:
        """A PKCS#10 request (DER) for ``spiffe_id``, signed with this key (a helper run).
        Raises IdentityError when the helper cannot do it."""
        answer = await runner({"op": "csr", "spiffe_uri": spiffe_id.uri,
                                  "service": spiffe_id.service,
                                  "key_pem": self._pem.decode("ascii")})
        return _csr_of(answer)

    def private_pem(self) -> bytes:
        """The key, PKCS#8 PEM, unencrypted: for ssl only, never for a file or log."""
        return self._pem


def _csr_of(answer: dict[str, Any]) -> bytes:
    try:
        csr = base64.b64decode(str(answer["csr_der_b64"]), validate=True)
    except (KeyError, binascii.Error):
        raise _malformed_answer("CSR") from None
    if not csr:
        raise _malformed_answer("CSR")
    return csr


@dataclass(frozen=True)
class TrustFields:
    """What a sidecar reports of its identity (``Register``, ``StateReport``): the
    certificate's serial (lower-case hex), the SHA-256 (hex) of its trust bundle's PEM bytes
    and of the DER of the CA certificate that issued it ("" = not in the bundle)."""

    cert_serial: str = ""
    bundle_sha256: str = ""
    issuer_sha256: str = ""


@dataclass(frozen=True)
class Issued:
    """A certificate and trust bundle that passed ``check_issued``: the certificate's
    validity (aware UTC datetimes), what is reported of it, and the SHA-256 (hex) of each
    CA public key in the bundle (the pins it satisfies)."""

    not_valid_before_utc: dt.datetime
    not_valid_after_utc: dt.datetime
    trust: TrustFields
    bundle_key_hashes: frozenset[str]


async def check_issued(key: WorkloadKey, spiffe_id: SpiffeId, cert_pem: bytes,
                       bundle_pem: bytes, pinned_ca_sha256: str | Collection[str] | None,
                       now: dt.datetime) -> Issued:
    """Accept a certificate and trust bundle only if the bundle carries a pinned CA key
    (when pins are given, as when joining with a token: the token's, and when joining again
    the CA keys already trusted), the certificate chains to the bundle, carries our own
    public key and exactly our SPIFFE ID, and is valid at ``now`` (aware). The checks run in
    the helper process. Returns what was accepted; raises IdentityError naming the failed
    check, or saying that the helper could not run or did not answer in time."""
    if pinned_ca_sha256 is None:
        pins: list[str] | None = None
    elif isinstance(pinned_ca_sha256, str):
        pins = [pinned_ca_sha256]
    else:
        pins = sorted(pinned_ca_sha256)
    try:
        request = {"op": "check", "key_pem": key.private_pem().decode("ascii"),
                   "spiffe_uri": spiffe_id.uri, "cert_pem": cert_pem.decode("ascii"),
                   "bundle_pem": bundle_pem.decode("ascii"), "pins": pins,
                   "now_unix": now.timestamp()}
    except UnicodeDecodeError:
        raise IdentityError("unreadable certificate or bundle: not PEM text") from None
    answer = await runner(request)
    try:
        return Issued(
            dt.datetime.fromtimestamp(float(answer["not_before_unix"]), dt.UTC),
            dt.datetime.fromtimestamp(float(answer["not_after_unix"]), dt.UTC),
            TrustFields(str(answer["cert_serial"]), str(answer["bundle_sha256"]),
                        str(answer["issuer_sha256"])),
            frozenset(str(h) for h in answer["bundle_key_hashes"]))
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        raise _malformed_answer("check result") from None


def renew_at(issued: Issued, fraction: float = 2 / 3,
             received: dt.datetime | None = None) -> dt.datetime:
    """When to renew: ``fraction`` of the way through the certificate's life. The CA backdates
    ``not_before`` for clock skew; pass ``received`` (when the certificate arrived) to count
    the life from then instead, so a short-lived certificate is not renewed at once."""
    start, end = issued.not_valid_before_utc, issued.not_valid_after_utc
    if received is not None:
        start = min(max(start, received), end)
    return start + (end - start) * fraction


class MemoryTlsFiles:
    """Certificate, key and bundle as anonymous in-memory files, usable as ``TlsFiles``.

    ``close()`` releases them; a new identity gets new files (the relay's TLS state reloads
    from the new paths, connections already open keep theirs).
    """

    def __init__(self, cert_pem: bytes, key: WorkloadKey, bundle_pem: bytes) -> None:
        self._fds = [_memfd("mesh-cert", cert_pem), _memfd("mesh-key", key.private_pem()),
                     _memfd("mesh-ca", bundle_pem)]
        cert, key_path, ca = (f"/proc/self/fd/{fd}" for fd in self._fds)
        self.files = TlsFiles(cert=cert, key=key_path, ca=ca)

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
