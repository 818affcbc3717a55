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
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .spiffe import SpiffeError, SpiffeId

MAX_SNAPSHOT_BYTES = 8 * 1024 * 1024
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./")


class SnapshotError(ValueError):
    """An invalid snapshot document: ``str(err)`` is ``<field>: <reason>``."""


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


@dataclass(frozen=True, slots=True)
class RouteRule:
    """Calls whose ``:authority`` names ``service`` go to cluster ``cluster``."""

    service: str
    cluster: str


@dataclass(frozen=True)
class Snapshot:
    """Everything the outbound side needs to route a call. ``version`` is opaque; a service
    without a route goes to the cluster of the same name."""

    version: str
    clusters: tuple[Cluster, ...] = ()
    routes: tuple[RouteRule, ...] = ()
    _by_name: Mapping[str, Cluster] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_cluster = {c.name: c for c in self.clusters}
        by_service = dict(by_cluster)
        for r in self.routes:  # explicit routes win over same-name clusters
            if r.cluster in by_cluster:
                by_service[r.service] = by_cluster[r.cluster]
        object.__setattr__(self, "_by_name", MappingProxyType(by_service))

    def cluster(self, service: str) -> Cluster | None:
        """The cluster a call to ``service`` goes to, or None."""
        return self._by_name.get(service)

    def content_hash(self) -> str:
        """A stable hash of the content (not the version), hex, 16 chars."""
        return content_hash(self.to_doc())

    def to_doc(self) -> dict[str, Any]:
        """The JSON-able document ``from_doc`` reads back (with the version)."""
        return {"version": self.version,
                "clusters": [{"name": c.name, "endpoints": [_endpoint_doc(e) for e in c.endpoints]}
                             for c in self.clusters],
                "routes": [{"service": r.service, "cluster": r.cluster} for r in self.routes]}


def _endpoint_doc(e: Endpoint) -> dict[str, Any]:
    return {"address": e.address, "spiffe_id": e.spiffe_id, "instance": e.instance,
            "labels": dict(e.labels), "healthy": e.healthy}


def content_hash(doc: Mapping[str, Any]) -> str:
    """Hash of a snapshot document without its version: hex, 16 chars."""
    body = {k: v for k, v in doc.items() if k != "version"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()[:16]


def merge(base: Snapshot, extra: Snapshot, version: str) -> Snapshot:
    """``base``'s clusters and routes plus those of ``extra`` whose names ``base`` lacks."""
    names = {c.name for c in base.clusters}
    services = {r.service for r in base.routes}
    return Snapshot(version=version,
                    clusters=base.clusters + tuple(c for c in extra.clusters if c.name not in names),
                    routes=base.routes + tuple(r for r in extra.routes if r.service not in services))


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
    _known(doc, {"version", "clusters", "routes"}, "")
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
        where = f"routes[{i}]"
        _expect(isinstance(r, dict), where, "expected a mapping")
        _known(r, {"service", "cluster"}, f"{where}.")
        service = _name(r.get("service"), f"{where}.service", trust_domain)
        _expect(service not in services, f"{where}.service", f"duplicate route for {service!r}")
        services.add(service)
        target = _name(r.get("cluster"), f"{where}.cluster", trust_domain)
        _expect(target in seen, f"{where}.cluster", f"no cluster named {target!r}")
        routes.append(RouteRule(service, target))
    return Snapshot(version=version, clusters=tuple(clusters), routes=tuple(routes))


def from_json(text: str | bytes, trust_domain: str | None = None) -> Snapshot:
    """``from_doc`` of a JSON text, with a size cap (``MAX_SNAPSHOT_BYTES``)."""
    if len(text) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError(f"snapshot: larger than {MAX_SNAPSHOT_BYTES} bytes")
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"snapshot: not valid JSON: {exc}") from None
    return from_doc(doc, trust_domain)
