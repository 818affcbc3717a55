"""meshtest.Echo: the upstream app behind sidecars in tests and benchmarks.

    python -m tests.support.echo_server --port 0 --server-id NAME [--max-message-bytes N]

Serves h2c (plaintext HTTP/2) on 127.0.0.1 with grpc.health.v1 and reflection, prints one
stdout line `{"ready": {"port": PORT}}`, and on SIGTERM/SIGINT stops with 1 s grace, exit 0.
SIGUSR1 makes its health NOT_SERVING, SIGUSR2 SERVING again (calls are served either way).

Behaviour, all driven by the request (see protos/meshtest/echo.proto):

* Initial metadata echoes every request metadata key starting with `x-` as
  `x-echo-<rest>` (a `-bin` key keeps its suffix, so it stays binary). Trailing metadata is
  `x-trailer: done` plus the same echoed keys. A trailers-only response carries both sets in
  its single HEADERS frame.
* When the call has a deadline, initial metadata also carries `x-deadline-remaining-ms`: the
  time the server had left (`context.time_remaining()`, whole ms) when the call started,
  so a test can see the `grpc-timeout` that reached the app.
* `sleep_ms` sleeps before each answer (per message on streams).
* `fail_code > 0` aborts with that status and `fail_message`; the trailers also carry
  `x-fail-detail-bin: 00 01 fe ff` and `x-fail-detail: ascii-detail`.
  Unary: instead of the response. ServerStream: after the `count` responses. ClientStream:
  as soon as a request carrying it arrives. Bidi: when the request carrying it arrives
  (responses to earlier requests were already sent).
* `trailers_only` skips the initial metadata, so the status is sent trailers-only:
  with `fail_code` that status; without it, Unary aborts INTERNAL and streams end OK
  with no messages.
* `response_bytes > 0` answers with that many bytes instead of echoing the payload.
* ClientStream answers once: payload = concatenation of the request payloads when the total is
  below 32 MiB, else the decimal total length as ASCII; trailer `x-total-bytes` has the total.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.meshtest import echo_pb2, echo_pb2_grpc

FAIL_DETAIL_BIN = b"\x00\x01\xfe\xff"
FAIL_DETAIL = "ascii-detail"
CONCAT_LIMIT_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
NO_DEADLINE_S = 365 * 24 * 3600  # time_remaining() above this means the call has no deadline

_CODES = {sc.value[0]: sc for sc in grpc.StatusCode}
_FILL = bytes(range(256))


def _body(n: int) -> bytes:
    reps, rest = divmod(n, len(_FILL))
    return _FILL * reps + _FILL[:rest]


def _echoed(context: grpc.ServicerContext) -> list[tuple[str, str | bytes]]:
    out: list[tuple[str, str | bytes]] = []
    for key, value in context.invocation_metadata():
        if key.startswith("x-"):
            out.append(("x-echo-" + key[2:], value))
    return out


class EchoServicer(echo_pb2_grpc.EchoServicer):
    def __init__(self, server_id: str):
        self.server_id = server_id

    # -- helpers -------------------------------------------------------------------------
    def _response(self, req: echo_pb2.EchoRequest, context, payload: bytes | None = None):
        if payload is None:
            payload = _body(req.response_bytes) if req.response_bytes > 0 else req.payload
        return echo_pb2.EchoResponse(payload=payload, server_id=self.server_id, peer=context.peer())

    def _start(self, context, req: echo_pb2.EchoRequest | None):
        """Set trailers; send initial metadata unless the first request asks for trailers-only."""
        echoed = _echoed(context)
        context.set_trailing_metadata([("x-trailer", "done"), *echoed])
        if req is None or not req.trailers_only:
            remaining = context.time_remaining()
            initial = list(echoed)
            if remaining is not None and remaining < NO_DEADLINE_S:  # no deadline: "infinite"
                initial.append(("x-deadline-remaining-ms", str(int(remaining * 1000))))
            context.send_initial_metadata(initial)

    @staticmethod
    def _sleep(req: echo_pb2.EchoRequest) -> None:
        if req.sleep_ms > 0:
            time.sleep(req.sleep_ms / 1000)

    def _fail(self, context, code: int, message: str):
        status = _CODES.get(code, grpc.StatusCode.UNKNOWN)
        context.set_trailing_metadata(
            [
                ("x-trailer", "done"),
                *_echoed(context),
                ("x-fail-detail-bin", FAIL_DETAIL_BIN),
                ("x-fail-detail", FAIL_DETAIL),
            ]
        )
        context.abort(status, message)  # raises

    # -- RPCs ----------------------------------------------------------------------------
    def Unary(self, request, context):
        self._start(context, request)
        self._sleep(request)
        if request.fail_code > 0:
            self._fail(context, request.fail_code, request.fail_message)
        if request.trailers_only:
            self._fail(context, grpc.StatusCode.INTERNAL.value[0], request.fail_message or "trailers_only")
        return self._response(request, context)

    def ServerStream(self, request, context):
        self._start(context, request)
        if request.trailers_only:
            self._sleep(request)
            if request.fail_code > 0:
                self._fail(context, request.fail_code, request.fail_message)
            return
        for _ in range(request.count):
            self._sleep(request)
            if not context.is_active():
                return
            yield self._response(request, context)
        if request.fail_code > 0:
            self._fail(context, request.fail_code, request.fail_message)

    def ClientStream(self, request_iterator, context):
        parts: list[bytes] = []
        total = 0
        response_bytes = 0
        started = False
        for req in request_iterator:
            if not started:
                self._start(context, req)
                started = True
            self._sleep(req)
            if req.fail_code > 0:
                self._fail(context, req.fail_code, req.fail_message)
            total += len(req.payload)
            if req.response_bytes > 0:
                response_bytes = req.response_bytes
            if total < CONCAT_LIMIT_BYTES:
                parts.append(req.payload)
            else:
                parts.clear()
        if not started:
            self._start(context, None)
        context.set_trailing_metadata(
            [("x-trailer", "done"), ("x-total-bytes", str(total)), *_echoed(context)]
        )
        if response_bytes > 0:
            payload = _body(response_bytes)
        elif total < CONCAT_LIMIT_BYTES:
            payload = b"".join(parts)
        else:
            payload = str(total).encode()
        return echo_pb2.EchoResponse(payload=payload, server_id=self.server_id, peer=context.peer())

    def Bidi(self, request_iterator, context):
        started = False
        for req in request_iterator:
            if not started:
                started = True
                self._start(context, req)
                if req.trailers_only:
                    self._sleep(req)
                    if req.fail_code > 0:
                        self._fail(context, req.fail_code, req.fail_message)
                    return
            self._sleep(req)
            if req.fail_code > 0:
                self._fail(context, req.fail_code, req.fail_message)
            yield self._response(req, context)
        if not started:
            self._start(context, None)


def serve(port: int, server_id: str, max_message_bytes: int, host: str = "127.0.0.1"):
    """Start the server; returns (server, bound_port). Raises RuntimeError if it cannot bind."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="echo"),
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    echo_pb2_grpc.add_EchoServicer_to_server(EchoServicer(server_id), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", "meshtest.Echo"):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (
            echo_pb2.DESCRIPTOR.services_by_name["Echo"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind {host}:{port}")
    server.start()
    server.health_servicer = health_servicer  # type: ignore[attr-defined]
    return server, bound


def set_health(server: grpc.Server, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", "meshtest.Echo"):
        server.health_servicer.set(name, status)  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--server-id", required=True)
    ap.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    args = ap.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    try:
        server, port = serve(args.port, args.server_id, args.max_message_bytes, args.host)
    except RuntimeError as e:
        print(f"echo_server: {e}", file=sys.stderr, flush=True)
        return 1
    signal.signal(signal.SIGUSR1, lambda *_: set_health(server, False))
    signal.signal(signal.SIGUSR2, lambda *_: set_health(server, True))
    print(json.dumps({"ready": {"port": port}}), flush=True)
    print(f"echo_server {args.server_id} serving on {args.host}:{port}", file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        pass
    server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
