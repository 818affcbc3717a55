"""Each layer's own cost: CPU µs per call per sidecar with the layer on minus off.

**runtime** (layers that config switches: route rule, timeout, retry + budget, outlier
detection, peak-EWMA against round robin, authorization): on the mesh-all sidecars
themselves. After a warm-up run, a round runs h2load (a fixed count, the Runner's clients and
streams) once with every layer on and once per layer with only that layer off, the config
switched between runs through the control plane (``Admin.ApplyConfig``/``DeleteConfig``/
``SetAuthzDefault``) and each run started only once every sidecar ACKed the new snapshot
version (a switch that leaves the version as it was fails the run). CPU = utime+stime
(``/proc``) of the sidecar the layer acts in (the client sidecar for the outbound layers, the
echo sidecar for authorization) over the run, read once every span of the run is exported
(the export task sends them up to 1 s later), ÷ requests. Rounds alternate their order
(forward, then backward) so drift hits on and off alike; on and off are medians over rounds,
the cost is the median of the per-round differences, and their standard error says how much
this shared machine's noise can hide (identical runs differ by 10-20 µs per call).

**in-process**: the real ``sidecar.stack`` stacks (outbound = the client sidecar's, inbound =
echo's, built as ``sidecar.process`` builds them) over the snapshots the mesh-all client held,
driven with synthetic calls, no sockets: request headers, response headers, trailers (OK) and
the end, as the relay calls the hooks; µs per call of this process's CPU time
(``process_time``: every thread; spans are encoded and sent on this thread, in the timed
loop's flush; time spent descheduled does not count), every stack in each round (interleaved, alternating order), the lowest round as
each stack's figure (the least disturbed run; cost = on - off of those).

* Layers every stack always has (stats, metrics, calllog, trace): each stack with and without
  the layer; the figure per sidecar is the mean of the outbound and inbound differences.
  Trace samples new traces at the sidecar default (0.1) and, in the bench, exports them for
  real: ``sidecar.tracing.Tracer`` (the sidecar's own exporter: bounded queue, OTLP/gRPC
  over ``sidecar.rpc`` with mTLS, on an event loop of this process) to the mesh-all control plane's receiver, with an identity joined as
  ``client``; each timed loop ends with a flush, so the row holds building, converting,
  encoding and sending the spans. It is measured here and not at runtime because the
  sample rate is a start-up flag: "off" would be another process (two identical sidecar
  processes here differ by up to ~20 µs per call) or requests carrying a caller's unsampled
  ``traceparent``, whose header handling alone costs more than tracing. Calllog has no access
  log and no tap, as the bench's sidecars (the defaults).
* Each config-switched layer again (``<layer> [in-process]``): the same full stack of the side
  it acts in over the on snapshot and over the snapshot with it off. This is the layer's own
  code, precise; it leaves out what the relay does because of it (the timeout's timer, the
  retry's replay buffer), which only the runtime row sees.

Costs can come out negative: a layer cheaper than the noise of this shared machine.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import h2load
from bench.mesh_full import (
    ALL_ON,
    AUTHZ_POLICY,
    CLIENT,
    CLIENT_ID,
    TRUST_DOMAIN,
    MeshAll,
    MeshConfig,
    authz_doc,
    policy_doc,
    route_doc,
)
from bench.paths import BenchPath
from bench.procs import BenchError
from bench.procstat import CLK_TCK, cpu_ticks
from bench.stacks import sidecar_stacks

RUNTIME = "runtime: config switched on the mesh-all sidecars"
IN_PROCESS = "in-process: sidecar.stack with and without the layer, synthetic calls"
IN_PROCESS_SNAPSHOT = "in-process: the same sidecar.stack over the snapshot with it off"


@dataclass(frozen=True)
class Switch:
    """A layer switched at runtime: ``where`` it acts (``client`` or ``echo``) and the
    config with it off."""

    layer: str
    where: str
    off: MeshConfig


def _all_but(**off: bool) -> MeshConfig:
    return MeshConfig((route_doc(), policy_doc(**{k: False for k in off}), authz_doc()))


SWITCHES: tuple[Switch, ...] = (
    Switch("route rule (method match)", "client",
           MeshConfig((route_doc(on=False), policy_doc(), authz_doc()))),
    Switch("timeout (10 s)", "client", _all_but(timeout=True)),
    Switch("retry + budget", "client", _all_but(retries=True)),
    Switch("outlier detection", "client", _all_but(outlier=True)),
    Switch("peak-EWMA (vs round_robin)", "client", _all_but(peak_ewma=True)),
    Switch("authorization (deny default + policy)", "echo",
           MeshConfig((route_doc(), policy_doc()), absent=(("AuthorizationPolicy", AUTHZ_POLICY),),
                      authz_default="allow")),
)


@dataclass
class LayerCost:
    """One row of the table: µs per call per sidecar with the layer on and off, cost = on -
    off as the method defines it (runtime: medians, and the median of the per-round
    differences; in-process: the lowest round of each stack), the per-round differences, and
    how it was measured."""

    layer: str
    on_us: float
    off_us: float
    cost_us: float
    method: str
    where: str
    rounds_cost_us: list[float] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    cost_stderr_us: float | None = None
    """Runtime rows: the standard error of the per-round differences (the noise)."""


@dataclass(frozen=True)
class LayerPlan:
    """How much work the layer costs get: runtime ``rounds`` of ``requests`` per h2load run
    (``clients`` x ``streams``), and in-process ``inproc_rounds`` of ``inproc_calls`` calls."""

    rounds: int
    requests: int
    clients: int
    streams: int
    inproc_rounds: int
    inproc_calls: int


# ---------------------------------------------------------------------- runtime
def _cpu_us(where: str, ticks: dict[str, int], requests: int) -> float:
    """µs per call of the sidecar ``where`` names (client or echo), from ``ticks`` by role."""
    return ticks[f"sidecar-{where}"] / CLK_TCK / requests * 1e6


def runtime_costs(mesh: MeshAll, body: Path, response_bytes: int, plan: LayerPlan,
                  log: Callable[[str], None]) -> tuple[list[LayerCost], dict[str, dict[str, Any]]]:
    """The runtime rows (see the module doc), and the snapshot documents the client held:
    ``"on"`` and one per config-switched layer with it off (for ``inprocess_costs``). The
    mesh is left with every layer on. BenchError on any failed request, a config change not
    ACKed or that left the snapshot as it was, or a process gone."""
    runs: dict[str, list[dict[str, int]]] = {"on": [], **{s.layer: [] for s in SWITCHES}}
    held: dict[str, dict[str, Any]] = {}
    current: MeshConfig | None = None
    version = ""

    def ensure(cfg: MeshConfig, name: str) -> None:
        nonlocal current, version
        if cfg is not current:
            new = mesh.set_config(cfg)
            if current is not None and new == version:  # a switch that changed nothing
                raise BenchError(f"layer cost: switching the config for {name} left snapshot "
                                 f"{new} as it was: the layer was not switched")
            current, version = cfg, new
        if name not in held:
            held[name] = mesh.admin.held_snapshot(CLIENT)

    def measure(path: BenchPath, what: str) -> dict[str, int]:
        path.settled()
        before = {role: cpu_ticks(pid) for role, pid in path.proxies.items()}
        try:
            result = h2load.run(path.url(h2load.UNARY_PATH), body, requests=plan.requests,
                                clients=plan.clients, streams=plan.streams,
                                authority=path.authority, timeout_s=30 + plan.requests / 200)
            h2load.check_complete(result, plan.requests, response_bytes, f"layer cost, {what}")
            path.settled()  # the run's spans exported: their CPU is the run's
            path.check_alive()
        except BenchError as e:
            raise path.explain(e)
        return {role: cpu_ticks(pid) - before[role] for role, pid in path.proxies.items()}

    ensure(ALL_ON, "on")
    measure(mesh.path, "warm-up")  # not counted: the first run after a pause costs more
    order = ["on", *(s.layer for s in SWITCHES)]
    by_layer = {s.layer: s for s in SWITCHES}
    for rnd in range(1, plan.rounds + 1):
        for name in (order if rnd % 2 else order[::-1]):
            sw = by_layer.get(name)
            ensure(ALL_ON if sw is None else sw.off, name)
            runs[name].append(measure(mesh.path, f"round {rnd}, {name} {'off' if sw else 'on'}"))
        on = runs["on"][-1]
        log(f"layer cost round {rnd}/{plan.rounds}: " + ", ".join(
            f"{s.layer} {_cpu_us(s.where, on, plan.requests) - _cpu_us(s.where, runs[s.layer][-1], plan.requests):+.1f}"
            for s in SWITCHES) + " us/call")
    ensure(ALL_ON, "on")  # the mesh-all path as the rest of the run knows it
    rows = []
    for s in SWITCHES:
        on = [_cpu_us(s.where, r, plan.requests) for r in runs["on"]]
        off = [_cpu_us(s.where, r, plan.requests) for r in runs[s.layer]]
        diffs = [a - b for a, b in zip(on, off, strict=True)]
        rows.append(LayerCost(s.layer, statistics.median(on), statistics.median(off),
                              statistics.median(diffs), RUNTIME, s.where, diffs,
                              cost_stderr_us=_stderr(diffs)))
    return rows, held


def _stderr(values: list[float]) -> float | None:
    """Standard error of the mean of ``values`` (None for fewer than two): how far apart
    rounds were, i.e. how much of a cost this machine's noise can hide."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None


