"""Health of the local app (dynamic mode): ``grpc.health.v1.Health/Check`` every few seconds
(over ``sidecar.rpc``, h2c); an app that answers UNIMPLEMENTED is checked by TCP connect
instead (logged once).

What it finds is shown in ``/stats`` (``app_health``) and goes to the control plane: in the
sidecar's registration (after the first check, ``first_check``) and at once on every change
(``on_change``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from grpc_health.v1 import health_pb2

from mesh_common.bootstrap import HostPort

from .rpc import Channel, Code, RpcError

log = logging.getLogger("mesh.sidecar.health")

METHODS = ("grpc", "tcp", "none")
CHECK = "/grpc.health.v1.Health/Check"


class AppHealth:
    """``status``: SERVING, NOT_SERVING, SERVICE_UNKNOWN, UNKNOWN (not checked yet) or
    UNREACHABLE; ``method``: grpc, tcp or none (not checked: always SERVING).

    ``on_change(status)``, when set, is called on the loop after every change of ``status``
    (the first check's result included); it must not block.
    """

    def __init__(self, app: HostPort, method: str = "grpc", interval_s: float = 5.0) -> None:
        if method not in METHODS:
            raise ValueError(f"health check method must be one of {METHODS}, got {method!r}")
        self.app = app
        self.method = method
        self.interval_s = interval_s
        self.timeout_s = max(0.2, min(interval_s, 2.0))
        self.status = "SERVING" if method == "none" else "UNKNOWN"
        self.last_error: str | None = None
        self.checked_at: float | None = None
        self.checks = 0
        self.on_change: Callable[[str], None] | None = None
        self._channel: Channel | None = None
        self._first_done = asyncio.Event()
        if method == "none":
            self._first_done.set()

    async def run(self) -> None:
        """Check every ``interval_s`` until cancelled (returns at once for method none)."""
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
        """Check the app once (at most about two ``timeout_s``) and return the status."""
        try:
            if self.method == "grpc":
                await self._check_grpc()
            elif self.method == "tcp":
                await self._check_tcp()
            self.checks += 1
            self.checked_at = time.time()
        finally:
            self._first_done.set()
        return self.status

    async def first_check(self) -> str:
        """The status once the first check has finished (at once for method none). Waits for
        ``run`` (or a ``check_once``) to do it; never checks by itself."""
        await self._first_done.wait()
        return self.status

    def _set(self, status: str, error: str | None) -> None:
        old = self.status
        if status != old and old != "UNKNOWN":
            log.warning("local app %s is now %s (was %s)%s", self.app, status, old,
                        f": {error}" if error else "")
        self.status, self.last_error = status, error
        if status != old and self.on_change is not None:
            try:
                self.on_change(status)
            except Exception:  # a bug in the listener must not stop the health checks
                log.exception("health change listener failed")

    async def _check_grpc(self) -> None:
        if self._channel is None:
            self._channel = Channel(str(self.app), connect_timeout_s=self.timeout_s)
        try:
            resp = await self._channel.unary(
                CHECK, health_pb2.HealthCheckRequest(service=""), health_pb2.HealthCheckResponse,
                timeout_s=self.timeout_s)
        except RpcError as exc:
            if exc.code == Code.UNIMPLEMENTED:
                log.info("local app %s does not implement grpc.health.v1: checking it by TCP "
                         "connect instead", self.app)
                self.method = "tcp"
                await self._channel.close()
                self._channel = None
                await self._check_tcp()
                return
            self._set("UNREACHABLE" if exc.code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)
                      else "NOT_SERVING", f"{exc.code.name}: {exc.details}")
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
