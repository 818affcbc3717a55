"""Observability with the demo running (one demo shared by this module): the topology and
its golden signals, Prometheus metrics of sidecars and of the control plane, traces across
the saga's sidecars (with a retry's event), the method label's cap, the topology picture,
``meshctl tap`` and ``top``, the dashboard page and the access logs.

The tests run in file order; the fault and sickness tests come last and heal what they broke.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.mesh.v1 import control_pb2 as pb
from protos.mesh.v1 import control_pb2_grpc as pb_grpc
from protos.order import order_pb2
from tests.support import procs
from tests.support.demo import Demo, demo_env, running_demo
from tests.support.sidecar import REPO_ROOT

pytestmark = pytest.mark.timeout(180)

SAGA_EDGES = {("loadgen", "order"), ("order", "payment"), ("order", "inventory")}
SERVICES = ("loadgen", "order", "payment", "inventory")
WINDOW_S = 8
"""The control plane's report window (s): the topology's figures cover this much."""


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    base = tmp_path_factory.mktemp("observe")
    env = {**demo_env(base, rps=8, lease_s=1.5), "MESH_DEMO_REPORT_WINDOW_S": str(WINDOW_S)}
    with running_demo(base, env) as d:
        yield d


def meshctl(demo: Demo, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return demo.cli("control_plane.meshctl", *args, timeout_s=timeout_s)


def meshctl_json(demo: Demo, *args: str) -> Any:
    r = meshctl(demo, *args, "-o", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def http_get(address: str, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of GET http://address/path."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def families(text: str) -> dict[str, Any]:
    """The metric families of a Prometheus text exposition, by name (the parser raises on
    malformed text)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams: dict[str, Any], family: str, sample: str | None = None) -> list[Any]:
    fam = fams.get(family)
    assert fam is not None, f"no metric family {family} in {sorted(fams)}"
    return [s for s in fam.samples if sample is None or s.name == sample]


def new_traceparent() -> tuple[str, str]:
    """A sampled W3C traceparent of a new trace, and its trace id."""
    trace_id = secrets.token_hex(16)
    return f"00-{trace_id}-{secrets.token_hex(8)}-01", trace_id


def create_order(demo: Demo, traceparent: str | None = None) -> order_pb2.OrderView:
    metadata = [("traceparent", traceparent)] if traceparent else None
    return demo.order().CreateOrder(order_pb2.CreateOrderRequest(
        request_id=f"observe-{uuid.uuid4().hex}", customer="cust-01",
        items=[order_pb2.Item(sku="sku-apple", quantity=1)]), timeout=10, metadata=metadata)


def edges(demo: Demo) -> dict[tuple[str, str], dict[str, Any]]:
    doc = meshctl_json(demo, "topology")
    return {(e["source"], e["destination"]): e for e in doc["edges"]}


def admin_http(demo: Demo) -> str:
    address = demo.state.control_plane.get("admin_http", "")
    assert address, f"state.json names no admin_http: {demo.state.control_plane}"
    return address


def admin_channel(demo: Demo) -> grpc.Channel:
    """The control plane's API with meshctl's credentials (in-process: quicker than meshctl
    for polling)."""
    d = Path(demo.env["MESH_CERTS_DIR"])
    creds = grpc.ssl_channel_credentials(root_certificates=(d / "ca.pem").read_bytes(),
                                         private_key=(d / "admin-key.pem").read_bytes(),
                                         certificate_chain=(d / "admin.pem").read_bytes())
    return grpc.secure_channel(demo.env["MESH_CONTROL_PLANE"], creds)


def sidecar_admin(demo: Demo, instance: str) -> str:
    return demo.state.one("sidecar", instance=instance).admin


def trace_doc(demo: Demo, trace_id: str) -> dict[str, Any] | None:
    r = meshctl(demo, "trace", trace_id, "-o", "json")
    return json.loads(r.stdout) if r.returncode == 0 else None


