"""The demo launcher's and load generator's pure parts: settings from the environment, the
order processes stop in, when the mesh counts as synced, the load mix and its counts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from demo_services.launcher.admin import sync_gaps
from demo_services.launcher.settings import SettingsError, from_env
from demo_services.launcher.state import DemoState, ProcessRecord
from demo_services.launcher.up import stop_groups
from demo_services.loadgen.mix import SCARCE, Mix
from demo_services.loadgen.tally import Tally, reason_kind
from protos.mesh.v1 import control_pb2 as pb


def test_settings_default_to_what_meshctl_expects(tmp_path: Path) -> None:
    s = from_env({}, cwd=tmp_path)
    assert (s.api, s.bootstrap) == ("127.0.0.1:15010", "127.0.0.1:15011")
    assert s.dir == tmp_path / ".mesh" and s.ca_dir == tmp_path / "certs"
    assert s.state_path == tmp_path / ".mesh" / "state.json"
    assert s.db_path("payment") == tmp_path / ".mesh" / "data" / "payment.sqlite"


def test_settings_move_by_environment_and_refuse_bad_values(tmp_path: Path) -> None:
    s = from_env({"MESH_DEMO_DIR": "/x/run", "MESH_CONTROL_PLANE": "127.0.0.1:1234",
                  "MESH_DEMO_RPS": "2.5", "MESH_DEMO_LEASE_S": "1"}, cwd=tmp_path)
    assert (s.dir, s.api, s.rps, s.lease_s) == (Path("/x/run"), "127.0.0.1:1234", 2.5, 1.0)
    with pytest.raises(SettingsError, match="MESH_DEMO_RPS: not a number"):
        from_env({"MESH_DEMO_RPS": "fast"})
    with pytest.raises(SettingsError, match="MESH_DEMO_BOOTSTRAP: expected HOST:PORT"):
        from_env({"MESH_DEMO_BOOTSTRAP": "15011"})
    with pytest.raises(SettingsError, match="MESH_DEMO_LEASE_S: at least"):
        from_env({"MESH_DEMO_LEASE_S": "0"})
    with pytest.raises(SettingsError, match="MESH_DEMO_TRACE_SAMPLE_RATE: at most 1"):
        from_env({"MESH_DEMO_TRACE_SAMPLE_RATE": "1.5"})
    with pytest.raises(SettingsError, match="MESH_DEMO_ADMIN_HTTP: expected HOST:PORT"):
        from_env({"MESH_DEMO_ADMIN_HTTP": "dashboard"})


@pytest.mark.parametrize("name", ["MESH_DEMO_RPS", "MESH_DEMO_LEASE_S", "MESH_DEMO_REPORT_INTERVAL_S",
                                  "MESH_DEMO_HEALTH_INTERVAL_S", "MESH_DEMO_GRACE_PERIOD_S",
                                  "MESH_DEMO_REPORT_WINDOW_S", "MESH_DEMO_READY_TIMEOUT_S",
                                  "MESH_DEMO_STOP_TIMEOUT_S", "MESH_DEMO_DRAIN_TIMEOUT_S",
                                  "MESH_DEMO_TRACE_SAMPLE_RATE", "MESH_DEMO_EWMA_DECAY_S"])
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", " NaN "])
def test_numeric_settings_refuse_nan_and_inf(name: str, bad: str) -> None:
    with pytest.raises(SettingsError, match=f"^{name}: not a finite number: '{bad.strip()}'$"):
        from_env({name: bad})


def test_the_sidecars_peak_ewma_decay_is_a_setting_above_zero(tmp_path: Path) -> None:
    assert from_env({}, cwd=tmp_path).ewma_decay_s == 10.0
    assert from_env({"MESH_DEMO_EWMA_DECAY_S": "2"}).ewma_decay_s == 2.0
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SettingsError, match="MESH_DEMO_EWMA_DECAY_S: "):
            from_env({"MESH_DEMO_EWMA_DECAY_S": bad})


def test_the_demo_observes_everything_by_default(tmp_path: Path) -> None:
    s = from_env({}, cwd=tmp_path)
    assert (s.admin_http, s.otlp, s.trace_sample_rate) == ("127.0.0.1:15014",
                                                           "127.0.0.1:15012", 1.0)
    assert from_env({"MESH_DEMO_TRACE_SAMPLE_RATE": "0.25"}).trace_sample_rate == 0.25


def _rec(role: str, service: str, instance: str = "") -> ProcessRecord:
    return ProcessRecord(role, service, instance, 1, "", [], 0)


def test_load_stops_first_and_the_control_plane_last() -> None:
    st = DemoState("", "", "", "", {}, {}, 0.0, processes=[
        _rec("control-plane", ""), _rec("app", "payment", "payment-1"),
        _rec("app", "order", "order-1"), _rec("sidecar", "order", "order-1"),
        _rec("sidecar", "loadgen", "loadgen-1"), _rec("loadgen", "loadgen", "loadgen-1")])
    order = [[(p.role, p.service) for p in g] for g in stop_groups(st)]
    assert order == [[("loadgen", "loadgen")], [("app", "order")], [("app", "payment")],
                     [("sidecar", "order"), ("sidecar", "loadgen")], [("control-plane", "")]]


def _status(instance: str, state: str = "SYNCED", connected: bool = True) -> pb.SidecarStatus:
    return pb.SidecarStatus(instance=instance, state=state, connected=connected)


def _snapshot(**services: dict[str, bool]) -> dict:
    return {"clusters": [{"name": name, "endpoints": [{"instance": i, "healthy": h}
                                                      for i, h in eps.items()]}
                         for name, eps in services.items()]}


def test_the_mesh_is_ready_only_when_every_sidecar_holds_every_healthy_replica() -> None:
    want = {"pay": {"pay-1", "pay-2"}}
    full = _snapshot(pay={"pay-1": True, "pay-2": True})
    assert sync_gaps([_status("pay-1"), _status("lg-1")], {"pay-1", "lg-1"},
                     {"pay-1": full, "lg-1": full}, want) == []
    gaps = sync_gaps([_status("pay-1", "STALE"), _status("lg-1")], {"pay-1", "lg-1", "x-1"},
                     {"lg-1": _snapshot(pay={"pay-1": True})}, want)
    assert gaps == ["lg-1: pay endpoints ['pay-1']", "pay-1: STALE", "x-1: not registered"]
    sick = _snapshot(pay={"pay-1": True, "pay-2": False})
    assert sync_gaps([_status("lg-1")], {"lg-1"}, {"lg-1": sick}, want) == [
        "lg-1: pay unhealthy ['pay-2']"]


def test_the_mix_exercises_every_path_and_resends_the_same_body() -> None:
    mix = Mix(random.Random(7), run_id="r")
    sends = [p for _ in range(2000) for p in mix.next()]
    new = {p.request_id: p for p in sends if not p.resend}
    customers = {p.customer for p in new.values()}
    assert {"cust-broke", "cust-thrifty"} <= customers and len(customers) > 10
    assert any(sku in SCARCE for p in new.values() for sku, _ in p.items)
    resends = [p for p in sends if p.resend]
    assert 0.05 < len(resends) / len(sends) < 0.2
    for p in resends:
        first = new[p.request_id]
        assert (p.customer, p.items) == (first.customer, first.items)
    assert len(new) == len({p.request_id for p in sends})
    assert Mix(random.Random(7), run_id="r").next() == [sends[0]]


def test_a_failed_call_is_sent_again_with_its_request_id_first() -> None:
    mix = Mix(random.Random(1), run_id="r")
    first = mix.next()[0]
    mix.again(first)
    again = mix.next()
    assert [(p.request_id, p.resend) for p in again] == [(first.request_id, True)]


def test_the_tally_counts_orders_not_calls_and_sees_idempotency_broken() -> None:
    t = Tally(started_at=0.0)
    for resend in (False, True, False):
        t.on_send(resend, 1.0)
    t.on_answer("r1", "o1", "PENDING", "")
    t.on_answer("r1", "o1", "CONFIRMED", "")           # the re-send's answer
    t.on_answer("r2", "o2", "CANCELLED", "out of stock: sku-truffle (want 2, have 1)")
    doc = t.snapshot(2.0)
    assert (doc["sent"], doc["resent"], doc["in_flight"]) == (2, 1, 0)
    assert (doc["confirmed"], doc["cancelled"], doc["pending"]) == (1, 1, 0)
    assert doc["cancel_reasons"] == {"out of stock": 1} and doc["mismatches"] == 0
    t.on_send(True, 2.0)
    t.on_answer("r2", "o2", "CONFIRMED", "")            # a terminal order changed its state
    t.on_send(True, 2.0)
    t.on_answer("r1", "o9", "CONFIRMED", "")            # the same request, another order
    t.on_send(False, 2.0)
    t.on_error("UNAVAILABLE")
    doc = t.snapshot(3.0)
    assert doc["mismatches"] == 2 and doc["errors"] == {"UNAVAILABLE": 1}
    assert (doc["confirmed"], doc["cancelled"], doc["in_flight"]) == (1, 1, 0)
    assert reason_kind("insufficient funds: cust-broke has 0") == "insufficient funds"


def test_free_ports_are_distinct_and_outside_the_ephemeral_range() -> None:
    from demo_services.launcher import procs as launcher_procs

    low, high = launcher_procs._ephemeral_range()
    ports = launcher_procs.free_ports(20)
    assert len(set(ports)) == 20
    assert all(not low <= p <= high for p in ports), ports
