"""``kill-replica``: SIGKILL one replica of a saga participant (payment or inventory, chosen
by the seed) together with its sidecar while the load runs, then start both again.

What must hold:

* calls in flight on the killed replica are retried by the callers' sidecars onto the other
  replica (``Admin.Tap`` shows the call retried "after connection_lost from" the dead
  endpoint and answered by the other one; the callers' ``mesh_retries_total`` counts it);
  to be sure calls are in flight when the kill lands, both replicas first answer
  ``IN_FLIGHT_LATENCY_MS`` late (their sickness control; equally slow, so the callers keep
  balancing over both) and the kill waits until the victim's sidecar reports an inbound call
  in flight (``mesh_active_calls``);
* nothing fails because of the kill: no call to the service fails at its callers (every
  outcome their sidecars count in ``mesh_requests_total`` is OK or a business answer: the
  mesh absorbed the kill) and no order is cancelled for an infrastructure reason (the saga
  never gave a step up). Both bounds are zero. The load generator's own failed calls are
  bounded by ``LOAD_ERROR_FRACTION`` of the orders sent in the window, not zero, because the
  killed replica is not on its call path (load → order) at all: order answers PENDING before
  the load generator's deadline whatever its participants do, so what it sees there is the
  host's noise (a deadline missed on a starved shared machine), not the kill; one failed call
  in a hundred orders would already be a visible regression;
* the registry drops the instance once its stream has been gone for the control plane's
  grace period (``settings.grace_period_s`` in state.json), not before, and the callers'
  snapshots lose its endpoint;
* restarted (the app first, on its address; then its sidecar, which gets new ports), it
  rejoins: registered, connected and SYNCED, a healthy endpoint (its new inbound address) in
  every caller's snapshot, and it takes traffic again.

Everything is read as a user would: ``Admin.ListSidecars``/``GetSidecarConfig``/``Tap``,
the sidecars' admin ``/metrics`` and ``/stats``, the load generator's ``/stats``. The
helpers here (metrics sums, callers, held endpoints, load points) are shared with
``orchestrator-crash``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chaos.mesh import ChaosError, Mesh, wait_for
from chaos.scenarios import Options
from chaos.timeline import Timeline
from protos.mesh.v1 import control_pb2 as pb

NAME = "kill-replica"
EXPECTATION = ("SIGKILL one replica of payment or inventory and its sidecar under load: the "
               "calls in flight on it are retried onto the other replica with no failed order; "
               "the registry drops the instance after its grace period; restarted, it rejoins "
               "(SYNCED, a healthy endpoint in its callers' snapshots) and takes traffic again")

PARTICIPANTS = ("payment", "inventory")
IN_FLIGHT_LATENCY_MS = 400
"""Added to both replicas before the kill, so calls are in flight on the victim when it dies
(balanced evenly: both are equally slow)."""
SETTLE_S = 0.1
"""After asking for the sickness, calls seen in flight from this long on are slowed ones (an
unslowed call takes a few ms), so the kill lands while they are in flight."""
IN_FLIGHT_WAIT_S = 10.0
"""How long to wait for the victim's sidecar to report an inbound call in flight."""
TAP_READY_S = 10.0
"""How long to wait for the tap to show calls from every caller before the kill."""
WHOLE_BOUND_S = 30.0
"""Every sidecar SYNCED before the scenario starts, within this."""
DROP_SLACK_S = 10.0
"""The registry drops the instance within its grace period plus this (pruning runs every
quarter of the grace period; the host is shared)."""
GRACE_TOLERANCE_S = 0.25
"""A drop seen this much before the grace period has passed still counts as on time (the
stream's end is noticed a moment after the kill)."""
SNAPSHOT_BOUND_S = 15.0
"""The callers' snapshots follow the registry within this."""
REJOIN_BOUND_S = 30.0
TRAFFIC_BOUND_S = 60.0
"""The restarted replica takes calls again within this. Not at once: its new endpoint starts
with peak-EWMA's default estimate, which must decay below the other replica's (over the
sidecars' ``--ewma-decay-s``: 10 s by default, which this bound allows for; 2 s in the chaos
tests' demo) before the callers' balancers prefer it."""
INFRA_CANCEL_MARK = "did not complete within"
"""An order cancelled because a step kept failing (not for a business reason) has a reason
like ``charge did not complete within 10 s (UNAVAILABLE: ...)``."""
LOAD_ERROR_FRACTION = 0.01
"""Failed calls the load generator may see in the window, per order sent (see the module
doc: the kill is not on its call path)."""
BUSINESS_CODES = frozenset({"OK", "FAILED_PRECONDITION", "ABORTED", "NOT_FOUND",
                            "INVALID_ARGUMENT", "ALREADY_EXISTS", "OUT_OF_RANGE"})
