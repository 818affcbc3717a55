"""meshctl's observability commands against real control planes on loopback:

* ``traces`` and ``trace ID`` after spans of three services were exported to the control
  plane's embedded OTLP receiver by the OpenTelemetry SDK's ``OTLPSpanExporter`` over mTLS,
  with meshctl's admin credentials (as any OTLP client would);
* ``topology`` (table with golden signals, ``-o dot``, ``--svg``, ``--png``, Graphviz
  missing) and ``top --iterations`` on a control plane with registered dynamic sidecars that
  carried calls (the ``Mesh`` of the discovery tests).

``tap`` end to end is in test_observability.py (with the demo); its line format is unit
tested.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.meshtest import echo_pb2
from tests.integration.test_control_plane import ControlPlaneProc, meshctl, start_cp
from tests.integration.test_discovery import Mesh, stub
from tests.support import procs
from tests.support.sidecar import REPO_ROOT

pytestmark = pytest.mark.timeout(120)

MS = 1_000_000  # ns


# ------------------------------------------------------------------------------ traces
@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProc]:
    base = tmp_path_factory.mktemp("observe-cp")
    c = start_cp(base / "ca", base / "data", "--otlp-listen", "127.0.0.1:0")
    try:
        assert c.proc.ready.get("otlp", "").startswith("127.0.0.1:"), c.proc.ready
        yield c
    finally:
        assert c.proc.stop() == 0, c.proc.log_tail()


class Exporter:
    """One TracerProvider per service (resource ``service.name``), each exporting every span
    as it ends (SimpleSpanProcessor) with the SDK's OTLP/gRPC exporter over mTLS."""

    def __init__(self, cp: ControlPlaneProc) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        d = cp.ca_dir
        creds = grpc.ssl_channel_credentials(root_certificates=(d / "ca.pem").read_bytes(),
                                             private_key=(d / "admin-key.pem").read_bytes(),
                                             certificate_chain=(d / "admin.pem").read_bytes())
        self.providers: dict[str, Any] = {}
        for service in ("order", "payment", "inventory", "gateway"):
            provider = TracerProvider(resource=Resource.create({"service.name": service}))
            provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(
                endpoint=cp.proc.ready["otlp"], credentials=creds, insecure=False,
                timeout=10)))
            self.providers[service] = provider

    def tracer(self, service: str) -> Any:
        return self.providers[service].get_tracer("meshctl-test")

    def close(self) -> None:
        for p in self.providers.values():
            p.shutdown()


def export_saga(ex: Exporter, t0_ns: int) -> str:
    """order SERVER (0..100 ms) -> order CLIENT to payment (10..60 ms, UNAVAILABLE, a retry
    event at 30 ms) -> payment SERVER (35..55 ms); order CLIENT to inventory (70..90 ms).
    Returns the trace id (32 hex digits)."""
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    def at(ms: float) -> int:
        return t0_ns + int(ms * MS)

    order, payment, inventory = (ex.tracer(s) for s in ("order", "payment", "inventory"))
    root = order.start_span("/order.Order/Create", kind=SpanKind.SERVER, start_time=at(0),
                            attributes={"rpc.method": "/order.Order/Create",
                                        "rpc.grpc.status_code": 0})
    ctx = trace.set_span_in_context(root)
    pay = order.start_span("/pay.Payment/Charge", context=ctx, kind=SpanKind.CLIENT,
                           start_time=at(10), attributes={"rpc.grpc.status_code": 14})
    pay.add_event("retry", {"attempt": 2, "reason": "UNAVAILABLE"}, timestamp=at(30))
    served = payment.start_span("/pay.Payment/Charge", context=trace.set_span_in_context(pay),
                                kind=SpanKind.SERVER, start_time=at(35),
                                attributes={"rpc.grpc.status_code": 0})
    served.end(end_time=at(55))
    pay.end(end_time=at(60))
    inv = order.start_span("/inv.Inventory/Reserve", context=ctx, kind=SpanKind.CLIENT,
                           start_time=at(70), attributes={"rpc.grpc.status_code": 0})
    inv.add_event("endpoint", {"address": "127.0.0.1:7001"}, timestamp=at(71))
    inv.end(end_time=at(90))
    root.end(end_time=at(100))
    return format(root.get_span_context().trace_id, "032x")


