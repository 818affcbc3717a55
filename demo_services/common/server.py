"""Run one demo service replica: a gRPC server (h2c on loopback, behind its sidecar) with
``grpc.health.v1``, reflection, ``traceparent`` forwarding and sickness, plus the replica's
HTTP control endpoint.

    serve(ServiceSpec(...), listen="127.0.0.1:0", control_listen="127.0.0.1:0")

prints one stdout line ``{"ready": {"address": "127.0.0.1:P", "port": P, "control":
"127.0.0.1:C", "service": ..., "instance": ...}}`` once both serve, and on SIGTERM/SIGINT
marks itself NOT_SERVING, stops with a grace period and returns 0.

Control endpoint: ``GET /sickness``, ``POST /sickness`` (``{"latency_ms", "error_rate",
"error_code"}``), ``DELETE /sickness`` (heal), ``GET /health``, plus the spec's own routes.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .control import ControlServer, Handler
from .sickness import Sickness, SicknessInterceptor, SicknessState
from .tracing import ServerTraceInterceptor

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass
class ServiceSpec:
    """What a service brings: its full gRPC name(s) (for health and reflection), a function
    adding its servicers to the server, extra control routes, and hooks run at start/stop."""

    name: str                                 # e.g. "payment"
    instance: str
    grpc_services: tuple[str, ...]            # e.g. ("payment.Payment",)
    add_servicers: Callable[[grpc.Server], None]
    control_routes: dict[tuple[str, str], Handler] = field(default_factory=dict)
    on_start: Callable[[], None] = lambda: None
    on_stop: Callable[[], None] = lambda: None
    workers: int = 16


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def serve(spec: ServiceSpec, listen: str, control_listen: str,
          grace_s: float = 2.0) -> int:
    log = logging.getLogger(f"demo.{spec.name}")
    sickness = SicknessState()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=spec.workers, thread_name_prefix=spec.name),
        interceptors=[ServerTraceInterceptor(), SicknessInterceptor(sickness)],
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.so_reuseport", 0)])
    spec.add_servicers(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*spec.grpc_services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    host, port = split_hostport(listen)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        print(f"{spec.name}: cannot listen on {listen}", file=sys.stderr, flush=True)
        return 1

    def set_serving(serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", *spec.grpc_services):
            health_servicer.set(name, status)

    def put_sickness(body: Any) -> tuple[int, Any]:
        sickness.set(Sickness.from_doc(body or {}))
        log.warning("sickness set: %s", sickness.value.to_doc())
        return 200, sickness.value.to_doc()

    def heal(body: Any) -> tuple[int, Any]:
        sickness.set(Sickness())
        log.info("sickness healed")
        return 200, sickness.value.to_doc()

    routes: dict[tuple[str, str], Handler] = {
        ("GET", "/sickness"): lambda body: (200, {**sickness.value.to_doc(),
                                                   "injected": sickness.injected}),
        ("POST", "/sickness"): put_sickness,
        ("PUT", "/sickness"): put_sickness,
        ("DELETE", "/sickness"): heal,
        ("GET", "/health"): lambda body: (200, {"service": spec.name, "instance": spec.instance}),
        **spec.control_routes,
    }
    chost, cport = split_hostport(control_listen)
    control = ControlServer(chost, cport, routes)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    spec.on_start()
    server.start()
    control.start()
    set_serving(True)
    address = f"{host}:{bound}"
    print(json.dumps({"ready": {"address": address, "port": bound, "control": control.address,
                                "service": spec.name, "instance": spec.instance}}), flush=True)
    log.info("%s %s serving on %s (control %s)", spec.name, spec.instance, address,
             control.address)
    while not stop.wait(0.5):
        pass
    set_serving(False)
    log.info("%s %s stopping", spec.name, spec.instance)
    server.stop(grace=grace_s).wait()
    spec.on_stop()
    control.stop()
    return 0


def basic_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
