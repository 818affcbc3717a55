"""``orchestrator-crash``: SIGKILL one order replica (the saga orchestrator; the app only, its
sidecar stays) while it runs sagas, then start it again on its address.

What must hold:

* the kill lands mid-saga: the replica's ``GET /sagas`` shows sagas running there just before
  (both payment replicas first answer with added latency, so sagas last long enough to be
  caught in flight);
* the mesh sees the crash: the replica's sidecar reports its app down and the callers'
  snapshots mark the endpoint unhealthy;
* the other replica resumes the crashed one's leased sagas once their lease expires (its
  ``recovered_here`` grows), and every order PENDING at the crash ends CONFIRMED or CANCELLED
  within a bound; with the load paused, no order is left PENDING at all; a request the load
  generator sent again never got a second order (its ``mismatches`` stay 0);
* restarted, the replica is healthy in the mesh again and takes orders.

The runner's audit then checks money and stock (no double charge from a resumed step).
Read as a user would: the apps' and the load generator's control endpoints, ``ListOrders``
and ``GetOrder`` on the order service, ``Admin.ListSidecars``/``GetSidecarConfig``, the
sidecars' admin ``/metrics``.
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from chaos.mesh import ChaosError, Mesh, http_json, wait_for
from chaos.scenarios import Options
from chaos.scenarios.kill_replica import (
    LoadPoint,
    balancer_costs,
    callers_of,
    delta,
    ensure_load,
    ensure_whole,
    held_endpoints,
    inbound_calls,
    registry_entry,
    retries_by_reason,
)
from chaos.timeline import Timeline
from demo_services import check
from protos.order import order_pb2, order_pb2_grpc

NAME = "orchestrator-crash"
EXPECTATION = ("SIGKILL an order replica mid-saga (its sidecar stays): another replica resumes "
               "its leased sagas, every saga ends CONFIRMED or CANCELLED and the audit passes; "
               "restarted on its address, the replica is healthy again and takes orders")

SERVICE = "order"
SLOW_SERVICE = "payment"
SLOW_LATENCY_MS = 300
"""Added to every payment replica before the kill, so sagas are in flight when it lands."""
MIN_RUNNING = 2
"""Sagas running on the victim wanted before the kill (at least 1 after IN_FLIGHT_WAIT_S)."""
IN_FLIGHT_WAIT_S = 10.0
HEALTH_BOUND_S = 15.0
"""The crash shows in the mesh (sidecar health, callers' snapshots) within this."""
TERMINAL_SLACK_S = 45.0
"""Every order PENDING at the crash is terminal within the saga lease plus this (the other
replica claims an expired lease within a quarter of it; a step retries for at most 10 s)."""
QUIET_BOUND_S = 30.0
"""With the load paused, no order is PENDING any more within this."""
RESTART_BOUND_S = 30.0
TRAFFIC_BOUND_S = 90.0
"""The restarted replica takes orders again within this. Not at once: the callers'
peak-EWMA estimate of its endpoint (same address, kept across the crash) still holds the
sick answers it gave as it died, each fed as twice the estimate before it (capped at 10 s),
and only decays (over the sidecars' ``--ewma-decay-s``, 10 s by default) until it is cheaper
than the other replica's (~30 ms): with the default, typically 5-40 s, at worst
10·ln(10 s / 30 ms) ≈ 58 s (the chaos tests' demo decays over 2 s: a fifth of that)."""


def sagas(mesh: Mesh, instance: str) -> dict[str, Any]:
    """Order replica ``instance``'s ``GET /sagas`` (counts, ``running_here``,
    ``recovered_here``, ``leased_by_owner``)."""
    return http_json(mesh.app(instance).control, "GET", "/sagas")


def pending_orders(mesh: Mesh) -> list[str]:
    """The ids of the orders PENDING now (``ListOrders`` on a live order replica)."""
    return [o.order_id for o in check.list_orders(mesh.state, "PENDING")]


def still_pending(address: str, order_ids: list[str]) -> list[str]:
    """Those of ``order_ids`` that ``GetOrder`` on the replica at ``address`` shows PENDING."""
    with grpc.insecure_channel(address) as ch:
        stub = order_pb2_grpc.OrderStub(ch)
        return [oid for oid in order_ids
                if stub.GetOrder(order_pb2.GetOrderRequest(order_id=oid),
                                 timeout=5).state == "PENDING"]


def _endpoint_health(mesh: Mesh, callers: list[str], victim: str) -> dict[str, bool | None]:
    """caller -> whether its snapshot holds ``victim`` as a healthy order endpoint."""
    out: dict[str, bool | None] = {}
    for c in callers:
        held = held_endpoints(mesh, c, SERVICE).get(victim)
        out[c] = None if held is None else held[1]
    return out


def _app_health(mesh: Mesh, victim: str) -> str:
    entry = registry_entry(mesh, victim)
    return entry.health if entry is not None else ""


def _catch_mid_saga(mesh: Mesh, tl: Timeline, victim: str) -> dict[str, Any]:
    """Slow the payment replicas, wait until ``victim`` runs sagas, SIGKILL its app;
    returns its last ``/sagas`` before the kill."""
    slow = mesh.instances(SLOW_SERVICE)
    tl.action(f"{', '.join(slow)}: answer {SLOW_LATENCY_MS} ms late (sickness), so sagas are "
              f"in flight when the kill lands")
    for inst in slow:
        mesh.sicken(inst, latency_ms=SLOW_LATENCY_MS)
    last: dict[str, Any] = {}

    def running(at_least: int) -> bool:
        last.update(sagas(mesh, victim))
        return int(last.get("running_here", 0)) >= at_least
    if not wait_for(lambda: running(MIN_RUNNING), IN_FLIGHT_WAIT_S / 2, 0.05):
        wait_for(lambda: running(1), IN_FLIGHT_WAIT_S / 2, 0.05)
    app = mesh.app(victim)
    mesh.kill(app)
    tl.action(f"{victim}: SIGKILL its app (pid {app.pid}, {app.address}) with "
              f"{last.get('running_here', 0)} saga(s) running there; its sidecar stays")
    if not mesh.wait_gone(app):
        raise ChaosError(f"{victim}: still running after SIGKILL")
    return last


def run(mesh: Mesh, tl: Timeline, opts: Options) -> None:
    """Crash an order replica mid-saga, follow the recovery, restart it (see the module
    doc)."""
    replicas = mesh.instances(SERVICE)
    if len(replicas) < 2:
        raise ChaosError(f"{SERVICE} has {len(replicas)} replica(s); the scenario needs two")
    lease_s = float(mesh.state.settings.get("lease_s", 5.0))
    tl.measure("lease_s", lease_s)
    ensure_whole(mesh)
    ensure_load(mesh, tl)
    if not wait_for(lambda: callers_of(mesh, SERVICE), RESTART_BOUND_S):
        raise ChaosError(f"no traffic reaches {SERVICE} before the crash")
    callers = callers_of(mesh, SERVICE)
    served0 = {r: inbound_calls(mesh, r) for r in replicas}
    time.sleep(opts.pick(1.0, 3.0))   # a baseline of load
    # The victim is drawn among the replicas taking orders now (after an earlier crash the
    # callers' balancers may still avoid one for a while: it would run no saga to catch).
    busy = [r for r in replicas if inbound_calls(mesh, r) > served0[r]] or replicas
    victim = opts.rng.choice(busy)
    survivor = next(i for i in replicas if i != victim)
    tl.measure("victim", victim)
    before = LoadPoint.read(mesh)
    mismatches_before = int(mesh.load_stats().get("mismatches", 0))
    recovered_before = int(sagas(mesh, survivor).get("recovered_here", 0))
    retries_before = retries_by_reason(mesh, callers, SERVICE)
    tl.observe(f"{victim} and {survivor} orchestrate sagas for {', '.join(callers)}; "
               f"{survivor} has resumed {recovered_before} saga(s) so far")

    restarted = paused = False
    try:
        last = _catch_mid_saga(mesh, tl, victim)
        crashed_mono = time.monotonic()
        running_at_kill = int(last.get("running_here", 0))
        tl.measure("sagas_running_at_kill", running_at_kill)
        tl.measure("sagas_leased_at_kill", int(last.get("leased_by_owner", 0)))
        tl.expect("sagas were in flight on the killed replica", running_at_kill >= 1,
                  f"{victim}: {running_at_kill} running, "
                  f"{last.get('leased_by_owner', 0)} leased to it, "
                  f"{last.get('in_flight', 0)} open in the database")
        pending = pending_orders(mesh)
        tl.observe(f"{len(pending)} order(s) PENDING right after the crash")
        tl.measure("pending_at_crash", len(pending))
        for inst in mesh.instances(SLOW_SERVICE):
            mesh.heal(inst)
        tl.action(f"{', '.join(mesh.instances(SLOW_SERVICE))}: healed")

        # The mesh sees the crash.
        def marked_down() -> bool:
            return (_app_health(mesh, victim) not in ("", "SERVING")
                    and all(h is False for h in _endpoint_health(mesh, callers, victim).values()))
        took = wait_for(marked_down, HEALTH_BOUND_S, 0.1)
        tl.expect("the mesh marked the crashed replica unhealthy", bool(took),
                  f"{victim}'s sidecar reports its app {_app_health(mesh, victim) or '?'}; "
                  f"healthy in the callers' snapshots: {_endpoint_health(mesh, callers, victim)}")

        # Recovery: the survivor claims the expired leases; every pending saga ends.
        survivor_addr = mesh.app(survivor).address
        bound = lease_s + TERMINAL_SLACK_S
        left: list[str] = list(pending)

        def all_terminal() -> bool:
            nonlocal left
            left = still_pending(survivor_addr, left)
            return not left
        done = wait_for(all_terminal, bound, 0.2)
        took_s = time.monotonic() - crashed_mono
        tl.measure("terminal_after_s", round(took_s, 2) if done else None)
        recovered = int(sagas(mesh, survivor).get("recovered_here", 0)) - recovered_before
        tl.measure("sagas_resumed_by_other", recovered)
        tl.observe(f"{survivor} resumed {recovered} saga(s) whose lease ({lease_s:g}s) "
                   f"expired")
        tl.expect("another replica resumed the crashed replica's sagas", recovered >= 1,
                  f"{survivor} resumed {recovered} (recovered_here)")
        tl.expect("every order PENDING at the crash ended CONFIRMED or CANCELLED", bool(done),
                  f"{len(pending)} terminal {took_s:.1f}s after the crash" if done else
                  f"{len(left)} of {len(pending)} still PENDING after {bound:g}s: {left[:3]}")

        # With the load paused, nothing at all stays PENDING.
        mesh.pause_load()
        paused = True
        tl.action("load generator paused")
        quiet = check.wait_quiet(mesh.state, QUIET_BOUND_S)
        left_now = pending_orders(mesh)
        tl.expect("no order left PENDING", quiet is not None and not left_now,
                  f"none after {quiet:.1f}s" if quiet is not None and not left_now else
                  f"{len(left_now)} PENDING after {QUIET_BOUND_S:g}s")
        mesh.resume_load()
        paused = False
        tl.action("load generator resumed")
        stats = mesh.load_stats()
        mismatches = int(stats.get("mismatches", 0)) - mismatches_before
        tl.measure("mismatches", mismatches)
        tl.expect("no re-sent request got a second order", mismatches == 0,
                  f"{mismatches} idempotency mismatch(es) seen by the load generator")

        # Restart on the same address; the sidecar's app is back.
        new = mesh.restart(mesh.app(victim))
        restarted = True
        restart_mono = time.monotonic()
        tl.action(f"{victim}: app started again (pid {new.pid}, {new.address})")
        served_before = inbound_calls(mesh, victim, "OK")

        def healthy() -> bool:
            return (_app_health(mesh, victim) == "SERVING"
                    and all(_endpoint_health(mesh, callers, victim).values()))
        back = wait_for(healthy, RESTART_BOUND_S, 0.1)
        tl.expect("the restarted replica is healthy in the mesh again", bool(back),
                  f"{victim} SERVING, healthy in {', '.join(callers)}'s snapshots "
                  f"{time.monotonic() - restart_mono:.1f}s after the restart" if back else
                  f"health {_app_health(mesh, victim) or '?'} after {RESTART_BOUND_S:g}s")
        tl.observe("peak-EWMA cost at the callers: " + balancer_costs(
            mesh, callers, {victim: mesh.sidecar(victim).inbound,
                            survivor: mesh.sidecar(survivor).inbound}))
        took_traffic = wait_for(lambda: inbound_calls(mesh, victim, "OK") > served_before,
                                TRAFFIC_BOUND_S, 0.2)
        back_after = time.monotonic() - restart_mono
        tl.measure("traffic_back_after_s", round(back_after, 2) if took_traffic else None)
        if took_traffic:
            tl.observe(f"{victim}: orders reach it again {back_after:.1f}s after the restart "
                       f"(the callers' peak-EWMA estimate of it had to decay from its "
                       f"dying answers)")
            time.sleep(opts.pick(1.0, 10.0))
        served = int(inbound_calls(mesh, victim, "OK") - served_before)
        tl.measure("calls_served_after_restart", served)
        outcomes = sagas(mesh, victim).get("outcomes_here") or {}
        tl.observe(f"{victim} (restarted) ran saga steps: {outcomes or 'none yet'}")
        tl.expect("the restarted replica takes orders again", bool(took_traffic) and served > 0,
                  f"{victim}: {served} call(s) answered OK through its sidecar since the restart")
    finally:
        _heal_all(mesh, tl, victim, restarted, paused)

    after = LoadPoint.read(mesh)
    new_errors = after.new_errors(before)
    new_retries = delta(retries_by_reason(mesh, callers, SERVICE), retries_before)
    tl.measure("load_errors", sum(new_errors.values()))
    tl.measure("retries_to_order", new_retries)
    tl.measure("infra_cancelled", after.infra_cancelled - before.infra_cancelled)
    tl.observe(f"load generator: {after.sent - before.sent} orders sent, "
               f"{after.confirmed - before.confirmed} confirmed, errors {new_errors or 0}; "
               f"its sidecar retried calls to {SERVICE}: {new_retries or 'none'}")
    tl.expect("every sidecar is SYNCED at the end",
              bool(wait_for(mesh.all_synced, RESTART_BOUND_S)))


def _heal_all(mesh: Mesh, tl: Timeline, victim: str, restarted: bool, paused: bool) -> None:
    """Whatever happened: payment is healthy, the load runs, the victim's app runs."""
    for inst in mesh.instances(SLOW_SERVICE):
        try:
            mesh.heal(inst)
        except OSError:
            pass
    if paused:
        mesh.resume_load()
        tl.action("load generator resumed")
    if not restarted:
        app = mesh.app(victim)
        if not mesh.alive(app):
            new = mesh.restart(app)
            tl.action(f"{victim}: app started again (pid {new.pid}) while cleaning up")
