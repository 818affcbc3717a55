"""The live status panel of ``demo run``: instances and health (the control plane's
ListSidecars and Topology, over mTLS as meshctl), orders from the load generator's /stats,
the API gateway's traffic (its /metrics), and how to look at the mesh from another
terminal."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from . import procs
from .admin import AdminClient
from .settings import Settings
from .state import DemoState

HTTP_TIMEOUT_S = 1.0


def loadgen_stats(state: DemoState) -> dict[str, Any] | None:
    """The load generator's GET /stats document, or None when it does not answer."""
    found = state.find("loadgen")
    if not found or not found[0].control:
        return None
    try:
        with urllib.request.urlopen(f"http://{found[0].control}/stats",
                                    timeout=HTTP_TIMEOUT_S) as r:
            return json.load(r)
    except (OSError, ValueError):
        return None


def gateway_counts(metrics_text: str) -> dict[str, float]:
    """From the gateway's Prometheus text: ``requests`` (all answers), ``2xx``, ``4xx``,
    ``5xx``, ``rate_limited`` (429s) and ``auth_refused`` (401s) since it started. Pure;
    raises ValueError for text that is not Prometheus exposition."""
    out = dict.fromkeys(("requests", "2xx", "4xx", "5xx", "rate_limited", "auth_refused"),
                        0.0)
    for fam in text_string_to_metric_families(metrics_text):
        for sample in fam.samples:
            if sample.name == "gateway_http_requests_total":
                out["requests"] += sample.value
                cls = f"{sample.labels.get('code', '0')[:1]}xx"
                if cls in out:
                    out[cls] += sample.value
            elif sample.name == "gateway_rate_limited_total":
                out["rate_limited"] += sample.value
            elif sample.name == "gateway_auth_refused_total":
                out["auth_refused"] += sample.value
    return out


def gateway_stats(state: DemoState) -> dict[str, float] | None:
    """``gateway_counts`` of the demo's gateway, or None when it does not answer."""
    found = state.find("gateway")
    if not found or not found[0].address:
        return None
    try:
        with urllib.request.urlopen(f"http://{found[0].address}/metrics",
                                    timeout=HTTP_TIMEOUT_S) as r:
            return gateway_counts(r.read().decode())
    except (OSError, ValueError):
        return None


def hints(settings: Settings) -> list[str]:
    """How to use meshctl and the chaos script from another terminal (with the environment
    this demo needs when it does not run on the defaults)."""
    env = []
    if settings.api != "127.0.0.1:15010":
        env.append(f"MESH_CONTROL_PLANE={settings.api}")
    if settings.ca_dir != (Path.cwd() / "certs").resolve():
        env.append(f"MESH_CERTS_DIR={settings.ca_dir}")
    pre = " ".join(env) + " " if env else ""
    demo_dir = "" if settings.dir == (Path.cwd() / ".mesh").resolve() else \
        f"MESH_DEMO_DIR={settings.dir} "
    return [
        f"{pre}meshctl status | meshctl topology | meshctl top | meshctl traces",
        f"curl -H \"Authorization: Bearer $({demo_dir}python -m demo_services.gateway token "
        f"alice)\" http://{settings.gateway}/v1/orders",
        f"dashboard: http://{settings.admin_http}/  (metrics: /metrics)",
        "make check  (pause the load, audit the saga's invariants, resume)",
        "make chaos  (break replicas on purpose: the chaos issue)",
    ]


