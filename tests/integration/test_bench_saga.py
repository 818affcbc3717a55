"""``bench.saga.run`` at a tiny scale: the demo mesh and the direct wiring both come up, take
the closed loop's orders, pass the demo's money audit over every order sent, and are gone
afterwards. No timing is asserted: the machine is shared."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

from bench import saga
from bench.procs import ProcGroup
from demo_services.launcher import procs as launcher_procs
from demo_services.launcher.up import Started

ORDERS = 60


def _pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line mentions ``text`` (e.g. the test's tmp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if text in cmdline and launcher_procs.start_ticks(int(entry.name)) is not None:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_saga_mesh_and_direct_are_audited_and_measured(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(saga, "WARMUP_CALLS", 10)
    audited: dict[str, int] = {}
    real_audit = saga.audit

    def audit(wiring: saga.Wiring, tally: Any, log: saga.Log) -> int:
        audited[wiring.name] = real_audit(wiring, tally, log)
        return audited[wiring.name]

    started: list[Started] = []
    real_bring_up = saga.bring_up

    def bring_up(settings: Any, log: saga.Log) -> Started:
        started.append(real_bring_up(settings, log))
        return started[-1]

    monkeypatch.setattr(saga, "audit", audit)
    monkeypatch.setattr(saga, "bring_up", bring_up)
    lines: list[str] = []
    group = ProcGroup(log_dir=tmp_path)
    try:
        figures = saga.run(tmp_path, group, orders=ORDERS, in_flight=4, log=lines.append)
    finally:
        group.stop_all()

    assert set(figures) == set(saga.KEYS)
    assert all(math.isfinite(v) and v > 0 for v in figures.values()), figures
    # Both wirings ran: warm-up + measured calls, every distinct order audited.
    assert set(audited) == {"mesh", "direct"}
    for name, n in audited.items():
        assert 0.5 * (ORDERS + 10) <= n <= ORDERS + 10 + 4, (name, n, lines[-20:])
    assert any(line.startswith("mesh: round 4/4: ") for line in lines), lines
    assert any(line.startswith("direct: round 4/4: ") for line in lines), lines
    # The mesh really was the demo's: control plane, sidecars, loadgen, gateway.
    roles = {p.role for p in started[0].state.processes}
    assert {"control-plane", "sidecar", "app", "loadgen"} <= roles
    # Everything is stopped and handed back.
    assert not [p for p in started[0].state.processes if launcher_procs.is_ours(p)]
    assert not _pids_mentioning(str(tmp_path))
    assert not group.procs
