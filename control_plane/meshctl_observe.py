"""``meshctl``'s observability commands: ``topology`` (tables, json/yaml, DOT, SVG, PNG),
``top`` (a live table of golden signals), ``traces`` and ``trace ID`` (a waterfall), ``tap
SERVICE`` (calls as they happen). ``meshctl`` registers ``COMMANDS`` on its group.

The pure parts (rows of the tables, a tap event's line and document) are functions of the
RPC answers, testable without a control plane.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import click
import grpc

from control_plane import topology_render, waterfall
from control_plane.cli_common import (
    MeshctlError,
    RpcFailed,
    age,
    client,
    console,
    duration_option_value,
    emit,
    output_option,
)
from mesh_common.numbers import FiniteFloatRange
from protos.mesh.v1 import control_pb2 as pb

TAP_MARGIN_S = 10.0          # the Tap RPC's deadline is the tap's duration plus this
TAP_DEFAULT_DURATION = "60s"
TOP_DEFAULT_INTERVAL_S = 2.0
TRACES_DEFAULT_LIMIT = 20
TRACE_PREFIX_SEARCH = 1000   # recent traces a short id prefix is matched against
WATERFALL_WIDTH_NOT_TTY = 120  # characters, when stdout is not a terminal and COLUMNS unset

_TRACE_ID = re.compile(r"[0-9a-f]{8,32}")


# --------------------------------------------------------------------------- topology
def _rate(item: dict[str, Any]) -> str:
    return f"{100 * item['success_rate']:.1f}%" if item["requests"] else "-"


def _ms(item: dict[str, Any], key: str) -> str:
    return f"{item[key]:.1f}" if item["requests"] else "-"


def service_rows(doc: dict[str, Any]) -> list[list[str]]:
    """Per service of a ``topology_doc``: name, healthy/total instances, rps, success rate,
    p50 and p99 (ms) of the calls made to it (``-`` without calls)."""
    return [[s["name"], f"{sum(1 for i in s['instances'] if i['healthy'])}/"
                        f"{len(s['instances'])}",
             f"{s['rps']:.1f}", _rate(s), _ms(s, "p50_ms"), _ms(s, "p99_ms")]
            for s in doc["services"]]


def instance_rows(doc: dict[str, Any]) -> list[list[str]]:
    """Per instance of a ``topology_doc``: service, instance, address, health (a service
    without instances gets one row of dashes)."""
    return [[s["name"], i["instance"], i["address"] or "-",
             "healthy" if i["healthy"] else "UNHEALTHY"]
            for s in doc["services"]
            for i in s["instances"] or [{"instance": "-", "address": "", "healthy": False}]]


def edge_rows(doc: dict[str, Any]) -> list[list[str]]:
    """Per edge of a ``topology_doc``: source, ``->``, destination, rps, success rate, p50
    and p99 (ms), open breakers (``-`` for none)."""
    return [[e["source"], "->", e["destination"], f"{e['rps']:.1f}", _rate(e),
             _ms(e, "p50_ms"), _ms(e, "p99_ms"),
             str(e["open_breakers"]) if e["open_breakers"] else "-"]
            for e in doc["edges"]]


SERVICE_COLUMNS = ["SERVICE", "INSTANCES", "RPS", "SUCCESS", "P50 MS", "P99 MS"]
INSTANCE_COLUMNS = ["SERVICE", "INSTANCE", "ADDRESS", "HEALTH"]
EDGE_COLUMNS = ["SOURCE", "", "DESTINATION", "RPS", "SUCCESS", "P50 MS", "P99 MS",
                "OPEN BREAKERS"]


def _write_picture(doc: dict[str, Any], path: str, fmt: str) -> None:
    try:
        data = topology_render.render(topology_render.to_dot(doc), fmt)  # type: ignore[arg-type]
    except topology_render.RenderError as exc:
        raise MeshctlError(f"cannot draw the {fmt.upper()} picture: {exc}") from None
    try:
        Path(path).write_bytes(data)
    except OSError as exc:
        raise MeshctlError(f"cannot write {path}: {exc.strerror}") from None
    click.echo(f"wrote the topology picture to {path} ({fmt.upper()}, {len(data)} bytes)")


@click.command("topology")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml", "dot"]),
              default="table", show_default=True,
              help="Output format (dot: Graphviz DOT text).")
@click.option("--svg", "svg_path", default=None, metavar="FILE",
              help="Draw the topology with Graphviz into FILE as SVG (instead of printing).")
@click.option("--png", "png_path", default=None, metavar="FILE",
              help="Draw the topology with Graphviz into FILE as PNG (instead of printing).")
@click.pass_context
def topology(ctx: click.Context, output: str, svg_path: str | None,
             png_path: str | None) -> None:
    """Services with their instances, health and golden signals, and the edges that carried
    traffic lately (rps, success rate, p50/p99 latency, open breakers). ``--svg``/``--png``
    write a picture (Graphviz) and print one line naming the file."""
    resp = client(ctx).call("Topology", pb.TopologyRequest())
    doc = topology_render.topology_doc(resp)
    if svg_path or png_path:
        for path, fmt in ((svg_path, "svg"), (png_path, "png")):
            if path:
                _write_picture(doc, path, fmt)
        return
    if output == "dot":
        click.echo(topology_render.to_dot(doc), nl=False)
        return
    if output != "table":
        emit(ctx, output, doc, [], [])
        return
    window = f"last {doc['window_s']:.0f}s"
    emit(ctx, output, doc, SERVICE_COLUMNS, service_rows(doc), title=f"services ({window})")
    emit(ctx, output, doc, INSTANCE_COLUMNS, instance_rows(doc), title="instances")
    emit(ctx, output, doc, EDGE_COLUMNS, edge_rows(doc), title=f"edges ({window})")


# -------------------------------------------------------------------------------- top
def top_view(doc: dict[str, Any], at_unix: float) -> Any:
    """One refresh of ``meshctl top``: a ``rich`` group of the services table and the edges
    table of a ``topology_doc`` (failing success rates red, open breakers yellow), titled
    with the time ``at_unix`` (UTC) and the window. No I/O."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    stamp = dt.datetime.fromtimestamp(at_unix, dt.UTC).strftime("%H:%M:%S")
    window = f"last {doc['window_s']:.0f}s"

    def make(columns: list[str], rows: list[list[str]], items: list[dict[str, Any]],
             title: str) -> Table:
        t = Table(box=None, header_style="bold", title=title, title_justify="left",
                  pad_edge=False)
        for i, col in enumerate(columns):
            t.add_column(col, no_wrap=True, justify="left" if i < 3 else "right")
        for row, item in zip(rows, items, strict=True):
            failing = (item["requests"] > 0
                       and item["success_rate"] < topology_render.FAILING_BELOW)
            cells = [Text(c) for c in row]
            success = columns.index("SUCCESS")
            if failing:
                cells[success].stylize("bold red")
            if "OPEN BREAKERS" in columns and item.get("open_breakers"):
                cells[columns.index("OPEN BREAKERS")].stylize("bold yellow")
            t.add_row(*cells)
        return t

    return Group(
        make(SERVICE_COLUMNS, service_rows(doc), doc["services"],
             f"services at {stamp} UTC ({window})"),
        Text(""),
        make(EDGE_COLUMNS, edge_rows(doc), doc["edges"], f"edges ({window})"))


