"""Span export: the trace layer's finished spans leave as OTLP/gRPC
(``opentelemetry.proto.collector.trace.v1.TraceService/Export``), encoded with the
``opentelemetry-proto`` messages and sent over ``sidecar.rpc``, all on the event loop.

``Tracer.submit`` (the trace layer's sink, on the event loop) appends a ``FinishedSpan`` to a
bounded queue (when full, the oldest span is dropped, and counted) and returns. One asyncio
task, started by the first span, waits until a span has been queued for ``schedule_delay_ms``
(or the queue holds a full batch), then encodes what is queued into ``ExportTraceServiceRequest``
batches of at most ``MAX_BATCH_SPANS`` and sends them one at a time. A batch that fails (an
``RpcError``, an ``OSError``, no answer within ``EXPORT_TIMEOUT_S``) is dropped and counted.

Where spans go (``--otlp-endpoint``, ``parse_otlp_endpoint``):

* ``HOST:PORT``: mutual TLS with the sidecar's workload certificate and the mesh trust
  bundle (the control plane's embedded receiver serves with a certificate from the mesh CA
  naming its listen address, as its API does). ``tls()`` names the current files; their
  bytes are read before each batch, and when they changed (a renewed certificate, new files
  after SIGHUP) the channel is made again with them, so a renewal needs no hook;
* ``http://HOST:PORT``: plaintext OTLP/gRPC to any collector (Jaeger, Tempo, a test's).

``Tracer.stats()`` counts spans submitted, exported, dropped because an export failed and
dropped because the queue was full. This module loads neither ``grpc`` nor the OpenTelemetry
SDK or exporters: only the generated protobuf messages (``sidecar.rpc`` is imported when the
first channel is made).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, SpanFlags, Status

from mesh_common.bootstrap import ConfigError, parse_hostport

from .layers.trace import FinishedSpan
from .tls import TlsFiles

if TYPE_CHECKING:
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

log = logging.getLogger("mesh.sidecar.tracing")

SCOPE_NAME = "mesh.sidecar"
SCOPE_VERSION = "0.1.0"
MAX_QUEUE_SPANS = 2048
MAX_BATCH_SPANS = 128
"""Spans per export request. A batch is encoded on the event loop (about 5 µs a span), so
this bounds how long the relay waits on it (≈ 0.6 ms)."""
EXPORT_TIMEOUT_S = 5.0
"""Bound on one batch's export: reading the credentials, (re)connecting and the call."""
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

_CLIENT = Span.SpanKind.SPAN_KIND_CLIENT
_SERVER = Span.SpanKind.SPAN_KIND_SERVER
_ERROR = Status.StatusCode.STATUS_CODE_ERROR
# Every parent is in another process (the app, or the other side's sidecar): remote.
_FLAGS_ROOT = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_FLAGS_CHILD = _FLAGS_ROOT | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK

Send = Callable[[ExportTraceServiceRequest], Awaitable[None]]
"""Exports one request; raises (``RpcError``, ``OSError``, ...) when it could not."""
TlsSource = Callable[[], TlsFiles]
"""The current certificate, key and trust bundle files (called before each batch)."""


@dataclass(frozen=True)
class OtlpTarget:
    """Where spans go: ``address`` (``HOST:PORT``), over mTLS unless ``plaintext``."""

    address: str
    plaintext: bool

    def __str__(self) -> str:
        return f"http://{self.address}" if self.plaintext else self.address


def parse_otlp_endpoint(value: str) -> OtlpTarget:
    """``HOST:PORT`` (mTLS) or ``http://HOST:PORT`` (plaintext) → ``OtlpTarget``; raises
    ValueError (one line naming the flag) for anything else (``https://`` included: mTLS is
    spelled without a scheme)."""
    text = value.strip()
    plaintext = text.startswith("http://")
    address = text[len("http://"):] if plaintext else text
    if "://" in address or "/" in address:
        raise ValueError(f"--otlp-endpoint: expected HOST:PORT (mTLS) or http://HOST:PORT "
                         f"(plaintext), got {value!r}")
    try:
        hp = parse_hostport(address, "--otlp-endpoint")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    if hp.port == 0:
        raise ValueError(f"--otlp-endpoint: port must be 1..65535, got {value!r}")
    return OtlpTarget(address, plaintext)