def export_plain(ex: Exporter, t0_ns: int) -> str:
    """One OK gateway span of 5 ms; returns its trace id."""
    from opentelemetry.trace import SpanKind

    span = ex.tracer("gateway").start_span("/gw.Gateway/Get", kind=SpanKind.SERVER,
                                           start_time=t0_ns,
                                           attributes={"rpc.grpc.status_code": 0})
    span.end(end_time=t0_ns + 5 * MS)
    return format(span.get_span_context().trace_id, "032x")


def traces_json(cp: ControlPlaneProc, *args: str) -> list[dict[str, Any]]:
    r = meshctl(cp, "traces", *args, "-o", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def exported(cp: ControlPlaneProc) -> dict[str, str]:
    """Two traces exported and listed: {"saga": id, "plain": id}."""
    ex = Exporter(cp)
    try:
        now = time.time_ns()
        ids = {"plain": export_plain(ex, now - 2000 * MS), "saga": export_saga(ex, now - 1000 * MS)}
    finally:
        ex.close()

    def listed() -> bool:
        got = {t["trace_id"]: t for t in traces_json(cp)}
        return ids["plain"] in got and got.get(ids["saga"], {}).get("spans") == 4

    procs.wait_for(listed, 20, interval_s=0.2, what="both exported traces listed")
    return ids


def test_traces_lists_the_exported_traces_newest_first(cp: ControlPlaneProc,
                                                       exported: dict[str, str]) -> None:
    rows = traces_json(cp)
    by_id = {t["trace_id"]: t for t in rows}
    saga = by_id[exported["saga"]]
    assert {k: saga[k] for k in ("root_service", "method", "status", "spans")} == {
        "root_service": "order", "method": "/order.Order/Create", "status": "OK", "spans": 4}
    assert abs(saga["duration_ms"] - 100.0) < 1.0, saga
    assert saga["error"] is True  # the payment call failed, the root did not
    assert by_id[exported["plain"]]["root_service"] == "gateway"
    ids = [t["trace_id"] for t in rows]
    assert ids.index(exported["saga"]) < ids.index(exported["plain"])  # newest first

    assert [t["trace_id"] for t in traces_json(cp, "--errors")] == [exported["saga"]]
    assert [t["trace_id"] for t in traces_json(cp, "--service", "payment")] == [
        exported["saga"]]
    assert len(traces_json(cp, "--limit", "1")) == 1

    table = meshctl(cp, "traces")
    assert table.returncode == 0, table.stderr
    assert exported["saga"] in table.stdout and "/order.Order/Create" in table.stdout
    assert "TRACE ID" in table.stdout and "ROOT SERVICE" in table.stdout


def test_trace_draws_the_waterfall_with_events_under_their_span(
        cp: ControlPlaneProc, exported: dict[str, str]) -> None:
    r = meshctl(cp, "trace", exported["saga"], "--width", "120")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"trace {exported['saga']}"), lines
    spans = [line for line in lines[2:] if "█" in line]
    assert [s.split()[:2] for s in spans] == [["order", "SERVER"], ["order", "CLIENT"],
                                              ["payment", "SERVER"], ["order", "CLIENT"]]
    assert [len(s) - len(s.lstrip()) for s in spans] == [0, 2, 4, 2]
    assert "UNAVAILABLE" in spans[1] and "/inv.Inventory/Reserve" in spans[3]
    after_pay = lines[lines.index(spans[1]) + 1]
    assert "+30.00ms retry attempt=2 reason=UNAVAILABLE" in after_pay, lines
    assert "+71.00ms endpoint address=127.0.0.1:7001" in lines[lines.index(spans[3]) + 1]
    bars = [s.index("█") if "◆" not in s[:s.index("█")] else s.index("◆") for s in spans]
    assert bars == sorted(bars) and len(set(bars)) == 4, bars

    by_prefix = meshctl(cp, "trace", exported["saga"][:8], "--width", "120")
    assert by_prefix.returncode == 0 and by_prefix.stdout == r.stdout, by_prefix.stderr

    doc = json.loads(meshctl(cp, "trace", exported["saga"], "-o", "json").stdout)
    assert doc["summary"]["trace_id"] == exported["saga"]
    assert [(s["depth"], s["service"], s["kind"]) for s in doc["spans"]] == [
        (0, "order", "SERVER"), (1, "order", "CLIENT"), (2, "payment", "SERVER"),
        (1, "order", "CLIENT")]
    assert [e["name"] for e in doc["spans"][1]["events"]] == ["retry"]


def test_an_unknown_trace_is_one_line_and_exit_1(cp: ControlPlaneProc,
                                                 exported: dict[str, str]) -> None:
    unknown = "0123456789abcdef0123456789abcdef"
    assert unknown not in exported.values()
    for arg in (unknown, unknown[:10]):
        r = meshctl(cp, "trace", arg)
        assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("meshctl: error: no trace")