@click.command("top")
@click.option("--interval", "interval_s", type=FiniteFloatRange(min=0.1, max=3600),
              default=TOP_DEFAULT_INTERVAL_S, show_default=True, metavar="S",
              help="Seconds between refreshes.")
@click.option("--iterations", type=click.IntRange(min=1), default=None, metavar="N",
              help="Stop after N refreshes (default: until Ctrl-C).")
@click.pass_context
def top(ctx: click.Context, interval_s: float, iterations: int | None) -> None:
    """A live table of services (rps, success rate, p50, p99, instances) and edges (rps,
    success, p99, open breakers), refreshed from the control plane every ``--interval``
    seconds until Ctrl-C or ``--iterations``. Not on a terminal, each refresh is printed
    once, one after the other."""
    c = client(ctx)
    out = console()
    live: Any = None
    n = 0
    try:
        while True:
            doc = topology_render.topology_doc(c.call("Topology", pb.TopologyRequest()))
            view = top_view(doc, time.time())
            if out.is_terminal:
                if live is None:
                    from rich.live import Live

                    live = Live(view, console=out, auto_refresh=False)
                    live.start()
                live.update(view, refresh=True)
            else:
                if n:
                    out.print()
                out.print(view)
            n += 1
            if iterations is not None and n >= iterations:
                return
            time.sleep(interval_s)
    except KeyboardInterrupt:
        return
    finally:
        if live is not None:
            live.stop()


