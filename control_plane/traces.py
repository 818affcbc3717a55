"""The trace store: the spans the embedded OTLP receiver gets, kept in SQLite with bounded
retention, and the summaries ``meshctl traces`` lists.

One SQLite file of its own under the data dir (``traces.sqlite``, WAL, ``synchronous=NORMAL``:
traces are a diagnostic aid, not state to survive a power cut), two tables:

* ``spans``: one row per (trace id, span id); a span received twice keeps its first copy;
* ``traces``: one row per trace with its summary (root, method, duration, status, span count,
  error flag) and when its first and last spans were received; recomputed for every trace an
  insert touches, so a listing is one indexed query.

Retention (``retention_s``, ``max_spans``) is measured by what the control plane received and
when: a trace is as old as its most recently received span. Traces older than ``retention_s``
are never listed and are deleted; when more than ``max_spans`` spans are kept, the oldest
traces are deleted whole until at most ``max_spans`` remain. Deletion runs inside an insert,
amortized: once ``prune_every_spans`` spans were inserted since the last prune, or
``prune_interval_s`` seconds have passed. Between prunes the store can hold up to
``prune_every_spans`` spans (plus one insert's batch) over ``max_spans``.

Every method is one transaction under the store's lock, so the store may be called from worker
threads (``asyncio.to_thread``); it never touches the event loop. ``summarize`` and the status
helpers are pure.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh_common.config import GRPC_CODE_NAMES

TRACES_FILE = "traces.sqlite"
DEFAULT_RETENTION_S = 3600.0
DEFAULT_MAX_SPANS = 100_000
DEFAULT_PRUNE_INTERVAL_S = 10.0
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 1000
TRACE_ID_HEX = 32
SPAN_ID_HEX = 16
STATUS_ATTRIBUTE = "rpc.grpc.status_code"
METHOD_ATTRIBUTE = "rpc.method"
SERVICE_ATTRIBUTE = "rpc.service"
UNSET, OK, ERROR = "UNSET", "OK", "ERROR"
_DELETE_CHUNK = 500  # trace ids per DELETE (SQLite's parameter limit is far above)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    trace_id   TEXT NOT NULL,     -- 32 hex digits
    span_id    TEXT NOT NULL,     -- 16 hex digits
    parent     TEXT NOT NULL,     -- '' = none
    service    TEXT NOT NULL,     -- the resource's service.name
    name       TEXT NOT NULL,
    kind       TEXT NOT NULL,     -- CLIENT, SERVER, INTERNAL, ...
    start_ns   INTEGER NOT NULL,  -- unix ns
    end_ns     INTEGER NOT NULL,
    status     TEXT NOT NULL,     -- gRPC status name, else OK / ERROR / UNSET
    error      INTEGER NOT NULL,
    method     TEXT NOT NULL,     -- the gRPC method (span_method)
    attributes TEXT NOT NULL,     -- JSON object
    events     TEXT NOT NULL,     -- JSON list of {time_unix_nano, name, attributes}
    PRIMARY KEY (trace_id, span_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spans_by_service ON spans (service, trace_id);
CREATE TABLE IF NOT EXISTS traces (
    trace_id     TEXT PRIMARY KEY,
    first_seen   REAL NOT NULL,   -- unix s, when its first span was received
    last_seen    REAL NOT NULL,   -- unix s, when its latest span was received
    start_ns     INTEGER NOT NULL,
    spans        INTEGER NOT NULL,
    error        INTEGER NOT NULL,
    root_service TEXT NOT NULL,
    method       TEXT NOT NULL,
    duration_ms  REAL NOT NULL,
    status       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS traces_by_start ON traces (start_ns);
CREATE INDEX IF NOT EXISTS traces_by_last_seen ON traces (last_seen);
"""


# ---------------------------------------------------------------------- the model (pure)
@dataclass(frozen=True)
class SpanEvent:
    """A span event: when (unix ns), its name and attributes (JSON-able values)."""

    time_unix_nano: int
    name: str
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Span:
    """One span as kept: ids in lowercase hex (``parent_span_id`` "" = none), times in unix
    ns, ``status`` the gRPC status name from its attributes else OK/ERROR/UNSET (its OTLP
    status), ``error`` whether it failed."""

    trace_id: str
    span_id: str
    parent_span_id: str
    service: str
    name: str
    kind: str
    start_unix_nano: int
    end_unix_nano: int
    status: str
    error: bool
    attributes: Mapping[str, Any] = field(default_factory=dict)
    events: tuple[SpanEvent, ...] = ()

    @property
    def method(self) -> str:
        return span_method(self.attributes, self.name)

    def head(self) -> SpanHead:
        return SpanHead(self.span_id, self.parent_span_id, self.service, self.method,
                        self.start_unix_nano, self.end_unix_nano, self.status, self.error)