# ---------------------------------------------------------------------- in-process
class SpanExport:
    """The sidecar's own span exporter (``sidecar.tracing.Tracer``) in this process, sending to
    the mesh-all control plane's OTLP receiver over mTLS with an identity joined as
    ``client`` (a join token made through the Admin API; ``bench.registrar.join``), its
    certificate, key and bundle in anonymous in-memory files (the key never touches disk).
    Spans wait in the tracer's queue (``sink`` runs outside any event loop) until ``flush``
    sends them on this object's own event loop."""

    def __init__(self, mesh: MeshAll) -> None:
        import asyncio

        from bench.registrar import join
        from sidecar.identity import MemoryTlsFiles, WorkloadKey
        from sidecar.tracing import Tracer, parse_otlp_endpoint

        ident, _ = asyncio.run(join("client", mesh.admin.create_token("client"), TRUST_DOMAIN))
        self._memfiles = MemoryTlsFiles(ident.cert_pem, WorkloadKey(ident.key_pem),
                                        ident.bundle_pem)
        files = self._memfiles.files
        self.loop = asyncio.new_event_loop()
        self.tracer = Tracer(parse_otlp_endpoint(mesh.cp.otlp), service="client",
                             instance_id="client-bench-in-process", tls=lambda: files)

    def sink(self, span: Any) -> None:
        self.tracer.submit(span)

    def flush(self) -> None:
        """Export every span submitted so far (blocks until the receiver answered)."""
        if not self.loop.run_until_complete(self.tracer.flush(timeout_s=30)):
            raise BenchError(f"in-process span export did not finish: {self.tracer.stats()}")

    def check(self) -> dict[str, Any]:
        """The exporter's counts; BenchError unless spans were exported and none failed."""
        st = self.tracer.stats()
        if st["spans_exported"] < 1 or st["exports_failed"] or st["spans_dropped_queue_full"]:
            raise BenchError(f"in-process span export to the control plane failed: {st}")
        return st

    def close(self) -> None:
        """Stop the tracer (closing its channel), then the loop and the in-memory files."""
        try:
            self.loop.run_until_complete(self.tracer.aclose(timeout_s=10))
        finally:
            self.loop.close()
            self._memfiles.close()


