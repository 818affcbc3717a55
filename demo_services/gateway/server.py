"""The gateway's HTTP server: aiohttp on uvloop, HTTP/JSON in, gRPC out through its own
sidecar's outbound port (h2c on loopback, the target service as ``:authority``).

For each request: match the route table (404/405), authenticate the bearer token (401 with
the reason), take a token from the route's and the subject's buckets (429 with Retry-After),
read and parse the JSON body (413 over ``max_body_bytes``, 400 for bad JSON or wrong field
types), call the method (or the composition's methods in parallel) with a new sampled W3C
``traceparent`` (every request is a trace root; the gateway's sidecar continues it) and
metadata ``x-subject``, and answer JSON (gRPC status -> HTTP status by ``routes.HTTP_STATUS``).
Each request writes one JSON access-log line on stdout and counts in ``/metrics``;
``/healthz`` tells the config in force. The config file is polled for changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import ssl
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .auth import Authenticator, AuthError, Principal
from .config import ConfigError, ConfigWatcher, GatewayConfig, load_config, log_event
from .ratelimit import RateLimiter
from .routes import (
    BadRequest,
    GrpcMethod,
    Route,
    build_request,
    error_body,
    http_status,
    to_json,
)

log = logging.getLogger("gateway")

DEFAULT_LISTEN = "127.0.0.1:8080"
LISTEN_ENV = "MESH_DEMO_GATEWAY"
AUTHENTICATOR_CLOSE_DELAY_S = 10.0
"""A replaced authenticator is closed this long after a reload (requests in flight finish)."""
MAX_REASON_LABELS = 32
RESERVED_PATHS = ("/healthz", "/metrics")
SUBJECT_HEADER = "x-subject"
JSON_TYPES = ("application/json", "")


# ------------------------------------------------------------------------------ helpers
def new_traceparent() -> tuple[str, str]:
    """A sampled W3C traceparent for a new trace and its trace id (32 hex digits)."""
    trace_id = secrets.token_hex(16)
    return f"00-{trace_id}-{secrets.token_hex(8)}-01", trace_id


def metadata_value(text: str) -> str:
    """``text`` safe as an ASCII gRPC metadata value (anything else percent-encoded)."""
    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


class Metrics:
    """The gateway's Prometheus metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("gateway_http_requests_total",
                                "HTTP requests answered, by route and status",
                                ["route", "method", "code"], registry=r)
        self.latency = Histogram("gateway_http_request_duration_seconds",
                                 "Time from request to answer, by route", ["route"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=r)
        self.rate_limited = Counter("gateway_rate_limited_total",
                                    "Requests refused with 429, by route and bucket",
                                    ["route", "scope"], registry=r)
        self.auth_refused = Counter("gateway_auth_refused_total",
                                    "Requests refused with 401, by reason", ["reason"],
                                    registry=r)
        self.upstream = Counter("gateway_upstream_calls_total",
                                "gRPC calls made through the sidecar, by method and status",
                                ["grpc_method", "grpc_status"], registry=r)
        self.config_reloads = Counter("gateway_config_reloads_total",
                                      "Config files seen changed, by result", ["result"],
                                      registry=r)
        self.config_generation = Gauge("gateway_config_generation",
                                       "The generation of the config in force", registry=r)
        self._reasons: set[str] = set()

    def refused(self, reason: str) -> None:
        """Count a 401 (at most MAX_REASON_LABELS distinct reasons, then "other")."""
        if reason not in self._reasons and len(self._reasons) >= MAX_REASON_LABELS:
            reason = "other"
        self._reasons.add(reason)
        self.auth_refused.labels(reason).inc()


@dataclass
class Runtime:
    """What a config makes: swapped whole on reload (requests hold the one they started
    with)."""

    config: GatewayConfig
    authenticator: Authenticator | None
    limiter: RateLimiter


class Reply(Exception):
    """An answer decided early (an error): HTTP status, gRPC status name, message,
    headers."""

    def __init__(self, http: int, status: str, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.http, self.status, self.message = http, status, message
        self.headers = dict(headers or {})


class Upstreams:
    """One grpc.aio channel per mesh service, to the sidecar's outbound port with the
    service as ``:authority``."""

    def __init__(self, outbound: str) -> None:
        self.outbound = outbound
        self._channels: dict[str, grpc.aio.Channel] = {}

    def call(self, method: GrpcMethod) -> grpc.aio.UnaryUnaryMultiCallable:
        ch = self._channels.get(method.authority)
        if ch is None:
            ch = grpc.aio.insecure_channel(self.outbound, options=[
                ("grpc.default_authority", method.authority),
                ("grpc.enable_retries", 0),          # retries are the mesh's job
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ])
            self._channels[method.authority] = ch
        return ch.unary_unary(method.path,
                              request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=method.response_cls.FromString)

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()


# ------------------------------------------------------------------------------ the app
class Gateway:
    """The gateway: holds the runtime in force, the upstream channels and the metrics."""

    def __init__(self, config_path: Path, outbound: str, reload_interval_s: float = 1.0,
                 clock: Any = time.monotonic) -> None:
        self.config_path = config_path
        self.upstreams = Upstreams(outbound)
        self.metrics = Metrics()
        self.clock = clock
        self.reload_interval_s = reload_interval_s
        self.runtime: Runtime | None = None
        self.watcher: ConfigWatcher | None = None
        self._closing: set[asyncio.Task[None]] = set()

    # -- config ----------------------------------------------------------------------------
    def _runtime_for(self, config: GatewayConfig, old: Runtime | None) -> Runtime:
        try:
            authn = (Authenticator(config.issuers) if config.issuers else None)
        except ValueError as exc:
            raise ConfigError(f"{self.config_path}: issuers: {exc}") from None
        if (old is not None and old.config.per_subject == config.per_subject
                and old.config.max_subjects == config.max_subjects):
            limiter = old.limiter          # same limits: the buckets keep their tokens
        else:
            limiter = RateLimiter(config.per_subject, config.max_subjects)
        return Runtime(config, authn, limiter)

    async def start(self) -> None:
        """Load the config (raises ConfigError) and start watching it; call in the loop."""
        config = load_config(self.config_path)
        self.runtime = self._runtime_for(config, None)
        self.watcher = ConfigWatcher(self.config_path, config, self._swap,
                                     self.reload_interval_s, self._load_counted)
        self.metrics.config_generation.set(1)
        self.watcher.start()

    def _load_counted(self, path: Path) -> GatewayConfig:
        try:
            return load_config(path)
        except ConfigError:
            self.metrics.config_reloads.labels("refused").inc()
            raise

    async def _swap(self, config: GatewayConfig) -> None:
        old = self.runtime
        try:
            new = self._runtime_for(config, old)
        except ConfigError:
            self.metrics.config_reloads.labels("refused").inc()
            raise
        self.runtime = new
        self.metrics.config_reloads.labels("loaded").inc()
        assert self.watcher is not None
        self.metrics.config_generation.set(self.watcher.generation + 1)
        if old is not None and old.authenticator is not None:
            task = asyncio.get_running_loop().create_task(self._close_later(old.authenticator))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_later(authn: Authenticator) -> None:
        await asyncio.sleep(AUTHENTICATOR_CLOSE_DELAY_S)
        await authn.aclose()

    async def close(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        for task in list(self._closing):
            task.cancel()
        if self.runtime is not None and self.runtime.authenticator is not None:
            await self.runtime.authenticator.aclose()
        await self.upstreams.close()

    # -- serving -----------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024 ** 3)  # bodies are read and bounded here
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        doc = {"status": "ok", "config": dict(self.watcher.status()) if self.watcher else {}}
        return web.json_response(doc)

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        traceparent, trace_id = new_traceparent()
        rt = self.runtime
        assert rt is not None, "start() first"
        route_name, subject, grpc_status = "unmatched", "", ""
        try:
            found = rt.config.table.match(request.method, request.path)
            if isinstance(found, list):
                if found:
                    raise Reply(405, "UNIMPLEMENTED",
                                f"{request.method} not allowed on {request.path} "
                                f"(allowed: {', '.join(found)})", {"Allow": ", ".join(found)})
                raise Reply(404, "NOT_FOUND", f"no route for {request.method} {request.path}")
            route, variables = found.route, found.variables
            route_name = route.name
            principal = await self._authenticate(rt, route, request)
            subject = principal.subject if principal else f"anonymous@{request.remote or '?'}"
            decision = rt.limiter.check(subject, route.name, route.rate_limit, self.clock())
            if not decision.allowed:
                self.metrics.rate_limited.labels(route.name, decision.scope).inc()
                raise Reply(429, "RESOURCE_EXHAUSTED",
                            f"rate limit of this {decision.scope} exceeded; retry in "
                            f"{decision.retry_after_s} s",
                            {"Retry-After": str(decision.retry_after_s)})
            body = await self._read_json(request, rt.config.max_body_bytes) \
                if route.body else None
            metadata = (("traceparent", traceparent),
                        (SUBJECT_HEADER, metadata_value(subject)))
            if route.method is not None:
                http, doc, grpc_status = await self._transcode(route, variables, request,
                                                               body, metadata)
            else:
                http, doc, grpc_status = await self._compose(route, variables, request,
                                                             metadata)
            resp = web.json_response(doc, status=http)
        except Reply as r:
            grpc_status = grpc_status or r.status
            resp = web.json_response(error_body(r.http, r.status, r.message), status=r.http,
                                     headers=r.headers)
        except Exception:
            log.exception("gateway: %s %s", request.method, request.path)
            grpc_status = "INTERNAL"
            resp = web.json_response(error_body(500, "INTERNAL", "internal error in the "
                                                "gateway"), status=500)
        resp.headers["X-Trace-Id"] = trace_id
        elapsed = time.monotonic() - t0
        self.metrics.requests.labels(route_name, request.method, str(resp.status)).inc()
        self.metrics.latency.labels(route_name).observe(elapsed)
        self._access_log(request, resp.status, route_name, subject, trace_id, grpc_status,
                         elapsed)
        return resp

    async def _authenticate(self, rt: Runtime, route: Route,
                            request: web.Request) -> Principal | None:
        if not route.auth:
            return None
        if rt.authenticator is None:  # validation requires issuers; keep a clear answer
            raise Reply(401, "UNAUTHENTICATED", "no token issuer is configured")
        try:
            return await rt.authenticator.authenticate(request.headers.get("Authorization"))
        except AuthError as exc:
            self.metrics.refused(exc.reason)
            raise Reply(401, "UNAUTHENTICATED", exc.reason,
                        {"WWW-Authenticate": 'Bearer error="invalid_token", '
                                             f'error_description="{_quoted(exc.reason)}"'}
                        ) from None

    @staticmethod
    async def _read_json(request: web.Request, limit: int) -> Any:
        ctype = request.content_type if request.headers.get("Content-Type") else ""
        if ctype not in JSON_TYPES:
            raise Reply(415, "INVALID_ARGUMENT",
                        f"Content-Type must be application/json, got {ctype!r}")
        if request.content_length is not None and request.content_length > limit:
            raise Reply(413, "INVALID_ARGUMENT",
                        f"body of {request.content_length} bytes; at most {limit} accepted")
        buf = bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            buf += chunk
            if len(buf) > limit:
                raise Reply(413, "INVALID_ARGUMENT",
                            f"body over {limit} bytes; at most {limit} accepted")
        if not buf.strip():
            raise Reply(400, "INVALID_ARGUMENT", "body: a JSON object is required")
        try:
            return json.loads(buf)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Reply(400, "INVALID_ARGUMENT", f"body: not valid JSON: {exc}") from None

    async def _call(self, method: GrpcMethod, req: Any, timeout_s: float,
                    metadata: tuple[tuple[str, str], ...]) -> Any:
        """The response, or raises grpc.aio.AioRpcError (counted either way)."""
        try:
            resp = await self.upstreams.call(method)(req, timeout=timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            self.metrics.upstream.labels(method.path, exc.code().name).inc()
            raise
        self.metrics.upstream.labels(method.path, "OK").inc()
        return resp

    async def _transcode(self, route: Route, variables: dict[str, str], request: web.Request,
                         body: Any, metadata: tuple[tuple[str, str], ...]
                         ) -> tuple[int, Any, str]:
        assert route.method is not None
        try:
            req = build_request(route.method, variables, list(request.query.items()),
                                route.query, body)
        except BadRequest as exc:
            raise Reply(400, "INVALID_ARGUMENT", str(exc)) from None
        try:
            resp = await self._call(route.method, req, route.timeout_s, metadata)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            raise Reply(http_status(code), code.name, exc.details() or code.name) from None
        return 200, to_json(resp), "OK"

    async def _compose(self, route: Route, variables: dict[str, str], request: web.Request,
                       metadata: tuple[tuple[str, str], ...]) -> tuple[int, Any, str]:
        query = list(request.query.items())
        requests = []
        for part in route.parts:
            try:
                requests.append(build_request(part.method, variables, query, route.query,
                                              None))
            except BadRequest as exc:
                raise Reply(400, "INVALID_ARGUMENT", f"{part.name}: {exc}") from None
        results = await asyncio.gather(
            *(self._call(p.method, r, route.timeout_s, metadata)
              for p, r in zip(route.parts, requests, strict=True)),
            return_exceptions=True)
        doc: dict[str, Any] = {}
        failed: list[str] = []
        for part, result in zip(route.parts, results, strict=True):
            if isinstance(result, grpc.aio.AioRpcError):
                code = result.code()
                if part.name == route.primary:
                    raise Reply(http_status(code), code.name,
                                f"{part.name}: {result.details() or code.name}")
                doc[part.name] = error_body(http_status(code), code.name,
                                            result.details() or code.name)
                failed.append(part.name)
            elif isinstance(result, BaseException):
                raise result
            else:
                doc[part.name] = to_json(result)
        doc["partial"] = bool(failed)
        return 200, doc, "OK" if not failed else f"PARTIAL({','.join(failed)})"

    @staticmethod
    def _access_log(request: web.Request, status: int, route: str, subject: str,
                    trace_id: str, grpc_status: str, elapsed_s: float) -> None:
        line = {"access": {
            "ts": round(time.time(), 3), "remote": request.remote or "",
            "method": request.method, "path": request.path, "route": route,
            "status": status, "grpc_status": grpc_status,
            "duration_ms": round(elapsed_s * 1000, 2), "subject": subject,
            "trace_id": trace_id, "bytes_in": request.content_length or 0}}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', "'")


# ------------------------------------------------------------------------------ running
def ssl_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """A server TLS context for ``cert``/``key`` (both or neither; raises ValueError)."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def serve(config_path: Path, listen: str, outbound: str, *,
                tls: ssl.SSLContext | None = None, reload_interval_s: float = 1.0,
                stop: asyncio.Event | None = None) -> int:
    """Run the gateway until ``stop`` is set (or SIGTERM/SIGINT); prints
    ``{"ready": {"listen", "url", "outbound", "config"}}`` once it serves. Returns the exit
    status (2 for a config refused at start, 1 if it cannot listen)."""
    import signal

    from demo_services.common.server import split_hostport

    gw = Gateway(config_path, outbound, reload_interval_s)
    try:
        await gw.start()
    except ConfigError as exc:
        log_event("refused", reason=str(exc))
        print(f"gateway: config refused: {exc}", file=sys.stderr, flush=True)
        return 2
    host, port = split_hostport(listen)
    runner = web.AppRunner(gw.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls)
    try:
        await site.start()
    except OSError as exc:
        print(f"gateway: cannot listen on {listen}: {exc.strerror or exc}", file=sys.stderr,
              flush=True)
        await runner.cleanup()
        await gw.close()
        return 1
    bound = runner.addresses[0]
    address = f"{bound[0]}:{bound[1]}"
    scheme = "https" if tls else "http"
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"ready": {"listen": address, "url": f"{scheme}://{address}",
                                "outbound": outbound, "config": str(config_path),
                                "service": "gateway"}}), flush=True)
    await stop.wait()
    await runner.cleanup()
    await gw.close()
    return 0
