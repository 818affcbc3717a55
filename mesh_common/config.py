"""Declarative config: the documents people apply (kinds ``Route``, ``TrafficPolicy``,
``Fault`` and ``AuthorizationPolicy``), validated into immutable objects, checked as a whole
set and compiled into the snapshot's routes (``compile_routes``) and authorization
(``compile_authz``).

A document is ``{kind, name, spec}``; the spec's shapes that the snapshot already has (rule
matches, destinations, timeouts, fault delays and aborts; authorization rules) are parsed by
``mesh_common.snapshot``'s and ``mesh_common.authz``'s own parsers, so they can never
disagree. Every error is one line,
``<source>: document <n> (<Kind> <name>): <field>: <reason>`` (``n`` counts from 1; the parts
not known yet are left out), e.g. ``routes.yaml: document 2 (Route echo-canary):
spec.rules[1].destinations: weights must sum to 100, they sum to 95``.

``to_doc`` is the canonical form (what is stored, shown and diffed); it parses back into the
same object. Pure values, no I/O (YAML is only dumped, never read from anywhere).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from .authz import DEFAULTS as AUTHZ_DEFAULTS
from .authz import AuthzConfig, AuthzError, AuthzPolicy, AuthzRule, parse_rules, rule_doc
from .snapshot import (
    DEFAULT_LOAD_BALANCER,
    CircuitLimits,
    Destination,
    FaultRule,
    OutlierPolicy,
    RetryPolicy,
    RouteRule,
    Rule,
    SnapshotError,
    StringMatch,
    one_line,
    parse_fault,
    parse_route,
)

KINDS = ("Route", "TrafficPolicy", "Fault", "AuthorizationPolicy")
"""The kinds a document may have."""
TRAFFIC_KINDS = ("Route", "TrafficPolicy", "Fault")
"""The kinds ``compile_routes`` reads (an AuthorizationPolicy goes to ``compile_authz``)."""
AUTHZ_MODES = ("enforce", "dry_run")
"""An AuthorizationPolicy's ``spec.mode``; the first is the default."""

_KIND_ALIASES = {"route": "Route", "routes": "Route",
                 "trafficpolicy": "TrafficPolicy", "trafficpolicies": "TrafficPolicy",
                 "fault": "Fault", "faults": "Fault",
                 "authorizationpolicy": "AuthorizationPolicy",
                 "authorizationpolicies": "AuthorizationPolicy",
                 "authzpolicy": "AuthorizationPolicy", "authzpolicies": "AuthorizationPolicy"}
_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
_TOP_KEYS = ("kind", "name", "spec")
_SPEC_KEYS = {"Route": ("service", "timeout_ms", "rules"),
              "TrafficPolicy": ("service", "load_balancer", "timeout_ms", "retries", "limits",
                                "outlier_detection"),
              "Fault": ("service", "method", "delay", "abort"),
              "AuthorizationPolicy": ("service", "mode", "rules")}
GRPC_CODE_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                   "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                   "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                   "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
"""gRPC status names by code (the canonical form writes an abort's code by name)."""

CREATED, CONFIGURED, UNCHANGED, DELETED = "created", "configured", "unchanged", "deleted"