class _Harness:
    """The outbound and inbound stacks of the mesh-all sidecars in this process, built as
    ``sidecar.process`` builds them, over a given snapshot (``stacks``); finished spans go to
    ``export`` (None: an in-memory list); see the module doc."""

    def __init__(self, export: SpanExport | None = None) -> None:
        # The sidecar's own modules, imported only here: the rest of the bench drives the
        # mesh from outside.
        from mesh_common.limits import Limits
        from sidecar.http2.connection import H2Connection
        from sidecar.http2.headers import HeaderReader, encode_block
        from sidecar.http2.pool import Pool
        from sidecar.http2.relay import Call
        from sidecar.layers.calllog import CallLog
        from sidecar.layers.metrics import Metrics
        from sidecar.layers.stats import Stats
        from sidecar.layers.trace import Trace
        from sidecar.stack import Stack

        self.Call, self.Stack, self.Pool = Call, Stack, Pool
        self.down = H2Connection(client=False, limits=Limits())
        block = encode_block([(":method", "POST"), (":scheme", "http"),
                              (":path", h2load.UNARY_PATH), (":authority", "echo"),
                              ("content-type", "application/grpc"), ("te", "trailers")])
        self.headers = HeaderReader(1 << 16).read(block)
        self.spans: list[Any] = []
        self.export = export
        self._limits, self._h2 = Limits, H2Connection
        self.kinds = {"stats": (Stats,), "metrics": (Metrics,), "calllog": (CallLog,),
                      "trace": (Trace, type(Trace(outbound=True, service="x").ending()))}

    def _sink(self, span: Any) -> None:
        spans = self.spans
        spans.append(span)
        if len(spans) > 4096:
            spans.clear()

    def _pool(self, label: str) -> Any:
        p = self.Pool(label, label, 1, lambda _: None)
        p.conns.append(self._h2(client=True, limits=self._limits()))  # an open connection
        return p

    def stacks(self, snapshot: Any, export: bool = False
               ) -> dict[str, tuple[Any, Callable[[Any], Any], str | None]]:
        """side (outbound: the client sidecar's, inbound: echo's) -> (its full stack over
        ``snapshot``, its terminal, the calls' peer); the trace layers' spans go to the real
        exporter when ``export`` (and there is one), else to an in-memory list."""
        sink = self.export.sink if export and self.export is not None else self._sink
        pools: dict[str, Any] = {}

        def pool(label: str) -> Any:
            hit = pools.get(label)
            if hit is None:
                hit = pools[label] = self._pool(label)
            return hit
        outbound, inbound = sidecar_stacks(snapshot, pool, sink)
        app = pool("127.0.0.1:1 (local app of echo)")

        def endpoint_pool(ep: Any, route: str) -> Any:
            return pool(f"{ep.address} ({route})")
        return {"outbound": (outbound, lambda call: endpoint_pool(call.endpoint, call.route), None),
                "inbound": (inbound, lambda call: app, CLIENT_ID)}

    def without(self, side: tuple[Any, Callable[[Any], Any], str | None], kind: str
                ) -> tuple[Any, str | None]:
        """The side's stack without the layers of ``kind``, over the same terminal."""
        full, terminal, peer = side
        kinds = self.kinds[kind]
        return self.Stack([x for x in full.layers if not isinstance(x, kinds)], terminal), peer

    def check(self, stack: Any, peer: str | None, what: str) -> None:
        """BenchError unless a call through ``stack`` is sent to a pool (not answered)."""
        call = self.Call(self.down, 1, self.headers, peer, time.monotonic())
        decision = stack.on_request(call)
        if type(decision) is not self.Pool:
            raise BenchError(f"in-process layer costs: the {what} stack answered "
                             f"{decision!r} instead of sending the call on")
        call.pool = decision
        call.grpc_status = 0
        stack.on_end(call)

    def time_calls(self, stack: Any, peer: str | None, n: int, flush: bool = False) -> float:
        """µs of this process's CPU time per call for ``n`` synthetic calls through ``stack``
        (``check``ed first): request headers, response headers, trailers (OK), end, as the
        relay calls the hooks; with ``flush``, then the spans they made are exported."""
        export = self.export if flush else None
        Call, down, headers = self.Call, self.down, self.headers
        now = time.monotonic()
        calls = [Call(down, 2 * i + 1, headers, peer, now) for i in range(n)]
        on_request, on_response, on_end = stack.on_request, stack.on_response, stack.on_end
        if export is not None:
            export.flush()  # nothing of an earlier loop left to send
        gc.collect()
        t0 = time.process_time()
        for call in calls:
            decision = on_request(call)
            call.pool = decision
            call.upstream_label = decision.label
            call.attempts = 1
            call.committed = True
            call.replay = None
            call.response_started = True
            on_response(call)
            call.grpc_status = 0
            on_response(call)
            call.finished = True
            call.ended = True
            on_end(call)
        if export is not None:
            export.flush()
        return (time.process_time() - t0) / n * 1e6


