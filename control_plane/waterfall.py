"""A trace as a waterfall, for ``meshctl trace``: pure (a ``GetTraceResponse`` in, rows,
text lines or a ``rich`` renderable out; no I/O).

One row per span in tree order (a parent, then its children by start time, depth first),
indented by depth, with its service, kind, name, gRPC status and duration, and a bar placed on
a time axis common to the whole trace and scaled to the width given; the span's events follow
it, one line each, with their offset in ms from the trace's start and their text (name and
attributes), and a mark on the span's bar where they happened.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from protos.mesh.v1 import control_pb2 as pb

BAR = "█"
EVENT_MARK = "◆"
MIN_BAR_WIDTH = 10      # characters of the time axis, whatever the width
INDENT = "  "           # per depth level
EVENT_PREFIX = "↳ "


@dataclass(frozen=True)
class EventRow:
    """One span event: ``offset_ms`` from the trace's start; ``text`` its name then its
    attributes as ``key=value``."""

    offset_ms: float
    name: str
    text: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class SpanRow:
    """One span at ``depth`` (0 = a root, or a span whose parent is not kept), with its start
    as ``offset_ms`` from the trace's start and its ``duration_ms``; events in time order."""

    depth: int
    trace_id: str
    span_id: str
    parent_span_id: str
    service: str
    kind: str
    name: str
    status: str
    error: bool
    offset_ms: float
    duration_ms: float
    attributes: dict[str, Any]
    events: tuple[EventRow, ...]

    @property
    def end_ms(self) -> float:
        return self.offset_ms + self.duration_ms


def _json_object(text: str) -> dict[str, Any]:
    """A JSON object's text -> dict; anything else (empty, invalid, not an object) -> ``{}``,
    or ``{"raw": text}`` when there was something."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"raw": value}


def _value(v: Any) -> str:
    if isinstance(v, str):
        return v if v and not any(c.isspace() for c in v) else json.dumps(v)
    if isinstance(v, float):
        return f"{v:g}"
    return json.dumps(v, separators=(",", ":"))


def event_text(name: str, attributes: dict[str, Any]) -> str:
    """``name key=value key=value`` (attributes in their order; strings with spaces quoted)."""
    return " ".join([name, *(f"{k}={_value(v)}" for k, v in attributes.items())])


def trace_origin_ns(spans: Iterable[pb.SpanInfo]) -> int:
    """The trace's start: the earliest span start (ns since the epoch); 0 without spans."""
    starts = [s.start_unix_nano for s in spans]
    return min(starts) if starts else 0


def _tree_order(spans: list[pb.SpanInfo]) -> list[tuple[int, pb.SpanInfo]]:
    """(depth, span) depth first; siblings by (start, span id). A span whose parent is not in
    the trace is a root; spans in a parent cycle (malformed) come last, as roots."""
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[pb.SpanInfo]] = {}
    roots: list[pb.SpanInfo] = []
    for s in spans:
        parent = s.parent_span_id
        if parent and parent in by_id and parent != s.span_id:
            children.setdefault(parent, []).append(s)
        else:
            roots.append(s)

    def key(s: pb.SpanInfo) -> tuple[int, str]:
        return (s.start_unix_nano, s.span_id)

    out: list[tuple[int, pb.SpanInfo]] = []
    seen: set[int] = set()

    def walk(start: list[pb.SpanInfo]) -> None:
        stack = [(0, s) for s in sorted(start, key=key, reverse=True)]
        while stack:
            depth, s = stack.pop()
            if id(s) in seen:
                continue
            seen.add(id(s))
            out.append((depth, s))
            for c in sorted(children.get(s.span_id, ()), key=key, reverse=True):
                stack.append((depth + 1, c))

    walk(roots)
    leftovers = [s for s in spans if id(s) not in seen]
    if leftovers:
        walk(leftovers)
    return out


