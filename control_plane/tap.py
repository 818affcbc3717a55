"""Tap sessions: ``Admin.Tap`` streams the calls the sidecars carry, live, through the
control plane. Pure (no I/O, no event loop): the server sends the messages this module
builds and wakes the caller's stream through ``Tap.notify``.

Which sidecars are asked (``Tap.wants``), for a tap of service S:

* every connected sidecar of S (both directions of its calls), and
* every connected sidecar with an outbound listener, since any of them may call S: every
  snapshot routes to every service, so "its snapshot routes to S" is "it has an outbound
  listener". A sidecar with neither (inbound-only, another service) never carries a call of
  S's and is left alone.

Which events are streamed (``Tap.matches``): every event reported by a sidecar of S, and the
outbound events of other sidecars whose destination is S; an inbound event of another
service's sidecar whose caller is S is left out (the same call is S's outbound event), so a
call appears once per sidecar of S it crosses. The method filter (the sidecars apply it too)
is checked again. Events come only from the sidecars the tap was started on; the reporting
sidecar's instance id is set from its stream, never taken from the event.

Bounds: a tap lasts at most ``MAX_TAP_DURATION_S``; each sidecar sends at most
``SIDECAR_EVENTS_PER_S`` events a second per tap (it counts the rest in ``TapEvents.dropped``);
the control plane buffers at most ``MAX_BUFFERED_EVENTS`` per tap for a slow reader and counts
the rest in ``Tap.dropped`` too.
"""

from __future__ import annotations

import math
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from control_plane.registry import Key
from protos.mesh.v1 import control_pb2 as pb

DEFAULT_TAP_DURATION_S = 60.0
MAX_TAP_DURATION_S = 3600.0
MIN_START_DURATION_S = 0.1       # a TapStart never asks for less (the tap ends on its own)
SIDECAR_EVENTS_PER_S = 100       # TapStart.max_events_per_s sent to every sidecar
MAX_BUFFERED_EVENTS = 10_000     # per tap, waiting for the caller to read them
MAX_METHOD_CHARS = 1024
MAX_SERVICE_CHARS = 253
OUTBOUND = "outbound"


class TapError(ValueError):
    """A tap request that cannot be served; the message names the field."""


@dataclass(frozen=True)
class TapSpec:
    """A validated tap request: service, method filter, duration (s) and max events (0 =
    no bound)."""

    service: str
    method: str
    duration_s: float
    max_events: int


def tap_spec(service: str, method: str, duration_s: float, max_events: int) -> TapSpec:
    """Validate a ``TapRequest``'s fields. ``service`` is required; ``method`` is "" (every
    method) or a gRPC path starting with '/' (exact, or a prefix ending in '/'); a duration
    of 0 means ``DEFAULT_TAP_DURATION_S``, longer than ``MAX_TAP_DURATION_S`` is capped;
    ``max_events`` 0 means no bound. Raises TapError naming the field."""
    if not service:
        raise TapError("service: required")
    if len(service) > MAX_SERVICE_CHARS or not service.isprintable() \
            or any(c.isspace() for c in service):
        raise TapError("service: 1-253 printable characters without spaces")
    if method and (not method.startswith("/") or len(method) > MAX_METHOD_CHARS
                   or not method.isprintable() or any(c.isspace() for c in method)):
        raise TapError("method: \"\" (every method) or a gRPC path starting with '/' "
                       "(exact, or a prefix ending in '/')")
    if not math.isfinite(duration_s) or duration_s < 0:
        raise TapError("duration_s: a number of seconds >= 0 (0 = "
                       f"{DEFAULT_TAP_DURATION_S:g})")
    if max_events < 0:
        raise TapError("max_events: >= 0 (0 = no bound)")
    duration = DEFAULT_TAP_DURATION_S if duration_s == 0 else min(duration_s,
                                                                   MAX_TAP_DURATION_S)
    return TapSpec(service, method, duration, max_events)


def method_matches(pattern: str, method: str) -> bool:
    """Whether ``method`` passes the filter ``pattern`` ("" = all; ending in '/' = prefix;
    else exact)."""
    if not pattern:
        return True
    if pattern.endswith("/"):
        return method.startswith(pattern)
    return method == pattern