"""Outcomes of a participant call that are answers, not failures (a refusal is the saga's
business: insufficient funds, out of stock, a late original refused)."""
IN_FLIGHT_REASONS = ("connection_lost", "UNAVAILABLE", "goaway", "refused_stream")
"""Retry reasons of a call that was already on its way to the endpoint when it died (as
opposed to ``connect_failure``: a later call that found it gone)."""


# ---------------------------------------------------------------------- reading the mesh
def metric_sum(samples: list[tuple[str, dict[str, str], float]], name: str,
               **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for n, lab, v in samples
               if n == name and all(lab.get(k) == want for k, want in labels.items()))


def inbound_calls(mesh: Mesh, instance: str, grpc_code: str = "") -> float:
    """Calls sidecar ``instance`` carried to its app (``grpc_code``: only those)."""
    labels = {"direction": "inbound", **({"grpc_code": grpc_code} if grpc_code else {})}
    return metric_sum(mesh.sidecar_metrics(instance), "mesh_requests_total", **labels)


def active_inbound(mesh: Mesh, instance: str) -> float:
    """Inbound calls in flight on sidecar ``instance`` right now."""
    return metric_sum(mesh.sidecar_metrics(instance), "mesh_active_calls",
                      direction="inbound")


def retries_by_reason(mesh: Mesh, callers: list[str], service: str) -> dict[str, float]:
    """reason -> retries to ``service`` the ``callers``' sidecars counted
    (``mesh_retries_total``), summed over the callers that answer."""
    out: dict[str, float] = {}
    for inst in callers:
        try:
            samples = mesh.sidecar_metrics(inst)
        except OSError:
            continue
        for name, labels, value in samples:
            if name == "mesh_retries_total" and labels.get("destination") == service:
                out[labels.get("reason", "")] = out.get(labels.get("reason", ""), 0.0) + value
    return out


def failed_calls(mesh: Mesh, callers: list[str], service: str) -> dict[str, float]:
    """grpc code -> calls to ``service`` that ended with it at the ``callers``' sidecars
    (outbound ``mesh_requests_total``), for the codes that are failures, not answers."""
    out: dict[str, float] = {}
    for inst in callers:
        try:
            samples = mesh.sidecar_metrics(inst)
        except OSError:
            continue
        for name, labels, value in samples:
            code = labels.get("grpc_code", "")
            if (name == "mesh_requests_total" and labels.get("direction") == "outbound"
                    and labels.get("destination") == service and code not in BUSINESS_CODES):
                out[code] = out.get(code, 0.0) + value
    return out


def outbound_calls(mesh: Mesh, callers: list[str], service: str) -> dict[str, float]:
    """caller -> calls to ``service`` its sidecar has carried (outbound, any outcome)."""
    out: dict[str, float] = {}
    for inst in callers:
        try:
            out[inst] = metric_sum(mesh.sidecar_metrics(inst), "mesh_requests_total",
                                   direction="outbound", destination=service)
        except OSError:
            continue
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    """The counts of ``after`` that grew since ``before`` (key -> growth)."""
    return {k: int(v - before.get(k, 0)) for k, v in after.items() if v > before.get(k, 0)}


def callers_of(mesh: Mesh, service: str) -> list[str]:
    """The sidecars (of other services) that sent calls to ``service``."""
    out = []
    for rec in mesh.state.find("sidecar"):
        if rec.service == service or not mesh.alive(rec):
            continue
        try:
            sent = metric_sum(mesh.sidecar_metrics(rec.instance), "mesh_requests_total",
                              direction="outbound", destination=service)
        except OSError:
            continue
        if sent > 0:
            out.append(rec.instance)
    return sorted(out)


