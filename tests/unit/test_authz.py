"""Authorization without sockets: the ``AuthorizationPolicy`` config kind (validation errors
naming file, document, field and reason; the canonical form; compiling into the snapshot with
the mesh default), the inbound ``Authorize`` layer on fake calls (allow, deny, DENY over
ALLOW, default deny, dry-run counted and never enforced, the per-(peer, method) cache and its
bound, the span event, the stack order, ``/metrics`` and ``/stats``), the rate-limited log,
the durable default in the store and meshctl's pure rendering of a check."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from control_plane.discovery import build_snapshot
from control_plane.meshctl_authz import check_doc, check_lines
from control_plane.registry import SERVING, Instance
from control_plane.store import Store
from mesh_common.authz import AuthzConfig, AuthzPolicy, parse_rules
from mesh_common.config import (
    AuthzPolicySpec,
    ConfigError,
    Document,
    compile_authz,
    compile_routes,
    kind_of,
    parse_object,
    plan_apply,
    to_doc,
    to_yaml,
)
from mesh_common.limits import Limits
from mesh_common.snapshot import Snapshot, from_doc
from protos.mesh.v1 import control_pb2 as pb
from sidecar.http2.connection import H2Connection
from sidecar.http2.headers import HeaderReader, encode_block
from sidecar.http2.relay import Call, LocalReply
from sidecar.layers import authorize as authorize_module
from sidecar.layers.authorize import (
    DEFAULT_POLICY,
    NO_RULE,
    Authorize,
    RateLimitedLog,
)
from sidecar.layers.stats import Stats
from sidecar.metrics import metrics_page
from sidecar.stack import inbound_stack

TD = "mesh.local"
ORDER, LOADGEN, GATEWAY = (f"spiffe://{TD}/service/{s}" for s in ("order", "loadgen", "gateway"))
CHARGE, REFUND = "/payment.Payment/Charge", "/payment.Payment/Refund"
LEDGER = "/payment.Payment/ListLedger"
_DOWN = H2Connection(client=False, limits=Limits())
APP = object()  # what the terminal (the local app's pool) stands for


def doc(name: str = "payment-callers", service: str = "payment", **spec: Any) -> dict[str, Any]:
    spec.setdefault("rules", [{"action": "ALLOW", "sources": [ORDER],
                               "methods": ["/payment.Payment/*"]}])
    return {"kind": "AuthorizationPolicy", "name": name, "spec": {"service": service, **spec}}


def policy(name: str, rules: list[dict[str, Any]], service: str = "payment",
           dry_run: bool = False) -> AuthzPolicy:
    return AuthzPolicy(name, service, parse_rules(rules), dry_run)


# ---------------------------------------------------------------------- the config kind
def test_a_policy_document_parses_into_its_spec_and_back() -> None:
    obj = parse_object(doc(rules=[
        {"action": "allow", "sources": [ORDER, f"spiffe://{TD}/service/gate*"],
         "methods": [CHARGE, "/payment.Payment/List*"]},
        {"action": "DENY", "sources": ["*"], "methods": [REFUND]}]), "p.yaml", 1)
    assert obj.key == ("AuthorizationPolicy", "payment-callers") and obj.service == "payment"
    assert isinstance(obj.spec, AuthzPolicySpec) and not obj.spec.dry_run
    assert obj.spec.mode == "enforce"
    assert [r.action for r in obj.spec.rules] == ["ALLOW", "DENY"]
    canonical = to_doc(obj)
    assert "mode" not in canonical["spec"]  # the default is left out
    assert canonical["spec"]["rules"][0] == {
        "action": "ALLOW", "sources": [ORDER, f"spiffe://{TD}/service/gate*"],
        "methods": [CHARGE, "/payment.Payment/List*"]}
    assert parse_object(canonical) == obj
    dry = parse_object(doc(mode="dry_run"))
    assert dry.spec.dry_run and to_doc(dry)["spec"]["mode"] == "dry_run"  # type: ignore[union-attr]
    assert parse_object(to_doc(dry)) == dry
    assert "kind: AuthorizationPolicy" in to_yaml(to_doc(dry))
    # methods default to every method, written back as '*'
    every = parse_object(doc(rules=[{"action": "ALLOW", "sources": ["*"]}]))
    assert to_doc(every)["spec"]["rules"][0]["methods"] == ["*"]


@pytest.mark.parametrize("text", ["AuthorizationPolicy", "authorizationpolicies",
                                  "AuthzPolicy", "authzpolicies"])
def test_the_kind_has_its_aliases(text: str) -> None:
    assert kind_of(text) == "AuthorizationPolicy"


@pytest.mark.parametrize("spec, field, reason", [
    ({"service": "payment"}, "spec.rules", "required"),
    ({"service": "payment", "rules": []}, "spec.rules", "non-empty list"),
    ({"service": "payment", "mode": "audit", "rules": [{"action": "ALLOW", "sources": ["*"]}]},
     "spec.mode", "enforce or dry_run"),
    ({"rules": [{"action": "ALLOW", "sources": ["*"]}]}, "spec.service", "required"),
    ({"service": "Pay Ment", "rules": [{"action": "ALLOW", "sources": ["*"]}]},
     "spec.service", "invalid service name"),
    ({"service": "payment", "rules": [{"action": "PERMIT", "sources": ["*"]}]},
     "spec.rules[0].action", "ALLOW or DENY"),
    ({"service": "payment", "rules": [{"action": "ALLOW", "sources": ["order"]}]},
     "spec.rules[0].sources[0]", "not a SPIFFE ID"),
    ({"service": "payment", "rules": [{"action": "ALLOW", "sources": ["spiffe://a*b"]}]},
     "spec.rules[0].sources[0]", "only at the end"),
    ({"service": "payment", "rules": [{"action": "ALLOW", "sources": ["*"],
                                       "methods": ["payment.Payment/Charge"]}]},
     "spec.rules[0].methods[0]", "starts with '/'"),
    ({"service": "payment", "rules": [{"action": "ALLOW", "sources": ["*"], "who": 1}]},
     "spec.rules[0]", "unknown field"),
    ({"service": "payment", "extra": 1, "rules": [{"action": "ALLOW", "sources": ["*"]}]},
     "spec.extra", "unknown key"),
])
def test_an_invalid_policy_names_file_document_field_and_reason(
        spec: dict[str, Any], field: str, reason: str) -> None:
    body = {"kind": "AuthorizationPolicy", "name": "p", "spec": spec}
    with pytest.raises(ConfigError) as info:
        parse_object(body, "authz.yaml", 3)
    msg = str(info.value)
    assert msg.startswith(f"authz.yaml: document 3 (AuthorizationPolicy p): {field}: "), msg
    assert reason in msg, msg
    assert "\n" not in msg


def test_several_policies_per_service_apply_and_change_like_other_kinds() -> None:
    first = plan_apply([], [Document("a.yaml", 1, doc("a")), Document("a.yaml", 2, doc("b"))])
    assert [c.action for c in first.changes] == ["created", "created"]
    again = plan_apply(first.objects, [Document("a.yaml", 1, doc("a", mode="dry_run"))])
    assert [c.action for c in again.changes] == ["configured"]
    same = plan_apply(first.objects, [Document("a.yaml", 1, doc("a"))])
    assert [c.action for c in same.changes] == ["unchanged"]


def test_policies_compile_into_the_snapshots_authz_and_not_into_routes() -> None:
    objs = [parse_object(doc("z-last")), parse_object(doc("a-first", service="vault")),
            parse_object({"kind": "Route", "name": "echo", "spec": {"service": "echo"}})]
    routes, empty = compile_routes(objs, ["payment"])
    assert [r.service for r in routes] == ["echo", "payment"]  # no route, no cluster for vault
    assert empty == ("echo",)
    authz = compile_authz(objs, "deny")
    assert authz.default == "deny" and [p.name for p in authz.policies] == ["a-first", "z-last"]
    assert authz.for_service("vault")[0].service == "vault"
    assert compile_authz([]) == AuthzConfig()
    with pytest.raises(ConfigError):
        compile_authz(objs, "maybe")


def test_build_snapshot_carries_the_policies_and_the_default_and_sidecars_accept_it() -> None:
    inst = Instance("payment", "payment-1", f"spiffe://{TD}/service/payment",
                    inbound="127.0.0.1:9001", health=SERVING)
    objs = [parse_object(doc(mode="dry_run"))]
    snap = build_snapshot([inst], "7", objs, authz_default="deny")
    assert snap.authz.default == "deny" and snap.authz.policies[0].dry_run
    back = from_doc(snap.to_doc(), TD)
    assert back.authz == snap.authz
    # without policies and with the default allow the section stays out (hashes unchanged)
    assert "authz" not in build_snapshot([inst], "7", ()).to_doc()
    assert "authz" in build_snapshot([inst], "7", (), authz_default="deny").to_doc()


def test_the_default_is_durable_in_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.authz_default() == "allow"
    store.set_authz_default("deny")
    assert Store(tmp_path).authz_default() == "deny"
    with pytest.raises(ValueError):
        store.set_authz_default("sometimes")


# ---------------------------------------------------------------------- the layer
def make_call(peer: str | None, path: str = CHARGE) -> Call:
    block = encode_block([(":method", "POST"), (":scheme", "https"), (":path", path),
                          (":authority", "payment"), ("content-type", "application/grpc"),
                          ("te", "trailers")])
    return Call(_DOWN, 1, HeaderReader(1 << 16).read(block), peer, 0.0)


class Span:
    """What the trace layer puts on a sampled call: records its events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []

    def add_event(self, kind: str, text: str, attrs: Any = None) -> None:
        self.events.append((kind, text, attrs))


