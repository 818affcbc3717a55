"""The control-plane part of the bench works end to end at a tiny scale: a real control plane,
20 simulated sidecars (each joined with its own certificate) in another process, two config
changes that every one of them ACKs. Asserts the figures exist and are finite and that the
work was really done (the control plane shows every simulated sidecar connected with the last
change ACKed), never how fast it was: the machine is shared.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import cp_scale
from bench.cp_sim import fake_address, parse_push
from bench.procs import ProcGroup
from protos.mesh.v1 import control_pb2 as pb


def test_parse_push_reads_version_and_hash_without_the_document() -> None:
    doc = "x" * 300_000  # longer than a one-byte and a two-byte length
    wire = pb.ControlMessage(snapshot=pb.SnapshotPush(version="42", hash="0123abcd",
                                                      json=doc)).SerializeToString()
    assert parse_push(wire) == ("42", "0123abcd", len(doc))
    packed = pb.ControlMessage(snapshot=pb.SnapshotPush(version="43", hash="4567ef",
                                                        json_zlib=b"z" * 200)).SerializeToString()
    assert parse_push(packed) == ("43", "4567ef", 200)  # as a zlib-accepting sidecar gets it
    query = pb.ControlMessage(query=pb.Query(id="q1", kind="config")).SerializeToString()
    assert parse_push(query) is None


def test_fake_addresses_are_distinct_loopback_addresses() -> None:
    addresses = {fake_address(i, 15006) for i in range(5000)}
    assert len(addresses) == 5000
    assert all(a.startswith("127.") and a.endswith(":15006") for a in addresses)


@pytest.mark.timeout(120)
def test_cp_scale_smoke_every_sidecar_acks_every_change(tmp_path: Path) -> None:
    group = ProcGroup(log_dir=tmp_path)
    lines: list[str] = []
    try:
        figures = cp_scale.run(tmp_path, group, sidecars=20, changes=2, log=lines.append)
    finally:
        group.stop_all()
    assert set(figures) == set(cp_scale.KEYS)
    for key, value in figures.items():
        assert isinstance(value, float) and math.isfinite(value), (key, value)
    assert figures["cp_registrations_per_s"] > 0
    assert figures["cp_rss_mb_1000_sidecars"] > 0
    assert figures["cp_push_p99_ms_1000_sidecars"] >= figures["cp_push_p50_ms_1000_sidecars"] > 0
    text = "\n".join(lines)
    assert "20 simulated sidecars of 20 services joined" in text
    assert "settled on version" in text and "shows all 20 ACKed" in text
    assert text.count("ACK at the control plane") == 2  # one line per change, all 20 ACKed
    assert "2 changes x 20 ACKs" in text
    assert all(not p.alive() for p in group.procs)  # run stops what it started
