"""The benchmark backend: meshtest.Echo on grpc.aio under uvloop, h2c on 127.0.0.1.

    python -m bench.backend [--port 0]

Prints one stdout line ``{"ready": {"port": P}}`` once it serves (the sidecar's convention),
stops on SIGTERM/SIGINT. Unary echoes the payload; ClientStream consumes the stream and answers
with the total payload size in bytes (decimal ASCII in ``payload``); Bidi echoes each message.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator

import grpc
import uvloop

from mesh_common.cli_args import OneLineArgumentParser
from protos.meshtest import echo_pb2, echo_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class BenchEcho(echo_pb2_grpc.EchoServicer):
    """Minimal per-call work, so the figures measure the path, not the backend."""

    async def Unary(self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext) -> echo_pb2.EchoResponse:
        return echo_pb2.EchoResponse(payload=request.payload)

    async def ClientStream(
        self, request_iterator: AsyncIterator[echo_pb2.EchoRequest], context: grpc.aio.ServicerContext
    ) -> echo_pb2.EchoResponse:
        total = 0
        async for req in request_iterator:
            total += len(req.payload)
        return echo_pb2.EchoResponse(payload=str(total).encode())

    async def Bidi(
        self, request_iterator: AsyncIterator[echo_pb2.EchoRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[echo_pb2.EchoResponse]:
        async for req in request_iterator:
            yield echo_pb2.EchoResponse(payload=req.payload)


async def serve(port: int) -> None:
    """Serve until SIGTERM/SIGINT; prints the ready line with the bound port."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            # h2load and the proxies keep one connection for the whole run: never cap it.
            ("grpc.max_concurrent_streams", 1000),
        ]
    )
    echo_pb2_grpc.add_EchoServicer_to_server(BenchEcho(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind 127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"ready": {"port": bound}}), flush=True)
    await stop.wait()
    await server.stop(grace=1)


def main(argv: list[str] | None = None) -> int:
    ap = OneLineArgumentParser(
        prog="python -m bench.backend",
        description="meshtest.Echo backend for the benchmark (grpc.aio, uvloop)")
    ap.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any free port)")
    args = ap.parse_args(argv)
    try:
        uvloop.run(serve(args.port))
    except RuntimeError as e:
        print(f"bench.backend: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
