"""The control plane's admin HTTP port: a tiny, read-only HTTP/1.1 server (asyncio).

    GET /               the dashboard: one self-contained HTML page (no external assets) with
                        the topology picture and the golden-signals tables of services and
                        edges, refreshing itself every ``REFRESH_S`` seconds
    GET /metrics        Prometheus text exposition of the control plane's metrics
    GET /api/topology   the topology document (``topology_render.topology_doc``), JSON
    GET /topology.svg   the topology picture (Graphviz); 503 and one line when it cannot be
                        drawn (Graphviz missing, failing or too slow)

Hardened for a port that should stay on loopback but might not: GET only (anything else is
405), an unknown path 404; one request per connection (``Connection: close``); the request
head is bounded (``MAX_REQUEST_HEAD_BYTES``, else 431) and must arrive within
``REQUEST_TIMEOUT_S`` (else the connection is closed); at most ``MAX_CONNECTIONS`` at once
(more are closed at once); writes time out after ``WRITE_TIMEOUT_S``; a request body is never
read. Drawing runs ``dot`` in a worker thread, never on the event loop, one at a time, and
the SVG is reused for ``SVG_CACHE_S`` seconds (or while the topology's DOT is unchanged).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from control_plane.topology_render import RenderError, render, to_dot, topology_doc
from protos.mesh.v1 import control_pb2 as pb

log = logging.getLogger("mesh.control_plane.http_admin")

MAX_REQUEST_HEAD_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64
SVG_CACHE_S = 1.0
RENDER_TIMEOUT_S = 10.0
REFRESH_S = 3

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable", 505: "HTTP Version Not Supported"}
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
_HTML = "text/html; charset=utf-8"
_SVG = "image/svg+xml"
_SVG_CSP = "default-src 'none'; style-src 'unsafe-inline'"


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def _text(status: int, line: str) -> Response:
    return Response(status, _TEXT, (line.rstrip("\n") + "\n").encode())


@dataclass
class _SvgCache:
    at: float
    dot: str
    svg: bytes | None
    error: str


class AdminHttpServer:
    """Serves the routes above from three sources: ``metrics()`` (exposition bytes, and
    ``metrics_content_type``), ``topology()`` (the ``Admin.Topology`` answer) and
    ``render_svg(dot)`` (SVG bytes, raises ``RenderError``; default: Graphviz with
    ``RENDER_TIMEOUT_S``). ``start`` binds, ``stop`` closes; ``address`` is HOST:PORT once
    bound."""

    def __init__(self, metrics: Callable[[], bytes], metrics_content_type: str,
                 topology: Callable[[], pb.TopologyResponse],
                 render_svg: Callable[[str], bytes] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 svg_cache_s: float = SVG_CACHE_S) -> None:
        self._metrics = metrics
        self._metrics_type = metrics_content_type
        self._topology = topology
        self._render_svg = render_svg or (lambda dot: render(dot, "svg",
                                                             timeout_s=RENDER_TIMEOUT_S))
        self._clock = clock
        self._svg_cache_s = svg_cache_s
        self._svg: _SvgCache | None = None
        self._render_lock = asyncio.Lock()
        self._server: asyncio.Server | None = None
        self._open = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.address = ""

    async def start(self, host: str, port: int) -> str:
        """Bind ``host:port`` (0 = a free port) and serve; returns the bound HOST:PORT.
        Raises OSError when it cannot bind."""
        self._server = await asyncio.start_server(self._accept, host, port,
                                                  limit=MAX_REQUEST_HEAD_BYTES)
        bound = self._server.sockets[0].getsockname()
        self.address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        return self.address

    async def stop(self) -> None:
        """Stop accepting and end the connections still open. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    # ---------------------------------------------------------------- connections
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS or self._server is None:
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._open += 1
        try:
            response = await self._read_and_answer(reader)
            if response is not None:
                await asyncio.wait_for(self._write(writer, response), WRITE_TIMEOUT_S)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # ``stop`` ends the connection; ending the handler normally keeps asyncio's
            # streams from logging the cancellation as an error (Python 3.11).
            pass
        except Exception:
            log.exception("admin HTTP connection failed")
        finally:
            self._open -= 1
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _read_and_answer(self, reader: asyncio.StreamReader) -> Response | None:
        """The response to the request on ``reader``; None when it never came whole in time
        (the connection is just closed)."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            return _text(431, f"request head over {MAX_REQUEST_HEAD_BYTES} bytes")
        except ValueError:  # the limit, as some Python versions report it
            return _text(431, f"request head over {MAX_REQUEST_HEAD_BYTES} bytes")
        except (TimeoutError, asyncio.IncompleteReadError):
            return None
        if len(head) > MAX_REQUEST_HEAD_BYTES:
            return _text(431, f"request head over {MAX_REQUEST_HEAD_BYTES} bytes")
        line = head.split(b"\r\n", 1)[0]
        try:
            method, target, version = line.decode("ascii").split(" ")
        except (UnicodeDecodeError, ValueError):
            return _text(400, "malformed request line")
        if not version.startswith("HTTP/1."):
            return _text(505, "HTTP/1.x only")
        if not target.startswith("/"):
            return _text(400, "the request target must be a path")
        return await self.answer(method, target)

    async def answer(self, method: str, target: str) -> Response:
        """The response to ``method target`` (the routes in the module docstring)."""
        path = target.split("?", 1)[0].split("#", 1)[0]
        handlers = {"/": self._dashboard, "/metrics": self._metrics_page,
                    "/api/topology": self._topology_json, "/topology.svg": self._topology_svg}
        handler = handlers.get(path)
        if handler is None:
            return _text(404, f"no such page: {path[:200]}")
        if method != "GET":
            r = _text(405, f"method {method[:20]} not allowed (GET only)")
            return Response(r.status, r.content_type, r.body, (("Allow", "GET"),))
        try:
            return await handler()
        except Exception as exc:
            log.exception("admin HTTP %s failed", path)
            return _text(500, f"internal error: {type(exc).__name__}")

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, r: Response) -> None:
        head = [f"HTTP/1.1 {r.status} {_REASONS.get(r.status, 'Error')}",
                f"Content-Type: {r.content_type}", f"Content-Length: {len(r.body)}",
                "Connection: close", "Cache-Control: no-store",
                "X-Content-Type-Options: nosniff", "Referrer-Policy: no-referrer",
                *(f"{k}: {v}" for k, v in r.headers)]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + r.body)
        await writer.drain()

    # ---------------------------------------------------------------- pages
    async def _metrics_page(self) -> Response:
        return Response(200, self._metrics_type, self._metrics())

    async def _topology_json(self) -> Response:
        doc = topology_doc(self._topology())
        return Response(200, _JSON, json.dumps(doc, indent=1).encode())

    async def _topology_svg(self) -> Response:
        svg, error = await self.svg()
        if svg is None:
            return _text(503, f"cannot draw the topology: {error}")
        return Response(200, _SVG, svg, (("Content-Security-Policy", _SVG_CSP),))

    async def _dashboard(self) -> Response:
        return Response(200, _HTML, DASHBOARD_HTML, (("Content-Security-Policy", DASHBOARD_CSP),))

    async def svg(self) -> tuple[bytes | None, str]:
        """(SVG bytes, "") of the current topology, or (None, one-line reason). Drawn in a
        worker thread, one drawing at a time; a result (or a failure) is reused for
        ``svg_cache_s`` seconds, and a picture as long as the DOT text is the same."""
        dot = to_dot(topology_doc(self._topology()))
        hit = self._cached(dot)
        if hit is not None:
            return hit
        async with self._render_lock:
            hit = self._cached(dot)
            if hit is not None:
                return hit
            try:
                svg: bytes | None = await asyncio.to_thread(self._render_svg, dot)
                error = ""
            except RenderError as exc:
                svg, error = None, str(exc)
                log.warning("cannot draw the topology: %s", error)
            self._svg = _SvgCache(self._clock(), dot, svg, error)
            return svg, error

    def _cached(self, dot: str) -> tuple[bytes | None, str] | None:
        c = self._svg
        if c is None:
            return None
        if self._clock() - c.at < self._svg_cache_s or (c.svg is not None and c.dot == dot):
            return c.svg, c.error
        return None


# ---------------------------------------------------------------------- the dashboard page
_SCRIPT = """
"use strict";
const REFRESH_MS = @REFRESH_MS@;
const $ = (id) => document.getElementById(id);
const pct = (x) => (100 * x).toFixed(1) + "%";
const num = (x, d) => Number(x || 0).toFixed(d);
function row(cells, bad) {
  const tr = document.createElement("tr");
  if (bad) tr.className = "bad";
  for (const c of cells) {
    const td = document.createElement("td");
    td.textContent = c;
    tr.appendChild(td);
  }
  return tr;
}
function failing(x) { return x.requests > 0 && x.success_rate < 0.99; }
function fillTables(doc) {
  $("services").replaceChildren(...doc.services.map((s) => {
    const healthy = s.instances.filter((i) => i.healthy).length;
    const traffic = s.requests > 0;
    return row([s.name, healthy + "/" + s.instances.length,
                traffic ? num(s.rps, 1) : "-", traffic ? pct(s.success_rate) : "-",
                traffic ? num(s.p50_ms, 1) : "-", traffic ? num(s.p99_ms, 1) : "-",
                String(s.requests)], failing(s) || healthy < s.instances.length);
  }));
  $("edges").replaceChildren(...doc.edges.map((e) =>
    row([e.source + " \\u2192 " + e.destination, num(e.rps, 1), pct(e.success_rate),
         num(e.p50_ms, 1), num(e.p99_ms, 1), String(e.requests),
         e.open_breakers > 0 ? "\\u26a1 " + e.open_breakers + " open" : "-"],
        failing(e) || e.open_breakers > 0)));
  $("window").textContent = num(doc.window_s, 0);
}
let pictureUrl = "";
async function refreshPicture() {
  const r = await fetch("/topology.svg", {cache: "no-store"});
  if (!r.ok) {
    $("picture-note").textContent = (await r.text()).trim();
    return;
  }
  const url = URL.createObjectURL(await r.blob());
  $("picture").src = url;
  if (pictureUrl) URL.revokeObjectURL(pictureUrl);
  pictureUrl = url;
  $("picture-note").textContent = "";
}
async function refresh() {
  try {
    const r = await fetch("/api/topology", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    fillTables(await r.json());
    await refreshPicture();
    $("status").textContent = "updated " + new Date().toLocaleTimeString();
    $("status").className = "";
  } catch (err) {
    $("status").textContent = "cannot reach the control plane (" + err.message + ")";
    $("status").className = "bad";
  }
}
refresh();
setInterval(refresh, REFRESH_MS);
""".replace("@REFRESH_MS@", str(REFRESH_S * 1000))

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1a202c; }
h1 { font-size: 1.3em; margin: 0 0 .2em; } h2 { font-size: 1.05em; margin: 1.2em 0 .4em; }
#status { color: #4a5568; } .bad, .bad td { color: #c53030; }
table { border-collapse: collapse; } th, td { padding: .2em .8em; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { border-bottom: 1px solid #cbd5e0; }
tbody tr:nth-child(odd) { background: #f7fafc; }
#picture { max-width: 100%; border: 1px solid #e2e8f0; min-height: 2em; }
"""

_HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mesh dashboard</title>
<noscript><meta http-equiv="refresh" content="%(refresh_s)d"></noscript>
<style>%(style)s</style>
</head>
<body>
<h1>mesh dashboard</h1>
<div>golden signals of the last <span id="window">?</span> s &middot;
<span id="status">loading&hellip;</span> &middot; refreshes every %(refresh_s)d s &middot;
<a href="/metrics">metrics</a> &middot; <a href="/api/topology">topology JSON</a></div>
<h2>topology</h2>
<noscript><img src="/topology.svg" alt="mesh topology"></noscript>
<img id="picture" alt="mesh topology"><div id="picture-note" class="bad"></div>
<h2>services (calls to them)</h2>
<table><thead><tr><th>service</th><th>healthy</th><th>rps</th><th>success</th>
<th>p50 ms</th><th>p99 ms</th><th>requests</th></tr></thead><tbody id="services"></tbody></table>
<h2>edges</h2>
<table><thead><tr><th>edge</th><th>rps</th><th>success</th><th>p50 ms</th><th>p99 ms</th>
<th>requests</th><th>breakers</th></tr></thead><tbody id="edges"></tbody></table>
<script>%(script)s</script>
</body>
</html>
"""

DASHBOARD_HTML = (_HTML_TEMPLATE % {"refresh_s": REFRESH_S, "style": _STYLE,
                                    "script": _SCRIPT}).encode()
"""The dashboard page: static; its script fetches the data."""

_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
DASHBOARD_CSP = ("default-src 'none'; "
                 f"script-src 'sha256-{_SCRIPT_HASH}'; style-src 'unsafe-inline'; "
                 "img-src 'self' blob:; connect-src 'self'; base-uri 'none'; "
                 "form-action 'none'; frame-ancestors 'none'")
"""Only the page's own script runs; it reaches only this port."""
