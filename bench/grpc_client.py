"""A real gRPC client (grpcio) for what h2load cannot judge: gRPC status, and streaming.

`verify` sends a sample of unary, client-streaming and bidi calls and raises BenchError on any
non-OK status or wrong answer; `stream_throughput` times one ClientStream of 1 MiB messages.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from bench.paths import BenchPath
from bench.procs import BenchError
from protos.meshtest import echo_pb2, echo_pb2_grpc

MIB = 1024 * 1024
CALL_TIMEOUT_S = 10.0


def open_channel(path: BenchPath) -> grpc.Channel:
    """An insecure channel to the path's entry port, message size limits lifted, with the
    path's :authority when it has one."""
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", -1),
        ("grpc.max_receive_message_length", -1),
    ]
    if path.authority is not None:
        options.append(("grpc.default_authority", path.authority))
    return grpc.insecure_channel(path.target, options=options)


def _fail(path: BenchPath, what: str, err: grpc.RpcError) -> BenchError:
    code = err.code() if isinstance(err, grpc.Call) else "?"
    details = err.details() if isinstance(err, grpc.Call) else str(err)
    return BenchError(f"{path.name} path: {what} failed with gRPC status {code}: {details}")


def verify(path: BenchPath, unary_calls: int = 50, stream_calls: int = 1) -> None:
    """Call the path with grpcio; BenchError on any non-OK status or wrong answer.

    `unary_calls` Unary calls (64-byte payloads checked), then `stream_calls` each of
    ClientStream (4 x 256 KiB, total checked) and Bidi (4 messages, each echo checked).
    """
    with open_channel(path) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        for i in range(unary_calls):
            payload = i.to_bytes(2, "big") * 32
            try:
                resp = stub.Unary(echo_pb2.EchoRequest(payload=payload), timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as e:
                raise _fail(path, f"unary call {i + 1}/{unary_calls}", e)
            if resp.payload != payload:
                raise BenchError(f"{path.name} path: unary call {i + 1} answered a different payload")
        for _ in range(stream_calls):
            chunks = [bytes([n]) * (256 * 1024) for n in range(4)]
            try:
                resp = stub.ClientStream(
                    iter(echo_pb2.EchoRequest(payload=c) for c in chunks), timeout=CALL_TIMEOUT_S
                )
            except grpc.RpcError as e:
                raise _fail(path, "client-streaming call", e)
            if resp.payload != str(sum(map(len, chunks))).encode():
                raise BenchError(f"{path.name} path: client-streaming call answered {resp.payload[:40]!r}")
            sent = [f"bidi-{n}".encode() for n in range(4)]
            try:
                got = [r.payload for r in stub.Bidi(
                    iter(echo_pb2.EchoRequest(payload=p) for p in sent), timeout=CALL_TIMEOUT_S)]
            except grpc.RpcError as e:
                raise _fail(path, "bidi call", e)
            if got != sent:
                raise BenchError(f"{path.name} path: bidi call answered {got!r}, expected {sent!r}")


def stream_throughput(path: BenchPath, messages: int, message_bytes: int = MIB,
                      timeout_s: float = 120) -> float:
    """Send `messages` messages of `message_bytes` on one ClientStream; returns MB/s (10**6 B/s).

    A short warm-up stream (2 messages) opens the connections first. BenchError on any
    non-OK status or a wrong total.
    """
    payload = b"\xa5" * message_bytes

    def requests(n: int) -> Iterator[echo_pb2.EchoRequest]:
        for _ in range(n):
            yield echo_pb2.EchoRequest(payload=payload)

    with open_channel(path) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        try:
            stub.ClientStream(requests(2), timeout=timeout_s)
            start = time.perf_counter()
            resp = stub.ClientStream(requests(messages), timeout=timeout_s)
            elapsed = time.perf_counter() - start
        except grpc.RpcError as e:
            raise _fail(path, f"streaming {messages} x {message_bytes} bytes", e)
    total = messages * message_bytes
    if resp.payload != str(total).encode():
        raise BenchError(f"{path.name} path: streaming answered {resp.payload[:40]!r}, expected {total}")
    return total / elapsed / 1e6