def held_endpoints(mesh: Mesh, instance: str, service: str) -> dict[str, tuple[str, bool]]:
    """endpoint instance -> (address, healthy) in ``service``'s cluster of the snapshot that
    sidecar ``instance`` holds (asked through the control plane)."""
    snap = mesh.admin.held_snapshot(instance)
    for cluster in snap.get("clusters", []):
        if cluster.get("name") == service:
            return {e["instance"]: (e.get("address", ""), bool(e.get("healthy", True)))
                    for e in cluster.get("endpoints", [])}
    return {}


def balancer_costs(mesh: Mesh, callers: list[str], addresses: dict[str, str]) -> str:
    """What the ``callers``' balancers think of the endpoints (``addresses``: instance ->
    address): their peak-EWMA cost in ms (admin ``/stats``), one short line."""
    parts = []
    for c in callers:
        try:
            eps = mesh.sidecar_stats(c)["outbound"]["balancers"]["endpoints"]
        except (OSError, KeyError, TypeError):
            continue
        costs = ", ".join(f"{inst} {eps[addr]['cost_ms']:.0f} ms"
                          for inst, addr in addresses.items() if addr in eps)
        parts.append(f"{c}: {costs or 'none'}")
    return "; ".join(parts) or "not available"


def registry_entry(mesh: Mesh, instance: str) -> pb.SidecarStatus | None:
    return next((s for s in mesh.sidecars() if s.instance == instance), None)


@dataclass(frozen=True)
class LoadPoint:
    """The load generator's counts at one moment."""

    sent: int
    confirmed: int
    errors: dict[str, int]
    infra_cancelled: int

    @classmethod
    def read(cls, mesh: Mesh) -> LoadPoint:
        s = mesh.load_stats()
        infra = sum(int(n) for kind, n in (s.get("cancel_reasons") or {}).items()
                    if INFRA_CANCEL_MARK in kind)
        return cls(int(s.get("sent", 0)), int(s.get("confirmed", 0)),
                   {str(k): int(v) for k, v in (s.get("errors") or {}).items()}, infra)

    def new_errors(self, before: LoadPoint) -> dict[str, int]:
        return {k: v - before.errors.get(k, 0) for k, v in self.errors.items()
                if v > before.errors.get(k, 0)}


def ensure_load(mesh: Mesh, tl: Timeline) -> None:
    """The scenario runs under load: resume the load generator if it is paused."""
    if mesh.load_stats().get("paused"):
        tl.action("load generator was paused: resumed")
        mesh.resume_load()


def ensure_whole(mesh: Mesh) -> None:
    """Every sidecar of state.json SYNCED, else ChaosError (nothing to break yet)."""
    if not wait_for(mesh.all_synced, WHOLE_BOUND_S):
        raise ChaosError(f"not every sidecar is SYNCED after {WHOLE_BOUND_S:g}s; not "
                         f"breaking an already broken mesh")


def _poll(predicate: Callable[[], Any], timeout_s: float, poll_s: float = 0.1) -> float | None:
    """Seconds until ``predicate`` held, or None if it did not within ``timeout_s``."""
    t0 = time.monotonic()
    return time.monotonic() - t0 if wait_for(predicate, timeout_s, poll_s) else None


