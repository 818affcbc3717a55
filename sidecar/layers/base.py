"""The shape of a layer: ``on_request(call, next)`` decides, the other hooks observe.

A layer returns ``next(call)`` to continue, a ``LocalReply`` to answer the call itself
(deny, fast-fail, no route, an injected abort) or ``Delayed`` to act on a decision after a
pause (an injected delay). ``on_response`` runs at response headers and at trailers;
``on_end`` once when the stream is over, with the outcome in the call. ``counters`` is what
the layer has counted, for ``/stats``, computed only when someone asks. ``note`` records a
decision on the call (and, on a traced call, as a span event of one of the kinds below).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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


# Kinds of decision a layer records (``note``): the span event's name when the call is traced.
NOTE = "note"
"""Anything else worth explaining."""
ROUTE = "route"
"""The route rule and subset chosen (or that no rule matched)."""
FAULT = "fault"
"""An abort or a delay injected."""
FAST_FAIL = "fast_fail"
"""Answered at once by a limit (which one)."""
RETRY = "retry"
"""Another attempt: its number, why, the endpoint it goes to."""
NOT_RETRIED = "not_retried"
"""A retryable failure that was not retried, and why."""
ENDPOINT = "endpoint"
"""The endpoint picked for an attempt."""
EJECTED = "ejected"
"""Outlier detection took an endpoint out (or back out after a failed probe)."""
BREAKER = "breaker"
"""Outlier detection's other transitions: an endpoint back in, an ejection suppressed."""
DENIED = "denied"
"""Authorization refused the caller."""

AttrValue = str | int | float | bool
Attrs = Mapping[str, AttrValue]


def note(call: Call, text: str, kind: str = NOTE, attrs: Attrs | None = None) -> None:
    """Record on the call why a layer decided what it did: ``text`` on ``call.notes`` (for
    explanations), and, when the call is traced (``call.span`` not None), a span event
    ``kind`` (one of the kinds above) with ``text`` and ``attrs`` at this time. Allocates only
    when called: a call nobody notes keeps ``notes`` None, and an untraced call gets nothing
    else (callers build ``attrs`` only for traced calls, or pass ones made in advance)."""
    if call.notes is None:
        call.notes = [text]
    else:
        call.notes.append(text)
    span = call.span
    if span is not None:
        span.add_event(kind, text, attrs)


def span_event(call: Call, kind: str, text: str, attrs: Attrs | None = None) -> None:
    """A span event ``kind`` with ``text`` and ``attrs`` on a traced call only (not on
    ``call.notes``); nothing at all for an untraced one."""
    span = call.span
    if span is not None:
        span.add_event(kind, text, attrs)


def ended_s(call: Call, clock: Callable[[], float]) -> float:
    """When ``call`` ended, on the relay's clock (s): the relay's stamp (``call.ended_s``:
    its answer queued for the caller, before the write and the end hooks that follow it), or
    ``clock()`` for a call the relay has not ended (a layer driven by hand)."""
    end = call.ended_s
    return clock() if end is None else end
