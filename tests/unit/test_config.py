"""Declarative config without sockets: documents validated into objects with errors that name
the file, document, field and reason; a whole apply checked with what is stored; the
canonical form; compiling into the snapshot's routes; the control plane's revision store."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from control_plane.config_store import ConfigNotFound, ConfigState, ConfigStore
from control_plane.discovery import build_snapshot
from control_plane.meshctl import MeshctlError, load_documents
from control_plane.registry import SERVING, Instance
from control_plane.store import Store
from mesh_common.config import (
    CONFIGURED,
    CREATED,
    UNCHANGED,
    ConfigError,
    ConfigObject,
    Document,
    FaultSpec,
    RouteSpec,
    TrafficPolicySpec,
    compile_routes,
    kind_of,
    parse_object,
    plan_apply,
    to_doc,
    to_yaml,
)
from mesh_common.snapshot import (
    LOAD_BALANCERS,
    CircuitLimits,
    Cluster,
    OutlierPolicy,
    RetryPolicy,
    Snapshot,
    StringMatch,
    from_doc,
)

FAST = settings(deadline=None, max_examples=80)
TD = "mesh.local"

SCHEMA_EXAMPLE = """\
kind: Route                      # how calls to one upstream service are routed
name: echo-canary
spec:
  service: echo
  timeout_ms: 2000
  rules:
    - name: canary-header
      match:
        method: {prefix: /meshtest.Echo/}
        headers:
          x-canary: {exact: "yes"}
      destinations:
        - subset: {version: v2}
          weight: 100
      timeout_ms: 500
    - destinations:
        - {subset: {version: v1}, weight: 90}
        - {subset: {version: v2}, weight: 10}
---
kind: TrafficPolicy
name: echo
spec:
  service: echo
  load_balancer: round_robin
  timeout_ms: 1000
  retries:
    max_attempts: 3
    retry_on: [UNAVAILABLE, RESOURCE_EXHAUSTED]
    per_try_timeout_ms: 300
    backoff_base_ms: 25
    backoff_max_ms: 250
    max_request_bytes: 1048576
    non_idempotent:
      - {exact: /meshtest.Echo/ServerStream}
    budget_percent: 20
    budget_min_per_s: 10
    budget_window_s: 10
  limits:
    max_connections: 64
    max_pending: 128
    max_requests: 256
    max_retries: 8
  outlier_detection:
    consecutive_errors: 5
    error_codes: [UNAVAILABLE, INTERNAL, UNKNOWN, DEADLINE_EXCEEDED, DATA_LOSS]
    base_ejection_ms: 30000
    max_ejection_ms: 300000
    max_ejection_percent: 50
    half_open_probes: 1
    success_rate_min_requests: 100
    success_rate_threshold: 0.8
---
kind: Fault
name: echo
spec:
  service: echo
  method: {prefix: /meshtest.Echo/}
  delay: {ms: 200, percent: 50}
  abort: {code: UNAVAILABLE, percent: 10}