class World:
    """An ``Authorize`` layer of service payment over a snapshot tests may swap."""

    def __init__(self, authz: AuthzConfig, service: str = "payment") -> None:
        self.snap = Snapshot("1", authz=authz)
        self.clock = 0.0
        self.layer = Authorize(lambda: self.snap, service, clock=lambda: self.clock)
        self.reached: list[Call] = []

    def _app(self, call: Call) -> Any:
        self.reached.append(call)
        return APP

    def send(self, peer: str | None, path: str = CHARGE, span: Span | None = None
             ) -> tuple[Call, Any]:
        call = make_call(peer, path)
        call.span = span
        return call, self.layer.on_request(call, self._app)

    def counts(self) -> dict[tuple[str, str, str], int]:
        return {(d, p, m): n for d, p, m, n in self.layer.counts()}


def test_a_mesh_without_policies_lets_every_caller_through_and_counts_the_default() -> None:
    w = World(AuthzConfig())
    for peer in (ORDER, LOADGEN, None):
        _, decision = w.send(peer)
        assert decision is APP
    assert w.counts() == {("allow", DEFAULT_POLICY, "enforce"): 3}


def test_default_deny_refuses_with_permission_denied_naming_the_caller() -> None:
    w = World(AuthzConfig("deny"))
    span = Span()
    call, decision = w.send(LOADGEN, span=span)
    assert isinstance(decision, LocalReply) and decision.status == 7
    assert LOADGEN in decision.message and CHARGE in decision.message
    assert "denies by default" in decision.message
    assert not w.reached
    assert call.notes == [decision.message]
    assert span.events[0][0] == "denied" and span.events[0][1] == decision.message
    assert span.events[0][2]["mesh.authz.policy"] == DEFAULT_POLICY
    assert span.events[0][2]["mesh.peer"] == LOADGEN
    _, anonymous = w.send(None)
    assert isinstance(anonymous, LocalReply) and "unauthenticated" in anonymous.message
    assert w.counts() == {("deny", DEFAULT_POLICY, "enforce"): 2}


