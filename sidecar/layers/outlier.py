"""Outlier detection: a breaker per upstream endpoint, CLOSED → OPEN → HALF_OPEN → CLOSED.

``Breaker`` is the pure state machine of one endpoint (outcomes and a time in, state out);
``OutlierDetection`` feeds it. It sits on no call's path: the balancer reports every ended
attempt through one callback (``observe``, as a grpc-go picker's ``Done``), and sees the
breakers of endpoints that are not CLOSED as their ``gate`` in the shared ``Upstreams``.

* CLOSED: ``consecutive_errors`` attempts in a row ending with one of ``error_codes`` (the
  codes that mean the endpoint is sick; never business answers such as FAILED_PRECONDITION),
  or a success rate under ``success_rate_threshold`` over the last
  ``success_rate_min_requests`` attempts, eject the endpoint: OPEN.
* OPEN for ``base_ejection_ms`` × times ejected in a row (at most ``max_ejection_ms``); the
  count in a row drops by one for every ``base_ejection_ms`` the endpoint then stays CLOSED.
* HALF_OPEN once that time is over: ``half_open_probes`` calls go through; all answered
  without a sick code: CLOSED; one sick answer: OPEN again, for longer.
* At most ``max_ejection_percent`` of the cluster's healthy endpoints are ejected at once
  (at least one may be), and never the last one not ejected: an ejection over either rule
  is not made (counted as ``suppressed``) and the next error tries again.

What never counts against an endpoint: a local fast-fail (``call.fast_fail``), a call that
never reached its pool (an injected delay, then the caller's deadline), an attempt without a
gRPC status (the caller cancelled, or the stream was reset), and a reply the sidecar made
itself with a code that is not sick. Every transition is timestamped, counted per endpoint
and noted on the call that caused it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mesh_common.snapshot import Cluster, OutlierPolicy, Snapshot
from sidecar.http2 import grpc as G
from sidecar.upstream import BreakerView, EndpointState, Upstreams

from .base import BREAKER, EJECTED, Layer, note

CLOSED, OPEN, HALF_OPEN = "CLOSED", "OPEN", "HALF_OPEN"
RECENT_TRANSITIONS = 8
"""Transitions kept per endpoint for ``/stats`` (all of them are counted)."""
_DEFAULT = OutlierPolicy()


class Breaker:
    """One endpoint's outlier detection state; pure (times are passed in, seconds on one
    monotonic clock). The owner calls ``failed``/``succeeded``/``neutral`` for each ended
    attempt, ``eject`` when ``failed`` asks for it and the cluster allows it; the balancer
    calls ``admits``/``admit`` (the ``Gate`` protocol) while the state is not CLOSED."""

    __slots__ = ("address", "state", "consecutive_errors", "ejections", "streak", "open_until_s",
                 "since_s", "probes", "max_probes", "probe_oks", "suppressed", "transitions",
                 "recent", "window", "window_fails", "window_at", "window_n")

    def __init__(self, address: str) -> None:
        self.address = address
        self.state = CLOSED
        self.consecutive_errors = 0
        self.ejections = 0
        """Times ejected since start (OPEN from CLOSED or from HALF_OPEN)."""
        self.streak = 0
        """Times ejected in a row: the ejection time's multiplier."""
        self.open_until_s = 0.0
        self.since_s: float | None = None
        """When the state last changed; None: never."""
        self.probes: list[Any] = []
        """HALF_OPEN: the probe calls in flight."""
        self.max_probes = 1
        self.probe_oks = 0
        self.suppressed = 0
        """Ejections not made because of the cluster's ejection rules."""
        self.transitions: dict[str, int] = {}
        """``"CLOSED->OPEN"`` and so on -> times."""
        self.recent: deque[tuple[float, str, str, str]] = deque(maxlen=RECENT_TRANSITIONS)
        """(at_s, from, to, why) of the last transitions."""
        self.window: bytearray | None = None
        """Success-rate window: 1 per sick answer among the last attempts (ring)."""
        self.window_fails = 0
        self.window_at = 0
        self.window_n = 0

    # ------------------------------------------------------------ the Gate protocol
    def admits(self, now_s: float) -> bool:
        """CLOSED: True. OPEN: False until its time is over, then it goes HALF_OPEN. HALF_OPEN:
        True while fewer than ``max_probes`` probes are in flight or answered."""
        state = self.state
        if state is CLOSED:
            return True
        if state is OPEN:
            if now_s < self.open_until_s:
                return False
            self._move(HALF_OPEN, self.open_until_s, "ejection time over")
        return len(self.probes) + self.probe_oks < self.max_probes

    def admit(self, call: Any, now_s: float) -> None:
        """``call`` was sent to the endpoint: while HALF_OPEN it takes a probe slot (the
        balancer sends one only when ``admits`` said so)."""
        if self.state is not CLOSED and self.admits(now_s):
            self.probes.append(call)

    # ------------------------------------------------------------ outcomes
    def succeeded(self, call: Any, now_s: float, policy: OutlierPolicy) -> None:
        """An attempt ended without a sick code. HALF_OPEN: a probe's success; once every
        probe succeeded the breaker closes. OPEN: ignored (it began before the ejection)."""
        state = self.state
        if state is CLOSED:
            self.consecutive_errors = 0
            if self.window is not None:
                self._window_push(0, policy)
                if not self.window_fails and self.window_n >= len(self.window):
                    self.window = None  # a clean run: nothing to remember
            return
        if state is HALF_OPEN and self._take_probe(call):
            self.probe_oks += 1
            if self.probe_oks >= self.max_probes:
                self.consecutive_errors = 0
                self.window = None
                self._move(CLOSED, now_s, f"{self.probe_oks} half-open probe(s) answered")

    def failed(self, call: Any, now_s: float, policy: OutlierPolicy, status: int) -> str:
        """An attempt ended with a sick code. Returns why the endpoint should be ejected now
        (CLOSED over a threshold; the owner checks the cluster's rules and calls ``eject``),
        or "". HALF_OPEN: a failed probe opens the breaker again at once."""
        state = self.state
        if state is CLOSED:
            self.consecutive_errors += 1
            rate = self._window_push(1, policy) if policy.success_rate_min_requests else ""
            limit = policy.consecutive_errors
            if limit and self.consecutive_errors >= limit:
                return (f"{self.consecutive_errors} consecutive errors "
                        f"(last {G.STATUS_NAMES.get(status, status)})")
            return rate
        if state is HALF_OPEN and self._take_probe(call):
            self.consecutive_errors += 1
            self._open(now_s, policy, f"half-open probe failed with "
                       f"{G.STATUS_NAMES.get(status, status)}")
        return ""

    def neutral(self, call: Any) -> None:
        """An attempt ended with no verdict on the endpoint (cancelled, no status, local
        fast-fail): a probe's slot is freed for another probe."""
        if self.probes:
            self._take_probe(call)

    def eject(self, now_s: float, policy: OutlierPolicy, why: str) -> float:
        """CLOSED → OPEN; returns the ejection time (s): base × times ejected in a row, at
        most the maximum. The count in a row first drops by one per base time spent CLOSED."""
        base_s = policy.base_ejection_ms / 1000
        if self.since_s is not None and self.streak:
            self.streak = max(0, self.streak - int((now_s - self.since_s) / base_s))
        return self._open(now_s, policy, why)

    def watching(self) -> bool:
        """True while every outcome matters (errors in a row, a success-rate window with a
        failure in it, or not CLOSED); else only sick answers do."""
        return self.state is not CLOSED or self.consecutive_errors > 0 or self.window is not None

    # ------------------------------------------------------------ views
    def half_open_in_s(self, now_s: float) -> float:
        return max(0.0, self.open_until_s - now_s) if self.state is OPEN else 0.0

    def current(self, now_s: float) -> str:
        """The state at ``now_s`` (an OPEN breaker whose time is over is HALF_OPEN)."""
        if self.state is OPEN and now_s >= self.open_until_s:
            self._move(HALF_OPEN, self.open_until_s, "ejection time over")
        return self.state

    # ------------------------------------------------------------ internals
    def _open(self, now_s: float, policy: OutlierPolicy, why: str) -> float:
        self.streak += 1
        self.ejections += 1
        duration_s = min(policy.base_ejection_ms * self.streak, policy.max_ejection_ms) / 1000
        self.open_until_s = now_s + duration_s
        self.max_probes = policy.half_open_probes
        self.probes = []
        self.probe_oks = 0
        self.window = None
        self._move(OPEN, now_s, f"{why}; ejected for {duration_s:g} s")
        return duration_s

    def _move(self, to: str, at_s: float, why: str) -> None:
        key = f"{self.state}->{to}"
        self.transitions[key] = self.transitions.get(key, 0) + 1
        self.recent.append((at_s, self.state, to, why))
        self.state = to
        self.since_s = at_s
        if to is HALF_OPEN:
            self.probes = []
            self.probe_oks = 0

    def _take_probe(self, call: Any) -> bool:
        probes = self.probes
        for i, p in enumerate(probes):
            if p is call:
                del probes[i]
                return True
        return False

    def _window_push(self, failed: int, policy: OutlierPolicy) -> str:
        n = policy.success_rate_min_requests
        w = self.window
        if w is None or len(w) != n:
            w = self.window = bytearray(n)
            self.window_fails = self.window_at = self.window_n = 0
        i = self.window_at
        self.window_fails += failed - w[i]
        w[i] = failed
        self.window_at = (i + 1) % n
        if self.window_n < n:
            self.window_n += 1
            return ""
        rate = 1.0 - self.window_fails / n
        if rate < policy.success_rate_threshold:
            return (f"success rate {rate:.0%} over the last {n} calls, under "
                    f"{policy.success_rate_threshold:.0%}")
        return ""


