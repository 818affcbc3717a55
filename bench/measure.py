"""The figures of a run, taken path by path in interleaved rounds so drift hits every path alike.

* saturation: a warm-up h2load run per path, then `repeats` rounds of one fixed-count run per
  path; the figure is the median req/s. CPU per call (µs) of each proxy process (and of the
  backend) is its utime+stime over the measured runs divided by their requests (read after
  the path's `settle`, for the mesh-all sidecars once the run's spans are exported). RSS (MB) is
  read idle (after verification, before any load) and at the end of the path's last run.
* latency: fixed rate (requests per second across all clients) for a fixed count of requests
  (`latency_seconds` worth per path), split into `repeats` interleaved rounds; p50/p99 (ms)
  over all of a path's requests, from h2load's per-request logs; CPU per call (µs) of each
  proxy process and of the backend over those requests, as for saturation. At a low rate a
  process sleeps between calls and wakes with cold caches, so this is what the path's
  latency is made of on a small machine, where the processes of a call mostly run in turn.
* streaming: one ClientStream of 1 MiB messages per path, in `repeats` interleaved rounds;
  the figure is the median MB/s (10**6 bytes per second).

The layer-cost rounds (`bench.layer_cost`) take their counts from the plan too (`layer_*`,
`inproc_*`).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import grpc_client, h2load
from bench.paths import BenchPath
from bench.procs import BenchError
from bench.procstat import CLK_TCK, cpu_ticks, rss_mb


@dataclass(frozen=True)
class Plan:
    """How much load each figure gets (counts, not durations: every loop is bounded)."""

    saturation_requests: int
    warmup_requests: int
    repeats: int
    clients: int
    streams: int
    latency_rates: tuple[int, ...]
    latency_seconds: float
    stream_messages: int
    verify_unary_calls: int
    layer_rounds: int = 5
    """Runtime layer-cost rounds (each: one h2load run all on, one per layer off)."""
    layer_requests: int = 5_000
    """Requests per runtime layer-cost run."""
    inproc_rounds: int = 9
    """In-process layer-cost rounds (each: every stack once)."""
    inproc_calls: int = 5_000
    """Synthetic calls per stack per in-process round."""

    @classmethod
    def full(cls) -> Plan:
        return cls(saturation_requests=20_000, warmup_requests=4_000, repeats=3, clients=4, streams=8,
                   latency_rates=(200, 1000), latency_seconds=12, stream_messages=64,
                   verify_unary_calls=50, layer_rounds=5, layer_requests=5_000,
                   inproc_rounds=9, inproc_calls=5_000)

    @classmethod
    def quick(cls) -> Plan:
        return cls(saturation_requests=2_000, warmup_requests=400, repeats=1, clients=4, streams=8,
                   latency_rates=(200, 1000), latency_seconds=0.5, stream_messages=16,
                   verify_unary_calls=50, layer_rounds=1, layer_requests=1_000,
                   inproc_rounds=3, inproc_calls=1_000)


def latency_clients(rate: int) -> int:
    """Connections used for a fixed-rate run: one per 100 rps, at least 1, at most 4."""
    return max(1, min(4, rate // 100))


@dataclass
class PathFigures:
    """Raw figures of one path; units in the field names (rps, ms, µs, MB, MB/s)."""

    name: str
    saturation_rps_runs: list[float] = field(default_factory=list)
    measured_requests: int = 0
    cpu_ticks: dict[str, int] = field(default_factory=dict)  # role -> ticks over measured runs
    backend_cpu_ticks: int = 0
    rss_mb_idle: dict[str, float] = field(default_factory=dict)
    rss_mb_loaded: dict[str, float] = field(default_factory=dict)
    latency: dict[int, h2load.Latency] = field(default_factory=dict)  # rate (rps) -> percentiles
    latency_cpu_ticks: dict[int, dict[str, int]] = field(default_factory=dict)
    """Rate (rps) -> role -> CPU ticks over that rate's fixed-rate runs."""
    latency_backend_cpu_ticks: dict[int, int] = field(default_factory=dict)
    latency_requests: dict[int, int] = field(default_factory=dict)
    stream_mb_per_s_runs: list[float] = field(default_factory=list)

    @property
    def saturation_rps(self) -> float:
        """Median req/s over the measured runs."""
        return statistics.median(self.saturation_rps_runs)

    @property
    def stream_mb_per_s(self) -> float:
        """Median MB/s over the streaming runs."""
        return statistics.median(self.stream_mb_per_s_runs)

    def cpu_us_per_call(self) -> dict[str, float]:
        """Per proxy role: CPU time (utime+stime) per request, in µs."""
        return {role: t / CLK_TCK / self.measured_requests * 1e6 for role, t in self.cpu_ticks.items()}

    def backend_cpu_us_per_call(self) -> float:
        """The backend's CPU time per request on this path, in µs."""
        return self.backend_cpu_ticks / CLK_TCK / self.measured_requests * 1e6

    def latency_cpu_us_per_call(self, rate: int) -> dict[str, float]:
        """Per proxy role, and "backend": CPU time per request over the runs at ``rate``, µs."""
        n = self.latency_requests.get(rate, 0)
        if not n:
            return {}
        ticks = {**self.latency_cpu_ticks.get(rate, {}),
                 "backend": self.latency_backend_cpu_ticks.get(rate, 0)}
        return {role: t / CLK_TCK / n * 1e6 for role, t in ticks.items()}


