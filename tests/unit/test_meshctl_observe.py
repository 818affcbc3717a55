"""meshctl's observability commands without a control plane: the trace waterfall drawn from a
hand-built GetTraceResponse, a tap event's line and JSON, the topology rows, and argument
errors (one line on stderr, non-zero exit, before any connection)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from control_plane import meshctl_observe as mo
from control_plane import waterfall as wf
from control_plane.meshctl import cli
from control_plane.topology_render import topology_doc
from protos.mesh.v1 import control_pb2 as pb
from tests.support.sidecar import REPO_ROOT

T0 = 1_700_000_000_000_000_000  # ns since the epoch
MS = 1_000_000                  # ns
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def span(span_id: str, parent: str, service: str, kind: str, name: str, start_ms: float,
         end_ms: float, status: str = "OK", *events: tuple[float, str, dict]) -> pb.SpanInfo:
    return pb.SpanInfo(trace_id=TRACE, span_id=span_id, parent_span_id=parent, name=name,
                       service=service, kind=kind, start_unix_nano=T0 + int(start_ms * MS),
                       end_unix_nano=T0 + int(end_ms * MS), status=status,
                       error=status not in ("OK", "UNSET"), attributes_json="{}",
                       events=[pb.SpanEventInfo(time_unix_nano=T0 + int(at * MS), name=n,
                                                attributes_json=json.dumps(a))
                               for at, n, a in events])


def saga_trace() -> pb.GetTraceResponse:
    """order (SERVER, 0..100 ms) -> order's outbound to payment (CLIENT, 10..60 ms, retried)
    -> payment (SERVER, 35..55 ms); and order's call to inventory (CLIENT, 70..90 ms). Spans
    given out of order on purpose."""
    spans = [
        span("c" * 16, "b" * 16, "payment", "SERVER", "/pay.Payment/Charge", 35, 55),
        span("d" * 16, "a" * 16, "order", "CLIENT", "/inv.Inventory/Reserve", 70, 90, "OK",
             (71, "endpoint", {"address": "127.0.0.1:7001"})),
        span("a" * 16, "", "order", "SERVER", "/order.Order/Create", 0, 100),
        span("b" * 16, "a" * 16, "order", "CLIENT", "/pay.Payment/Charge", 10, 60,
             "UNAVAILABLE",
             (30, "retry", {"attempt": 2, "reason": "UNAVAILABLE"}),
             (12, "endpoint", {"address": "127.0.0.1:6001", "instance": "payment-1"})),
    ]
    summary = pb.TraceSummary(trace_id=TRACE, root_service="order", method="/order.Order/Create",
                              duration_ms=100.0, status="OK", spans=4, error=True,
                              start_unix=T0 / 1e9)
    return pb.GetTraceResponse(summary=summary, spans=spans)


def span_lines(lines: list[str]) -> list[str]:
    return [line for line in lines[2:] if wf.BAR in line or wf.EVENT_MARK in line]


# ----------------------------------------------------------------------------- waterfall
def test_span_rows_are_in_tree_order_with_depth_and_offsets() -> None:
    rows = wf.span_rows(saga_trace())
    assert [(r.depth, r.span_id[0], r.service) for r in rows] == [
        (0, "a", "order"), (1, "b", "order"), (2, "c", "payment"), (1, "d", "order")]
    b = rows[1]
    assert (b.offset_ms, b.duration_ms, b.status, b.error) == (10.0, 50.0, "UNAVAILABLE", True)
    assert [(e.offset_ms, e.name) for e in b.events] == [(12.0, "endpoint"), (30.0, "retry")]
    assert b.events[1].text == "retry attempt=2 reason=UNAVAILABLE"
    assert wf.extent_ms(rows) == 100.0


def test_waterfall_lines_indent_by_depth_and_put_events_under_their_span() -> None:
    lines = wf.render_lines(saga_trace(), 120)
    assert all(len(line) <= 120 for line in lines), lines
    assert lines[0].startswith(f"trace {TRACE}") and "4 spans" in lines[0]
    body = lines[2:]
    # One row per span, in tree order, indented two spaces per depth.
    rows = [line for line in body if wf.BAR in line]
    assert [r.split()[0:3] for r in rows] == [
        ["order", "SERVER", "/order.Order/Create"], ["order", "CLIENT", "/pay.Payment/Charge"],
        ["payment", "SERVER", "/pay.Payment/Charge"], ["order", "CLIENT",
                                                        "/inv.Inventory/Reserve"]]
    assert [len(r) - len(r.lstrip()) for r in rows] == [0, 2, 4, 2]
    assert "UNAVAILABLE" in rows[1] and "50.00ms" in rows[1] and "100.0ms" in rows[0]
    # Events come right after their span (before the next span), in time order, with their
    # offset from the trace start and their text.
    i = body.index(rows[1])
    assert "+12.00ms endpoint address=127.0.0.1:6001 instance=payment-1" in body[i + 1]
    assert "+30.00ms retry attempt=2 reason=UNAVAILABLE" in body[i + 2]
    assert body[i + 3] == rows[2]
    j = body.index(rows[3])
    assert "+71.00ms endpoint address=127.0.0.1:7001" in body[j + 1]
    assert body[i + 1].startswith("    " + wf.EVENT_PREFIX)  # indented below depth 1


def test_bars_sit_on_one_time_axis() -> None:
    lines = wf.render_lines(saga_trace(), 120)
    rows = [line for line in lines if wf.BAR in line]
    starts = []
    for r in rows:
        first = min(r.index(c) for c in (wf.BAR, wf.EVENT_MARK) if c in r)
        starts.append((first, len(r.rstrip()) - first))
    # Offsets 0, 10, 35, 70 ms: bar starts strictly increase; the root spans the axis.
    assert starts[0][0] < starts[1][0] < starts[2][0] < starts[3][0], starts
    root_start, root_len = starts[0]
    axis = root_len  # the root covers the whole 100 ms
    assert abs((starts[3][0] - root_start) - 0.7 * axis) <= 1, (starts, axis)
    assert abs(starts[1][1] - 0.5 * axis) <= 1  # 50 ms of 100
    # The retry event is marked on its span's bar.
    assert wf.EVENT_MARK in rows[1]


def test_bar_placement_is_monotonic_in_start_time() -> None:
    spans = [span(f"{i:016x}", "", "svc", "SERVER", "m", start, start + 5)
             for i, start in enumerate([40, 0, 13, 27, 90, 64, 5])]
    resp = pb.GetTraceResponse(summary=pb.TraceSummary(trace_id=TRACE), spans=spans)
    rows = wf.span_rows(resp)
    assert [r.offset_ms for r in rows] == sorted(r.offset_ms for r in rows)
    extent = wf.extent_ms(rows)
    cols = [wf.bar_span(r, extent, 50) for r in rows]
    assert [c[0] for c in cols] == sorted(c[0] for c in cols)
    assert all(n >= 1 and first + n <= 50 for first, n in cols)


def test_orphans_become_roots_and_a_narrow_width_still_fits() -> None:
    resp = pb.GetTraceResponse(spans=[
        span("e" * 16, "f" * 16, "inventory", "SERVER", "/inv.Inventory/Reserve", 5, 6),
        span("1" * 16, "", "gateway", "SERVER", "/x/" + "y" * 200, 0, 10)])
    rows = wf.span_rows(resp)
    assert [(r.depth, r.service) for r in rows] == [(0, "gateway"), (0, "inventory")]
    lines = wf.render_lines(resp, 60)
    assert all(len(line) <= 60 for line in lines[1:]), lines
    assert wf.render_lines(pb.GetTraceResponse(), 80)[-1] == "(no spans)"


def test_trace_doc_lists_spans_in_tree_order_with_events() -> None:
    doc = wf.trace_doc(saga_trace())
    assert doc["summary"]["trace_id"] == TRACE and doc["summary"]["spans"] == 4
    assert {s["trace_id"] for s in doc["spans"]} == {TRACE}
    assert [(s["depth"], s["service"]) for s in doc["spans"]] == [
        (0, "order"), (1, "order"), (2, "payment"), (1, "order")]
    assert doc["spans"][1]["events"][1] == {"offset_ms": 30.0, "name": "retry",
                                            "attributes": {"attempt": 2,
                                                           "reason": "UNAVAILABLE"}}
    json.dumps(doc)  # JSON-ready
    text = wf.render_rich(saga_trace(), 100)
    assert text.plain.splitlines() == wf.render_lines(saga_trace(), 100)


# -------------------------------------------------------------------------------- tap
def tap_event(**kw: object) -> pb.TapEvent:
    base = dict(time_unix=1_700_000_000.25, instance="order-1", direction="outbound",
                source="order", destination="payment", method="/pay.Payment/Charge",
                status="UNAVAILABLE", latency_ms=12.345, attempts=3, endpoint="127.0.0.1:6001",
                trace_id=TRACE, reason="retry 2: UNAVAILABLE; ejected 127.0.0.1:6002")
    base.update(kw)
    return pb.TapEvent(**base)  # type: ignore[arg-type]


def test_tap_line_shows_every_field_of_the_call_in_header_order() -> None:
    line = mo.tap_line(tap_event())
    assert line.startswith("22:13:20.250  order-1 ")
    fields = ["order-1", "outbound", "order -> payment", "/pay.Payment/Charge", "UNAVAILABLE",
              "12.35ms", " 3 ", "127.0.0.1:6001", "retry 2: UNAVAILABLE; ejected 127.0.0.1:6002"]
    positions = [line.index(f) for f in fields]
    assert positions == sorted(positions), line
    headers = ["INSTANCE", "DIR", "SOURCE -> DESTINATION", "METHOD", "STATUS", "ENDPOINT",
               "REASON"]
    assert [mo.TAP_HEADER.index(h) for h in headers] == [
        line.index(f) for f in ("order-1", "outbound", "order -> payment",
                                "/pay.Payment/Charge", "UNAVAILABLE", "127.0.0.1:6001",
                                "retry 2")]
    assert "\n" not in line
    bare = mo.tap_line(tap_event(source="", destination="", endpoint="", reason=""))
    assert "? -> -" in bare and bare == bare.rstrip()


def test_tap_json_is_one_object_with_the_events_fields() -> None:
    doc = mo.tap_doc(tap_event())
    assert doc["time"] == "2023-11-14T22:13:20.250Z"
    assert {k: doc[k] for k in ("instance", "direction", "source", "destination", "method",
                                "status", "latency_ms", "attempts", "endpoint", "trace_id")} == {
        "instance": "order-1", "direction": "outbound", "source": "order",
        "destination": "payment", "method": "/pay.Payment/Charge", "status": "UNAVAILABLE",
        "latency_ms": 12.345, "attempts": 3, "endpoint": "127.0.0.1:6001", "trace_id": TRACE}
    assert "\n" not in json.dumps(doc)


# --------------------------------------------------------------------------- topology
def test_topology_rows_carry_golden_signals_and_open_breakers() -> None:
    resp = pb.TopologyResponse(window_s=30, services=[
        pb.TopologyService(name="payment", rps=4.0, success_rate=0.75, p50_ms=2, p99_ms=9.5,
                           requests=120, instances=[
                               pb.TopologyInstance(instance="payment-1", address="a:1",
                                                   healthy=True),
                               pb.TopologyInstance(instance="payment-2", address="a:2")]),
        pb.TopologyService(name="order", instances=[])],
        edges=[pb.TopologyEdge(source="order", destination="payment", rps=4.0,
                               success_rate=0.75, p50_ms=2, p99_ms=9.5, requests=120,
                               open_breakers=1)])
    doc = topology_doc(resp)
    assert mo.service_rows(doc) == [["payment", "1/2", "4.0", "75.0%", "2.0", "9.5"],
                                    ["order", "0/0", "0.0", "-", "-", "-"]]
    assert mo.edge_rows(doc) == [["order", "->", "payment", "4.0", "75.0%", "2.0", "9.5", "1"]]
    assert mo.instance_rows(doc)[-1] == ["order", "-", "-", "UNHEALTHY"]
    from rich.console import Console

    con = Console(width=160, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    con.print(mo.top_view(doc, 1_700_000_000))
    shown = con.export_text()
    assert "services at 22:13:20 UTC (last 30s)" in shown and "75.0%" in shown
    assert "OPEN BREAKERS" in shown


# ------------------------------------------------------------------------ argument errors
@pytest.mark.parametrize("args, says", [
    (["traces", "--limit", "0"], "--limit"),
    (["traces", "--limit", "many"], "--limit"),
    (["trace", "not-hex-at-all"], "not a trace id"),
    (["trace", "4bf92f3"], "not a trace id"),          # 7 digits: too short a prefix
    (["trace", TRACE + "00"], "not a trace id"),        # 34 digits
    (["tap", "order", "--duration", "soon"], "not a positive duration"),
    (["tap", "order", "--max", "0"], "--max"),
    (["top", "--interval", "0"], "--interval"),
    (["top", "--iterations", "0"], "--iterations"),
    (["topology", "-o", "png"], "--output"),
])
def test_bad_arguments_fail_before_any_connection(args: list[str], says: str) -> None:
    r = CliRunner().invoke(cli, ["--certs-dir", "/nonexistent", *args])
    assert r.exit_code == 2, r.output
    assert says in r.output, r.output


def test_a_bad_trace_id_is_one_line_on_stderr_through_main() -> None:
    r = subprocess.run([sys.executable, "-m", "control_plane.meshctl", "--certs-dir",
                        "/nonexistent", "trace", "xyz"], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("meshctl: error:"), r.stderr
    assert "not a trace id" in r.stderr


def test_missing_admin_credentials_are_one_line_for_traces(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "control_plane.meshctl", "--certs-dir",
                        str(tmp_path / "empty"), "traces"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "cannot read admin credentials" in r.stderr
