"""Route: pick the upstream service (cluster) from the call's ``:authority`` and, when the
snapshot has a route for that service, the first rule that takes the call and one of the
rule's weighted destinations (an endpoint subset chosen by labels).

Everything that depends only on the snapshot (which services exist, compiled matches, which
subsets have a healthy endpoint, cumulative weights, explanations) is computed once per
snapshot, the first time a call sees it. Per call: a dict lookup for a service without
rules; for one with rules, the match of each rule until one takes the call, then at most one
random draw (two when the drawn subset has no healthy endpoint).
"""

from __future__ import annotations

import random
import re
from bisect import bisect_right
from collections.abc import Callable
from typing import Any

from mesh_common.snapshot import Cluster, Endpoint, RouteRule, Rule, Snapshot, StringMatch
from sidecar.http2 import grpc as G
from sidecar.http2.relay import Call, LocalReply

from .base import ROUTE, Decision, Layer, Next, note

_AUTHORITY_CACHE_ENTRIES = 1024
_EXACT, _PREFIX, _REGEX = 0, 1, 2
_KINDS = {"exact": _EXACT, "prefix": _PREFIX, "regex": _REGEX}


def service_of(authority: str) -> str:
    """``payment``, ``payment:443`` and ``[::1]:80`` style authorities → the host part."""
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def subset_label(subset: tuple[tuple[str, str], ...]) -> str:
    """``version=v2,zone=a`` for a subset's label pairs; ``*`` for the empty subset (every
    endpoint)."""
    return ",".join(f"{k}={v}" for k, v in subset) or "*"


class _Matcher:
    """One compiled string match: ``test(text)`` is True when ``text`` satisfies it (exact,
    prefix, or a regex that matches the whole text). The regex is compiled here, once."""

    __slots__ = ("kind", "value", "regex")

    def __init__(self, m: StringMatch) -> None:
        self.kind = _KINDS[m.kind]
        self.value = m.value
        self.regex: re.Pattern[str] | None = re.compile(m.value) if self.kind == _REGEX else None

    def test(self, text: str) -> bool:
        if self.kind == _EXACT:
            return text == self.value
        if self.kind == _PREFIX:
            return text.startswith(self.value)
        assert self.regex is not None
        return self.regex.fullmatch(text) is not None


class _RuleCounts:
    """Calls one rule of one service took since start (kept across snapshots, by name)."""

    __slots__ = ("matches", "redistributed", "unavailable")

    def __init__(self) -> None:
        self.matches = 0
        self.redistributed = 0
        """Of ``matches``, calls whose drawn subset had no healthy endpoint and that went to
        another destination instead."""
        self.unavailable = 0
        """Of ``matches``, calls answered UNAVAILABLE: no destination had a healthy endpoint."""


class _Dest:
    """A destination of a rule under one snapshot: its healthy endpoints (empty: none)."""

    __slots__ = ("subset", "weight", "endpoints", "label", "note", "attrs")

    def __init__(self, subset: tuple[tuple[str, str], ...], weight: int,
                 endpoints: tuple[Endpoint, ...], rule: str) -> None:
        self.subset = subset
        self.weight = weight
        self.endpoints = endpoints
        self.label = subset_label(subset)
        self.note = f"rule {rule} → subset {self.label} (weight {weight})"
        self.attrs = {"mesh.rule": rule, "mesh.subset": self.label, "mesh.weight": weight}
        """The span event's attributes (made once: a traced call allocates nothing more)."""