# ---------------------------------------------------------------------- encoding
def _put(out: RepeatedCompositeFieldContainer[KeyValue], key: str, value: Any) -> None:
    """Append ``key``: ``value`` as an OTLP ``KeyValue`` (bool before int: bool is an int)."""
    kv = out.add()
    kv.key = key
    t = type(value)
    if t is str:
        kv.value.string_value = value
    elif t is bool:
        kv.value.bool_value = value
    elif t is int:
        kv.value.int_value = value
    elif t is float:
        kv.value.double_value = value
    else:  # not an attribute type the trace layer makes: its text
        kv.value.string_value = str(value)


def encode(spans: Sequence[FinishedSpan], *, service: str,
           instance_id: str) -> ExportTraceServiceRequest:
    """One OTLP request holding ``spans``: one resource (``service.name`` = ``service``,
    ``service.instance.id`` = ``instance_id``), one scope (``mesh.sidecar`` 0.1.0). Each span:
    ids as bytes from their hex, kind CLIENT (outbound) or SERVER (inbound), start and end in
    Unix ns, attributes, events named by their kind with ``message`` (the decision's text)
    first among their attributes, status ERROR with the description when ``span.error`` (else
    UNSET), flags saying whether the parent is remote (it always is). Raises ValueError for
    a span that is not well formed (ids not hex, an int out of int64)."""
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    _put(rs.resource.attributes, "service.name", service)
    _put(rs.resource.attributes, "service.instance.id", instance_id)
    ss = rs.scope_spans.add()
    ss.scope.name = SCOPE_NAME
    ss.scope.version = SCOPE_VERSION
    out = ss.spans
    fromhex = bytes.fromhex
    for span in spans:
        parent = span.parent_id
        s = out.add(trace_id=fromhex(span.trace_id), span_id=fromhex(span.span_id),
                    name=span.name, kind=_CLIENT if span.outbound else _SERVER,
                    start_time_unix_nano=span.start_ns, end_time_unix_nano=span.end_ns,
                    flags=_FLAGS_CHILD if parent else _FLAGS_ROOT)
        if parent:
            s.parent_span_id = fromhex(parent)
        attrs = s.attributes
        for key, value in span.attributes.items():
            _put(attrs, key, value)
        if span.events:
            events = s.events
            for t, kind, text, extra in span.events:
                ev = events.add(time_unix_nano=t, name=kind)
                ev_attrs = ev.attributes
                if extra:
                    for key, value in {"message": text, **extra}.items():
                        _put(ev_attrs, key, value)
                else:
                    _put(ev_attrs, "message", text)
        if span.error is not None:
            s.status.code = _ERROR
            s.status.message = span.error
    return request


# ---------------------------------------------------------------------- sending
class ExportChannel(Protocol):
    """What the exporter needs of a ``sidecar.rpc.Channel``."""

    async def unary(self, method: str, request: Any, response_type: Any, *,
                    timeout_s: float) -> Any: ...

    async def close(self) -> None: ...


Connect = Callable[[OtlpTarget, "TlsFiles | None"], ExportChannel]
"""Makes a channel to the target: plaintext (files None) or mTLS with these files."""


def rpc_channel(target: OtlpTarget, files: TlsFiles | None) -> ExportChannel:
    """A ``sidecar.rpc.Channel`` to ``target.address``: plaintext when ``files`` is None,
    else mutual TLS from ``files`` (``sidecar.rpc.client_tls``: the mesh bundle as CA, our
    certificate, the receiver's name checked). Raises OSError (``ssl.SSLError``) when the
    files do not make a context."""
    from .rpc import Channel, client_tls

    context = None if files is None else client_tls(files)
    return Channel(target.address, tls=context, connect_timeout_s=EXPORT_TIMEOUT_S)


def _read_all(files: TlsFiles) -> tuple[bytes, bytes, bytes]:
    """The bytes of the certificate, key and bundle files; raises OSError."""
    out = []
    for path in (files.cert, files.key, files.ca):
        with open(path, "rb") as f:
            out.append(f.read())
    return out[0], out[1], out[2]


