"""Timeout: the route's timeout for a call; the relay arms it at dispatch and lets the sooner
of it and the caller's ``grpc-timeout`` win, sending the remaining time on."""

from __future__ import annotations

from collections.abc import Callable

from mesh_common.snapshot import Snapshot
from sidecar.http2.relay import Call

from .base import Decision, Layer, Next


class Timeout(Layer):
    """Sets ``call.route_timeout_s`` (seconds) from the matched rule's ``timeout_ms``
    (``call.rule``, set by the route layer), else from the service's route ``timeout_ms``;
    when neither has one it leaves the field None and only the caller's deadline applies.
    Never answers a call itself and never raises."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot
        self._snap: Snapshot | None = None
        self._defaults_s: dict[str, float] = {}

    def on_request(self, call: Call, next: Next) -> Decision:
        rule = call.rule
        if rule is not None and rule.timeout_ms is not None:
            call.route_timeout_s = rule.timeout_ms / 1000
            return next(call)
        snap = self.snapshot()
        if snap is not self._snap:
            self._defaults_s = {r.service: r.timeout_ms / 1000 for r in snap.routes
                                if r.timeout_ms is not None}
            self._snap = snap
        timeout_s = self._defaults_s.get(call.route)
        if timeout_s is not None:
            call.route_timeout_s = timeout_s
        return next(call)
