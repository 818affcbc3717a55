"""W3C ``traceparent`` forwarding: the server side keeps the incoming header for the call
(a context variable), the client side puts it on every outgoing call made while serving.

This only forwards; the sidecars start and continue traces (observability issue).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import grpc

TRACEPARENT = "traceparent"
current: contextvars.ContextVar[str | None] = contextvars.ContextVar("traceparent", default=None)


def _wrap(behavior: Callable[..., Any], stream: bool) -> Callable[..., Any]:
    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        value = dict(context.invocation_metadata()).get(TRACEPARENT)
        token = current.set(value if isinstance(value, str) else None)
        try:
            return behavior(request, context)
        finally:
            current.reset(token)

    def streaming(request: Any, context: grpc.ServicerContext) -> Any:
        value = dict(context.invocation_metadata()).get(TRACEPARENT)
        token = current.set(value if isinstance(value, str) else None)
        try:
            yield from behavior(request, context)
        finally:
            current.reset(token)

    return streaming if stream else unary


class ServerTraceInterceptor(grpc.ServerInterceptor):
    """Sets ``current`` to the call's ``traceparent`` while its handler runs (unary and
    server-streaming handlers)."""

    def intercept_service(self, continuation: Callable[..., Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap(handler.unary_unary, False), handler.request_deserializer,
                handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap(handler.unary_stream, True), handler.request_deserializer,
                handler.response_serializer)
        return handler


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class ClientTraceInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the serving call's ``traceparent`` (if any, and if the caller set none)."""

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        value = current.get()
        metadata = list(details.metadata or [])
        if value and not any(k == TRACEPARENT for k, _ in metadata):
            metadata.append((TRACEPARENT, value))
            return _ClientCallDetails(details, metadata)
        return details

    def intercept_unary_unary(self, continuation: Callable[..., Any],
                              details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any],
                               details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)