class ConfigError(ValueError):
    """An invalid document or set of documents: ``str(err)`` is the one-line message naming
    the source, the document, the field and the reason (line breaks in the documents' keys or
    values are escaped)."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(message))


def kind_of(text: str) -> str:
    """The kind ``text`` names, case-insensitive, singular or plural (``routes`` ->
    ``Route``); raises ``ConfigError``. For people typing commands: documents must spell the
    kind exactly."""
    kind = _KIND_ALIASES.get(text.strip().lower())
    if kind is None:
        raise ConfigError(f"unknown kind {text!r} (known: {', '.join(KINDS)})")
    return kind


def check_name(name: Any) -> str:
    """``name`` when it is a valid object name (1-63 of ``[a-z0-9-]``, starting with a
    letter); raises ``ConfigError`` with the reason alone."""
    if name is None:
        raise ConfigError("required: 1-63 of [a-z0-9-] starting with a letter")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"a name is 1-63 of [a-z0-9-] starting with a letter, got {name!r}")
    return name


# ---------------------------------------------------------------------- the objects
@dataclass(frozen=True)
class RouteSpec:
    """How calls to ``service`` are routed: ``rules`` in order (first match wins; a rule
    without a name of its own is ``<route name>#<index>``), and the timeout (ms) of the rules
    that set none (None = the TrafficPolicy's, else only the caller's deadline)."""

    service: str
    rules: tuple[Rule, ...] = ()
    timeout_ms: int | None = None


@dataclass(frozen=True)
class TrafficPolicySpec:
    """Per upstream ``service``: its load balancer, the timeout (ms) of calls that neither
    the Route's rule nor the Route sets one for (None = only the caller's deadline), and the
    resilience settings the callers' sidecars apply to it: retries (``spec.retries``), circuit
    limits (``spec.limits``) and outlier detection (``spec.outlier_detection``), each parsed by
    the snapshot's own parser (every field optional, defaults as the snapshot's)."""

    service: str
    load_balancer: str = DEFAULT_LOAD_BALANCER
    timeout_ms: int | None = None
    retries: RetryPolicy = RetryPolicy()
    limits: CircuitLimits = CircuitLimits()
    outlier: OutlierPolicy = OutlierPolicy()


@dataclass(frozen=True)
class FaultSpec:
    """Faults injected into calls to ``service`` (whose method matches ``method``; None =
    every method): a delay of ``delay_ms`` for ``delay_percent`` of calls (0 ms = no delay)
    and an abort with gRPC status ``abort_code`` for ``abort_percent`` of calls (code 0 = no
    abort). Percentages are 0..100."""

    service: str
    method: StringMatch | None = None
    delay_ms: int = 0
    delay_percent: float = 0.0
    abort_code: int = 0
    abort_percent: float = 0.0


@dataclass(frozen=True)
class AuthzPolicySpec:
    """Who may call ``service`` (the destination; its inbound sidecars enforce it): ``rules``
    in order (``mesh_common.authz``: action ALLOW or DENY, sources, methods; DENY wins over
    ALLOW, and a service with any ALLOW rule denies what no rule allows), and whether the
    policy is only tried (``dry_run``: its decisions are logged and counted, never
    enforced)."""

    service: str
    rules: tuple[AuthzRule, ...]
    dry_run: bool = False

    @property
    def mode(self) -> str:
        """``enforce`` or ``dry_run`` (the document's ``spec.mode``)."""
        return AUTHZ_MODES[1] if self.dry_run else AUTHZ_MODES[0]


Spec = RouteSpec | TrafficPolicySpec | FaultSpec | AuthzPolicySpec


@dataclass(frozen=True)
class ConfigObject:
    """One config object: ``kind`` (one of ``KINDS``), ``name`` (unique within its kind) and
    its typed ``spec``."""

    kind: str
    name: str
    spec: Spec

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.name)

    @property
    def service(self) -> str:
        """The service the object is about (the upstream of the traffic kinds, the
        destination of an AuthorizationPolicy)."""
        return self.spec.service

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass(frozen=True)
class Document:
    """One parsed YAML/JSON document of an apply: its ``source`` (a file name; "" = unknown),
    its ``index`` in that source (from 1; 0 = unknown) and its content."""

    source: str
    index: int
    body: Any


def describe(source: str, index: int, kind: str | None = None, name: str | None = None) -> str:
    """``<source>: document <index> (<kind> <name>)``, leaving out what is not known."""
    parts = [source] if source else []
    where = f"document {index}" if index else ""
    label = " ".join(x for x in (kind, name) if x)
    if label:
        where = f"{where} ({label})" if where else label
    if where:
        parts.append(where)
    return ": ".join(parts) or "document"


# ---------------------------------------------------------------------- parsing
def _known(doc: Mapping[Any, Any], keys: Iterable[str], prefix: str) -> None:
    keys = tuple(keys)
    for key in doc:
        if key not in keys:
            raise SnapshotError(f"{prefix}{key}: unknown key (known: {', '.join(keys)})")


