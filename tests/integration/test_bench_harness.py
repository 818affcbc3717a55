"""`python -m bench --quick` works end to end: every path starts, answers gRPC OK, and is measured.

Runs the real harness once as a subprocess (backend, two standalone sidecars, a control plane
with three dynamic sidecars and 99 registered instances for the mesh-all path, two nginx, two
haproxy when installed, h2load) and checks that it exits 0, that every required JSON key is a
finite number, and that the work was really done: the mesh-all layers acted (route matches,
authorization allows, spans exported), every layer has a cost, the client knew 100 endpoints.
No timing is asserted: the machine is shared. A broken path (a sidecar that fails a call, a
proxy that exits, a request h2load did not complete, a layer that did not act, a config change
not ACKed) makes the harness exit 1.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import REQUIRED_KEYS
from tests.support.sidecar import REPO_ROOT

pytestmark = pytest.mark.nginx


@pytest.mark.timeout(150)
def test_quick_bench_emits_every_required_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"bench exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-4000:]}"
    doc = json.loads(out.read_text())

    def numeric(v: object) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    missing = [k for k in REQUIRED_KEYS if not numeric(doc.get(k))]
    assert not missing, f"missing or non-numeric keys: {missing}"
    assert doc["quick"] is True
    assert numeric(doc["machine"]["nproc"]) and isinstance(doc["machine"]["python"], str)
    assert {"direct", "mesh", "mesh-all", "nginx"} <= set(doc["paths"])
    repeats = doc["plan"]["repeats"]
    for name, p in doc["paths"].items():
        assert numeric(p["saturation_rps"]) and p["saturation_rps"] > 0, name
        assert numeric(p["stream_mb_per_s"]) and p["stream_mb_per_s"] > 0, name
        assert len(p["stream_mb_per_s_runs"]) == repeats, name
    for name in ("mesh", "mesh-all"):
        assert set(doc["paths"][name]["cpu_us_per_call"]) == {"sidecar-client", "sidecar-echo"}

    # Every layer got a cost, by the method the task names for it.
    costs = doc["layer_cost_us_per_call"]
    assert {"stats", "metrics", "calllog", "trace", "authorization (deny default + policy)",
            "peak-EWMA (vs round_robin)", "timeout (10 s) [in-process]"} <= set(costs)
    assert all(numeric(v) for v in costs.values()), costs
    rows = {r["layer"]: r for r in doc["layer_costs"]}
    assert rows["metrics"]["method"].startswith("in-process")
    assert rows["timeout (10 s)"]["method"].startswith("runtime")
    assert rows["trace"]["detail"]["spans_to"].startswith("OTLP to the control plane"), rows["trace"]

    # The mesh-all layers really acted, and the client knew 100 real registrations.
    work = doc["mesh_all"]["layers_at_work"]
    assert work["route_rule_matches"] >= 200 and work["authz_allowed_by_policy"] >= 200, work
    assert work["authz_default"] == "deny" and work["load_balancer"] == "peak_ewma", work
    assert work["spans_exported_client"] > 0 and work["spans_exported_echo"] > 0, work
    assert work["traces_at_control_plane"] > 0, work
    rss = doc["mesh_all"]["rss_100_endpoints"]
    assert rss["endpoints"] == 100 and rss["registered"] == 99, rss

    assert "Saturation" in proc.stdout and "mesh-all" in proc.stdout
    assert "Each layer's cost" in proc.stdout
