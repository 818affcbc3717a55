"""``python -m bench.ab TREE_A TREE_B [--rounds N] [--requests N] [--clients C --streams M] [--stream-mib N] [--latency-rps R [--split]]``

Compare the sidecar of two source trees (e.g. ``git worktree add /tmp/base HEAD~1`` against
the working tree) in one run: one backend, two meshes (client sidecar → mTLS → echo sidecar),
h2load rounds interleaved A, B, A, B... so machine drift hits both alike. Prints, per tree,
CPU per call per sidecar (µs, utime+stime from /proc) and req/s, medians over the rounds,
and the B/A ratio. With ``--stream-mib N`` the rounds are instead one ClientStream of N x 1 MiB
messages (grpcio) per tree: CPU per MiB per sidecar (ms) and MB/s. With ``--latency-rps R``
they are fixed-rate runs of ``--latency-s`` seconds at R requests per second through direct
(client → backend), A and B: p50 and p99 (ms), what each tree adds to direct's and its CPU per
call per sidecar at that rate (µs), medians over the rounds; ``--split`` also times every read
inside the sidecars (``bench/traversal_timer.py``) and prints where a call's time in them goes,
far steadier than the end-to-end figures. This machine's absolute figures
move ±20% between runs; an interleaved ratio is what tells whether a change helped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench import grpc_client, h2load
from bench.certs import make_pki
from bench.measure import latency_clients
from bench.paths import BenchPath, start_backend
from bench.procs import BenchError, Proc, ProcGroup
from bench.procstat import cpu_seconds
from mesh_common.cli_args import OneLineArgumentParser
from mesh_common.numbers import finite_arg
from tests.support.sidecar import sidecar_config

URL = "http://127.0.0.1:{port}/meshtest.Echo/Unary"


TIMER = Path(__file__).with_name("traversal_timer.py")
SIDES = ("request", "response")
"""A sidecar's two traversals of a call: the request's read (downstream) and the response's
(upstream)."""


def _sidecar(group: ProcGroup, workdir: Path, name: str, tree: str, cfg: dict,
             timed: bool = False) -> Proc:
    """Start a standalone sidecar of ``tree``; ``timed``: under ``traversal_timer.py``, its
    samples to ``workdir/<name>.reads.jsonl`` when it stops."""
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = [str(TIMER), str(workdir / f"{name}.reads.jsonl")] if timed else ["-m", "sidecar.main"]
    cmd = [sys.executable, *run, "--config", str(path), "--log-level", "warning"]
    return group.start_ready_line(name, cmd, env={"PYTHONPATH": tree}, cwd=tree)


def main(argv: list[str] | None = None) -> int:
    ap = OneLineArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[1])
    ap.add_argument("tree_a")
    ap.add_argument("tree_b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--stream-mib", type=int, default=0, metavar="N",
                    help="measure streaming (N x 1 MiB per round) instead of unary calls")
    ap.add_argument("--latency-rps", type=int, default=0, metavar="R",
                    help="measure latency at R requests per second instead (with direct)")
    ap.add_argument("--latency-s", type=finite_arg, default=5.0,
                    help="seconds per fixed-rate run (default 5)")
    ap.add_argument("--split", action="store_true",
                    help="with --latency-rps: also time each read inside the sidecars "
                         "(bench/traversal_timer.py) and print, per tree, sidecar and "
                         "traversal, the relay's processing, the write and read-to-write (p50)")
    args = ap.parse_args(argv)
    if args.split and args.latency_rps <= 0:
        print("bench.ab: error: --split needs --latency-rps", file=sys.stderr)
        return 2
    for tree in (args.tree_a, args.tree_b):
        if not (Path(tree) / "sidecar" / "main.py").is_file():
            print(f"bench.ab: error: {tree} has no sidecar/main.py", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    group = ProcGroup(workdir)
    try:
        pki = make_pki(workdir / "pki")
        backend = start_backend(group)
        body = workdir / "body"
        response_bytes = h2load.write_unary_body(body)
        meshes: dict[str, tuple[int, list[int]]] = {}
        sidecars: list[tuple[str, Proc]] = []
        for label, tree in (("A", args.tree_a), ("B", args.tree_b)):
            echo = _sidecar(group, workdir, f"echo-{label}", tree, sidecar_config(
                service="echo", tls=pki.echo, app_port=int(backend.ready["port"])), args.split)
            client = _sidecar(group, workdir, f"client-{label}", tree, sidecar_config(
                service="client", tls=pki.client, clusters={"echo": [(echo.ready["inbound"], None)]}),
                args.split)
            sidecars += [(f"client-{label}", client), (f"echo-{label}", echo)]
            port = int(client.ready["outbound"].rpartition(":")[2])
            meshes[label] = (port, [client.pid, echo.pid])
            h2load.run(URL.format(port=port), body, requests=2000, clients=args.clients,
                       streams=args.streams, authority="echo")  # warm-up
        if args.stream_mib > 0:
            return _streaming(meshes, args.rounds, args.stream_mib, args.tree_a, args.tree_b)
        if args.latency_rps > 0:
            ports = {"direct": int(backend.ready["port"]),
                     **{label: port for label, (port, _) in meshes.items()}}
            pids = {"direct": [], **{label: p for label, (_, p) in meshes.items()}}
            window = time.monotonic()
            rc = _latency(ports, pids, body, response_bytes, workdir, args)
            if args.split:
                window_end = time.monotonic()
                for _, proc in sidecars:
                    proc.stop(10.0)  # the timer writes its samples as the sidecar exits
                _print_split(workdir, sidecars, window, window_end)
            return rc
        cpu: dict[str, list[float]] = {k: [] for k in meshes}
        rps: dict[str, list[float]] = {k: [] for k in meshes}
        for _ in range(args.rounds):
            for label, (port, pids) in meshes.items():
                before = sum(cpu_seconds(p) for p in pids)
                out = h2load.run(URL.format(port=port), body, requests=args.requests,
                                 clients=args.clients, streams=args.streams, authority="echo")
                h2load.check_complete(out, args.requests, response_bytes, f"mesh {label}")
                used = sum(cpu_seconds(p) for p in pids) - before
                cpu[label].append(used / args.requests / len(pids) * 1e6)
                rps[label].append(out.req_per_s)
        for label, tree in (("A", args.tree_a), ("B", args.tree_b)):
            print(f"{label} {tree}: {statistics.median(cpu[label]):.1f} us/call/sidecar "
                  f"(rounds {[round(x) for x in cpu[label]]}), {statistics.median(rps[label]):,.0f} req/s")
        print(f"B/A CPU per call: {statistics.median(cpu['B']) / statistics.median(cpu['A']):.3f}")
        return 0
    except BenchError as exc:
        print(f"bench.ab: {exc}", file=sys.stderr)
        return 1
    finally:
        group.stop_all()


def _streaming(meshes: dict[str, tuple[int, list[int]]], rounds: int, mib: int,
               tree_a: str, tree_b: str) -> int:
    """Interleaved ClientStream rounds; prints CPU ms per MiB per sidecar and MB/s."""
    cpu: dict[str, list[float]] = {k: [] for k in meshes}
    rate: dict[str, list[float]] = {k: [] for k in meshes}
    for _ in range(rounds):
        for label, (port, pids) in meshes.items():
            path = BenchPath(name=f"mesh {label}", port=port, authority="echo")
            before = sum(cpu_seconds(p) for p in pids)
            rate[label].append(grpc_client.stream_throughput(path, mib, timeout_s=60 + mib))
            cpu[label].append((sum(cpu_seconds(p) for p in pids) - before) / mib / len(pids) * 1e3)
    for label, tree in (("A", tree_a), ("B", tree_b)):
        print(f"{label} {tree}: {statistics.median(cpu[label]):.2f} ms/MiB/sidecar "
              f"(rounds {[round(x, 2) for x in cpu[label]]}), {statistics.median(rate[label]):,.0f} MB/s")
    print(f"B/A CPU per MiB: {statistics.median(cpu['B']) / statistics.median(cpu['A']):.3f}, "
          f"B/A MB/s: {statistics.median(rate['B']) / statistics.median(rate['A']):.3f}")
    return 0


def _latency(ports: dict[str, int], pids: dict[str, list[int]], body: Path, response_bytes: int,
             workdir: Path, args: argparse.Namespace) -> int:
    """Interleaved fixed-rate rounds (direct, A, B); prints p50/p99, added vs direct, and each
    tree's CPU per call per sidecar at that rate (µs)."""
    rate = args.latency_rps
    clients = latency_clients(rate)
    requests = int(rate * args.latency_s)
    p50: dict[str, list[float]] = {k: [] for k in ports}
    p99: dict[str, list[float]] = {k: [] for k in ports}
    cpu: dict[str, list[float]] = {k: [] for k in ports}
    for rnd in range(args.rounds):
        for label, port in ports.items():
            before = sum(cpu_seconds(p) for p in pids[label])
            log_file = workdir / f"latency-{rnd}-{label}.log"
            what = f"{label}, {rate} rps"
            out = h2load.run(URL.format(port=port), body, requests=requests, clients=clients,
                             streams=8, authority="echo", rps_per_client=rate / clients,
                             log_file=log_file, timeout_s=args.latency_s * 3 + 30)
            if pids[label]:
                used = sum(cpu_seconds(p) for p in pids[label]) - before
                cpu[label].append(used / requests / len(pids[label]) * 1e6)
            h2load.check_complete(out, requests, response_bytes, what)
            lat = h2load.latency_of(h2load.read_latency_log(log_file, requests, what))
            p50[label].append(lat.p50_ms)
            p99[label].append(lat.p99_ms)
    base50, base99 = statistics.median(p50["direct"]), statistics.median(p99["direct"])
    for label in ports:
        m50, m99 = statistics.median(p50[label]), statistics.median(p99[label])
        used = f", CPU {statistics.median(cpu[label]):.0f} us/call/sidecar" if cpu[label] else ""
        print(f"{label:6s} p50 {m50:.3f} ms (+{m50 - base50:.3f}), p99 {m99:.3f} ms "
              f"(+{m99 - base99:.3f}){used}; rounds p50 {[round(x, 3) for x in p50[label]]}")
    return 0


