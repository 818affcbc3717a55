"""The shape of a layer: ``on_request(call, next)`` decides, the other hooks observe.

A layer returns ``next(call)`` to continue, a ``LocalReply`` to answer the call itself
(deny, fast-fail, no route, an injected abort) or ``Delayed`` to act on a decision after a
pause (an injected delay). ``on_response`` runs at response headers and at trailers;
``on_end`` once when the stream is over, with the outcome in the call. ``counters`` is what
the layer has counted, for ``/stats``, computed only when someone asks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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

    def counters(self) -> dict[str, Any]:
        """Sections for ``/stats`` (section name -> JSON-able value) of what this layer has
        counted since start; empty when it counts nothing. Never called per call."""
        return {}


def note(call: Call, text: str) -> None:
    """Record on the call why a layer decided what it did (``call.notes``, for explanations).
    Allocates only when called: a call nobody notes keeps ``notes`` None."""
    if call.notes is None:
        call.notes = [text]
    else:
        call.notes.append(text)