# ----------------------------------------------------------------------------- traces
@click.command("traces")
@click.option("--service", default="", metavar="S", help="Only traces with a span of S.")
@click.option("--errors", is_flag=True, default=False,
              help="Only traces where a span erred.")
@click.option("--limit", type=click.IntRange(1, TRACE_PREFIX_SEARCH),
              default=TRACES_DEFAULT_LIMIT, show_default=True, metavar="N",
              help="At most N traces, newest first.")
@output_option
@click.pass_context
def traces(ctx: click.Context, service: str, errors: bool, limit: int, output: str) -> None:
    """Recent traces kept by the control plane, newest first: trace id, root service and
    method, duration (ms), the root's status, whether any span erred, spans, age."""
    resp = client(ctx).call("ListTraces", pb.ListTracesRequest(service=service, errors=errors,
                                                               limit=limit))
    doc = [waterfall.summary_doc(s) for s in resp.traces]
    now = time.time()
    rows = [[d["trace_id"], d["root_service"] or "-", d["method"] or "-",
             f"{d['duration_ms']:.2f}", d["status"] or "-", "yes" if d["error"] else "-",
             str(d["spans"]), age(d["start_unix"], now)] for d in doc]
    _emit_or_note(ctx, output, doc, ["TRACE ID", "ROOT SERVICE", "METHOD", "DURATION MS",
                                     "STATUS", "ERRORS", "SPANS", "AGE"], rows)


def _emit_or_note(ctx: click.Context, output: str, doc: list[Any], columns: list[str],
                  rows: list[list[str]]) -> None:
    if output == "table" and not rows:
        click.echo("no traces kept (yet): are the sidecars sampling and sending spans?")
        return
    emit(ctx, output, doc, columns, rows)


def check_trace_id(ctx: click.Context | None, param: click.Parameter | None,
                   value: str) -> str:
    """Click callback: a trace id (32 hex digits) or a prefix of at least 8, lower-cased;
    raises ``click.BadParameter`` otherwise."""
    text = value.strip().lower()
    if not _TRACE_ID.fullmatch(text):
        raise click.BadParameter(f"not a trace id (32 hex digits, or a prefix of at least 8): "
                                 f"{value!r}")
    return text


def _resolve_prefix(ctx: click.Context, prefix: str) -> str:
    resp = client(ctx).call("ListTraces", pb.ListTracesRequest(limit=TRACE_PREFIX_SEARCH))
    found = [s.trace_id for s in resp.traces if s.trace_id.lower().startswith(prefix)]
    if not found:
        raise MeshctlError(f"no trace id starts with {prefix} among the {len(resp.traces)} "
                           "most recent traces")
    if len(set(found)) > 1:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise MeshctlError(f"trace id prefix {prefix} is ambiguous ({len(found)} traces: "
                           f"{shown}); give more digits")
    return found[0]


def _waterfall_width() -> int:
    if sys.stdout.isatty():
        return console().width
    try:
        return max(40, int(os.environ.get("COLUMNS", "")))
    except ValueError:
        return WATERFALL_WIDTH_NOT_TTY


@click.command("trace")
@click.argument("trace_id", metavar="ID", callback=check_trace_id)
@output_option
@click.option("--width", type=click.IntRange(min=40, max=1000), default=None, metavar="N",
              help="Characters per line (default: the terminal's).")
@click.pass_context
def trace(ctx: click.Context, trace_id: str, output: str, width: int | None) -> None:
    """The spans of trace ID (32 hex digits, or a prefix of at least 8 of a recent trace) as
    a waterfall: one row per span indented under its parent (service, kind, name, status,
    duration) with a bar on the trace's time axis, and its events (ms from the trace's start)
    under it. ``-o json|yaml``: the summary and the spans in tree order."""
    if len(trace_id) < 32:
        trace_id = _resolve_prefix(ctx, trace_id)
    try:
        resp = client(ctx).call("GetTrace", pb.GetTraceRequest(trace_id=trace_id))
    except RpcFailed as exc:
        if exc.code == grpc.StatusCode.NOT_FOUND:
            raise MeshctlError(f"no trace {trace_id} is kept by the control plane (unknown "
                               "id, not sampled, or past the retention)") from None
        raise
    if output != "table":
        emit(ctx, output, waterfall.trace_doc(resp), [], [])
        return
    w = width or _waterfall_width()
    if sys.stdout.isatty():
        console().print(waterfall.render_rich(resp, w))
    else:
        for line in waterfall.render_lines(resp, w):
            click.echo(line)