class _Policy:
    __slots__ = ("policy", "codes")

    def __init__(self, policy: OutlierPolicy) -> None:
        self.policy = policy
        self.codes = frozenset(policy.error_codes)


class OutlierDetection(Layer):
    """Keeps a ``Breaker`` per endpoint address (on its ``EndpointState.outlier``) under the
    outlier policy of the call's service (the snapshot's ``RouteRule.outlier``, else the
    defaults), fed by ``observe``. An ejected endpoint gets its breaker as its ``gate`` in
    ``upstreams`` until it closes again. ``clock`` is the balancer's (seconds, monotonic);
    ``wall_clock`` only turns transition times into Unix time for reports."""

    def __init__(self, snapshot: Callable[[], Snapshot], upstreams: Upstreams,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.snapshot = snapshot
        self.upstreams = upstreams
        self.clock = clock
        self.wall_clock = wall_clock
        self._snap: Snapshot | None = None
        self._policies: dict[str, _Policy] = {}
        self._default = _Policy(_DEFAULT)

    def _build(self, snap: Snapshot) -> None:
        self._policies = {r.service: _Policy(r.outlier) for r in snap.routes}
        self._snap = snap

    def observe(self, call: Any, st: EndpointState, status: int | None, now_s: float) -> None:
        """One ended attempt of ``call`` on ``st``'s endpoint with gRPC ``status`` (None:
        none). The balancer reports every sick answer, and every outcome of an endpoint
        ``st.watched``, which this keeps up to date. Never raises."""
        b: Breaker | None = st.outlier
        if status is None or call.fast_fail or call.pool is None:
            if b is None:
                return
            if b.probes:
                b.neutral(call)
        else:
            if b is None:
                b = st.outlier = Breaker(st.address)
            snap = self.snapshot()
            if snap is not self._snap:
                self._build(snap)
            p = self._policies.get(call.route, self._default)
            if status not in p.codes:
                if call.local_reply is not None:  # the sidecar's own answer, not the endpoint's
                    b.neutral(call)
                else:
                    was = b.state
                    b.succeeded(call, now_s, p.policy)
                    if was is not CLOSED and b.state is CLOSED:
                        self.upstreams.set_gate(st, None)
                        st.forget_latency(now_s)  # its failures' penalties are history
                        note(call, f"outlier detection: {st.address} is back (CLOSED) after "
                             "its half-open probes", BREAKER,
                             {"mesh.endpoint": st.address, "mesh.breaker": CLOSED}
                             if call.span is not None else None)
            else:
                self._failed(call, st, b, p.policy, status, now_s)
        st.watched = b.watching()

    def _failed(self, call: Any, st: EndpointState, b: Breaker, policy: OutlierPolicy,
                status: int, now_s: float) -> None:
        was = b.state
        why = b.failed(call, now_s, policy, status)
        if why:
            cluster: Cluster | None = call.cluster
            refusal = self._refusal(cluster, st, policy) if cluster is not None else ""
            if refusal:
                b.suppressed += 1
                note(call, f"outlier detection: {st.address} not ejected ({why}): {refusal}",
                     BREAKER, {"mesh.endpoint": st.address, "mesh.breaker": b.state,
                               "mesh.outlier.reason": why, "mesh.outlier.suppressed": refusal}
                     if call.span is not None else None)
                return
            duration_s = b.eject(now_s, policy, why)
            self.upstreams.set_gate(st, b)
            note(call, f"outlier detection: ejected {st.address} for {duration_s:g} s: {why}",
                 EJECTED, {"mesh.endpoint": st.address, "mesh.breaker": b.state,
                           "mesh.outlier.reason": why, "mesh.ejection_s": duration_s}
                 if call.span is not None else None)
        elif was is HALF_OPEN and b.state is OPEN:
            note(call, f"outlier detection: {st.address} {b.recent[-1][3]}", EJECTED,
                 {"mesh.endpoint": st.address, "mesh.breaker": b.state,
                  "mesh.outlier.reason": b.recent[-1][3]} if call.span is not None else None)

    def _refusal(self, cluster: Cluster, st: EndpointState, policy: OutlierPolicy) -> str:
        """Why ejecting ``st`` now would break the cluster's rules, or "" when it may go."""
        states = self.upstreams.endpoints
        n = 0
        ejected = 0
        inside = False
        for e in cluster.healthy:
            n += 1
            s = states.get(e.address)
            if s is st:
                inside = True
            if s is not None and s.gate is not None:
                ejected += 1
        if not inside:
            n += 1
        if n - ejected <= 1:
            return "it is the last endpoint of the cluster not ejected"
        allowed = max(1, int(n * policy.max_ejection_percent / 100.0))
        if ejected >= allowed:
            return (f"{ejected} of {n} endpoints already ejected (max_ejection_percent "
                    f"{policy.max_ejection_percent:g})")
        return ""

    # ------------------------------------------------------------ reporting
    def _views(self) -> list[tuple[str, str, Breaker | None]]:
        """(cluster, address, breaker) for every endpoint of the snapshot in force."""
        states = self.upstreams.endpoints
        out = []
        for c in self.snapshot().clusters:
            for e in c.endpoints:
                st = states.get(e.address)
                out.append((c.name, e.address, st.outlier if st is not None else None))
        return out

    def breaker_views(self) -> dict[str, BreakerView]:
        """Every endpoint address of the snapshot in force -> its breaker (CLOSED with no
        history for an endpoint that has not answered yet)."""
        now = self.clock()
        wall = self.wall_clock()
        out: dict[str, BreakerView] = {}
        for _, address, b in self._views():
            if address in out:
                continue
            if b is None:
                out[address] = BreakerView(CLOSED, 0, 0, 0.0, 0.0)
            else:
                state = b.current(now)
                at = 0.0 if b.since_s is None else round(wall - (now - b.since_s), 3)
                out[address] = BreakerView(state, b.consecutive_errors, b.ejections,
                                           round(b.half_open_in_s(now), 3), at)
        return out

    def counters(self) -> dict[str, Any]:
        """``{"breakers": {cluster: {address: {"state", "consecutive_errors", "ejections",
        "half_open_in_s", "last_transition_unix", "last_transition_ago_s", "suppressed",
        "probes_in_flight", "transitions": {"CLOSED->OPEN": n, ...}, "recent": [{"at_unix",
        "from", "to", "why"}]}}}}`` for the endpoints of the snapshot in force."""
        now = self.clock()
        wall = self.wall_clock()
        out: dict[str, dict[str, Any]] = {}
        for cluster, address, b in self._views():
            if b is None:
                row: dict[str, Any] = {"state": CLOSED, "consecutive_errors": 0, "ejections": 0,
                                       "half_open_in_s": 0.0, "last_transition_unix": None,
                                       "last_transition_ago_s": None, "suppressed": 0,
                                       "probes_in_flight": 0, "transitions": {}, "recent": []}
            else:
                state = b.current(now)
                row = {"state": state, "consecutive_errors": b.consecutive_errors,
                       "ejections": b.ejections, "half_open_in_s": round(b.half_open_in_s(now), 3),
                       "last_transition_unix": None if b.since_s is None
                       else round(wall - (now - b.since_s), 3),
                       "last_transition_ago_s": None if b.since_s is None
                       else round(now - b.since_s, 3),
                       "suppressed": b.suppressed, "probes_in_flight": len(b.probes),
                       "transitions": dict(b.transitions),
                       "recent": [{"at_unix": round(wall - (now - at), 3), "from": f, "to": t,
                                   "why": why} for at, f, t, why in b.recent]}
            out.setdefault(cluster, {})[address] = row
        return {"breakers": out}