def _print_split(workdir: Path, sidecars: list[tuple[str, Proc]], start: float,
                 end: float) -> None:
    """Per sidecar and traversal, over the reads of the fixed-rate rounds (``start``..``end``,
    monotonic s): p50 of the relay's processing, the write, read-to-write and the work after
    the write (µs), and the share of reads whose write waited for a later loop pass; per
    tree, the sum of the four processing p50s (the relay's own work on a call's path). The
    write is not summed: a sidecar woken by another's write on the same core runs inside
    that write."""
    print("sidecar   traversal  reads  process  write  read->write  after  written later")
    totals: dict[str, float] = {}
    for name, _ in sidecars:
        path = workdir / f"{name}.reads.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        rows = [r for r in rows if start <= r["t"] <= end]
        for side in SIDES:
            got = [r for r in rows if r["side"] == side]
            wrote = [r for r in got if r["write"] >= 0]
            if not wrote:
                print(f"{name:9s} {side:9s}  {len(got):5d}  (no read wrote before returning)")
                continue
            med = {k: statistics.median(r[k] for r in wrote) for k in ("process", "write",
                                                                          "to_write", "after")}
            totals[name[-1]] = totals.get(name[-1], 0.0) + med["process"]
            print(f"{name:9s} {side:9s}  {len(got):5d}  {med['process']:7.0f}  {med['write']:5.0f}"
                  f"  {med['to_write']:11.0f}  {med['after']:5.0f}  "
                  f"{100 * (len(got) - len(wrote)) / len(got):12.0f}%")
    for label, total in sorted(totals.items()):
        print(f"{label}: the relay's processing on a call's path (p50s of its four traversals "
              f"summed): {total:.0f} us")


if __name__ == "__main__":
    sys.exit(main())
