"""The control plane's Prometheus metrics (Prometheus naming, base units), in a registry of
its own that the admin HTTP port serves (``GET /metrics``).

Counted as they happen (``ControlPlaneMetrics`` methods, called by discovery and the RPCs):

* ``mesh_cp_snapshot_pushes_total``: snapshots handed to a sidecar's stream;
* ``mesh_cp_push_ack_seconds``: histogram, seconds from sending a version to a sidecar to
  its ACK of that version (one observation per version sent and ACKed);
* ``mesh_cp_nacks_total``: snapshots the sidecars refused;
* ``mesh_cp_certificates_issued_total{kind="join"|"renew"}``;
* ``mesh_cp_config_applies_total``, ``mesh_cp_config_apply_errors_total``: ApplyConfig calls
  (dry runs left out) that stored (or found unchanged) their documents, and those that
  failed (invalid documents, a store or publish failure);
* ``mesh_cp_state_reports_total``: StateReports received.

Read from the live state at scrape time (``LiveState``, from the callable given to the
constructor or ``bind``), never updated per event:

* ``mesh_cp_connected_sidecars{service}``: sidecars with an open discovery stream;
* ``mesh_cp_registered_instances{service}``: instances in the registry (connected or in their
  grace period);
* ``mesh_cp_sidecars{state}``: sidecars (sessions of registered instances) by sync state
  (SYNCED, SYNCING, NACKED, STALE), and ``mesh_cp_stale_sidecars`` = the STALE ones;
* ``mesh_cp_snapshot_version``: the latest published snapshot's version (0 = none yet);
* ``mesh_cp_snapshot_publishes_total``: snapshots published since the process started.

Counting is a dict lookup and an add: no I/O, nothing built per event.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("mesh.control_plane.metrics")

SYNC_STATES = ("SYNCED", "SYNCING", "NACKED", "STALE")
CERT_KINDS = ("join", "renew")
PUSH_ACK_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                      10.0, 30.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The content type of ``exposition()``'s text (Prometheus text format 0.0.4)."""


@dataclass(frozen=True)
class LiveState:
    """What the gauges read at scrape time: counts by service and by sync state, the latest
    snapshot version (0 = none) and how many snapshots were published."""

    connected_by_service: Mapping[str, int] = field(default_factory=dict)
    instances_by_service: Mapping[str, int] = field(default_factory=dict)
    sidecars_by_state: Mapping[str, int] = field(default_factory=dict)
    snapshot_version: int = 0
    snapshot_publishes: int = 0


class _Session(Protocol):
    @property
    def connected(self) -> bool: ...

    @property
    def instance(self) -> _Instance: ...

    def state(self, now: float, stale_after_s: float) -> str: ...


class _Instance(Protocol):
    @property
    def service(self) -> str: ...


def live_state_of(sessions: Iterable[_Session], instances: Iterable[_Instance],
                  latest_version: str, publishes: int, now: float,
                  stale_after_s: float) -> LiveState:
    """``LiveState`` from the discovery sessions (``SessionHub.sessions()``), the registry's
    instances, the latest published version ("" = none; a non-decimal one counts as 0) and
    the publish count, with sync states evaluated at ``now`` (unix s). Pure."""
    connected: Tally[str] = Tally()
    states: Tally[str] = Tally()
    for s in sessions:
        if s.connected:
            connected[s.instance.service] += 1
        states[s.state(now, stale_after_s)] += 1
    registered: Tally[str] = Tally(i.service for i in instances)
    version = int(latest_version) if latest_version.isdigit() else 0
    return LiveState(dict(connected), dict(registered), dict(states), version, publishes)


