"""``python -m bench.pipe --listen PORT --upstream HOST:PORT [--tls-in CERT KEY CA] [--tls-out CERT KEY CA] [--frames]``

A byte pipe with the sidecar's I/O stack and nothing else: uvloop, TLS by uvloop's
SSLProtocol (ALPN h2; ``--tls-in`` requires a client certificate from CA, ``--tls-out``
presents one and checks the upstream's against CA and ``bench.certs.SERVER_NAME``), one
upstream connection per accepted one, every read written on at once. No HTTP/2 parsing, no
per-call work: two of them in the mesh's 2-hop shape are the floor any relay written in Python
on this stack can reach (``bench.floor``). Prints a JSON ready line with the port, then runs
until killed.

``--frames``: the pipe also walks the HTTP/2 frames it carries and does the least an HTTP/2
relay does per call (``FramePipe``), still writing every whole frame on unchanged: the floor
of a relay that understands HTTP/2 at all (``bench.floor``'s ``pipe-h2``).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import struct

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


_HEADER = struct.Struct(">HBBBL")
BLOCKS_MAX = 256
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class FramePipe(Pipe):
    """A pipe that walks the HTTP/2 frames it carries (one upstream connection per downstream
    one, so stream ids, HPACK state and settings pass through unchanged) and does the least a
    relay does with a call: each HEADERS block looked up in a cache of blocks (what routing
    reads), a record per stream (made at its request's first HEADERS, dropped at its
    response's trailers, the HEADERS with END_STREAM that end every gRPC response; a reset
    stream's record stays, which a diagnostic run of minutes can afford), DATA counted
    against the stream and the connection. Only whole frames are written on; a frame split
    across reads waits for its rest."""

    def __init__(self, streams: dict[int, list[int]], blocks: dict[bytes, int],
                 response: bool) -> None:
        super().__init__()
        self.streams = streams
        self.blocks = blocks
        self.response = response
        self.carry = b""
        self.window = 0
        self.preface = 0 if response else len(PREFACE)
        """Bytes of the client's connection preface still to pass (not a frame)."""

    def data_received(self, data: bytes) -> None:
        if self.carry:
            data, self.carry = self.carry + data, b""
        unpack = _HEADER.unpack_from
        streams = self.streams
        pos, n = 0, len(data)
        if self.preface:
            pos = min(n, self.preface)
            self.preface -= pos
        while n - pos >= 9:
            hi, lo, ftype, flags, sid = unpack(data, pos)
            end = pos + 9 + ((hi << 8) | lo)
            if end > n:
                break
            if ftype == 0:  # DATA
                st = streams.get(sid)
                if st is not None:
                    st[self.response] += end - pos - 9
                self.window -= end - pos - 9
            elif ftype == 1:  # HEADERS
                block = data[pos + 9:end]
                if self.blocks.get(block) is None and len(self.blocks) < BLOCKS_MAX:
                    self.blocks[block] = len(self.blocks)
                if not self.response and sid not in streams:
                    streams[sid] = [0, 0]
                elif self.response and flags & 1:
                    streams.pop(sid, None)
            pos = end
        if pos < n:
            self.carry = data[pos:]
            data = data[:pos]
        if data:
            super().data_received(data)


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
                tls_out: ssl.SSLContext | None, frames: bool = False) -> None:
    loop = asyncio.get_running_loop()
    blocks: dict[bytes, int] = {}

    def accepted() -> Pipe:
        if frames:
            streams: dict[int, list[int]] = {}
            down: Pipe = FramePipe(streams, blocks, False)
            up: Pipe = FramePipe(streams, blocks, True)
        else:
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
    ap.add_argument("--frames", action="store_true", help="walk the HTTP/2 frames (FramePipe)")
    args = ap.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    uvloop.run(serve(args.listen, (host, int(port)), _tls(args.tls_in, True),
                     _tls(args.tls_out, False), args.frames))


if __name__ == "__main__":
    main()
