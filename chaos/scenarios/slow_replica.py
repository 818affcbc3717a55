"""``slow-replica``: one replica of a service answers slowly (its sickness control adds
latency to every call); the callers' peak-EWMA balancers must move the traffic away from it,
so its share of the calls falls well below half and the edge's p99 latency recovers.

It measures from ``Admin.Tap`` (``meshctl tap``), as a user would: the callers' outbound
calls to the service, where each landed and how long it took, in a window just after the
slowdown and in the window that follows; the control plane's topology gives the edge's p99
over its report window as a second view. Once healed, the full run also waits for the
balancers to try the replica again and give it back its share.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

from chaos.mesh import ChaosError, Mesh, TapRecorder, wait_for
from chaos.scenarios import Options
from chaos.timeline import Timeline
from protos.mesh.v1 import control_pb2 as pb

NAME = "slow-replica"
EXPECTATION = (
    "one replica answers slowly: peak-EWMA moves the calls away from it (its share falls "
    "well below half) and the edge's p99 recovers once each caller has seen it slow; "
    "healed, it gets its share back (checked in the full run)")

TARGETS = ("payment", "inventory")
"""Services whose replicas the scenario may slow down (the saga's participants)."""
LOW_SHARE = 0.2
"""'Well below half': the slow replica's share of the calls once the balancers moved."""
MIN_BASELINE_SHARE = 0.25
"""Share each replica of the chosen service must carry before the slowdown: a replica the
balancers already avoid (after an earlier failure, say) would show nothing when it slows."""
MIN_CALLS = 5
"""Calls a window must hold for its figures to say anything."""
LATENCIES_MS = (1000, 1200)
"""Added to each call of the slow replica. Peak-EWMA tries an avoided replica again once
its estimate has decayed (over the sidecars' ``--ewma-decay-s``: 10 s by default, 2 s in the
chaos tests' demo) under the other's cost (latency × calls in flight + 1), which a busy host
inflates: a slowdown of a second keeps that far enough off for the windows measured (at
2 s, decay_s·ln(1 s / 10-40 ms) ≈ 6-9 s after the first slow answers, past the short run's
3 + 4 s) and stays under the order saga's 2 s per call."""


@dataclass
class Plan:
    """The scenario's choices and timers (``--short`` or not)."""

    target: str
    slow: str
    fast: str
    slow_ep: str
    fast_ep: str
    latency_ms: float
    baseline_s: float
    early_s: float
    late_s: float
    return_timeout_s: float


# ---------------------------------------------------------------------- pure helpers
def outbound_calls(events: Iterable[pb.TapEvent], target: str,
                   callers: set[str] | None = None) -> list[pb.TapEvent]:
    """The callers' outbound calls to ``target`` among tap ``events`` (by end time)."""
    return sorted((e for e in events if e.direction == "outbound" and e.destination == target
                   and (callers is None or e.instance in callers)),
                  key=lambda e: e.time_unix)


def between(events: Iterable[pb.TapEvent], t0: float, t1: float) -> list[pb.TapEvent]:
    """The events that ended in [t0, t1)."""
    return [e for e in events if t0 <= e.time_unix < t1]


def started_between(events: Iterable[pb.TapEvent], t0: float,
                    t1: float) -> list[pb.TapEvent]:
    """The events whose call began in [t0, t1) (its end less its latency)."""
    return [e for e in events if t0 <= e.time_unix - e.latency_ms / 1000 < t1]


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0..100) of ``values``; None when there are none."""
    xs = sorted(values)
    if not xs:
        return None
    rank = max(1, math.ceil(q / 100 * len(xs)))
    return xs[min(rank, len(xs)) - 1]


def without_first_slow(events: Iterable[pb.TapEvent], endpoint: str,
                       min_latency_ms: float) -> list[pb.TapEvent]:
    """``events`` less each caller's first call to ``endpoint`` slower than
    ``min_latency_ms`` (by start): the one call a caller's balancer needs to learn that the
    endpoint is slow. Its later slow calls stay."""
    first: dict[str, pb.TapEvent] = {}
    for e in sorted(events, key=lambda e: e.time_unix - e.latency_ms / 1000):
        if e.endpoint == endpoint and e.latency_ms >= min_latency_ms and e.instance not in first:
            first[e.instance] = e
    learned = {id(e) for e in first.values()}
    return [e for e in events if id(e) not in learned]


def share(events: list[pb.TapEvent], endpoint: str) -> float | None:
    """The share of ``events`` that landed on ``endpoint`` (None: no events)."""
    return sum(e.endpoint == endpoint for e in events) / len(events) if events else None


def fmt_ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f} ms"


def fmt_share(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0%}"


# ---------------------------------------------------------------------- the scenario
def find_callers(mesh: Mesh, rec: TapRecorder, target: str, since_unix: float) -> set[str]:
    """Sidecar instances seen calling ``target`` (tap, since ``since_unix``); when the tap is
    silent, the sidecars of the services the topology shows calling it."""
    known = {p.instance for p in mesh.state.find("sidecar")}
    callers = {e.instance for e in outbound_calls(rec.since(since_unix), target)} & known
    if callers:
        return callers
    sources = {e.source for e in mesh.topology().edges if e.destination == target}
    return {p.instance for p in mesh.state.find("sidecar") if p.service in sources}


@dataclass
class Baseline:
    """How the calls to one service split between its replicas, and how fast they were."""

    service: str
    calls: list[pb.TapEvent]
    shares: dict[str, float]
    """replica instance -> share of the calls."""

    @property
    def balanced(self) -> bool:
        """Both replicas carry traffic: the balancers avoid neither yet."""
        return (len(self.calls) >= MIN_CALLS and len(self.shares) >= 2
                and min(self.shares.values()) >= MIN_BASELINE_SHARE)


def baseline(mesh: Mesh, service: str, rec: TapRecorder, t0: float, t1: float) -> Baseline:
    eps = {mesh.sidecar(i).inbound: i for i in mesh.instances(service)}
    calls = between(outbound_calls(rec.since(t0), service), t0, t1)
    return Baseline(service, calls, {i: share(calls, ep) or 0.0 for ep, i in eps.items()})


def choose(mesh: Mesh, tl: Timeline, opts: Options, recs: dict[str, TapRecorder],
           t_start: float) -> tuple[Plan, Baseline]:
    """Watch how each target's calls split (at least the baseline time), then slow a
    replica of a service whose replicas both carry traffic (a replica the balancers already
    avoid, e.g. after an earlier failure, would say nothing when it slows). When none does
    by the deadline, the replica carrying the most of the calls is slowed."""
    baseline_s = opts.pick(3, 10)
    settle_s = opts.pick(12, 90)

    def looks() -> dict[str, Baseline]:
        now = time.time()
        t0 = max(t_start, now - baseline_s)
        return {s: baseline(mesh, s, recs[s], t0, now) for s in recs}

    def ready() -> dict[str, Baseline] | None:
        if time.time() - t_start < baseline_s:
            return None
        seen = looks()
        return seen if any(b.balanced for b in seen.values()) else None
    found = wait_for(ready, settle_s, poll_s=0.5)
    seen: dict[str, Baseline] = found or looks()
    balanced = sorted(s for s, b in seen.items() if b.balanced)
    for b in seen.values():
        tl.say(f"{b.service}: {len(b.calls)} calls, "
               + ", ".join(f"{i} {v:.0%}" for i, v in sorted(b.shares.items())))
    if balanced:
        base = seen[opts.rng.choice(balanced)]
        slow = opts.rng.choice(sorted(base.shares))
    else:
        base = max(seen.values(), key=lambda b: (len(b.shares) >= 2, min(b.shares.values(),
                                                                           default=0.0)))
        if len(base.shares) < 2:
            raise ChaosError(f"{base.service} has {len(base.shares)} replica(s); "
                             "the scenario needs two")
        slow = max(base.shares, key=lambda i: base.shares[i])
        tl.observe(f"no service has both replicas carrying calls after {settle_s:g} s "
                   f"(the balancers still avoid one); slowing the busiest replica, {slow}")
    fast = next(i for i in sorted(base.shares) if i != slow)
    latency = float(opts.rng.choice(LATENCIES_MS))
    plan = Plan(target=base.service, slow=slow, fast=fast, slow_ep=mesh.sidecar(slow).inbound,
                fast_ep=mesh.sidecar(fast).inbound, latency_ms=latency,
                baseline_s=baseline_s, early_s=opts.pick(3, 4), late_s=opts.pick(4, 6),
                return_timeout_s=opts.pick(0, 120))
    return plan, base


def run(mesh: Mesh, tl: Timeline, opts: Options) -> None:
    """Slow a replica down, watch the balancers move away from it, heal it."""
    mesh.reload()
    if not wait_for(mesh.all_synced, 30):
        raise ChaosError("the mesh is not SYNCED before the scenario")
    t_start = time.time()
    tap_s = opts.pick(150, 600)
    with mesh.tap(TARGETS[0], duration_s=tap_s) as rec0, \
            mesh.tap(TARGETS[1], duration_s=tap_s) as rec1:
        recs = dict(zip(TARGETS, (rec0, rec1), strict=True))
        plan, base = choose(mesh, tl, opts, recs, t_start)
        rec = recs[plan.target]
        callers = find_callers(mesh, rec, plan.target, t_start)
        if not callers:
            raise ChaosError(f"no sidecar is seen calling {plan.target}")
        tl.observe(f"callers of {plan.target}: {', '.join(sorted(callers))}")
        base_p99 = percentile((e.latency_ms for e in base.calls), 99)
        tl.measure("target", plan.target)
        tl.measure("slow_replica", plan.slow)
        tl.measure("latency_ms_added", plan.latency_ms)
        tl.measure("callers", sorted(callers))
        tl.measure("baseline", {"calls": len(base.calls), "slow_share": _r(base.shares[plan.slow]),
                                "p99_ms": _r(base_p99)})
        tl.observe(f"baseline: {len(base.calls)} calls to {plan.target}, "
                   f"{base.shares[plan.slow]:.0%} on {plan.slow}, p99 {fmt_ms(base_p99)}")
        try:
            _slow_down(mesh, tl, opts, plan, rec, callers, base_p99)
        finally:
            mesh.heal(plan.slow)
    if wait_for(mesh.all_synced, 30):
        tl.observe("every sidecar is SYNCED")
    else:
        tl.observe("not every sidecar is SYNCED 30 s after the scenario")


def _r(v: float | None, digits: int = 3) -> float | None:
    return None if v is None else round(v, digits)


def _slow_down(mesh: Mesh, tl: Timeline, opts: Options, plan: Plan, rec: TapRecorder,
               callers: set[str], base_p99: float | None) -> None:
    # The windows start as the sickness is asked for: a call begun while the request is on
    # its way may already be slowed (it is the server that adds the latency).
    t_slow = time.time()
    mesh.sicken(plan.slow, latency_ms=plan.latency_ms)
    tl.action(f"{plan.slow}: every call takes {plan.latency_ms:g} ms more (sickness control)")
    t_early = t_slow + plan.early_s
    t_late = t_early + plan.late_s
    seen_slow: set[str] = set()

    def note_progress() -> bool:
        for e in between(outbound_calls(rec.since(t_slow), plan.target, callers),
                         t_slow, t_late):
            if (e.endpoint == plan.slow_ep and e.latency_ms >= 0.8 * plan.latency_ms
                    and e.instance not in seen_slow):
                seen_slow.add(e.instance)
                tl.observe(f"{e.instance}: a call to {plan.slow} took {e.latency_ms:.0f} ms")
        # every call begun in the windows has ended (the tap's batches trail the calls)
        return time.time() >= t_late + plan.latency_ms / 1000 + 1.0
    wait_for(note_progress, plan.early_s + plan.late_s + plan.latency_ms / 1000 + 10,
             poll_s=0.25)
    calls = outbound_calls(rec.since(t_slow), plan.target, callers)
    early = started_between(calls, t_slow, t_early)
    late = started_between(calls, t_early, t_late)
    early_p99 = percentile((e.latency_ms for e in early), 99)
    # Each caller's balancer needs one slow call to learn; one begun late (the caller sent it
    # none before) is not the edge failing to recover, so "after" leaves it out.
    learned = without_first_slow(early + late, plan.slow_ep, 0.8 * plan.latency_ms)
    learned_ids = {id(e) for e in learned}
    late_learned = [e for e in late if id(e) in learned_ids]
    late_p99 = percentile((e.latency_ms for e in late_learned), 99)
    early_share = share(early, plan.slow_ep)
    late_share = share(late, plan.slow_ep)
    slow_calls = [e for e in early if e.endpoint == plan.slow_ep]
    tl.measure("early", {"window_s": plan.early_s, "calls": len(early),
                         "slow_calls": len(slow_calls), "slow_share": _r(early_share),
                         "p99_ms": _r(early_p99, 1)})
    tl.measure("late", {"window_s": plan.late_s, "calls": len(late),
                        "slow_share": _r(late_share), "p99_ms": _r(late_p99, 1),
                        "first_slow_calls_left_out": len(late) - len(late_learned)})
    tl.observe(f"calls begun in the first {plan.early_s:g} s of the slowdown: {len(early)}, "
               f"{fmt_share(early_share)} on {plan.slow}, p99 {fmt_ms(early_p99)}; in the next "
               f"{plan.late_s:g} s: {len(late)} calls, {fmt_share(late_share)} on {plan.slow}, "
               f"p99 {fmt_ms(late_p99)}")

    tl.expect("the slowdown was seen at the edge",
              early_p99 is not None and early_p99 >= 0.8 * plan.latency_ms,
              f"p99 of the calls to {plan.target} begun in the first {plan.early_s:g} s: "
              f"{fmt_ms(early_p99)} ({len(slow_calls)} calls went to {plan.slow}; "
              f"{plan.latency_ms:g} ms added)")
    tl.expect("traffic moved away from the slow replica",
              len(late) >= MIN_CALLS and late_share is not None and late_share <= LOW_SHARE,
              f"{plan.slow} got {fmt_share(late_share)} of {len(late)} calls begun in the "
              f"{plan.late_s:g} s after the first {plan.early_s:g} s "
              f"(at most {LOW_SHARE:.0%} expected)")
    # Recovered: back near where it was before (the baseline's p99, or half the added
    # latency when the machine is quicker than that), and at most half of the slowed p99.
    target_p99 = max(plan.latency_ms / 2, 1.5 * (base_p99 or 0.0))
    tl.measure("late_p99_target_ms", round(target_p99, 1))
    tl.expect("edge p99 recovered",
              len(late) >= MIN_CALLS and late_p99 is not None and early_p99 is not None
              and late_p99 <= target_p99 and late_p99 < early_p99 / 2,
              f"p99 {fmt_ms(late_p99)} after (each caller's first slow call, "
              f"{len(late) - len(late_learned)} of them begun after, left out), against "
              f"{fmt_ms(early_p99)} just after the slowdown and {fmt_ms(base_p99)} before it "
              f"({plan.latency_ms:g} ms added; recovered: at most {fmt_ms(target_p99)} and half "
              f"the slowed p99)")
    _topology_view(mesh, tl, plan, callers)

    mesh.heal(plan.slow)
    t_heal = time.time()
    tl.action(f"{plan.slow}: healed")
    if not opts.short:
        _share_returns(tl, plan, rec, callers, t_heal)


def _topology_view(mesh: Mesh, tl: Timeline, plan: Plan, callers: set[str]) -> None:
    """The control plane's view of the edge (its report window) as a measurement."""
    try:
        topo = mesh.topology()
    except Exception as exc:  # a view only: never fails the scenario
        tl.say(f"topology unavailable: {exc}")
        return
    sources = {p.service for p in mesh.state.find("sidecar") if p.instance in callers}
    for edge in topo.edges:
        if edge.destination == plan.target and edge.source in sources:
            tl.measure(f"topology_{edge.source}_{plan.target}",
                       {"p99_ms": round(edge.p99_ms, 1), "p50_ms": round(edge.p50_ms, 1),
                        "requests": edge.requests, "window_s": topo.window_s})
            tl.observe(f"topology edge {edge.source} -> {plan.target} over the last "
                       f"{topo.window_s:g} s: p50 {edge.p50_ms:.0f} ms, p99 {edge.p99_ms:.0f} ms "
                       f"({edge.requests} calls)")


