"""Turn the figures of a run into the JSON document and a plain-text table.

Units: throughput in requests per second, latency in ms, CPU in µs per call (utime+stime of
one process divided by the calls it carried), memory in MB (2**20 bytes), streaming in MB/s
(10**6 bytes per second). "added" = the path's figure minus the direct path's, same run.

Headline keys are per hop: `sidecar_cpu_us_per_call` is the mean of the two sidecars (each
also in `paths.mesh.cpu_us_per_call`), `nginx_cpu_us_per_call` the mean of the two workers;
`sidecar_rss_mb_loaded` is the larger of the two sidecars' RSS (the target is per sidecar).
The `*_all_layers` keys are the same figures for the "mesh-all" path (control plane, dynamic
sidecars, every default layer on: `bench.mesh_full`); `sidecar_rss_mb_100_endpoints` is its
client sidecar's RSS, loaded, while its snapshot knows 100 endpoints; `layer_cost_us_per_call`
maps each layer to its cost (µs per call per sidecar, on minus off: `bench.layer_cost`), with
the whole rows in `layer_costs`.
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import asdict
from typing import Any

from bench.layer_cost import LayerCost
from bench.measure import PathFigures, Plan

PROXY_PATHS = ("mesh", "mesh-all", "nginx", "haproxy")
ALL_LAYERS = "mesh-all"


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def path_summary(fig: PathFigures, direct: PathFigures, nginx: PathFigures | None) -> dict[str, Any]:
    """Every raw figure of one path, plus its ratios and its latency added over direct."""
    cpu = fig.cpu_us_per_call()
    out: dict[str, Any] = {
        "saturation_rps": fig.saturation_rps,
        "saturation_rps_runs": fig.saturation_rps_runs,
        "measured_requests": fig.measured_requests,
        "throughput_ratio_vs_direct": _ratio(fig.saturation_rps, direct.saturation_rps),
        "throughput_ratio_vs_nginx": _ratio(fig.saturation_rps, nginx.saturation_rps) if nginx else None,
        "cpu_us_per_call": cpu,
        "cpu_us_per_call_mean": statistics.fmean(cpu.values()) if cpu else None,
        "backend_cpu_us_per_call": fig.backend_cpu_us_per_call(),
        "rss_mb_idle": fig.rss_mb_idle,
        "rss_mb_loaded": fig.rss_mb_loaded,
        "rss_mb_loaded_max": max(fig.rss_mb_loaded.values()) if fig.rss_mb_loaded else None,
        "latency_ms": {},
        "stream_mb_per_s": fig.stream_mb_per_s,
        "stream_mb_per_s_runs": fig.stream_mb_per_s_runs,
        "stream_ratio_vs_direct": _ratio(fig.stream_mb_per_s, direct.stream_mb_per_s),
    }
    for rate, lat in sorted(fig.latency.items()):
        base = direct.latency[rate]
        used = fig.latency_cpu_us_per_call(rate)
        proxies = [v for role, v in used.items() if role != "backend"]
        out["latency_ms"][f"{rate}rps"] = {
            "requests": lat.count,
            "p50": lat.p50_ms,
            "p99": lat.p99_ms,
            "added_p50": lat.p50_ms - base.p50_ms,
            "added_p99": lat.p99_ms - base.p99_ms,
            "cpu_us_per_call": used,
            "cpu_us_per_call_mean": statistics.fmean(proxies) if proxies else None,
        }
    return out


def build(figures: dict[str, PathFigures], plan: Plan, *, quick: bool, duration_s: float,
          loadavg_start: tuple[float, float, float], layer_costs: list[LayerCost] | None = None,
          mesh_all: dict[str, Any] | None = None, control_plane: dict[str, float] | None = None,
          saga: dict[str, float] | None = None) -> dict[str, Any]:
    """The JSON document: headline keys (mesh and mesh-all vs nginx vs direct, layer costs),
    `paths`, `layer_costs`, `mesh_all` (what proved the layers acted, the 100-endpoint RSS
    run), `quick`, `machine`."""
    direct, mesh, nginx = figures["direct"], figures["mesh"], figures["nginx"]
    paths = {name: path_summary(fig, direct, nginx) for name, fig in figures.items()}
    m, n = paths["mesh"], paths["nginx"]
    doc: dict[str, Any] = {
        "throughput_ratio_vs_nginx": m["throughput_ratio_vs_nginx"],
        "throughput_ratio_vs_direct": m["throughput_ratio_vs_direct"],
        "nginx_throughput_ratio_vs_direct": n["throughput_ratio_vs_direct"],
        "sidecar_cpu_us_per_call": m["cpu_us_per_call_mean"],
        "nginx_cpu_us_per_call": n["cpu_us_per_call_mean"],
        "sidecar_rss_mb_idle": max(mesh.rss_mb_idle.values()),
        "sidecar_rss_mb_loaded": m["rss_mb_loaded_max"],
        "nginx_rss_mb_loaded": n["rss_mb_loaded_max"],
        "stream_mb_per_s_ratio_vs_direct": m["stream_ratio_vs_direct"],
        "nginx_stream_mb_per_s_ratio_vs_direct": n["stream_ratio_vs_direct"],
    }
    for rate in plan.latency_rates:
        key = f"{rate}rps"
        for q in ("p50", "p99"):
            doc[f"added_{q}_ms_at_{key}"] = m["latency_ms"][key][f"added_{q}"]
            doc[f"nginx_added_{q}_ms_at_{key}"] = n["latency_ms"][key][f"added_{q}"]
        doc[f"sidecar_cpu_us_per_call_at_{key}"] = m["latency_ms"][key]["cpu_us_per_call_mean"]
        doc[f"nginx_cpu_us_per_call_at_{key}"] = n["latency_ms"][key]["cpu_us_per_call_mean"]
    if ALL_LAYERS in paths:
        a = paths[ALL_LAYERS]
        doc["throughput_ratio_vs_nginx_all_layers"] = a["throughput_ratio_vs_nginx"]
        doc["throughput_ratio_vs_direct_all_layers"] = a["throughput_ratio_vs_direct"]
        doc["sidecar_cpu_us_per_call_all_layers"] = a["cpu_us_per_call_mean"]
        doc["sidecar_rss_mb_loaded_all_layers"] = a["rss_mb_loaded_max"]
        doc["stream_mb_per_s_ratio_vs_direct_all_layers"] = a["stream_ratio_vs_direct"]
        for rate in plan.latency_rates:
            key = f"{rate}rps"
            for q in ("p50", "p99"):
                doc[f"added_{q}_ms_at_{key}_all_layers"] = a["latency_ms"][key][f"added_{q}"]
    if mesh_all is not None and "rss_100_endpoints" in mesh_all:
        doc["sidecar_rss_mb_100_endpoints"] = mesh_all["rss_100_endpoints"]["rss_mb"]
    if "haproxy" in paths:
        h = paths["haproxy"]
        doc["haproxy_throughput_ratio_vs_nginx"] = h["throughput_ratio_vs_nginx"]
        doc["haproxy_cpu_us_per_call"] = h["cpu_us_per_call_mean"]
    if layer_costs is not None:
        doc["layer_cost_us_per_call"] = {r.layer: r.cost_us for r in layer_costs}
        doc["layer_costs"] = [asdict(r) for r in layer_costs]
    for part in (control_plane, saga):  # full runs: flat headline keys (see their modules)
        if part is not None:
            doc.update(part)
    if mesh_all is not None:
        doc["mesh_all"] = mesh_all
    doc.update({
        "paths": paths,
        "quick": quick,
        "plan": asdict(plan),
        "duration_s": duration_s,
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_start": list(loadavg_start),
            "loadavg_end": list(os.getloadavg()),
        },
    })
    return doc


# -- plain-text table ------------------------------------------------------------------------
def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def render(doc: dict[str, Any]) -> str:
    """The run as plain-text tables (absolute figures and ratios), then the headline keys."""
    plan, paths = doc["plan"], doc["paths"]
    out: list[str] = []
    repeats = plan["repeats"]
    out.append(
        f"Saturation: h2load -n {plan['saturation_requests']} -c {plan['clients']} -m {plan['streams']}, "
        f"64-byte unary, median of {repeats} after a warm-up"
        + (" (QUICK: fewer requests and repetitions)" if doc["quick"] else "")
    )
    rows = []
    for name, p in paths.items():
        per_proc = ", ".join(f"{r} {v:.0f}" for r, v in p["cpu_us_per_call"].items())
        rss = ", ".join(f"{r} {p['rss_mb_idle'][r]:.0f}->{v:.0f}" for r, v in p["rss_mb_loaded"].items())
        rows.append([
            name, _fmt(p["saturation_rps"], ",.0f"), _fmt(p["throughput_ratio_vs_direct"], ".2f", "x"),
            _fmt(p["throughput_ratio_vs_nginx"], ".2f", "x"), _fmt(p["cpu_us_per_call_mean"], ".0f"),
            per_proc or "-", _fmt(p["backend_cpu_us_per_call"], ".0f"), rss or "-",
        ])
    out.append(_table(["path", "req/s", "vs direct", "vs nginx", "CPU us/call/hop", "per process (us/call)",
                       "backend us/call", "RSS MB idle->loaded"], rows))
    out.append("")
    out.append("Latency at a fixed rate (ms; 'added' = minus direct, same run)")
    rates = [f"{r}rps" for r in plan["latency_rates"]]
    headers = ["path"]
    for r in rates:
        headers += [f"p50@{r}", "added", f"p99@{r}", "added", "CPU us/call/hop"]
    rows = []
    for name, p in paths.items():
        row = [name]
        for r in rates:
            lat = p["latency_ms"][r]
            row += [_fmt(lat["p50"], ".3f"), _fmt(lat["added_p50"], "+.3f"),
                    _fmt(lat["p99"], ".3f"), _fmt(lat["added_p99"], "+.3f"),
                    _fmt(lat.get("cpu_us_per_call_mean"), ".0f")]
        rows.append(row)
    out.append(_table(headers, rows))
    out.append("")
    out.append(f"Streaming: one ClientStream of {plan['stream_messages']} x 1 MiB (MB = 10^6 bytes), "
               f"median of {repeats} interleaved runs")
    rows = [[name, _fmt(p["stream_mb_per_s"], ",.1f"), _fmt(p["stream_ratio_vs_direct"], ".2f", "x"),
             " ".join(f"{v:.0f}" for v in p["stream_mb_per_s_runs"])]
            for name, p in paths.items()]
    out.append(_table(["path", "MB/s", "vs direct", "runs MB/s"], rows))
    out.append("")
    if doc.get("layer_costs"):
        out.append(layer_table(doc["layer_costs"]))
        out.append("")
    if "sidecar_rss_mb_100_endpoints" in doc:
        r = doc["mesh_all"]["rss_100_endpoints"]
        out.append(f"mesh-all client sidecar with {r['endpoints']} endpoints known "
                   f"({r['registered']} more instances registered: {r['idle_services']} idle "
                   f"services x {r['instances_per_service']}), after {r['requests']:,} calls: "
                   f"RSS {r['rss_mb']:.1f} MB (before the registrations {r['rss_mb_before']:.1f} MB)")
        out.append("")
    if "cp_push_p99_ms_1000_sidecars" in doc:
        out.append("Control plane with 1,000 simulated sidecars (bench.cp_scale): config change -> "
                   f"ACK p50 {doc['cp_push_p50_ms_1000_sidecars']:.0f} ms, "
                   f"p99 {doc['cp_push_p99_ms_1000_sidecars']:.0f} ms; "
                   f"RSS {doc['cp_rss_mb_1000_sidecars']:.0f} MB; "
                   f"registrations {doc['cp_registrations_per_s']:.0f}/s")
        out.append("")
    if "saga_orders_per_s_ratio_mesh_vs_direct" in doc:
        out.append("Order saga (bench.saga): "
                   f"mesh {doc['saga_orders_per_s_mesh']:.1f} orders/s (p50 {doc['saga_p50_ms_mesh']:.0f} ms, "
                   f"p99 {doc['saga_p99_ms_mesh']:.0f} ms), direct {doc['saga_orders_per_s_direct']:.1f} "
                   f"orders/s (p50 {doc['saga_p50_ms_direct']:.0f} ms, p99 {doc['saga_p99_ms_direct']:.0f} ms): "
                   f"{doc['saga_orders_per_s_ratio_mesh_vs_direct']:.2f}x")
        out.append("")
    out.append("Headline (mesh = two sidecars; CPU and RSS per sidecar / per nginx worker; "
               "all_layers = the mesh-all path)")
    headline = [[k, _fmt(v, ".3f")] for k, v in doc.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and k != "duration_s"]
    out.append(_table(["key", "value"], headline))
    m = doc["machine"]
    out.append("")
    out.append(f"{m['nproc']} CPUs, Python {m['python']}, load average {m['loadavg_start'][0]:.2f} at start, "
               f"{m['loadavg_end'][0]:.2f} at end; took {doc['duration_s']:.0f} s. "
               "Absolute figures are noisy: compare ratios from one run.")
    return "\n".join(out)


def layer_table(rows: list[dict[str, Any]]) -> str:
    """The layer-cost rows as a table (µs of CPU per call per sidecar; see bench.layer_cost)."""
    table = [[r["layer"], _fmt(r["on_us"], ".1f"), _fmt(r["off_us"], ".1f"), _fmt(r["cost_us"], "+.1f"),
              _fmt(r.get("cost_stderr_us"), ".1f"), r["where"], r["method"]] for r in rows]
    return ("Each layer's cost: CPU us per call per sidecar, on minus off (where = the sidecar it acts "
            "in; both = mean of the two; +- = standard error over the runtime rounds)\n"
            + _table(["layer", "on us/call", "off us/call", "cost us/call", "+-", "where", "method"],
                     table))