class _RulePlan:
    """A rule compiled against one snapshot: its matchers and how to pick a destination."""

    __slots__ = ("rule", "method", "headers", "dests", "cum", "total", "last", "live",
                 "live_cum", "live_total", "fixed", "counts", "reply", "down")

    def __init__(self, service: str, rule: Rule, cluster: Cluster, counts: _RuleCounts,
                 label_sets: dict[int, frozenset[tuple[str, str]]]) -> None:
        self.rule = rule
        m = rule.match
        self.method = _Matcher(m.method) if m.method is not None else None
        self.headers = tuple((h.name, _Matcher(h.match)) for h in m.headers)
        self.counts = counts
        dests: list[_Dest] = []
        for d in rule.destinations:
            want = frozenset(d.subset)
            eps = tuple(e for e in cluster.healthy if want <= label_sets[id(e)])
            dests.append(_Dest(d.subset, d.weight, eps, rule.name))
        self.dests = tuple(dests)
        self.cum = _cumulative(self.dests)
        self.total = self.cum[-1] if self.cum else 0
        weighted = [d for d in self.dests if d.weight > 0]
        self.last = max((i for i, d in enumerate(self.dests) if d.weight > 0), default=0)
        """Index of the last weighted destination (a draw never lands past it)."""
        self.live = tuple(d for d in weighted if d.endpoints)
        self.live_cum = _cumulative(self.live)
        self.live_total = self.live_cum[-1] if self.live_cum else 0
        self.down = tuple(d.label for d in weighted if not d.endpoints)
        """Labels of the weighted subsets without a healthy endpoint (their share moves)."""
        self.fixed = weighted[0] if len(weighted) == 1 and weighted[0].endpoints else None
        """The destination when no draw is needed (the only weighted one, and it is live)."""
        self.reply = None if self.live else LocalReply(
            G.UNAVAILABLE, f"service {service!r}, rule {rule.name!r}: no healthy endpoint in "
            f"subset{'s' if len(self.down) > 1 else ''} {', '.join(self.down) or '(none)'} "
            f"of cluster {cluster.name!r}")

    def takes(self, call: Call) -> bool:
        """True when the call satisfies the method and every header match."""
        if self.method is not None and not self.method.test(call.path):
            return False
        if self.headers:
            lookup = call.headers.lookup
            for name, matcher in self.headers:
                value = lookup(name)
                if value is None or not matcher.test(value):
                    return False
        return True


def _cumulative(dests: tuple[_Dest, ...]) -> list[int]:
    out: list[int] = []
    acc = 0
    for d in dests:
        acc += d.weight
        out.append(acc)
    return out


class _Unmatched:
    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls = 0


class _RoutePlan:
    """A service's route rules under one snapshot."""

    __slots__ = ("service", "rules", "unmatched", "unmatched_note", "unmatched_attrs")

    def __init__(self, service: str, rules: tuple[_RulePlan, ...], unmatched: _Unmatched,
                 cluster: Cluster) -> None:
        self.service = service
        self.rules = rules
        self.unmatched = unmatched
        self.unmatched_note = (f"no rule of service {service} matched: any healthy endpoint "
                               f"of cluster {cluster.name}")
        self.unmatched_attrs = {"mesh.rule": "", "mesh.cluster": cluster.name}


_Entry = tuple[str, Cluster, _RoutePlan | None]