def span_services(doc: dict[str, Any] | None) -> set[str]:
    return {s["service"] for s in (doc or {}).get("spans", [])}


# ----------------------------------------------------------------------------- topology
def test_every_edge_of_the_saga_has_traffic_and_plausible_figures(demo: Demo) -> None:
    def ready() -> bool:
        got = edges(demo)
        return all(got.get(e, {}).get("rps", 0) > 0 for e in SAGA_EDGES)
    procs.wait_for(ready, 30, what="every saga edge with rps > 0")
    doc = meshctl_json(demo, "topology")
    for edge in doc["edges"]:
        if (edge["source"], edge["destination"]) not in SAGA_EDGES:
            continue
        assert 0 < edge["rps"] < 200, edge
        assert 0.5 <= edge["success_rate"] <= 1, edge
        assert 0 < edge["p50_ms"] <= edge["p99_ms"] < 10_000, edge
    services = {s["name"]: s for s in doc["services"]}
    for name in ("order", "payment", "inventory"):
        assert services[name]["rps"] > 0 and 0.5 <= services[name]["success_rate"] <= 1, \
            services[name]
    r = meshctl(demo, "topology")  # the table names the services and their signals
    assert r.returncode == 0 and all(s in r.stdout for s in SERVICES), r.stdout + r.stderr


def test_topology_picture_names_every_service(demo: Demo, tmp_path: Path) -> None:
    r = meshctl(demo, "topology", "-o", "dot")
    assert r.returncode == 0 and r.stdout.lstrip().startswith("digraph"), r.stderr
    svg = tmp_path / "mesh.svg"
    r = meshctl(demo, "topology", "--svg", str(svg))
    assert r.returncode == 0, r.stderr
    text = svg.read_text()
    assert "<svg" in text
    for service in SERVICES:
        assert service in text, service
    png = tmp_path / "mesh.png"
    r = meshctl(demo, "topology", "--png", str(png))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes().startswith(b"\x89PNG")


def test_top_prints_services_and_edges(demo: Demo) -> None:
    r = meshctl(demo, "top", "--iterations", "1", "--interval", "0.5")
    assert r.returncode == 0, r.stderr
    for service in ("order", "payment", "inventory"):
        assert service in r.stdout


# ----------------------------------------------------------------------------- metrics
def test_sidecar_metrics_parse_and_count_the_saga(demo: Demo) -> None:
    order_side = sidecar_admin(demo, "order-1")

    def outbound_to_payment() -> float:
        status, ctype, body = http_get(order_side, "/metrics")
        assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
        fams = families(body)
        return sum(s.value for s in samples(fams, "mesh_requests", "mesh_requests_total")
                   if s.labels.get("direction") == "outbound"
                   and s.labels.get("destination") == "payment"
                   and s.labels.get("grpc_code") == "OK")
    procs.wait_for(lambda: outbound_to_payment() > 0, 30, what="order-1 → payment counted")
    status, _, body = http_get(order_side, "/metrics")
    fams = families(body)
    inbound = [s for s in samples(fams, "mesh_requests", "mesh_requests_total")
               if s.labels.get("direction") == "inbound"]
    assert inbound and {s.labels["destination"] for s in inbound} == {"order"}
    assert {s.labels["source"] for s in inbound} <= {"loadgen", "order"}
    buckets = samples(fams, "mesh_request_duration_seconds",
                      "mesh_request_duration_seconds_count")
    assert sum(s.value for s in buckets) > 0
    assert sum(s.value for s in samples(fams, "mesh_spans_exported",
                                        "mesh_spans_exported_total")) > 0
    for name in ("mesh_certificate_expiry_timestamp_seconds", "mesh_snapshot_version"):
        assert samples(fams, name), name
        assert all(s.value > 0 for s in samples(fams, name)), name


