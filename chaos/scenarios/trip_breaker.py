"""``trip-breaker``: one replica of a service fails every call (UNAVAILABLE, through its
sickness control); every caller's sidecar must eject it within the configured consecutive
errors, send the traffic to the healthy replica, and once it is healed let it back in
through a half-open probe.

For its duration the scenario applies a TrafficPolicy for the target service (restoring or
deleting it afterwards) so that the figures it checks are known: ``consecutive_errors``, a
short ``base_ejection_ms`` with ``--short``, one attempt per call (no mesh retry: every call
the tap shows is one attempt on the endpoint it names) and round-robin balancing (the
balancer alone would keep sending half of the calls to the failing replica, so the traffic
that moves is the breaker's doing).

What it reads, as a user would: ``Admin.ListBreakers`` (``meshctl breakers``) for the
breaker states every caller reports, ``Admin.Tap`` (``meshctl tap``) for where each call
landed and how it ended, the callers' ``/stats`` on their admin ports for the breaker's
recent transitions (when it opened, its failed half-open probes, how it closed), and the
load generator's counts for the orders' success rate.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from chaos.mesh import ChaosError, Mesh, TapRecorder, http_json, wait_for
from chaos.scenarios import Options
from chaos.timeline import Timeline
from protos.mesh.v1 import control_pb2 as pb

NAME = "trip-breaker"
EXPECTATION = (
    "one replica fails every call with UNAVAILABLE: the breaker for that endpoint opens "
    "within the configured consecutive errors on every caller's sidecar, the calls go to the "
    "healthy replica and the order success rate recovers; healed, the breaker closes "
    "through half-open")

TARGETS = ("payment", "inventory")
"""Services whose replicas the scenario may make fail (the saga's participants)."""
SICK_CODES = frozenset({"UNAVAILABLE", "INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED",
                        "DATA_LOSS"})
"""The policy's ``error_codes``: the answers that count against an endpoint."""
CONSECUTIVE_ERRORS = 3
EJECTION_SLACK_S = 0.002
"""A call's tap time is taken just before its outcome reaches outlier detection (and
``/stats`` gives transition times to the ms)."""
TRANSIENT_CANCEL = "did not complete within"
"""An order cancelled because a step kept failing (not a business refusal)."""
MIN_ORDERS = 5
"""Orders a window must finish for its success rate to say anything."""
MIN_CALLS = 5
"""Calls a tap window must hold for its shares to say anything."""
RECOVERED_RATE = 0.95
RECOVERED_SLACK = 0.05
"""Recovered: orders succeed at ``RECOVERED_RATE`` or better, or, when they did worse than
that before the failure, about as well as then (see ``recovered_floor``)."""


@dataclass
class Plan:
    """The scenario's choices and timers (``--short`` or not)."""

    target: str
    sick: str
    healthy: str
    sick_ep: str
    healthy_ep: str
    base_ejection_ms: int
    max_ejection_ms: int
    open_timeout_s: float
    baseline_s: float
    window_s: float
    close_timeout_s: float
    tap_s: float

    def policy_doc(self, name: str) -> dict[str, Any]:
        """The TrafficPolicy applied for the scenario's duration."""
        return {"kind": "TrafficPolicy", "name": name, "spec": {
            "service": self.target,
            "load_balancer": "round_robin",
            "retries": {"max_attempts": 1},
            "outlier_detection": {
                "consecutive_errors": CONSECUTIVE_ERRORS,
                "error_codes": sorted(SICK_CODES),
                "base_ejection_ms": self.base_ejection_ms,
                "max_ejection_ms": self.max_ejection_ms,
                "max_ejection_percent": 50,
                "half_open_probes": 1}}}


@dataclass
class BreakerWatch:
    """What ListBreakers said about the sick endpoint, per caller, over the scenario."""

    callers: set[str]
    seen: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    """caller -> (unix time, state) each time the reported state changed."""
    first_open: dict[str, pb.BreakerEndpoint] = field(default_factory=dict)
    base_ejections: dict[str, int] = field(default_factory=dict)
    """caller -> times it had ejected the endpoint before the scenario broke it."""
    last: dict[str, pb.BreakerEndpoint] = field(default_factory=dict)

    def poll(self, mesh: Mesh, plan: Plan) -> dict[str, pb.BreakerEndpoint]:
        """Read the breakers once; caller -> its row for the sick endpoint."""
        rows = {r.instance: r for r in mesh.breakers(plan.target)
                if r.upstream == plan.target and r.instance in self.callers
                and (r.endpoint == plan.sick_ep or r.endpoint_instance == plan.sick)}
        now = time.time()
        for caller, row in rows.items():
            states = self.seen.setdefault(caller, [])
            if not states or states[-1][1] != row.state:
                states.append((now, row.state))
            if row.state == "OPEN" and caller not in self.first_open:
                self.first_open[caller] = row
        self.last.update(rows)
        return rows

    def saw(self, caller: str, state: str, since_unix: float = 0.0) -> bool:
        return any(s == state and t >= since_unix for t, s in self.seen.get(caller, []))


# ---------------------------------------------------------------------- pure helpers
def outbound_calls(events: Iterable[pb.TapEvent], target: str,
                   callers: set[str] | None = None) -> list[pb.TapEvent]:
    """The callers' outbound calls to ``target`` among tap ``events`` (by end time)."""
    return sorted((e for e in events if e.direction == "outbound" and e.destination == target
                   and (callers is None or e.instance in callers)),
                  key=lambda e: e.time_unix)


def order_success(s0: dict[str, Any], s1: dict[str, Any]) -> tuple[float | None, int, int]:
    """(success rate, orders finished, orders failed) between two load generator snapshots:
    an order succeeds when it ends CONFIRMED or CANCELLED by a business refusal; it fails
    when the call errs or the order is cancelled because a step kept failing."""
    def transient(s: dict[str, Any]) -> int:
        return sum(v for k, v in s.get("cancel_reasons", {}).items() if TRANSIENT_CANCEL in k)
    finished = (s1["confirmed"] - s0["confirmed"]) + (s1["cancelled"] - s0["cancelled"])
    errors = sum(s1.get("errors", {}).values()) - sum(s0.get("errors", {}).values())
    failed = errors + transient(s1) - transient(s0)
    total = finished + errors
    return ((total - failed) / total if total > 0 else None), total, failed


def error_codes(s0: dict[str, Any], s1: dict[str, Any]) -> dict[str, int]:
    """The load generator's failed calls by gRPC code between two snapshots."""
    e0, e1 = s0.get("errors", {}), s1.get("errors", {})
    return {k: e1[k] - e0.get(k, 0) for k in sorted(e1) if e1[k] > e0.get(k, 0)}


def recovered_floor(rate_before: float | None, n: int) -> float:
    """The success rate over ``n`` orders that counts as recovered: ``RECOVERED_RATE``, or,
    when the demo was doing worse than that before the failure already (a busy host times
    orders out whatever the mesh does), no worse than that rate by more than
    ``RECOVERED_SLACK`` or two standard errors of a rate measured over ``n`` orders."""
    if rate_before is None:
        return RECOVERED_RATE
    noise = 2 * math.sqrt(rate_before * (1 - rate_before) / n) if n > 0 else 0.0
    return min(RECOVERED_RATE, rate_before - max(RECOVERED_SLACK, noise))


def fmt_rate(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.1%}"


# ---------------------------------------------------------------------- mesh helpers
def get_policies(mesh: Mesh, service: str) -> list[dict[str, Any]]:
    """The stored TrafficPolicies for ``service`` (documents)."""
    resp = mesh.admin.stub.GetConfig(pb.GetConfigRequest(kind="TrafficPolicy"), timeout=5)
    docs = [json.loads(o.json) for o in resp.objects if not o.deleted]
    return [d for d in docs if d.get("spec", {}).get("service") == service]


def apply_docs(mesh: Mesh, docs: list[dict[str, Any]]) -> str:
    """Apply config documents; returns the snapshot version after the apply."""
    resp = mesh.admin.stub.ApplyConfig(pb.ApplyConfigRequest(documents=[
        pb.ConfigDocument(source=f"chaos {NAME}", index=i + 1, json=json.dumps(d))
        for i, d in enumerate(docs)]), timeout=10)
    return resp.version


def all_acked(mesh: Mesh, version: str) -> bool:
    """Every sidecar of state.json connected, SYNCED, at ``version`` or later."""
    want = int(version or 0)
    got = {s.instance: s for s in mesh.sidecars()}
    for p in mesh.state.find("sidecar"):
        s = got.get(p.instance)
        if (s is None or not s.connected or s.state != "SYNCED"
                or int(s.acked_version or 0) < want):
            return False
    return True


@contextmanager
def traffic_policy(mesh: Mesh, tl: Timeline, doc: dict[str, Any]) -> Iterator[str]:
    """Apply TrafficPolicy ``doc`` (in place of the service's own, if it has one) for the
    block; afterwards restore the one it replaced, or delete it. Yields the version."""
    service = doc["spec"]["service"]
    before = get_policies(mesh, service)
    if before:
        doc = {**doc, "name": before[0]["name"]}
    version = apply_docs(mesh, [doc])
    tl.action(f"applied TrafficPolicy {doc['name']} for {service}: "
              f"{json.dumps(doc['spec'], sort_keys=True)} (snapshot v{version})")
    try:
        yield version
    finally:
        if before:
            version = apply_docs(mesh, before)
            tl.action(f"restored TrafficPolicy {before[0]['name']} (snapshot v{version})")
        else:
            resp = mesh.admin.stub.DeleteConfig(
                pb.DeleteConfigRequest(kind="TrafficPolicy", name=doc["name"]), timeout=10)
            tl.action(f"deleted TrafficPolicy {doc['name']} (snapshot v{resp.version})")


def breaker_transitions(mesh: Mesh, caller: str, plan: Plan) -> list[dict[str, Any]]:
    """The recent transitions of the sick endpoint's breaker in the caller's sidecar
    (``/stats`` on its admin port): ``{"at_unix", "from", "to", "why"}``, oldest first."""
    doc = http_json(mesh.sidecar(caller).admin, "GET", "/stats")
    row = doc.get("outbound", {}).get("breakers", {}).get(plan.target, {}).get(plan.sick_ep, {})
    return list(row.get("recent", []))


def find_callers(mesh: Mesh, rec: TapRecorder, target: str, since_unix: float,
                 timeout_s: float) -> set[str]:
    """Sidecar instances seen calling ``target`` (tap, since ``since_unix``); when the tap is
    silent, the sidecars of the services the topology shows calling it."""
    def seen() -> set[str]:
        known = {p.instance for p in mesh.state.find("sidecar")}
        return {e.instance for e in outbound_calls(rec.since(since_unix), target)} & known
    callers: set[str] = wait_for(lambda: len(seen()) >= 2 and seen(), timeout_s) or seen()
    if callers:
        return callers
    sources = {e.source for e in mesh.topology().edges if e.destination == target}
    return {p.instance for p in mesh.state.find("sidecar") if p.service in sources}


# ---------------------------------------------------------------------- the scenario
def make_plan(mesh: Mesh, opts: Options) -> Plan:
    target = opts.rng.choice(TARGETS)
    replicas = mesh.instances(target)
    if len(replicas) < 2:
        raise ChaosError(f"{target} has {len(replicas)} replica(s); the scenario needs two")
    sick = opts.rng.choice(replicas)
    healthy = next(r for r in replicas if r != sick)
    base = int(opts.pick(2000, 10000))
    return Plan(target=target, sick=sick, healthy=healthy,
                sick_ep=mesh.sidecar(sick).inbound, healthy_ep=mesh.sidecar(healthy).inbound,
                base_ejection_ms=base, max_ejection_ms=2 * base,
                open_timeout_s=opts.pick(25, 60), baseline_s=opts.pick(3, 10),
                window_s=opts.pick(4, 20),
                close_timeout_s=2 * base / 1000 + opts.pick(15, 30),
                tap_s=opts.pick(150, 600))


def run(mesh: Mesh, tl: Timeline, opts: Options) -> None:
    """Trip a breaker, watch the traffic move, heal, watch it close through half-open."""
    mesh.reload()
    if not wait_for(mesh.all_synced, 30):
        raise ChaosError("the mesh is not SYNCED before the scenario")
    plan = make_plan(mesh, opts)
    tl.say(f"target {plan.target}: {plan.sick} ({plan.sick_ep}) will fail, "
           f"{plan.healthy} ({plan.healthy_ep}) stays healthy")
    t_start = time.time()
    s_base = mesh.load_stats()
    with mesh.tap(plan.target, duration_s=plan.tap_s) as rec:
        callers = find_callers(mesh, rec, plan.target, t_start, opts.pick(6, 10))
        if not callers:
            raise ChaosError(f"no sidecar is seen calling {plan.target}")
        tl.observe(f"callers of {plan.target}: {', '.join(sorted(callers))}")
        tl.measure("target", plan.target)
        tl.measure("sick_replica", plan.sick)
        tl.measure("callers", sorted(callers))
        tl.measure("consecutive_errors_configured", CONSECUTIVE_ERRORS)
        with traffic_policy(mesh, tl, plan.policy_doc(f"chaos-{plan.target}")) as version:
            if not wait_for(lambda: all_acked(mesh, version), 30):
                raise ChaosError(f"the sidecars did not all ACK snapshot v{version}")
            tl.observe(f"every sidecar ACKed snapshot v{version} with the policy")
            watch = BreakerWatch(callers)
            if not wait_for(lambda: all(r.state == "CLOSED" for r in
                                        watch.poll(mesh, plan).values())
                            and set(watch.last) == callers, 20):
                raise ChaosError(f"the breakers for {plan.sick_ep} are not all CLOSED "
                                 f"before the scenario: "
                                 f"{ {c: r.state for c, r in watch.last.items()} }")
            watch.seen.clear()
            watch.base_ejections = {c: int(r.ejections) for c, r in watch.last.items()}
            wait_for(lambda: time.time() - t_start >= plan.baseline_s, plan.baseline_s + 1)
            try:
                _break_and_heal(mesh, tl, opts, plan, rec, watch, s_base)
            finally:
                mesh.heal(plan.sick)
    if wait_for(mesh.all_synced, 30):
        tl.observe("every sidecar is SYNCED after the policy was removed")
    else:
        tl.observe("not every sidecar is SYNCED 30 s after the policy was removed")


def _break_and_heal(mesh: Mesh, tl: Timeline, opts: Options, plan: Plan, rec: TapRecorder,
                    watch: BreakerWatch, s_base: dict[str, Any]) -> None:
    callers = watch.callers
    s_sick = mesh.load_stats()
    rate_base, n_base, f_base = order_success(s_base, s_sick)
    tl.measure("order_success_rate_before", rate_base and round(rate_base, 4))
    tl.measure("orders_before", n_base)
    tl.measure("order_errors_before", error_codes(s_base, s_sick))
    tl.observe(f"before the failure: {fmt_rate(rate_base)} of {n_base} orders succeeded "
               f"({f_base} failed)")
    mesh.sicken(plan.sick, error_rate=1.0, error_code="UNAVAILABLE")
    t_sick = time.time()
    tl.action(f"{plan.sick}: every call fails with UNAVAILABLE (sickness control)")

    # ---- the breaker opens on every caller
    def all_open() -> bool:
        watch.poll(mesh, plan)
        for caller in sorted(set(watch.first_open) - reported):
            row = watch.first_open[caller]
            reported.add(caller)
            tl.observe(f"{caller}: breaker for {plan.sick} ({plan.sick_ep}) OPEN, "
                       f"{row.consecutive_errors} consecutive errors, "
                       f"{row.ejections} ejection(s), half-open in {row.half_open_in_s:.1f} s")
        return set(watch.first_open) >= callers
    reported: set[str] = set()
    opened = bool(wait_for(all_open, plan.open_timeout_s))
    t_open = time.time()
    s_open = mesh.load_stats()
    tl.measure("open_after_s", round(t_open - t_sick, 2))
    missing = sorted(callers - set(watch.first_open))
    tl.expect("breaker OPEN on every caller", opened,
              f"{len(watch.first_open)}/{len(callers)} callers reported {plan.sick} OPEN "
              f"{t_open - t_sick:.1f} s after it fell sick"
              + (f"; never OPEN at {', '.join(missing)}" if missing else ""))

    # ---- within the configured consecutive errors: the sick answers each caller got from
    # the endpoint (tap) up to the moment its breaker opened (its sidecar's transitions)
    time.sleep(0.5)  # the tap's batches trail the calls by ~100 ms
    counts: dict[str, int | None] = {}
    for caller in sorted(callers):
        t_ejected = _first_ejection(mesh, plan, watch, caller, t_sick)
        if t_ejected is None:
            counts[caller] = None
            continue
        counts[caller] = sum(e.endpoint == plan.sick_ep and e.status in SICK_CODES
                             and e.time_unix <= t_ejected + EJECTION_SLACK_S
                             for e in outbound_calls(rec.since(t_sick), plan.target, {caller}))
    reported_errors = {c: int(r.consecutive_errors) for c, r in watch.first_open.items()}
    tl.measure("errors_before_ejection", counts)
    tl.measure("consecutive_errors_reported_at_open", reported_errors)
    within = {c: n is not None and 1 <= n <= CONSECUTIVE_ERRORS for c, n in counts.items()}
    tl.expect("breaker opened within the configured consecutive errors",
              bool(within) and all(within.values()),
              f"sick answers each caller got before its breaker opened (tap) {counts}, "
              f"consecutive errors reported at OPEN {reported_errors}, "
              f"configured {CONSECUTIVE_ERRORS}")

    # ---- traffic on the healthy replica, orders succeeding, over a window
    t_w0 = time.time()
    s_w0 = mesh.load_stats()
    wait_for(lambda: watch.poll(mesh, plan) and time.time() - t_w0 >= plan.window_s,
             plan.window_s + 10, poll_s=0.5)
    t_w1 = time.time()
    s_w1 = mesh.load_stats()
    time.sleep(0.3)
    during = [e for e in outbound_calls(rec.since(t_sick), plan.target, callers)
              if e.time_unix < t_open]
    after = [e for e in outbound_calls(rec.since(t_w0), plan.target, callers)
             if e.time_unix < t_w1]
    on_healthy = sum(e.endpoint == plan.healthy_ep for e in after)
    on_sick: dict[str, int] = {c: 0 for c in callers}
    for e in after:
        if e.endpoint == plan.sick_ep:
            on_sick[e.instance] += 1
    probes = {c: _failed_probes(mesh, plan, c, t_w0, t_w1 + EJECTION_SLACK_S)
              for c in sorted(callers)}
    extra = {c: on_sick[c] - probes[c] for c in callers if on_sick[c] > probes[c]}
    share_during = (sum(e.endpoint == plan.sick_ep for e in during) / len(during)
                    if during else None)
    share_after = on_healthy / len(after) if after else None
    tl.measure("calls_to_sick_share_before_open", share_during and round(share_during, 3))
    tl.measure("calls_after_open", {"healthy": on_healthy, "sick": on_sick,
                                    "failed_half_open_probes": probes})
    tl.observe(f"after every breaker opened ({plan.window_s:g} s): {on_healthy} calls on "
               f"{plan.healthy}, {sum(on_sick.values())} on {plan.sick} "
               f"(its breakers let {sum(probes.values())} half-open probe(s) through); "
               f"before: {fmt_rate(share_during)} of calls went to {plan.sick}")
    tl.expect("traffic moved to the healthy replica",
              len(after) >= MIN_CALLS and not extra and share_after is not None
              and share_after >= 0.8,
              f"{on_healthy} of {len(after)} calls landed on {plan.healthy} "
              f"({fmt_rate(share_after)}); calls on {plan.sick} beyond its half-open probes: "
              f"{extra or 'none'}")
    edge_during = (sum(e.status not in SICK_CODES for e in during) / len(during)
                   if during else None)
    edge_after = sum(e.status not in SICK_CODES for e in after) / len(after) if after else None
    tl.measure("edge_success_before_open", edge_during and round(edge_during, 3))
    tl.measure("edge_success_after_open", edge_after and round(edge_after, 3))
    rate_during, n_during, f_during = order_success(s_sick, s_open)
    rate_after, n_after, f_after = order_success(s_w0, s_w1)
    tl.measure("order_success_rate_during", rate_during and round(rate_during, 4))
    tl.measure("order_success_rate_after", rate_after and round(rate_after, 4))
    tl.measure("orders_during", n_during)
    tl.measure("orders_after", n_after)
    tl.observe(f"calls to {plan.target} answered without a sick code: "
               f"{fmt_rate(edge_during)} before the breakers opened, {fmt_rate(edge_after)} "
               f"after; orders succeeding: {fmt_rate(rate_during)} of {n_during} "
               f"({f_during} failed) while it opened, {fmt_rate(rate_after)} of {n_after} "
               f"({f_after} failed) after")
    tl.measure("order_errors_during", error_codes(s_sick, s_open))
    tl.measure("order_errors_after", error_codes(s_w0, s_w1))
    floor = recovered_floor(rate_base, n_after)
    tl.measure("order_success_rate_floor", round(floor, 4))
    tl.expect("order success rate recovered",
              n_after >= MIN_ORDERS and rate_after is not None and rate_after >= floor,
              f"{fmt_rate(rate_after)} of {n_after} orders succeeded in the "
              f"{t_w1 - t_w0:.1f} s after the ejection (at least {fmt_rate(floor)} expected), "
              f"against {fmt_rate(rate_during)} of {n_during} while it opened and "
              f"{fmt_rate(rate_base)} before the failure")

    # ---- heal: the breaker closes through half-open on every caller
    mesh.heal(plan.sick)
    t_heal = time.time()
    tl.action(f"{plan.sick}: healed")
    evidence: dict[str, str] = {}

    def closed_through_half_open() -> bool:
        rows = watch.poll(mesh, plan)
        for caller in sorted(callers):
            row = rows.get(caller)
            if caller in evidence or row is None or row.state != "CLOSED":
                continue
            if row.last_transition_unix and row.last_transition_unix < t_heal:
                continue  # CLOSED from before the heal: not this recovery
            via = _half_open_evidence(mesh, plan, watch, caller, t_heal)
            if via:
                evidence[caller] = via
                tl.observe(f"{caller}: breaker for {plan.sick} CLOSED again ({via})")
        return set(evidence) >= callers
    closed = bool(wait_for(closed_through_half_open, plan.close_timeout_s, poll_s=0.3))
    tl.measure("closed_after_heal_s", round(time.time() - t_heal, 2))
    tl.measure("half_open_evidence", evidence)
    tl.measure("breaker_states_seen", {c: [s for _, s in v] for c, v in watch.seen.items()})
    states = {c: r.state for c, r in watch.last.items()}
    tl.expect("breaker closed through half-open", closed,
              f"{len(evidence)}/{len(callers)} callers closed via half-open within "
              f"{time.time() - t_heal:.1f} s of the heal; last states {states}")


def _first_ejection(mesh: Mesh, plan: Plan, watch: BreakerWatch, caller: str,
                    since_unix: float) -> float | None:
    """When ``caller``'s breaker for the sick endpoint first went CLOSED -> OPEN since
    ``since_unix``: its sidecar's recent transitions, else the time ListBreakers gave with
    the first OPEN it reported (when that was the first ejection since the break)."""
    try:
        for r in breaker_transitions(mesh, caller, plan):
            if (r.get("from"), r.get("to")) == ("CLOSED", "OPEN") and \
                    (r.get("at_unix") or 0) >= since_unix:
                return float(r["at_unix"])
    except (OSError, ValueError):
        pass
    row = watch.first_open.get(caller)
    if row is not None and row.ejections == watch.base_ejections.get(caller, 0) + 1 \
            and row.last_transition_unix >= since_unix:
        return row.last_transition_unix
    return None


def _failed_probes(mesh: Mesh, plan: Plan, caller: str, t0: float, t1: float) -> int:
    """Half-open probes of the sick endpoint that failed in ``caller``'s sidecar between
    ``t0`` and ``t1`` (HALF_OPEN -> OPEN transitions; -1 when its /stats cannot be read)."""
    try:
        moves = breaker_transitions(mesh, caller, plan)
    except (OSError, ValueError):
        return -1
    return sum((r.get("from"), r.get("to")) == ("HALF_OPEN", "OPEN")
               and t0 <= (r.get("at_unix") or 0) <= t1 for r in moves)


def _half_open_evidence(mesh: Mesh, plan: Plan, watch: BreakerWatch, caller: str,
                        t_heal: float) -> str:
    """How ``caller``'s breaker for the sick endpoint is seen to have closed through
    HALF_OPEN since the heal (its sidecar's own transitions, or a HALF_OPEN report), or ""
    when it is not."""
    try:
        moves = [r for r in breaker_transitions(mesh, caller, plan)
                 if (r.get("at_unix") or 0) >= t_heal - 1.0]
    except (OSError, ValueError):
        moves = []
    steps = [f"{r['from']}->{r['to']}" for r in moves]
    if steps and steps[-1] == "HALF_OPEN->CLOSED":
        return "its sidecar's /stats shows " + ", ".join(steps)
    if watch.saw(caller, "HALF_OPEN", t_heal - 1.0):
        return "ListBreakers reported HALF_OPEN, then CLOSED"
    return ""