class ChannelExport:
    """The default ``Send``: ``TraceService/Export`` over one channel to ``target``, made
    again whenever the credentials change.

    Before each batch on an mTLS target, ``tls()`` names the files and their bytes are read
    (a few KB, memory-backed in dynamic mode, so read on the event loop); when they differ from
    the ones the channel was made with, the old channel is closed and a new one made.
    ``connect`` makes channels (default ``rpc_channel``; tests pass a fake). Raises what the
    call raises (``RpcError``, ``OSError`` for unreadable files or a refused handshake)."""

    def __init__(self, target: OtlpTarget, tls: TlsSource | None = None, *,
                 connect: Connect = rpc_channel) -> None:
        if not target.plaintext and tls is None:
            raise ValueError(f"OTLP endpoint {target} needs the sidecar's credentials (mTLS)")
        self.target = target
        self.tls = tls
        self.connect = connect
        self.channels_made = 0
        self._channel: ExportChannel | None = None
        self._material: tuple[bytes, bytes, bytes] | None = None

    async def _current(self) -> ExportChannel:
        channel = self._channel
        if self.tls is None or self.target.plaintext:
            if channel is None:
                channel = self._channel = self.connect(self.target, None)
                self.channels_made += 1
            return channel
        files = self.tls()
        material = _read_all(files)
        if channel is not None and material == self._material:
            return channel
        new = self.connect(self.target, files)
        self._channel, self._material = new, material
        self.channels_made += 1
        if channel is not None:
            log.info("OTLP exporter to %s now uses the renewed certificate", self.target)
            await _close_quietly(channel)
        return new

    async def __call__(self, request: ExportTraceServiceRequest) -> None:
        channel = await self._current()
        await channel.unary(EXPORT_METHOD, request, ExportTraceServiceResponse,
                            timeout_s=EXPORT_TIMEOUT_S)

    async def aclose(self) -> None:
        """Close the channel (a later call makes a new one)."""
        channel, self._channel, self._material = self._channel, None, None
        if channel is not None:
            await _close_quietly(channel)


async def _close_quietly(channel: ExportChannel) -> None:
    try:
        await channel.close()
    except Exception as exc:  # an already broken connection: nothing left to release
        log.debug("closing the OTLP channel: %s", exc)


def _describe(exc: BaseException) -> str:
    """One line for ``last_error``: ``RpcError`` as ``CODE: details``."""
    code = getattr(exc, "code", None)
    if code is not None and hasattr(code, "name"):
        return f"{code.name}: {getattr(exc, 'details', '')}"
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"TimeoutError: no answer within {EXPORT_TIMEOUT_S:g} s"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# ---------------------------------------------------------------------- the tracer
class _Counts:
    __slots__ = ("submitted", "exported", "dropped_export_failed", "dropped_queue_full",
                 "exports", "exports_failed", "last_error")

    def __init__(self) -> None:
        self.submitted = 0
        self.exported = 0
        self.dropped_export_failed = 0
        self.dropped_queue_full = 0
        self.exports = 0
        self.exports_failed = 0
        self.last_error = ""


