"""Span export: the trace layer's finished spans leave as OTLP/gRPC through the OpenTelemetry
SDK.

``Tracer.submit`` (the trace layer's sink, on the event loop) turns a ``FinishedSpan`` into
an SDK ``ReadableSpan`` and hands it to a ``BatchSpanProcessor``, which queues it (bounded:
when full, the oldest span is dropped, and counted) and exports batches from the SDK's
background thread every ``schedule_delay_ms`` through an ``OTLPSpanExporter``. The event loop
never waits on an export.

Where spans go (``--otlp-endpoint``, ``parse_otlp_endpoint``):

* ``HOST:PORT``: mutual TLS with the sidecar's workload certificate and the mesh trust
  bundle (the control plane's embedded receiver serves with a certificate from the mesh CA
  naming its listen address, as its API does). The credentials come from ``credentials()``,
  read in the export thread before each batch; when they change (a renewed certificate, new
  files after SIGHUP) the exporter is made again with them, so a renewal needs no hook;
* ``http://HOST:PORT``: plaintext OTLP/gRPC to any collector (Jaeger, Tempo, a test's).

``Tracer.stats()`` counts spans submitted, exported, dropped because an export failed and
dropped because the queue was full. This module loads ``grpc`` and the SDK; the sidecar
imports it only when spans are exported.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from mesh_common.bootstrap import ConfigError, parse_hostport

from .layers.trace import FinishedSpan

log = logging.getLogger("mesh.sidecar.tracing")

SCOPE = InstrumentationScope("mesh.sidecar", "0.1.0")
MAX_QUEUE_SPANS = 2048
MAX_BATCH_SPANS = 512
EXPORT_TIMEOUT_S = 5.0
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_OK = Status(StatusCode.UNSET)

Credentials = Callable[[], tuple[bytes, bytes, bytes]]
"""Returns (trust bundle PEM, private key PEM, certificate chain PEM); called in the export
thread before each batch. Raises OSError when they cannot be read now (the batch is
dropped, counted)."""
ExporterFactory = Callable[["OtlpTarget", "grpc.ChannelCredentials | None"], SpanExporter]


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


def file_credentials(ca_file: str, key_file: str, cert_file: str) -> Credentials:
    """Credentials read from PEM files at each call (so files replaced on disk are used)."""
    def read() -> tuple[bytes, bytes, bytes]:
        out = []
        for path in (ca_file, key_file, cert_file):
            with open(path, "rb") as f:
                out.append(f.read())
        return out[0], out[1], out[2]
    return read


def otlp_exporter(target: OtlpTarget, creds: grpc.ChannelCredentials | None) -> SpanExporter:
    """The SDK's OTLP/gRPC exporter for ``target`` (``creds`` None: plaintext)."""
    if target.plaintext:
        return OTLPSpanExporter(endpoint=target.address, insecure=True, timeout=EXPORT_TIMEOUT_S)
    return OTLPSpanExporter(endpoint=target.address, insecure=False, credentials=creds,
                            timeout=EXPORT_TIMEOUT_S)


class _Counts:
    __slots__ = ("submitted", "exported", "dropped_export_failed", "dropped_queue_full",
                 "exports", "exports_failed", "exporters_made", "last_error")

    def __init__(self) -> None:
        self.submitted = 0
        self.exported = 0
        self.dropped_export_failed = 0
        self.dropped_queue_full = 0
        self.exports = 0
        self.exports_failed = 0
        self.exporters_made = 0
        self.last_error = ""


class _RenewingExporter(SpanExporter):
    """An OTLP exporter made again whenever the credentials change; counts every batch.
    Runs in the SDK's export thread only (``export``, ``shutdown``)."""

    def __init__(self, target: OtlpTarget, credentials: Credentials | None,
                 factory: ExporterFactory, counts: _Counts) -> None:
        self.target = target
        self.credentials = credentials
        self.factory = factory
        self.counts = counts
        self._lock = threading.Lock()
        self._current: SpanExporter | None = None
        self._material: tuple[bytes, bytes, bytes] | None = None
        self._closed = False

    def _exporter(self) -> SpanExporter:
        if self.target.plaintext or self.credentials is None:
            if self._current is None:
                self._current = self.factory(self.target, None)
                self.counts.exporters_made += 1
            return self._current
        material = self.credentials()
        if self._current is None or material != self._material:
            root, key, chain = material
            creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key,
                                                 certificate_chain=chain)
            old, self._current = self._current, self.factory(self.target, creds)
            self._material = material
            self.counts.exporters_made += 1
            if old is not None:
                log.info("OTLP exporter to %s now uses the renewed certificate", self.target)
                old.shutdown()
        return self._current

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        counts = self.counts
        n = len(spans)
        with self._lock:
            if self._closed:
                counts.dropped_export_failed += n
                return SpanExportResult.FAILURE
            counts.exports += 1
            try:
                result = self._exporter().export(spans)
            except Exception as exc:  # unreadable credentials, a bad certificate, ...
                result = SpanExportResult.FAILURE
                counts.last_error = f"{type(exc).__name__}: {exc}"
            if result is SpanExportResult.SUCCESS:
                counts.exported += n
            else:
                counts.exports_failed += 1
                counts.dropped_export_failed += n
                if counts.exports_failed == 1 or counts.exports_failed % 100 == 0:
                    log.warning("could not export %d span(s) to %s (%d export(s) failed so "
                                "far)%s", n, self.target, counts.exports_failed,
                                f": {counts.last_error}" if counts.last_error else "")
            return result

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            if self._current is not None:
                self._current.shutdown()
                self._current = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def to_readable(span: FinishedSpan, resource: Resource) -> ReadableSpan:
    """The SDK's ``ReadableSpan`` of ``span``: kind CLIENT (outbound) or SERVER (inbound),
    status ERROR with the description when ``span.error``, each event named by its kind with
    ``message`` (the decision's text) first in its attributes."""
    trace_id = int(span.trace_id, 16)
    ctx = SpanContext(trace_id, int(span.span_id, 16), is_remote=False, trace_flags=_SAMPLED)
    parent = (SpanContext(trace_id, int(span.parent_id, 16), is_remote=True,
                          trace_flags=_SAMPLED) if span.parent_id else None)
    events = tuple(Event(kind, {"message": text, **attrs} if attrs else {"message": text},
                         timestamp=t) for t, kind, text, attrs in span.events)
    status = _OK if span.error is None else Status(StatusCode.ERROR, span.error)
    return ReadableSpan(name=span.name, context=ctx, parent=parent, resource=resource,
                        attributes=span.attributes, events=events,
                        kind=SpanKind.CLIENT if span.outbound else SpanKind.SERVER,
                        status=status, start_time=span.start_ns, end_time=span.end_ns,
                        instrumentation_scope=SCOPE)


