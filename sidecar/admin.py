"""The admin HTTP endpoint on 127.0.0.1: ``/ready``, ``/stats`` (JSON), ``/metrics``
(Prometheus text), ``POST /reload-certs``.

A deliberately tiny HTTP/1.1 server (GET/POST, no bodies in, ``Connection: close``); it is
for operators and the control plane's tooling, never for traffic. A handler's body is
served as JSON, unless it is a ``Raw`` (served as it is, with its content type).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import NamedTuple

log = logging.getLogger("mesh.sidecar.admin")

Handler = Callable[[], Awaitable[tuple[int, object]] | tuple[int, object]]
MAX_REQUEST_BYTES = 8192


class Raw(NamedTuple):
    """A response body served as it is (e.g. Prometheus text), not as JSON."""

    content_type: str
    data: bytes


class AdminServer:
    """Routes ``(method, path)`` to handlers that return ``(status, body)``: a JSON-able
    value, or a ``Raw`` body."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.server: asyncio.base_events.Server | None = None

    def route(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method, path)] = handler

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._handle, host, port)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            if len(head) > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            path = target.split("?", 1)[0]
            handler = self.routes.get((method, path))
            if handler is None:
                known = any(p == path for _, p in self.routes)
                status, body = (405, {"error": f"{method} not allowed on {path}"}) if known else (
                    404, {"error": f"no such admin path {path}", "paths": sorted({p for _, p in self.routes})})
            else:
                result = handler()
                if asyncio.iscoroutine(result):
                    result = await result
                status, body = result  # type: ignore[misc]
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ConnectionError):
            status, body = 400, {"error": "bad request"}
        if isinstance(body, Raw):
            content_type, payload = body.content_type, body.data
        else:
            content_type = "application/json"
            payload = json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "OK")
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        try:
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        except ConnectionError:
            pass

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
