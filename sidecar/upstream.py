"""Per-upstream state the resilience layers share, kept across snapshot swaps.

Not a layer: the composition site (``sidecar.stack``) hands one ``Upstreams`` to the layers
that need it, so they share state without importing each other.

* ``EndpointState``, per endpoint address: calls in flight and the peak-EWMA latency estimate
  (the balancer reads and feeds both), and outlier detection's ``gate`` while the endpoint is
  not CLOSED (the balancer asks it whether the endpoint may take a call, and tells it when it
  sends one a half-open probe). Keyed by address, so a new snapshot with the same endpoint
  keeps its history.
* ``Upstream``, per upstream service: the circuit limits in force and what is in use against
  them. The limits layer sets it on ``call.upstream``; the retry layer reads
  ``retries_in_flight``/``max_retries`` there and takes and releases a retry slot with
  ``take_retry``/``release_retry``.
* ``BreakerView``/``LimitView``: what the sidecar reports of both (``/stats``, StateReport).

Pure bookkeeping: no I/O, no clock of its own (times are passed in).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, Protocol

from mesh_common.snapshot import CircuitLimits

from .http2.pool import Pool

DEFAULT_RTT_S = 0.030
"""The latency a new endpoint is assumed to have until its first answer (Linkerd's)."""

LIMIT_NAMES = ("max_connections", "max_pending", "max_requests", "max_retries")
"""The limits per upstream, by the names of their ``CircuitLimits`` fields."""


class Gate(Protocol):
    """Outlier detection's side of an endpoint that is not CLOSED, as the balancer sees it."""

    def admits(self, now_s: float) -> bool:
        """True when the endpoint may take a call now: only while HALF_OPEN with a free probe
        slot (OPEN: never)."""
        ...

    def admit(self, call: Any, now_s: float) -> None:
        """The balancer sent ``call`` to the endpoint: it takes a probe slot."""
        ...


class EndpointState:
    """One endpoint address, as the balancer and outlier detection share it.

    ``in_flight``: attempts picked and not yet ended; ``ewma_s``/``stamp_s``: the peak-EWMA
    latency estimate (seconds) and when it was last fed (the balancer's clock); ``gate``: None
    while the endpoint is CLOSED (it takes any call), else its breaker; ``outlier``: outlier
    detection's own record of the endpoint (opaque here); ``watched``: outlier detection wants
    every outcome of the endpoint, not only its sick answers (it has errors in a row, a
    success-rate window with failures in it, or is not CLOSED), so the balancer need not
    report a healthy endpoint's good answers one by one."""

    __slots__ = ("address", "in_flight", "ewma_s", "stamp_s", "gate", "outlier", "watched")

    def __init__(self, address: str, now_s: float) -> None:
        self.address = address
        self.in_flight = 0
        self.ewma_s = DEFAULT_RTT_S
        self.stamp_s = now_s
        self.gate: Gate | None = None
        self.outlier: Any = None
        self.watched = False

    def forget_latency(self, now_s: float) -> None:
        """Start the latency estimate over, as for a new endpoint: for one that comes back
        (healthy again, or its breaker CLOSED again), whose old estimate holds the failure
        penalties of its bad time and would keep peak-EWMA away from it for a long while."""
        self.ewma_s = DEFAULT_RTT_S
        self.stamp_s = now_s

    def __repr__(self) -> str:
        return (f"EndpointState({self.address}, in_flight={self.in_flight}, "
                f"ewma_ms={self.ewma_s * 1e3:.2f}, gated={self.gate is not None})")


class Upstream:
    """One upstream service's circuit limits (``limits``, from the snapshot in force) and
    their use by this sidecar: ``requests`` in flight, ``retries_in_flight``, the endpoint
    ``pools`` its calls went to (for the connections and calls waiting for one) and
    ``fast_fails`` by limit name since start."""

    __slots__ = ("service", "limits", "requests", "retries_in_flight", "pools", "fast_fails")

    def __init__(self, service: str, limits: CircuitLimits) -> None:
        self.service = service
        self.limits = limits
        self.requests = 0
        self.retries_in_flight = 0
        self.pools: dict[str, Pool] = {}
        self.fast_fails: dict[str, int] = dict.fromkeys(LIMIT_NAMES, 0)

    @property
    def max_retries(self) -> int:
        """Retries this sidecar may have in flight to the service at once."""
        return self.limits.max_retries

    def take_retry(self) -> bool:
        """Take a retry slot: True when one was free (give it back with ``release_retry``
        once the retry is over); False at ``max_retries``, counted as a ``max_retries``
        fast-fail (the retry is not made)."""
        if self.retries_in_flight >= self.limits.max_retries:
            self.fast_fails["max_retries"] += 1
            return False
        self.retries_in_flight += 1
        return True

    def release_retry(self) -> None:
        """Give back a slot ``take_retry`` gave (once per slot taken)."""
        if self.retries_in_flight > 0:
            self.retries_in_flight -= 1

    def fast_fail_message(self, limit: str) -> str:
        """``fast-fail: <limit> limit of <n> reached for <service>``."""
        return f"fast-fail: {limit} limit of {getattr(self.limits, limit)} reached for {self.service}"

    def _live_pools(self) -> list[Pool]:
        for key in [k for k, p in self.pools.items() if p.closed]:  # retired by a snapshot
            del self.pools[key]
        return list(self.pools.values())

    def pending(self) -> int:
        """Calls waiting for a connection in the service's endpoint pools."""
        return sum(len(p.waiting) for p in self._live_pools())

    def connections(self) -> int:
        """Connections open or opening to the service's endpoints."""
        return sum(len(p.conns) + p.connecting for p in self._live_pools())

    def in_use(self, limit: str) -> int:
        """What is in use now against ``limit`` (one of ``LIMIT_NAMES``)."""
        if limit == "max_requests":
            return self.requests
        if limit == "max_retries":
            return self.retries_in_flight
        if limit == "max_pending":
            return self.pending()
        return self.connections()


class Upstreams:
    """The registry: ``EndpointState`` by address and ``Upstream`` by service, for one
    sidecar's outbound side. ``gated`` counts endpoints with a gate (not CLOSED): while it is
    0 the balancer need not look at gates at all."""

    def __init__(self) -> None:
        self.endpoints: dict[str, EndpointState] = {}
        self.services: dict[str, Upstream] = {}
        self.gated = 0

    def endpoint(self, address: str, now_s: float) -> EndpointState:
        """The state of ``address``, made (with the default estimate) on first use."""
        st = self.endpoints.get(address)
        if st is None:
            st = self.endpoints[address] = EndpointState(address, now_s)
        return st

    def service(self, name: str, limits: CircuitLimits) -> Upstream:
        """The ``Upstream`` of ``name`` with ``limits`` in force from now on (counters kept)."""
        up = self.services.get(name)
        if up is None:
            up = self.services[name] = Upstream(name, limits)
        else:
            up.limits = limits
        return up

    def set_gate(self, st: EndpointState, gate: Gate | None) -> None:
        """Outlier detection opened (``gate``) or closed (None) ``st``'s breaker."""
        if (st.gate is None) != (gate is None):
            self.gated += 1 if gate is not None else -1
        st.gate = gate

    def retain(self, addresses: Iterable[str]) -> None:
        """Forget the endpoints not in ``addresses`` (they left the snapshot) that have nothing
        in flight; their breakers go with them."""
        keep = set(addresses)
        for address in [a for a, st in self.endpoints.items()
                        if a not in keep and st.in_flight <= 0]:
            st = self.endpoints.pop(address)
            self.set_gate(st, None)


Outcome = Callable[[Any, EndpointState, int | None, float], None]
"""The balancer's feedback for one ended attempt: ``(call, endpoint state, grpc status or
None, now_s)``; outlier detection consumes it. The balancer reports every sick answer (a
status in the service's outlier ``error_codes``) and, for an endpoint ``watched``, every
outcome."""


class BreakerView(NamedTuple):
    """One endpoint's outlier detection state, as reported."""

    state: str
    """CLOSED, OPEN or HALF_OPEN."""
    consecutive_errors: int
    ejections: int
    """Times ejected since start."""
    half_open_in_s: float
    """OPEN: seconds until it goes HALF_OPEN; else 0."""
    last_transition_unix: float
    """When the state last changed (Unix seconds); 0 if it never did."""


class LimitView(NamedTuple):
    """One circuit limit of one upstream service, as reported."""

    upstream: str
    limit: str
    """One of ``LIMIT_NAMES``."""
    in_use: int
    max: int
    fast_fails: int
    """Calls (or retries) refused by this limit since start."""


class ResilienceReport(NamedTuple):
    """The live state the sidecar reports: breakers by endpoint address, and limits."""

    breakers: Mapping[str, BreakerView]
    limits: tuple[LimitView, ...]
