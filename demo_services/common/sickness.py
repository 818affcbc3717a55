"""Sickness: a replica made bad on purpose (added latency, an error rate with a chosen gRPC
status), off by default, set through the replica's control endpoint. Health checks and
reflection are never made sick."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import grpc

EXEMPT_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


@dataclass(frozen=True)
class Sickness:
    """``latency_ms`` added before each call; a share ``error_rate`` (0..1) of calls fail with
    ``error_code`` (a gRPC status name)."""

    latency_ms: float = 0.0
    error_rate: float = 0.0
    error_code: str = "UNAVAILABLE"

    @classmethod
    def from_doc(cls, doc: Any) -> Sickness:
        """Validate a JSON document; raises ValueError with the field and the reason."""
        if not isinstance(doc, dict):
            raise ValueError("sickness: expected a JSON object")
        unknown = set(doc) - {"latency_ms", "error_rate", "error_code"}
        if unknown:
            raise ValueError(f"sickness: unknown field(s) {sorted(unknown)}")
        latency = doc.get("latency_ms", 0.0)
        rate = doc.get("error_rate", 0.0)
        code = doc.get("error_code", "UNAVAILABLE")
        if not isinstance(latency, int | float) or not 0 <= latency <= 60_000:
            raise ValueError("latency_ms: a number of ms from 0 to 60000")
        if not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise ValueError("error_rate: a number from 0 to 1")
        if not isinstance(code, str) or code not in grpc.StatusCode.__members__ or code == "OK":
            raise ValueError(f"error_code: a gRPC status name other than OK, got {code!r}")
        return cls(float(latency), float(rate), code)

    def to_doc(self) -> dict[str, Any]:
        return asdict(self)


class SicknessState:
    """The replica's current sickness, swapped whole (thread-safe)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.value = Sickness()
        self.injected = 0
        self._rng = rng or random.Random()
        self._lock = threading.Lock()

    def set(self, value: Sickness) -> None:
        self.value = value

    def decide(self) -> tuple[float, grpc.StatusCode | None]:
        """(seconds to sleep, status to fail with or None) for one call."""
        v = self.value
        fail = None
        if v.error_rate > 0 and self._rng.random() < v.error_rate:
            fail = grpc.StatusCode[v.error_code]
            with self._lock:
                self.injected += 1
        return v.latency_ms / 1000.0, fail


class SicknessInterceptor(grpc.ServerInterceptor):
    def __init__(self, state: SicknessState) -> None:
        self.state = state

    def intercept_service(self, continuation: Callable[..., Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(EXEMPT_PREFIXES):
            return handler
        state = self.state

        def sick(behavior: Callable[..., Any], stream: bool) -> Callable[..., Any]:
            def before(context: grpc.ServicerContext) -> None:
                delay, fail = state.decide()
                if delay:
                    time.sleep(delay)
                if fail is not None:
                    context.abort(fail, "injected by the replica's sickness control")

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                before(context)
                return behavior(request, context)

            def streaming(request: Any, context: grpc.ServicerContext) -> Any:
                before(context)
                yield from behavior(request, context)

            return streaming if stream else unary

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                sick(handler.unary_unary, False), handler.request_deserializer,
                handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                sick(handler.unary_stream, True), handler.request_deserializer,
                handler.response_serializer)
        return handler