# ---------------------------------------------------------------------- the scenario
def _kill(mesh: Mesh, tl: Timeline, victim: str, other: str,
          service: str) -> tuple[float, float, int]:
    """Make both replicas a little slow, wait for a call in flight on ``victim``, SIGKILL
    its sidecar and its app; heal ``other``. Returns (unix and monotonic time of the kill,
    calls in flight on the victim just before)."""
    tl.action(f"{service}: both replicas answer {IN_FLIGHT_LATENCY_MS} ms late (sickness), "
              f"so calls are in flight on {victim} when it dies")
    for inst in (victim, other):
        mesh.sicken(inst, latency_ms=IN_FLIGHT_LATENCY_MS)
    sick_from = time.monotonic()
    seen = [0.0]

    def busy() -> bool:
        # A call seen in flight within a few ms of the sickness may be one begun before it,
        # about to end at full speed; from SETTLE_S on, any call in flight is a slowed one and
        # still is when the kill lands.
        seen[0] = active_inbound(mesh, victim)
        return seen[0] >= 1 and time.monotonic() - sick_from >= SETTLE_S
    if not wait_for(busy, IN_FLIGHT_WAIT_S, 0.02):
        tl.observe(f"{victim}: no call in flight within {IN_FLIGHT_WAIT_S:g}s; killing anyway")
    in_flight = int(seen[0])
    side, app = mesh.sidecar(victim), mesh.app(victim)
    killed_at, killed_mono = time.time(), time.monotonic()
    mesh.kill(side)
    mesh.kill(app)
    tl.action(f"{victim}: SIGKILL its sidecar (pid {side.pid}, inbound {side.inbound}) and "
              f"its app (pid {app.pid}) with {in_flight} call(s) in flight on it")
    if not (mesh.wait_gone(side) and mesh.wait_gone(app)):
        raise ChaosError(f"{victim}: still running after SIGKILL")
    tl.observe(f"{victim}: its sidecar and app are gone")
    mesh.heal(other)
    tl.action(f"{other}: healed (answers at full speed again)")
    return killed_at, killed_mono, in_flight


def _watch_registry(mesh: Mesh, tl: Timeline, victim: str, grace: float,
                    killed_mono: float) -> float | None:
    """Follow the victim's registry entry until it is gone; seconds from the kill to its
    removal (None if it stayed past the grace period plus DROP_SLACK_S)."""
    seen_down = False

    def gone() -> bool:
        nonlocal seen_down
        entry = registry_entry(mesh, victim)
        if entry is None:
            return True
        if not entry.connected and not seen_down:
            seen_down = True
            tl.observe(f"registry: {victim} {entry.state or 'STALE'}, stream down "
                       f"({time.monotonic() - killed_mono:.1f}s after the kill); kept for "
                       f"the {grace:g}s grace period")
        return False
    if not wait_for(gone, grace + DROP_SLACK_S, 0.1):
        return None
    return time.monotonic() - killed_mono


