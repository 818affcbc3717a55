"""The chaos script's pure parts and its command line: the timeline's report (passed only
when every expectation and invariant holds and at least one invariant was checked), the
printed lines, and one clear line with exit 2 when it cannot run."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from chaos import scenarios
from chaos.timeline import Timeline
from tests.support.sidecar import REPO_ROOT


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_report_passes_only_when_everything_held(tmp_path: Path) -> None:
    clock, out = Clock(), io.StringIO()
    tl = Timeline("trip-breaker", seed=7, short=True, out=out, clock=clock)
    clock.now += 1.5
    tl.action("payment-1: fail every call")
    clock.now += 2.25
    tl.observe("breaker OPEN on order-1")
    assert tl.expect("breaker opened", True, "2 of 2 callers")
    tl.measure("success_rate_after", 0.98)
    assert not tl.passed  # no invariant checked yet
    tl.invariant("money conserved", True)
    assert tl.passed
    doc = tl.report()
    assert doc["scenario"] == "trip-breaker" and doc["seed"] == 7 and doc["short"] is True
    assert doc["steps"][0] == {"t": 1.5, "kind": "action", "detail": "payment-1: fail every call"}
    assert doc["steps"][1] == {"t": 3.75, "kind": "observation",
                               "detail": "breaker OPEN on order-1"}
    assert doc["expectations"] == {"breaker opened": True}
    assert doc["invariants"] == {"money conserved": True}
    assert doc["measurements"] == {"success_rate_after": 0.98}
    assert "[   1.50s] ACTION  payment-1: fail every call" in out.getvalue()
    tl.write(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True


def test_one_failed_expectation_or_invariant_fails_the_report() -> None:
    tl = Timeline("x", out=None)
    tl.invariant("stock conserved", True)
    tl.expect("traffic moved", True)
    tl.expect("traffic moved", False, "second look")  # holds only if it held both times
    assert tl.expectations == {"traffic moved": False} and not tl.passed
    tl2 = Timeline("y", out=None)
    tl2.expect("ok", True)
    tl2.invariant("no double charge", False)
    assert not tl2.passed and tl2.report()["passed"] is False


def test_every_scenario_is_registered_and_the_standard_set_is_known() -> None:
    assert set(scenarios.STANDARD) < set(scenarios.SCENARIOS)
    assert "storm" in scenarios.SCENARIOS and "storm" not in scenarios.STANDARD
    opts = scenarios.Options(short=True)
    assert opts.pick(3, 30) == 3 and scenarios.Options().pick(3, 30) == 30


def _chaos(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "MESH_DEMO_DIR": str(tmp_path / ".mesh"),
           "MESH_CERTS_DIR": str(tmp_path / "certs")}
    return subprocess.run([sys.executable, "-m", "chaos", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_without_a_demo_it_says_so_in_one_line(tmp_path: Path) -> None:
    r = _chaos(tmp_path, "trip-breaker", "--short")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "no demo runs under" in r.stderr, r.stderr


def test_an_unknown_scenario_is_one_line(tmp_path: Path) -> None:
    r = _chaos(tmp_path, "meteor-strike")
    assert r.returncode == 2
    assert r.stderr.startswith("chaos: error:") and "meteor-strike" in r.stderr, r.stderr


def test_without_first_slow_leaves_out_each_callers_first_slow_call_only() -> None:
    from chaos.scenarios.slow_replica import without_first_slow
    from protos.mesh.v1 import control_pb2 as pb

    def call(instance: str, endpoint: str, start: float, ms: float) -> pb.TapEvent:
        return pb.TapEvent(instance=instance, endpoint=endpoint, latency_ms=ms,
                           time_unix=start + ms / 1000)

    a_first = call("order-1", "slow", 1.0, 1200)
    a_again = call("order-1", "slow", 5.0, 1200)
    b_first = call("order-2", "slow", 3.0, 1200)
    fast = [call("order-2", "fast", t, 5) for t in (0.5, 2.0, 4.0)]
    quick_on_slow = call("order-1", "slow", 0.2, 5)  # before the slowdown: not slow
    kept = without_first_slow([a_first, a_again, b_first, quick_on_slow, *fast], "slow", 960)
    assert a_first not in kept and b_first not in kept
    assert a_again in kept and quick_on_slow in kept and all(f in kept for f in fast)