class _LiveCollector:
    """A prometheus_client collector reading ``LiveState`` at each scrape; a failing read is
    logged and yields no live families (the counters still answer)."""

    def __init__(self, owner: ControlPlaneMetrics) -> None:
        self._owner = owner

    def describe(self) -> Iterator[Metric]:
        return iter(self._families(LiveState()))

    def collect(self) -> Iterator[Metric]:
        live = self._owner.live
        if live is None:
            return iter(())
        try:
            state = live()
        except Exception:
            log.exception("could not read the live state for /metrics")
            return iter(())
        return iter(self._families(state))

    @staticmethod
    def _families(st: LiveState) -> list[Metric]:
        connected = GaugeMetricFamily("mesh_cp_connected_sidecars",
                                      "Sidecars with an open discovery stream, by service.",
                                      labels=["service"])
        for svc, n in sorted(st.connected_by_service.items()):
            connected.add_metric([svc], n)
        registered = GaugeMetricFamily(
            "mesh_cp_registered_instances",
            "Instances in the registry (connected or within their grace period), by service.",
            labels=["service"])
        for svc, n in sorted(st.instances_by_service.items()):
            registered.add_metric([svc], n)
        by_state = GaugeMetricFamily("mesh_cp_sidecars",
                                     "Sidecars of registered instances by sync state.",
                                     labels=["state"])
        for name in (*SYNC_STATES, *sorted(set(st.sidecars_by_state) - set(SYNC_STATES))):
            by_state.add_metric([name], st.sidecars_by_state.get(name, 0))
        stale = GaugeMetricFamily(
            "mesh_cp_stale_sidecars",
            "Sidecars whose stream is down or that have not ACKed the version sent in time.",
            value=st.sidecars_by_state.get("STALE", 0))
        version = GaugeMetricFamily("mesh_cp_snapshot_version",
                                    "Version of the latest published snapshot (0 = none).",
                                    value=st.snapshot_version)
        publishes = CounterMetricFamily("mesh_cp_snapshot_publishes",
                                        "Snapshots published since the process started.",
                                        value=st.snapshot_publishes)
        return [connected, registered, by_state, stale, version, publishes]


class ControlPlaneMetrics:
    """The control plane's metrics in their own ``registry``. ``live`` (or ``bind(live)``
    later) is called at every scrape for the gauges of the live state."""

    def __init__(self, live: Callable[[], LiveState] | None = None) -> None:
        self.live = live
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self._pushes = Counter("mesh_cp_snapshot_pushes",
                               "Snapshots handed to sidecars' discovery streams.", registry=r)
        self._push_ack = Histogram("mesh_cp_push_ack_seconds",
                                   "Seconds from sending a snapshot version to a sidecar to its "
                                   "ACK of that version.", buckets=PUSH_ACK_BUCKETS_S,
                                   registry=r)
        self._nacks = Counter("mesh_cp_nacks", "Snapshots the sidecars refused (NACK).",
                              registry=r)
        self._certs = Counter("mesh_cp_certificates_issued",
                              "Workload certificates issued, by kind (join, renew).",
                              labelnames=["kind"], registry=r)
        self._certs_by_kind = {k: self._certs.labels(kind=k) for k in CERT_KINDS}
        self._applies = Counter("mesh_cp_config_applies",
                                "ApplyConfig calls that succeeded (not dry runs).",
                                registry=r)
        self._apply_errors = Counter("mesh_cp_config_apply_errors",
                                     "ApplyConfig calls that failed (not dry runs): invalid "
                                     "documents, a store or publish failure.", registry=r)
        self._reports = Counter("mesh_cp_state_reports", "StateReports received from sidecars.",
                                registry=r)
        r.register(_LiveCollector(self))

    def bind(self, live: Callable[[], LiveState]) -> None:
        """Read the live gauges from ``live`` from now on."""
        self.live = live

    # ---------------------------------------------------------------- events
    def snapshot_pushed(self) -> None:
        """A snapshot was handed to one sidecar's stream."""
        self._pushes.inc()

    def push_acked(self, seconds: float) -> None:
        """A sidecar ACKed the version sent to it ``seconds`` after it was sent (a negative
        time, from a clock step, counts as 0)."""
        self._push_ack.observe(max(0.0, seconds))

    def push_nacked(self) -> None:
        """A sidecar refused a snapshot."""
        self._nacks.inc()

    def certificate_issued(self, kind: str) -> None:
        """A workload certificate was issued; ``kind`` is "join" or "renew" (ValueError else)."""
        child = self._certs_by_kind.get(kind)
        if child is None:
            raise ValueError(f"kind must be one of {CERT_KINDS}, not {kind!r}")
        child.inc()

    def config_applied(self, ok: bool) -> None:
        """An ApplyConfig call that was not a dry run ended: ``ok`` True when it succeeded."""
        (self._applies if ok else self._apply_errors).inc()

    def report_received(self) -> None:
        """A StateReport arrived."""
        self._reports.inc()

    # ---------------------------------------------------------------- scrape
    def exposition(self) -> bytes:
        """Every metric in Prometheus text format (``CONTENT_TYPE``)."""
        return _generate_latest(self.registry)
