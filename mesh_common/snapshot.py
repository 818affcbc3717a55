"""The immutable snapshot a sidecar runs on: routes, upstream clusters and their endpoints.

Standalone config and the control plane both build this one type; the data path cannot tell
them apart. The control plane sends it as a JSON document (``to_doc``); the sidecar validates
it whole with ``from_doc`` (``SnapshotError`` naming the field) before anything changes.
Pure values, no I/O.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from mesh_common.authz import AuthzConfig, AuthzError
from mesh_common.authz import from_doc as authz_from_doc
from mesh_common.authz import to_doc as authz_to_doc

from .spiffe import SpiffeError, SpiffeId

MAX_SNAPSHOT_BYTES = 8 * 1024 * 1024
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./")


_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in
                              "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


def one_line(message: object) -> str:
    """``message`` as text with every line break escaped (``\\n``...), so an error that
    echoes a hostile document's keys or values stays one line."""
    return str(message).translate(_LINE_BREAKS)


class SnapshotError(ValueError):
    """An invalid snapshot document: ``str(err)`` is ``<field>: <reason>``, one line
    (line breaks in the document's keys or values are escaped)."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(message))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance of an upstream service: its inbound (mTLS) address, expected identity,
    instance id, labels (sorted ``(key, value)`` pairs) and the health its sidecar reports."""

    host: str
    port: int
    spiffe_id: str
    instance: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    healthy: bool = True

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def label(self, key: str) -> str | None:
        for k, v in self.labels:
            if k == key:
                return v
        return None


@dataclass(frozen=True)
class Cluster:
    """An upstream service and the endpoints that serve it; ``healthy`` is the subset the
    balancers pick from."""

    name: str
    endpoints: tuple[Endpoint, ...]
    healthy: tuple[Endpoint, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "healthy", tuple(e for e in self.endpoints if e.healthy))


MATCH_KINDS = ("exact", "prefix", "regex")
LOAD_BALANCERS = ("peak_ewma", "round_robin", "random", "least_request")
"""Balancers a snapshot may name; the first is the default (as in Linkerd)."""
DEFAULT_LOAD_BALANCER = LOAD_BALANCERS[0]
SICK_CODES = (14, 13, 2, 4, 15)
"""UNAVAILABLE, INTERNAL, UNKNOWN, DEADLINE_EXCEEDED, DATA_LOSS: what outlier detection counts
by default (never business answers such as FAILED_PRECONDITION or NOT_FOUND)."""


