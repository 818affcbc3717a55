"""Call log: the JSON-lines access log and the live taps, both fed at each call's end.

* ``AccessLog`` (``mesh-sidecar --access-log PATH``): one JSON object per ended call per
  line, ``time`` (RFC 3339 UTC with ms, when the call ended), ``direction``, ``source``,
  ``destination``, ``method`` (the gRPC path as called), ``status`` (gRPC status name, RESET
  when the call ended without one), ``latency_ms``, ``attempts`` (times the request went to
  an upstream stream; 0 when answered by the sidecar), ``endpoint`` (outbound: the last
  attempt's address), ``trace_id`` ("" = none), ``reason`` (the layers' notes, "; "-joined)
  and ``peer`` (inbound: the caller's SPIFFE ID). ``source``/``destination`` are "" when
  unknown or not routed. Lines are buffered and written in one ``write`` every
  ``FLUSH_INTERVAL_S`` or as soon as ``MAX_PENDING_BYTES`` are pending, and at ``close``
  (the sidecar's drain): never one write per call.
* ``Taps``: the taps the control plane started on this sidecar (``TapStart``/``TapStop``),
  shared by both directions' ``CallLog`` layers. A tap takes the calls whose method matches
  (every method, an exact gRPC path, or a prefix ending in '/'), until it is stopped or its
  duration is over, at most ``max_events_per_s`` a second (the excess is counted as
  dropped); ``take`` hands the buffered events over in batches (``TapBatch``) for the
  discovery stream to send. Pure: times come from the clock it is given.

``CallLog`` is the layer: with no access log it costs one truthiness check per call while
no tap is active; the event record is built only for a call some tap takes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from mesh_common.spiffe import SpiffeError, SpiffeId
from sidecar.http2.relay import Call

from .base import Layer, ended_s
from .stats import status_name

log = logging.getLogger("mesh.sidecar.calllog")

OUTBOUND, INBOUND = "outbound", "inbound"
FLUSH_INTERVAL_S = 0.1
MAX_PENDING_BYTES = 64 * 1024
DEFAULT_TAP_EVENTS_PER_S = 100
DEFAULT_TAP_DURATION_S = 60.0
MAX_TAPS = 64
"""Taps active at once; a TapStart beyond them is ignored (logged)."""
_MAX_PEERS = 4096


# ---------------------------------------------------------------------- records
class TapRecord(NamedTuple):
    """One ended call as a tap reports it (the fields of ``mesh.v1.TapEvent`` but the
    reporting instance, which the discovery stream adds)."""

    time_unix: float
    direction: str
    source: str
    destination: str
    method: str
    status: str
    latency_ms: float
    attempts: int
    endpoint: str
    trace_id: str
    reason: str


class TapBatch(NamedTuple):
    """What one tap has for the control plane: events since the previous batch, and how
    many it dropped meanwhile (rate bound)."""

    id: str
    events: list[TapRecord]
    dropped: int


def rfc3339_ms(unix_s: float, _cache: dict[int, str] = {}) -> str:  # noqa: B006 (a cache)
    """``2024-05-01T12:00:00.123Z``: Unix seconds as RFC 3339 UTC with milliseconds."""
    ms = int(unix_s * 1000)
    sec, frac = divmod(ms, 1000)
    head = _cache.get(sec)
    if head is None:
        if len(_cache) > 8:
            _cache.clear()
        head = _cache[sec] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{head}.{frac:03d}Z"


def _peer_service(peer_id: str | None) -> str:
    if not peer_id:
        return ""
    try:
        return SpiffeId.parse(peer_id).service
    except SpiffeError:
        return ""


def access_log_line(rec: TapRecord, peer: str) -> str:
    """One access-log line (JSON object and a newline) for ``rec``; ``peer`` is the
    caller's SPIFFE ID ("" outbound)."""
    return json.dumps({
        "time": rfc3339_ms(rec.time_unix), "direction": rec.direction, "source": rec.source,
        "destination": rec.destination, "method": rec.method, "status": rec.status,
        "latency_ms": round(rec.latency_ms, 3), "attempts": rec.attempts,
        "endpoint": rec.endpoint, "trace_id": rec.trace_id, "reason": rec.reason,
        "peer": peer}, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------- access log
class AccessLog:
    """A buffered line sink: ``add`` keeps the line, ``write`` gets the pending lines as one
    ``bytes`` at most every ``FLUSH_INTERVAL_S`` (a timer armed by ``call_later`` when the
    first line arrives) or at once when ``MAX_PENDING_BYTES`` are pending, and at ``flush``
    / ``close``. A failed write drops its lines (counted in ``lost_lines``, logged once per
    kind of error); the sidecar keeps serving."""

    def __init__(self, write: Callable[[bytes], None],
                 call_later: Callable[[float, Callable[[], None]], Any], *,
                 close: Callable[[], None] = lambda: None) -> None:
        self._write = write
        self._call_later = call_later
        self._close = close
        self._lines: list[str] = []
        self._pending = 0
        self._timer: Any = None
        self.closed = False
        self.lines = 0
        self.writes = 0
        self.lost_lines = 0
        self._last_error = ""

    @classmethod
    def open(cls, path: str, call_later: Callable[[float, Callable[[], None]], Any]
             ) -> AccessLog:
        """Append to ``path`` (created 0644 when missing); raises OSError when it cannot."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

        def write(data: bytes) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        return cls(write, call_later, close=lambda: os.close(fd))

    def add(self, line: str) -> None:
        """Keep ``line`` (ending in a newline) for the next write."""
        if self.closed:
            return
        self._lines.append(line)
        self._pending += len(line)
        if self._pending >= MAX_PENDING_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = self._call_later(FLUSH_INTERVAL_S, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write the pending lines now, in one write."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        lines = self._lines
        self._lines = []
        self._pending = 0
        try:
            self._write("".join(lines).encode("utf-8", "replace"))
        except OSError as exc:
            self.lost_lines += len(lines)
            if str(exc) != self._last_error:
                self._last_error = str(exc)
                log.warning("access log: %d lines lost: %s", len(lines), exc)
            return
        self.lines += len(lines)
        self.writes += 1

    def close(self) -> None:
        """Flush and close; later lines are ignored."""
        if self.closed:
            return
        self.flush()
        self.closed = True
        try:
            self._close()
        except OSError as exc:
            log.warning("access log: close failed: %s", exc)

    def stats(self) -> dict[str, int]:
        return {"lines": self.lines, "writes": self.writes, "lost_lines": self.lost_lines,
                "pending_bytes": self._pending}


# ---------------------------------------------------------------------- taps (pure)
class _Tap:
    __slots__ = ("id", "exact", "prefix", "expires_s", "max_per_s", "window_s", "in_window",
                 "events", "dropped")

    def __init__(self, tap_id: str, method: str, expires_s: float, max_per_s: int) -> None:
        self.id = tap_id
        self.exact = method if method and not method.endswith("/") else ""
        self.prefix = method if method.endswith("/") else ""
        self.expires_s = expires_s
        self.max_per_s = max_per_s
        self.window_s = -math.inf
        self.in_window = 0
        self.events: list[TapRecord] = []
        self.dropped = 0

    def matches(self, path: str) -> bool:
        if self.exact:
            return path == self.exact
        return path.startswith(self.prefix)  # "" = every method


class Taps:
    """The active taps of one sidecar process (``active``: tap id -> tap; empty = none, so a
    call's check is one truthiness test). ``clock``: seconds, monotonic. Never raises for
    any input from the control plane."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.active: dict[str, _Tap] = {}
        self._ended: list[_Tap] = []
        self.started = 0

    def start(self, tap_id: str, method: str = "", duration_s: float = 0.0,
              max_events_per_s: int = 0) -> bool:
        """Tap the calls whose method matches ``method`` ("" = every one; a path ending in
        '/' is a prefix, any other an exact gRPC path) for ``duration_s`` seconds (not a
        positive number: ``DEFAULT_TAP_DURATION_S``), at most ``max_events_per_s`` a second
        (not positive: ``DEFAULT_TAP_EVENTS_PER_S``). A tap with the same id is replaced.
        False (nothing started) when ``MAX_TAPS`` others are active."""
        now = self.clock()
        self._expire(now)
        if tap_id not in self.active and len(self.active) >= MAX_TAPS:
            log.warning("tap %r not started: %d taps are active already", tap_id, MAX_TAPS)
            return False
        if not (isinstance(duration_s, int | float) and math.isfinite(duration_s)
                and duration_s > 0):
            duration_s = DEFAULT_TAP_DURATION_S
        per_s = max_events_per_s if max_events_per_s > 0 else DEFAULT_TAP_EVENTS_PER_S
        old = self.active.pop(tap_id, None)
        if old is not None:
            self._ended.append(old)
        self.active[tap_id] = _Tap(tap_id, method, now + duration_s, per_s)
        self.started += 1
        return True

    def stop(self, tap_id: str) -> bool:
        """End tap ``tap_id`` (its buffered events still go out with the next ``take``);
        False when no such tap is active."""
        tap = self.active.pop(tap_id, None)
        if tap is None:
            return False
        self._ended.append(tap)
        return True

    def clear(self) -> None:
        """End every tap and forget what they buffered (the discovery session is over)."""
        self.active.clear()
        self._ended.clear()

    def offer(self, path: str, make: Callable[[], TapRecord]) -> None:
        """A call of method ``path`` ended: each tap that takes it gets the record ``make``
        builds (once, and only when some tap takes it), or counts it as dropped when over
        its rate."""
        now = self.clock()
        record: TapRecord | None = None
        for tap in list(self.active.values()):
            if now >= tap.expires_s:
                self._end(tap)
                continue
            if not tap.matches(path):
                continue
            if now - tap.window_s >= 1.0:
                tap.window_s = now
                tap.in_window = 0
            if tap.in_window >= tap.max_per_s:
                tap.dropped += 1
                continue
            tap.in_window += 1
            if record is None:
                record = make()
            tap.events.append(record)

    def take(self) -> list[TapBatch]:
        """The batches to send now: per tap (active or ended since the last take) with
        events or drops to report; taps whose duration is over end here."""
        self._expire(self.clock())
        out: list[TapBatch] = []
        for tap in [*self._ended, *self.active.values()]:
            if tap.events or tap.dropped:
                out.append(TapBatch(tap.id, tap.events, tap.dropped))
                tap.events = []
                tap.dropped = 0
        self._ended = []
        return out

    def pending(self) -> bool:
        """True while ended taps still hold events to send."""
        return any(t.events or t.dropped for t in self._ended)

    def _expire(self, now: float) -> None:
        for tap in [t for t in self.active.values() if now >= t.expires_s]:
            self._end(tap)

    def _end(self, tap: _Tap) -> None:
        if self.active.pop(tap.id, None) is not None:
            self._ended.append(tap)

    def stats(self) -> dict[str, Any]:
        return {"active": sorted(self.active), "started": self.started}


# ---------------------------------------------------------------------- the layer
class CallLog(Layer):
    """Feeds the access log (``access_log``, None = off) and ``taps`` with the calls of one
    direction (``outbound`` or ``inbound``) of the sidecar of ``service``. ``clock`` is the
    relay's (seconds; latency is from ``call.started_s``), ``wall_clock`` gives the end's
    Unix time. Never raises for any call."""

    def __init__(self, direction: str, service: str, taps: Taps,
                 access_log: AccessLog | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if direction not in (OUTBOUND, INBOUND):
            raise ValueError(f"direction must be {OUTBOUND} or {INBOUND}, got {direction!r}")
        self.direction = direction
        self.service = service
        self.taps = taps
        self.access_log = access_log
        self.clock = clock
        self.wall_clock = wall_clock
        self._peers: dict[str | None, str] = {}
        # Off: one truthiness check per call (taps only).
        self.on_end = self._logged if access_log is not None else self._tapped  # type: ignore[method-assign]

    def on_end(self, call: Call) -> None:  # replaced per instance (see __init__)
        (self._logged if self.access_log is not None else self._tapped)(call)

    def _tapped(self, call: Call) -> None:
        if self.taps.active:
            self.taps.offer(call.path, lambda: self.record(call))

    def _logged(self, call: Call) -> None:
        rec = self.record(call)
        assert self.access_log is not None
        self.access_log.add(access_log_line(
            rec, (call.peer_id or "") if self.direction == INBOUND else ""))
        if self.taps.active:
            self.taps.offer(call.path, lambda: rec)

    def record(self, call: Call) -> TapRecord:
        """The call, ended now, as a ``TapRecord``."""
        latency_ms = (ended_s(call, self.clock) - call.started_s) * 1e3
        if self.direction == OUTBOUND:
            source, destination = self.service, call.route
            ep = call.endpoint
            endpoint = ep.address if ep is not None else ""
        else:
            peer = call.peer_id
            source = self._peers.get(peer)  # type: ignore[assignment]
            if source is None:
                if len(self._peers) >= _MAX_PEERS:
                    self._peers.clear()
                source = self._peers[peer] = _peer_service(peer)
            destination, endpoint = self.service, ""
        notes = call.notes
        return TapRecord(self.wall_clock(), self.direction, source, destination, call.path,
                         status_name(call.grpc_status), latency_ms, call.attempts, endpoint,
                         call.trace_id or "", "; ".join(notes) if notes else "")
