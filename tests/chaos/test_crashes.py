"""Crashes under load, on the shared chaos demo: ``kill-replica`` (a participant replica and
its sidecar SIGKILLed, then restarted) and ``orchestrator-crash`` (an order replica's app
SIGKILLed mid-saga, then restarted). Each test asserts the scenario's own expectations and
figures from its report, then that the demo was left whole for the next scenario."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chaos.timeline import ACTION
from demo_services.launcher.procs import is_ours
from demo_services.launcher.state import load
from tests.chaos.conftest import Report, assert_passed, expectation
from tests.support.demo import Demo


def _actions(report: Report) -> list[str]:
    return [s["detail"] for s in report["steps"] if s["kind"] == ACTION]


def _assert_demo_whole(demo: Demo) -> None:
    """Every process of state.json is running (restarted ones recorded in place)."""
    state = load(Path(demo.env["MESH_DEMO_DIR"]) / "state.json")
    down = [f"{p.role} {p.instance}" for p in state.processes if not is_ours(p)]
    assert not down, f"left not running: {down}"


def test_kill_replica(scenario: Any, chaos_demo: Demo) -> None:
    report = scenario("kill-replica")
    assert_passed(report)
    m = report["measurements"]
    victim = m["victim"]
    assert m["service"] in ("payment", "inventory") and victim.startswith(m["service"])

    # Calls in flight when the kill landed were retried onto the other replica, and counted.
    assert expectation(report, "calls in flight on the killed replica were retried onto the "
                               "other")
    assert m["in_flight_at_kill"] >= 1
    assert m["in_flight_calls_retried_onto_other"] >= 1
    assert expectation(report, "the callers' sidecars counted the retries (mesh_retries_total)")
    assert m["retries_by_reason"].get("connection_lost", 0) >= 1, m["retries_by_reason"]
    assert any("after connection_lost from" in s["detail"] for s in report["steps"])

    # The registry kept it for the grace period (3 s in the chaos demo), then dropped it.
    assert expectation(report, "the registry dropped the instance after its grace period")
    assert m["grace_period_s"] == 3
    assert 3 - 0.25 <= m["dropped_after_s"] <= 3 + 10
    assert expectation(report, "the callers' snapshots dropped the killed endpoint")

    # Restarted: rejoined, healthy in its callers' snapshots, serving.
    assert expectation(report, "the restarted replica rejoined: registered and SYNCED")
    assert expectation(report, "the restarted replica is a healthy endpoint in every caller's "
                               "snapshot")
    assert expectation(report, "the restarted replica takes traffic again")
    assert m["calls_served_after_rejoin"] > 0
    actions = _actions(report)
    assert any(a.startswith(f"{victim}: SIGKILL its sidecar") for a in actions), actions
    assert any(a.startswith(f"{victim}: app started again") for a in actions), actions
    assert any(a.startswith(f"{victim}: sidecar started again") for a in actions), actions

    # Nothing failed because of the kill: the callers' sidecars saw no failed call to the
    # service, no saga gave a step up; the mesh is whole again.
    assert expectation(report, "no call to the service failed at its callers")
    assert m["failed_calls_at_callers"] == {}
    assert expectation(report, "no order failed")
    assert m["infra_cancelled"] == 0 and m["load_confirmed"] > 0
    assert m["load_errors"] <= m["load_errors_allowed"] <= 0.01 * m["load_sent"]
    assert expectation(report, "every sidecar is SYNCED at the end")
    assert all(report["invariants"].values()) and report["invariants"]
    _assert_demo_whole(chaos_demo)


def test_orchestrator_crash(scenario: Any, chaos_demo: Demo) -> None:
    report = scenario("orchestrator-crash")
    assert_passed(report)
    m = report["measurements"]
    victim = m["victim"]
    assert victim.startswith("order-")

    # Killed mid-saga; the mesh saw it.
    assert expectation(report, "sagas were in flight on the killed replica")
    assert m["sagas_running_at_kill"] >= 1 and m["pending_at_crash"] >= 1
    assert expectation(report, "the mesh marked the crashed replica unhealthy")
    assert any(a.startswith(f"{victim}: SIGKILL its app") for a in _actions(report))

    # The other replica resumed the leased sagas; every saga ended; no duplicate order.
    assert expectation(report, "another replica resumed the crashed replica's sagas")
    assert m["sagas_resumed_by_other"] >= 1
    assert expectation(report, "every order PENDING at the crash ended CONFIRMED or CANCELLED")
    assert m["terminal_after_s"] is not None and m["terminal_after_s"] <= m["lease_s"] + 45
    assert expectation(report, "no order left PENDING")
    assert expectation(report, "no re-sent request got a second order")
    assert m["mismatches"] == 0

    # The audit: nothing in flight, no double charge, money and stock conserved.
    inv = report["invariants"]
    assert inv and all(inv.values()), inv
    assert inv.get("no order in flight") is True

    # Restarted on its address: healthy and taking orders again.
    assert expectation(report, "the restarted replica is healthy in the mesh again")
    assert expectation(report, "the restarted replica takes orders again")
    assert m["calls_served_after_restart"] > 0
    assert any(a.startswith(f"{victim}: app started again") for a in _actions(report))
    assert expectation(report, "every sidecar is SYNCED at the end")
    _assert_demo_whole(chaos_demo)
