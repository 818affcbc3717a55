"""Stats: counts calls by outcome for the admin ``/stats`` page."""

from __future__ import annotations

from collections import Counter

from sidecar.http2.relay import Call

from .base import Layer

_NAMES = {0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
          5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
          9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
          13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED"}


def status_name(code: int | None) -> str:
    return "RESET" if code is None else _NAMES.get(code, str(code))


class Stats(Layer):
    """``by_status`` counts ended calls by gRPC status name (RESET when none was seen)."""

    def __init__(self) -> None:
        self.by_status: Counter[str] = Counter()
        self.by_route: Counter[str] = Counter()

    def on_end(self, call: Call) -> None:
        self.by_status[status_name(call.grpc_status)] += 1
        if call.route:
            self.by_route[call.route] += 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {"by_status": dict(self.by_status), "by_route": dict(self.by_route)}

