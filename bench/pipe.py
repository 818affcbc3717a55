"""``python -m bench.pipe --listen PORT --upstream HOST:PORT [--tls-in CERT KEY CA] [--tls-out CERT KEY CA]``

A byte pipe with the sidecar's I/O stack and nothing else: uvloop, TLS by uvloop's
SSLProtocol (ALPN h2; ``--tls-in`` requires a client certificate from CA, ``--tls-out``
presents one and checks the upstream's against CA and ``bench.certs.SERVER_NAME``), one
upstream connection per accepted one, every read written on at once. No HTTP/2 parsing, no
per-call work: two of them in the mesh's 2-hop shape are the floor any relay written in Python
on this stack can reach (``bench.floor``). Prints a JSON ready line with the port, then runs
until killed.
"""

from __future__ import annotations

import asyncio
import json
import ssl

import uvloop

from bench.certs import SERVER_NAME
from mesh_common.cli_args import OneLineArgumentParser


class Pipe(asyncio.Protocol):
    """One side of a pipe: what it reads goes to ``peer``'s transport (held until it has one)."""

    def __init__(self) -> None:
        self.peer: Pipe | None = None
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        for data in self.pending:
            self.transport.write(data)  # type: ignore[union-attr]
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        assert peer is not None
        if peer.transport is None:
            peer.pending.append(data)
        else:
            peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


def _tls(files: list[str] | None, server: bool) -> ssl.SSLContext | None:
    if files is None:
        return None
    cert, key, ca = files
    purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
    ctx = ssl.create_default_context(purpose, cafile=ca)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    if server:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def serve(port: int, upstream: tuple[str, int], tls_in: ssl.SSLContext | None,
                tls_out: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()

    def accepted() -> Pipe:
        down, up = Pipe(), Pipe()
        down.peer, up.peer = up, down

        async def connect() -> None:
            try:
                await loop.create_connection(lambda: up, *upstream, ssl=tls_out,
                                             server_hostname=SERVER_NAME if tls_out else None)
            except OSError:
                if down.transport is not None:
                    down.transport.close()
        loop.create_task(connect())
        return down

    server = await loop.create_server(accepted, "127.0.0.1", port, ssl=tls_in)
    bound = server.sockets[0].getsockname()[1]
    print(json.dumps({"ready": {"port": bound}}), flush=True)
    await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = OneLineArgumentParser(prog="python -m bench.pipe")
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="HOST:PORT")
    ap.add_argument("--tls-in", nargs=3, metavar=("CERT", "KEY", "CA"))
    ap.add_argument("--tls-out", nargs=3, metavar=("CERT", "KEY", "CA"))
    args = ap.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    uvloop.run(serve(args.listen, (host, int(port)), _tls(args.tls_in, True),
                     _tls(args.tls_out, False)))


if __name__ == "__main__":
    main()