# -------------------------------------------------------------------------------- tap
def _clock(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%H:%M:%S.%f")[:-3]


def tap_doc(ev: pb.TapEvent) -> dict[str, Any]:
    """A tap event as ``tap -o json`` prints it (one object per line): ``time`` (ISO 8601
    UTC with ms), ``time_unix`` (s), ``latency_ms``, and the event's other fields."""
    stamp = dt.datetime.fromtimestamp(ev.time_unix, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return {"time": stamp[:-3] + "Z", "time_unix": ev.time_unix, "instance": ev.instance,
            "direction": ev.direction, "source": ev.source, "destination": ev.destination,
            "method": ev.method, "status": ev.status, "latency_ms": round(ev.latency_ms, 3),
            "attempts": ev.attempts, "endpoint": ev.endpoint, "trace_id": ev.trace_id,
            "reason": ev.reason}


TAP_HEADER = (f"{'TIME (UTC)':<12}  {'INSTANCE':<16}  {'DIR':<8}  {'SOURCE -> DESTINATION':<28}"
              f"  {'METHOD':<32}  {'STATUS':<11}  {'LATENCY':>9}  {'TRIES':>5}  "
              f"{'ENDPOINT':<21}  REASON")


def tap_line(ev: pb.TapEvent) -> str:
    """One tap event as one line under ``TAP_HEADER``: time (UTC, ms), instance, direction,
    ``source -> destination`` (``?`` = unknown caller, ``-`` = not routed), method, status,
    latency (ms), attempts, endpoint (``-`` for none), the layers' reason. Columns are
    padded, never cut."""
    route = f"{ev.source or '?'} -> {ev.destination or '-'}"
    return (f"{_clock(ev.time_unix):<12}  {ev.instance or '-':<16}  {ev.direction or '-':<8}  "
            f"{route:<28}  {ev.method or '-':<32}  {ev.status or '-':<11}  "
            f"{ev.latency_ms:>7.2f}ms  {ev.attempts:>5}  {ev.endpoint or '-':<21}  "
            f"{ev.reason}").rstrip()


@click.command("tap")
@click.argument("service")
@click.option("--method", default="", metavar="M",
              help="Only this gRPC method: /pkg.Service/Method (exact) or a prefix ending in "
                   "'/' (default: every method).")
@click.option("--duration", "duration_s", default=TAP_DEFAULT_DURATION, show_default=True,
              callback=duration_option_value, metavar="S",
              help="How long to tap (90, 90s, 5m, ...).")
@click.option("--max", "max_events", type=click.IntRange(min=1), default=None, metavar="N",
              help="Stop after N calls (default: no bound).")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format (json: one object per line).")
@click.pass_context
def tap(ctx: click.Context, service: str, method: str, duration_s: int,
        max_events: int | None, output: str) -> None:
    """The calls SERVICE's sidecars carry (both directions, and its callers' outbound calls
    to it), one line each as they end: time, instance, direction, source -> destination,
    method, status, latency, attempts, endpoint, reason. Ends after ``--duration``, ``--max``
    calls or Ctrl-C (exit 0)."""
    request = pb.TapRequest(service=service, method=method, duration_s=float(duration_s),
                            max_events=max_events or 0)
    events = client(ctx).stream("Tap", request, timeout_s=duration_s + TAP_MARGIN_S)
    if output == "table":
        if sys.stderr.isatty():
            click.echo(f"tapping {service}{' ' + method if method else ''} for "
                       f"{duration_s}s (Ctrl-C to stop)", err=True)
        click.echo(TAP_HEADER)
    n = 0
    try:
        for ev in events:
            click.echo(json.dumps(tap_doc(ev)) if output == "json" else tap_line(ev))
            n += 1
            if max_events is not None and n >= max_events:
                break
    except KeyboardInterrupt:
        pass
    finally:
        events.close()


COMMANDS = [topology, top, traces, trace, tap]
