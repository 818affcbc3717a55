"""Authorization: who may call what. Pure logic, no I/O: the policy model as it travels in
snapshots, its validation, and the one decision function both the inbound sidecar (enforcing)
and the control plane (``meshctl authz check``) use.

A policy names a destination service and rules; a rule has an action (ALLOW or DENY),
sources and methods:

* a source is ``*`` (any caller), an exact SPIFFE ID (``spiffe://mesh.local/service/order``)
  or a prefix of one written with a trailing ``*`` (``spiffe://mesh.local/service/*``);
* a method is ``*``, an exact gRPC path (``/payment.Payment/Charge``) or a prefix of one
  ending in ``/`` or ``*`` (``/payment.Payment/``, ``/payment.Payment/Get*``).

Deciding a call from ``source`` to ``method`` of ``service`` (enforced policies only):

1. a DENY rule of any policy of the service that matches → denied by that rule;
2. else an ALLOW rule that matches → allowed by that rule;
3. else, when the service has any ALLOW rule, → denied (nothing allowed it);
4. else the mesh-wide default (``allow`` until someone sets it, so a new mesh works).

Policies in dry-run mode are decided the same way on their own (``decide_dry_run``): their
verdict is logged and counted, never enforced.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ALLOW = "ALLOW"
DENY = "DENY"
ACTIONS = (ALLOW, DENY)
DEFAULTS = ("allow", "deny")


class AuthzError(ValueError):
    """An invalid policy: ``"<field>: <reason>"`` (the field path within the policy)."""


@dataclass(frozen=True, slots=True)
class Match:
    """A source or method pattern: ``kind`` is ``any``, ``exact`` or ``prefix``."""

    kind: str
    value: str = ""

    def matches(self, text: str) -> bool:
        if self.kind == "any":
            return True
        if self.kind == "exact":
            return text == self.value
        return text.startswith(self.value)

    def pattern(self) -> str:
        """The written form: ``*``, the exact value, or the prefix followed by ``*`` (which
        reads back as the same match for sources and methods alike)."""
        if self.kind == "any":
            return "*"
        return self.value + "*" if self.kind == "prefix" else self.value


@dataclass(frozen=True, slots=True)
class AuthzRule:
    action: str
    sources: tuple[Match, ...]
    methods: tuple[Match, ...]

    def matches(self, source: str, method: str) -> bool:
        return (any(s.matches(source) for s in self.sources)
                and any(m.matches(method) for m in self.methods))


@dataclass(frozen=True, slots=True)
class AuthzPolicy:
    name: str
    service: str
    rules: tuple[AuthzRule, ...]
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class AuthzDecision:
    """The verdict on one call and what decided it: ``policy`` and ``rule`` (index in its
    ``rules``) when a rule did, else ``policy`` "" and ``rule`` -1; ``reason`` is one line
    for the caller and the logs."""

    allowed: bool
    policy: str
    rule: int
    reason: str


@dataclass(frozen=True)
class AuthzConfig:
    """The mesh's authorization: the default for services without ALLOW rules and every
    policy. Indexed by service on creation (a decision looks at one service's policies)."""

    default: str = "allow"
    policies: tuple[AuthzPolicy, ...] = ()

    def __post_init__(self) -> None:
        by_service: dict[str, list[AuthzPolicy]] = {}
        for p in self.policies:
            by_service.setdefault(p.service, []).append(p)
        object.__setattr__(self, "_by_service",
                           {s: tuple(ps) for s, ps in by_service.items()})

    def for_service(self, service: str) -> tuple[AuthzPolicy, ...]:
        return self._by_service.get(service, ())  # type: ignore[attr-defined]

    @property
    def is_default(self) -> bool:
        return self.default == "allow" and not self.policies


def _decide(policies: Iterable[AuthzPolicy], default: str, source: str,
            method: str) -> AuthzDecision:
    policies = tuple(policies)
    for p in policies:
        for i, r in enumerate(p.rules):
            if r.action == DENY and r.matches(source, method):
                return AuthzDecision(False, p.name, i,
                                     f"{source or 'an unauthenticated caller'} may not call "
                                     f"{method}: denied by policy {p.name} rule {i}")
    any_allow = False
    for p in policies:
        for i, r in enumerate(p.rules):
            if r.action == ALLOW:
                any_allow = True
                if r.matches(source, method):
                    return AuthzDecision(True, p.name, i, f"allowed by policy {p.name} rule {i}")
    who = source or "an unauthenticated caller"
    if any_allow:
        names = ", ".join(sorted({p.name for p in policies}))
        return AuthzDecision(False, "", -1, f"{who} may not call {method}: no rule of "
                                            f"{names} allows it")
    if default == "deny":
        return AuthzDecision(False, "", -1, f"{who} may not call {method}: the mesh denies "
                                            f"by default and no policy allows it")
    return AuthzDecision(True, "", -1, "allowed by the mesh default (allow)")


def decide(cfg: AuthzConfig, service: str, source: str, method: str) -> AuthzDecision:
    """The enforced verdict on a call from SPIFFE ID ``source`` ("" = none) to gRPC path
    ``method`` of ``service`` (see the module doc)."""
    return _decide((p for p in cfg.for_service(service) if not p.dry_run), cfg.default,
                   source, method)


def decide_dry_run(cfg: AuthzConfig, service: str, source: str,
                   method: str) -> AuthzDecision | None:
    """What the service's dry-run policies, with the enforced ones, would decide; None when
    the service has no dry-run policy."""
    policies = cfg.for_service(service)
    if not any(p.dry_run for p in policies):
        return None
    return _decide(policies, cfg.default, source, method)


# ---------------------------------------------------------------- validation and documents
def _fail(where: str, why: str) -> AuthzError:
    return AuthzError(f"{where}: {why}")


def _pattern(value: Any, where: str, max_len: int, head: str, what: str,
             bad_head: str) -> Match:
    """``*``, an exact value starting with ``head``, or such a prefix ending in ``*``."""
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise _fail(where, f"expected {what}")
    if value == "*":
        return Match("any")
    if not value.startswith(head):
        raise _fail(where, f"{bad_head}: {value!r}")
    if "*" in value[:-1]:
        raise _fail(where, "'*' only at the end (a prefix)")
    return Match("prefix", value[:-1]) if value.endswith("*") else Match("exact", value)


def parse_source(value: Any, where: str) -> Match:
    return _pattern(value, where, 2048, "spiffe://",
                    "'*', a SPIFFE ID, or a SPIFFE ID prefix ending in '*'",
                    "not a SPIFFE ID (spiffe://...) or '*'")


def parse_method(value: Any, where: str) -> Match:
    m = _pattern(value, where, 1024, "/",
                 "'*' or a gRPC path /package.Service/Method (or a prefix)",
                 "a gRPC path starts with '/'")
    return Match("prefix", m.value) if m.kind == "exact" and m.value.endswith("/") else m


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise _fail(where, "expected a non-empty list")
    if len(value) > 256:
        raise _fail(where, "at most 256 entries")
    return value


def parse_rules(value: Any, where: str = "rules") -> tuple[AuthzRule, ...]:
    """``[{action, sources, methods}]`` (``methods`` default ``["*"]``); raises AuthzError."""
    rules = []
    for i, r in enumerate(_list(value, where)):
        at = f"{where}[{i}]"
        if not isinstance(r, Mapping):
            raise _fail(at, "expected a mapping with action, sources, methods")
        unknown = set(r) - {"action", "sources", "methods"}
        if unknown:
            raise _fail(at, f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        action = r.get("action")
        if not isinstance(action, str) or action.upper() not in ACTIONS:
            raise _fail(f"{at}.action", "required, ALLOW or DENY")
        sources = tuple(parse_source(s, f"{at}.sources[{j}]")
                        for j, s in enumerate(_list(r.get("sources"), f"{at}.sources")))
        methods = tuple(parse_method(m, f"{at}.methods[{j}]")
                        for j, m in enumerate(_list(r.get("methods", ["*"]), f"{at}.methods")))
        rules.append(AuthzRule(action.upper(), sources, methods))
    return tuple(rules)


def rule_doc(r: AuthzRule) -> dict[str, Any]:
    return {"action": r.action, "sources": [s.pattern() for s in r.sources],
            "methods": [m.pattern() for m in r.methods]}


def to_doc(cfg: AuthzConfig) -> dict[str, Any]:
    """The snapshot's ``authz`` section (``from_doc`` reads it back)."""
    return {"default": cfg.default,
            "policies": [{"name": p.name, "service": p.service, "dry_run": p.dry_run,
                          "rules": [rule_doc(r) for r in p.rules]} for p in cfg.policies]}


def from_doc(doc: Any, where: str = "authz") -> AuthzConfig:
    """Validate the snapshot's ``authz`` section; raises AuthzError ``"<field>: <reason>"``."""
    if not isinstance(doc, Mapping):
        raise _fail(where, "expected a mapping")
    unknown = set(doc) - {"default", "policies"}
    if unknown:
        raise _fail(where, f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    default = doc.get("default", "allow")
    if default not in DEFAULTS:
        raise _fail(f"{where}.default", "allow or deny")
    policies = []
    raw = doc.get("policies", [])
    if not isinstance(raw, list):
        raise _fail(f"{where}.policies", "expected a list")
    seen: set[str] = set()
    for i, p in enumerate(raw):
        at = f"{where}.policies[{i}]"
        if not isinstance(p, Mapping):
            raise _fail(at, "expected a mapping")
        unknown = set(p) - {"name", "service", "dry_run", "rules"}
        if unknown:
            raise _fail(at, f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        name, service = p.get("name"), p.get("service")
        if not isinstance(name, str) or not name or name in seen:
            raise _fail(f"{at}.name", "required, unique")
        if not isinstance(service, str) or not service:
            raise _fail(f"{at}.service", "required")
        dry_run = p.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise _fail(f"{at}.dry_run", "true or false")
        seen.add(name)
        policies.append(AuthzPolicy(name, service, parse_rules(p.get("rules"), f"{at}.rules"),
                                    dry_run))
    return AuthzConfig(default, tuple(policies))
