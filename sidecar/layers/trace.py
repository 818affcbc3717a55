"""Trace: start or continue a W3C trace (``traceparent``) per call, with one span per call
per side whose events are the layers' decisions.

At request headers (``Trace.on_request``):

* a valid incoming ``traceparent`` (``00-<32 hex trace id>-<16 hex parent id>-<2 hex
  flags>``, lower-case; all-zero ids, version ``ff`` or anything malformed count as absent)
  gives the call its trace id; sampling is parent-based: the parent's sampled flag decides;
* without one, the call starts a new trace, sampled with probability ``sample_rate``.

A sampled call gets a ``SpanRecord`` in ``call.span`` (span id, parent id, start time) and
sends ``00-<trace id>-<its span id>-01`` upstream (``call.traceparent_out``), so the next hop
is a child: the inbound sidecar's span under the outbound one, the app's own calls (which
forward the header) under the inbound one. An unsampled call with a parent forwards the
header unchanged and builds nothing. An unsampled call without a parent builds nothing
either; on the outbound side it sends ``00-<new trace id>-<random span id>-00`` so the next
hop does not sample it on its own. ``call.trace_id`` is set for every call (for the access
log, say).

Without a sink (nobody exports spans: sampling is off) the layer only reads a valid incoming
``traceparent`` into ``call.trace_id`` (else it stays "") and forwards everything unchanged:
no ids are made, nothing is built, and a call without the header costs one dict lookup.

The layers note their decisions (``base.note``) as span events on ``call.span``; the span is
finished by ``Trace.ending()``, a layer placed last in the stack so that its ``on_end`` runs
after every other layer's (outlier detection notes an ejection when the call ends). It hands
a ``FinishedSpan`` to the sink. Pure: no I/O (the sink exports); time comes from ``clock_ns``
(Unix ns), chance and ids from ``rng``.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from typing import NamedTuple

from sidecar.http2 import grpc as G
from sidecar.http2.relay import Call

from .base import Attrs, Decision, Layer, Next

log = logging.getLogger("mesh.sidecar.trace")

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_ODD_HEX = frozenset("13579bdf")  # a flags byte whose last digit is one of these: sampled
MAX_TRACEPARENT_CHARS = 512
"""A longer ``traceparent`` (a future version's) is not read: treated as absent."""


Parent = tuple[str, str, bool]
"""A valid incoming ``traceparent``: (trace id: 32 lower-case hex digits, the caller's span
id: 16 lower-case hex digits, sampled), neither id all zero. A plain tuple: it is made for
every call that brings the header."""


def parse_traceparent(value: str | None) -> Parent | None:
    """The trace context in a W3C ``traceparent`` value, or None when absent or invalid.

    Version ``00`` must be exactly 55 characters; a later version (not ``ff``) may carry
    more after a ``-``, which is ignored. Hex must be lower-case; all-zero trace or parent
    ids are invalid. Never raises, whatever the value."""
    if value is None:
        return None
    n = len(value)
    if n != 55 and (n < 55 or n > MAX_TRACEPARENT_CHARS or value[55] != "-"
                    or value.startswith("00")):
        return None
    if _TRACEPARENT.match(value) is None or value.startswith("ff"):
        return None
    trace_id = value[3:35]
    span_id = value[36:52]
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, value[54] in _ODD_HEX


def format_traceparent(trace_id: str, span_id: str, sampled: bool) -> str:
    """``00-<trace_id>-<span_id>-01`` (sampled) or ``-00``."""
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


Event = tuple[int, str, str, "Attrs | None"]
"""A span event: (Unix time ns, kind, text, attributes or None)."""


class SpanRecord:
    """What a sampled call's span gathers while the call runs (``call.span``); built only for
    sampled calls. ``add_event`` is what ``base.note`` calls."""

    __slots__ = ("trace_id", "span_id", "parent_id", "start_ns", "outbound", "events", "clock_ns")

    def __init__(self, trace_id: str, span_id: str, parent_id: str, start_ns: int,
                 outbound: bool, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        """The parent span's id ("" = a root span)."""
        self.start_ns = start_ns
        self.outbound = outbound
        self.events: list[Event] | None = None
        self.clock_ns = clock_ns

    def add_event(self, kind: str, text: str, attrs: Attrs | None = None) -> None:
        """Record a decision ``kind`` (``base`` names them) with ``text`` at this time."""
        ev = (self.clock_ns(), kind, text, attrs)
        if self.events is None:
            self.events = [ev]
        else:
            self.events.append(ev)


class FinishedSpan(NamedTuple):
    """One ended call's span, as the sink gets it (what an OTLP exporter needs)."""

    trace_id: str
    span_id: str
    parent_id: str
    """"" = a root span."""
    name: str
    """The gRPC method path, e.g. ``/pkg.Service/Method``."""
    outbound: bool
    """True: a CLIENT span (outbound side); False: a SERVER span (inbound side)."""
    start_ns: int
    end_ns: int
    attributes: dict[str, str | int | float | bool]
    error: str | None
    """None when the call ended OK; else the status description (status ERROR)."""
    events: tuple[Event, ...]


Sink = Callable[[FinishedSpan], None]


def _service_of_spiffe(spiffe_id: str | None) -> str:
    """``spiffe://td/service/payment`` → ``payment``; "" when unknown."""
    if not spiffe_id:
        return ""
    return spiffe_id.rsplit("/", 1)[-1]


def _authority_host(authority: str) -> str:
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def _attempts(call: Call) -> int:
    """Attempts the call made: the retry layer's record when it retried (the last attempt
    counted even when not recorded yet), else the streams sent upstream."""
    retry = call.retry
    attempts = getattr(retry, "attempts", ())
    n = len(attempts) + (1 if getattr(retry, "open", False) else 0)
    return max(n, call.attempts)


def finish(call: Call, span: SpanRecord, service: str, end_ns: int) -> FinishedSpan:
    """The ``FinishedSpan`` of an ended call traced in ``span`` (``service``: this sidecar's).
    Attributes: ``rpc.system`` (grpc), ``rpc.service``, ``rpc.method``,
    ``rpc.grpc.status_code`` (absent when the stream ended without a status), and
    ``mesh.direction`` (outbound|inbound), ``mesh.source``, ``mesh.destination``,
    ``mesh.attempts``, ``mesh.endpoint`` (the last attempt's endpoint address, or the
    upstream's label), ``mesh.peer`` (the caller's SPIFFE ID, inbound) and
    ``mesh.local_reply`` (True when the sidecar answered the call itself)."""
    path = call.path
    rpc_service, _, method = path.lstrip("/").rpartition("/")
    if span.outbound:
        source, destination = service, call.route or _authority_host(call.authority)
    else:
        source, destination = _service_of_spiffe(call.peer_id), service
    ep = call.endpoint
    attrs: dict[str, str | int | float | bool] = {
        "rpc.system": "grpc", "rpc.service": rpc_service, "rpc.method": method,
        "mesh.direction": "outbound" if span.outbound else "inbound",
        "mesh.source": source, "mesh.destination": destination,
        "mesh.attempts": _attempts(call),
        "mesh.endpoint": ep.address if ep is not None else call.upstream_label,
    }
    status = call.grpc_status
    if status is not None:
        attrs["rpc.grpc.status_code"] = status
    if call.peer_id:
        attrs["mesh.peer"] = call.peer_id
    if call.local_reply is not None:
        attrs["mesh.local_reply"] = True
    if status == G.OK:
        error = None
    elif status is None:
        error = "the stream ended without a gRPC status (reset or cancelled)"
    else:
        name = G.STATUS_NAMES.get(status, str(status))
        error = f"{name}: {call.grpc_message}" if call.grpc_message else name
    return FinishedSpan(span.trace_id, span.span_id, span.parent_id, path, span.outbound,
                        span.start_ns, end_ns, attrs, error, tuple(span.events or ()))


class Trace(Layer):
    """See the module's docstring. ``outbound``: the side this stack serves (CLIENT spans and
    the ``-00`` header for unsampled new traces) or inbound (SERVER spans); ``service``: this
    sidecar's service; ``sample_rate`` (0..1): the share of new traces sampled; ``sink``
    takes finished spans (None: nobody exports, see the module's docstring). Never raises
    for any header value."""

    def __init__(self, *, outbound: bool, service: str, sample_rate: float = 0.1,
                 sink: Sink | None = None, rng: random.Random | None = None,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample rate must be 0..1, got {sample_rate}")
        self.outbound = outbound
        self.service = service
        self.sample_rate = sample_rate
        self.sink = sink
        rng = rng or random.Random()
        self._random = rng.random
        self._bits = rng.getrandbits
        self.clock_ns = clock_ns
        self.sampled = 0
        """Calls that got a span since start."""
        self.sink_errors = 0
        """Finished spans the sink raised for (dropped) since start."""
        self._ending = _TraceEnd(self)

    def ending(self) -> Layer:
        """The layer that finishes the spans: put it last in the stack."""
        return self._ending

    def new_trace_id(self) -> str:
        """32 lower-case hex digits, never all zero."""
        return f"{self._bits(128) or 1:032x}"

    def new_span_id(self) -> str:
        """16 lower-case hex digits, never all zero."""
        return f"{self._bits(64) or 1:016x}"

    def on_request(self, call: Call, next: Next) -> Decision:
        value = call.headers.fields.get("traceparent")
        parent = parse_traceparent(value) if value is not None else None
        if self.sink is None:  # nobody exports: propagate only
            if parent is not None:
                call.trace_id = parent[0]
            return next(call)
        if parent is not None:
            trace_id, parent_id, sampled = parent
            call.trace_id = trace_id
            if not sampled:
                return next(call)  # forwarded as it came
            span_id = self.new_span_id()
        else:
            ids = f"{self._bits(192):048x}"  # one draw: a new trace id and a span id
            trace_id = ids[:32]
            span_id = ids[32:]
            if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
                trace_id, span_id = self.new_trace_id(), self.new_span_id()
            call.trace_id = trace_id
            rate = self.sample_rate
            if not (rate >= 1.0 or (rate > 0.0 and self._random() < rate)):
                if self.outbound:  # so the next hop does not sample it on its own
                    call.traceparent_out = f"00-{trace_id}-{span_id}-00"
                return next(call)
            parent_id = ""
        call.span = SpanRecord(trace_id, span_id, parent_id, self.clock_ns(), self.outbound,
                               self.clock_ns)
        call.traceparent_out = f"00-{trace_id}-{span_id}-01"
        self.sampled += 1
        return next(call)


class _TraceEnd(Layer):
    """Finishes a sampled call's span once every other layer is done with the call."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace

    def on_end(self, call: Call) -> None:
        span = call.span
        if span is None:
            return
        trace = self.trace
        sink = trace.sink
        if sink is None:
            return
        # The end is when the relay ended the call, not now: the end hooks run after the
        # read's writes, and a child span must not seem to outlast its caller's.
        end = call.ended_s
        end_ns = trace.clock_ns() if end is None else \
            span.start_ns + max(0, int((end - call.started_s) * 1e9))
        try:
            sink(finish(call, span, trace.service, end_ns))
        except Exception:  # exporting must never break the data path
            trace.sink_errors += 1
            if trace.sink_errors == 1:
                log.exception("span sink failed (counted in /stats from now on)")
