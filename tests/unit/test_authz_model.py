"""mesh_common.authz: the decision order (DENY over ALLOW, ALLOW lists close a service, the
mesh default otherwise), the pattern forms, dry-run, validation errors and the document
round trip (also through the snapshot)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_common import snapshot as S
from mesh_common.authz import (
    AuthzConfig,
    AuthzError,
    AuthzPolicy,
    decide,
    decide_dry_run,
    from_doc,
    parse_method,
    parse_rules,
    parse_source,
    to_doc,
)

TD = "spiffe://mesh.local/service"
ORDER, LOADGEN, GATEWAY = f"{TD}/order", f"{TD}/loadgen", f"{TD}/gateway"
CHARGE, LEDGER = "/payment.Payment/Charge", "/payment.Payment/ListLedger"


def policy(name: str, rules: list[dict], service: str = "payment",
           dry_run: bool = False) -> AuthzPolicy:
    return AuthzPolicy(name, service, parse_rules(rules), dry_run)


def test_a_new_mesh_allows_everything_until_told_otherwise() -> None:
    d = decide(AuthzConfig(), "payment", LOADGEN, CHARGE)
    assert d.allowed and d.policy == "" and d.rule == -1
    d = decide(AuthzConfig("deny"), "payment", LOADGEN, CHARGE)
    assert not d.allowed and "denies by default" in d.reason and LOADGEN in d.reason


def test_allow_rules_close_the_service_and_deny_wins() -> None:
    cfg = AuthzConfig("allow", (
        policy("callers", [{"action": "ALLOW", "sources": [ORDER], "methods": ["/payment.Payment/"]},
                           {"action": "ALLOW", "sources": [f"{TD}/gate*"], "methods": [LEDGER]}]),
        policy("no-refunds", [{"action": "DENY", "sources": ["*"],
                               "methods": ["/payment.Payment/Refund"]}]),
    ))
    assert decide(cfg, "payment", ORDER, CHARGE) == decide(cfg, "payment", ORDER, CHARGE)
    ok = decide(cfg, "payment", ORDER, CHARGE)
    assert ok.allowed and (ok.policy, ok.rule) == ("callers", 0)
    assert decide(cfg, "payment", GATEWAY, LEDGER).allowed
    denied = decide(cfg, "payment", GATEWAY, CHARGE)
    assert not denied.allowed and "no rule of callers, no-refunds allows it" in denied.reason
    refund = decide(cfg, "payment", ORDER, "/payment.Payment/Refund")
    assert not refund.allowed and (refund.policy, refund.rule) == ("no-refunds", 0)
    assert decide(cfg, "inventory", LOADGEN, "/inventory.Inventory/Reserve").allowed  # default
    assert not decide(cfg, "payment", "", CHARGE).allowed  # no identity: no ALLOW matches


def test_dry_run_policies_are_judged_apart_and_never_enforced() -> None:
    cfg = AuthzConfig("allow", (policy("lockdown", [{"action": "DENY", "sources": ["*"]}],
                                       dry_run=True),))
    assert decide(cfg, "payment", ORDER, CHARGE).allowed
    would = decide_dry_run(cfg, "payment", ORDER, CHARGE)
    assert would is not None and not would.allowed and would.policy == "lockdown"
    assert decide_dry_run(cfg, "inventory", ORDER, "/x/y") is None


@pytest.mark.parametrize(("text", "kind", "value"), [
    ("*", "any", ""), (ORDER, "exact", ORDER), (f"{TD}/*", "prefix", f"{TD}/")])
def test_source_forms(text: str, kind: str, value: str) -> None:
    m = parse_source(text, "s")
    assert (m.kind, m.value, m.pattern()) == (kind, value, text)


@pytest.mark.parametrize(("text", "kind", "value"), [
    ("*", "any", ""), (CHARGE, "exact", CHARGE), ("/payment.Payment/", "prefix", "/payment.Payment/"),
    ("/payment.Payment/List*", "prefix", "/payment.Payment/List")])
def test_method_forms(text: str, kind: str, value: str) -> None:
    m = parse_method(text, "m")
    assert (m.kind, m.value) == (kind, value)
    assert parse_method(m.pattern(), "m") == m


@pytest.mark.parametrize(("rules", "message"), [
    ([], "rules: expected a non-empty list"),
    ([{"action": "MAYBE", "sources": ["*"]}], "rules[0].action: required, ALLOW or DENY"),
    ([{"action": "ALLOW", "sources": ["order"]}], "rules[0].sources[0]: not a SPIFFE ID"),
    ([{"action": "ALLOW", "sources": [f"{TD}/*/x"]}], "rules[0].sources[0]: '*' only at the end"),
    ([{"action": "ALLOW", "sources": ["*"], "methods": ["payment.Payment/Charge"]}],
     "rules[0].methods[0]: a gRPC path starts with '/'"),
    ([{"action": "ALLOW", "sources": ["*"], "who": 1}], "rules[0]: unknown field(s) who"),
])
def test_invalid_rules_name_the_field(rules: list, message: str) -> None:
    with pytest.raises(AuthzError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("*", r"\*").replace(".", r"\.").replace("[", r"\[")
                       .replace("]", r"\]")):
        parse_rules(rules)


def test_documents_round_trip_and_travel_in_snapshots() -> None:
    cfg = AuthzConfig("deny", (policy("callers", [{"action": "ALLOW", "sources": [ORDER],
                                                   "methods": ["/payment.Payment/"]}]),))
    assert from_doc(to_doc(cfg)) == cfg
    snap = S.Snapshot("3", authz=cfg, revoked=("1f2e",))
    back = S.from_doc(snap.to_doc())
    assert back.authz == cfg and back.revoked == ("1f2e",)
    assert "authz" not in S.Snapshot("1").to_doc()  # default: absent, hashes unchanged
    with pytest.raises(S.SnapshotError, match=r"authz\.default: allow or deny"):
        S.from_doc({"version": "1", "authz": {"default": "maybe"}})
    with pytest.raises(S.SnapshotError, match=r"revoked\[0\]: a certificate serial"):
        S.from_doc({"version": "1", "revoked": ["XYZ"]})


_sources = st.sampled_from([ORDER, LOADGEN, GATEWAY, ""])
_methods = st.sampled_from([CHARGE, LEDGER, "/payment.Payment/Refund", "/other.S/M"])
_rule = st.fixed_dictionaries({
    "action": st.sampled_from(["ALLOW", "DENY"]),
    "sources": st.lists(st.sampled_from(["*", ORDER, f"{TD}/*", f"{TD}/load*"]), min_size=1,
                        max_size=3),
    "methods": st.lists(st.sampled_from(["*", CHARGE, "/payment.Payment/", "/payment.Payment/L*"]),
                        min_size=1, max_size=3)})


@pytest.mark.fuzz
@settings(deadline=None, max_examples=300)
@given(rules=st.lists(_rule, min_size=1, max_size=5), default=st.sampled_from(["allow", "deny"]),
       source=_sources, method=_methods)
def test_the_decision_follows_its_four_steps(rules: list, default: str, source: str,
                                             method: str) -> None:
    cfg = AuthzConfig(default, (policy("p", rules),))
    parsed = cfg.policies[0].rules
    d = decide(cfg, "payment", source, method)
    denies = [i for i, r in enumerate(parsed) if r.action == "DENY" and r.matches(source, method)]
    allows = [i for i, r in enumerate(parsed) if r.action == "ALLOW" and r.matches(source, method)]
    if denies:
        assert not d.allowed and d.rule == denies[0]
    elif allows:
        assert d.allowed and d.rule == allows[0]
    elif any(r.action == "ALLOW" for r in parsed):
        assert not d.allowed and d.rule == -1
    else:
        assert d.allowed == (default == "allow") and d.rule == -1