def test_allow_rules_admit_their_sources_and_methods_and_close_the_service() -> None:
    w = World(AuthzConfig("allow", (
        policy("payment-callers", [
            {"action": "ALLOW", "sources": [ORDER], "methods": ["/payment.Payment/"]},
            {"action": "ALLOW", "sources": [f"spiffe://{TD}/service/gate*"],
             "methods": [LEDGER]}]),)))
    assert w.send(ORDER)[1] is APP
    assert w.send(ORDER, LEDGER)[1] is APP
    assert w.send(GATEWAY, LEDGER)[1] is APP
    _, denied = w.send(GATEWAY, CHARGE)
    assert isinstance(denied, LocalReply) and denied.status == 7
    assert GATEWAY in denied.message and "payment-callers" in denied.message
    _, other = w.send(LOADGEN)
    assert isinstance(other, LocalReply)
    assert w.counts() == {("allow", "payment-callers", "enforce"): 3,
                          ("deny", NO_RULE, "enforce"): 2}
    assert len(w.reached) == 3


def test_deny_wins_over_allow_and_names_its_policy() -> None:
    w = World(AuthzConfig("allow", (
        policy("callers", [{"action": "ALLOW", "sources": ["*"], "methods": ["*"]}]),
        policy("no-refunds", [{"action": "DENY", "sources": [ORDER], "methods": [REFUND]}]),
    )))
    assert w.send(ORDER, CHARGE)[1] is APP
    _, refused = w.send(ORDER, REFUND)
    assert isinstance(refused, LocalReply) and "no-refunds" in refused.message
    assert ORDER in refused.message
    assert w.counts()[("deny", "no-refunds", "enforce")] == 1