"""


def docs_of(text: str, source: str = "routes.yaml") -> list[Document]:
    return [Document(source, i, body) for i, body in enumerate(yaml.safe_load_all(text), 1)]


def objects(text: str) -> tuple[ConfigObject, ...]:
    return plan_apply((), docs_of(text)).objects


def route(service: str = "echo", name: str = "echo", **spec: Any) -> dict[str, Any]:
    return {"kind": "Route", "name": name, "spec": {"service": service, **spec}}


def split(*weights: int | None) -> dict[str, Any]:
    return {"destinations": [{"subset": {"version": f"v{i}"}} | ({} if w is None else
                                                                  {"weight": w})
                             for i, w in enumerate(weights, 1)]}


def _policy(**spec: Any) -> dict[str, Any]:
    return {"kind": "TrafficPolicy", "name": "p", "spec": {"service": "echo", **spec}}


def error_of(*bodies: Any, stored: tuple[ConfigObject, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        plan_apply(stored, [Document("routes.yaml", i, b) for i, b in enumerate(bodies, 1)])
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------- documents
def test_the_schema_example_parses_into_typed_objects() -> None:
    route_obj, policy, fault = plan_apply((), docs_of(SCHEMA_EXAMPLE)).changes
    assert (route_obj.obj.kind, route_obj.obj.name, route_obj.action) == ("Route", "echo-canary",
                                                                           CREATED)
    spec = route_obj.obj.spec
    assert isinstance(spec, RouteSpec) and spec.service == "echo" and spec.timeout_ms == 2000
    first, second = spec.rules
    assert (first.name, first.timeout_ms) == ("canary-header", 500)
    assert first.match.headers[0].name == "x-canary"
    assert [(d.subset, d.weight) for d in first.destinations] == [((("version", "v2"),), 100)]
    assert second.name == "echo-canary#1"  # the default: <route name>#<index>
    assert [d.weight for d in second.destinations] == [90, 10]
    assert policy.obj.spec.timeout_ms == 1000
    p = policy.obj.spec
    assert isinstance(p, TrafficPolicySpec) and p.load_balancer == "round_robin"
    assert p.retries == RetryPolicy(retry_on=(14, 8), per_try_timeout_ms=300, non_idempotent=(
        StringMatch("exact", "/meshtest.Echo/ServerStream"),))
    assert p.limits == CircuitLimits(64, 128, 256, 8)
    assert p.outlier == OutlierPolicy(success_rate_min_requests=100, success_rate_threshold=0.8)
    assert fault.obj.spec == FaultSpec("echo", fault.obj.spec.method, 200, 50.0, 14, 10.0)


ERRORS: dict[str, tuple[Any, list[str]]] = {
    "unknown kind": ({"kind": "Gateway", "name": "x", "spec": {}},
                     ["routes.yaml: document 2: kind: unknown kind 'Gateway'"]),
    "no kind": ({"name": "x", "spec": {}}, ["routes.yaml: document 2: kind: required"]),
    "not a mapping": (["kind", "Route"], ["routes.yaml: document 2: expected a mapping"]),
    "unknown top-level key": (route() | {"metadata": {}},
                              ["document 2 (Route echo): metadata: unknown key"]),
    "unknown field": (route(rules=[split(100)], retries=3),
                      ["document 2 (Route echo): spec.retries: unknown key"]),
    "unknown nested field": (route(rules=[split(100) | {"retry": 1}]),
                             ["(Route echo): spec.rules[0].retry: unknown key"]),
    "field of another kind": ({"kind": "Fault", "name": "f", "spec": {
        "service": "echo", "abort": {"code": 14}, "rules": []}},
        ["document 2 (Fault f): spec.rules: unknown key"]),
    "weights": (route(rules=[split(100), split(90, 5)]),
                ["document 2 (Route echo): spec.rules[1].destinations: weights must sum to 100, "
                 "they sum to 95"]),
    "two weights omitted": (route(rules=[split(50, None, None)]),
                            ["spec.rules[0].destinations[2].weight: only one destination may "
                             "omit its weight"]),
    "given weights over 100": (route(rules=[split(80, 30, None)]),
                               ["spec.rules[0].destinations: weights must sum to 100"]),
    "bad regex": (route(rules=[{"match": {"headers": {"x-user": {"regex": "(a"}}}}]),
                  ["(Route echo): spec.rules[0].match.headers.x-user.regex: not a valid regular "
                   "expression"]),
    "upper-case header": (route(rules=[{"match": {"headers": {"X-User": {"exact": "a"}}}}]),
                          ["spec.rules[0].match.headers: header names are lower-case"]),
    "bad method": (route(rules=[{"match": {"method": {"exact": "Unary"}}}]),
                   ["spec.rules[0].match.method.exact: a gRPC path starts with '/'"]),
    "bad code": ({"kind": "Fault", "name": "echo", "spec": {
        "service": "echo", "abort": {"code": "NOPE", "percent": 5}}},
        ["document 2 (Fault echo): spec.abort.code: a gRPC status other than OK"]),
    "abort with OK": ({"kind": "Fault", "name": "echo", "spec": {
        "service": "echo", "abort": {"code": "OK"}}}, ["spec.abort.code"]),
    "percent over 100": ({"kind": "Fault", "name": "echo", "spec": {
        "service": "echo", "delay": {"ms": 5, "percent": 101}}},
        ["spec.delay.percent: a percentage from 0 to 100"]),
    "fault without a fault": ({"kind": "Fault", "name": "echo", "spec": {"service": "echo"}},
                              ["(Fault echo): spec: a fault needs a delay or an abort"]),
    "bad name": (route(name="Echo_1"), ["document 2 (Route): name: a name is 1-63 of [a-z0-9-]"]),
    "no name": ({"kind": "Route", "spec": {"service": "echo"}},
                ["document 2 (Route): name: required"]),
    "no spec": ({"kind": "Route", "name": "x"}, ["document 2 (Route x): spec: required mapping"]),
    "bad service": (route(service="no such/service"), ["spec.service: invalid service name"]),
    "bad balancer": ({"kind": "TrafficPolicy", "name": "p", "spec": {
        "service": "echo", "load_balancer": "fastest"}},
        ["(TrafficPolicy p): spec.load_balancer: unknown load balancer 'fastest'"]),
    "bad timeout": ({"kind": "TrafficPolicy", "name": "p", "spec": {
        "service": "echo", "timeout_ms": 0}}, ["spec.timeout_ms: milliseconds"]),
    "retries not a mapping": (_policy(retries=3), ["(TrafficPolicy p): spec.retries: expected a "
                                                   "mapping"]),
    "too many attempts": (_policy(retries={"max_attempts": 11}),
                          ["(TrafficPolicy p): spec.retries.max_attempts: an integer from 1 to "
                           "10"]),
    "unknown retry field": (_policy(retries={"attempts": 2}),
                            ["spec.retries.attempts: unknown key"]),
    "bad retry code": (_policy(retries={"retry_on": ["UNAVAILABLE", "SOMETIMES"]}),
                       ["spec.retries.retry_on[1]: a gRPC status other than OK"]),
    "backoff cap below base": (_policy(retries={"backoff_base_ms": 100, "backoff_max_ms": 50}),
                               ["spec.retries.backoff_max_ms: must be at least backoff_base_ms"]),
    "bad non-idempotent method": (_policy(retries={"non_idempotent": [{"exact": "Pay"}]}),
                                  ["spec.retries.non_idempotent[0].exact: a gRPC path starts "
                                   "with '/'"]),
    "budget over 100%": (_policy(retries={"budget_percent": 150}),
                         ["spec.retries.budget_percent: a number from 0 to 100"]),
    "zero max requests": (_policy(limits={"max_requests": 0}),
                          ["(TrafficPolicy p): spec.limits.max_requests: an integer from 1 to "
                           "1000000"]),
    "unknown limit": (_policy(limits={"max_rps": 5}), ["spec.limits.max_rps: unknown key"]),
    "bad ejection time": (_policy(outlier_detection={"base_ejection_ms": -1}),
                          ["spec.outlier_detection.base_ejection_ms: an integer from 1"]),
    "ejection cap below base": (_policy(outlier_detection={"base_ejection_ms": 5000,
                                                           "max_ejection_ms": 1000}),
                                ["spec.outlier_detection.max_ejection_ms: must be at least "
                                 "base_ejection_ms"]),
    "success rate over 1": (_policy(outlier_detection={"success_rate_threshold": 1.5}),
                            ["spec.outlier_detection.success_rate_threshold: a number from 0 "
                             "to 1"]),
    "resilience on a Route": (route(retries={"max_attempts": 2}),
                              ["(Route echo): spec.retries: unknown key"]),
}


@pytest.mark.parametrize("case", ERRORS.values(), ids=ERRORS.keys())
def test_each_invalid_document_is_named_with_its_field_and_reason(
        case: tuple[Any, list[str]]) -> None:
    bad, expected = case
    good = {"kind": "TrafficPolicy", "name": "ok", "spec": {"service": "order"}}
    message = error_of(good, bad)
    assert message.startswith("routes.yaml: document 2"), message
    for part in expected:
        assert part in message, (part, message)


def test_one_route_and_one_policy_per_service_in_an_apply_and_with_what_is_stored() -> None:
    message = error_of(route(name="a"), route(name="b"))
    assert message == ("routes.yaml: document 2 (Route b): spec.service: service 'echo' already "
                       "has Route a (routes.yaml: document 1); one Route per service")
    stored = objects(yaml.safe_dump(route(name="a")))
    message = error_of(route(name="b"), stored=stored)
    assert message.startswith("routes.yaml: document 1 (Route b): spec.service: service 'echo' "
                              "already has Route a (stored)")
    policy = {"kind": "TrafficPolicy", "name": "p", "spec": {"service": "echo"}}
    assert "one TrafficPolicy per service" in error_of(policy, policy | {"name": "q"})
    # Several Faults for a service are fine; moving Route a away frees its service for b.
    faults = [{"kind": "Fault", "name": n, "spec": {"service": "echo", "abort": {"code": 14}}}
              for n in ("f1", "f2")]
    plan = plan_apply(stored, [Document("x.yaml", i, b) for i, b in enumerate(
        [route(service="order", name="a"), route(name="b"), *faults], 1)])
    assert [(o.kind, o.name, o.service) for o in plan.objects] == [
        ("Fault", "f1", "echo"), ("Fault", "f2", "echo"), ("Route", "a", "order"),
        ("Route", "b", "echo")]


def test_an_object_given_twice_in_one_apply_is_refused() -> None:
    assert error_of(route(), route()) == (
        "routes.yaml: document 2 (Route echo): name: Route echo is given twice (also "
        "routes.yaml: document 1)")


def test_an_apply_says_created_configured_or_unchanged() -> None:
    stored = objects(yaml.safe_dump_all([route(rules=[split(100)]), route("order", "o")]))
    plan = plan_apply(stored, [Document("", 1, route(rules=[split(50, 50)])),
                               Document("", 2, route("order", "o")),
                               Document("", 3, route("payment", "p"))])
    assert [c.action for c in plan.changes] == [CONFIGURED, UNCHANGED, CREATED]
    assert plan.changes[0].previous == stored[0]


def test_one_destination_may_omit_its_weight_and_takes_the_rest() -> None:
    (obj,) = objects(yaml.safe_dump(route(rules=[split(None, 10, 5), split(None)])))
    assert isinstance(obj.spec, RouteSpec)
    assert [[d.weight for d in r.destinations] for r in obj.spec.rules] == [[85, 10, 5], [100]]


def test_kinds_for_commands_are_case_insensitive_singular_or_plural() -> None:
    assert [kind_of(k) for k in ("route", "Routes", "TRAFFICPOLICY", "trafficpolicies",
                                 "fault", "Faults")] == [
        "Route", "Route", "TrafficPolicy", "TrafficPolicy", "Fault", "Fault"]
    with pytest.raises(ConfigError, match="unknown kind 'gateway'"):
        kind_of("gateway")


# ---------------------------------------------------------------------- YAML (meshctl)
def test_bad_yaml_names_the_file_and_the_document() -> None:
    text = "kind: TrafficPolicy\nname: p\nspec: {service: echo}\n---\nkind: Route\nname: [x\n"
    with pytest.raises(MeshctlError) as info:
        load_documents("routes.yaml", text)
    assert str(info.value).startswith("routes.yaml: document 2: invalid YAML: ")
    assert "line 7" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(MeshctlError, match=r"^a.yaml: document 1: invalid YAML: duplicate key "
                                           r"'name' \(line 3, column 1\)$"):
        load_documents("a.yaml", "kind: Route\nname: a\nname: b\n")


def test_empty_documents_count_but_are_left_out() -> None:
    docs = load_documents("a.yaml", "---\n---\nkind: Route\n---\n# nothing\n---\nkind: Fault\n")
    assert [(d.source, d.index, d.json) for d in docs] == [
        ("a.yaml", 2, '{"kind": "Route"}'), ("a.yaml", 4, '{"kind": "Fault"}')]


# ---------------------------------------------------------------------- canonical form
def test_canonical_documents_round_trip_and_leave_defaults_out() -> None:
    for obj in objects(SCHEMA_EXAMPLE):
        doc = to_doc(obj)
        assert parse_object(copy.deepcopy(doc)) == obj
        assert parse_object(yaml.safe_load(to_yaml(doc))) == obj
    (obj,) = objects(yaml.safe_dump(route(rules=[{"match": {}}])))
    assert to_doc(obj) == {"kind": "Route", "name": "echo", "spec": {
        "service": "echo", "rules": [{"destinations": [{"weight": 100}]}]}}
    fault = parse_object({"kind": "Fault", "name": "f", "spec": {"service": "echo",
                                                                 "abort": {"code": 14}}})
    assert to_doc(fault)["spec"] == {"service": "echo", "abort": {"code": "UNAVAILABLE",
                                                                  "percent": 100}}


def test_a_policys_resilience_sections_keep_only_what_differs_from_the_defaults() -> None:
    plain = parse_object(_policy())
    assert to_doc(plain)["spec"] == {"service": "echo", "load_balancer": "peak_ewma"}
    # Every field given at its default: the same object, and the same canonical document.
    every = parse_object(_policy(
        retries={"max_attempts": 3, "retry_on": ["UNAVAILABLE"], "budget_percent": 20.0},
        limits={"max_requests": 1024}, outlier_detection={"consecutive_errors": 5,
                                                          "max_ejection_ms": 300000}))
    assert every == plain and to_doc(every) == to_doc(plain)
    obj = parse_object(_policy(
        load_balancer="least_request",
        retries={"max_attempts": 2, "retry_on": [14, "cancelled", 14], "budget_percent": 12.5,
                 "non_idempotent": [{"prefix": "/pay.Payments/"}]},
        limits={"max_requests": 2},
        outlier_detection={"base_ejection_ms": 1000, "error_codes": [13], "max_ejection_ms": 4000,
                           "half_open_probes": 2}))
    assert to_doc(obj)["spec"] == {
        "service": "echo", "load_balancer": "least_request",
        "retries": {"max_attempts": 2, "retry_on": ["UNAVAILABLE", "CANCELLED"],
                    "non_idempotent": [{"prefix": "/pay.Payments/"}], "budget_percent": 12.5},
        "limits": {"max_requests": 2},
        "outlier_detection": {"error_codes": ["INTERNAL"], "base_ejection_ms": 1000,
                              "max_ejection_ms": 4000, "half_open_probes": 2}}
    assert parse_object(yaml.safe_load(to_yaml(to_doc(obj)))) == obj
    # A base ejection above the default cap raises the cap's default with it.
    long = parse_object(_policy(outlier_detection={"base_ejection_ms": 600_000}))
    assert isinstance(long.spec, TrafficPolicySpec) and long.spec.outlier.max_ejection_ms == 600_000
    assert to_doc(long)["spec"]["outlier_detection"] == {"base_ejection_ms": 600_000}
    assert parse_object(to_doc(long)) == long


def test_every_balancer_is_accepted() -> None:
    for lb in LOAD_BALANCERS:
        obj = parse_object(_policy(load_balancer=lb))
        assert isinstance(obj.spec, TrafficPolicySpec) and obj.spec.load_balancer == lb
        assert parse_object(to_doc(obj)) == obj


def test_header_order_does_not_make_a_different_object() -> None:
    a = parse_object(route(rules=[{"match": {"headers": {"x-a": {"exact": "1"},
                                                          "x-b": {"prefix": "2"}}}}]))
    b = parse_object(route(rules=[{"match": {"headers": {"x-b": {"prefix": "2"},
                                                          "x-a": {"exact": "1"}}}}]))
    assert a == b and to_doc(a) == to_doc(b)


# ---------------------------------------------------------------------- compiling
def test_timeouts_rule_over_route_over_policy_and_the_policy_balancer() -> None:
    objs = objects(yaml.safe_dump_all([
        route(timeout_ms=2000, rules=[{"timeout_ms": 500}, {}]),
        {"kind": "TrafficPolicy", "name": "echo", "spec": {"service": "echo",
                                                           "timeout_ms": 1000}},
        {"kind": "TrafficPolicy", "name": "order", "spec": {"service": "order",
                                                            "timeout_ms": 700}},
        route("payment", "payment", rules=[{"timeout_ms": 50}]),
    ]))
    routes, empty = compile_routes(objs, ["echo", "order", "inventory"])
    by = {r.service: r for r in routes}
    assert [r.service for r in routes] == ["echo", "inventory", "order", "payment"]
    assert empty == ("payment",)  # named by config, no cluster: an empty one
    assert [x.timeout_ms for x in by["echo"].rules] == [500, None]
    assert by["echo"].timeout_ms == 2000          # the Route's, over the policy's 1000
    assert by["order"].timeout_ms == 700 and by["order"].rules == ()  # the policy's
    assert by["payment"].timeout_ms is None and by["payment"].rules[0].timeout_ms == 50
    assert by["inventory"] == type(by["inventory"])("inventory", "inventory")  # identity
    assert all(r.cluster == r.service and r.load_balancer == "peak_ewma" for r in routes)


def test_a_policys_retries_limits_and_outlier_detection_reach_the_route() -> None:
    objs = objects(yaml.safe_dump_all([
        _policy(load_balancer="random", retries={"max_attempts": 4},
                limits={"max_pending": 7}, outlier_detection={"consecutive_errors": 2}),
        route("order", "order", rules=[{}]),
    ]))
    routes, _ = compile_routes(objs, ["echo", "order"])
    by = {r.service: r for r in routes}
    assert by["echo"].load_balancer == "random"
    assert by["echo"].retries == RetryPolicy(max_attempts=4)
    assert by["echo"].limits == CircuitLimits(max_pending=7)
    assert by["echo"].outlier == OutlierPolicy(consecutive_errors=2)
    # Without a TrafficPolicy: the defaults.
    assert (by["order"].retries, by["order"].limits, by["order"].outlier) == (
        RetryPolicy(), CircuitLimits(), OutlierPolicy())
    snap = Snapshot("1", (Cluster("echo", ()), Cluster("order", ())), routes)
    assert from_doc(snap.to_doc(), TD).routes == routes


def test_faults_come_from_every_fault_of_the_service_by_name() -> None:
    def fault(name: str, **spec: Any) -> dict[str, Any]:
        return {"kind": "Fault", "name": name, "spec": {"service": "echo", **spec}}

    objs = objects(yaml.safe_dump_all([
        fault("zz", delay={"ms": 100, "percent": 20}),
        fault("aa", method={"exact": "/meshtest.Echo/Unary"}, abort={"code": "INTERNAL",
                                                                     "percent": 5}),
        fault("off", abort={"code": 14, "percent": 0}),  # injects nothing: left out
        fault("half", abort={"code": 14, "percent": 50}, delay={"ms": 9, "percent": 0}),
    ]))
    (echo,), empty = compile_routes(objs, ["echo"])
    assert empty == ()
    assert [(f.name, f.method and f.method.value, f.delay_ms, f.delay_percent, f.abort_code,
             f.abort_percent) for f in echo.faults] == [
        ("aa", "/meshtest.Echo/Unary", 0, 0.0, 13, 5.0),
        ("half", None, 0, 0.0, 14, 50.0),
        ("zz", None, 100, 20.0, 0, 0.0)]


def test_the_snapshot_has_an_empty_cluster_for_a_configured_service_without_instances(
) -> None:
    inst = Instance("echo", "e-1", f"spiffe://{TD}/service/echo", inbound="127.0.0.1:20001",
                    labels=(("version", "v1"),), health=SERVING)
    snap = build_snapshot([inst], "3", objects(yaml.safe_dump_all([
        route(rules=[split(90, 10)]), route("payment", "payment")])))
    assert [(c.name, len(c.endpoints)) for c in snap.clusters] == [("echo", 1), ("payment", 0)]
    assert [r.service for r in snap.routes] == ["echo", "payment"]
    assert from_doc(snap.to_doc(), TD).to_doc() == snap.to_doc()


# ---------------------------------------------------------------------- property
_services = st.sampled_from(["echo", "order", "payment", "inventory"])
_text = st.text(alphabet="abcxyz019-", min_size=0, max_size=6)
_string_match = st.one_of(
    st.builds(lambda v: {"exact": v}, _text), st.builds(lambda v: {"prefix": v}, _text),
    st.builds(lambda v: {"regex": v}, st.sampled_from(["v[0-9]+", ".*", "a|b", "(x)?y"])))
_method = st.one_of(st.builds(lambda m: {"exact": f"/pkg.Svc/{m}"}, st.sampled_from(["A", "B"])),
                    st.builds(lambda p: {"prefix": p}, st.sampled_from(["/", "/pkg.", "/pkg.Svc/"])))
_timeout = st.integers(1, 3_600_000)
_percent = st.one_of(st.integers(0, 100), st.floats(0, 100, allow_nan=False))
_code_doc = st.one_of(st.integers(1, 16), st.sampled_from(["UNAVAILABLE", "internal",
                                                            "Deadline_Exceeded", "CANCELLED"]))


def _some(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    """A document with a random subset of ``fields``, each drawn."""
    keys = draw(st.lists(st.sampled_from(sorted(fields)), unique=True))
    return {k: draw(fields[k]) for k in keys}


@st.composite
def _retries(draw: st.DrawFn) -> dict[str, Any]:
    doc = _some(draw, {
        "max_attempts": st.integers(1, 10), "retry_on": st.lists(_code_doc, max_size=3),
        "per_try_timeout_ms": _timeout, "max_request_bytes": st.integers(0, 64 << 20),
        "non_idempotent": st.lists(_method, max_size=2), "budget_percent": _percent,
        "budget_min_per_s": st.one_of(st.integers(0, 100_000), st.floats(0, 100_000)),
        "budget_window_s": st.one_of(st.integers(1, 3600), st.floats(1, 3600))})
    if draw(st.booleans()):
        base = draw(st.integers(1, 60_000))
        doc["backoff_base_ms"] = base
        doc["backoff_max_ms"] = draw(st.integers(base, 600_000))
    return doc


_limits = st.fixed_dictionaries({}, optional={
    "max_connections": st.integers(1, 1_000_000), "max_pending": st.integers(1, 1_000_000),
    "max_requests": st.integers(1, 1_000_000), "max_retries": st.integers(0, 1_000_000)})


@st.composite
def _outlier(draw: st.DrawFn) -> dict[str, Any]:
    doc = _some(draw, {
        "consecutive_errors": st.integers(0, 1000), "error_codes": st.lists(_code_doc,
                                                                            max_size=4),
        "max_ejection_percent": _percent, "half_open_probes": st.integers(1, 1000),
        "success_rate_min_requests": st.integers(0, 100_000),
        "success_rate_threshold": st.one_of(st.sampled_from([0, 1]), st.floats(0, 1))})
    if draw(st.booleans()):
        base = draw(st.integers(1, 3_600_000))
        doc["base_ejection_ms"] = base
        if draw(st.booleans()):
            doc["max_ejection_ms"] = draw(st.integers(base, 86_400_000))
    return doc


@st.composite
def _destinations(draw: st.DrawFn) -> list[dict[str, Any]]:
    n = draw(st.integers(1, 4))
    cuts = sorted(draw(st.lists(st.integers(0, 100), min_size=n - 1, max_size=n - 1)))
    weights = [b - a for a, b in zip([0, *cuts], [*cuts, 100], strict=True)]
    dests = []
    for w in weights:
        d: dict[str, Any] = {"weight": w}
        subset = draw(st.dictionaries(st.sampled_from(["version", "zone"]),
                                      st.sampled_from(["v1", "v2", "a"]), max_size=2))
        if subset:
            d["subset"] = subset
        dests.append(d)
    if draw(st.booleans()):
        del dests[draw(st.integers(0, n - 1))]["weight"]  # one may omit its weight
    return dests


@st.composite
def _rule(draw: st.DrawFn) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    if draw(st.booleans()):
        rule["name"] = draw(st.from_regex(r"[a-z][a-z0-9#-]{0,12}", fullmatch=True))
    match: dict[str, Any] = {}
    if draw(st.booleans()):
        match["method"] = draw(_method)
    headers = draw(st.dictionaries(st.sampled_from(["x-canary", "x-user", "x-b"]), _string_match,
                                   max_size=2))
    if headers:
        match["headers"] = headers
    if match or draw(st.booleans()):
        rule["match"] = match
    if draw(st.booleans()):
        rule["destinations"] = draw(_destinations())
    if draw(st.booleans()):
        rule["timeout_ms"] = draw(_timeout)
    return rule


@st.composite
def _config(draw: st.DrawFn) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    names = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
    for service in draw(st.sets(_services)):
        spec: dict[str, Any] = {"service": service, "rules": draw(st.lists(_rule(), max_size=3))}
        if draw(st.booleans()):
            spec["timeout_ms"] = draw(_timeout)
        docs.append({"kind": "Route", "name": f"r-{service}", "spec": spec})
    for service in draw(st.sets(_services)):
        spec = {"service": service}
        if draw(st.booleans()):
            spec["load_balancer"] = draw(st.sampled_from(LOAD_BALANCERS))
        if draw(st.booleans()):
            spec["timeout_ms"] = draw(_timeout)
        if draw(st.booleans()):
            spec["retries"] = draw(_retries())
        if draw(st.booleans()):
            spec["limits"] = draw(_limits)
        if draw(st.booleans()):
            spec["outlier_detection"] = draw(_outlier())
        docs.append({"kind": "TrafficPolicy", "name": f"p-{service}", "spec": spec})
    for name in draw(st.sets(names, max_size=4)):
        spec = {"service": draw(_services)}
        if draw(st.booleans()):
            spec["method"] = draw(_method)
        kinds = draw(st.sampled_from([("delay",), ("abort",), ("delay", "abort")]))
        if "delay" in kinds:
            spec["delay"] = {"ms": draw(st.integers(1, 600_000)), "percent": draw(_percent)}
        if "abort" in kinds:
            spec["abort"] = {"code": draw(st.one_of(st.integers(1, 16), st.sampled_from(
                ["UNAVAILABLE", "internal", "Deadline_Exceeded"]))), "percent": draw(_percent)}
        docs.append({"kind": "Fault", "name": name, "spec": spec})
    return draw(st.permutations(docs))


@FAST
@given(docs=_config(), clusters=st.sets(_services))
def test_any_valid_config_compiles_into_routes_every_sidecar_accepts(
        docs: list[dict[str, Any]], clusters: set[str]) -> None:
    plan = plan_apply((), [Document("gen.yaml", i, d) for i, d in enumerate(docs, 1)])
    for obj in plan.objects:  # the canonical form parses back into the same object
        assert parse_object(yaml.safe_load(to_yaml(to_doc(obj)))) == obj
    routes, empty = compile_routes(plan.objects, clusters)
    assert set(empty) == {o.service for o in plan.objects} - clusters
    by_service = {r.service: r for r in routes}
    for obj in plan.objects:  # a policy's settings are what its service's route runs on
        if isinstance(obj.spec, TrafficPolicySpec):
            r = by_service[obj.service]
            assert (r.load_balancer, r.retries, r.limits, r.outlier) == (
                obj.spec.load_balancer, obj.spec.retries, obj.spec.limits, obj.spec.outlier)
    snap = Snapshot("1", tuple(Cluster(n, ()) for n in sorted(clusters | set(empty))), routes)
    doc = snap.to_doc()
    back = from_doc(doc, TD)
    assert back.routes == routes and back.to_doc() == doc
    assert {r.service for r in routes} == clusters | {o.service for o in plan.objects}


# ---------------------------------------------------------------------- revisions (SQLite)
def test_revisions_are_stored_per_object_and_survive_a_reload(tmp_path: Path) -> None:
    state = ConfigState(ConfigStore(Store(tmp_path)))
    assert state.load() == []
    first = state.apply(state.plan(docs_of(yaml.safe_dump(route(rules=[split(100)])))), 100.0)
    assert [(o.action, o.revision) for o in first] == [(CREATED, 1)]
    again = state.apply(state.plan(docs_of(yaml.safe_dump(route(rules=[split(100)])))), 101.0)
    assert [(o.action, o.revision) for o in again] == [(UNCHANGED, 1)]
    second = state.apply(state.plan(docs_of(yaml.safe_dump(route(rules=[split(50, 50)])))), 102.0)
    assert [(o.action, o.revision) for o in second] == [(CONFIGURED, 2)]
    gone = state.delete("Route", "echo", 103.0)
    assert (gone.action, gone.revision) == ("deleted", 3)
    with pytest.raises(ConfigNotFound, match="no Route named 'echo'"):
        state.delete("Route", "echo", 104.0)

    reloaded = ConfigState(ConfigStore(Store(tmp_path)))
    assert reloaded.load() == [] and reloaded.objects() == ()
    old = reloaded.revision("Route", "echo", 1)
    assert (old.applied_at, old.deleted) == (100.0, False)
    assert parse_object(old.doc()) == state.plan(docs_of(yaml.safe_dump(
        route(rules=[split(100)])))).changes[0].obj
    assert reloaded.revision("Route", "echo", 3).deleted
    with pytest.raises(ConfigNotFound, match=r"Route echo has no revision 9 \(it has 1-3\)"):
        reloaded.revision("Route", "echo", 9)
    restored = reloaded.apply(reloaded.plan([Document("", 1, old.doc())]), 105.0)
    assert [(o.action, o.revision) for o in restored] == [(CREATED, 4)]
    fresh = ConfigState(ConfigStore(Store(tmp_path)))
    fresh.load()
    assert [(c.obj.name, c.revision, c.applied_at) for c in fresh.current()] == [
        ("echo", 4, 105.0)]