class Route(Layer):
    """Sets ``call.route`` (the service) and ``call.cluster``; for a service whose route has
    rules, also ``call.rule`` (the first rule that takes the call: method exact/prefix on
    ``:path``, every header exact/prefix/regex-fullmatch on its first value) and
    ``call.subset`` (the healthy endpoints of one of the rule's destinations, drawn by
    weight). No rule takes the call, or no rules: ``rule`` and ``subset`` stay None and the
    balancer uses the cluster's healthy endpoints.

    A drawn destination whose subset has no healthy endpoint gives the call to the rule's
    other weighted destinations in proportion to their weights (counted: ``redistributed``);
    a weight of 0 never takes calls. No weighted destination with a healthy endpoint, or an
    unknown service: a ``LocalReply`` UNAVAILABLE naming the service (and the rule and its
    subsets). Never raises for any call or snapshot; ``rng`` makes the draws reproducible.
    """

    def __init__(self, snapshot: Callable[[], Snapshot], rng: random.Random | None = None) -> None:
        self.snapshot = snapshot
        self._random = (rng or random.Random()).random
        self._snap: Snapshot | None = None
        self._services: dict[str, _Entry] = {}
        self._by_authority: dict[str, _Entry] = {}
        self._rule_counts: dict[tuple[str, str], _RuleCounts] = {}
        self._unmatched: dict[str, _Unmatched] = {}

    # ------------------------------------------------------------ per snapshot
    def _build(self, snap: Snapshot) -> None:
        """Compile ``snap``'s services and rules (once per snapshot object)."""
        names = {c.name for c in snap.clusters} | {r.service for r in snap.routes}
        label_sets: dict[int, frozenset[tuple[str, str]]] = {
            id(e): frozenset(e.labels) for c in snap.clusters for e in c.endpoints}
        services: dict[str, _Entry] = {}
        for name in names:
            cluster = snap.cluster(name)
            if cluster is None:
                continue
            route = snap.route(name)
            plan = self._plan(route, cluster, label_sets) if route and route.rules else None
            services[name] = (name, cluster, plan)
        self._services = services
        self._by_authority = {}
        self._snap = snap

    def _plan(self, route: RouteRule, cluster: Cluster,
              label_sets: dict[int, frozenset[tuple[str, str]]]) -> _RoutePlan:
        service = route.service
        rules = []
        for rule in route.rules:
            counts = self._rule_counts.get((service, rule.name))
            if counts is None:
                counts = self._rule_counts[(service, rule.name)] = _RuleCounts()
            rules.append(_RulePlan(service, rule, cluster, counts, label_sets))
        unmatched = self._unmatched.get(service)
        if unmatched is None:
            unmatched = self._unmatched[service] = _Unmatched()
        return _RoutePlan(service, tuple(rules), unmatched, cluster)

    # ------------------------------------------------------------ per call
    def on_request(self, call: Call, next: Next) -> Decision:
        snap = self.snapshot()
        if snap is not self._snap:
            self._build(snap)
        entry = self._by_authority.get(call.authority)
        if entry is None:
            entry = self._services.get(service_of(call.authority))
            if entry is None:
                return LocalReply(G.UNAVAILABLE, f"no route to service "
                                  f"{service_of(call.authority)!r} (:authority {call.authority!r})")
            if len(self._by_authority) < _AUTHORITY_CACHE_ENTRIES:
                self._by_authority[call.authority] = entry
        call.route, call.cluster, plan = entry
        if plan is None:
            return next(call)
        for rp in plan.rules:
            if rp.takes(call):
                break
        else:
            plan.unmatched.calls += 1
            note(call, plan.unmatched_note, ROUTE, plan.unmatched_attrs)
            return next(call)
        counts = rp.counts
        counts.matches += 1
        call.rule = rp.rule
        d = rp.fixed
        if d is None:
            if rp.reply is not None:
                counts.unavailable += 1
                return rp.reply
            d = rp.dests[min(bisect_right(rp.cum, self._random() * rp.total), rp.last)]
            if not d.endpoints:  # its share goes to the live ones, by their weights
                counts.redistributed += 1
                down = d
                i = bisect_right(rp.live_cum, self._random() * rp.live_total)
                d = rp.live[min(i, len(rp.live) - 1)]
                note(call, f"rule {rp.rule.name}: subset {down.label} has no healthy endpoint; "
                     f"its share went to subset {d.label} (weight {d.weight})", ROUTE,
                     {"mesh.rule": rp.rule.name, "mesh.subset": d.label,
                      "mesh.subset_down": down.label} if call.span is not None else None)
        call.subset = d.endpoints
        note(call, d.note, ROUTE, d.attrs)
        return next(call)

    # ------------------------------------------------------------ reporting
    def counters(self) -> dict[str, Any]:
        """``{"routes": {service: {"rules": {rule: {"matches", "redistributed",
        "unavailable", "subsets_down"}}, "unmatched": calls}}}``: calls since start per rule
        (by name, across snapshots); ``subsets_down`` lists, under the snapshot in force, the
        rule's weighted subsets with no healthy endpoint."""
        down: dict[tuple[str, str], list[str]] = {}
        for _, _, plan in self._services.values():
            if plan is not None:
                for rp in plan.rules:
                    down[(plan.service, rp.rule.name)] = list(rp.down)
        routes: dict[str, dict[str, Any]] = {}
        for (service, name), c in self._rule_counts.items():
            section = routes.setdefault(service, {"rules": {}, "unmatched": 0})
            section["rules"][name] = {"matches": c.matches, "redistributed": c.redistributed,
                                      "unavailable": c.unavailable,
                                      "subsets_down": down.get((service, name), [])}
        for service, u in self._unmatched.items():
            routes.setdefault(service, {"rules": {}, "unmatched": 0})["unmatched"] = u.calls
        return {"routes": routes}
