"""The order saga end to end: the demo mesh against the same services wired directly.

The same services run twice, side by side on their own free ports, each wiring with fresh
SQLite files under the run's working directory and two replicas of order, payment and
inventory (as ``make demo`` starts them):

1. **mesh**: the demo as ``make demo`` brings it up (``demo_services.launcher.up.bring_up``:
   control plane, a dynamic sidecar per replica, mTLS, the demo's authorization: default deny
   plus ``demo_services/policies/``), on free ports, with the demo's default settings except a
   load generator rate of 0 (it stays idle: this driver sends the orders). Orders go where the
   demo's load generator sends them: its sidecar's outbound port with ``:authority`` order;
   order reaches payment and inventory through its own sidecar.
2. **direct**: the same apps without sidecars or control plane; the driver calls the order
   replicas and order calls the participants' replicas straight over plaintext loopback gRPC
   (round robin; order's ``--direct SERVICE=HOST:PORT,...``). The saga's code path is the same;
   only the channels differ.

Load: a closed loop with ``in_flight`` workers, each with one CreateOrder in flight at a time
(two for a "twin", the mix's duplicate send), drawing from the demo load generator's seeded
order mix (``demo_services.loadgen.mix``: customers who cannot pay, scarce SKUs that run out,
re-sends of earlier request ids); a warm-up of ``WARMUP_CALLS`` calls per wiring, then
``orders`` measured calls per wiring in ``ROUNDS`` rounds that alternate between the wirings
(the machine is shared: background load falls on both), bounded by ``PHASE_TIME_LIMIT_S``.
The idle wiring stays up meanwhile (the mesh's reports and health checks go on). A
CreateOrder answers once its saga is final; one answered PENDING is followed with GetOrder
until it is final and its latency runs until then. Figures per wiring: CreateOrder calls
answered per second of its measured rounds, and their p50/p99 latency (ms).

Correctness: any non-OK call, an idempotency mismatch, an order not final, or a broken
invariant of the demo's money audit (``demo_services.check`` and ``.audit``: no order in flight,
charged and reserved once, compensated, money and stock conserved, read model = replay), or
an audit that does not see every order sent, fails the run with one BenchError.

    python -m bench.saga [--orders N] [--in-flight N] [--keep-dir]
"""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from bench.h2load import percentile
from bench.procs import BenchError, Proc, ProcGroup, free_port
from demo_services import check
from demo_services.audit import audit as money_audit
from demo_services.common.mesh import direct_channel, outbound_channel
from demo_services.launcher import procs as launcher_procs
from demo_services.launcher.settings import LOADGEN, REPLICAS, Settings, from_env
from demo_services.launcher.state import DemoState, ProcessRecord
from demo_services.launcher.up import bring_down, bring_up
from demo_services.loadgen.mix import Mix, Planned
from demo_services.loadgen.tally import TERMINAL, Tally
from mesh_common.cli_args import OneLineArgumentParser
from protos.order import order_pb2, order_pb2_grpc
from tests.support.sidecar import REPO_ROOT

Log = Callable[[str], None]

KEYS = (
    "saga_orders_per_s_mesh",
    "saga_orders_per_s_direct",
    "saga_orders_per_s_ratio_mesh_vs_direct",
    "saga_p50_ms_mesh",
    "saga_p50_ms_direct",
    "saga_p99_ms_mesh",
    "saga_p99_ms_direct",
)
SEED = 14
"""The order mix's seed: both wirings draw the same sequence of sends."""
MIX_RUN_ID = "saga"
WARMUP_CALLS = 100
DEADLINE_S = 5.0
"""CreateOrder's deadline, as the demo's load generator sets it."""
ROUNDS = 4
"""Measured rounds per wiring, alternating between the wirings."""
PHASE_TIME_LIMIT_S = 75.0
"""A wiring's measured rounds stop sending after this long in all (``/ ROUNDS`` each),
whatever their count (the figures then cover the calls answered; the log says so)."""
WARMUP_TIME_LIMIT_S = 30.0
FOLLOW_PENDING_S = 30.0
"""How long an order answered PENDING is followed with GetOrder before the run fails."""
FOLLOW_POLL_S = 0.05
AUDIT_WAIT_S = 30.0
"""How long the audit waits for no order in flight."""
APP_READY_S = 30.0
PARTICIPANTS = ("inventory", "payment")
DIRECT_PREFIX = "saga-direct-"
"""The direct wiring's processes in the group (and their log files) are named so."""


