"""The outbound routing layers without sockets: route matching (method, headers, first match,
default), weighted splits over label subsets and what happens when a subset has no healthy
endpoint, fault injection, route timeouts, round robin over a subset, the ``/stats``
counters, and a property test over random snapshots and health. Each test drives the real
outbound stack (``outbound_stack``) with a seeded RNG and a fake endpoint pool."""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Any

import pytest
from hpack import Encoder
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_common.limits import Limits
from mesh_common.snapshot import (
    Cluster,
    Destination,
    Endpoint,
    FaultRule,
    HeaderMatch,
    RouteMatch,
    RouteRule,
    Rule,
    Snapshot,
    StringMatch,
)
from sidecar.http2 import grpc as G
from sidecar.http2.connection import H2Connection
from sidecar.http2.headers import HeaderReader, encode_block
from sidecar.http2.relay import Call, Delayed, LocalReply
from sidecar.layers import route as route_module
from sidecar.layers.stats import Stats
from sidecar.stack import Stack, outbound_stack

TD = "mesh.local"
SAY = "/echo.Echo/Say"
_DOWN = H2Connection(client=False, limits=Limits())


class FakePool:
    """What the endpoint terminal returns: remembers the endpoint it stands for."""

    closed = False

    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep
        self.label = ep.address


def ep(i: int, healthy: bool = True, service: str = "echo", **labels: str) -> Endpoint:
    return Endpoint(f"10.0.0.{i}", 15006, f"spiffe://{TD}/service/{service}", f"{service}-{i}",
                    tuple(sorted(labels.items())), healthy)


