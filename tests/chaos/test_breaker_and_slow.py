"""``trip-breaker`` and ``slow-replica`` against the shared chaos demo, with ``--short``:
each test asserts the scenario's own expectations from its report (by name), the figures it
measured, and that the saga's invariants held afterwards."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.chaos.conftest import Report, assert_passed, expectation


def test_trip_breaker_opens_moves_traffic_and_closes_through_half_open(
        scenario: Callable[..., Report]) -> None:
    report = scenario("trip-breaker")
    out = report["_output"][-4000:]
    m: dict[str, Any] = report["measurements"]
    callers = m["callers"]
    assert callers, out

    assert expectation(report, "breaker OPEN on every caller"), out
    configured = m["consecutive_errors_configured"]
    assert expectation(report, "breaker opened within the configured consecutive errors"), out
    assert set(m["errors_before_ejection"]) == set(callers), out
    assert all(1 <= n <= configured for n in m["errors_before_ejection"].values()), out
    assert all(n <= configured for n in m["consecutive_errors_reported_at_open"].values()), out

    assert expectation(report, "traffic moved to the healthy replica"), out
    after = m["calls_after_open"]
    assert after["healthy"] > 0, out
    for caller, n in after["sick"].items():  # only the half-open probes reached the sick one
        assert n <= after["failed_half_open_probes"][caller], out

    assert expectation(report, "order success rate recovered"), out
    floor = m["order_success_rate_floor"]
    before = m["order_success_rate_before"]
    if before is None or before >= 1.0:  # a healthy demo: 95 % at least
        assert floor == 0.95, out
    assert floor <= 0.95 and (before is None or floor < before), out
    assert m["orders_after"] > 0 and m["order_success_rate_after"] >= floor, out

    assert expectation(report, "breaker closed through half-open"), out
    assert set(m["half_open_evidence"]) == set(callers), out
    for caller in callers:
        seen = m["breaker_states_seen"][caller]
        assert "OPEN" in seen and seen[-1] == "CLOSED", (caller, seen, out)

    details = [s["detail"] for s in report["steps"]]
    assert any("every call fails with UNAVAILABLE" in d for d in details), out
    assert any("healed" in d for d in details), out
    assert any("deleted TrafficPolicy" in d or "restored TrafficPolicy" in d
               for d in details), out
    assert_passed(report)


def test_slow_replica_peak_ewma_moves_traffic_and_p99_recovers(
        scenario: Callable[..., Report]) -> None:
    report = scenario("slow-replica")
    out = report["_output"][-4000:]
    m: dict[str, Any] = report["measurements"]
    added = m["latency_ms_added"]

    assert expectation(report, "the slowdown was seen at the edge"), out
    assert m["early"]["slow_calls"] >= 1 and m["early"]["p99_ms"] >= 0.8 * added, out

    assert expectation(report, "traffic moved away from the slow replica"), out
    assert m["late"]["calls"] >= 5 and m["late"]["slow_share"] <= 0.2, out

    assert expectation(report, "edge p99 recovered"), out
    late_p99 = m["late"]["p99_ms"]
    assert late_p99 <= m["late_p99_target_ms"] and late_p99 < m["early"]["p99_ms"] / 2, out
    assert m["late_p99_target_ms"] >= added / 2, out

    details = [s["detail"] for s in report["steps"]]
    assert any("ms more (sickness control)" in d for d in details), out
    assert any("healed" in d for d in details), out
    assert_passed(report)