# ------------------------------------------------------------------------ the closed loop

@dataclass
class LoopResult:
    """One closed-loop phase: per call its latency (ms, send to final answer), the wall
    time (s, first send to last answer), the calls that were answered PENDING and followed,
    and whether the time limit cut the phase short."""

    latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    followed_pending: int = 0
    hit_time_limit: bool = False

    @property
    def calls(self) -> int:
        return len(self.latencies_ms)

    @property
    def per_s(self) -> float:
        return self.calls / self.elapsed_s if self.elapsed_s > 0 else 0.0


class ClosedLoop:
    """Sends the mix's CreateOrders to ``stub`` from ``in_flight`` worker threads, each
    waiting for its answer before the next send. ``tally`` (the load generator's) counts the
    outcome per request id and detects idempotency mismatches; the first failure (a non-OK
    call, an order not final in time) stops the phase and ``run`` raises BenchError."""

    def __init__(self, stub: order_pb2_grpc.OrderStub, mix: Mix, tally: Tally,
                 in_flight: int, what: str) -> None:
        self.stub = stub
        self.mix = mix
        self.tally = tally
        self.in_flight = in_flight
        self.what = what
        self._lock = threading.Lock()
        self._failure: str | None = None

    def run(self, calls: int, time_limit_s: float) -> LoopResult:
        """Send at least ``calls`` CreateOrders (a twin's second send may add one), stopping
        early after ``time_limit_s`` s; returns once every call sent was answered. Raises
        BenchError on the first failure."""
        result = LoopResult()
        claimed = 0
        stop = threading.Event()
        t0 = time.perf_counter()
        limit = t0 + time_limit_s

        def worker() -> None:
            nonlocal claimed
            while not stop.is_set():
                with self._lock:
                    if claimed >= calls:
                        return
                    if time.perf_counter() >= limit:
                        result.hit_time_limit = True
                        return
                    sends = self.mix.next()
                    claimed += len(sends)
                try:
                    done = self._send(sends)
                except BenchError as exc:
                    with self._lock:
                        self._failure = self._failure or str(exc)
                    stop.set()
                    return
                with self._lock:
                    for latency_ms, followed in done:
                        result.latencies_ms.append(latency_ms)
                        result.followed_pending += followed

        threads = [threading.Thread(target=worker, name=f"saga-{i}", daemon=True)
                   for i in range(self.in_flight)]
        for t in threads:
            t.start()
        join_by = limit + DEADLINE_S + FOLLOW_PENDING_S + 5.0
        for t in threads:
            t.join(max(0.0, join_by - time.perf_counter()))
        result.elapsed_s = time.perf_counter() - t0
        if any(t.is_alive() for t in threads):
            raise BenchError(f"saga {self.what}: a call was still unanswered "
                             f"{join_by - t0:.0f} s after the phase began")
        if self._failure is not None:
            raise BenchError(self._failure)
        return result

    def _send(self, sends: list[Planned]) -> list[tuple[float, int]]:
        """Send ``sends`` at once; (latency ms, 1 if followed from PENDING) per send."""
        started: list[tuple[Planned, float, grpc.Future]] = []
        ended: dict[int, float] = {}
        for i, planned in enumerate(sends):
            req = order_pb2.CreateOrderRequest(
                request_id=planned.request_id, customer=planned.customer,
                items=[order_pb2.Item(sku=s, quantity=q) for s, q in planned.items])
            self.tally.on_send(planned.resend, time.monotonic())
            t_send = time.perf_counter()
            fut = self.stub.CreateOrder.future(req, timeout=DEADLINE_S)
            fut.add_done_callback(lambda f, i=i: ended.__setitem__(i, time.perf_counter()))
            started.append((planned, t_send, fut))
        out: list[tuple[float, int]] = []
        for i, (planned, t_send, fut) in enumerate(started):
            try:
                view = fut.result()
            except grpc.RpcError as exc:
                self.tally.on_error(exc.code().name)  # type: ignore[attr-defined]
                raise BenchError(
                    f"saga {self.what}: CreateOrder {planned.request_id} failed: "
                    f"{exc.code().name} {exc.details()}") from None  # type: ignore[attr-defined]
            t_end = ended.get(i, time.perf_counter())
            self.tally.on_answer(planned.request_id, view.order_id, view.state, view.reason)
            followed = 0
            if view.state not in TERMINAL:
                view = self._follow(planned.request_id, view)
                t_end, followed = time.perf_counter(), 1
            out.append(((t_end - t_send) * 1000.0, followed))
        return out

    def _follow(self, request_id: str, view: order_pb2.OrderView) -> order_pb2.OrderView:
        """GetOrder until the order is final; BenchError after ``FOLLOW_PENDING_S``."""
        give_up = time.monotonic() + FOLLOW_PENDING_S
        while view.state not in TERMINAL:
            if time.monotonic() >= give_up:
                raise BenchError(f"saga {self.what}: order {view.order_id} still "
                                 f"{view.state} {FOLLOW_PENDING_S:g} s after CreateOrder")
            time.sleep(FOLLOW_POLL_S)
            try:
                view = self.stub.GetOrder(order_pb2.GetOrderRequest(order_id=view.order_id),
                                          timeout=DEADLINE_S)
            except grpc.RpcError as exc:
                raise BenchError(f"saga {self.what}: GetOrder {view.order_id} failed: "
                                 f"{exc.code().name} {exc.details()}") from None  # type: ignore[attr-defined]
            self.tally.on_answer(request_id, view.order_id, view.state, view.reason,
                                 call_done=False)
        return view