def test_control_plane_metrics_parse(demo: Demo) -> None:
    status, ctype, body = http_get(admin_http(demo), "/metrics")
    assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
    fams = families(body)
    connected = sum(s.value for s in samples(fams, "mesh_cp_connected_sidecars"))
    assert connected == len(demo.state.find("sidecar"))
    assert sum(s.value for s in samples(fams, "mesh_cp_snapshot_pushes",
                                        "mesh_cp_snapshot_pushes_total")) > 0
    assert sum(s.value for s in samples(fams, "mesh_cp_push_ack_seconds",
                                        "mesh_cp_push_ack_seconds_count")) > 0
    assert sum(s.value for s in samples(fams, "mesh_cp_certificates_issued",
                                        "mesh_cp_certificates_issued_total")) >= 7


def test_unknown_methods_fold_into_other(demo: Demo) -> None:
    bogus = [f"/order.Order/Probe{secrets.token_hex(4)}" for _ in range(20)]
    for method in bogus:
        call = demo.channel("order").unary_unary(method)
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    lg_side = sidecar_admin(demo, "loadgen-1")

    def other_count() -> float:
        fams = families(http_get(lg_side, "/metrics")[2])
        return sum(s.value for s in samples(fams, "mesh_requests", "mesh_requests_total")
                   if s.labels.get("method") == "other"
                   and s.labels.get("grpc_code") == "UNIMPLEMENTED")
    procs.wait_for(lambda: other_count() >= len(bogus), 10, what="the probes counted as other")
    body = http_get(lg_side, "/metrics")[2]
    assert not any(m in body for m in bogus)
    assert "/order.Order/CreateOrder" in body  # a real method keeps its own label


# ----------------------------------------------------------------------------- traces
def test_one_create_order_traces_through_order_inventory_and_payment(demo: Demo) -> None:
    traceparent, trace_id = new_traceparent()
    view = create_order(demo, traceparent)
    assert view.order_id

    def complete() -> bool:
        return {"loadgen", "order", "inventory", "payment"} <= span_services(
            trace_doc(demo, trace_id))
    procs.wait_for(complete, 30, what=f"trace {trace_id} with spans of every service")
    doc = trace_doc(demo, trace_id)
    assert doc is not None
    spans = doc["spans"]
    assert {s["trace_id"] for s in spans} == {trace_id}
    by_id = {s["span_id"]: s for s in spans}
    kinds = {(s["service"], s["kind"]) for s in spans}
    assert {("loadgen", "CLIENT"), ("order", "SERVER"), ("order", "CLIENT"),
            ("payment", "SERVER"), ("inventory", "SERVER")} <= kinds
    for s in spans:  # every inbound span is the child of the caller's outbound span
        if s["kind"] == "SERVER":
            parent = by_id.get(s["parent_span_id"])
            assert parent is not None and parent["kind"] == "CLIENT", s
    listed = meshctl_json(demo, "traces", "--service", "payment", "--limit", "200")
    assert trace_id in {t["trace_id"] for t in listed}
    for t in listed:
        assert {"trace_id", "root_service", "method", "duration_ms", "status", "spans"} <= set(t)
    r = meshctl(demo, "trace", trace_id)  # the waterfall names the services
    assert r.returncode == 0 and all(s in r.stdout for s in ("order", "payment")), r.stderr


def test_access_logs_carry_the_trace_id(demo: Demo) -> None:
    traceparent, trace_id = new_traceparent()
    create_order(demo, traceparent)
    logs = Path(demo.state.logs_dir)

    def lines_with_trace() -> list[dict[str, Any]]:
        out = []
        for path in logs.glob("*.access.jsonl"):
            for line in path.read_text().splitlines():
                if trace_id in line:
                    out.append(json.loads(line))
        return out
    procs.wait_for(lambda: len(lines_with_trace()) >= 2, 15, what="access log lines")
    for rec in lines_with_trace():
        assert rec["trace_id"] == trace_id
        assert {"time", "direction", "source", "destination", "method", "status",
                "latency_ms"} <= set(rec)


