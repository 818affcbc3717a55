"""meshtest.Echo: the upstream app behind sidecars in tests and benchmarks.

    python -m tests.support.echo_server --port 0 --server-id NAME [--max-message-bytes N]
        [--fail-rate R --fail-code C] [--control]

Serves h2c (plaintext HTTP/2) on 127.0.0.1 with grpc.health.v1 and reflection, prints one
stdout line `{"ready": {"port": PORT}}`, and on SIGTERM/SIGINT stops with 1 s grace, exit 0.
SIGUSR1 makes its health NOT_SERVING, SIGUSR2 SERVING again (calls are served either way).

A sick replica, for resilience tests (off by default):

* `--fail-rate R` (0..1, default 0) fails that share of the Echo calls (every method; health
  checks never), evenly and deterministically: call n fails when floor(n·R) > floor((n-1)·R),
  so 0.5 fails every second call and 1 every call. A failed call gets `--fail-code C`
  (default 14, UNAVAILABLE) as a trailers-only answer before anything else happens (a
  server that is down answers at once, and a client or mesh may retry it), with the message
  `echo_server NAME: failing by --fail-rate`.
* `--control` also serves a tiny HTTP control on 127.0.0.1 (its port in the ready line,
  `{"ready": {"port": PORT, "control": CONTROL_PORT}}`): `GET /counts` answers JSON
  `{"calls": {METHOD: n}, "failed": {METHOD: n}, "fail_rate": R, "fail_code": C}` (Echo calls
  received and failed by the rate since the start, by method name); `POST
  /fail?rate=R&code=C` changes the rate (and code) at once and answers the same JSON.

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

import json
import math
import signal
import sys
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mesh_common.cli_args import OneLineArgumentParser
from mesh_common.numbers import finite_arg
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


class Sickness:
    """The share of calls to fail (``rate``, with ``code``) and the calls counted, by method;
    thread-safe."""

    def __init__(self, server_id: str, rate: float = 0.0, code: int = 14) -> None:
        self.server_id = server_id
        self._lock = threading.Lock()
        self.rate = 0.0
        self.code = 14
        self._n = 0  # calls since the rate was set
        self.calls: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.set(rate, code)

    def set(self, rate: float, code: int | None = None) -> None:
        if not (0.0 <= rate <= 1.0):
            raise ValueError(f"fail rate must be 0..1, got {rate}")
        if code is not None and not 1 <= code <= 16:
            raise ValueError(f"fail code must be 1..16, got {code}")
        with self._lock:
            self.rate = rate
            if code is not None:
                self.code = code
            self._n = 0

    def take(self, method: str) -> int:
        """Count a call of ``method``; the status code to fail it with, or 0."""
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            self._n += 1
            fail = math.floor(self._n * self.rate + 1e-9) > math.floor(
                (self._n - 1) * self.rate + 1e-9)
            if not fail:
                return 0
            self.failed[method] = self.failed.get(method, 0) + 1
            return self.code

    def doc(self) -> dict[str, object]:
        with self._lock:
            return {"calls": dict(self.calls), "failed": dict(self.failed),
                    "fail_rate": self.rate, "fail_code": self.code}


class EchoServicer(echo_pb2_grpc.EchoServicer):
    def __init__(self, server_id: str, sickness: Sickness | None = None):
        self.server_id = server_id
        self.sickness = sickness or Sickness(server_id)

    def _sick(self, method: str, context) -> None:
        """Count the call; abort it trailers-only when the fail rate says so."""
        code = self.sickness.take(method)
        if code:
            context.abort(_CODES.get(code, grpc.StatusCode.UNKNOWN),
                          f"echo_server {self.server_id}: failing by --fail-rate")

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
        self._sick("Unary", context)
        self._start(context, request)
        self._sleep(request)
        if request.fail_code > 0:
            self._fail(context, request.fail_code, request.fail_message)
        if request.trailers_only:
            self._fail(context, grpc.StatusCode.INTERNAL.value[0], request.fail_message or "trailers_only")
        return self._response(request, context)

    def ServerStream(self, request, context):
        self._sick("ServerStream", context)
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
        self._sick("ClientStream", context)
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
        self._sick("Bidi", context)
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


def serve(port: int, server_id: str, max_message_bytes: int, host: str = "127.0.0.1",
          sickness: Sickness | None = None):
    """Start the server; returns (server, bound_port). Raises RuntimeError if it cannot bind."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="echo"),
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    echo_pb2_grpc.add_EchoServicer_to_server(EchoServicer(server_id, sickness), server)
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


def serve_control(sickness: Sickness) -> ThreadingHTTPServer:
    """The HTTP control (``GET /counts``, ``POST /fail?rate=R&code=C``) on a free loopback
    port, served by a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, doc: object) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if urlsplit(self.path).path == "/counts":
                self._answer(200, sickness.doc())
            else:
                self._answer(404, {"error": "GET /counts"})

        def do_POST(self) -> None:  # noqa: N802
            url = urlsplit(self.path)
            if url.path != "/fail":
                self._answer(404, {"error": "POST /fail?rate=R&code=C"})
                return
            q = parse_qs(url.query)
            try:
                rate = float(q.get("rate", ["0"])[0])
                code = int(q["code"][0]) if "code" in q else None
                sickness.set(rate, code)
            except ValueError as exc:
                self._answer(400, {"error": str(exc)})
                return
            print(f"echo_server {sickness.server_id}: fail rate {sickness.rate} code "
                  f"{sickness.code}", file=sys.stderr, flush=True)
            self._answer(200, sickness.doc())

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="echo-control", daemon=True).start()
    return httpd


def main(argv: list[str] | None = None) -> int:
    ap = OneLineArgumentParser(prog="python -m tests.support.echo_server",
                               description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--server-id", required=True)
    ap.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    ap.add_argument("--fail-rate", type=finite_arg, default=0.0,
                    help="Share of Echo calls to fail, 0..1, evenly (default 0).")
    ap.add_argument("--fail-code", type=int, default=14,
                    help="gRPC status of the calls failed by --fail-rate (default 14).")
    ap.add_argument("--control", action="store_true",
                    help="Serve the HTTP control (GET /counts, POST /fail?rate=R&code=C).")
    args = ap.parse_args(argv)
    try:
        sickness = Sickness(args.server_id, args.fail_rate, args.fail_code)
    except ValueError as e:
        ap.error(str(e))

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    try:
        server, port = serve(args.port, args.server_id, args.max_message_bytes, args.host,
                             sickness)
    except RuntimeError as e:
        print(f"echo_server: {e}", file=sys.stderr, flush=True)
        return 1
    signal.signal(signal.SIGUSR1, lambda *_: set_health(server, False))
    signal.signal(signal.SIGUSR2, lambda *_: set_health(server, True))
    ready: dict[str, int] = {"port": port}
    control = serve_control(sickness) if args.control else None
    if control is not None:
        ready["control"] = control.server_address[1]
    print(json.dumps({"ready": ready}), flush=True)
    print(f"echo_server {args.server_id} serving on {args.host}:{port}", file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        pass
    if control is not None:
        control.shutdown()
    server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