@dataclass(frozen=True, slots=True)
class StringMatch:
    """``kind`` exact, prefix or regex (Python ``re``, ``fullmatch``) against ``value``."""

    kind: str
    value: str

    def to_doc(self) -> dict[str, str]:
        return {self.kind: self.value}


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A request header (lower-case name) whose value must match."""

    name: str
    match: StringMatch


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """What a call must carry to take a rule: a gRPC method (``/pkg.Service/Method``, exact or
    prefix; None = any) and every header listed. An empty match takes every call."""

    method: StringMatch | None = None
    headers: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class Destination:
    """A share (``weight``, percent) of a rule's calls, sent to the endpoints whose labels
    include ``subset`` (sorted ``(key, value)`` pairs; empty = every endpoint)."""

    subset: tuple[tuple[str, str], ...]
    weight: int


@dataclass(frozen=True, slots=True)
class Rule:
    """One route rule: the first rule whose ``match`` takes the call decides its
    destinations and timeout (ms; None = the route's default)."""

    name: str
    match: RouteMatch
    destinations: tuple[Destination, ...]
    timeout_ms: int | None = None


@dataclass(frozen=True, slots=True)
class FaultRule:
    """Faults injected into calls to the service (for ``method``, exact or prefix; None =
    every method): a delay of ``delay_ms`` for ``delay_percent`` of calls and an abort with
    gRPC status ``abort_code`` for ``abort_percent`` of calls (percent 0..100)."""

    name: str
    method: StringMatch | None = None
    delay_ms: int = 0
    delay_percent: float = 0.0
    abort_code: int = 0
    abort_percent: float = 0.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """gRPC retries done by the mesh (gRFC A6): at most ``max_attempts`` in all (1 = never
    retry), on the status codes ``retry_on`` (plus refused streams and GOAWAY for unprocessed
    ones), each try limited to ``per_try_timeout_ms`` (None = only the call's deadline),
    exponential backoff with full jitter from ``backoff_base_ms`` up to ``backoff_max_ms``
    (a server's ``grpc-retry-pushback-ms`` wins), only while the request's bytes fit
    ``max_request_bytes``, never for methods in ``non_idempotent``; a budget caps retries at
    ``budget_percent`` of the requests plus ``budget_min_per_s`` per second over
    ``budget_window_s``."""

    max_attempts: int = 3
    retry_on: tuple[int, ...] = (14,)
    per_try_timeout_ms: int | None = None
    backoff_base_ms: int = 25
    backoff_max_ms: int = 250
    max_request_bytes: int = 1 << 20
    non_idempotent: tuple[StringMatch, ...] = ()
    budget_percent: float = 20.0
    budget_min_per_s: float = 10.0
    budget_window_s: float = 10.0


@dataclass(frozen=True, slots=True)
class CircuitLimits:
    """Per upstream service, per sidecar: connections, calls waiting for a connection,
    calls in flight and retries in flight; over a limit a call fails fast with UNAVAILABLE
    naming the limit (and is not retried)."""

    max_connections: int = 1024
    max_pending: int = 1024
    max_requests: int = 1024
    max_retries: int = 16


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """Per endpoint: ``consecutive_errors`` calls ending with one of ``error_codes`` (0 =
    off) eject it, as does a success rate below ``success_rate_threshold`` (0..1) over its
    last ``success_rate_min_requests`` calls (0 = off). Ejected for ``base_ejection_ms`` ×
    times ejected (at most ``max_ejection_ms``), then HALF_OPEN lets ``half_open_probes``
    calls through: all OK closes it, a failure opens it again. At most
    ``max_ejection_percent`` of a cluster's endpoints are ejected (at least one may be),
    never the last healthy one."""

    consecutive_errors: int = 5
    error_codes: tuple[int, ...] = SICK_CODES
    base_ejection_ms: int = 30_000
    max_ejection_ms: int = 300_000
    max_ejection_percent: float = 50.0
    half_open_probes: int = 1
    success_rate_min_requests: int = 0
    success_rate_threshold: float = 0.0


@dataclass(frozen=True, slots=True)
class RouteRule:
    """How calls whose ``:authority`` names ``service`` are routed: to cluster ``cluster``,
    by ``rules`` (first match wins; no match, or no rules: every endpoint of the cluster),
    with a default timeout (ms, None = only the caller's deadline), a load balancer, the
    faults to inject, and the resilience settings (retries, limits, outlier detection)."""

    service: str
    cluster: str
    rules: tuple[Rule, ...] = ()
    timeout_ms: int | None = None
    load_balancer: str = DEFAULT_LOAD_BALANCER
    faults: tuple[FaultRule, ...] = ()
    retries: RetryPolicy = RetryPolicy()
    limits: CircuitLimits = CircuitLimits()
    outlier: OutlierPolicy = OutlierPolicy()


@dataclass(frozen=True)
class Snapshot:
    """Everything the outbound side needs to route a call. ``version`` is opaque; a service
    without a route goes to the cluster of the same name."""

    version: str
    clusters: tuple[Cluster, ...] = ()
    routes: tuple[RouteRule, ...] = ()
    authz: AuthzConfig = AuthzConfig()
    """Who may call what (``mesh_common.authz``): enforced by each destination's inbound side."""
    revoked: tuple[str, ...] = ()
    """Serial numbers (lower-case hex, no leading zeros) of revoked workload certificates:
    a peer presenting one is refused at its next connection."""
    _by_name: Mapping[str, Cluster] = field(init=False, repr=False, compare=False)
    _routes: Mapping[str, RouteRule] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_routes", MappingProxyType({r.service: r for r in self.routes}))
        by_cluster = {c.name: c for c in self.clusters}
        by_service = dict(by_cluster)
        for r in self.routes:  # explicit routes win over same-name clusters
            if r.cluster in by_cluster:
                by_service[r.service] = by_cluster[r.cluster]
        object.__setattr__(self, "_by_name", MappingProxyType(by_service))

    def cluster(self, service: str) -> Cluster | None:
        """The cluster a call to ``service`` goes to, or None."""
        return self._by_name.get(service)

    def route(self, service: str) -> RouteRule | None:
        """The route of ``service`` when the snapshot has one (else: same-name cluster)."""
        return self._routes.get(service)

    def content_hash(self) -> str:
        """A stable hash of the content (not the version), hex, 16 chars."""
        return content_hash(self.to_doc())

    def to_doc(self) -> dict[str, Any]:
        """The JSON-able document ``from_doc`` reads back (with the version)."""
        doc: dict[str, Any] = {
            "version": self.version,
            "clusters": [{"name": c.name, "endpoints": [_endpoint_doc(e) for e in c.endpoints]}
                         for c in self.clusters],
            "routes": [_route_doc(r) for r in self.routes]}
        if not self.authz.is_default:  # absent when default, so older hashes stay the same
            doc["authz"] = authz_to_doc(self.authz)
        if self.revoked:
            doc["revoked"] = list(self.revoked)
        return doc


def _endpoint_doc(e: Endpoint) -> dict[str, Any]:
    return {"address": e.address, "spiffe_id": e.spiffe_id, "instance": e.instance,
            "labels": dict(e.labels), "healthy": e.healthy}


def _method_doc(m: StringMatch | None) -> dict[str, str] | None:
    return None if m is None else m.to_doc()


def _route_doc(r: RouteRule) -> dict[str, Any]:
    return {
        "service": r.service, "cluster": r.cluster, "timeout_ms": r.timeout_ms,
        "load_balancer": r.load_balancer,
        "rules": [{"name": x.name,
                   "match": {"method": _method_doc(x.match.method),
                             "headers": {h.name: h.match.to_doc() for h in x.match.headers}},
                   "destinations": [{"subset": dict(d.subset), "weight": d.weight}
                                    for d in x.destinations],
                   "timeout_ms": x.timeout_ms} for x in r.rules],
        "faults": [{"name": f.name, "method": _method_doc(f.method),
                    "delay": {"ms": f.delay_ms, "percent": f.delay_percent} if f.delay_percent
                    else None,
                    "abort": {"code": f.abort_code, "percent": f.abort_percent} if f.abort_percent
                    else None} for f in r.faults],
        "retries": retry_doc(r.retries),
        "limits": {"max_connections": r.limits.max_connections,
                   "max_pending": r.limits.max_pending, "max_requests": r.limits.max_requests,
                   "max_retries": r.limits.max_retries},
        "outlier_detection": outlier_doc(r.outlier),
    }


def retry_doc(p: RetryPolicy) -> dict[str, Any]:
    return {"max_attempts": p.max_attempts, "retry_on": list(p.retry_on),
            "per_try_timeout_ms": p.per_try_timeout_ms, "backoff_base_ms": p.backoff_base_ms,
            "backoff_max_ms": p.backoff_max_ms, "max_request_bytes": p.max_request_bytes,
            "non_idempotent": [m.to_doc() for m in p.non_idempotent],
            "budget_percent": p.budget_percent, "budget_min_per_s": p.budget_min_per_s,
            "budget_window_s": p.budget_window_s}


def outlier_doc(p: OutlierPolicy) -> dict[str, Any]:
    return {"consecutive_errors": p.consecutive_errors, "error_codes": list(p.error_codes),
            "base_ejection_ms": p.base_ejection_ms, "max_ejection_ms": p.max_ejection_ms,
            "max_ejection_percent": p.max_ejection_percent,
            "half_open_probes": p.half_open_probes,
            "success_rate_min_requests": p.success_rate_min_requests,
            "success_rate_threshold": p.success_rate_threshold}


def content_hash(doc: Mapping[str, Any]) -> str:
    """Hash of a snapshot document without its version: hex, 16 chars."""
    body = {k: v for k, v in doc.items() if k != "version"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()[:16]


def merge(base: Snapshot, extra: Snapshot, version: str) -> Snapshot:
    """``base``'s clusters and routes plus those of ``extra`` whose names ``base`` lacks;
    ``base``'s authorization unless it is the default (then ``extra``'s: a dynamic sidecar's
    static base has none, the control plane's is the one in force); the revoked serials of
    both (sorted)."""
    names = {c.name for c in base.clusters}
    services = {r.service for r in base.routes}
    revoked = base.revoked
    if extra.revoked:
        revoked = tuple(sorted(set(base.revoked) | set(extra.revoked)))
    return Snapshot(version=version,
                    clusters=base.clusters + tuple(c for c in extra.clusters if c.name not in names),
                    routes=base.routes + tuple(r for r in extra.routes if r.service not in services),
                    authz=extra.authz if base.authz.is_default else base.authz,
                    revoked=revoked)


# ---------------------------------------------------------------------- validation
def _expect(cond: bool, where: str, why: str) -> None:
    if not cond:
        raise SnapshotError(f"{where}: {why}")


def parse_address(value: Any, where: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) with a port 1..65535."""
    _expect(isinstance(value, str) and ":" in value, where, f"expected HOST:PORT, got {value!r}")
    host, _, port_s = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise SnapshotError(f"{where}: not an IPv6 address: {host!r}") from None
    _expect(bool(host) and " " not in host, where, f"missing or bad host in {value!r}")
    _expect(port_s.isascii() and port_s.isdigit() and 1 <= int(port_s) <= 65535, where,
            f"port must be 1..65535, got {port_s!r}")
    return host, int(port_s)


def _name(value: Any, where: str, trust_domain: str | None) -> str:
    _expect(isinstance(value, str) and bool(value), where, "required string")
    try:
        SpiffeId(trust_domain or "mesh.local", value)
    except SpiffeError as exc:
        raise SnapshotError(f"{where}: {exc}") from None
    return value


def _labels(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    _expect(isinstance(value, dict), where, "expected a mapping of label to value")
    for k, v in value.items():
        _expect(isinstance(k, str) and 0 < len(k) <= 63 and set(k) <= _LABEL_CHARS,
                f"{where}.{k}", "label keys are 1-63 of [A-Za-z0-9-_./]")
        _expect(isinstance(v, str) and len(v) <= 253, f"{where}.{k}",
                "label values are strings of at most 253 characters")
    return tuple(sorted(value.items()))


def _known(doc: dict[str, Any], keys: set[str], where: str) -> None:
    for key in doc:
        _expect(key in keys, f"{where}{key}", f"unknown key (known: {', '.join(sorted(keys))})")


def from_doc(doc: Any, trust_domain: str | None = None) -> Snapshot:
    """Validate a whole snapshot document into a ``Snapshot``; raises ``SnapshotError``.

    ``trust_domain``, when given, is the only one endpoint SPIFFE IDs may name.
    """
    _expect(isinstance(doc, dict), "snapshot", "expected a mapping")
    _known(doc, {"version", "clusters", "routes", "authz", "revoked"}, "")
    version = doc.get("version")
    _expect(isinstance(version, str) and 0 < len(version) <= 64, "version",
            "required string of at most 64 characters")
    clusters_doc = doc.get("clusters", [])
    _expect(isinstance(clusters_doc, list), "clusters", "expected a list")
    clusters: list[Cluster] = []
    seen: set[str] = set()
    for i, c in enumerate(clusters_doc):
        where = f"clusters[{i}]"
        _expect(isinstance(c, dict), where, "expected a mapping")
        _known(c, {"name", "endpoints"}, f"{where}.")
        name = _name(c.get("name"), f"{where}.name", trust_domain)
        _expect(name not in seen, f"{where}.name", f"duplicate cluster {name!r}")
        seen.add(name)
        eps_doc = c.get("endpoints", [])
        _expect(isinstance(eps_doc, list), f"{where}.endpoints", "expected a list")
        eps: list[Endpoint] = []
        addresses: set[str] = set()
        for j, e in enumerate(eps_doc):
            ew = f"{where}.endpoints[{j}]"
            _expect(isinstance(e, dict), ew, "expected a mapping")
            _known(e, {"address", "spiffe_id", "instance", "labels", "healthy"}, f"{ew}.")
            host, port = parse_address(e.get("address"), f"{ew}.address")
            addr = f"{host}:{port}"
            _expect(addr not in addresses, f"{ew}.address", f"duplicate endpoint {addr}")
            addresses.add(addr)
            sid = e.get("spiffe_id")
            _expect(isinstance(sid, str), f"{ew}.spiffe_id", "required string")
            try:
                parsed = SpiffeId.parse(sid)
            except SpiffeError as exc:
                raise SnapshotError(f"{ew}.spiffe_id: {exc}") from None
            if trust_domain is not None:
                _expect(parsed.trust_domain == trust_domain, f"{ew}.spiffe_id",
                        f"trust domain {parsed.trust_domain!r} is not the mesh's "
                        f"({trust_domain!r})")
            instance = e.get("instance", "")
            _expect(isinstance(instance, str) and len(instance) <= 253, f"{ew}.instance",
                    "expected a string of at most 253 characters")
            healthy = e.get("healthy", True)
            _expect(isinstance(healthy, bool), f"{ew}.healthy", "expected true or false")
            eps.append(Endpoint(host, port, sid, instance, _labels(e.get("labels"),
                                                                    f"{ew}.labels"), healthy))
        clusters.append(Cluster(name, tuple(eps)))
    routes_doc = doc.get("routes", [])
    _expect(isinstance(routes_doc, list), "routes", "expected a list")
    routes: list[RouteRule] = []
    services: set[str] = set()
    for i, r in enumerate(routes_doc):
        route = parse_route(r, f"routes[{i}]", trust_domain)
        _expect(route.service not in services, f"routes[{i}].service",
                f"duplicate route for {route.service!r}")
        services.add(route.service)
        _expect(route.cluster in seen, f"routes[{i}].cluster",
                f"no cluster named {route.cluster!r}")
        routes.append(route)
    try:
        authz = authz_from_doc(doc["authz"]) if "authz" in doc else AuthzConfig()
    except AuthzError as exc:
        raise SnapshotError(str(exc)) from None
    revoked = doc.get("revoked", [])
    _expect(isinstance(revoked, list) and len(revoked) <= 100_000, "revoked",
            "expected a list of serial numbers")
    for i, serial in enumerate(revoked):
        _expect(isinstance(serial, str) and 0 < len(serial) <= 40
                and all(ch in "0123456789abcdef" for ch in serial), f"revoked[{i}]",
                "a certificate serial in lower-case hex")
    return Snapshot(version=version, clusters=tuple(clusters), routes=tuple(routes),
                    authz=authz, revoked=tuple(revoked))


def from_json(text: str | bytes, trust_domain: str | None = None) -> Snapshot:
    """``from_doc`` of a JSON text, with a size cap (``MAX_SNAPSHOT_BYTES``)."""
    if len(text) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError(f"snapshot: larger than {MAX_SNAPSHOT_BYTES} bytes")
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"snapshot: not valid JSON: {exc}") from None
    return from_doc(doc, trust_domain)


# ---------------------------------------------------------------------- routes
_GRPC_CODES = 17


def _timeout_ms(value: Any, where: str) -> int | None:
    if value is None:
        return None
    _expect(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 3_600_000,
            where, "milliseconds, an integer from 1 to 3600000")
    return value


def _percent(value: Any, where: str) -> float:
    _expect(isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 100,
            where, "a percentage from 0 to 100")
    return float(value)


def parse_string_match(value: Any, where: str, kinds: tuple[str, ...] = MATCH_KINDS
                       ) -> StringMatch:
    """``{exact: v}``, ``{prefix: v}`` or ``{regex: v}`` (one key)."""
    _expect(isinstance(value, dict) and len(value) == 1, where,
            f"expected one of {', '.join(kinds)} with a string")
    ((kind, text),) = value.items()
    _expect(kind in kinds, where, f"unknown match kind {kind!r} (known: {', '.join(kinds)})")
    _expect(isinstance(text, str) and len(text) <= 1024, f"{where}.{kind}",
            "a string of at most 1024 characters")
    if kind == "regex":
        try:
            re.compile(text)
        except re.error as exc:
            raise SnapshotError(f"{where}.regex: not a valid regular expression: {exc}") from None
        except (RecursionError, OverflowError):  # nested too deep, or a repeat count too large
            raise SnapshotError(f"{where}.regex: not a valid regular expression: too complex "
                                "(nested too deep or a repeat count too large)") from None
    return StringMatch(kind, text)


def parse_method_match(value: Any, where: str) -> StringMatch | None:
    """A gRPC method: exact ``/pkg.Service/Method`` or a prefix of one (``/pkg.Service/``)."""
    if value is None:
        return None
    m = parse_string_match(value, where, ("exact", "prefix"))
    _expect(m.value.startswith("/"), f"{where}.{m.kind}",
            f"a gRPC path starts with '/' (like /package.Service/Method), got {m.value!r}")
    if m.kind == "exact":
        _expect(m.value.count("/") == 2 and not m.value.endswith("/"), f"{where}.exact",
                f"an exact method is /package.Service/Method, got {m.value!r}")
    return m


def _code(value: Any, where: str) -> int:
    names = {"OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3,
             "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5, "ALREADY_EXISTS": 6,
             "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
             "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13,
             "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16}
    if isinstance(value, str) and value.upper() in names:
        value = names[value.upper()]
    _expect(isinstance(value, int) and not isinstance(value, bool) and 1 <= value < _GRPC_CODES,
            where, f"a gRPC status other than OK, by name or number 1-16, got {value!r}")
    return value


def parse_route(r: Any, where: str, trust_domain: str | None = None) -> RouteRule:
    """One route document (the snapshot's form); raises ``SnapshotError``."""
    _expect(isinstance(r, dict), where, "expected a mapping")
    _known(r, {"service", "cluster", "rules", "timeout_ms", "load_balancer", "faults", "retries",
               "limits", "outlier_detection"}, f"{where}.")
    service = _name(r.get("service"), f"{where}.service", trust_domain)
    cluster = _name(r.get("cluster", service), f"{where}.cluster", trust_domain)
    lb = r.get("load_balancer") or DEFAULT_LOAD_BALANCER
    _expect(lb in LOAD_BALANCERS, f"{where}.load_balancer",
            f"unknown load balancer {lb!r} (known: {', '.join(LOAD_BALANCERS)})")
    rules_doc = r.get("rules") or []
    _expect(isinstance(rules_doc, list), f"{where}.rules", "expected a list")
    rules = tuple(_parse_rule(x, f"{where}.rules[{j}]", f"{service}#{j}")
                  for j, x in enumerate(rules_doc))
    faults_doc = r.get("faults") or []
    _expect(isinstance(faults_doc, list), f"{where}.faults", "expected a list")
    faults = tuple(_parse_fault(x, f"{where}.faults[{j}]", f"{service}#fault{j}")
                   for j, x in enumerate(faults_doc))
    return RouteRule(service, cluster, rules,
                     _timeout_ms(r.get("timeout_ms"), f"{where}.timeout_ms"), lb, faults,
                     parse_retries(r.get("retries"), f"{where}.retries"),
                     parse_limits(r.get("limits"), f"{where}.limits"),
                     parse_outlier(r.get("outlier_detection"), f"{where}.outlier_detection"))


def _parse_rule(x: Any, where: str, default_name: str) -> Rule:
    _expect(isinstance(x, dict), where, "expected a mapping")
    _known(x, {"name", "match", "destinations", "timeout_ms"}, f"{where}.")
    name = x.get("name") or default_name
    _expect(isinstance(name, str) and len(name) <= 253, f"{where}.name", "a string")
    match_doc = x.get("match") or {}
    _expect(isinstance(match_doc, dict), f"{where}.match", "expected a mapping")
    _known(match_doc, {"method", "headers"}, f"{where}.match.")
    method = parse_method_match(match_doc.get("method"), f"{where}.match.method")
    headers_doc = match_doc.get("headers") or {}
    _expect(isinstance(headers_doc, dict), f"{where}.match.headers",
            "expected a mapping of header name to match")
    headers = []
    for hname, hm in headers_doc.items():
        _expect(isinstance(hname, str) and hname and hname == hname.lower()
                and not hname.startswith(":") and len(hname) <= 256,
                f"{where}.match.headers", f"header names are lower-case, not pseudo-headers: "
                f"{hname!r}")
        headers.append(HeaderMatch(hname, parse_string_match(hm, f"{where}.match.headers.{hname}")))
    dests_doc = x.get("destinations")
    if dests_doc is None:
        dests_doc = [{"weight": 100}]
    _expect(isinstance(dests_doc, list) and len(dests_doc) >= 1, f"{where}.destinations",
            "a non-empty list")
    dests = []
    for k, d in enumerate(dests_doc):
        dw = f"{where}.destinations[{k}]"
        _expect(isinstance(d, dict), dw, "expected a mapping")
        _known(d, {"subset", "weight"}, f"{dw}.")
        weight = d.get("weight", 100 if len(dests_doc) == 1 else None)
        _expect(isinstance(weight, int) and not isinstance(weight, bool) and 0 <= weight <= 100,
                f"{dw}.weight", "an integer percentage from 0 to 100")
        dests.append(Destination(_labels(d.get("subset"), f"{dw}.subset"), weight))
    total = sum(d.weight for d in dests)
    _expect(total == 100, f"{where}.destinations", f"weights must sum to 100, they sum to {total}")
    return Rule(name, RouteMatch(method, tuple(headers)), tuple(dests),
                _timeout_ms(x.get("timeout_ms"), f"{where}.timeout_ms"))


def parse_fault(x: Any, where: str, default_name: str) -> FaultRule:
    """One fault document (``name``, ``method``, ``delay: {ms, percent}``, ``abort: {code,
    percent}``; percent defaults to 100, the code is a name or number other than OK);
    raises ``SnapshotError``."""
    return _parse_fault(x, where, default_name)


def _parse_fault(x: Any, where: str, default_name: str) -> FaultRule:
    _expect(isinstance(x, dict), where, "expected a mapping")
    _known(x, {"name", "method", "delay", "abort"}, f"{where}.")
    name = x.get("name") or default_name
    _expect(isinstance(name, str) and len(name) <= 253, f"{where}.name", "a string")
    method = parse_method_match(x.get("method"), f"{where}.method")
    delay, abort = x.get("delay"), x.get("abort")
    _expect(delay is not None or abort is not None, where, "a fault needs a delay or an abort")
    delay_ms, delay_pct, code, abort_pct = 0, 0.0, 0, 0.0
    if delay is not None:
        _expect(isinstance(delay, dict), f"{where}.delay", "expected a mapping (ms, percent)")
        _known(delay, {"ms", "percent"}, f"{where}.delay.")
        delay_ms = delay.get("ms")
        _expect(isinstance(delay_ms, int) and not isinstance(delay_ms, bool)
                and 1 <= delay_ms <= 600_000, f"{where}.delay.ms",
                "milliseconds, an integer from 1 to 600000")
        delay_pct = _percent(delay.get("percent", 100), f"{where}.delay.percent")
    if abort is not None:
        _expect(isinstance(abort, dict), f"{where}.abort", "expected a mapping (code, percent)")
        _known(abort, {"code", "percent"}, f"{where}.abort.")
        code = _code(abort.get("code"), f"{where}.abort.code")
        abort_pct = _percent(abort.get("percent", 100), f"{where}.abort.percent")
    return FaultRule(name, method, delay_ms, delay_pct, code, abort_pct)


# ---------------------------------------------------------------------- resilience
def _int_in(doc: dict[str, Any], key: str, where: str, lo: int, hi: int, default: Any) -> Any:
    value = doc.get(key, default)
    if value is None and default is None:
        return None
    _expect(isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
            f"{where}.{key}", f"an integer from {lo} to {hi}")
    return value


def _num_in(doc: dict[str, Any], key: str, where: str, lo: float, hi: float,
            default: float) -> float:
    value = doc.get(key, default)
    _expect(isinstance(value, int | float) and not isinstance(value, bool) and lo <= value <= hi,
            f"{where}.{key}", f"a number from {lo:g} to {hi:g}")
    return float(value)


def _codes(value: Any, where: str, default: tuple[int, ...]) -> tuple[int, ...]:
    if value is None:
        return default
    _expect(isinstance(value, list), where, "a list of gRPC status codes (names or numbers)")
    return tuple(dict.fromkeys(_code(c, f"{where}[{i}]") for i, c in enumerate(value)))


def parse_retries(doc: Any, where: str) -> RetryPolicy:
    """A retry policy document (every field optional; defaults as ``RetryPolicy``)."""
    if doc is None:
        return RetryPolicy()
    _expect(isinstance(doc, dict), where, "expected a mapping")
    d = RetryPolicy()
    _known(doc, {"max_attempts", "retry_on", "per_try_timeout_ms", "backoff_base_ms",
                 "backoff_max_ms", "max_request_bytes", "non_idempotent", "budget_percent",
                 "budget_min_per_s", "budget_window_s"}, f"{where}.")
    base = _int_in(doc, "backoff_base_ms", where, 1, 60_000, d.backoff_base_ms)
    cap = _int_in(doc, "backoff_max_ms", where, 1, 600_000, d.backoff_max_ms)
    _expect(cap >= base, f"{where}.backoff_max_ms", "must be at least backoff_base_ms")
    non_idem = doc.get("non_idempotent") or []
    _expect(isinstance(non_idem, list), f"{where}.non_idempotent",
            "a list of methods ({exact: /pkg.Service/Method} or {prefix: ...})")
    for i, m in enumerate(non_idem):  # an empty entry is not "any method": say so
        _expect(m is not None, f"{where}.non_idempotent[{i}]",
                "a method ({exact: /pkg.Service/Method} or {prefix: ...}), got nothing")
    return RetryPolicy(
        max_attempts=_int_in(doc, "max_attempts", where, 1, 10, d.max_attempts),
        retry_on=_codes(doc.get("retry_on"), f"{where}.retry_on", d.retry_on),
        per_try_timeout_ms=_int_in(doc, "per_try_timeout_ms", where, 1, 3_600_000, None),
        backoff_base_ms=base, backoff_max_ms=cap,
        max_request_bytes=_int_in(doc, "max_request_bytes", where, 0, 64 << 20,
                                  d.max_request_bytes),
        non_idempotent=tuple(parse_method_match(m, f"{where}.non_idempotent[{i}]")  # type: ignore[misc]
                             for i, m in enumerate(non_idem)),
        budget_percent=_num_in(doc, "budget_percent", where, 0, 100, d.budget_percent),
        budget_min_per_s=_num_in(doc, "budget_min_per_s", where, 0, 100_000, d.budget_min_per_s),
        budget_window_s=_num_in(doc, "budget_window_s", where, 1, 3600, d.budget_window_s))


def parse_limits(doc: Any, where: str) -> CircuitLimits:
    """A limits document (every field optional; defaults as ``CircuitLimits``)."""
    if doc is None:
        return CircuitLimits()
    _expect(isinstance(doc, dict), where, "expected a mapping")
    _known(doc, {"max_connections", "max_pending", "max_requests", "max_retries"}, f"{where}.")
    d = CircuitLimits()
    return CircuitLimits(*(_int_in(doc, k, where, 0 if k == "max_retries" else 1, 1_000_000,
                                   getattr(d, k))
                           for k in ("max_connections", "max_pending", "max_requests",
                                     "max_retries")))


def parse_outlier(doc: Any, where: str) -> OutlierPolicy:
    """An outlier detection document (every field optional; defaults as ``OutlierPolicy``)."""
    if doc is None:
        return OutlierPolicy()
    _expect(isinstance(doc, dict), where, "expected a mapping")
    _known(doc, {"consecutive_errors", "error_codes", "base_ejection_ms", "max_ejection_ms",
                 "max_ejection_percent", "half_open_probes", "success_rate_min_requests",
                 "success_rate_threshold"}, f"{where}.")
    d = OutlierPolicy()
    base = _int_in(doc, "base_ejection_ms", where, 1, 3_600_000, d.base_ejection_ms)
    cap = _int_in(doc, "max_ejection_ms", where, 1, 86_400_000, max(d.max_ejection_ms, base))
    _expect(cap >= base, f"{where}.max_ejection_ms", "must be at least base_ejection_ms")
    return OutlierPolicy(
        consecutive_errors=_int_in(doc, "consecutive_errors", where, 0, 1000,
                                   d.consecutive_errors),
        error_codes=_codes(doc.get("error_codes"), f"{where}.error_codes", d.error_codes),
        base_ejection_ms=base, max_ejection_ms=cap,
        max_ejection_percent=_num_in(doc, "max_ejection_percent", where, 0, 100,
                                     d.max_ejection_percent),
        half_open_probes=_int_in(doc, "half_open_probes", where, 1, 1000, d.half_open_probes),
        success_rate_min_requests=_int_in(doc, "success_rate_min_requests", where, 0, 100_000,
                                          d.success_rate_min_requests),
        success_rate_threshold=_num_in(doc, "success_rate_threshold", where, 0, 1,
                                       d.success_rate_threshold))