# ----------------------------------------------------------------------------- tap, dashboard
def test_tap_shows_calls_as_they_happen(demo: Demo) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "control_plane.meshctl", "tap", "payment",
                             "--duration", "20", "--max", "3", "-o", "json"], env=demo.env,
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(events) == 3, out
    now = time.time()
    for ev in events:
        assert "payment" in (ev["source"], ev["destination"]), ev
        assert ev["method"].startswith("/payment."), ev
        assert now - 30 < ev["time_unix"] <= now + 1, ev


def test_dashboard_page_answers(demo: Demo) -> None:
    address = admin_http(demo)
    status, ctype, body = http_get(address, "/")
    assert status == 200 and ctype.startswith("text/html"), (status, ctype)
    assert "<html" in body.lower()
    status, ctype, body = http_get(address, "/api/topology")
    assert status == 200 and "json" in ctype
    assert {s["name"] for s in json.loads(body)["services"]} >= {"order", "payment"}
    status, ctype, body = http_get(address, "/topology.svg")
    assert status == 200 and "svg" in ctype and "payment" in body
    assert http_get(address, "/no-such-page")[0] == 404


# ----------------------------------------------------------------------------- decisions
def test_a_retried_call_shows_its_retry_event(demo: Demo, tmp_path: Path) -> None:
    """payment-1 fails every call: the order sidecars retry its calls on payment-2 (until
    outlier detection ejects it), and the traces of those orders carry the retry event.
    Round robin for the test: peak-EWMA, rightly, might never pick the replica that lost."""
    policy = tmp_path / "payment-rr.yaml"
    policy.write_text("kind: TrafficPolicy\nname: payment\nspec:\n  service: payment\n"
                      "  load_balancer: round_robin\n")
    r = meshctl(demo, "apply", "-f", str(policy))
    assert r.returncode == 0, r.stderr
    payment1 = demo.app("payment-1")
    lg = demo.state.one("loadgen")
    demo.control(lg, "POST", "/pause", {})  # only this test's orders reach payment now
    demo.control(payment1, "POST", "/sickness", {"error_rate": 1.0,
                                                  "error_code": "UNAVAILABLE"})
    channel = admin_channel(demo)
    admin = pb_grpc.AdminStub(channel)

    def retried(trace_id: str) -> bool:
        try:
            resp = admin.GetTrace(pb.GetTraceRequest(trace_id=trace_id), timeout=5)
        except grpc.RpcError:
            return False
        return any(ev.name == "retry" for span in resp.spans for ev in span.events)
    try:
        trace_ids = []
        for _ in range(12):
            traceparent, trace_id = new_traceparent()
            create_order(demo, traceparent)
            trace_ids.append(trace_id)
        procs.wait_for(lambda: any(retried(t) for t in trace_ids), 30,
                       what="a trace with a retry event")
    finally:
        demo.control(payment1, "DELETE", "/sickness")
        demo.control(lg, "POST", "/resume", {})
        channel.close()
        r = meshctl(demo, "delete", "trafficpolicy", "payment")
        assert r.returncode == 0, r.stderr


def test_an_injected_abort_shows_on_exactly_that_edge(demo: Demo) -> None:
    r = meshctl(demo, "fault", "inject", "payment", "--abort", "UNAVAILABLE", "--percent", "100")
    assert r.returncode == 0, r.stderr
    try:
        procs.wait_for(lambda: edges(demo).get(("order", "payment"), {}).get(
            "success_rate", 1) < 0.3, 45, what="order → payment success rate falling")
        got = edges(demo)  # the others keep their usual rate (business refusals aside)
        assert got[("order", "inventory")]["success_rate"] > 0.6, got
        assert got[("loadgen", "order")]["success_rate"] > 0.6, got
    finally:
        r = meshctl(demo, "fault", "clear", "payment")
        assert r.returncode == 0, r.stderr