class Tracer:
    """Exports the spans of one sidecar (both sides) to ``target``.

    ``service`` and ``instance_id`` become the resource's ``service.name`` and
    ``service.instance.id``; ``credentials`` is required for an mTLS target;
    ``schedule_delay_ms`` is how long a span may wait in the queue before its batch is sent
    (ms); ``factory`` makes the OTLP exporter (tests may pass another ``SpanExporter``).
    """

    def __init__(self, target: OtlpTarget, *, service: str, instance_id: str,
                 credentials: Credentials | None = None, schedule_delay_ms: float = 1000.0,
                 max_queue_spans: int = MAX_QUEUE_SPANS,
                 factory: ExporterFactory = otlp_exporter) -> None:
        if not target.plaintext and credentials is None:
            raise ValueError(f"OTLP endpoint {target} needs the sidecar's credentials (mTLS)")
        self.target = target
        self.resource = Resource({"service.name": service, "service.instance.id": instance_id})
        self._counts = _Counts()
        self.max_queue_spans = max_queue_spans
        self._exporter = _RenewingExporter(target, credentials, factory, self._counts)
        self._processor = BatchSpanProcessor(
            self._exporter, max_queue_size=max_queue_spans,
            schedule_delay_millis=schedule_delay_ms,
            max_export_batch_size=min(MAX_BATCH_SPANS, max_queue_spans),
            export_timeout_millis=EXPORT_TIMEOUT_S * 1000)
        # The processor's queue (a bounded deque): only to count the spans it drops when full.
        batch = getattr(self._processor, "_batch_processor", None)
        self._queue: Any = getattr(batch, "_queue", None)
        self._closed = False

    def submit(self, span: FinishedSpan) -> None:
        """The trace layer's sink: queue ``span`` for export. Never blocks on I/O; raises
        nothing for a well-formed span."""
        if self._closed:
            return
        counts = self._counts
        counts.submitted += 1
        queue = self._queue
        if queue is not None and len(queue) >= self.max_queue_spans:
            counts.dropped_queue_full += 1  # the processor drops the oldest to take this one
        self._processor.on_end(to_readable(span, self.resource))

    def stats(self) -> dict[str, Any]:
        """Since start: ``spans_submitted``, ``spans_exported``, ``spans_dropped`` (export
        failed), ``spans_dropped_queue_full``, ``exports``, ``exports_failed``,
        ``exporters_made`` (1 + credential changes), ``last_error``, and ``endpoint``."""
        c = self._counts
        return {"endpoint": str(self.target), "spans_submitted": c.submitted,
                "spans_exported": c.exported, "spans_dropped": c.dropped_export_failed,
                "spans_dropped_queue_full": c.dropped_queue_full, "exports": c.exports,
                "exports_failed": c.exports_failed, "exporters_made": c.exporters_made,
                "last_error": c.last_error}

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Export what is queued now (blocks the caller: not for the event loop)."""
        return self._processor.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Export what is queued (blocking, bounded by the exporter's timeout) and stop the
        export thread. Later spans are ignored."""
        if self._closed:
            return
        self._closed = True
        self._processor.shutdown()

    async def aclose(self, timeout_s: float = 3.0) -> bool:
        """``shutdown`` from the event loop: run in a daemon thread (so an export stuck on an
        unreachable collector never holds the process at exit), waited for at most
        ``timeout_s``. True when it finished in time."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def run() -> None:
            try:
                self.shutdown()
            except Exception:
                log.exception("span exporter shutdown failed")
            finally:
                try:
                    loop.call_soon_threadsafe(finished)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass

        threading.Thread(target=run, name="otlp-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout_s)
        except TimeoutError:
            return False
        return True
