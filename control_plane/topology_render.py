"""The mesh's topology as a document, as Graphviz DOT text, and as a picture.

* ``topology_doc(resp)``: the ``Admin.Topology`` answer as the plain JSON document that
  ``meshctl topology -o json`` prints and the control plane's ``/api/topology`` serves:
  ``{"services": [{"name", "instances": [{"instance", "address", "healthy"}], "rps",
  "success_rate", "p50_ms", "p99_ms", "requests"}], "edges": [{"source", "destination",
  "rps", "success_rate", "p50_ms", "p99_ms", "requests", "open_breakers"}], "window_s"}``
  (rps in calls per second, success rate 0..1, latencies in ms, the window in seconds).
* ``to_dot(doc)``: pure, the document as DOT text: services as nodes (name, instances and
  their golden signals), edges labelled with rps, success rate and p99; an edge whose success
  rate is below ``FAILING_BELOW`` (with traffic) is red, one with open breakers is dashed and
  says how many, one without traffic is grey.
* ``render(dot, fmt)``: DOT text to SVG or PNG bytes through Graphviz's ``dot`` binary
  (a subprocess with a bounded run time); ``RenderError`` when it is missing or fails.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from typing import Any, Literal

from protos.mesh.v1 import control_pb2 as pb

FAILING_BELOW = 0.99
"""An edge (or a service's in-traffic) with a success rate below this, with calls, is failing."""
RENDER_TIMEOUT_S = 10.0
MAX_LABEL_CHARS = 200

_RED = "#d62728"
_GREY = "#9e9e9e"
_OK = "#2b6cb0"
_ORANGE = "#dd6b20"


class RenderError(Exception):
    """Graphviz could not draw the picture: ``dot`` is missing, timed out or failed. The
    message is one line saying which."""


def topology_doc(resp: pb.TopologyResponse) -> dict[str, Any]:
    """The ``Admin.Topology`` answer as a JSON-ready dict (shape in the module docstring);
    figures rounded (rps to 3 decimals, success rate to 4, latencies to 3), services and
    edges in the answer's order."""
    return {
        "services": [{"name": s.name,
                      "instances": [{"instance": i.instance, "address": i.address,
                                     "healthy": i.healthy} for i in s.instances],
                      "rps": round(s.rps, 3), "success_rate": round(s.success_rate, 4),
                      "p50_ms": round(s.p50_ms, 3), "p99_ms": round(s.p99_ms, 3),
                      "requests": s.requests}
                     for s in resp.services],
        "edges": [{"source": e.source, "destination": e.destination,
                   "rps": round(e.rps, 3), "success_rate": round(e.success_rate, 4),
                   "p50_ms": round(e.p50_ms, 3), "p99_ms": round(e.p99_ms, 3),
                   "requests": e.requests, "open_breakers": e.open_breakers}
                  for e in resp.edges],
        "window_s": resp.window_s,
    }


def dot_quote(text: str) -> str:
    """``text`` as a DOT double-quoted string: backslashes and quotes escaped (so no escape
    sequence of Graphviz's, like ``\\N`` or ``\\G``, survives from the input), control
    characters made spaces, at most ``MAX_LABEL_CHARS`` characters."""
    text = "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in str(text))
    if len(text) > MAX_LABEL_CHARS:
        text = text[:MAX_LABEL_CHARS - 1] + "…"
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _label(lines: list[str]) -> str:
    """A quoted multi-line label: each line escaped, joined by DOT's centred line break."""
    return '"' + "\\n".join(dot_quote(line)[1:-1] for line in lines) + '"'


def _num(doc: Mapping[str, Any], key: str) -> float:
    v = doc.get(key, 0)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0


def _signals(item: Mapping[str, Any]) -> str:
    """'12.3 rps · 99.5% · p99 4.2 ms'."""
    return (f"{_num(item, 'rps'):.1f} rps · {100 * _num(item, 'success_rate'):.1f}% · "
            f"p99 {_num(item, 'p99_ms'):.1f} ms")


def _failing(item: Mapping[str, Any]) -> bool:
    return _num(item, "requests") > 0 and _num(item, "success_rate") < FAILING_BELOW


def to_dot(doc: Mapping[str, Any]) -> str:
    """The topology document (``topology_doc``'s shape) as a DOT digraph. Every service of
    ``services`` and every endpoint of ``edges`` is a node (quoted and escaped, so any name is
    safe); the graph reads left to right. Pure: no I/O."""
    services = [s for s in doc.get("services", []) if isinstance(s, Mapping)]
    edges = [e for e in doc.get("edges", []) if isinstance(e, Mapping)]
    window_s = _num(doc, "window_s")
    out = ["digraph mesh {",
           "  graph [rankdir=LR, fontname=\"Helvetica\", fontsize=11, nodesep=0.5, "
           f"ranksep=1.0, labelloc=t, label={_label([f'mesh topology (last {window_s:.0f}s)'])}];",
           "  node [shape=box, style=\"rounded,filled\", fillcolor=\"#f7fafc\", "
           "fontname=\"Helvetica\", fontsize=10];",
           "  edge [fontname=\"Helvetica\", fontsize=9];"]
    known: set[str] = set()
    for s in services:
        name = str(s.get("name", ""))
        known.add(name)
        insts = [i for i in s.get("instances", []) if isinstance(i, Mapping)]
        healthy = sum(1 for i in insts if i.get("healthy"))
        lines = [name, f"{len(insts)} instance{'s' if len(insts) != 1 else ''}"
                 + (f" ({len(insts) - healthy} unhealthy)" if healthy < len(insts) else "")]
        if _num(s, "requests") > 0:
            lines.append(_signals(s))
        color = _RED if _failing(s) else _ORANGE if healthy < len(insts) else _OK
        out.append(f"  {dot_quote(name)} [label={_label(lines)}, color=\"{color}\"];")
    for e in edges:
        for end in (str(e.get("source", "")), str(e.get("destination", ""))):
            if end not in known:
                known.add(end)
                out.append(f"  {dot_quote(end)} [label={_label([end, 'not registered'])}, "
                           f"color=\"{_GREY}\", fontcolor=\"{_GREY}\"];")
    for e in edges:
        src, dst = str(e.get("source", "")), str(e.get("destination", ""))
        open_breakers = int(_num(e, "open_breakers"))
        traffic = _num(e, "requests") > 0
        lines = [_signals(e)] if traffic else ["no traffic"]
        attrs: list[str] = []
        if not traffic:
            color = _GREY
        elif _failing(e):
            color = _RED
            attrs.append("penwidth=2.5")
        else:
            color = _OK
        if open_breakers > 0:
            lines.append(f"⚡ {open_breakers} open")
            attrs.append("style=dashed")
        attrs += [f"color=\"{color}\"", f"fontcolor=\"{color}\"", f"label={_label(lines)}"]
        out.append(f"  {dot_quote(src)} -> {dot_quote(dst)} [{', '.join(attrs)}];")
    out.append("}")
    return "\n".join(out) + "\n"


def render(dot: str, fmt: Literal["svg", "png"], *, timeout_s: float = RENDER_TIMEOUT_S,
           dot_binary: str = "dot") -> bytes:
    """DOT text drawn by Graphviz (``dot -T<fmt>``) as SVG or PNG bytes. Blocks up to
    ``timeout_s`` seconds (run it in a thread from async code). Raises ``RenderError`` when
    ``dot_binary`` is not on PATH, runs longer than ``timeout_s`` (it is killed), or fails;
    ``ValueError`` for another ``fmt``."""
    if fmt not in ("svg", "png"):
        raise ValueError(f"format must be svg or png, not {fmt!r}")
    path = shutil.which(dot_binary)
    if path is None:
        raise RenderError(f"Graphviz is not installed ({dot_binary!r} not found on PATH; "
                          "install the graphviz package)")
    try:
        proc = subprocess.run([path, f"-T{fmt}"], input=dot.encode(), capture_output=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise RenderError(f"Graphviz ({path}) took longer than {timeout_s:g}s") from None
    except OSError as exc:
        raise RenderError(f"cannot run Graphviz ({path}): {exc}") from None
    if proc.returncode != 0 or not proc.stdout:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise RenderError(f"Graphviz ({path}) failed with exit code {proc.returncode}"
                          + (f": {err[0]}" if err else ""))
    return proc.stdout
