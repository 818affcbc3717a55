"""Balance: pick one endpoint for each attempt of a call, and feed its outcome back.

The candidates are the endpoints of the subset a route rule chose (``call.subset``) or the
cluster's healthy ones, minus those outlier detection holds out (OPEN, or HALF_OPEN without a
free probe slot), preferring endpoints an earlier attempt of the call did not go to
(``call.tried``). The service's ``RouteRule.load_balancer`` picks among them (default
``peak_ewma``):

* ``round_robin``: in turn, one rotation per candidate set;
* ``random``: uniformly;
* ``least_request``: the fewer calls in flight of two drawn at random (power of two choices);
* ``peak_ewma`` (Linkerd's, after Finagle): the cheaper of two drawn at random, where cost =
  latency estimate × (calls in flight + 1). The estimate is an exponentially weighted moving
  average of response latencies over ``decay_s`` (default ``DECAY_S``, 10 s; the sidecar's
  ``--ewma-decay-s``) that jumps straight up to a slower answer (peak sensitivity) and,
  between answers, decays towards zero so an endpoint left alone gets tried again. A sick
  answer (one of the service's outlier ``error_codes``) is fed as at least twice the
  current estimate, so failing fast never makes an endpoint look fast.

A HALF_OPEN endpoint with a free probe slot is picked first (its probe is how it comes back).

Per snapshot object, built once: the service → balancer table, and per candidate tuple its
``EndpointState`` tuple. Mutable per-endpoint state (in flight, estimate, breaker) lives in
the shared ``Upstreams`` by address, so it outlives snapshot swaps.

Feedback (the grpc-go picker's ``Done``), with nothing stored per call: an attempt ends when
the call ends (``on_end``: ``call.endpoint``) or when the same call asks for another pick (a
retry: ``call.endpoint`` is still the failed attempt's, which then joins ``call.tried``; its
status is the retry layer's record of the attempt, else ``call.grpc_status``). Then the
endpoint's in-flight count drops; its estimate takes the call's latency (start to end) when
the call is unary (at most one message each way: a stream's length says nothing of the
endpoint's speed) and the attempt has a verdict (a status, not a local fast-fail, sent to
the endpoint's pool); and ``on_outcome`` (outlier detection) gets ``(call, state, status,
now)`` for a sick answer, or any outcome of an endpoint it ``watched``. An injected delay
counts in the latency of the endpoint picked for the call (it is picked before the pause).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from mesh_common.snapshot import (
    DEFAULT_LOAD_BALANCER,
    SICK_CODES,
    Cluster,
    Endpoint,
    Snapshot,
)
from sidecar.http2 import grpc as G
from sidecar.http2.relay import Call, LocalReply
from sidecar.upstream import EndpointState, Outcome, Upstreams

from .base import ENDPOINT, Decision, Layer, Next, ended_s, span_event

DECAY_S = 10.0
"""Time constant of the peak-EWMA estimate (Linkerd's default)."""
PENALTY_CAP_S = 10.0
"""A sick answer raises the estimate to at most this (or to its own latency, if slower)."""
_CANDIDATE_ENTRIES = 1024

Picker = Callable[["_Candidates", Sequence[EndpointState]], int]
"""``(candidates, states to pick from) -> position in states``."""


# ---------------------------------------------------------------------- peak-EWMA (pure)
def ewma_cost(st: EndpointState, now_s: float, decay_s: float = DECAY_S) -> float:
    """Peak-EWMA cost of ``st`` at ``now_s``: the estimate decayed towards 0 over the time
    since it was last fed, × (in flight + 1)."""
    dt = now_s - st.stamp_s
    est = st.ewma_s * math.exp(-dt / decay_s) if dt > 0 else st.ewma_s
    return est * (st.in_flight + 1)


def ewma_observe(st: EndpointState, sample_s: float, now_s: float,
                 decay_s: float = DECAY_S) -> None:
    """Feed one latency ``sample_s``: a slower answer than the estimate replaces it (peak);
    a faster one is averaged in with weight ``1 - exp(-Δt / decay_s)``, Δt since the last
    sample. (``Balance`` inlines this on its hot path.)"""
    if sample_s >= st.ewma_s:
        st.ewma_s = sample_s
    else:
        dt = now_s - st.stamp_s
        w = math.exp(-dt / decay_s) if dt > 0 else 1.0
        st.ewma_s = st.ewma_s * w + sample_s * (1.0 - w)
    st.stamp_s = now_s


def failure_sample(st: EndpointState, latency_s: float) -> float:
    """What a sick answer feeds the estimate: its latency, but at least twice the current
    estimate (up to ``PENALTY_CAP_S``)."""
    return max(latency_s, min(2.0 * st.ewma_s, PENALTY_CAP_S))


# ---------------------------------------------------------------------- pickers (pure)
class _Candidates:
    """One candidate tuple under one snapshot: its endpoints, their states, a rotation."""

    __slots__ = ("eps", "states", "rr")

    def __init__(self, eps: tuple[Endpoint, ...], states: tuple[EndpointState, ...]) -> None:
        self.eps = eps
        self.states = states
        self.rr = 0


def round_robin() -> Picker:
    def pick(c: _Candidates, states: Sequence[EndpointState]) -> int:
        i = c.rr
        c.rr = i + 1
        return i % len(states)
    return pick


def uniform(rnd: Callable[[], float]) -> Picker:
    def pick(c: _Candidates, states: Sequence[EndpointState]) -> int:
        n = len(states)
        return int(rnd() * n) % n  # % n: a draw just under 1 may round up to n
    return pick


def least_request(rnd: Callable[[], float]) -> Picker:
    """Power of two choices on calls in flight (a tie goes to the first drawn)."""
    def pick(c: _Candidates, states: Sequence[EndpointState]) -> int:
        n = len(states)
        if n == 1:
            return 0
        a = int(rnd() * n) % n
        b = int(rnd() * (n - 1)) % (n - 1)
        if b >= a:
            b += 1
        return b if states[b].in_flight < states[a].in_flight else a
    return pick


def peak_ewma(rnd: Callable[[], float], decay_s: float = DECAY_S) -> Picker:
    """Power of two choices on ``ewma_cost``. Both estimates decay at the same rate, so the
    cheaper of the two is known without the clock: a's cost < b's cost exactly when
    ewma_a·(in_flight_a + 1)·exp((stamp_a − stamp_b)/decay) < ewma_b·(in_flight_b + 1)."""
    exp = math.exp
    inv = 1.0 / decay_s

    def pick(c: _Candidates, states: Sequence[EndpointState]) -> int:
        n = len(states)
        if n == 1:
            return 0
        a = int(rnd() * n) % n
        b = int(rnd() * (n - 1)) % (n - 1)
        if b >= a:
            b += 1
        sa = states[a]
        sb = states[b]
        try:
            ca = sa.ewma_s * (sa.in_flight + 1) * exp((sa.stamp_s - sb.stamp_s) * inv)
        except OverflowError:  # a was fed ages after b: b has decayed to nothing
            return b
        return b if sb.ewma_s * (sb.in_flight + 1) < ca else a
    return pick


def pickers(rnd: Callable[[], float], decay_s: float = DECAY_S) -> dict[str, Picker]:
    """Every balancer a snapshot may name, drawing from ``rnd``."""
    return {"peak_ewma": peak_ewma(rnd, decay_s), "round_robin": round_robin(),
            "random": uniform(rnd), "least_request": least_request(rnd)}


# ---------------------------------------------------------------------- the layer
_UNPROCESSED = frozenset({"refused_stream", "goaway"})


def _retried_status(call: Call, ep: Endpoint) -> int | None:
    """How the attempt on ``ep`` ended, when a retry asks for a new pick: as the retry layer
    recorded it (``call.retry.attempts[-1]``: address, reason, status) when that record is
    about ``ep`` (a refused or unprocessed stream: None, the endpoint did not process it);
    else ``call.grpc_status``."""
    attempts = getattr(call.retry, "attempts", None)
    if attempts:
        last = attempts[-1]
        if last[0] == ep.address:
            return None if last[1] in _UNPROCESSED else last[2]
    return call.grpc_status


class Balance(Layer):
    """Sets ``call.endpoint`` for each attempt (see the module's docstring). No candidate:
    a ``LocalReply`` UNAVAILABLE naming the service (no endpoints, no healthy endpoint, or
    every candidate held out by outlier detection). ``clock`` is the relay's (seconds);
    ``rng`` draws for random, least_request and peak_ewma; ``decay_s`` is peak-EWMA's time
    constant (seconds, > 0). Never raises."""

    def __init__(self, snapshot: Callable[[], Snapshot], upstreams: Upstreams,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 on_outcome: Outcome | None = None, decay_s: float = DECAY_S) -> None:
        self.snapshot = snapshot
        self.upstreams = upstreams
        self.clock = clock
        self.on_outcome = on_outcome
        self.decay_s = decay_s
        self._inv_decay = 1.0 / decay_s
        self._pickers = pickers((rng or random.Random()).random, decay_s)
        self._snap: Snapshot | None = None
        self._services: dict[str, tuple[str, Picker, frozenset[int]]] = {}
        self._default = (DEFAULT_LOAD_BALANCER, self._pickers[DEFAULT_LOAD_BALANCER],
                         frozenset(SICK_CODES))
        # Keyed by id(candidate tuple), and by id(endpoint); each entry holds its key's
        # object, so the id cannot be reused while it lives. Cleared with each new snapshot.
        self._candidates: dict[int, _Candidates] = {}
        self._states: dict[int, tuple[Endpoint, EndpointState]] = {}

    # ------------------------------------------------------------ per snapshot
    def _build(self, snap: Snapshot) -> None:
        self._services = {r.service: (r.load_balancer, self._pickers[r.load_balancer],
                                      frozenset(r.outlier.error_codes)) for r in snap.routes}
        self._candidates = {}
        self._states = {}
        self.upstreams.retain(e.address for c in snap.clusters for e in c.endpoints)
        old = self._snap
        if old is not None:  # endpoints healthy again start their estimate over
            was_healthy = {e.address for c in old.clusters for e in c.healthy}
            now_s = self.clock()
            for c in snap.clusters:
                for e in c.healthy:
                    if e.address not in was_healthy:
                        self.upstreams.endpoint(e.address, now_s).forget_latency(now_s)
        self._snap = snap

    def _candidates_of(self, eps: tuple[Endpoint, ...], now_s: float) -> _Candidates:
        table = self._candidates
        if len(table) >= _CANDIDATE_ENTRIES:
            table.clear()
            self._states.clear()
        endpoint = self.upstreams.endpoint
        states = tuple(endpoint(e.address, now_s) for e in eps)
        for e, st in zip(eps, states, strict=True):
            self._states[id(e)] = (e, st)
        c = table[id(eps)] = _Candidates(eps, states)
        return c

    # ------------------------------------------------------------ per call
    def on_request(self, call: Call, next: Next) -> Decision:
        snap = self.snapshot()
        if snap is not self._snap:
            self._build(snap)
        now = call.started_s  # the relay's clock when the call came in
        prev = call.endpoint
        if prev is not None:  # a retry asks again: the previous attempt is over
            now = self.clock()
            self._settle(call, prev, now, _retried_status(call, prev), True)
            call.endpoint = None  # settled: a local reply below must not settle it again
            if prev not in call.tried:
                call.tried = (*call.tried, prev)
        eps: tuple[Endpoint, ...] | None = call.subset
        if eps is None:
            cluster: Cluster = call.cluster
            eps = cluster.healthy
            if not eps:
                why = "no healthy endpoints" if cluster.endpoints else "no endpoints"
                return LocalReply(G.UNAVAILABLE, f"service {cluster.name!r} has {why}")
        elif not eps:
            return LocalReply(G.UNAVAILABLE,
                              f"service {call.cluster.name!r}: no healthy endpoint in the subset")
        c = self._candidates.get(id(eps))
        if c is None or c.eps is not eps:
            c = self._candidates_of(eps, now)
        states = c.states
        if self.upstreams.gated or call.tried:
            if prev is None:
                now = self.clock()
            i = self._pick_among_allowed(c, call, now,
                                         self._services.get(call.route, self._default)[1])
            if i < 0:
                which = "endpoint of the subset" if call.subset is not None else "healthy endpoint"
                return LocalReply(G.UNAVAILABLE, f"service {call.cluster.name!r}: every {which} "
                                  "is ejected by outlier detection")
        else:
            i = self._services.get(call.route, self._default)[1](c, states)
        st = states[i]
        call.endpoint = c.eps[i]
        if call.span is not None:
            self._traced_pick(call, st.address)
        st.in_flight += 1
        gate = st.gate
        if gate is not None:
            gate.admit(call, now)
        return next(call)

    def _traced_pick(self, call: Call, address: str) -> None:
        """The span event of a traced call's pick: the attempt's number (1 = the first; a
        retry's failed attempts are in ``call.retry.attempts`` by now), the endpoint and the
        balancer."""
        n = len(getattr(call.retry, "attempts", ())) + 1
        span_event(call, ENDPOINT, f"attempt {n}: endpoint {address}",
                   {"mesh.attempt": n, "mesh.endpoint": address,
                    "mesh.balancer": self._services.get(call.route, self._default)[0]})

    def _pick_among_allowed(self, c: _Candidates, call: Call, now_s: float,
                            pick: Picker) -> int:
        """The position in ``c.states`` to send the call to: a HALF_OPEN endpoint due a probe
        first, else ``pick`` among the allowed endpoints not yet tried, else among those
        tried; -1 when outlier detection holds every candidate out."""
        tried = {e.address for e in call.tried}
        fresh: list[int] = []
        again: list[int] = []
        for i, st in enumerate(c.states):
            gate = st.gate
            if gate is not None:
                if not gate.admits(now_s):
                    continue
                if st.address not in tried:
                    return i  # HALF_OPEN with a free probe slot
            (again if st.address in tried else fresh).append(i)
        allowed = fresh or again
        if not allowed:
            return -1
        if len(allowed) == len(c.states):
            return pick(c, c.states)
        return allowed[pick(c, [c.states[i] for i in allowed])]

    def on_end(self, call: Call) -> None:
        ep = call.endpoint
        if ep is not None:
            self._settle(call, ep, ended_s(call, self.clock), call.grpc_status, bool(call.tried))

    def _settle(self, call: Call, ep: Endpoint, now_s: float, status: int | None,
                retried: bool) -> None:
        """The attempt on ``ep`` ended with ``status``: release it and feed it back. The
        estimate takes the latency of unary calls only (a stream's length says nothing of
        the endpoint's speed), and of an attempt a retry picked only when sick (its start is
        not known: the call's start is used, which would make a good answer look slow)."""
        hit = self._states.get(id(ep))
        if hit is not None and hit[0] is ep:
            st = hit[1]
        else:  # an endpoint of an older snapshot
            st = self.upstreams.endpoint(ep.address, now_s)
        st.in_flight -= 1
        if status is None:
            sick = False
        else:
            sick = status in self._services.get(call.route, self._default)[2]
            if (sick or not retried) and not call.fast_fail and call.pool is not None \
                    and call.resp_messages <= 1 and call.req_messages <= 1:
                sample = now_s - call.started_s
                ewma = st.ewma_s
                if sick:
                    sample = max(sample, min(2.0 * ewma, PENALTY_CAP_S))
                if sample >= ewma:  # ewma_observe, inlined
                    st.ewma_s = sample
                else:
                    dt = now_s - st.stamp_s
                    w = math.exp(-dt * self._inv_decay) if dt > 0 else 1.0
                    st.ewma_s = ewma * w + sample * (1.0 - w)
                st.stamp_s = now_s
        if (sick or st.watched) and self.on_outcome is not None:
            self.on_outcome(call, st, status, now_s)

    # ------------------------------------------------------------ reporting
    def counters(self) -> dict[str, Any]:
        """``{"balancers": {"services": {service: balancer}, "ewma_decay_s": s, "endpoints":
        {address: {"in_flight", "ewma_ms", "cost_ms"}}}}``: the balancer of each service of
        the snapshot in force (those without a route use the default), peak-EWMA's time
        constant in force (``--ewma-decay-s``) and the live state of each endpoint address."""
        now = self.clock()
        snap = self.snapshot()
        routes = {r.service: r.load_balancer for r in snap.routes}
        services = {c.name: routes.get(c.name, DEFAULT_LOAD_BALANCER) for c in snap.clusters}
        services.update(routes)
        return {"balancers": {
            "services": services,
            "ewma_decay_s": self.decay_s,
            "endpoints": {a: {"in_flight": st.in_flight, "ewma_ms": round(st.ewma_s * 1e3, 3),
                              "cost_ms": round(ewma_cost(st, now, self.decay_s) * 1e3, 3)}
                          for a, st in sorted(self.upstreams.endpoints.items())}}}


_NO_ROUTES = Snapshot("")


class RoundRobin(Balance):
    """Round robin for every service, whatever the snapshot names, on its own ``Upstreams``
    unless given one (a balancer with no configuration, for small stacks and tests)."""

    def __init__(self, upstreams: Upstreams | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_outcome: Outcome | None = None) -> None:
        super().__init__(lambda: _NO_ROUTES, upstreams if upstreams is not None else Upstreams(),
                         clock, on_outcome=on_outcome)
        self._default = ("round_robin", self._pickers["round_robin"], frozenset(SICK_CODES))
