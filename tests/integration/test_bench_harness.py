"""`python -m bench --quick` works end to end: every path starts, answers gRPC OK, and is measured.

Runs the real harness once as a subprocess (backend, two sidecars, two nginx, two haproxy
when installed, h2load) and checks that it exits 0 and that every required JSON key is a
finite number. No timing is asserted: the machine is shared. A broken path (a sidecar that
fails a call, a proxy that exits, a request h2load did not complete) makes the harness exit 1.
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
    assert {"direct", "mesh", "nginx"} <= set(doc["paths"])
    for name, p in doc["paths"].items():
        assert numeric(p["saturation_rps"]) and p["saturation_rps"] > 0, name
        assert numeric(p["stream_mb_per_s"]) and p["stream_mb_per_s"] > 0, name
    assert set(doc["paths"]["mesh"]["cpu_us_per_call"]) == {"sidecar-client", "sidecar-echo"}
    assert "Saturation" in proc.stdout and "mesh" in proc.stdout
