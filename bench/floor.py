"""``python -m bench.floor [--rate R] [--rounds N] [--seconds S] [--saturation-requests N]``

Where the mesh's added latency at a low rate comes from: the mesh, nginx and a byte pipe
(``bench.pipe``: the sidecar's I/O stack, uvloop and TLS by uvloop's SSLProtocol, with no
HTTP/2 parsing and no per-call work) in the same 2-hop shape, against direct, in one run.
Fixed-rate rounds interleaved over the paths (``--rounds`` of ``--seconds`` at ``--rate``
requests per second, h2load as ``python -m bench`` runs them): added p50/p99 over all of a
path's requests (ms) and CPU per call per proxy (µs, utime+stime from /proc); then one
saturation run per path (``--saturation-requests``, 4 clients x 8 streams): req/s and CPU per
call per proxy. The pipe is the floor any relay written in Python on this stack can reach;
what the mesh spends over it is its own per-call work, and the rate column shows what that
work costs run cold.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench import h2load
from bench.certs import make_pki
from bench.measure import latency_clients
from bench.paths import BenchPath, direct_path, start_backend, start_mesh, start_nginx, start_pipe
from bench.procs import BenchError, ProcGroup
from bench.procstat import CLK_TCK, cpu_ticks
from bench.report import _table
from mesh_common.cli_args import OneLineArgumentParser
from mesh_common.numbers import finite_arg


def _cpu_us_per_call(path: BenchPath, before: dict[str, int], requests: int) -> float:
    """Mean over the path's proxies of their CPU per call since ``before`` (µs)."""
    used = [cpu_ticks(pid) - before[role] for role, pid in path.proxies.items()]
    return statistics.fmean(used) / CLK_TCK / requests * 1e6


def run(paths: list[BenchPath], body: Path, response_bytes: int, workdir: Path,
        args: argparse.Namespace) -> list[list[str]]:
    """The table's rows: path, added p50, added p99, CPU at the rate, req/s, CPU saturated."""
    clients = latency_clients(args.rate)
    requests = max(1, int(args.rate * args.seconds))
    samples: dict[str, list[float]] = {p.name: [] for p in paths}
    ticks: dict[str, int] = {p.name: 0 for p in paths}
    for p in paths:  # warm-up
        h2load.run(p.url(h2load.UNARY_PATH), body, requests=2000, clients=4, streams=8,
                   authority=p.authority)
    for rnd in range(args.rounds):
        for p in paths:
            before = {role: cpu_ticks(pid) for role, pid in p.proxies.items()}
            log_file = workdir / f"latency-{rnd}-{p.name}.log"
            what = f"{p.name}, {args.rate} rps, round {rnd + 1}"
            out = h2load.run(p.url(h2load.UNARY_PATH), body, requests=requests, clients=clients,
                             streams=8, authority=p.authority,
                             rps_per_client=args.rate / clients, log_file=log_file,
                             timeout_s=args.seconds * 3 + 30)
            h2load.check_complete(out, requests, response_bytes, what)
            samples[p.name].extend(h2load.read_latency_log(log_file, requests, what))
            if p.proxies:
                ticks[p.name] += sum(cpu_ticks(pid) - before[role]
                                     for role, pid in p.proxies.items())
    direct = h2load.latency_of(samples["direct"])
    rows = []
    for p in paths:
        lat = h2load.latency_of(samples[p.name])
        row = [p.name, f"{lat.p50_ms - direct.p50_ms:+.3f}", f"{lat.p99_ms - direct.p99_ms:+.3f}"]
        n = requests * args.rounds
        row.append(f"{ticks[p.name] / len(p.proxies) / CLK_TCK / n * 1e6:.0f}" if p.proxies else "-")
        before = {role: cpu_ticks(pid) for role, pid in p.proxies.items()}
        sat = h2load.run(p.url(h2load.UNARY_PATH), body, requests=args.saturation_requests,
                         clients=4, streams=8, authority=p.authority,
                         timeout_s=30 + args.saturation_requests / 200)
        h2load.check_complete(sat, args.saturation_requests, response_bytes, f"{p.name}, saturation")
        row.append(f"{sat.req_per_s:,.0f}")
        row.append(f"{_cpu_us_per_call(p, before, args.saturation_requests):.0f}" if p.proxies else "-")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = OneLineArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[1])
    ap.add_argument("--rate", type=int, default=200, help="requests per second (default 200)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=finite_arg, default=4.0,
                    help="per path and round (default 4)")
    ap.add_argument("--saturation-requests", type=int, default=10_000)
    args = ap.parse_args(argv)
    if args.rate <= 0 or args.rounds <= 0 or args.seconds <= 0 or args.saturation_requests <= 0:
        print("bench.floor: error: --rate, --rounds, --seconds and --saturation-requests must be "
              "positive", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    group = ProcGroup(workdir)
    try:
        pki = make_pki(workdir / "pki")
        backend = start_backend(group)
        paths = [direct_path(backend), start_mesh(group, workdir / "mesh", pki, backend),
                 start_mesh(group, workdir / "mesh-bare", pki, backend, bare=True),
                 start_nginx(group, workdir, pki, backend), start_pipe(group, pki, backend),
                 start_pipe(group, pki, backend, frames=True)]
        body = workdir / "body"
        response_bytes = h2load.write_unary_body(body)
        rows = run(paths, body, response_bytes, workdir, args)
    except BenchError as exc:
        print(f"bench.floor: {exc}", file=sys.stderr)
        return 1
    finally:
        group.stop_all()
    headers = ["path", f"added p50 @{args.rate}rps ms", "added p99 ms",
               f"CPU us/call/proxy @{args.rate}rps", "saturation req/s", "CPU us/call/proxy saturated"]
    print(_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
