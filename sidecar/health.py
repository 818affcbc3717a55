"""Health of the local app (dynamic mode): ``grpc.health.v1.Health/Check`` every few seconds;
an app that answers UNIMPLEMENTED is checked by TCP connect instead (logged once).

What it finds is shown in ``/stats`` (``app_health``); the registry that uses it comes with
service discovery.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh_common.bootstrap import HostPort

log = logging.getLogger("mesh.sidecar.health")

METHODS = ("grpc", "tcp", "none")


class AppHealth:
    """``status``: SERVING, NOT_SERVING, SERVICE_UNKNOWN, UNKNOWN (not checked yet) or
    UNREACHABLE; ``method``: grpc, tcp or none."""

    def __init__(self, app: HostPort, method: str = "grpc", interval_s: float = 5.0) -> None:
        if method not in METHODS:
            raise ValueError(f"health check method must be one of {METHODS}, got {method!r}")
        self.app = app
        self.method = method
        self.interval_s = interval_s
        self.timeout_s = max(0.2, min(interval_s, 2.0))
        self.status = "UNKNOWN"
        self.last_error: str | None = None
        self.checked_at: float | None = None
        self.checks = 0
        self._channel: grpc.aio.Channel | None = None

    async def run(self) -> None:
        if self.method == "none":
            return
        try:
            while True:
                await self.check_once()
                await asyncio.sleep(self.interval_s)
        finally:
            if self._channel is not None:
                await self._channel.close()
                self._channel = None

    async def check_once(self) -> str:
        if self.method == "grpc":
            await self._check_grpc()
        elif self.method == "tcp":
            await self._check_tcp()
        self.checks += 1
        self.checked_at = time.time()
        return self.status

    def _set(self, status: str, error: str | None) -> None:
        if status != self.status and self.status != "UNKNOWN":
            log.warning("local app %s is now %s (was %s)%s", self.app, status, self.status,
                        f": {error}" if error else "")
        self.status, self.last_error = status, error

    async def _check_grpc(self) -> None:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(str(self.app))
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=""),
                                    timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info("local app %s does not implement grpc.health.v1: checking it by TCP "
                         "connect instead", self.app)
                self.method = "tcp"
                await self._channel.close()
                self._channel = None
                await self._check_tcp()
                return
            self._set("UNREACHABLE" if exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                                      grpc.StatusCode.DEADLINE_EXCEEDED)
                      else "NOT_SERVING", f"{exc.code().name}: {exc.details()}")
            return
        self._set(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status), None)

    async def _check_tcp(self) -> None:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self.app.host, self.app.port), self.timeout_s)
        except (OSError, TimeoutError) as exc:
            self._set("UNREACHABLE", str(exc) or type(exc).__name__)
            return
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        self._set("SERVING", None)

    def stats(self) -> dict[str, object]:
        return {"status": self.status, "method": self.method, "last_error": self.last_error,
                "checks": self.checks, "checked_at": self.checked_at,
                "interval_s": self.interval_s}