class Tracer:
    """Exports the spans of one sidecar (both sides) to ``target``, on the event loop.

    ``service`` and ``instance_id`` become the resource's ``service.name`` and
    ``service.instance.id``; ``tls`` names the certificate files (required for an mTLS
    target unless ``send`` is given); ``schedule_delay_ms`` is how long a span may wait in
    the queue before its batch is sent (ms; sooner when a full batch is queued);
    ``max_queue_spans`` bounds the queue. ``send`` exports one request (default: a
    ``ChannelExport`` to ``target``); if it has ``aclose`` (async) and ``channels_made``
    they are used at close and in ``stats``.
    """

    def __init__(self, target: OtlpTarget, *, service: str, instance_id: str,
                 tls: TlsSource | None = None, schedule_delay_ms: float = 1000.0,
                 max_queue_spans: int = MAX_QUEUE_SPANS, send: Send | None = None) -> None:
        if max_queue_spans < 1:
            raise ValueError(f"max_queue_spans must be at least 1, got {max_queue_spans}")
        self.target = target
        self.service = service
        self.instance_id = instance_id
        self._send: Send = send if send is not None else ChannelExport(target, tls)
        self.delay_s = schedule_delay_ms / 1000.0
        self.max_queue_spans = max_queue_spans
        self.batch_spans = min(MAX_BATCH_SPANS, max_queue_spans)
        self._queue: deque[FinishedSpan] = deque(maxlen=max_queue_spans)
        self._counts = _Counts()
        self._wake = asyncio.Event()
        self._sending = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def submit(self, span: FinishedSpan) -> None:
        """The trace layer's sink: queue ``span`` for export (a full queue drops its oldest
        span). On the event loop; never blocks, raises nothing. Ignored after ``aclose``.
        Outside a running loop the span only waits in the queue (``flush`` sends it)."""
        if self._closed:
            return
        counts = self._counts
        counts.submitted += 1
        queue = self._queue
        if len(queue) >= self.max_queue_spans:
            counts.dropped_queue_full += 1  # the deque drops the oldest to take this one
        queue.append(span)
        n = len(queue)
        if n == 1 or n >= self.batch_spans:
            self._wake.set()
        if self._task is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._task = loop.create_task(self._run(), name="otlp-export")

    async def _run(self) -> None:
        """Wait for a first span, then ``delay_s`` or a full batch; send what is queued
        then (in batches); again."""
        queue, wake, batch = self._queue, self._wake, self.batch_spans
        while True:
            if not queue:
                wake.clear()
                await wake.wait()
            if len(queue) < batch:
                wake.clear()
                try:
                    async with asyncio.timeout(self.delay_s):
                        await wake.wait()
                except TimeoutError:
                    pass
            await self._send_queued()

    async def _send_queued(self) -> None:
        """Send the spans queued now, a batch at a time (later ones wait for their turn)."""
        left = len(self._queue)
        while left > 0 and self._queue:
            left -= self.batch_spans
            await self._send_batch()

    async def _send_batch(self) -> None:
        """Take up to ``batch_spans`` of the oldest spans and export them; one batch at a
        time (spans stay in the bounded queue while another is in flight)."""
        async with self._sending:
            queue = self._queue
            n = min(len(queue), self.batch_spans)
            if n == 0:
                return
            batch = [queue.popleft() for _ in range(n)]
            await self._export(batch)

    async def _export(self, batch: list[FinishedSpan]) -> None:
        counts = self._counts
        n = len(batch)
        counts.exports += 1
        try:
            request = encode(batch, service=self.service, instance_id=self.instance_id)
            async with asyncio.timeout(EXPORT_TIMEOUT_S):
                await self._send(request)
        except asyncio.CancelledError:
            counts.exports_failed += 1
            counts.dropped_export_failed += n
            counts.last_error = "export cancelled (stopping)"
            raise
        except Exception as exc:  # RpcError, OSError, TimeoutError, a malformed span
            counts.exports_failed += 1
            counts.dropped_export_failed += n
            counts.last_error = _describe(exc)
            if counts.exports_failed == 1 or counts.exports_failed % 100 == 0:
                log.warning("could not export %d span(s) to %s (%d export(s) failed so "
                            "far): %s", n, self.target, counts.exports_failed,
                            counts.last_error)
        else:
            counts.exported += n

    def stats(self) -> dict[str, Any]:
        """Since start: ``spans_submitted``, ``spans_exported``, ``spans_dropped`` (export
        failed), ``spans_dropped_queue_full``, ``exports``, ``exports_failed``,
        ``exporters_made`` (channels made: 1 + credential changes), ``last_error``, and
        ``endpoint``."""
        c = self._counts
        return {"endpoint": str(self.target), "spans_submitted": c.submitted,
                "spans_exported": c.exported, "spans_dropped": c.dropped_export_failed,
                "spans_dropped_queue_full": c.dropped_queue_full, "exports": c.exports,
                "exports_failed": c.exports_failed,
                "exporters_made": getattr(self._send, "channels_made", 0),
                "last_error": c.last_error}

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Export the spans queued now and wait for a batch already in flight. True when all
        of them were sent (or failed) within ``timeout_s``; on timeout, the batch being sent
        is dropped (counted) and the rest stays queued."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._send_queued()
                async with self._sending:
                    pass
        except TimeoutError:
            return False
        return True

    async def aclose(self, timeout_s: float = 3.0) -> bool:
        """Stop: later spans are ignored; what is queued is exported (bounded by
        ``timeout_s``; what is left then is dropped and counted), the export task stopped and
        the channel closed. True when it all finished in time. Idempotent."""
        if self._closed:
            return True
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        finished = await self.flush(timeout_s)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        left = len(self._queue)
        if left:
            self._counts.dropped_export_failed += left
            self._queue.clear()
        close = getattr(self._send, "aclose", None)
        if close is not None:
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 0.5)):
                    await close()
            except TimeoutError:
                finished = False
        return finished