def span_rows(resp: pb.GetTraceResponse) -> list[SpanRow]:
    """The spans of ``resp`` in tree order with offsets from the trace's start (ms)."""
    spans = list(resp.spans)
    t0 = trace_origin_ns(spans)
    rows = []
    for depth, s in _tree_order(spans):
        end = max(s.end_unix_nano, s.start_unix_nano)
        events = sorted(
            (EventRow(offset_ms=(e.time_unix_nano - t0) / 1e6, name=e.name,
                      text=event_text(e.name, attrs), attributes=attrs)
             for e in s.events for attrs in (_json_object(e.attributes_json),)),
            key=lambda e: e.offset_ms)
        rows.append(SpanRow(depth=depth, trace_id=s.trace_id, span_id=s.span_id,
                            parent_span_id=s.parent_span_id,
                            service=s.service, kind=s.kind, name=s.name,
                            status=s.status or ("ERROR" if s.error else "UNSET"),
                            error=s.error, offset_ms=(s.start_unix_nano - t0) / 1e6,
                            duration_ms=(end - s.start_unix_nano) / 1e6,
                            attributes=_json_object(s.attributes_json), events=tuple(events)))
    return rows


def extent_ms(rows: list[SpanRow]) -> float:
    """The time axis' length (ms): from the trace's start to the last span end or event."""
    ends = [r.end_ms for r in rows] + [e.offset_ms for r in rows for e in r.events]
    return max([0.0, *ends])


def summary_doc(s: pb.TraceSummary) -> dict[str, Any]:
    """A ``TraceSummary`` as ``traces -o json`` prints it (``spans`` = how many)."""
    return {"trace_id": s.trace_id, "root_service": s.root_service, "method": s.method,
            "duration_ms": round(s.duration_ms, 3), "status": s.status, "spans": s.spans,
            "error": s.error, "start_unix": s.start_unix}


def trace_doc(resp: pb.GetTraceResponse) -> dict[str, Any]:
    """A whole trace as ``trace -o json`` prints it: ``summary`` (as ``summary_doc``) and
    ``spans`` in tree order, each with ``depth``, ``offset_ms`` (from the trace's start),
    ``duration_ms`` and its events (``offset_ms``, ``name``, ``attributes``)."""
    return {"summary": summary_doc(resp.summary),
            "spans": [{"trace_id": r.trace_id, "span_id": r.span_id,
                       "parent_span_id": r.parent_span_id, "depth": r.depth,
                       "service": r.service, "kind": r.kind, "name": r.name,
                       "status": r.status, "error": r.error,
                       "offset_ms": round(r.offset_ms, 3),
                       "duration_ms": round(r.duration_ms, 3), "attributes": r.attributes,
                       "events": [{"offset_ms": round(e.offset_ms, 3), "name": e.name,
                                   "attributes": e.attributes} for e in r.events]}
                      for r in span_rows(resp)]}


# ------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Segment:
    """A piece of a line and its ``rich`` style name (``""`` = plain)."""

    text: str
    style: str = ""


