"""One demo for every chaos test (package scope), on free ports in a tmp dir with short
timers; ``scenario(name)`` runs ``python -m chaos NAME --short`` against it and returns the
report. Each scenario leaves the demo healthy for the next one."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.demo import Demo, demo_env, running_demo
from tests.support.sidecar import REPO_ROOT

SCENARIO_TIMEOUT_S = 240
Report = dict[str, Any]


@pytest.fixture(scope="package")
def chaos_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    base = tmp_path_factory.mktemp("chaos")
    # Peak-EWMA decays over 2 s, not 10: a restarted replica's new endpoint (30 ms to start
    # with) gets calls again within seconds. Not 1 s: slow-replica's windows (3 s + 4 s)
    # must end before a caller tries the slow replica again, its first slow answers (~1-2 s)
    # plus decay_s·ln(1 s / the fast replica's 10-40 ms): 8-11 s at 2 s, 4-7 s at 1 s.
    env = {**demo_env(base, rps=10, lease_s=1.5), "MESH_DEMO_GRACE_PERIOD_S": "3",
           "MESH_DEMO_EWMA_DECAY_S": "2",
           "MESH_DEMO_REPORT_INTERVAL_S": "0.5", "MESH_DEMO_REPORT_WINDOW_S": "10"}
    with running_demo(base, env) as d:
        yield d


@pytest.fixture
def scenario(chaos_demo: Demo, tmp_path: Path) -> Callable[..., Report]:
    def run(name: str, *extra: str, seed: int = 1) -> Report:
        report = tmp_path / f"{name}.json"
        r = subprocess.run([sys.executable, "-m", "chaos", name, "--short", "--seed", str(seed),
                            "--report", str(report), *extra], env=chaos_demo.env,
                           cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=SCENARIO_TIMEOUT_S)
        assert report.exists(), f"no report (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
        doc = json.loads(report.read_text())
        doc["_exit"] = r.returncode
        doc["_output"] = r.stdout + r.stderr
        return doc
    return run


def expectation(report: Report, name: str) -> bool:
    """The verdict of expectation ``name`` (a failing assert names what was recorded)."""
    assert name in report["expectations"], (name, sorted(report["expectations"]),
                                            report["_output"][-3000:])
    return bool(report["expectations"][name])


def assert_passed(report: Report) -> None:
    """Every expectation and invariant held, the exit code says so, and the report is whole."""
    failed = [k for k, v in {**report["expectations"], **report["invariants"]}.items() if not v]
    assert not failed and report["passed"] and report["_exit"] == 0, (
        failed, report["_output"][-4000:])
    assert report["invariants"], "no invariant was checked"
    assert any(s["kind"] == "action" for s in report["steps"])
    assert any(s["kind"] == "observation" for s in report["steps"])