# ------------------------------------------------------------------------ the two wirings

@dataclass
class Wiring:
    """A running set of services: ``state`` lists the apps (for the audit), ``order_channel``
    is how the driver reaches order, ``check_alive`` raises BenchError if a process died."""

    name: str
    state: DemoState
    order_channel: grpc.Channel
    check_alive: Callable[[], None]


def _adopt(group: ProcGroup, state: DemoState,
           children: Mapping[int, subprocess.Popen[bytes]]) -> list[Proc]:
    """Put the launcher's processes into ``group`` too (a safety net: ``stop_all`` reaches
    them if this module's own stop did not run)."""
    adopted = []
    for rec in state.processes:
        popen = children.get(rec.pid)
        if popen is not None:
            adopted.append(Proc(name=f"saga-mesh-{rec.instance or rec.role}",
                                cmd=list(rec.cmdline), popen=popen,
                                log_path=Path(rec.log)))
    group.procs.extend(adopted)
    return adopted


def _forget(group: ProcGroup, stopped: list[Proc]) -> None:
    ids = {id(p) for p in stopped}
    group.procs[:] = [p for p in group.procs if id(p) not in ids]


def mesh_settings(base: Path) -> Settings:
    """The demo's default settings (not the caller's MESH_* environment) under ``base``,
    every listener on a free port, and the demo's load generator idle (rate 0)."""
    ports: list[int] = []
    while len(ports) < 5:
        port = free_port()
        if port not in ports:
            ports.append(port)
    api, boot, admin_http, otlp, gateway = (f"127.0.0.1:{p}" for p in ports)
    return replace(from_env({}, cwd=base), dir=base / ".mesh", ca_dir=base / "certs",
                   api=api, bootstrap=boot, admin_http=admin_http, otlp=otlp,
                   gateway=gateway, rps=0.0)


