"""``bench.ab --split``'s timer (``bench/traversal_timer.py``): two real sidecars run under
it carry calls as usual and, when stopped, leave one sample per read they relayed, on both
traversals. No timing is asserted: the machine is shared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import h2load
from bench.ab import _sidecar
from bench.certs import make_pki
from bench.paths import start_backend
from bench.procs import ProcGroup
from tests.support.sidecar import REPO_ROOT, sidecar_config

pytestmark = pytest.mark.timeout(90)


def test_timed_sidecars_relay_and_leave_a_sample_per_read(tmp_path: Path) -> None:
    group = ProcGroup(tmp_path)
    try:
        pki = make_pki(tmp_path / "pki")
        backend = start_backend(group)
        tree = str(REPO_ROOT)
        echo = _sidecar(group, tmp_path, "echo", tree, sidecar_config(
            service="echo", tls=pki.echo, app_port=int(backend.ready["port"])), timed=True)
        client = _sidecar(group, tmp_path, "client", tree, sidecar_config(
            service="client", tls=pki.client, clusters={"echo": [(echo.ready["inbound"], None)]}),
            timed=True)
        body = tmp_path / "body"
        response_bytes = h2load.write_unary_body(body)
        port = int(client.ready["outbound"].rpartition(":")[2])
        out = h2load.run(f"http://127.0.0.1:{port}{h2load.UNARY_PATH}", body, requests=300,
                         clients=1, streams=1, authority="echo")
        h2load.check_complete(out, 300, response_bytes, "timed mesh")
        for proc in (client, echo):
            assert proc.stop(10.0) == 0
        for name in ("client", "echo"):
            rows = [json.loads(line) for line in
                    (tmp_path / f"{name}.reads.jsonl").read_text().splitlines()]
            for side in ("request", "response"):
                got = [r for r in rows if r["side"] == side]
                # One call at a time: about one read per call each way.
                assert len(got) >= 250, (name, side, len(got))
                assert all(r["process"] >= 0 and r["after"] >= 0 for r in got)
                # A read writes before its callback returns, or (reads close together) in a
                # later loop pass, untimed.
                assert all(r["to_write"] >= r["write"] >= 0 or r["to_write"] == r["write"] == -1
                           for r in got)
                assert any(r["write"] >= 0 for r in got), (name, side)
    finally:
        group.stop_all()


def test_split_without_a_rate_is_refused_with_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.ab", str(REPO_ROOT), str(REPO_ROOT),
                           "--split"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--split" in lines[0], proc.stderr