def _share_returns(tl: Timeline, plan: Plan, rec: TapRecorder, callers: set[str],
                   t_heal: float) -> None:
    """Full run: the balancers try the healed replica again (its estimate decays) and it
    answers fast, so it carries calls again."""
    window_s = 10.0

    def back() -> bool:
        recent = between(outbound_calls(rec.since(time.time() - window_s), plan.target,
                                        callers), time.time() - window_s, time.time())
        fast_back = [e for e in recent if e.endpoint == plan.slow_ep and e.time_unix > t_heal
                     and e.latency_ms < plan.latency_ms / 2]
        s = share(recent, plan.slow_ep)
        return len(fast_back) >= 3 and s is not None and s >= LOW_SHARE
    ok = bool(wait_for(back, plan.return_timeout_s, poll_s=1.0))
    recent = between(outbound_calls(rec.since(time.time() - window_s), plan.target, callers),
                     time.time() - window_s, time.time())
    s = share(recent, plan.slow_ep)
    tl.measure("share_after_heal", _r(s))
    tl.measure("share_back_after_s", round(time.time() - t_heal, 1))
    tl.expect("the healed replica gets its share back", ok,
              f"{plan.slow} carried {fmt_share(s)} of the calls of the last {window_s:g} s, "
              f"{time.time() - t_heal:.0f} s after the heal")