IN_PROCESS_LAYERS = ("stats", "metrics", "calllog", "trace")
"""Layers every stack has: measured with and without the layer."""
IN_PROCESS_SUFFIX = " [in-process]"
"""Appended to a config-switched layer's name for its in-process row."""


def inprocess_costs(snapshots: dict[str, dict[str, Any]], plan: LayerPlan,
                    log: Callable[[str], None], export: SpanExport | None = None
                    ) -> list[LayerCost]:
    """The in-process rows (see the module doc). ``snapshots`` holds snapshot documents as the
    mesh-all client held them: ``"on"`` (every layer on) and, per config-switched layer (a
    ``SWITCHES`` name), the one with that layer off (``runtime_costs`` collects them; those
    given get a companion row: the same stack over the on and the off snapshot, the side the
    layer acts in). ``export`` takes the sampled spans (None: an in-memory list; the bench
    passes the real exporter). BenchError when a synthetic call would not reach a pool, or
    an export failed."""
    from mesh_common.snapshot import SnapshotError, from_doc

    try:
        parsed = {name: from_doc(doc) for name, doc in snapshots.items()}
    except SnapshotError as e:
        raise BenchError(f"in-process layer costs: a snapshot the client held does not parse: {e}") from None
    h = _Harness(export)
    sides = h.stacks(parsed["on"])
    runs: dict[tuple[str, str], tuple[Any, str | None]] = {}  # (variant, side): (stack, peer)
    for side, full in sides.items():
        runs[("on", side)] = (full[0], full[2])
        for layer in IN_PROCESS_LAYERS:
            runs[(layer, side)] = h.without(full, layer)
    # Trace on = the same stacks exporting for real (when there is an exporter).
    traced = {"on": "on+export"} if export is not None else {"on": "on"}
    if export is not None:
        for side, full in h.stacks(parsed["on"], export=True).items():
            runs[("on+export", side)] = (full[0], full[2])
    where = {s.layer: s.where for s in SWITCHES}
    config_layers = [name for name in snapshots if name in where]
    for name in config_layers:
        side = "outbound" if where[name] == "client" else "inbound"
        full = h.stacks(parsed[name])[side]
        runs[(name, side)] = (full[0], full[2])
    for (variant, side), (stack, peer) in runs.items():  # warm-up: per-snapshot plans, caches
        h.check(stack, peer, f"{side} ({variant})")
        h.time_calls(stack, peer, min(500, plan.inproc_calls), flush=variant == "on+export")
    us: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    for rnd in range(plan.inproc_rounds):
        for key in (list(runs) if rnd % 2 == 0 else list(runs)[::-1]):
            stack, peer = runs[key]
            us[key].append(h.time_calls(stack, peer, plan.inproc_calls,
                                        flush=key[0] == "on+export"))
    best = {key: min(v) for key, v in us.items()}

    def per_round(on: tuple[str, str], off: tuple[str, str]) -> list[float]:
        return [a - b for a, b in zip(us[on], us[off], strict=True)]

    rows = []
    for layer in IN_PROCESS_LAYERS:
        on_key = traced["on"] if layer == "trace" else "on"
        costs = {side: best[(on_key, side)] - best[(layer, side)] for side in sides}
        rounds = [statistics.fmean(pair) for pair in
                  zip(*(per_round((on_key, side), (layer, side)) for side in sides), strict=True)]
        rows.append(LayerCost(
            layer, statistics.fmean(best[(on_key, side)] for side in sides),
            statistics.fmean(best[(layer, side)] for side in sides),
            statistics.fmean(costs.values()), IN_PROCESS, "both", rounds,
            {f"{side}_cost_us": c for side, c in costs.items()}
            | {f"{side}_stack_us": best[(on_key, side)] for side in sides}))
    for name in config_layers:
        side = "outbound" if where[name] == "client" else "inbound"
        on, off = best[("on", side)], best[(name, side)]
        rows.append(LayerCost(name + IN_PROCESS_SUFFIX, on, off, on - off, IN_PROCESS_SNAPSHOT,
                              where[name], per_round(("on", side), (name, side))))
    sink = "memory"
    if export is not None:
        st = export.check()
        sink = f"OTLP to the control plane ({st['spans_exported']} spans exported)"
    for r in rows:
        if r.layer == "trace":
            r.detail["spans_to"] = sink
    log("layer cost in-process: " + ", ".join(f"{r.layer} {r.cost_us:+.2f}" for r in rows)
        + f" us/call ({plan.inproc_rounds} rounds of {plan.inproc_calls} calls; whole stacks "
        + ", ".join(f"{side} {best[('on', side)]:.1f}" for side in sides) + " us/call)")
    return rows