@contextmanager
def mesh_wiring(workdir: Path, group: ProcGroup, log: Log) -> Iterator[Wiring]:
    """The demo mesh under ``workdir/saga-mesh``, brought up as ``make demo`` does; taken
    down (by pid, load first, control plane last) on leaving, also on failure."""
    settings = mesh_settings(workdir / "saga-mesh")
    try:
        started = bring_up(settings, lambda line: log(f"mesh: {line}"))
    except launcher_procs.LaunchError as exc:
        raise BenchError(f"saga mesh: the demo did not come up: {exc}") from None
    adopted = _adopt(group, started.state, started.children)
    channel = outbound_channel(started.state.one("sidecar", LOADGEN).outbound, "order")
    log(f"mesh: trace sample rate {settings.trace_sample_rate:g}, report interval "
        f"{settings.report_interval_s:g} s, health interval {settings.health_interval_s:g} s "
        f"(the demo's defaults)")

    def check_alive() -> None:
        for p in adopted:
            if not p.alive():
                raise BenchError(p.describe_failure("saga mesh: exited during the run"))

    try:
        yield Wiring("mesh", started.state, channel, check_alive)
    finally:
        channel.close()
        notes = bring_down(settings, lambda line: log(f"mesh: {line}"), started.children)
        for note in notes:
            log(f"mesh: {note}")
        _forget(group, adopted)


def _app_cmd(service: str, instance: str, db: Path, extra: list[str]) -> list[str]:
    """An app's command line as the demo launcher builds it (``--lease-s`` as the demo's)."""
    return [sys.executable, "-m", f"demo_services.{service}", "serve", "--instance", instance,
            "--db", str(db), "--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0",
            *extra]


def _record(proc: Proc, service: str, instance: str, db: Path) -> ProcessRecord:
    ticks = launcher_procs.start_ticks(proc.pid)
    if ticks is None:
        raise BenchError(proc.describe_failure("exited after its ready line"))
    return ProcessRecord(role="app", service=service, instance=instance, pid=proc.pid,
                         log=str(proc.log_path), cmdline=list(proc.cmd), start_ticks=ticks,
                         address=proc.ready["address"], control=proc.ready["control"],
                         db=str(db))


@contextmanager
def direct_wiring(workdir: Path, group: ProcGroup, log: Log) -> Iterator[Wiring]:
    """The same apps under ``workdir/saga-direct``, no sidecar and no control plane: order's
    ``--direct`` gives it the participants' addresses. Stopped by pid on leaving."""
    base = workdir / "saga-direct"
    data = base / "data"
    data.mkdir(parents=True, exist_ok=True)
    lease_s = from_env({}).lease_s
    env = {"PYTHONPATH": str(REPO_ROOT)}
    records: list[ProcessRecord] = []
    ids = [(svc, f"{svc}-{i}") for svc in (*PARTICIPANTS, "order")
           for i in range(1, REPLICAS + 1)]

    def start(service: str, instance: str, extra: list[str]) -> ProcessRecord:
        db = data / f"{service}.sqlite"
        proc = group.start_ready_line(f"{DIRECT_PREFIX}{instance}",
                                      _app_cmd(service, instance, db, extra), env=env,
                                      cwd=REPO_ROOT, timeout_s=APP_READY_S)
        return _record(proc, service, instance, db)

    def mine() -> list[Proc]:
        return [p for p in group.procs if p.name.startswith(DIRECT_PREFIX)]

    channel: grpc.Channel | None = None
    try:
        # One by one from this thread: the group's children get SIGTERM when the thread
        # that started them ends (PR_SET_PDEATHSIG is per thread), so no worker threads here.
        for service, instance in ids:
            if service != "order":
                records.append(start(service, instance, []))
        direct = [arg for svc in PARTICIPANTS for arg in (
            "--direct", f"{svc}=" + ",".join(r.address for r in records if r.service == svc))]
        for service, instance in ids:
            if service == "order":
                records.append(start(service, instance, ["--lease-s", f"{lease_s:g}", *direct]))
        state = DemoState(dir=str(base), data_dir=str(data), logs_dir=str(group.log_dir),
                          ca_dir="", control_plane={}, settings={"lease_s": lease_s},
                          started_at_unix=time.time(), complete=True, processes=records)
        channel = direct_channel([r.address for r in records if r.service == "order"],
                                 "order")
        log(f"direct: {len(records)} apps started (order -> {' '.join(direct[1::2])})")

        def check_alive() -> None:
            for p in mine():
                if not p.alive():
                    raise BenchError(p.describe_failure("saga direct: exited during the run"))

        yield Wiring("direct", state, channel, check_alive)
    finally:
        if channel is not None:
            channel.close()
        started = mine()
        for p in reversed(started):   # order first: its sagas still reach the participants
            p.stop()
        _forget(group, started)


