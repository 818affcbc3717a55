"""TLS for the sidecar: mTLS contexts from certificate files, swapped at run time.

The inbound context requires a client certificate chained to the mesh CA; the outbound
context presents ours and verifies the upstream's chain (its SPIFFE ID is checked by the
connector, not by hostname). Reloading keeps the server context object (new handshakes get
the new chain, connections already open keep theirs) and builds a new client context.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass

log = logging.getLogger("mesh.sidecar.tls")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Paths of our certificate chain, its private key and the mesh CA bundle (PEM)."""

    cert: str
    key: str
    ca: str

    def mtimes(self) -> tuple[float, float, float]:
        return tuple(os.stat(p).st_mtime_ns for p in (self.cert, self.key, self.ca))  # type: ignore[return-value]


def _base(ctx: ssl.SSLContext, files: TlsFiles) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.cert, files.key)
    ctx.load_verify_locations(cafile=files.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    return ctx


def server_context(files: TlsFiles) -> ssl.SSLContext:
    return _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), files)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # identity is the SPIFFE URI SAN, checked after the handshake
    return _base(ctx, files)


class TlsState:
    """The current contexts; ``reload`` picks up new files (raising leaves the old ones)."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.server = server_context(files)
        self.client = client_context(files)
        self._mtimes = files.mtimes()
        self.reloads = 0

    def reload(self) -> None:
        """Load the files again. A broken file raises and changes nothing."""
        client = client_context(self.files)  # validates the files first
        self.server.load_cert_chain(self.files.cert, self.files.key)
        self.server.load_verify_locations(cafile=self.files.ca)
        self.client = client
        self._mtimes = self.files.mtimes()
        self.reloads += 1
        log.info("certificates reloaded from %s", self.files.cert)

    def swap(self, files: TlsFiles) -> None:
        """Use other files from now on (a renewed identity): new handshakes get them,
        connections already open keep theirs. Files that do not load raise and change nothing."""
        old = self.files
        self.files = files
        try:
            self.reload()
        except BaseException:
            self.files = old
            raise

    def reload_if_changed(self) -> bool:
        try:
            mtimes = self.files.mtimes()
        except OSError:
            return False
        if mtimes == self._mtimes:
            return False
        try:
            self.reload()
        except (OSError, ssl.SSLError) as exc:
            log.warning("certificate files changed but could not be loaded (keeping the old ones): %s", exc)
            self._mtimes = mtimes
            return False
        return True
