"""Fault: inject the delays and aborts the snapshot's route configures for a service.

It runs right after routing and before timeouts, retries and the balancer (as Envoy's fault
filter does), so an injected abort is what the caller sees, no endpoint is picked for it and
it never counts against one; an injected delay holds the call before it is sent on.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

from mesh_common.snapshot import FaultRule, Snapshot
from sidecar.http2 import grpc as G
from sidecar.http2.relay import Call, Delayed, LocalReply

from .base import FAULT, Decision, Layer, Next, note


class _Counts:
    """Faults injected into calls to one service since start."""

    __slots__ = ("aborts", "delays")

    def __init__(self) -> None:
        self.aborts = 0
        self.delays = 0


class _Fault:
    """A ``FaultRule`` prepared for the per-call check."""

    __slots__ = ("name", "exact", "prefix", "regex", "delay_s", "delay_percent", "abort_percent",
                 "reply", "delay_note", "counts", "abort_attrs", "delay_attrs")

    def __init__(self, f: FaultRule, counts: _Counts) -> None:
        self.name = f.name
        kind, value = (f.method.kind, f.method.value) if f.method is not None else ("", "")
        self.exact = value if kind == "exact" else None
        self.prefix = value if kind == "prefix" else None
        self.regex = re.compile(value) if kind == "regex" else None
        self.delay_s = f.delay_ms / 1000
        self.delay_percent = f.delay_percent if f.delay_ms > 0 else 0.0
        self.abort_percent = f.abort_percent if f.abort_code else 0.0
        code = G.STATUS_NAMES.get(f.abort_code, str(f.abort_code))
        self.reply = LocalReply(f.abort_code,
                                f"fault injected by the mesh: abort {code} ({f.name})")
        self.delay_note = f"fault injected by the mesh: delay {f.delay_ms} ms ({f.name})"
        # Span event attributes, made once.
        self.abort_attrs = {"mesh.fault": f.name, "mesh.fault.abort_code": f.abort_code}
        self.delay_attrs = {"mesh.fault": f.name, "mesh.fault.delay_ms": f.delay_ms}
        self.counts = counts

    def applies_to(self, path: str) -> bool:
        """True when the fault is for the call's method (``:path``)."""
        if self.exact is not None:
            return path == self.exact
        if self.prefix is not None:
            return path.startswith(self.prefix)
        return self.regex is None or self.regex.fullmatch(path) is not None


def _rolls(rnd: Callable[[], float], percent: float) -> bool:
    """True for ``percent`` (0..100) of draws; 0 and 100 draw nothing."""
    return percent >= 100.0 or (percent > 0.0 and rnd() * 100.0 < percent)


class Fault(Layer):
    """Rolls every fault of the call's service (``call.route``) whose method matches
    ``call.path`` (exact or prefix; none = every method), each independently:

    * abort, for ``abort_percent`` of calls: the call is answered with a ``LocalReply`` of
      ``abort_code`` and "fault injected by the mesh: abort <CODE> (<fault name>)"; the layers
      below it (timeout, balance) never run. Of several aborts that fire, the first wins.
    * delay, for ``delay_percent`` of calls: the decision (the abort, or what the layers below
      return) comes as ``Delayed(delay_s, decision)``; delays that fire add up (seconds).

    Each injection is counted per service and noted on the call. A service without faults
    costs one dict lookup. ``rng`` makes the rolls reproducible; never raises.
    """

    def __init__(self, snapshot: Callable[[], Snapshot], rng: random.Random | None = None) -> None:
        self.snapshot = snapshot
        self._random = (rng or random.Random()).random
        self._snap: Snapshot | None = None
        self._faults: dict[str, tuple[_Fault, ...]] = {}
        self._counts: dict[str, _Counts] = {}

    def _build(self, snap: Snapshot) -> None:
        faults: dict[str, tuple[_Fault, ...]] = {}
        for route in snap.routes:
            if route.faults:
                counts = self._counts.get(route.service)
                if counts is None:
                    counts = self._counts[route.service] = _Counts()
                faults[route.service] = tuple(_Fault(f, counts) for f in route.faults)
        self._faults = faults
        self._snap = snap

    def on_request(self, call: Call, next: Next) -> Decision:
        snap = self.snapshot()
        if snap is not self._snap:
            self._build(snap)
        faults = self._faults.get(call.route)
        if faults is None:
            return next(call)
        rnd = self._random
        abort: LocalReply | None = None
        delay_s = 0.0
        for f in faults:
            if not f.applies_to(call.path):
                continue
            if abort is None and _rolls(rnd, f.abort_percent):
                abort = f.reply
                f.counts.aborts += 1
                note(call, f.reply.message, FAULT, f.abort_attrs)
            if _rolls(rnd, f.delay_percent):
                delay_s += f.delay_s
                f.counts.delays += 1
                note(call, f.delay_note, FAULT, f.delay_attrs)
        decision: Decision = abort if abort is not None else next(call)
        if delay_s <= 0.0:
            return decision
        if isinstance(decision, Delayed):  # a layer below delays too: one pause, both delays
            return Delayed(delay_s + decision.seconds, decision.then)
        return Delayed(delay_s, decision)

    def counters(self) -> dict[str, Any]:
        """``{"faults": {service: {"abort": n, "delay": n}}}``: injections since start."""
        return {"faults": {s: {"abort": c.aborts, "delay": c.delays}
                           for s, c in self._counts.items()}}