# ------------------------------------------------------------------------ measuring

def audit(wiring: Wiring, tally: Tally, log: Log) -> int:
    """Run the demo's audit on ``wiring`` (``demo_services.check``: wait for no PENDING
    order, fetch from the services' read APIs and the order rebuild, then every invariant of
    ``demo_services.audit``); the number of orders audited. Raises BenchError if an
    invariant is broken or the audit does not see every order sent."""
    try:
        if check.wait_quiet(wiring.state, AUDIT_WAIT_S) is None:
            raise BenchError(f"saga {wiring.name}: orders still PENDING {AUDIT_WAIT_S:g} s "
                             f"after the last answer")
        data = check.fetch(wiring.state)
    except check.CheckError as exc:
        raise BenchError(f"saga {wiring.name}: the audit could not run: {exc}") from None
    results = money_audit(data)
    broken = [r for r in results if not r.ok]
    if broken:
        raise BenchError(f"saga {wiring.name}: the money audit failed: " + "; ".join(
            f"{r.name} ({', '.join(r.problems)})" for r in broken))
    counts = tally.snapshot(time.monotonic())
    final = counts["confirmed"] + counts["cancelled"]
    if counts["mismatches"] or counts["pending"] or final != counts["sent"]:
        raise BenchError(f"saga {wiring.name}: {counts['sent']} orders sent, {final} final, "
                         f"{counts['pending']} pending, {counts['mismatches']} idempotency "
                         f"mismatches")
    if len(data.orders) != counts["sent"]:
        raise BenchError(f"saga {wiring.name}: {counts['sent']} orders sent but the order "
                         f"service lists {len(data.orders)}")
    log(f"{wiring.name}: audit: all {len(results)} invariants hold over "
        f"{len(data.orders)} orders ({counts['confirmed']} confirmed, {counts['cancelled']} "
        f"cancelled: {dict(counts['cancel_reasons'])})")
    return len(data.orders)


class SagaLoad:
    """One wiring's load: its own seeded mix (the same sequence for every wiring), the load
    generator's tally, the closed loop and the measured rounds so far."""

    def __init__(self, wiring: Wiring, in_flight: int) -> None:
        self.wiring = wiring
        self.tally = Tally(started_at=time.monotonic())
        self.loop = ClosedLoop(order_pb2_grpc.OrderStub(wiring.order_channel),
                               Mix(random.Random(SEED), run_id=MIX_RUN_ID), self.tally,
                               in_flight, wiring.name)
        self.measured = LoopResult()

    def warm_up(self, log: Log) -> None:
        warm = self.loop.run(WARMUP_CALLS, WARMUP_TIME_LIMIT_S)
        self.wiring.check_alive()
        log(f"{self.wiring.name}: warm-up {warm.calls} calls in {warm.elapsed_s:.1f} s")

    def round(self, calls: int, time_limit_s: float) -> LoopResult:
        """One measured round, added to ``measured``."""
        r = self.loop.run(calls, time_limit_s)
        self.wiring.check_alive()
        self.measured.latencies_ms += r.latencies_ms
        self.measured.elapsed_s += r.elapsed_s
        self.measured.followed_pending += r.followed_pending
        self.measured.hit_time_limit |= r.hit_time_limit
        return r


def _p(result: LoopResult, q: float) -> float:
    return percentile(sorted(result.latencies_ms), q)


