"""The topology as a document, as DOT and as a picture: every service named, failing edges
red, open breakers marked, quiet edges grey, hostile names escaped; Graphviz draws it, and
its absence, failure or slowness is one clear ``RenderError``."""

from __future__ import annotations

import re
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from control_plane.topology_render import (
    FAILING_BELOW,
    RenderError,
    dot_quote,
    render,
    to_dot,
    topology_doc,
)
from protos.mesh.v1 import control_pb2 as pb

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")


def response() -> pb.TopologyResponse:
    inst = pb.TopologyInstance
    return pb.TopologyResponse(
        services=[
            pb.TopologyService(name="order", instances=[inst(instance="order-1", address="a:1",
                                                             healthy=True)],
                               rps=10.0, success_rate=1.0, p50_ms=2.0, p99_ms=9.0, requests=100),
            pb.TopologyService(name="payment", instances=[
                inst(instance="payment-1", address="b:1", healthy=True),
                inst(instance="payment-2", address="b:2", healthy=False)],
                rps=4.0, success_rate=0.5, p50_ms=3.0, p99_ms=20.0, requests=40),
            pb.TopologyService(name="inventory", instances=[
                inst(instance="inventory-1", address="c:1", healthy=True)]),
            pb.TopologyService(name="loadgen"),
        ],
        edges=[
            pb.TopologyEdge(source="loadgen", destination="order", rps=10.0, success_rate=1.0,
                            p50_ms=2.0, p99_ms=9.0, requests=100),
            pb.TopologyEdge(source="order", destination="payment", rps=4.0, success_rate=0.5,
                            p50_ms=3.0, p99_ms=20.123456, requests=40, open_breakers=2),
            pb.TopologyEdge(source="order", destination="inventory", requests=0),
        ],
        window_s=60.0)


def edge_line(dot: str, source: str, destination: str) -> str:
    [line] = [ln for ln in dot.splitlines() if f'"{source}" -> "{destination}"' in ln]
    return line


def test_the_document_keeps_meshctls_shape_with_golden_signals_and_breakers() -> None:
    doc = topology_doc(response())
    assert set(doc) == {"services", "edges", "window_s"} and doc["window_s"] == 60.0
    payment = doc["services"][1]
    assert payment == {"name": "payment",
                       "instances": [{"instance": "payment-1", "address": "b:1", "healthy": True},
                                     {"instance": "payment-2", "address": "b:2",
                                      "healthy": False}],
                       "rps": 4.0, "success_rate": 0.5, "p50_ms": 3.0, "p99_ms": 20.0,
                       "requests": 40}
    edge = doc["edges"][1]
    assert edge == {"source": "order", "destination": "payment", "rps": 4.0,
                    "success_rate": 0.5, "p50_ms": 3.0, "p99_ms": 20.123, "requests": 40,
                    "open_breakers": 2}


def test_dot_names_every_service_and_labels_edges_with_rps_success_and_p99() -> None:
    dot = to_dot(topology_doc(response()))
    assert dot.startswith("digraph")
    for name in ("order", "payment", "inventory", "loadgen"):
        assert re.search(rf'^  "{name}" \[label="{name}\\n', dot, re.M), name
    line = edge_line(dot, "loadgen", "order")
    assert "10.0 rps" in line and "100.0%" in line and "p99 9.0 ms" in line
    assert 'label="payment\\n2 instances (1 unhealthy)' in dot


def test_a_failing_edge_is_red_and_a_healthy_one_is_not() -> None:
    dot = to_dot(topology_doc(response()))
    red = "#d62728"
    assert f'color="{red}"' in edge_line(dot, "order", "payment")
    assert red not in edge_line(dot, "loadgen", "order")
    doc = topology_doc(response())
    doc["edges"][0]["success_rate"] = FAILING_BELOW - 0.001
    assert red in edge_line(to_dot(doc), "loadgen", "order")


def test_open_breakers_are_marked_and_quiet_edges_are_grey() -> None:
    dot = to_dot(topology_doc(response()))
    breaker = edge_line(dot, "order", "payment")
    assert "style=dashed" in breaker and "⚡ 2 open" in breaker
    assert "dashed" not in edge_line(dot, "loadgen", "order")
    quiet = edge_line(dot, "order", "inventory")
    assert "no traffic" in quiet and 'color="#9e9e9e"' in quiet
    assert "#d62728" not in quiet  # no calls is not failing


def test_an_edge_to_an_unregistered_service_still_gets_a_node() -> None:
    doc = {"services": [], "edges": [{"source": "web", "destination": "ghost", "rps": 1,
                                      "success_rate": 1, "p99_ms": 1, "requests": 3}],
           "window_s": 10}
    dot = to_dot(doc)
    assert re.search(r'^  "web" \[', dot, re.M) and re.search(r'^  "ghost" \[', dot, re.M)


@pytest.mark.parametrize(("raw", "quoted"), [
    ('a"b', '"a\\"b"'),
    ("back\\slash", '"back\\\\slash"'),
    ("\\N\\G", '"\\\\N\\\\G"'),  # Graphviz escapes arrive as plain text
    ("two\nlines\r", '"two lines "'),
])
def test_dot_quote_escapes(raw: str, quoted: str) -> None:
    assert dot_quote(raw) == quoted


def test_long_names_are_cut() -> None:
    assert len(dot_quote("x" * 10_000)) < 300


def hostile_doc() -> dict[str, Any]:
    evil = 'ev"il\\N}<script>'
    return {"services": [{"name": evil, "instances": [], "requests": 0},
                         {"name": "order", "instances": []}],
            "edges": [{"source": "order", "destination": evil, "rps": 1.0,
                       "success_rate": 1.0, "p50_ms": 1, "p99_ms": 2, "requests": 5,
                       "open_breakers": 0}],
            "window_s": 60}


@needs_dot
def test_render_draws_an_svg_naming_every_service() -> None:
    svg = render(to_dot(topology_doc(response())), "svg").decode()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    for name in ("order", "payment", "inventory", "loadgen"):
        assert name in texts, (name, texts)
    assert "⚡ 2 open" in texts


@needs_dot
def test_hostile_names_reach_the_picture_as_plain_text() -> None:
    svg = render(to_dot(hostile_doc()), "svg").decode()
    assert "<script>" not in svg
    assert "ev&quot;il\\N}&lt;script&gt;" in svg  # the literal name, no \N expansion


@needs_dot
def test_render_draws_a_png() -> None:
    assert render(to_dot(topology_doc(response())), "png").startswith(b"\x89PNG\r\n\x1a\n")


def test_render_without_graphviz_is_a_clear_error() -> None:
    with pytest.raises(RenderError, match="Graphviz is not installed"):
        render("digraph {}", "svg", dot_binary="no-such-graphviz-binary")


@needs_dot
def test_render_reports_a_dot_failure() -> None:
    with pytest.raises(RenderError, match="failed with exit code"):
        render("digraph { this is not dot", "svg")


def test_render_kills_a_slow_graphviz(tmp_path: Path) -> None:
    slow = tmp_path / "slow-dot"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(slow.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(RenderError, match="longer than 0.3s"):
        render("digraph {}", "svg", dot_binary=str(slow), timeout_s=0.3)


def test_render_accepts_svg_and_png_only() -> None:
    with pytest.raises(ValueError):
        render("digraph {}", "pdf")  # type: ignore[arg-type]
