"""TLS for the sidecar: mTLS contexts from certificate files, swapped at run time.

The inbound context requires a client certificate chained to the mesh CA; the outbound
context presents ours and verifies the upstream's chain (its SPIFFE ID is checked by the
connector, not by hostname). Reloading builds a new server and a new client context from
the files, certificate and trust bundle together, and swaps both at once: the listener keeps
one "front" server context whose SNI callback (called at every ClientHello) moves each new
handshake onto the current server context, so a bundle that drops a CA (the end of a CA
rotation) stops trusting it at once for new connections, while connections already open
keep theirs. The cost is one attribute assignment per handshake, none per call.
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
    """The current contexts; ``reload`` picks up new files (raising leaves the old ones).

    ``server`` is the front context listeners are built with (it never changes; each
    handshake is moved onto ``server_current``); ``client`` is the context for new outbound
    connections (a new object at each reload)."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.server = server_context(files)
        self.server_current = self.server
        self.server.sni_callback = self._select
        self.client = client_context(files)
        self._mtimes = files.mtimes()
        self.reloads = 0

    def _select(self, ssl_obj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                front: ssl.SSLContext) -> None:
        """SNI callback of the front context: hand the handshake to the current context
        (certificate, key and trusted CAs of the last reload)."""
        current = self.server_current
        if current is not front:
            ssl_obj.context = current

    def reload(self) -> None:
        """Load the files again: certificate, key and trust bundle together, for new
        handshakes in both directions. A broken file raises and changes nothing."""
        client = client_context(self.files)  # validates the files first
        server = server_context(self.files)
        self.server_current, self.client = server, client
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