class StatusPanel:
    """Renders one frame of the panel per call; keeps one admin channel open."""

    def __init__(self, settings: Settings, state: DemoState) -> None:
        self.settings = settings
        self.state = state
        self.admin = AdminClient(state.control_plane["api"], settings.ca_dir)
        self.started = time.monotonic()
        self._gw_last: tuple[float, float] | None = None   # (monotonic, requests)

    def close(self) -> None:
        self.admin.close()

    def _instances(self) -> RenderableType:
        table = Table(expand=True, box=box.SIMPLE_HEAD, pad_edge=False)
        for col in ("service", "instance", "app", "health", "sidecar", "snapshot"):
            table.add_column(col)
        try:
            sidecars, latest = self.admin.sidecars()
        except grpc.RpcError as exc:
            return Text(f"control plane at {self.state.control_plane['api']}: "
                        f"{exc.code().name}", style="red")  # type: ignore[attr-defined]
        apps = {p.instance: p for p in self.state.find("app")}
        for s in sorted(sidecars, key=lambda s: (s.service, s.instance)):
            app = apps.get(s.instance)
            app_cell = ("-" if app is None else
                        Text("up", style="green") if procs.is_ours(app) else
                        Text("exited", style="red"))
            health = Text(s.health or "-", style="green" if s.health == "SERVING"
                          else "yellow" if not s.health else "red")
            sync = Text(s.state + ("" if s.connected else " (down)"),
                        style="green" if s.state == "SYNCED" and s.connected else "yellow")
            table.add_row(s.service, s.instance, app_cell, health, sync,
                          f"v{s.acked_version or '-'} / v{latest}")
        return table

    def _traffic(self) -> RenderableType:
        table = Table(expand=True, box=box.SIMPLE_HEAD, pad_edge=False)
        for col in ("traffic (report window)", "rps", "success", "p50 ms", "p99 ms"):
            table.add_column(col, justify="left" if col.startswith("traffic") else "right")
        try:
            topo = self.admin.topology()
        except grpc.RpcError:
            return Text("")
        for e in sorted(topo.edges, key=lambda e: (e.source, e.destination)):
            table.add_row(f"{e.source} → {e.destination}", f"{e.rps:.1f}",
                          f"{100 * e.success_rate:.1f}%", f"{e.p50_ms:.1f}", f"{e.p99_ms:.1f}")
        return table

    def _orders(self) -> RenderableType:
        st = loadgen_stats(self.state)
        if st is None:
            return Text("load generator: not answering", style="red")
        errors = ", ".join(f"{k} {v}" for k, v in sorted(st.get("errors", {}).items())) or "none"
        line = Text()
        line.append(f"orders: confirmed {st['confirmed']}", style="green")
        line.append(f" · cancelled {st['cancelled']}", style="yellow")
        line.append(f" · pending {st['pending']} · in flight {st['in_flight']}")
        line.append(f" · {st['rps']:.1f} req/s (target {st['target_rps']:g})")
        line.append(f" · errors: {errors}", style="red" if st.get("errors") else "")
        if st.get("paused"):
            line.append(" · PAUSED", style="bold yellow")
        reasons = st.get("cancel_reasons") or {}
        if reasons:
            line.append("\ncancelled because: " + ", ".join(
                f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:4]))
        return line

    def _gateway(self) -> RenderableType:
        found = self.state.find("gateway")
        if not found:
            return Text("")
        st = gateway_stats(self.state)
        if st is None:
            return Text(f"gateway http://{found[0].address}: not answering", style="red")
        now = time.monotonic()
        rps = 0.0
        if self._gw_last is not None and now > self._gw_last[0]:
            rps = max(0.0, (st["requests"] - self._gw_last[1]) / (now - self._gw_last[0]))
        self._gw_last = (now, st["requests"])
        line = Text()
        line.append(f"gateway http://{found[0].address}: ", style="bold")
        line.append(f"{st['requests']:.0f} requests · {rps:.1f} req/s · ")
        line.append(f"2xx {st['2xx']:.0f}", style="green")
        line.append(f" · 4xx {st['4xx']:.0f}", style="yellow" if st["4xx"] else "")
        line.append(f" · 5xx {st['5xx']:.0f}", style="red" if st["5xx"] else "")
        line.append(f" · rate-limited {st['rate_limited']:.0f} · auth refused "
                    f"{st['auth_refused']:.0f}")
        return line

    def render(self) -> RenderableType:
        up_s = int(time.monotonic() - self.started)
        head = Text(f"control plane {self.state.control_plane['api']} · up "
                    f"{up_s // 60}m{up_s % 60:02d}s · Ctrl-C stops everything", style="bold")
        help_text = Text("from another terminal: " + "\n  ".join(hints(self.settings)),
                         style="dim")
        return Panel(Group(head, self._instances(), self._traffic(), self._orders(),
                           self._gateway(), help_text), title="grpc-mesh demo")
