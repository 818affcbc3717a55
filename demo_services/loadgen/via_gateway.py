"""The load generator's way in through the API gateway (``--via-gateway URL``): an object
with the two methods of ``order_pb2_grpc.OrderStub`` the runner uses (``CreateOrder.future``,
``GetOrder``), speaking HTTP/JSON (``POST /v1/orders``, ``GET /v1/orders/{id}``) with a
bearer token per customer (the demo's key; each customer is its own subject, so the
gateway's per-subject rate limit applies to each, as to separate clients).

Errors come back as ``GatewayError`` (a ``grpc.RpcError`` with ``code()``): the gRPC status
named in the gateway's JSON error body, so the runner counts and retries them as before.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
from google.protobuf import json_format

from protos.order import order_pb2

TOKEN_TTL_S = 3600.0
TOKEN_RENEW_S = 300.0      # mint a new token when the cached one has less left than this
MAX_ANSWER_BYTES = 1024 * 1024
_BY_HTTP = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
            403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
            409: grpc.StatusCode.ABORTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
            499: grpc.StatusCode.CANCELLED, 501: grpc.StatusCode.UNIMPLEMENTED,
            503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}


class GatewayError(grpc.RpcError):
    """A failed call through the gateway, as the runner expects a gRPC error."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self._code, self._message = code, message

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message


def status_of(http: int, body: bytes) -> tuple[grpc.StatusCode, str]:
    """The gRPC status an HTTP error answer stands for: the ``error.status`` of the
    gateway's JSON body, else by the HTTP status (UNKNOWN for one without a mapping)."""
    try:
        err = json.loads(body)["error"]
        return grpc.StatusCode[str(err["status"])], str(err.get("message", ""))
    except (ValueError, KeyError, TypeError):
        return _BY_HTTP.get(http, grpc.StatusCode.UNKNOWN), f"HTTP {http}"


class TokenCache:
    """A bearer token per subject, minted with ``mint(subject, ttl_s)`` and renewed before
    it expires. Thread-safe."""

    def __init__(self, mint: Callable[[str, float], str],
                 clock: Callable[[], float] = time.time) -> None:
        self.mint = mint
        self.clock = clock
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, subject: str) -> str:
        now = self.clock()
        with self._lock:
            found = self._tokens.get(subject)
            if found is None or found[1] - now < TOKEN_RENEW_S:
                found = (self.mint(subject, TOKEN_TTL_S), now + TOKEN_TTL_S)
                self._tokens[subject] = found
            return found[0]


def demo_minter(key_dir: Path) -> Callable[[str, float], str]:
    """Mints demo tokens (the gateway's demo issuer and audience) with the key in
    ``key_dir`` (created there on first use, as the gateway's ``token`` command does)."""
    from demo_services.gateway.auth import DEMO_AUDIENCE, DEMO_ISSUER, demo_kid, mint_token
    from demo_services.gateway.keys import demo_keys

    private, public = demo_keys(key_dir)
    kid = demo_kid(public)

    def mint(subject: str, ttl_s: float) -> str:
        return mint_token(subject, ttl_s, private, DEMO_ISSUER, DEMO_AUDIENCE, kid=kid)
    return mint


class _CreateOrder:
    def __init__(self, client: GatewayOrderClient) -> None:
        self.client = client

    def __call__(self, req: order_pb2.CreateOrderRequest,
                 timeout: float | None = None) -> order_pb2.OrderView:
        return self.client.create(req, timeout)

    def future(self, req: order_pb2.CreateOrderRequest,
               timeout: float | None = None) -> Future[order_pb2.OrderView]:
        return self.client.pool.submit(self.client.create, req, timeout)


class GatewayOrderClient:
    """``CreateOrder`` (with ``.future``) and ``GetOrder`` over the gateway's HTTP API;
    at most ``max_in_flight`` requests at once (a thread each)."""

    def __init__(self, url: str, tokens: TokenCache, max_in_flight: int = 64) -> None:
        self.url = url.rstrip("/")
        self.tokens = tokens
        self.pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="gw")
        self.CreateOrder = _CreateOrder(self)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _request(self, method: str, path: str, subject: str, body: Any | None,
                 timeout: float | None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.tokens.get(subject)}",
                   "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or 30) as r:
                return json.loads(r.read(MAX_ANSWER_BYTES))
        except urllib.error.HTTPError as exc:
            code, message = status_of(exc.code, exc.read(MAX_ANSWER_BYTES))
            raise GatewayError(code, message) from None
        except TimeoutError:
            raise GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED, "gateway: timed out") \
                from None
        except (OSError, ValueError) as exc:  # refused, reset, or not JSON
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, f"gateway: {exc}") from None

    def create(self, req: order_pb2.CreateOrderRequest,
               timeout: float | None = None) -> order_pb2.OrderView:
        body = json_format.MessageToDict(req, preserving_proto_field_name=True)
        doc = self._request("POST", "/v1/orders", req.customer or "anonymous", body, timeout)
        return json_format.ParseDict(doc, order_pb2.OrderView(), ignore_unknown_fields=True)

    def GetOrder(self, req: order_pb2.GetOrderRequest,  # noqa: N802 (the stub's name)
                 timeout: float | None = None) -> order_pb2.OrderView:
        doc = self._request("GET", f"/v1/orders/{quote(req.order_id, safe='')}", "loadgen",
                            None, timeout)
        return json_format.ParseDict(doc, order_pb2.OrderView(), ignore_unknown_fields=True)