def run(workdir: Path, group: ProcGroup, *, orders: int = 2000, in_flight: int = 16,
        log: Callable[[str], None]) -> dict[str, float]:
    """Measure the saga through the demo mesh and wired directly (see the module doc).

    Both wirings run side by side on their own ports; after a warm-up of ``WARMUP_CALLS``
    each, ``ROUNDS`` measured rounds alternate between them (mesh first in odd rounds,
    direct first in even ones), so load from other work on the machine falls on both.
    ``orders``: measured CreateOrder calls per wiring (split over the rounds); ``in_flight``:
    closed-loop workers. Returns ``KEYS``: orders per second (CreateOrder calls answered
    final per second of the wiring's measured rounds), their ratio mesh/direct, and p50/p99
    latency in ms per wiring over all its rounds. Every process it starts lives under
    ``workdir`` and is stopped by pid before it returns, also on failure. Raises BenchError
    (one message) on any failed call, lost or unfinished order, broken audit invariant or
    dead process."""
    if orders <= 0 or in_flight <= 0:
        raise BenchError("saga: orders and in_flight must be positive")
    t0 = time.monotonic()
    per_round = math.ceil(orders / ROUNDS)
    with ExitStack() as stack:
        loads = []
        for wiring_cm in (mesh_wiring, direct_wiring):
            t_up = time.monotonic()
            wiring = stack.enter_context(wiring_cm(workdir, group, log))
            log(f"{wiring.name}: up in {time.monotonic() - t_up:.1f} s")
            loads.append(SagaLoad(wiring, in_flight))
        for load in loads:
            load.warm_up(log)
        for i in range(ROUNDS):
            for load in (loads if i % 2 == 0 else loads[::-1]):
                r = load.round(per_round, PHASE_TIME_LIMIT_S / ROUNDS)
                log(f"{load.wiring.name}: round {i + 1}/{ROUNDS}: {r.calls} calls in "
                    f"{r.elapsed_s:.1f} s, {r.per_s:.1f}/s")
        for load in loads:
            m = load.measured
            cut = (f" (a round hit its time limit of {PHASE_TIME_LIMIT_S / ROUNDS:g} s)"
                   if m.hit_time_limit else "")
            if m.calls == 0:
                raise BenchError(f"saga {load.wiring.name}: no CreateOrder answered{cut}")
            log(f"{load.wiring.name}: {m.calls} calls in {m.elapsed_s:.1f} s{cut}: "
                f"{m.per_s:.1f}/s, p50 {_p(m, 50):.1f} ms, p99 {_p(m, 99):.1f} ms "
                f"({m.followed_pending} followed from PENDING)")
            audit(load.wiring, load.tally, log)
        for load in loads:
            load.wiring.check_alive()
    log(f"saga: took {time.monotonic() - t0:.0f} s (start-up and stop included)")
    mesh, direct = (load.measured for load in loads)
    out = {
        "saga_orders_per_s_mesh": mesh.per_s,
        "saga_orders_per_s_direct": direct.per_s,
        "saga_orders_per_s_ratio_mesh_vs_direct": mesh.per_s / direct.per_s,
        "saga_p50_ms_mesh": _p(mesh, 50),
        "saga_p50_ms_direct": _p(direct, 50),
        "saga_p99_ms_mesh": _p(mesh, 99),
        "saga_p99_ms_direct": _p(direct, 99),
    }
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise BenchError(f"saga: figures not finite: {', '.join(bad)}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = OneLineArgumentParser(prog="python -m bench.saga",
                               description="The order saga: demo mesh vs direct wiring.")
    ap.add_argument("--orders", type=int, default=2000, help="measured calls per wiring")
    ap.add_argument("--in-flight", type=int, default=16, help="closed-loop workers")
    ap.add_argument("--keep-dir", action="store_true", help="keep the working directory")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[saga] {msg}", file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="mesh-bench-saga-"))
    group = ProcGroup(log_dir=workdir)
    try:
        doc = run(workdir, group, orders=args.orders, in_flight=args.in_flight, log=log)
    except BenchError as exc:
        print(f"bench.saga: FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("bench.saga: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        group.stop_all()
        if args.keep_dir:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