class Tap:
    """One ``Admin.Tap`` call: its spec, when it ends (unix s), the sidecars it was started
    on (``targets``) and the events waiting for the caller."""

    def __init__(self, tap_id: str, spec: TapSpec, started_at: float) -> None:
        self.id = tap_id
        self.spec = spec
        self.started_at = started_at
        self.expires_at = started_at + spec.duration_s
        self.targets: set[Key] = set()
        self.accepted = 0        # events queued for the caller (bounded by max_events)
        self.dropped = 0         # events lost: the sidecars' rate bound and our buffer's
        self.notify: Callable[[], None] | None = None  # called when events are queued
        self._events: deque[pb.TapEvent] = deque()

    # ------------------------------------------------------------------ the sidecars
    def wants(self, service: str, has_outbound: bool) -> bool:
        """Whether a sidecar of ``service`` (with an outbound listener or not) is asked."""
        return service == self.spec.service or has_outbound

    def start_message(self, now: float) -> pb.ControlMessage:
        """The TapStart for a sidecar, asking for the tap's remaining time (at least
        ``MIN_START_DURATION_S``)."""
        remaining = max(MIN_START_DURATION_S, self.expires_at - now)
        return pb.ControlMessage(tap_start=pb.TapStart(
            id=self.id, method=self.spec.method, duration_s=remaining,
            max_events_per_s=SIDECAR_EVENTS_PER_S))

    def stop_message(self) -> pb.ControlMessage:
        return pb.ControlMessage(tap_stop=pb.TapStop(id=self.id))

    # ------------------------------------------------------------------ the events
    def matches(self, reporter_service: str, event: pb.TapEvent) -> bool:
        """Whether an event a sidecar of ``reporter_service`` sent belongs to this tap."""
        s = self.spec.service
        if reporter_service != s and not (event.direction == OUTBOUND and event.destination == s):
            return False
        return method_matches(self.spec.method, event.method)

    @property
    def exhausted(self) -> bool:
        """True once ``max_events`` events were queued (never without a bound)."""
        return 0 < self.spec.max_events <= self.accepted

    def offer(self, key: Key, batch: pb.TapEvents) -> int:
        """Queue the events of ``batch`` (sent by the sidecar ``key``) that belong to the tap,
        up to ``max_events`` in all and ``MAX_BUFFERED_EVENTS`` waiting; returns how many were
        queued. A sidecar the tap was not started on is ignored. Calls ``notify`` when any
        were queued."""
        if key not in self.targets:
            return 0
        self.dropped += max(0, batch.dropped)
        service, instance = key
        queued = 0
        for event in batch.events:
            if self.exhausted:
                break
            if not self.matches(service, event):
                continue
            if len(self._events) >= MAX_BUFFERED_EVENTS:
                self.dropped += 1
                continue
            out = pb.TapEvent()
            out.CopyFrom(event)
            out.instance = instance
            self._events.append(out)
            self.accepted += 1
            queued += 1
        if queued and self.notify is not None:
            self.notify()
        return queued

    def end(self) -> None:
        """End the tap now (the control plane stops): its stream sends what is queued and
        returns."""
        self.expires_at = min(self.expires_at, self.started_at)
        if self.notify is not None:
            self.notify()

    def take(self) -> list[pb.TapEvent]:
        """The events queued so far, oldest first (and forget them)."""
        events = list(self._events)
        self._events.clear()
        return events


class TapHub:
    """The taps running now, by id. ``new_id`` makes tap ids (random by default, so a
    restarted control plane never reuses one a sidecar may still run)."""

    def __init__(self, new_id: Callable[[], str] | None = None) -> None:
        self._new_id = new_id or (lambda: f"tap-{secrets.token_hex(6)}")
        self._taps: dict[str, Tap] = {}

    def open(self, spec: TapSpec, now: float) -> Tap:
        """Start a tap (the caller sends its ``start_message`` to the sidecars it ``wants``,
        recording them in ``targets``)."""
        tap_id = self._new_id()
        while tap_id in self._taps:
            tap_id = self._new_id()
        tap = Tap(tap_id, spec, now)
        self._taps[tap_id] = tap
        return tap

    def close(self, tap: Tap) -> set[Key]:
        """End a tap; returns the sidecars to send its ``stop_message`` to. Idempotent (a
        second close returns nothing)."""
        if self._taps.pop(tap.id, None) is None:
            return set()
        targets, tap.targets = tap.targets, set()
        tap.notify = None
        return targets

    def active(self) -> list[Tap]:
        return list(self._taps.values())

    def end_all(self) -> None:
        """End every running tap (``Tap.end``); their streams close them."""
        for tap in list(self._taps.values()):
            tap.end()

    def __len__(self) -> int:
        return len(self._taps)

    def start(self, key: Key, has_outbound: bool, now: float,
              taps: Iterable[Tap] | None = None) -> list[pb.ControlMessage]:
        """The TapStart of every running tap (or of ``taps``) that wants the sidecar ``key``
        (service, instance), recording it as a target: for a sidecar that connects, or for
        the sidecars a new tap asks."""
        out: list[pb.ControlMessage] = []
        for tap in (self._taps.values() if taps is None else taps):
            if tap.id in self._taps and now < tap.expires_at and tap.wants(key[0], has_outbound):
                tap.targets.add(key)
                out.append(tap.start_message(now))
        return out

    def deliver(self, key: Key, batch: pb.TapEvents) -> int:
        """Route a ``TapEvents`` from the sidecar ``key`` to its tap; returns the events
        queued (0 for an unknown or ended tap)."""
        tap = self._taps.get(batch.id)
        return tap.offer(key, batch) if tap is not None else 0
