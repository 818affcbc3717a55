"""The shape of a layer: ``on_request(call, next)`` decides, the other hooks observe.

A layer returns ``next(call)`` to continue, or a ``LocalReply`` to answer the call itself
(deny, fast-fail, no route). ``on_response`` runs at response headers and at trailers;
``on_end`` once when the stream is over, with the outcome in the call.
"""

from __future__ import annotations

from collections.abc import Callable

from sidecar.http2.pool import Pool
from sidecar.http2.relay import Call, Delayed, LocalReply

Decision = Pool | LocalReply | Delayed
Next = Callable[[Call], Decision]


class Layer:
    """Base class: every hook passes through."""

    def on_request(self, call: Call, next: Next) -> Decision:
        return next(call)

    def on_response(self, call: Call) -> None:
        return None

    def on_end(self, call: Call) -> None:
        return None
