"""``bench.pipe``, ``bench.bare_sidecar`` and ``bench.floor``: the byte-pipe floor paths
(plain, and walking the HTTP/2 frames) carry gRPC through two real pipes with mTLS between them, the bare mesh path through two
sidecars without layers, and the floor bench refuses bad arguments with one line.
No timing is asserted: the machine is shared."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from bench import grpc_client, h2load
from bench.certs import make_pki
from bench.paths import start_backend, start_mesh, start_pipe
from bench.procs import Proc, ProcGroup
from tests.support.sidecar import REPO_ROOT

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("frames", [False, True], ids=["pipe", "pipe-h2"])
def test_the_pipe_path_carries_grpc_over_mtls(tmp_path: Path, frames: bool) -> None:
    group = ProcGroup(tmp_path)
    try:
        pki = make_pki(tmp_path / "pki")
        backend = start_backend(group)
        pipe = start_pipe(group, pki, backend, frames=frames)
        assert pipe.name == ("pipe-h2" if frames else "pipe")
        grpc_client.verify(pipe, unary_calls=20)  # unary, client-stream and bidi, answers checked
        body = tmp_path / "body"
        response_bytes = h2load.write_unary_body(body)
        out = h2load.run(pipe.url(h2load.UNARY_PATH), body, requests=500, clients=2, streams=8)
        h2load.check_complete(out, 500, response_bytes, "pipe path")
        pipe.check_alive()
        # The second pipe takes TLS only: a plaintext client gets no answer from it.
        b_port = int(pipe.procs[1].ready["port"])
        plain = h2load.run(f"http://127.0.0.1:{b_port}{h2load.UNARY_PATH}", body, requests=5,
                           clients=1, streams=1, timeout_s=20)
        assert plain.succeeded == 0, plain.output
    finally:
        group.stop_all()


def test_floor_refuses_a_bad_argument_with_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.floor", "--rate", "0"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--rate" in lines[0], proc.stderr


def _stats(proc: Proc) -> dict:
    with urllib.request.urlopen(f"http://{proc.ready['admin']}/stats", timeout=10) as resp:
        return json.loads(resp.read())


def test_the_bare_mesh_path_relays_without_layers(tmp_path: Path) -> None:
    """``bench.bare_sidecar``: the mesh's two sidecars with no layers carry gRPC over mTLS;
    the relay counts the calls and the stats layer, absent, counts none."""
    group = ProcGroup(tmp_path)
    try:
        pki = make_pki(tmp_path / "pki")
        backend = start_backend(group)
        bare = start_mesh(group, tmp_path / "mesh-bare", pki, backend, bare=True)
        assert bare.name == "mesh-bare"
        grpc_client.verify(bare, unary_calls=20)  # unary, client-stream and bidi, answers checked
        bare.check_alive()
        for proc, direction in ((bare.procs[2], "outbound"), (bare.procs[1], "inbound")):
            section = _stats(proc)[direction]
            assert section["counters"]["calls_total"] >= 22, section
            assert section["calls"] == {"by_route": {}, "by_status": {}}, section
    finally:
        group.stop_all()
