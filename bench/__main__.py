"""``python -m bench [--quick] [--json FILE] [--keep-dir]``: the data path benchmark.

Starts the backend and every path (direct, mesh, mesh-all, nginx, haproxy when installed) as
processes, checks each with grpcio (and mesh-all's layers at work from the sidecars' /stats),
measures, then each layer's cost (on versus off) and the mesh-all client's RSS with 100
endpoints known; a full run then measures a control plane with 1,000 simulated sidecars
(``bench.cp_scale``) and the order saga through the demo mesh against the same services wired
directly (``bench.saga``). It prints plain-text tables on stdout and, with ``--json``, writes every
figure. Progress goes to stderr. Exit 0 on success, 1 when a path or a measurement failed
(one clear message on stderr), 130 when interrupted. Every process started is stopped by PID
at the end, also on failure; the working directory is removed unless ``--keep-dir``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from bench import cp_scale, h2load, layer_cost, mesh_full, paths, report, saga
from bench.certs import make_pki
from bench.measure import Plan, Runner
from bench.procs import BenchError, ProcGroup
from mesh_common.cli_args import OneLineArgumentParser

REQUIRED_KEYS = (
    "throughput_ratio_vs_nginx",
    "sidecar_cpu_us_per_call",
    "nginx_cpu_us_per_call",
    "sidecar_rss_mb_loaded",
    "added_p50_ms_at_200rps",
    "added_p99_ms_at_200rps",
    "nginx_added_p50_ms_at_200rps",
    "added_p50_ms_at_1000rps",
    "sidecar_cpu_us_per_call_at_200rps",
    "nginx_cpu_us_per_call_at_200rps",
    "stream_mb_per_s_ratio_vs_direct",
    "throughput_ratio_vs_nginx_all_layers",
    "sidecar_cpu_us_per_call_all_layers",
    "added_p99_ms_at_200rps_all_layers",
    "added_p50_ms_at_200rps_all_layers",
    "sidecar_rss_mb_100_endpoints",
)
"""Numeric keys every run must produce; ``layer_cost_us_per_call`` (an object) is checked too."""

FULL_ONLY_KEYS = (
    "cp_push_p50_ms_1000_sidecars",
    "cp_push_p99_ms_1000_sidecars",
    "cp_rss_mb_1000_sidecars",
    "cp_registrations_per_s",
    "saga_orders_per_s_ratio_mesh_vs_direct",
    "saga_p99_ms_mesh",
    "saga_p99_ms_direct",
)
"""Numeric keys of the parts a full run adds (``--quick`` skips them): the control plane at
1,000 simulated sidecars (``bench.cp_scale``) and the saga, mesh against direct
(``bench.saga``)."""


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived; unwinds so the processes are stopped."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_keys(doc: dict) -> None:
    """BenchError unless every required key (and on a full run every ``FULL_ONLY_KEYS``) is a
    finite number and ``layer_cost_us_per_call`` has a finite cost for every layer measured."""
    keys = REQUIRED_KEYS if doc.get("quick") else REQUIRED_KEYS + FULL_ONLY_KEYS
    bad = [k for k in keys if not _finite(doc.get(k))]
    costs = doc.get("layer_cost_us_per_call")
    expected = {s.layer for s in layer_cost.SWITCHES} | set(layer_cost.IN_PROCESS_LAYERS) | {
        s.layer + layer_cost.IN_PROCESS_SUFFIX for s in layer_cost.SWITCHES}
    if not isinstance(costs, dict) or set(costs) != expected \
            or not all(_finite(v) for v in costs.values()):
        bad.append("layer_cost_us_per_call")
    if bad:
        raise BenchError(f"figures missing or not numeric: {', '.join(bad)}")


def run(quick: bool, workdir: Path) -> dict:
    """Start everything under `workdir`, measure, and return the JSON document."""
    started = time.monotonic()
    loadavg = os.getloadavg()
    plan = Plan.quick() if quick else Plan.full()
    h2load.h2load_binary()
    group = ProcGroup(log_dir=workdir)
    mesh_all: mesh_full.MeshAll | None = None
    try:
        _log(f"working directory {workdir}")
        pki = make_pki(workdir / "pki")
        backend = paths.start_backend(group)
        mesh_all = mesh_full.start_mesh_all(group, workdir / "mesh-all", backend, _log)
        bench_paths = [paths.direct_path(backend),
                       paths.start_mesh(group, workdir / "mesh", pki, backend),
                       mesh_all.path,
                       paths.start_nginx(group, workdir, pki, backend)]
        if paths.haproxy_available():
            bench_paths.append(paths.start_haproxy(group, workdir / "haproxy", pki, backend))
        else:
            _log("haproxy not installed: its path is skipped")
        _log("started: " + ", ".join(f"{p.name} on :{p.port}" for p in bench_paths))
        runner = Runner(bench_paths, backend.pid, plan, workdir, log=_log)
        figures = runner.run_all()
        # Each layer's cost, on the same mesh-all sidecars (left with every layer on), then
        # its client's RSS once its snapshot knows 100 endpoints (registrations added last:
        # they stay).
        lplan = layer_cost.LayerPlan(rounds=plan.layer_rounds, requests=plan.layer_requests,
                                     clients=plan.clients, streams=plan.streams,
                                     inproc_rounds=plan.inproc_rounds,
                                     inproc_calls=plan.inproc_calls)
        runtime, held = layer_cost.runtime_costs(mesh_all, runner.body, runner.response_bytes,
                                                 lplan, _log)
        export = layer_cost.SpanExport(mesh_all)
        try:
            costs = [*layer_cost.inprocess_costs(held, lplan, _log, export), *runtime]
        finally:
            export.close()
        rss_100 = mesh_full.rss_with_endpoints(
            group, mesh_all, workdir / "mesh-all", runner.body, runner.response_bytes,
            requests=plan.warmup_requests, clients=plan.clients, streams=plan.streams, log=_log)
        group.check_alive()
    finally:
        if mesh_all is not None:
            mesh_all.close()
        group.stop_all()
    later: dict = {}
    if not quick:
        # The control plane at 1,000 sidecars, then the saga: each on a machine the data
        # path's processes have left.
        group = ProcGroup(log_dir=workdir)
        try:
            later["control_plane"] = cp_scale.run(workdir / "cp-scale", group, sidecars=1000,
                                                  changes=5, log=_log)
            group.stop_all()
            later["saga"] = saga.run(workdir / "saga", group, orders=2000, in_flight=16, log=_log)
        finally:
            group.stop_all()
    doc = report.build(figures, plan, quick=quick, duration_s=time.monotonic() - started,
                       loadavg_start=loadavg, layer_costs=costs,
                       mesh_all={"layers_at_work": mesh_all.evidence, "rss_100_endpoints": rss_100},
                       control_plane=later.get("control_plane"), saga=later.get("saga"))
    check_keys(doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = OneLineArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and repetitions (< 1 minute)")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON to FILE")
    ap.add_argument("--keep-dir", action="store_true",
                    help="keep the working directory (configs, certificates, logs)")
    args = ap.parse_args(argv)

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    failed = True  # until the run got through
    try:
        doc = run(args.quick, workdir)
        print(report.render(doc), flush=True)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
            _log(f"wrote {args.json}")
        failed = False
        return 0
    except BenchError as e:
        print(f"bench: FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    except Interrupted as e:
        print(f"bench: interrupted ({e})", file=sys.stderr, flush=True)
        return 130
    finally:
        if args.keep_dir:
            _log(f"kept {workdir} (configs, certificates, process logs)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            if failed:
                _log("working directory removed; rerun with --keep-dir to keep the process logs")


if __name__ == "__main__":
    sys.exit(main())