def subset(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def exact(v: str) -> StringMatch:
    return StringMatch("exact", v)


def prefix(v: str) -> StringMatch:
    return StringMatch("prefix", v)


def regex(v: str) -> StringMatch:
    return StringMatch("regex", v)


def rule(name: str, *dests: tuple[dict[str, str], int], method: StringMatch | None = None,
         headers: dict[str, StringMatch] | None = None, timeout_ms: int | None = None) -> Rule:
    return Rule(name, RouteMatch(method, tuple(HeaderMatch(k, m) for k, m in
                                               (headers or {}).items())),
                tuple(Destination(subset(**labels), w) for labels, w in dests), timeout_ms)


V1 = ep(1, version="v1")
V1B = ep(2, version="v1")
V2 = ep(3, version="v2")


def snap(*rules: Rule, endpoints: tuple[Endpoint, ...] = (V1, V1B, V2),
         faults: tuple[FaultRule, ...] = (), timeout_ms: int | None = None,
         version: str = "1", load_balancer: str = "peak_ewma") -> Snapshot:
    route = RouteRule("echo", "echo", tuple(rules), timeout_ms, load_balancer, faults=faults)
    return Snapshot(version, clusters=(Cluster("echo", endpoints), Cluster("plain", (ep(9),))),
                    routes=(route,))


def make_call(path: str = SAY, authority: str = "echo",
              headers: tuple[tuple[str, str], ...] = ()) -> Call:
    block = encode_block([(":method", "POST"), (":scheme", "http"), (":path", path),
                          (":authority", authority), ("content-type", "application/grpc"),
                          ("te", "trailers"), *headers])
    return Call(_DOWN, 1, HeaderReader(1 << 16).read(block), None, 0.0)


class Harness:
    """The outbound stack over a snapshot that tests may swap."""

    def __init__(self, snapshot: Snapshot, seed: int = 7) -> None:
        self.snapshot = snapshot
        self.stats = Stats()
        self.stack: Stack = outbound_stack(lambda: self.snapshot, self.stats,
                                           lambda e, route: FakePool(e),  # type: ignore[arg-type,return-value]
                                           random.Random(seed))

    def send(self, path: str = SAY, authority: str = "echo",
             headers: tuple[tuple[str, str], ...] = ()) -> tuple[Call, Any]:
        """One call, decided and then ended at once (as the relay would end it: the limits
        and the balancer release what it held)."""
        call = make_call(path, authority, headers)
        decision = self.stack.on_request(call)
        self.stack.on_end(call)
        return call, decision

    def endpoint(self, path: str = SAY, headers: tuple[tuple[str, str], ...] = ()) -> Endpoint:
        call, decision = self.send(path, headers=headers)
        assert isinstance(decision, FakePool), decision
        assert decision.ep is call.endpoint
        return decision.ep

    def versions(self, n: int, path: str = SAY,
                 headers: tuple[tuple[str, str], ...] = ()) -> Counter[str]:
        return Counter(self.endpoint(path, headers).label("version") or "-" for _ in range(n))

    def routing(self) -> dict[str, Any]:
        """The routing sections of the stack's counters (routes, faults)."""
        counted = self.stack.counters()
        return {k: counted[k] for k in ("routes", "faults")}


# ====================================================================== matching
def test_a_method_matches_exactly_or_by_prefix() -> None:
    h = Harness(snap(rule("say", ({"version": "v2"}, 100), method=exact(SAY)),
                     rule("echo-svc", ({"version": "v1"}, 100), method=prefix("/echo.Echo/"))))
    call, _ = h.send(SAY)
    assert call.rule.name == "say" and call.endpoint.label("version") == "v2"
    call, _ = h.send("/echo.Echo/Shout")
    assert call.rule.name == "echo-svc" and call.endpoint.label("version") == "v1"
    call, _ = h.send("/echo.Echo/Sa")  # not the exact method, but within the prefix
    assert call.rule.name == "echo-svc"
    call, _ = h.send("/other.Svc/Say")
    assert call.rule is None and call.subset is None


def test_headers_match_exactly_by_prefix_and_by_a_regex_over_the_whole_value() -> None:
    h = Harness(snap(rule("exact", ({"version": "v2"}, 100), headers={"x-canary": exact("yes")}),
                     rule("prefix", ({"version": "v2"}, 100), headers={"x-user": prefix("beta-")}),
                     rule("regex", ({"version": "v2"}, 100),
                          headers={"x-tenant": regex("t[0-9]+")})))
    assert h.send(headers=(("x-canary", "yes"),))[0].rule.name == "exact"
    assert h.send(headers=(("x-canary", "yess"),))[0].rule is None
    assert h.send(headers=(("x-user", "beta-7"),))[0].rule.name == "prefix"
    assert h.send(headers=(("x-user", "alpha-beta-7"),))[0].rule is None
    assert h.send(headers=(("x-tenant", "t42"),))[0].rule.name == "regex"
    assert h.send(headers=(("x-tenant", "t42x"),))[0].rule is None  # fullmatch, not search
    assert h.send(headers=(("x-tenant", "at42"),))[0].rule is None
    assert h.send()[0].rule is None  # a missing header never matches


def test_every_header_and_the_method_must_match() -> None:
    h = Harness(snap(rule("both", ({"version": "v2"}, 100), method=exact(SAY),
                          headers={"x-a": exact("1"), "x-b": exact("2")})))
    assert h.send(headers=(("x-a", "1"), ("x-b", "2")))[0].rule.name == "both"
    assert h.send(headers=(("x-a", "1"),))[0].rule is None
    assert h.send("/echo.Echo/Other", headers=(("x-a", "1"), ("x-b", "2")))[0].rule is None


def test_the_first_matching_rule_wins() -> None:
    h = Harness(snap(rule("canary", ({"version": "v2"}, 100), headers={"x-canary": exact("yes")}),
                     rule("all", ({"version": "v1"}, 100)),
                     rule("never", ({"version": "v2"}, 100), method=exact(SAY))))
    assert h.versions(20, headers=(("x-canary", "yes"),)) == {"v2": 20}
    assert h.versions(20) == {"v1": 20}
    rules = h.routing()["routes"]["echo"]["rules"]
    assert (rules["canary"]["matches"], rules["all"]["matches"], rules["never"]["matches"]) == \
        (20, 20, 0)


def test_no_matching_rule_sends_the_call_to_every_healthy_endpoint_of_the_cluster() -> None:
    h = Harness(snap(rule("canary", ({"version": "v2"}, 100), headers={"x-canary": exact("yes")}),
                     endpoints=(V1, ep(2, healthy=False, version="v1"), V2)))
    call, _ = h.send()
    assert call.rule is None and call.subset is None and call.cluster.name == "echo"
    assert call.notes == ["no rule of service echo matched: any healthy endpoint of cluster echo"]
    assert {h.endpoint().instance for _ in range(10)} == {"echo-1", "echo-3"}
    assert h.routing()["routes"]["echo"]["unmatched"] == 11


def test_a_service_without_a_route_is_routed_as_before_with_nothing_noted() -> None:
    h = Harness(snap(rule("all", ({"version": "v2"}, 100))))
    call, decision = h.send(authority="plain:8080")
    assert isinstance(decision, FakePool) and decision.ep.instance == "echo-9"
    assert (call.route, call.rule, call.subset, call.notes, call.route_timeout_s) == \
        ("plain", None, None, None, None)


def test_an_unknown_service_is_unavailable() -> None:
    _, decision = Harness(snap()).send(authority="nowhere:80")
    assert isinstance(decision, LocalReply) and decision.status == G.UNAVAILABLE
    assert "nowhere" in decision.message


def test_header_values_are_found_in_huffman_and_dynamic_table_blocks() -> None:
    """A peer that has not seen our SETTINGS may index fields and Huffman-code them: the
    relay decodes such a block, and the route layer still reads every header's value."""
    enc = Encoder()
    fields = [(":method", "POST"), (":scheme", "http"), (":path", SAY), (":authority", "echo"),
              ("x-canary", "yes"), ("x-canary", "second"), ("x-user", "beta-1")]
    reader = HeaderReader(1 << 16)
    first = reader.read(enc.encode(fields, huffman=True))
    again = reader.read(enc.encode(fields, huffman=True))  # now by dynamic-table reference
    assert first.decoded and again.decoded
    for hb in (first, again):
        assert hb.lookup("x-canary") == "yes"  # the first value, as ``fields`` keeps
        assert hb.lookup("x-user") == "beta-1"
        assert hb.lookup(":path") == SAY
        assert hb.lookup("x-missing") is None
    scanned = HeaderReader(1 << 16)
    scanned.table_size = 0  # as after our SETTINGS: blocks are scanned, not decoded
    hb = scanned.read(encode_block([(":path", SAY), ("x-canary", "yes"), ("accept", "*/*")]))
    assert not hb.decoded and hb.lookup("x-canary") == "yes" and hb.lookup("accept") == "*/*"


def test_a_regex_is_compiled_once_per_snapshot_not_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[str] = []
    real = re.compile

    def counting(pattern: str, *args: Any) -> Any:
        compiled.append(pattern)
        return real(pattern, *args)

    monkeypatch.setattr(route_module.re, "compile", counting)
    h = Harness(snap(rule("rx", ({"version": "v2"}, 100), headers={"x-t": regex("t[0-9]+")})))
    for i in range(50):
        h.send(headers=(("x-t", f"t{i}"),))
    assert compiled.count("t[0-9]+") == 1
    h.snapshot = snap(rule("rx", ({"version": "v2"}, 100), headers={"x-t": regex("t[0-9]+")}),
                      version="2")
    h.send()
    assert compiled.count("t[0-9]+") == 2  # a new snapshot is compiled anew


# ====================================================================== weighted splits
def test_a_90_10_split_lands_within_1_5_points_over_10000_draws() -> None:
    h = Harness(snap(rule("split", ({"version": "v1"}, 90), ({"version": "v2"}, 10))), seed=1)
    seen = h.versions(10_000)
    assert abs(seen["v2"] / 100 - 10) <= 1.5 and abs(seen["v1"] / 100 - 90) <= 1.5, seen
    counts = h.routing()["routes"]["echo"]["rules"]["split"]
    assert counts == {"matches": 10_000, "redistributed": 0, "unavailable": 0,
                      "subsets_down": []}


def test_a_single_destination_needs_no_draw() -> None:
    class NoDraws(random.Random):
        def random(self) -> float:
            raise AssertionError("drew a number for a rule with one destination")

    stack = outbound_stack(lambda: snapshot, Stats(), lambda e, r: FakePool(e),  # type: ignore[arg-type,return-value]
                           NoDraws())
    snapshot = snap(rule("one", ({"version": "v2"}, 100), ({"version": "v1"}, 0)))
    call = make_call()
    assert isinstance(stack.on_request(call), FakePool)
    assert call.subset == (V2,) and call.notes == ["rule one → subset version=v2 (weight 100)"]


def test_a_destination_of_weight_zero_never_takes_calls() -> None:
    h = Harness(snap(rule("z", ({"version": "v1"}, 100), ({"version": "v2"}, 0))))
    assert h.versions(500) == {"v1": 500}


def test_a_subset_without_healthy_endpoints_gives_its_share_to_the_others_proportionally() -> None:
    eps = (ep(1, version="v1"), ep(2, version="v2"), ep(3, healthy=False, version="v3"))
    h = Harness(snap(rule("three", ({"version": "v1"}, 60), ({"version": "v2"}, 30),
                          ({"version": "v3"}, 10)), endpoints=eps), seed=3)
    seen = h.versions(10_000)
    assert "v3" not in seen
    # v3's 10 points go 2:1 to v1 and v2: 66.7 / 33.3.
    assert abs(seen["v1"] / 100 - 200 / 3) <= 1.5, seen
    counts = h.routing()["routes"]["echo"]["rules"]["three"]
    assert abs(counts["redistributed"] / 100 - 10) <= 1.5, counts
    assert counts["subsets_down"] == ["version=v3"] and counts["unavailable"] == 0
    # The call that moved says so.
    while True:
        call, _ = h.send()
        if call.notes and "no healthy endpoint" in call.notes[0]:
            break
    assert call.notes[0].startswith("rule three: subset version=v3 has no healthy endpoint; "
                                    "its share went to subset version=v")
    assert call.notes[1] in ("rule three → subset version=v1 (weight 60)",
                             "rule three → subset version=v2 (weight 30)")


def test_the_only_weighted_subset_down_sends_everything_to_the_other() -> None:
    eps = (ep(1, healthy=False, version="v1"), ep(2, version="v2"))
    h = Harness(snap(rule("canary", ({"version": "v1"}, 90), ({"version": "v2"}, 10)),
                     endpoints=eps))
    assert h.versions(200) == {"v2": 200}
    assert h.routing()["routes"]["echo"]["rules"]["canary"]["redistributed"] > 150


def test_every_subset_down_is_unavailable_naming_the_rule_and_the_subsets() -> None:
    eps = (ep(1, healthy=False, version="v1"), ep(2, version="v3"))
    h = Harness(snap(rule("canary", ({"version": "v1"}, 90), ({"version": "v2"}, 10)),
                     endpoints=eps))
    call, decision = h.send()
    assert isinstance(decision, LocalReply) and decision.status == G.UNAVAILABLE
    assert decision.message == ("service 'echo', rule 'canary': no healthy endpoint in subsets "
                                "version=v1, version=v2 of cluster 'echo'")
    assert call.endpoint is None
    counts = h.routing()["routes"]["echo"]["rules"]["canary"]
    assert (counts["matches"], counts["unavailable"]) == (1, 1)
    assert counts["subsets_down"] == ["version=v1", "version=v2"]


def test_a_subset_needs_every_one_of_its_labels() -> None:
    eps = (ep(1, version="v2", zone="a"), ep(2, version="v2", zone="b"), ep(3, version="v1",
                                                                           zone="a"))
    h = Harness(snap(rule("v2a", ({"version": "v2", "zone": "a"}, 100)), endpoints=eps))
    assert {h.endpoint().instance for _ in range(10)} == {"echo-1"}


def test_a_new_snapshot_is_routed_on_its_own_health() -> None:
    h = Harness(snap(rule("split", ({"version": "v1"}, 50), ({"version": "v2"}, 50))))
    assert set(h.versions(100)) == {"v1", "v2"}
    h.snapshot = snap(rule("split", ({"version": "v1"}, 50), ({"version": "v2"}, 50)),
                      endpoints=(V1, V1B, ep(3, healthy=False, version="v2")), version="2")
    assert h.versions(100) == {"v1": 100}
    counts = h.routing()["routes"]["echo"]["rules"]["split"]
    assert counts["matches"] == 200 and counts["subsets_down"] == ["version=v2"]


def test_round_robin_rotates_over_the_chosen_subset() -> None:
    h = Harness(snap(rule("v1", ({"version": "v1"}, 100)), load_balancer="round_robin"))
    assert [h.endpoint().instance for _ in range(4)] == ["echo-1", "echo-2", "echo-1", "echo-2"]


# ====================================================================== faults
def fault(name: str = "f", method: StringMatch | None = None, delay_ms: int = 0,
          delay_percent: float = 0.0, abort_code: int = 0, abort_percent: float = 0.0
          ) -> FaultRule:
    return FaultRule(name, method, delay_ms, delay_percent, abort_code, abort_percent)


def test_an_injected_abort_answers_the_call_and_picks_no_endpoint() -> None:
    h = Harness(snap(faults=(fault("echo-abort", abort_code=G.UNAVAILABLE, abort_percent=100),)))
    call, decision = h.send()
    assert isinstance(decision, LocalReply) and decision.status == G.UNAVAILABLE
    assert decision.message == "fault injected by the mesh: abort UNAVAILABLE (echo-abort)"
    assert call.endpoint is None and call.notes == [decision.message]
    assert h.routing()["faults"] == {"echo": {"abort": 1, "delay": 0}}


def test_injected_aborts_and_delays_hit_their_percentage_of_calls() -> None:
    h = Harness(snap(faults=(fault("a", abort_code=G.INTERNAL, abort_percent=25),
                             fault("d", delay_ms=150, delay_percent=40))), seed=11)
    outcomes: Counter[str] = Counter()
    for _ in range(4000):
        _, d = h.send()
        kind = "delayed" if isinstance(d, Delayed) else "direct"
        inner = d.then if isinstance(d, Delayed) else d
        outcomes[f"{kind}-{'abort' if isinstance(inner, LocalReply) else 'pool'}"] += 1
        if isinstance(d, Delayed):
            assert d.seconds == pytest.approx(0.15)
    aborts = outcomes["direct-abort"] + outcomes["delayed-abort"]
    delays = outcomes["delayed-abort"] + outcomes["delayed-pool"]
    assert abs(aborts / 40 - 25) <= 2.5 and abs(delays / 40 - 40) <= 2.5, outcomes
    assert outcomes["delayed-abort"] > 0  # a call may get both: delayed, then aborted
    assert h.routing()["faults"]["echo"] == {"abort": aborts, "delay": delays}


def test_a_delay_holds_the_decision_of_the_layers_below() -> None:
    h = Harness(snap(faults=(fault("slow", delay_ms=300, delay_percent=100),)))
    call, decision = h.send()
    assert isinstance(decision, Delayed) and decision.seconds == pytest.approx(0.3)
    assert isinstance(decision.then, FakePool) and decision.then.ep is call.endpoint
    assert call.notes == ["fault injected by the mesh: delay 300 ms (slow)"]


def test_a_fault_for_one_method_leaves_the_others_alone() -> None:
    h = Harness(snap(faults=(fault("only-say", method=exact(SAY), abort_code=10,
                                   abort_percent=100),)))
    call, decision = h.send(SAY)
    assert isinstance(decision, LocalReply) and decision.status == 10
    assert decision.message == "fault injected by the mesh: abort ABORTED (only-say)"
    assert isinstance(h.send("/echo.Echo/Other")[1], FakePool)
    assert isinstance(h.send(SAY, authority="plain")[1], FakePool)


def test_a_fault_and_a_zero_percentage_draw_nothing() -> None:
    h = Harness(snap(faults=(fault("off", delay_ms=100, delay_percent=0, abort_code=14,
                                   abort_percent=0),)))
    assert all(isinstance(h.send()[1], FakePool) for _ in range(100))
    assert h.routing()["faults"]["echo"] == {"abort": 0, "delay": 0}


# ====================================================================== timeouts
def test_the_rules_timeout_wins_over_the_routes_and_none_leaves_only_the_callers() -> None:
    h = Harness(snap(rule("fast", ({"version": "v1"}, 100), method=exact(SAY), timeout_ms=250),
                     rule("rest", ({"version": "v1"}, 100), method=prefix("/echo.")),
                     timeout_ms=2000))
    assert h.send(SAY)[0].route_timeout_s == pytest.approx(0.25)
    assert h.send("/echo.Echo/Other")[0].route_timeout_s == pytest.approx(2.0)
    assert h.send("/x.Y/Z")[0].route_timeout_s == pytest.approx(2.0)  # no rule: the route's
    assert h.send(authority="plain")[0].route_timeout_s is None
    h.snapshot = snap(rule("rest", ({"version": "v1"}, 100)), version="2")
    assert h.send()[0].route_timeout_s is None


# ====================================================================== /stats
def test_routing_counters_are_in_the_stacks_stats_sections() -> None:
    h = Harness(snap(rule("r", ({"version": "v1"}, 100)),
                     faults=(fault("d", delay_ms=10, delay_percent=100),)))
    h.send()
    assert h.routing() == {
        "routes": {"echo": {"rules": {"r": {"matches": 1, "redistributed": 0, "unavailable": 0,
                                            "subsets_down": []}},
                            "unmatched": 0}},
        "faults": {"echo": {"abort": 0, "delay": 1}}}


# ====================================================================== property
_LABELS = {"version": ("v1", "v2", "v3"), "zone": ("a", "b")}


@st.composite
def labels(draw: st.DrawFn) -> dict[str, str]:
    keys = draw(st.lists(st.sampled_from(sorted(_LABELS)), unique=True, max_size=2))
    return {k: draw(st.sampled_from(_LABELS[k])) for k in keys}


@st.composite
def weights(draw: st.DrawFn, n: int) -> list[int]:
    cuts = sorted(draw(st.lists(st.integers(0, 100), min_size=n - 1, max_size=n - 1)))
    edges = [0, *cuts, 100]
    return [b - a for a, b in zip(edges, edges[1:], strict=False)]


@st.composite
def rules_(draw: st.DrawFn, i: int) -> Rule:
    n = draw(st.integers(1, 3))
    ws = draw(weights(n))
    method = draw(st.sampled_from([None, exact(SAY), prefix("/echo."), prefix("/x.")]))
    hdrs = draw(st.sampled_from([{}, {"x-canary": exact("yes")}, {"x-user": regex("b.*")}]))
    return rule(f"r{i}", *((draw(labels()), w) for w in ws), method=method, headers=hdrs)


@st.composite
def cases(draw: st.DrawFn) -> tuple[Snapshot, list[tuple[str, tuple[tuple[str, str], ...]]]]:
    eps = tuple(ep(i, healthy=draw(st.booleans()), **draw(labels()))
                for i in range(1, draw(st.integers(1, 6)) + 1))
    n_rules = draw(st.integers(0, 3))
    rules = [draw(rules_(i)) for i in range(n_rules)]
    calls = draw(st.lists(st.tuples(
        st.sampled_from([SAY, "/echo.Echo/Other", "/x.Y/Z"]),
        st.sampled_from([(), (("x-canary", "yes"),), (("x-user", "bob"),)])), min_size=1,
        max_size=8))
    return snap(*rules, endpoints=eps), calls


def _takes(r: Rule, path: str, headers: dict[str, str]) -> bool:
    m = r.match
    if m.method is not None and not (path == m.method.value if m.method.kind == "exact"
                                     else path.startswith(m.method.value)):
        return False
    for h in m.headers:
        v = headers.get(h.name)
        if v is None or not {"exact": v == h.match.value,
                             "prefix": v.startswith(h.match.value),
                             "regex": re.fullmatch(h.match.value, v) is not None}[h.match.kind]:
            return False
    return True


@settings(deadline=None, max_examples=200)
@given(case=cases(), seed=st.integers(0, 2**32 - 1))
def test_the_chosen_endpoint_is_healthy_in_the_cluster_and_in_the_chosen_subset(
        case: tuple[Snapshot, list[tuple[str, tuple[tuple[str, str], ...]]]], seed: int) -> None:
    snapshot, calls = case
    h = Harness(snapshot, seed)
    cluster = snapshot.cluster("echo")
    assert cluster is not None
    route = snapshot.route("echo")
    assert route is not None
    for path, headers in calls:
        call, decision = h.send(path, headers=headers)
        expected = next((r for r in route.rules if _takes(r, path, dict(headers))), None)
        assert call.rule is expected
        if isinstance(decision, LocalReply):
            assert decision.status == G.UNAVAILABLE and call.endpoint is None
            if expected is None:
                assert not cluster.healthy
            else:  # no weighted destination has a healthy endpoint
                assert not any(d.weight and any(set(d.subset) <= set(e.labels)
                                                for e in cluster.healthy)
                               for d in expected.destinations)
            continue
        assert isinstance(decision, FakePool)
        chosen = decision.ep
        assert chosen in cluster.endpoints and chosen.healthy
        if expected is None:
            assert call.subset is None
            continue
        # The subset is one weighted destination's healthy endpoints, and the pick is in it.
        matching = [d for d in expected.destinations if d.weight and call.subset == tuple(
            e for e in cluster.healthy if set(d.subset) <= set(e.labels))]
        assert matching, (expected, call.subset)
        assert chosen in call.subset
        assert any(set(d.subset) <= set(chosen.labels) for d in matching)