def run(mesh: Mesh, tl: Timeline, opts: Options) -> None:
    """Kill a participant replica and its sidecar under load, restart them (see the module
    doc)."""
    grace = float(mesh.state.settings.get("grace_period_s", 10.0))
    tl.measure("grace_period_s", grace)
    service = opts.rng.choice(PARTICIPANTS)
    replicas = mesh.instances(service)
    if len(replicas) < 2:
        raise ChaosError(f"{service} has {len(replicas)} replica(s); the scenario needs two")
    victim = opts.rng.choice(replicas)
    other = next(i for i in replicas if i != victim)
    tl.measure("service", service)
    tl.measure("victim", victim)
    ensure_whole(mesh)
    ensure_load(mesh, tl)

    other_inbound = mesh.sidecar(other).inbound
    victim_inbound = mesh.sidecar(victim).inbound
    warm = wait_for(lambda: inbound_calls(mesh, victim) > 0 and callers_of(mesh, service),
                    TRAFFIC_BOUND_S)
    callers = callers_of(mesh, service)
    if not warm or not callers:
        raise ChaosError(f"no traffic reaches {victim} before the kill")
    sent_before = outbound_calls(mesh, callers, service)
    time.sleep(opts.pick(1.0, 3.0))   # a baseline of load
    sent_now = outbound_calls(mesh, callers, service)
    active = [c for c in callers if sent_now.get(c, 0) > sent_before.get(c, 0)] or callers
    tl.observe(f"{service}: {victim} ({victim_inbound}) and {other} ({other_inbound}) both "
               f"take calls; {', '.join(active)} calling it now")
    before = LoadPoint.read(mesh)
    retries_before = retries_by_reason(mesh, callers, service)
    failed_before = failed_calls(mesh, callers, service)

    restarted = False
    try:
        with mesh.tap(service) as tap:
            # The tap is live once every caller calling now has reported a call through it.
            def tapped() -> set[str]:
                return {e.instance for e in tap.events if e.direction == "outbound"}
            if not wait_for(lambda: tapped() >= set(active), TAP_READY_S):
                tl.observe(f"tap on {service}: calls seen from {sorted(tapped()) or 'none'} "
                           f"only after {TAP_READY_S:g}s ({tap.error or 'no error'})")
            killed_at, killed_mono, in_flight = _kill(mesh, tl, victim, other, service)
            tl.measure("in_flight_at_kill", in_flight)
            dropped_after = _watch_registry(mesh, tl, victim, grace, killed_mono)
            time.sleep(0.5)   # the tap's last batches (every 100 ms)
            events = tap.since(killed_at - 0.5)
            tap_error = tap.error

        # Retries, as the callers' sidecars saw them (tap) and counted them (/metrics).
        retried = [e for e in events
                   if e.direction == "outbound" and e.destination == service
                   and f"from {victim_inbound}" in e.reason and "retry" in e.reason]
        onto_other = [e for e in retried
                      if e.status in BUSINESS_CODES and e.endpoint == other_inbound]
        in_flight_retried = [e for e in onto_other
                             if any(f"after {r} from {victim_inbound}" in e.reason
                                    for r in IN_FLIGHT_REASONS)]
        for e in (in_flight_retried or retried)[:3]:
            tl.observe(f"tap: {e.instance} {e.method} {e.status} after {e.attempts} "
                       f"attempt(s): {e.reason}")
        tl.measure("tap_events", len(events))
        tl.measure("retried_calls_seen", len(retried))
        tl.measure("in_flight_calls_retried_onto_other", len(in_flight_retried))
        tl.expect("calls in flight on the killed replica were retried onto the other",
                  bool(in_flight_retried),
                  f"tap: {len(in_flight_retried)} call(s) in flight on {victim_inbound} "
                  f"retried and answered by {other_inbound}; {len(onto_other)} retried "
                  f"from it in all" + (f" (tap: {tap_error})" if tap_error else ""))
        retries_after = retries_by_reason(mesh, callers, service)
        new_retries = delta(retries_after, retries_before)
        tl.measure("retries_by_reason", new_retries)
        tl.expect("the callers' sidecars counted the retries (mesh_retries_total)",
                  any(new_retries.get(r, 0) > 0 for r in IN_FLIGHT_REASONS),
                  f"{service} retries since the kill: {new_retries or 'none'}")

        # The registry and the callers' snapshots.
        tl.measure("dropped_after_s", round(dropped_after, 2) if dropped_after else None)
        if dropped_after is not None:
            tl.observe(f"registry: {victim} removed {dropped_after:.1f}s after the kill")
        tl.expect("the registry dropped the instance after its grace period",
                  dropped_after is not None
                  and grace - GRACE_TOLERANCE_S <= dropped_after <= grace + DROP_SLACK_S,
                  f"{victim} removed {dropped_after:.1f}s after the kill (grace period "
                  f"{grace:g}s)" if dropped_after is not None else
                  f"still listed {grace + DROP_SLACK_S:g}s after the kill")
        took = _poll(lambda: all(victim not in held_endpoints(mesh, c, service)
                                 for c in callers), SNAPSHOT_BOUND_S)
        tl.expect("the callers' snapshots dropped the killed endpoint", took is not None,
                  f"{victim} gone from {', '.join(callers)} within {took:.1f}s" if took is not None
                  else f"still held after {SNAPSHOT_BOUND_S:g}s")
        other_calls = inbound_calls(mesh, other)
        time.sleep(opts.pick(1.0, 10.0))   # the service on one replica, under load
        tl.observe(f"{other} alone carried {int(inbound_calls(mesh, other) - other_calls)} "
                   f"call(s) in the last {opts.pick(1.0, 10.0):g}s")

        # Restart: the app first (same address), then its sidecar (new ports).
        new_app = mesh.restart(mesh.app(victim))
        tl.action(f"{victim}: app started again (pid {new_app.pid}, {new_app.address})")
        new_side = mesh.restart(mesh.sidecar(victim))
        tl.action(f"{victim}: sidecar started again (pid {new_side.pid}, inbound "
                  f"{new_side.inbound})")
        restarted = True
        restart_mono = time.monotonic()

        def rejoined() -> bool:
            e = registry_entry(mesh, victim)
            return e is not None and e.connected and e.state == "SYNCED"
        took = _poll(rejoined, REJOIN_BOUND_S)
        tl.expect("the restarted replica rejoined: registered and SYNCED", took is not None,
                  f"{victim} SYNCED {took:.1f}s after its sidecar started" if took is not None else
                  f"not SYNCED after {REJOIN_BOUND_S:g}s")
        took = _poll(lambda: all(held_endpoints(mesh, c, service).get(victim)
                                 == (new_side.inbound, True) for c in callers), REJOIN_BOUND_S)
        tl.expect("the restarted replica is a healthy endpoint in every caller's snapshot",
                  took is not None,
                  f"{new_side.inbound} healthy in {', '.join(callers)} within "
                  f"{time.monotonic() - restart_mono:.1f}s of the restart" if took is not None
                  else f"not held healthy after {REJOIN_BOUND_S:g}s")
        tl.observe("peak-EWMA cost at the callers: " + balancer_costs(
            mesh, callers, {victim: new_side.inbound, other: other_inbound}))
        took = _poll(lambda: inbound_calls(mesh, victim, "OK") > 0, TRAFFIC_BOUND_S)
        tl.measure("traffic_back_after_s",
                   round(time.monotonic() - restart_mono, 2) if took is not None else None)
        if took is not None:
            time.sleep(opts.pick(1.0, 10.0))
        served = int(inbound_calls(mesh, victim, "OK"))
        tl.measure("calls_served_after_rejoin", served)
        tl.expect("the restarted replica takes traffic again", took is not None and served > 0,
                  f"{victim}: {served} call(s) answered OK through its new sidecar")
    finally:
        _heal_all(mesh, tl, victim, other, restarted)

    # Nothing failed because of the kill: at the callers, in the sagas, at the load.
    failed = delta(failed_calls(mesh, callers, service), failed_before)
    after = LoadPoint.read(mesh)
    new_errors = after.new_errors(before)
    load_errors = sum(new_errors.values())
    infra = after.infra_cancelled - before.infra_cancelled
    sent = after.sent - before.sent
    allowed = int(LOAD_ERROR_FRACTION * sent)
    tl.measure("failed_calls_at_callers", failed)
    tl.measure("load_sent", sent)
    tl.measure("load_confirmed", after.confirmed - before.confirmed)
    tl.measure("load_errors", load_errors)
    tl.measure("load_errors_allowed", allowed)
    tl.measure("infra_cancelled", infra)
    tl.expect("no call to the service failed at its callers", not failed,
              f"{service} calls failed at {', '.join(callers)} since the kill: "
              f"{failed or 'none'}")
    tl.expect("no order failed", infra == 0 and load_errors <= allowed,
              f"{sent} orders sent, {after.confirmed - before.confirmed} confirmed; "
              f"infrastructure cancellations {infra}; load generator errors "
              f"{new_errors or 0} (at most {allowed} allowed: "
              f"{LOAD_ERROR_FRACTION:.0%} of the orders sent)")
    tl.expect("every sidecar is SYNCED at the end", bool(wait_for(mesh.all_synced,
                                                                  REJOIN_BOUND_S)))


def _heal_all(mesh: Mesh, tl: Timeline, victim: str, other: str, restarted: bool) -> None:
    """Whatever happened: no replica stays sick, and the victim's app and sidecar run."""
    for inst in (other, victim):
        try:
            if mesh.alive(mesh.app(inst)):
                mesh.heal(inst)
        except OSError:
            pass
    if restarted:
        return
    app = mesh.app(victim)
    if not mesh.alive(app):
        new = mesh.restart(app)
        tl.action(f"{victim}: app started again (pid {new.pid}) while cleaning up")
    side = mesh.sidecar(victim)
    if not mesh.alive(side):
        new = mesh.restart(side)
        tl.action(f"{victim}: sidecar started again (pid {new.pid}) while cleaning up")