class Runner:
    """Runs the plan over the paths; files (body, latency logs) go under `workdir`."""

    def __init__(self, paths: list[BenchPath], backend_pid: int, plan: Plan, workdir: Path,
                 log: Callable[[str], None] | None = None) -> None:
        self.paths = paths
        self.backend_pid = backend_pid
        self.plan = plan
        self.workdir = workdir
        self.body = workdir / "unary-body.bin"
        self.response_bytes = h2load.write_unary_body(self.body, 64)
        self.figures = {p.name: PathFigures(p.name) for p in paths}
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._log_seq = 0

    # -- steps ---------------------------------------------------------------------------
    def verify(self) -> None:
        """grpcio sample calls on every path; BenchError on any non-OK status. Then idle RSS."""
        for p in self.paths:
            try:
                grpc_client.verify(p, unary_calls=self.plan.verify_unary_calls)
                p.check_alive()
            except BenchError as e:
                raise p.explain(e)
            self.log(f"verified {p.name}: {self.plan.verify_unary_calls} unary, 1 client-stream, 1 bidi: all OK")
        for p in self.paths:
            self.figures[p.name].rss_mb_idle = {role: rss_mb(pid) for role, pid in p.proxies.items()}

    def _saturate(self, p: BenchPath, requests: int, what: str) -> h2load.H2loadResult:
        try:
            result = h2load.run(p.url(h2load.UNARY_PATH), self.body, requests=requests,
                                clients=self.plan.clients, streams=self.plan.streams,
                                authority=p.authority, timeout_s=30 + requests / 200)
            h2load.check_complete(result, requests, self.response_bytes, f"{p.name} path, {what}")
            p.check_alive()
        except BenchError as e:
            raise p.explain(e)
        return result

    def saturation(self) -> None:
        """Warm-up, then `repeats` interleaved rounds of measured runs with CPU and RSS."""
        for p in self.paths:
            self._saturate(p, self.plan.warmup_requests, "warm-up")
        n = self.plan.saturation_requests
        for rnd in range(1, self.plan.repeats + 1):
            for p in self.paths:
                fig = self.figures[p.name]
                p.settled()
                before = {role: cpu_ticks(pid) for role, pid in p.proxies.items()}
                backend_before = cpu_ticks(self.backend_pid)
                result = self._saturate(p, n, f"saturation round {rnd}")
                p.settled()
                for role, pid in p.proxies.items():
                    fig.cpu_ticks[role] = fig.cpu_ticks.get(role, 0) + cpu_ticks(pid) - before[role]
                fig.backend_cpu_ticks += cpu_ticks(self.backend_pid) - backend_before
                fig.measured_requests += result.succeeded
                fig.saturation_rps_runs.append(result.req_per_s)
                fig.rss_mb_loaded = {role: rss_mb(pid) for role, pid in p.proxies.items()}
                self.log(f"saturation round {rnd}/{self.plan.repeats} {p.name}: {result.req_per_s:,.0f} req/s")

    def latency(self) -> None:
        """Fixed-rate runs: per rate, ``repeats`` rounds interleaved over the paths (each a
        fresh h2load log of ``latency_seconds / repeats`` worth of requests); p50/p99 over
        every request of a path's rounds."""
        rounds = self.plan.repeats
        for rate in self.plan.latency_rates:
            clients = latency_clients(rate)
            requests = max(1, int(rate * self.plan.latency_seconds / rounds))
            samples: dict[str, list[float]] = {p.name: [] for p in self.paths}
            for rnd in range(1, rounds + 1):
                for p in self.paths:
                    self._log_seq += 1
                    log_file = self.workdir / f"latency-{self._log_seq}-{p.name}-{rate}rps.log"
                    what = f"{p.name} path, {rate} rps, round {rnd}/{rounds}"
                    fig = self.figures[p.name]
                    p.settled()
                    before = {role: cpu_ticks(pid) for role, pid in p.proxies.items()}
                    backend_before = cpu_ticks(self.backend_pid)
                    try:
                        result = h2load.run(p.url(h2load.UNARY_PATH), self.body, requests=requests,
                                            clients=clients, streams=8, authority=p.authority,
                                            rps_per_client=rate / clients, log_file=log_file,
                                            timeout_s=self.plan.latency_seconds * 3 + 30)
                        h2load.check_complete(result, requests, self.response_bytes, what)
                        samples[p.name].extend(h2load.read_latency_log(log_file, requests, what))
                        p.check_alive()
                    except BenchError as e:
                        raise p.explain(e)
                    p.settled()
                    used = fig.latency_cpu_ticks.setdefault(rate, {})
                    for role, pid in p.proxies.items():
                        used[role] = used.get(role, 0) + cpu_ticks(pid) - before[role]
                    fig.latency_backend_cpu_ticks[rate] = (fig.latency_backend_cpu_ticks.get(rate, 0)
                                                           + cpu_ticks(self.backend_pid) - backend_before)
                    fig.latency_requests[rate] = fig.latency_requests.get(rate, 0) + requests
            for p in self.paths:
                lat = h2load.latency_of(samples[p.name])
                self.figures[p.name].latency[rate] = lat
                self.log(f"latency {rate} rps {p.name}: p50 {lat.p50_ms:.3f} ms, p99 "
                         f"{lat.p99_ms:.3f} ms ({lat.count} requests in {rounds} rounds)")

    def streaming(self) -> None:
        """`repeats` interleaved rounds of one ClientStream of `stream_messages` x 1 MiB per
        path; every run is logged, the figure is the median."""
        for rnd in range(1, self.plan.repeats + 1):
            for p in self.paths:
                try:
                    mbps = grpc_client.stream_throughput(
                        p, self.plan.stream_messages, timeout_s=10 + self.plan.stream_messages / 2)
                    p.check_alive()
                except BenchError as e:
                    raise p.explain(e)
                self.figures[p.name].stream_mb_per_s_runs.append(mbps)
                self.log(f"streaming round {rnd}/{self.plan.repeats} {p.name}: {mbps:,.1f} MB/s")

    def run_all(self) -> dict[str, PathFigures]:
        self.verify()
        self.saturation()
        self.latency()
        self.streaming()
        return self.figures