def parse_object(body: Any, source: str = "", index: int = 0) -> ConfigObject:
    """Validate one document into a ``ConfigObject``; raises ``ConfigError`` naming
    ``source``, ``index``, the kind and name when known, the field and the reason. Unknown
    keys anywhere are errors."""
    if not isinstance(body, dict):
        what = "nothing" if body is None else type(body).__name__
        raise ConfigError(f"{describe(source, index)}: expected a mapping with kind, name and "
                          f"spec, got {what}")
    kind = body.get("kind")
    if kind not in KINDS:
        why = ("required, one of " + ", ".join(KINDS) if kind is None else
               f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
        raise ConfigError(f"{describe(source, index)}: kind: {why}")
    try:
        name = check_name(body.get("name"))
    except ConfigError as exc:
        raise ConfigError(f"{describe(source, index, kind)}: name: {exc}") from None
    where = describe(source, index, kind, name)
    try:
        _known(body, _TOP_KEYS, "")
        spec = body.get("spec")
        if not isinstance(spec, dict):
            raise SnapshotError("spec: required mapping")
        _known(spec, _SPEC_KEYS[kind], "spec.")
        parsed: Spec
        if kind == "Route":
            parsed = _route_spec(spec, name)
        elif kind == "TrafficPolicy":
            parsed = _policy_spec(spec)
        elif kind == "AuthorizationPolicy":
            parsed = _authz_spec(spec)
        else:
            parsed = _fault_spec(spec, name)
    except SnapshotError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return ConfigObject(kind, name, parsed)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fill_rule(rule: Any, j: int, route_name: str) -> Any:
    """A rule with its default name and the weight of the one destination that omits it
    (100 minus the others'); anything else is left to the snapshot's parser."""
    if not isinstance(rule, dict):
        return rule
    rule = dict(rule)
    if not rule.get("name"):
        rule["name"] = f"{route_name}#{j}"
    dests = rule.get("destinations")
    if isinstance(dests, list) and len(dests) > 1 and all(isinstance(d, dict) for d in dests):
        where = f"spec.rules[{j}].destinations"
        missing = [k for k, d in enumerate(dests) if "weight" not in d]
        if len(missing) > 1:
            raise SnapshotError(f"{where}[{missing[1]}].weight: only one destination may omit "
                                "its weight (it takes what the others leave of 100)")
        given = [d["weight"] for d in dests if "weight" in d]
        if len(missing) == 1 and all(_is_int(w) for w in given):
            rest = 100 - sum(given)
            if rest < 0:
                raise SnapshotError(f"{where}: weights must sum to 100, the given ones sum to "
                                    f"{sum(given)}")
            dests = list(dests)
            dests[missing[0]] = {**dests[missing[0]], "weight": rest}
            rule["destinations"] = dests
    return rule


def _route_spec(spec: dict[str, Any], name: str) -> RouteSpec:
    doc = dict(spec)
    if isinstance(doc.get("rules"), list):
        doc["rules"] = [_fill_rule(r, j, name) for j, r in enumerate(doc["rules"])]
    route = parse_route(doc, "spec")
    rules = tuple(replace(r, match=replace(r.match, headers=tuple(
        sorted(r.match.headers, key=lambda h: h.name)))) for r in route.rules)
    return RouteSpec(route.service, rules, route.timeout_ms)


def _policy_spec(spec: dict[str, Any]) -> TrafficPolicySpec:
    route = parse_route(dict(spec), "spec")
    return TrafficPolicySpec(route.service, route.load_balancer, route.timeout_ms,
                             route.retries, route.limits, route.outlier)


def _fault_spec(spec: dict[str, Any], name: str) -> FaultSpec:
    service = parse_route({"service": spec.get("service")}, "spec").service
    f = parse_fault({k: spec[k] for k in ("method", "delay", "abort") if k in spec}, "spec", name)
    return FaultSpec(service, f.method, f.delay_ms, f.delay_percent, f.abort_code,
                     f.abort_percent)


def _authz_spec(spec: dict[str, Any]) -> AuthzPolicySpec:
    service = parse_route({"service": spec.get("service")}, "spec").service
    mode = spec.get("mode", AUTHZ_MODES[0])
    if mode not in AUTHZ_MODES:
        raise SnapshotError(f"spec.mode: {' or '.join(AUTHZ_MODES)} (default "
                            f"{AUTHZ_MODES[0]}), got {mode!r}")
    if "rules" not in spec:
        raise SnapshotError("spec.rules: required, a non-empty list of {action, sources, "
                            "methods}")
    try:
        rules = parse_rules(spec["rules"], "spec.rules")
    except AuthzError as exc:
        raise SnapshotError(str(exc)) from None
    return AuthzPolicySpec(service, rules, mode == AUTHZ_MODES[1])


def parse_documents(documents: Iterable[Document]) -> tuple[tuple[Document, ConfigObject], ...]:
    """Every document as an object, in order; raises ``ConfigError`` for the first invalid
    one, or for an object (kind and name) given twice."""
    out: list[tuple[Document, ConfigObject]] = []
    seen: dict[tuple[str, str], Document] = {}
    for doc in documents:
        obj = parse_object(doc.body, doc.source, doc.index)
        first = seen.get(obj.key)
        if first is not None:
            raise ConfigError(f"{describe(doc.source, doc.index, obj.kind, obj.name)}: name: "
                              f"{obj} is given twice (also {describe(first.source, first.index)})")
        seen[obj.key] = doc
        out.append((doc, obj))
    return tuple(out)


# ---------------------------------------------------------------------- the whole set
def validate_set(objects: Iterable[ConfigObject],
                 origins: Mapping[tuple[str, str], Document] | None = None) -> None:
    """Check a whole set of objects: one Route and one TrafficPolicy per service. Raises
    ``ConfigError`` naming the offending object, by its document when ``origins`` has it
    (the objects of an apply: checked after those without a document, in document order)."""
    origins = origins or {}
    order = {key: n for n, key in enumerate(origins)}
    ranked = sorted(objects, key=lambda o: (o.key in order, order.get(o.key, 0), o.key))
    owners: dict[tuple[str, str], ConfigObject] = {}
    for obj in ranked:
        if obj.kind not in ("Route", "TrafficPolicy"):
            continue
        held = owners.setdefault((obj.kind, obj.service), obj)
        if held is obj:
            continue
        doc = origins.get(obj.key)
        where = describe(doc.source, doc.index, obj.kind, obj.name) if doc else str(obj)
        other = origins.get(held.key)
        elsewhere = describe(other.source, other.index) if other else "stored"
        raise ConfigError(f"{where}: spec.service: service {obj.service!r} already has "
                          f"{held} ({elsewhere}); one {obj.kind} per service")


@dataclass(frozen=True)
class Change:
    """What an apply does to one object: ``action`` is created, configured or unchanged;
    ``previous`` is the object it replaces (None when created)."""

    obj: ConfigObject
    action: str
    document: Document
    previous: ConfigObject | None


@dataclass(frozen=True)
class ApplyPlan:
    """An apply, validated: its changes in document order and the whole set after it
    (sorted by kind and name)."""

    changes: tuple[Change, ...]
    objects: tuple[ConfigObject, ...]


def plan_apply(current: Iterable[ConfigObject], documents: Iterable[Document]) -> ApplyPlan:
    """Validate ``documents`` (an apply) and the set they make with ``current`` (the stored
    objects; an applied object replaces the stored one of the same kind and name). Raises
    ``ConfigError`` naming the first problem; changes nothing."""
    parsed = parse_documents(documents)
    merged = {o.key: o for o in current}
    origins: dict[tuple[str, str], Document] = {}
    changes: list[Change] = []
    for doc, obj in parsed:
        previous = merged.get(obj.key)
        action = CREATED if previous is None else UNCHANGED if previous == obj else CONFIGURED
        changes.append(Change(obj, action, doc, previous))
        merged[obj.key] = obj
        origins[obj.key] = doc
    objects = tuple(merged[k] for k in sorted(merged))
    validate_set(objects, origins)
    return ApplyPlan(tuple(changes), objects)


# ---------------------------------------------------------------------- compiling
def _fault_rule(obj: ConfigObject) -> FaultRule | None:
    f = obj.spec
    assert isinstance(f, FaultSpec)
    delay = f.delay_ms > 0 and f.delay_percent > 0
    abort = f.abort_code > 0 and f.abort_percent > 0
    if not (delay or abort):
        return None  # injects nothing
    return FaultRule(obj.name, f.method, f.delay_ms if delay else 0,
                     f.delay_percent if delay else 0.0, f.abort_code if abort else 0,
                     f.abort_percent if abort else 0.0)


def compile_routes(objects: Iterable[ConfigObject], cluster_names: Iterable[str]
                   ) -> tuple[tuple[RouteRule, ...], tuple[str, ...]]:
    """The snapshot's routes for a valid set of objects and the registry's clusters.

    One ``RouteRule(service, cluster=service)`` per service that has a cluster or is named by
    an object, sorted by service: the Route's rules; the default timeout (ms) the Route's,
    else the TrafficPolicy's (a rule's own timeout wins over both); the TrafficPolicy's load
    balancer (the default, peak_ewma, without one), retries, limits and outlier detection
    (the defaults without one); the faults of every Fault of the service, by name (a fault
    that injects nothing, every percentage 0, is left out). Also returns the services
    named by objects that have no cluster, sorted: they get an empty cluster so their calls
    fail with "no endpoints" rather than "no route". AuthorizationPolicy objects are left
    out (``compile_authz``). Raises ``ConfigError`` for an invalid set (``validate_set``).
    """
    objs = sorted((o for o in objects if o.kind in TRAFFIC_KINDS), key=lambda o: o.key)
    validate_set(objs)
    clusters = set(cluster_names)
    routes_by: dict[str, RouteSpec] = {}
    policies_by: dict[str, TrafficPolicySpec] = {}
    faults_by: dict[str, list[FaultRule]] = {}
    for o in objs:
        if isinstance(o.spec, RouteSpec):
            routes_by[o.service] = o.spec
        elif isinstance(o.spec, TrafficPolicySpec):
            policies_by[o.service] = o.spec
        elif (fault := _fault_rule(o)) is not None:
            faults_by.setdefault(o.service, []).append(fault)
    named = {o.service for o in objs}
    routes: list[RouteRule] = []
    for service in sorted(clusters | named):
        route, policy = routes_by.get(service), policies_by.get(service)
        timeout = route.timeout_ms if route and route.timeout_ms is not None else (
            policy.timeout_ms if policy else None)
        if policy is None:
            policy = TrafficPolicySpec(service)
        routes.append(RouteRule(service, service, route.rules if route else (), timeout,
                                policy.load_balancer, tuple(faults_by.get(service, ())),
                                policy.retries, policy.limits, policy.outlier))
    return tuple(routes), tuple(sorted(named - clusters))


def compile_authz(objects: Iterable[ConfigObject], default: str = "allow") -> AuthzConfig:
    """The snapshot's authorization for a set of objects and the mesh-wide ``default``
    (``allow`` or ``deny``: what services without ALLOW rules do): one ``AuthzPolicy`` per
    AuthorizationPolicy object, named after it, sorted by name (other kinds are ignored).
    Raises ``ConfigError`` for a default other than allow or deny."""
    if default not in AUTHZ_DEFAULTS:
        raise ConfigError(f"authorization default: allow or deny, got {default!r}")
    policies = tuple(AuthzPolicy(o.name, o.spec.service, o.spec.rules, o.spec.dry_run)
                     for o in sorted(objects, key=lambda o: o.key)
                     if isinstance(o.spec, AuthzPolicySpec))
    return AuthzConfig(default, policies)


# ---------------------------------------------------------------------- canonical form
def _percent(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _rule_doc(rule: Rule, j: int, route_name: str) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if rule.name != f"{route_name}#{j}":
        doc["name"] = rule.name
    match: dict[str, Any] = {}
    if rule.match.method is not None:
        match["method"] = rule.match.method.to_doc()
    if rule.match.headers:
        match["headers"] = {h.name: h.match.to_doc() for h in rule.match.headers}
    if match:
        doc["match"] = match
    doc["destinations"] = [_destination_doc(d) for d in rule.destinations]
    if rule.timeout_ms is not None:
        doc["timeout_ms"] = rule.timeout_ms
    return doc


def _destination_doc(d: Destination) -> dict[str, Any]:
    return ({"subset": dict(d.subset)} if d.subset else {}) | {"weight": d.weight}


def _number(value: int | float) -> int | float:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _changed(value: Any, default: Any, fields: Iterable[str]) -> dict[str, Any]:
    """The ``fields`` of ``value`` that differ from ``default``'s, as document values (status
    codes by name, method matches as documents, whole floats as integers)."""
    out: dict[str, Any] = {}
    for name in fields:
        v = getattr(value, name)
        if v == getattr(default, name):
            continue
        if name in ("retry_on", "error_codes"):
            out[name] = [GRPC_CODE_NAMES[c] for c in v]
        elif name == "non_idempotent":
            out[name] = [m.to_doc() for m in v]
        else:
            out[name] = _number(v)
    return out


_RETRY_FIELDS = ("max_attempts", "retry_on", "per_try_timeout_ms", "backoff_base_ms",
                 "backoff_max_ms", "max_request_bytes", "non_idempotent", "budget_percent",
                 "budget_min_per_s", "budget_window_s")
_LIMIT_FIELDS = ("max_connections", "max_pending", "max_requests", "max_retries")
_OUTLIER_FIELDS = ("consecutive_errors", "error_codes", "base_ejection_ms", "max_ejection_ms",
                   "max_ejection_percent", "half_open_probes", "success_rate_min_requests",
                   "success_rate_threshold")


def _outlier_doc(p: OutlierPolicy) -> dict[str, Any]:
    # max_ejection_ms defaults to the larger of its default and base_ejection_ms
    default = replace(OutlierPolicy(), max_ejection_ms=max(OutlierPolicy().max_ejection_ms,
                                                           p.base_ejection_ms))
    return _changed(p, default, _OUTLIER_FIELDS)


def to_doc(obj: ConfigObject) -> dict[str, Any]:
    """The canonical document of ``obj``: ``{kind, name, spec}`` with defaults left out
    (a rule's default name, an empty match or subset, unset timeouts, every retry, limit and
    outlier detection field at its default, and such a section when all are, an
    AuthorizationPolicy's mode when it is enforce) and status codes by name; authorization
    rules in ``mesh_common.authz.rule_doc``'s form (every field, patterns as written).
    ``parse_object(to_doc(obj)) == obj``. JSON-able."""
    s = obj.spec
    spec: dict[str, Any] = {"service": s.service}
    if isinstance(s, AuthzPolicySpec):
        if s.dry_run:
            spec["mode"] = s.mode
        spec["rules"] = [rule_doc(r) for r in s.rules]
    elif isinstance(s, RouteSpec):
        if s.timeout_ms is not None:
            spec["timeout_ms"] = s.timeout_ms
        if s.rules:
            spec["rules"] = [_rule_doc(r, j, obj.name) for j, r in enumerate(s.rules)]
    elif isinstance(s, TrafficPolicySpec):
        spec["load_balancer"] = s.load_balancer
        if s.timeout_ms is not None:
            spec["timeout_ms"] = s.timeout_ms
        for key, section in (("retries", _changed(s.retries, RetryPolicy(), _RETRY_FIELDS)),
                             ("limits", _changed(s.limits, CircuitLimits(), _LIMIT_FIELDS)),
                             ("outlier_detection", _outlier_doc(s.outlier))):
            if section:
                spec[key] = section
    else:
        if s.method is not None:
            spec["method"] = s.method.to_doc()
        if s.delay_ms:
            spec["delay"] = {"ms": s.delay_ms, "percent": _percent(s.delay_percent)}
        if s.abort_code:
            spec["abort"] = {"code": GRPC_CODE_NAMES[s.abort_code],
                             "percent": _percent(s.abort_percent)}
    return {"kind": obj.kind, "name": obj.name, "spec": spec}


def to_yaml(doc: Mapping[str, Any]) -> str:
    """A document (e.g. ``to_doc``'s) as block-style YAML, keys in their order, ending in a
    newline."""
    import yaml

    return yaml.safe_dump(dict(doc), sort_keys=False, default_flow_style=False,
                          allow_unicode=True, width=100)
