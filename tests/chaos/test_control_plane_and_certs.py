"""``control-plane-down`` and ``cert-rotation`` against the shared chaos demo (``--short``):
each test asserts the scenario's own expectations by name and the figures behind them, not
only the exit code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.chaos.conftest import assert_passed, expectation

Report = dict[str, Any]


def _steps(report: Report, kind: str, text: str) -> list[str]:
    return [s["detail"] for s in report["steps"] if s["kind"] == kind and text in s["detail"]]


def test_control_plane_down_loses_no_order_and_every_sidecar_resyncs(
        scenario: Callable[..., Report]) -> None:
    report = scenario("control-plane-down")
    for name in ("control plane was down longer than the grace period",
                 "every sidecar kept serving its last snapshot",
                 "every sidecar noticed the control plane was gone",
                 "orders kept confirming while the control plane was down",
                 "every sidecar SYNCED again within 25s",
                 "the registry holds every instance again",
                 "no call failed and no order was cancelled for an infrastructure reason",
                 "orders keep confirming after the resync"):
        assert expectation(report, name), (name, report["_output"][-3000:])
    m = report["measurements"]
    assert m["outage_s"] > m["grace_period_s"] == 3
    assert m["failed_orders"] == 0 and m["load_errors"] == 0 and m["infra_cancelled"] == 0
    assert m["confirmed_while_down"] > 0
    assert m["resync_s"] <= 25
    assert _steps(report, "action", "SIGTERM")
    assert _steps(report, "action", "started again")
    assert _steps(report, "observation", "SYNCED again")
    assert_passed(report)


def test_cert_rotation_under_load_fails_no_call_and_renews_every_certificate(
        scenario: Callable[..., Report]) -> None:
    report = scenario("cert-rotation")
    for name in ("every sidecar was asked to renew",
                 "every sidecar got a new certificate",
                 "every sidecar serves its new certificate",
                 "every inbound listener presents its new certificate",
                 "zero failed calls at the load generator",
                 "no call between sidecars failed",
                 "no TLS handshake failed",
                 "orders kept confirming during the rotation",
                 "every sidecar SYNCED after the rotation"):
        assert expectation(report, name), (name, report["_output"][-3000:])
    m = report["measurements"]
    assert m["load_errors"] == 0 and m["infra_cancelled"] == 0
    assert m["sidecar_calls_failed"] == 0 and m["sidecar_calls_during"] > 0
    assert m["tls_handshake_failures"] == 0 and m["tls_handshakes_during"] > 0
    assert m["confirmed_during"] > 0
    renewed = _steps(report, "action", "meshctl certs renew --service")
    assert {line.rsplit(" ", 1)[-1] for line in renewed} >= {"inventory", "payment", "order",
                                                               "loadgen"}
    assert_passed(report)