@dataclass(frozen=True)
class SpanHead:
    """What a trace's summary needs of one of its spans."""

    span_id: str
    parent_span_id: str
    service: str
    method: str
    start_unix_nano: int
    end_unix_nano: int
    status: str
    error: bool


@dataclass(frozen=True)
class TraceSummary:
    """A trace at a glance (the fields of ``mesh.v1.TraceSummary``)."""

    trace_id: str
    root_service: str
    method: str
    duration_ms: float
    status: str
    spans: int
    start_unix: float
    error: bool


def grpc_status_name(value: Any) -> str | None:
    """The gRPC status name of an ``rpc.grpc.status_code`` attribute value: a code 0-16 (int
    or decimal string) or a name (any case; names outside gRPC's, such as the sidecar's
    RESET, are kept as they are when they look like one). None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            value = int(text)
        elif text and len(text) <= 64 and text.replace("_", "").isalpha():
            return text.upper()
        else:
            return None
    if isinstance(value, int) and 0 <= value < len(GRPC_CODE_NAMES):
        return GRPC_CODE_NAMES[value]
    return None


def span_status(attributes: Mapping[str, Any], otlp_status: str) -> tuple[str, bool]:
    """A span's (status, error): the gRPC status name of its ``rpc.grpc.status_code``
    attribute when it has one (an error unless OK), else its OTLP status (``UNSET``, ``OK``,
    ``ERROR``); an OTLP ERROR is an error whatever the attribute says."""
    name = grpc_status_name(attributes.get(STATUS_ATTRIBUTE))
    if name is not None:
        return name, name != OK or otlp_status == ERROR
    status = otlp_status if otlp_status in (UNSET, OK, ERROR) else UNSET
    return status, status == ERROR


def span_method(attributes: Mapping[str, Any], name: str) -> str:
    """A span's gRPC method: its ``rpc.method`` attribute (a path as is; a bare method name
    is joined with ``rpc.service`` into ``/service/method`` when that is there), else its
    name."""
    method = attributes.get(METHOD_ATTRIBUTE)
    if isinstance(method, str) and method:
        service = attributes.get(SERVICE_ATTRIBUTE)
        if not method.startswith("/") and isinstance(service, str) and service:
            return f"/{service}/{method}"
        return method
    return name


def find_root(heads: Sequence[SpanHead]) -> SpanHead | None:
    """The trace's root: a span without a parent, else (its root not received, or evicted)
    the earliest span whose parent is not kept; ties go to the smallest span id. None for no
    spans."""
    if not heads:
        return None
    ids = {h.span_id for h in heads}
    orphans = [h for h in heads if not h.parent_span_id or h.parent_span_id not in ids]
    candidates = orphans or list(heads)  # a cycle of parents: any span will do
    return min(candidates, key=lambda h: (h.parent_span_id != "", h.start_unix_nano, h.span_id))


def summarize(trace_id: str, heads: Sequence[SpanHead]) -> TraceSummary:
    """The summary of a trace from its spans (at least one). Root as ``find_root``; method,
    service and duration are the root's; status is the root's gRPC status, or (the root has
    none: UNSET) ERROR when any span erred, else OK; ``start_unix`` is the earliest span's
    start. Pure."""
    root = find_root(heads)
    if root is None:
        raise ValueError("a trace has at least one span")
    error = any(h.error for h in heads)
    status = root.status
    if status == UNSET:
        status = ERROR if error else OK
    duration_ms = max(0, root.end_unix_nano - root.start_unix_nano) / 1e6
    start = min(h.start_unix_nano for h in heads)
    return TraceSummary(trace_id, root.service, root.method, duration_ms, status, len(heads),
                        start / 1e9, error)


def normalize_trace_id(text: str) -> str:
    """A trace id as stored (32 lowercase hex digits, not all zero); raises ValueError
    saying what is wrong."""
    tid = text.strip().lower()
    if len(tid) != TRACE_ID_HEX or any(c not in "0123456789abcdef" for c in tid):
        raise ValueError(f"a trace id is {TRACE_ID_HEX} hex digits, got {text[:80]!r}")
    if tid == "0" * TRACE_ID_HEX:
        raise ValueError("the all-zero trace id is not valid")
    return tid


# ---------------------------------------------------------------------- the store
def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def _summary(row: sqlite3.Row | tuple[Any, ...]) -> TraceSummary:
    tid, root_service, method, duration_ms, status, spans, start_ns, error = row
    return TraceSummary(tid, root_service, method, float(duration_ms), status, int(spans),
                        int(start_ns) / 1e9, bool(error))


_SUMMARY_COLUMNS = "trace_id, root_service, method, duration_ms, status, spans, start_ns, error"


class TraceStore:
    """Spans in SQLite at ``path`` with bounded retention (see the module's docstring).
    ``clock`` gives unix seconds (retention is measured with it). Thread-safe."""

    def __init__(self, path: Path | str, retention_s: float = DEFAULT_RETENTION_S,
                 max_spans: int = DEFAULT_MAX_SPANS, *, prune_every_spans: int | None = None,
                 prune_interval_s: float = DEFAULT_PRUNE_INTERVAL_S,
                 clock: Callable[[], float] = time.time) -> None:
        if retention_s <= 0 or max_spans <= 0:
            raise ValueError("retention_s and max_spans must be positive")
        self.path = Path(path)
        self.retention_s = float(retention_s)
        self.max_spans = int(max_spans)
        self.prune_every_spans = (prune_every_spans if prune_every_spans is not None
                                  else max(1, min(1000, self.max_spans // 100)))
        self.prune_interval_s = prune_interval_s
        self.clock = clock
        self.inserted_spans = 0   # since start, counters for metrics
        self.duplicate_spans = 0
        self.evicted_spans = 0
        self._lock = threading.Lock()
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._since_prune = 0
        self._last_prune = clock()

    def close(self) -> None:
        """Close the database. Idempotent."""
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ writes
    def insert(self, spans: Iterable[Span], now: float | None = None) -> int:
        """Store ``spans`` in one transaction (a span already kept is left as it is) and
        refresh the summaries of the traces they belong to; prunes when due. Returns how many
        were new. Raises ``sqlite3.Error`` (nothing is stored then)."""
        now = self.clock() if now is None else now
        rows = [(s.trace_id, s.span_id, s.parent_span_id, s.service, s.name, s.kind,
                 s.start_unix_nano, s.end_unix_nano, s.status, int(s.error), s.method,
                 _json(dict(s.attributes)),
                 _json([{"time_unix_nano": e.time_unix_nano, "name": e.name,
                         "attributes": dict(e.attributes)} for e in s.events]))
                for s in spans]
        if not rows:
            return 0
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                before = db.total_changes
                db.executemany(
                    "INSERT INTO spans (trace_id, span_id, parent, service, name, kind, start_ns,"
                    " end_ns, status, error, method, attributes, events)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT (trace_id, span_id) DO NOTHING", rows)
                new = db.total_changes - before
                for tid in dict.fromkeys(r[0] for r in rows):
                    self._refresh(tid, now)
                self._since_prune += new
                if (self._since_prune >= self.prune_every_spans
                        or now - self._last_prune >= self.prune_interval_s):
                    self._prune(now)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self.inserted_spans += new
            self.duplicate_spans += len(rows) - new
        return new

    def _refresh(self, tid: str, now: float) -> None:
        heads = [SpanHead(sid, parent, service, method, start, end, status, bool(error))
                 for sid, parent, service, method, start, end, status, error in self._db.execute(
                     "SELECT span_id, parent, service, method, start_ns, end_ns, status, error"
                     " FROM spans WHERE trace_id = ?", (tid,))]
        s = summarize(tid, heads)
        self._db.execute(
            "INSERT INTO traces (trace_id, first_seen, last_seen, start_ns, spans, error,"
            " root_service, method, duration_ms, status) VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (trace_id) DO UPDATE SET last_seen = excluded.last_seen,"
            " start_ns = excluded.start_ns, spans = excluded.spans, error = excluded.error,"
            " root_service = excluded.root_service, method = excluded.method,"
            " duration_ms = excluded.duration_ms, status = excluded.status",
            (tid, now, now, min(h.start_unix_nano for h in heads), s.spans, int(s.error),
             s.root_service, s.method, s.duration_ms, s.status))

    def prune(self, now: float | None = None) -> int:
        """Delete the traces past retention, then the oldest ones over ``max_spans``; returns
        the spans deleted."""
        now = self.clock() if now is None else now
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                deleted = self._prune(now)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return deleted

    def _prune(self, now: float) -> int:
        db = self._db
        cutoff = now - self.retention_s
        doomed = [r[0] for r in db.execute(
            "SELECT trace_id FROM traces WHERE last_seen < ?", (cutoff,))]
        (kept,) = db.execute("SELECT COALESCE(SUM(spans), 0) FROM traces WHERE last_seen >= ?",
                             (cutoff,)).fetchone()
        excess = int(kept) - self.max_spans
        if excess > 0:
            for tid, n in db.execute("SELECT trace_id, spans FROM traces WHERE last_seen >= ?"
                                     " ORDER BY last_seen, first_seen, trace_id", (cutoff,)):
                doomed.append(tid)
                excess -= n
                if excess <= 0:
                    break
        deleted = 0
        for i in range(0, len(doomed), _DELETE_CHUNK):
            chunk = doomed[i:i + _DELETE_CHUNK]
            marks = ",".join("?" * len(chunk))
            deleted += db.execute(f"DELETE FROM spans WHERE trace_id IN ({marks})",
                                  chunk).rowcount
            db.execute(f"DELETE FROM traces WHERE trace_id IN ({marks})", chunk)
        self._since_prune = 0
        self._last_prune = now
        self.evicted_spans += deleted
        return deleted

    # ------------------------------------------------------------------ reads
    def list_traces(self, service: str = "", errors: bool = False,
                    limit: int = DEFAULT_LIST_LIMIT, now: float | None = None
                    ) -> list[TraceSummary]:
        """Summaries of the kept traces, newest (latest start) first: with ``service``, only
        traces with a span of that service; with ``errors``, only traces where a span erred;
        at most ``limit`` (capped at ``MAX_LIST_LIMIT``; below 1 means the default)."""
        now = self.clock() if now is None else now
        if limit < 1:
            limit = DEFAULT_LIST_LIMIT
        limit = min(limit, MAX_LIST_LIMIT)
        sql = f"SELECT {_SUMMARY_COLUMNS} FROM traces WHERE last_seen >= ?"
        args: list[Any] = [now - self.retention_s]
        if errors:
            sql += " AND error = 1"
        if service:
            sql += " AND trace_id IN (SELECT trace_id FROM spans WHERE service = ?)"
            args.append(service)
        sql += " ORDER BY start_ns DESC, trace_id LIMIT ?"
        args.append(limit)
        with self._lock:
            return [_summary(r) for r in self._db.execute(sql, args)]

    def get_trace(self, trace_id: str, now: float | None = None
                  ) -> tuple[TraceSummary, list[Span]] | None:
        """The summary and every span of a kept trace (by start time, then span id); None when
        none is kept. Raises ValueError for a malformed id (``normalize_trace_id``)."""
        tid = normalize_trace_id(trace_id)
        now = self.clock() if now is None else now
        with self._lock:
            row = self._db.execute(
                f"SELECT {_SUMMARY_COLUMNS} FROM traces WHERE trace_id = ? AND last_seen >= ?",
                (tid, now - self.retention_s)).fetchone()
            if row is None:
                return None
            rows = self._db.execute(
                "SELECT trace_id, span_id, parent, service, name, kind, start_ns, end_ns,"
                " status, error, attributes, events FROM spans WHERE trace_id = ?"
                " ORDER BY start_ns, span_id", (tid,)).fetchall()
        spans = []
        for (t, sid, parent, service, name, kind, start, end, status, error, attrs,
             events) in rows:
            spans.append(Span(t, sid, parent, service, name, kind, int(start), int(end), status,
                              bool(error), json.loads(attrs),
                              tuple(SpanEvent(int(e["time_unix_nano"]), e["name"],
                                              e["attributes"]) for e in json.loads(events))))
        return _summary(row), spans

    def count_spans(self) -> int:
        """Spans kept now (expired ones included until the next prune)."""
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM spans").fetchone()
        return int(n)