# ------------------------------------------------------------------ topology and top
@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A control plane with echo (two replicas) and web (outbound only) that called echo."""
    m = Mesh(tmp_path_factory.mktemp("observe-mesh"))
    try:
        m.start("echo", "echo-1")
        m.start("echo", "echo-2")
        m.start("web", "web-1", app=False)
        procs.wait_for(lambda: m.all_synced({"echo-1", "echo-2", "web-1"}), 20,
                       what="every sidecar registered and SYNCED")
        ch, st = stub(m, "echo")
        with ch:
            for _ in range(30):
                st.Unary(echo_pb2.EchoRequest(payload=b"t"), timeout=5)

        def edge_reported() -> bool:
            r = meshctl(m.cp, "topology", "-o", "json")
            doc = json.loads(r.stdout)
            return any(e["source"] == "web" and e["destination"] == "echo"
                       and e["requests"] >= 30 for e in doc["edges"])

        procs.wait_for(edge_reported, 15, interval_s=0.3, what="the web -> echo edge")
        yield m
    finally:
        m.close()


def test_topology_json_and_table_carry_golden_signals(mesh: Mesh) -> None:
    r = meshctl(mesh.cp, "topology", "-o", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    services = {s["name"]: s for s in doc["services"]}
    assert set(services) == {"echo", "web"}
    echo = services["echo"]
    assert echo["requests"] >= 30 and echo["rps"] > 0 and echo["success_rate"] == 1.0, echo
    assert 0 < echo["p50_ms"] <= echo["p99_ms"], echo
    edge = next(e for e in doc["edges"] if (e["source"], e["destination"]) == ("web", "echo"))
    assert edge["open_breakers"] == 0

    table = meshctl(mesh.cp, "topology")
    assert table.returncode == 0, table.stderr
    out = table.stdout
    for header in ("RPS", "SUCCESS", "P99 MS", "OPEN BREAKERS", "HEALTH"):
        assert header in out, out
    echo_row = next(line for line in out.splitlines() if line.split()[:1] == ["echo"])
    assert "2/2" in echo_row and "100.0%" in echo_row, out


def test_topology_dot_svg_and_png_name_every_service(mesh: Mesh, tmp_path: Path) -> None:
    r = meshctl(mesh.cp, "topology", "-o", "dot")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("digraph") and '"web" -> "echo"' in r.stdout, r.stdout
    assert '"echo" [' in r.stdout and '"web" [' in r.stdout

    svg = tmp_path / "mesh.svg"
    r = meshctl(mesh.cp, "topology", "--svg", str(svg))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [line for line in r.stdout.splitlines() if str(svg) in line]
    assert len(r.stdout.splitlines()) == 1
    text = svg.read_text()
    assert "<svg" in text and ">echo<" in text and ">web<" in text, text[:500]

    png = tmp_path / "mesh.png"
    r = meshctl(mesh.cp, "topology", "--png", str(png))
    assert r.returncode == 0 and str(png) in r.stdout, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_topology_picture_without_graphviz_is_one_clear_line(mesh: Mesh,
                                                            tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path / "no-bin"), "MESH_CONTROL_PLANE": mesh.cp.api,
           "MESH_CERTS_DIR": str(mesh.cp.ca_dir)}
    r = subprocess.run([sys.executable, "-m", "control_plane.meshctl", "topology", "--svg",
                        str(tmp_path / "x.svg")], env=env, cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "Graphviz" in r.stderr and not (tmp_path / "x.svg").exists()


def test_top_prints_each_refresh_when_not_a_terminal(mesh: Mesh) -> None:
    r = meshctl(mesh.cp, "top", "--iterations", "1")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.count("services at") == 1 and "edges (last" in out, out
    for header in ("SERVICE", "INSTANCES", "RPS", "SUCCESS", "P50 MS", "P99 MS", "SOURCE",
                   "DESTINATION", "OPEN BREAKERS"):
        assert header in out, out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in
            (["echo"], ["web"])}
    assert "2/2" in rows["echo"] and "100.0%" in rows["echo"], out
    assert "web" in rows and any(line.split()[:3] == ["web", "->", "echo"]
                                 for line in out.splitlines()), out

    started = time.monotonic()
    r = meshctl(mesh.cp, "top", "--iterations", "2", "--interval", "0.5")
    assert r.returncode == 0 and r.stdout.count("services at") == 2, r.stdout
    assert time.monotonic() - started >= 0.5