def test_a_dry_run_policy_is_counted_and_logged_but_never_enforced(
        caplog: pytest.LogCaptureFixture) -> None:
    w = World(AuthzConfig("allow", (
        policy("lockdown", [{"action": "ALLOW", "sources": [ORDER]}], dry_run=True),)))
    caplog.set_level(logging.INFO, logger="mesh.sidecar.authz")
    assert w.send(LOADGEN)[1] is APP    # lockdown would deny it: only counted
    assert w.send(ORDER)[1] is APP
    assert w.send(LOADGEN)[1] is APP
    assert w.counts() == {("allow", DEFAULT_POLICY, "enforce"): 3,
                          ("deny", NO_RULE, "dry_run"): 2,
                          ("allow", "lockdown", "dry_run"): 1}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("dry run" in x and LOADGEN in x for x in lines), lines
    # on top of an enforcing default deny, the dry-run allow shows what it would change
    w2 = World(AuthzConfig("deny", (
        policy("trial", [{"action": "ALLOW", "sources": [LOADGEN]}], dry_run=True),)))
    _, decision = w2.send(LOADGEN)
    assert isinstance(decision, LocalReply)
    assert w2.counts() == {("deny", DEFAULT_POLICY, "enforce"): 1,
                           ("allow", "trial", "dry_run"): 1}