def _fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters (an ellipsis marks the cut) and padded to it."""
    if len(text) > width:
        text = text[:max(0, width - 1)] + "…"
    return text.ljust(width)


def _column(offset_ms: float, extent: float, bar_width: int) -> int:
    """The axis column (0..bar_width-1) of a time offset (ms)."""
    return min(bar_width - 1, max(0, math.floor(offset_ms / extent * bar_width)))


def bar_span(row: SpanRow, extent: float, bar_width: int) -> tuple[int, int]:
    """(first column, number of columns >= 1) of ``row``'s bar on an axis of ``bar_width``
    columns covering ``extent`` ms."""
    first = _column(row.offset_ms, extent, bar_width)
    last = min(bar_width, max(first + 1, math.ceil(row.end_ms / extent * bar_width)))
    return first, last - first


def _span_label(row: SpanRow) -> str:
    return f"{INDENT * row.depth}{row.service or '?'} {row.kind or '-'} {row.name}"


def _duration(ms: float) -> str:
    return f"{ms:.2f}ms" if ms < 100 else f"{ms:.1f}ms" if ms < 10_000 else f"{ms / 1000:.2f}s"


def layout(resp: pb.GetTraceResponse, width: int) -> list[list[Segment]]:
    """The waterfall as lines of styled segments fitting in ``width`` characters: a title, a
    header with the axis' end, one line per span and one per event under it."""
    rows = span_rows(resp)
    s = resp.summary
    title = [Segment(f"trace {s.trace_id or (rows[0].span_id if rows else '?')}", "bold"),
             Segment(f"  {s.root_service or '-'} {s.method or ''}".rstrip()),
             Segment(f"  {_duration(s.duration_ms)}  "),
             Segment(s.status or "-", "green" if s.status in ("OK", "UNSET") else "red"),
             Segment(" (a span erred)" if s.error and s.status in ("OK", "UNSET") else "",
                     "red"),
             Segment(f"  {len(rows)} spans")]
    if not rows:
        return [title, [Segment("(no spans)", "dim")]]
    extent = extent_ms(rows) or 1e-6
    status_w = max(6, *(len(r.status) for r in rows))
    dur_w = max(8, *(len(_duration(r.duration_ms)) for r in rows))
    label_w = min(max(len("SPAN"), *(len(_span_label(r)) for r in rows)),
                  max(20, (width * 45) // 100))
    bar_w = max(MIN_BAR_WIDTH, width - label_w - status_w - dur_w - 3)
    end_label = _duration(extent)
    axis = "0" + end_label.rjust(bar_w - 1) if bar_w > len(end_label) + 1 else end_label
    lines = [title,
             [Segment(_fit("SPAN", label_w), "bold"), Segment(" "),
              Segment(_fit("STATUS", status_w), "bold"), Segment(" "),
              Segment("DURATION".rjust(dur_w)[-dur_w:], "bold"), Segment(" "),
              Segment(axis, "dim")]]
    for r in rows:
        first, n = bar_span(r, extent, bar_w)
        cells = [" "] * bar_w
        for i in range(first, first + n):
            cells[i] = BAR
        for e in r.events:
            cells[_column(e.offset_ms, extent, bar_w)] = EVENT_MARK
        bar_style = "red" if r.error else "cyan"
        lines.append([Segment(_fit(_span_label(r), label_w)), Segment(" "),
                      Segment(_fit(r.status, status_w), "red" if r.error else "green"),
                      Segment(" "), Segment(_duration(r.duration_ms).rjust(dur_w)),
                      Segment(" "), Segment("".join(cells[:first])),
                      Segment("".join(cells[first:first + n]), bar_style),
                      Segment("".join(cells[first + n:]).rstrip())])
        pad = INDENT * (r.depth + 1)
        for e in r.events:
            lines.append([Segment(f"{pad}{EVENT_PREFIX}"),
                          Segment(f"+{e.offset_ms:.2f}ms", "yellow"),
                          Segment(_fit(f" {e.text}", max(0, width - len(pad) - 2
                                                         - len(f"+{e.offset_ms:.2f}ms")))
                                  .rstrip())])
    return lines


def render_lines(resp: pb.GetTraceResponse, width: int) -> list[str]:
    """The waterfall as plain text lines of at most ``width`` characters (right-trimmed)."""
    return ["".join(seg.text for seg in line).rstrip() for line in layout(resp, width)]


def render_rich(resp: pb.GetTraceResponse, width: int) -> Any:
    """The waterfall as a ``rich.text.Text`` (colours: errors red, bars cyan, event offsets
    yellow), ``width`` characters wide."""
    from rich.text import Text

    out = Text(no_wrap=True, overflow="crop")
    for i, line in enumerate(layout(resp, width)):
        if i:
            out.append("\n")
        for seg in line:
            out.append(seg.text, style=seg.style or None)
    return out
