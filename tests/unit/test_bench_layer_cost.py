"""The layer-cost bench's pure parts, without processes: every runtime switch really changes
the snapshot the control plane would build (so an "off" run never measures the "on" config),
and the in-process harness drives the real outbound and inbound stacks over the mesh-all
snapshot, reports a finite cost for each always-present layer, and refuses a snapshot under
which its synthetic calls would not reach a pool."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from bench import layer_cost
from bench.layer_cost import IN_PROCESS_LAYERS, SWITCHES, LayerPlan, inprocess_costs
from bench.mesh_full import ALL_ON, CLIENT_ID, MeshConfig
from bench.procs import BenchError
from mesh_common.config import Document, compile_authz, compile_routes, plan_apply
from mesh_common.snapshot import Cluster, Endpoint, Snapshot

ECHO_EP = Endpoint("127.0.0.1", 15006, "spiffe://mesh.local/service/echo", "echo-1")


def snapshot_of(cfg: MeshConfig) -> Snapshot:
    """What the control plane would push for ``cfg`` with one echo endpoint."""
    docs = [Document("bench", i + 1, json.loads(json.dumps(d))) for i, d in enumerate(cfg.apply)]
    objects = [o for o in plan_apply((), docs).objects
               if (o.kind, o.name) not in set(cfg.absent)]
    routes, _ = compile_routes(objects, ["echo"])
    return Snapshot("1", clusters=(Cluster("echo", (ECHO_EP,)),), routes=routes,
                    authz=compile_authz(objects, cfg.authz_default))


def test_every_runtime_switch_changes_the_snapshot() -> None:
    on = snapshot_of(ALL_ON).content_hash()
    for sw in SWITCHES:
        assert snapshot_of(sw.off).content_hash() != on, sw.layer
    route = snapshot_of(ALL_ON).route("echo")
    assert route is not None and route.rules and route.load_balancer == "peak_ewma"
    assert route.timeout_ms == 10_000 and route.retries.max_attempts == 3
    assert snapshot_of(ALL_ON).authz.default == "deny"


def tiny() -> LayerPlan:
    return LayerPlan(rounds=1, requests=10, clients=1, streams=1, inproc_rounds=2, inproc_calls=200)


def test_in_process_costs_cover_each_always_present_layer() -> None:
    rows = inprocess_costs({"on": snapshot_of(ALL_ON).to_doc()}, tiny(), log=lambda _: None)
    assert [r.layer for r in rows] == list(IN_PROCESS_LAYERS)
    for r in rows:
        assert r.method == layer_cost.IN_PROCESS and r.where == "both"
        numbers = [v for k, v in r.detail.items() if k != "spans_to"]
        for v in (r.on_us, r.off_us, r.cost_us, *r.rounds_cost_us, *numbers):
            assert isinstance(v, float) and math.isfinite(v), r
        assert r.layer != "trace" or r.detail["spans_to"] == "memory"
        assert len(r.rounds_cost_us) == 2
        assert r.on_us > 0 and r.off_us > 0


def test_in_process_rows_for_config_layers_compare_the_on_and_off_snapshots() -> None:
    snapshots = {"on": snapshot_of(ALL_ON).to_doc()}
    snapshots |= {sw.layer: snapshot_of(sw.off).to_doc() for sw in SWITCHES}
    rows = inprocess_costs(snapshots, tiny(), log=lambda _: None)
    companions = {r.layer: r for r in rows if r.layer.endswith(layer_cost.IN_PROCESS_SUFFIX)}
    assert set(companions) == {sw.layer + layer_cost.IN_PROCESS_SUFFIX for sw in SWITCHES}
    authz = companions["authorization (deny default + policy)" + layer_cost.IN_PROCESS_SUFFIX]
    assert authz.where == "echo" and authz.method == layer_cost.IN_PROCESS_SNAPSHOT
    for r in companions.values():
        assert math.isfinite(r.cost_us) and r.on_us > 0 and r.off_us > 0, r


def test_in_process_refuses_a_snapshot_whose_calls_would_be_denied() -> None:
    deny_client: dict[str, Any] = snapshot_of(ALL_ON).to_doc()
    deny_client["authz"]["policies"][0]["rules"][0]["sources"] = ["spiffe://mesh.local/service/other"]
    assert CLIENT_ID not in json.dumps(deny_client)
    with pytest.raises(BenchError, match=r"inbound \(on\) stack answered .*may not call"):
        inprocess_costs({"on": deny_client}, tiny(), log=lambda _: None)