def test_verdicts_are_cached_per_peer_and_method_while_the_authz_stays(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real = authorize_module.decide

    def counting(cfg: AuthzConfig, service: str, source: str, method: str) -> Any:
        calls.append((source, method))
        return real(cfg, service, source, method)
    monkeypatch.setattr(authorize_module, "decide", counting)
    authz = AuthzConfig("deny", (policy("p", [{"action": "ALLOW", "sources": [ORDER]}]),))
    w = World(authz)
    for _ in range(50):
        w.send(ORDER)
        w.send(LOADGEN)
        w.send(ORDER, REFUND)
    assert len(calls) == 3
    w.snap = Snapshot("2", authz=AuthzConfig("deny", authz.policies))  # equal authz: kept
    w.send(ORDER)
    assert len(calls) == 3
    w.snap = Snapshot("3", authz=AuthzConfig("allow"))  # a new authz: decided again
    assert w.send(LOADGEN)[1] is APP
    w.snap = Snapshot("4", authz=AuthzConfig("deny", authz.policies))
    assert isinstance(w.send(LOADGEN)[1], LocalReply)
    assert len(calls) == 4  # (the open service never decides)
    assert w.counts()[("allow", "p", "enforce")] == 101  # ORDER's Charge and Refund


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(authorize_module, "MAX_CACHED", 8)
    w = World(AuthzConfig("deny", (policy("p", [{"action": "ALLOW", "sources": [ORDER]}]),)))
    for i in range(100):
        assert w.send(ORDER, f"/payment.Payment/M{i}")[1] is APP
    assert w.layer._cached <= 8
    assert sum(len(d) for d in w.layer._cache.values()) <= 8


def test_a_cached_verdict_costs_about_a_microsecond() -> None:
    w = World(AuthzConfig("deny", (policy("p", [{"action": "ALLOW", "sources": [ORDER]}]),)))
    call = make_call(ORDER)
    on_request, app = w.layer.on_request, (lambda c: APP)
    on_request(call, app)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(20_000):
            on_request(call, app)
        best = min(best, (time.perf_counter() - t0) / 20_000)
    assert best < 10e-6, f"{best * 1e6:.2f} µs per call"  # ~0.3 µs here; loose for CI


def test_in_the_inbound_stack_a_denied_call_never_reaches_the_app() -> None:
    snap = Snapshot("1", authz=AuthzConfig("deny"))
    layer = Authorize(lambda: snap, "payment")
    stack = inbound_stack(Stats(), APP, authorize=layer)  # type: ignore[arg-type]
    assert stack.layers[-1] is layer
    decision = stack.on_request(make_call(LOADGEN))
    assert isinstance(decision, LocalReply) and decision.status == 7
    open_stack = inbound_stack(Stats(), APP)  # type: ignore[arg-type]
    assert open_stack.on_request(make_call(LOADGEN)) is APP


def test_metrics_and_stats_show_the_decisions() -> None:
    w = World(AuthzConfig("deny", (
        policy("payment-callers", [{"action": "ALLOW", "sources": [ORDER]}]),
        policy("trial", [{"action": "DENY", "sources": [ORDER], "methods": [REFUND]}],
               dry_run=True))))
    w.send(ORDER)
    w.send(ORDER, REFUND)
    w.send(LOADGEN)
    stack = SimpleNamespace(layer=lambda kind: w.layer if kind is Authorize else None)
    sidecar = SimpleNamespace(
        boot=SimpleNamespace(service="payment"), snapshot=w.snap, stacks={"inbound": stack},
        relays={}, inbound=None, outbound=None, tls_failures={}, cert_not_after=lambda: None,
        traces={}, tracer=None)
    text = metrics_page(sidecar).data.decode()  # type: ignore[arg-type]
    assert ('mesh_authz_decisions_total{decision="allow",mode="enforce",'
            'policy="payment-callers"} 2.0') in text
    assert ('mesh_authz_decisions_total{decision="deny",mode="enforce",'
            'policy="(no rule)"} 1.0') in text
    assert ('mesh_authz_decisions_total{decision="deny",mode="dry_run",'
            'policy="trial"} 1.0') in text
    stats = w.layer.counters()["authz"]
    assert stats["default"] == "deny"
    assert stats["policies"] == {"payment-callers": "enforce", "trial": "dry_run"}
    assert {"decision": "deny", "policy": NO_RULE, "mode": "enforce", "count": 1} \
        in stats["decisions"]


def test_the_log_is_rate_limited_and_says_how_much_it_left_out(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    logger = logging.getLogger("test.authz.ratelimit")
    rl = RateLimitedLog(logger, window_s=10.0, per_window=3, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="test.authz.ratelimit")
    for i in range(10):
        rl(logging.WARNING, "denied %d", i)
    assert [r.getMessage() for r in caplog.records] == ["denied 0", "denied 1", "denied 2"]
    assert rl.suppressed == 7
    now[0] = 10.5
    rl(logging.WARNING, "denied %d", 10)
    assert [r.getMessage() for r in caplog.records][3:] == [
        "7 more authorization line(s) left out in 10s", "denied 10"]


# ---------------------------------------------------------------------- meshctl
def test_check_renders_the_decision_first_then_what_decided() -> None:
    resp = pb.CheckAuthzResponse(allowed=False, policy="no-refunds", rule=0,
                                 reason="x may not call y: denied by policy no-refunds rule 0",
                                 dry_run="allow", dry_run_reason="allowed by policy t rule 1")
    d = check_doc(LOADGEN, "payment", REFUND, resp)
    assert d["decision"] == "deny" and d["policy"] == "no-refunds" and d["rule"] == 0
    assert d["dry_run"] == {"decision": "allow", "reason": "allowed by policy t rule 1"}
    lines = check_lines(d)
    assert lines[0] == "deny"
    assert "policy no-refunds rule 0" in lines[1] and "dry run" in lines[3]
    plain = check_doc(ORDER, "payment", CHARGE,
                      pb.CheckAuthzResponse(allowed=True, rule=-1, reason="allowed by default"))
    assert plain["dry_run"] is None and check_lines(plain)[0] == "allow"
    assert len(check_lines(plain)) == 3
